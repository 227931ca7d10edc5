"""``histolite info``: the install's versions, active fast paths and extras, for bug reports."""

from __future__ import annotations

import json

import typer

from histolite.cli.app import app


# `help=` keeps `--help` to one line; the docstring below is for whoever reads the code.
@app.command(
    "info", help="Versions, active fast paths and missing extras, for bug reports (loads no model)."
)
def info(
    as_json: bool = typer.Option(False, "--json", help="One JSON object (stable keys)."),
) -> None:
    """Print versions, which fast paths are active and which extras are installed.

    Paste it into a bug report. It loads no model and asks torch only whether a GPU is there
    and what it is called (no tensor on it), so it takes seconds; missing pieces are listed with
    the command that installs them, and it exits 0 either way (a serving-only install without
    torch is a valid install, not an error).
    """
    from histolite.environment import collect_environment, format_text

    environment = collect_environment()
    typer.echo(json.dumps(environment.to_dict(), indent=2) if as_json else format_text(environment))
