"""``histolite slide ...``: classify whole-slide images tile by tile, merge shards, features."""

from __future__ import annotations

from pathlib import Path

import typer

from histolite.cli.app import slide_app


@slide_app.command("infer")
def slide_infer(
    slides: list[Path] = typer.Argument(..., help="Slides (SVS, pyramidal TIFF, OME-TIFF, ...)."),
    model: Path = typer.Option(..., "--model", help="Exported model folder (histolite export)."),
    out: Path = typer.Option(..., "--out", help="Output folder; one OUT/<stem>/ per slide."),
    tile_um: float | None = typer.Option(
        None, "--tile-um", help="Tile side in microns (default: the model card's training tile)."
    ),
    overlap: float = typer.Option(0.0, help="Overlap between tiles, a fraction in [0, 1)."),
    min_tissue: float = typer.Option(
        0.5, "--min-tissue", help="Classify tiles with at least this tissue fraction."
    ),
    batch_size: int = typer.Option(32, "--batch-size", help="Tiles per model call."),
    mpp: float | None = typer.Option(
        None, "--mpp", help="Microns per pixel, for slides whose files do not record it."
    ),
    shard: str = typer.Option(
        "0/1", "--shard", help="I/N: classify the I-th of N disjoint shares of every slide."
    ),
    threads: int | None = typer.Option(None, help="ONNX Runtime threads."),
    device: str = typer.Option("auto", help="auto (CUDA when ONNX Runtime has it), cpu or cuda."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Tissue mask, tiles at a physical size, one class per tile: CSV, GeoJSON, heatmap, summary."""
    from histolite.export.runtime import OnnxClassifier
    from histolite.export.slide_inference import SlideSettings, classify_slides
    from histolite.slide.tiles import parse_shard

    classifier = OnnxClassifier(model, threads=threads, device=device)
    settings = SlideSettings(
        tile_um=tile_um,
        overlap=overlap,
        min_tissue=min_tissue,
        batch_size=batch_size,
        mpp=mpp,
        shard=parse_shard(shard),
    )

    def report(path: Path, summary: dict | None, error: str | None) -> None:
        if error is not None:
            typer.secho(f"FAILED {path}: {error}", fg="red", err=True)
            return
        assert summary is not None
        typer.echo(
            f"{path.name}: {summary['tiles']} tiles of {summary['tile_um']:.1f} um, tissue "
            f"{summary['tissue_area_mm2']:.2f} mm2, {summary['timings_s']['tiles_per_s']:.1f} "
            f"tiles/s{' (' + summary['note'] + ')' if summary.get('note') else ''}"
        )

    batch = classify_slides(slides, classifier, out, settings, progress=progress, report=report)
    typer.echo(f"{len(batch['classified'])} slide(s) classified into {out}")
    if batch["failed"]:
        typer.secho(
            f"{len(batch['failed'])} slide(s) failed; see {out / 'batch_summary.json'}",
            fg="red",
            err=True,
        )
        raise typer.Exit(1)


@slide_app.command("merge")
def slide_merge(
    slide_dirs: list[Path] = typer.Argument(..., help="OUT/<stem> folders holding shards/."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Join the shards of `slide infer --shard I/N` into one slide's outputs."""
    from histolite.export.slide_inference import merge_shards

    for folder in slide_dirs:
        merged = merge_shards(folder, progress=progress)
        typer.echo(f"{folder}: merged {merged['shard']['count']} shards, {merged['tiles']} tiles")
