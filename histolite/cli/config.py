"""``histolite config``: check a recipe before a long run, and the reference of every key."""

from __future__ import annotations

from pathlib import Path

import typer

from histolite.cli.app import config_app
from histolite.cli.options import OVERRIDES


@config_app.command("show")
def show(
    config: Path = typer.Argument(..., help="Experiment YAML."),
    overrides: list[str] = OVERRIDES,
) -> None:
    """Validate a recipe with its --set overrides and print it with every default filled in.

    The same checks `train` and `distill` make on the config, without reading any data or
    training; the output is the config.yaml a run would save.
    """
    from histolite.config import TrainConfig, dump_config, load_config

    typer.echo(dump_config(load_config(config, overrides, TrainConfig)), nl=False)


@config_app.command("reference")
def reference() -> None:
    """Every config key with its type, default and meaning, as Markdown (docs/config.md)."""
    from histolite.config import config_reference

    typer.echo(config_reference(), nl=False)
