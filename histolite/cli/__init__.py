"""``histolite`` command line: one module per command group, wired onto one Typer app.

User errors print one clear line (no traceback); leakage warnings print as bold lines.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings

import typer

from histolite.cli.app import app
from histolite.errors import HistoliteError

# Importing a command module registers its commands; `histolite --help` lists them in this
# order, which follows the data's path.
for _module in (
    "data",
    "training",
    "evaluation",
    "deploy",
    "slide",
    "models",
    "stain",
    "config",
    "info",
):
    importlib.import_module(f"histolite.cli.{_module}")

__all__ = ["app", "main"]

_EXTRA_FOR_MODULE = {
    **dict.fromkeys(
        (
            "torch",
            "torchvision",
            "timm",
            "lightning",
            "sklearn",
            "matplotlib",
            "onnx",
            "tensorboard",
        ),
        "train",
    ),
    **dict.fromkeys(("fastapi", "uvicorn", "multipart", "onnxruntime", "starlette"), "serve"),
}


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    """Histolite's warnings are for people, not developers: no source line, hard to miss."""
    from histolite.errors import HistoliteWarning

    if issubclass(category, HistoliteWarning):
        typer.secho(f"WARNING: {message}", fg="yellow", bold=True, err=True)
        return
    _default_show_warning(message, category, filename, lineno, file, line)  # type: ignore[arg-type]


_default_show_warning = warnings.showwarning


def main() -> None:
    """Entry point: user errors print one clear line, not a traceback."""
    warnings.showwarning = _show_warning
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    # Lightning's banner lines (GPU available, tips) are noise in a CLI; warnings still show.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    try:
        app()
    except HistoliteError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except ModuleNotFoundError as exc:
        extra = _EXTRA_FOR_MODULE.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        typer.echo(
            f"error: this command needs {exc.name!r}; install it with "
            f"pip install 'histolite[{extra}]'",
            err=True,
        )
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
