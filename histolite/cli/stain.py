"""``histolite stain ...``: stain normalisation of images."""

from __future__ import annotations

from pathlib import Path

import typer

from histolite.cli.app import stain_app


@stain_app.command("normalize")
def stain_normalize(
    inputs: list[Path] = typer.Argument(..., help="Images to normalise."),
    target: Path = typer.Option(
        ..., "--target", help="Reference image, or saved statistics (.json)."
    ),
    out: Path = typer.Option(..., "--out", help="Output folder (same file names)."),
    save_target: Path | None = typer.Option(None, help="Also save the target statistics as JSON."),
    ignore_background: bool = typer.Option(
        False, help="Statistics from tissue only; leave bright background untouched."
    ),
) -> None:
    """Reinhard stain normalisation of images to a target."""
    import torch
    from tqdm import tqdm

    from histolite.data.images import load_rgb, save_rgb
    from histolite.fileio import atomic_path
    from histolite.stain import ReinhardNormalizer

    normalizer = ReinhardNormalizer.from_file(target, ignore_background=ignore_background)
    if save_target:
        normalizer.save(save_target)
    out.mkdir(parents=True, exist_ok=True)
    for path in tqdm(inputs, desc="normalising", disable=len(inputs) < 2):
        pixels = torch.from_numpy(load_rgb(path)).permute(2, 0, 1)
        result = normalizer(pixels).permute(1, 2, 0).numpy()
        destination = out / path.name
        with atomic_path(destination) as tmp:
            save_rgb(result, tmp.with_suffix(path.suffix))
            tmp.with_suffix(path.suffix).replace(tmp)
    typer.echo(f"normalised {len(inputs)} image(s) into {out}")
