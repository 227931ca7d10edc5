"""``histolite stain ...``: fit a stain target, normalise images, folders or slide tiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from histolite.cli.app import stain_app

METHOD = typer.Option("reinhard", help="reinhard (Lab statistics) or macenko (stain vectors).")


def _normaliser(method: str, target: Path, ignore_background: bool, fallback: str) -> object:
    from histolite.errors import HistoliteError
    from histolite.stain import ReinhardNormalizer
    from histolite.stain.macenko import MacenkoNormalizer

    if method == "reinhard":
        return ReinhardNormalizer.from_file(target, ignore_background=ignore_background)
    if method == "macenko":
        return MacenkoNormalizer.from_file(target, fallback=fallback)
    raise HistoliteError(f"--method {method!r}: expected reinhard or macenko")


@stain_app.command("fit")
def stain_fit(
    reference: Path = typer.Argument(..., help="A reference image with typical H&E staining."),
    out: Path = typer.Option(..., "--out", help="JSON to write (use it as data.stain.target)."),
    method: str = METHOD,
    ignore_background: bool = typer.Option(False, help="Reinhard: statistics of tissue only."),
) -> None:
    """Save a stain target: Lab mean/std (Reinhard) or the H and E stain vectors (Macenko)."""
    normaliser = _normaliser(method, reference, ignore_background, "unchanged")
    normaliser.save(out)  # type: ignore[attr-defined]
    typer.echo(f"wrote {method} target of {reference} to {out}")


def _inputs(paths: list[Path]) -> list[Path]:
    """Image files as given; folders stand for every image under them."""
    from histolite.data.images import is_image_file

    found: list[Path] = []
    for path in paths:
        found += sorted(p for p in path.rglob("*") if is_image_file(p)) if path.is_dir() else [path]
    return found


@stain_app.command("normalize")
def stain_normalize(
    inputs: list[Path] = typer.Argument(
        ..., help="Images or folders of images (sub-folders kept), or slides with --slide-tiles."
    ),
    target: Path = typer.Option(
        ..., "--target", help="Reference image, or a target saved by `stain fit` (.json)."
    ),
    out: Path = typer.Option(..., "--out", help="Output folder (same relative file names)."),
    method: str = METHOD,
    save_target: Path | None = typer.Option(None, help="Also save the target as JSON."),
    ignore_background: bool = typer.Option(
        False, help="Reinhard: statistics from tissue only; leave bright background untouched."
    ),
    fallback: str = typer.Option(
        "unchanged", help="Macenko, tiles with too little tissue: unchanged or target."
    ),
    slide_tiles: float | None = typer.Option(
        None,
        "--slide-tiles",
        help="Inputs are slides: write their tissue tiles of this many microns (PNG).",
    ),
    tile_px: int = typer.Option(224, "--tile-px", min=16, help="Slide tiles: side in pixels."),
    preview: int = typer.Option(
        8, help="Images in preview.png (before above, after below); 0 for none."
    ),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Stain-normalise images (or slides' tissue tiles) to a target; writes a preview strip."""
    from tqdm import tqdm

    from histolite.data.images import load_rgb

    normaliser = _normaliser(method, target, ignore_background, fallback)
    if save_target:
        normaliser.save(save_target)  # type: ignore[attr-defined]
    out.mkdir(parents=True, exist_ok=True)
    writer = _Writer(normaliser, preview)
    if slide_tiles is not None:
        from histolite.slide.reader import expand_slide_paths

        for slide, tiles in _slide_tiles(expand_slide_paths(inputs), slide_tiles, tile_px):
            for (x, y), pixels in tqdm(tiles, desc=slide.name, disable=not progress):
                writer.write(pixels, out / slide.stem / f"{slide.stem}_x{x}_y{y}.png")
    else:
        jobs = _file_jobs(inputs, preview)
        every = max(1, len(jobs) // max(preview, 1))  # the preview samples the whole input
        bar = tqdm(jobs, desc="normalising", disable=not progress or len(jobs) < 2)
        for i, (path, relative) in enumerate(bar):
            writer.write(load_rgb(path), out / relative, show=i % every == 0)
    counts = getattr(normaliser, "counts", None)
    if counts:
        typer.echo(
            "fell back on "
            + ", ".join(f"{n} tile(s): {why}" for why, n in sorted(counts.items()))
            + f" ({fallback})"
        )
    if writer.pairs:
        _write_preview(out / "preview.png", writer.pairs)
    shown = " (preview.png)" if writer.pairs else ""
    typer.echo(f"normalised {writer.count} image(s) into {out}{shown}")


class _Writer:
    """Normalises images and writes them atomically, keeping a few pairs for the preview."""

    def __init__(self, normaliser: Any, preview: int) -> None:
        self.normaliser = normaliser
        self.preview = preview
        self.pairs: list[tuple[Any, Any]] = []
        self.count = 0

    def write(self, pixels: Any, destination: Path, show: bool = True) -> None:
        import numpy as np
        import torch

        from histolite.data.images import save_rgb
        from histolite.fileio import atomic_path

        tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)
        result = self.normaliser(tensor).permute(1, 2, 0).numpy()
        destination.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(destination) as tmp:
            staged = tmp.with_suffix(destination.suffix)  # save_rgb picks the format by suffix
            save_rgb(result, staged)
            staged.replace(tmp)
        self.count += 1
        if show and len(self.pairs) < self.preview:
            self.pairs.append((pixels, result))


def _file_jobs(inputs: list[Path], preview: int) -> list[tuple[Path, Path]]:
    """(image, its path under OUT) of every input file; a folder keeps its own name, so class
    folders survive."""
    files = _inputs(inputs)
    roots = {p: p.parent for p in inputs if p.is_file()}
    for folder in (p for p in inputs if p.is_dir()):
        roots.update({f: folder.parent for f in files if f.is_relative_to(folder)})
    jobs = [(path, path.relative_to(roots[path])) for path in files]
    if preview and any(relative == Path("preview.png") for _, relative in jobs):
        raise typer.BadParameter(
            "an input is named preview.png and would be overwritten by the preview; "
            "rename it or pass --preview 0",
            param_hint="INPUTS",
        )
    return jobs


def _slide_tiles(slides: list[Path], tile_um: float, tile_px: int):  # type: ignore[no-untyped-def]
    """(slide, [((x, y), pixels), ...]) of each slide's tissue tiles, read lazily."""
    from histolite.slide.reader import open_slide, read_region
    from histolite.slide.tiles import plan_tissue_tiles

    for path in slides:
        slide = open_slide(path)
        try:
            tiles = plan_tissue_tiles(slide, tile_um).tiles
            yield path, [((t.x, t.y), read_region(slide, t.x, t.y, t.size, tile_px)) for t in tiles]
        finally:
            slide.close()


def _write_preview(path: Path, pairs: list[tuple[Any, Any]]) -> None:
    """Originals above, normalised below, each resized to 128 px."""
    import numpy as np
    from PIL import Image

    from histolite.fileio import atomic_path

    side = 128
    canvas = Image.new("RGB", (side * len(pairs), 2 * side), "white")
    for i, (before, after) in enumerate(pairs):
        for row, pixels in enumerate((before, after)):
            tile = Image.fromarray(np.ascontiguousarray(pixels)).resize((side, side))
            canvas.paste(tile, (i * side, row * side))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
