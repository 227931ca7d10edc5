"""The ``histolite`` Typer application and its command groups (commands live beside it)."""

from __future__ import annotations

import typer

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Small, accurate, deployable classifiers for H&E histology images.",
)
data_app = typer.Typer(no_args_is_help=True, help="Datasets: download, check, split, synthetic.")
stain_app = typer.Typer(no_args_is_help=True, help="Stain normalisation.")
models_app = typer.Typer(no_args_is_help=True, help="Model registry.")
config_app = typer.Typer(
    no_args_is_help=True, help="Experiment configs: check a recipe, the reference of every key."
)
audit_app = typer.Typer(no_args_is_help=True, help="The service's prediction audit log.")
slide_app = typer.Typer(
    no_args_is_help=True,
    help="Whole-slide images: classify tiles, merge shards, tiles from annotations, evaluate, "
    "features.",
)
app.add_typer(data_app, name="data")
app.add_typer(stain_app, name="stain")
app.add_typer(config_app, name="config")
app.add_typer(models_app, name="models")
app.add_typer(slide_app, name="slide")
app.add_typer(audit_app, name="audit")
