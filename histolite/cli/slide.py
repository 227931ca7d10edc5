"""``histolite slide ...``: classify slides tile by tile, merge shards, cut training tiles from
annotated slides, score predictions against annotations, slide features and MIL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from histolite.cli.app import slide_app


@slide_app.command("infer")
def slide_infer(
    slides: list[Path] = typer.Argument(
        ..., help="Slides (SVS, pyramidal TIFF, OME-TIFF, ...) or folders of them."
    ),
    model: Path = typer.Option(..., "--model", help="Exported model folder (histolite export)."),
    out: Path = typer.Option(..., "--out", help="Output folder; one OUT/<stem>/ per slide."),
    tile_um: float | None = typer.Option(
        None,
        "--tile-um",
        min=1.0,
        help="Tile side in microns (default: the model card's training tile).",
    ),
    overlap: float = typer.Option(0.0, help="Overlap between tiles, a fraction in [0, 1)."),
    min_tissue: float = typer.Option(
        0.5, "--min-tissue", help="Classify tiles with at least this tissue fraction."
    ),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Tiles per model call."),
    mpp: float | None = typer.Option(
        None, "--mpp", help="Microns per pixel, for slides whose files do not record it."
    ),
    shard: str = typer.Option(
        "0/1", "--shard", help="I/N: classify the I-th of N disjoint shares of every slide."
    ),
    threads: int | None = typer.Option(None, min=1, help="ONNX Runtime threads."),
    device: str = typer.Option("auto", help="auto (CUDA when ONNX Runtime has it), cpu or cuda."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Tissue mask, tiles at a physical size, one class per tile: CSV, GeoJSON, heatmap, summary."""
    from histolite.runtime.classifier import OnnxClassifier
    from histolite.slide.inference import SlideSettings, classify_slides
    from histolite.slide.layout import BatchOutputs
    from histolite.slide.reader import expand_slide_paths
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

    paths = expand_slide_paths(slides)
    batch = classify_slides(paths, classifier, out, settings, progress=progress, report=report)
    typer.echo(f"{len(batch['classified'])} slide(s) classified into {out}")
    if batch["failed"]:
        report_file = BatchOutputs(out).batch_summary(settings.shard)
        typer.secho(
            f"{len(batch['failed'])} slide(s) failed; see {report_file}",
            fg="red",
            err=True,
        )
        raise typer.Exit(1)


@slide_app.command("merge")
def slide_merge(
    folders: list[Path] = typer.Argument(
        ..., help="OUT/<stem> folders holding shards/; with --shards N, the OUT folder itself."
    ),
    shards: int | None = typer.Option(
        None,
        "--shards",
        min=1,
        help="N: merge every slide of OUT once all N shards have written OUT/.shards/I-of-N.done.",
    ),
    wait: float = typer.Option(
        0.0,
        "--wait",
        min=0.0,
        help="With --shards: seconds to wait for every shard to finish without failures "
        "(retried shards rewrite their markers); then merge what succeeded.",
    ),
    model: Path | None = typer.Option(
        None,
        "--model",
        help="The exported model the shards must have used: markers and shard outputs of any "
        "other model (an earlier run's on the same volume) count as not yet written.",
    ),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Join the shards of `slide infer --shard I/N` into one slide's outputs."""
    from histolite.errors import HistoliteError
    from histolite.runtime.card import exported_model_identity
    from histolite.slide.merge import merge_batch, merge_shards

    identity = exported_model_identity(model) if model is not None else None
    if identity is None:
        typer.secho(
            "warning: without --model, an earlier run's shard outputs of one model cannot be "
            "told from this run's; pass --model MODEL_DIR (the shards' --model), or delete "
            "OUT/.shards before rerunning the shards",
            fg="yellow",
            err=True,
        )
    if shards is None:
        for folder in folders:
            merged = merge_shards(folder, progress=progress, model=identity)
            typer.echo(
                f"{folder}: merged {merged['shard']['count']} shards, {merged['tiles']} tiles"
            )
        return
    if len(folders) != 1:
        raise HistoliteError("--shards N merges one OUT folder (the --out of the shard runs)")
    (out,) = folders
    batch = merge_batch(out, shards, wait_s=wait, progress=progress, model=identity)
    for entry in batch["classified"]:
        typer.echo(f"{entry['slide']}: merged {shards} shards, {entry['tiles']} tiles")
    for entry in batch["failed"]:
        typer.secho(f"FAILED {entry['slide']}: {entry['error']}", fg="red", err=True)
    typer.echo(f"{len(batch['classified'])} slide(s) merged into {out}")
    if batch["failed"]:
        raise typer.Exit(1)


@slide_app.command("features")
def slide_features_command(
    slides: list[Path] = typer.Argument(..., help="Slides to embed, or folders of them."),
    out: Path = typer.Option(..., "--out", help="Folder for one <stem>.npz per slide."),
    backbone: str = typer.Option("tf_efficientnet_lite0", help="Registry backbone."),
    pretrained: bool = typer.Option(
        True, help="ImageNet weights (offline for tf_efficientnet_lite0/1/2)."
    ),
    weights: Path | None = typer.Option(None, help="A local weights file for the backbone."),
    tile_um: float = typer.Option(112.0, "--tile-um", min=1.0, help="Tile side in microns."),
    tile_px: int = typer.Option(
        224, "--tile-px", min=16, help="Tile side in pixels fed to the backbone."
    ),
    min_tissue: float = typer.Option(0.5, "--min-tissue", help="Least tissue fraction per tile."),
    mpp: float | None = typer.Option(
        None, "--mpp", help="Microns per pixel, if the file lacks it."
    ),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Tiles per forward pass."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Cache per-tile embeddings of slides (slide bags for attention MIL).

    Put each slide's file under BAGS/<class>/ and train with data.dataset=slide_features.
    """
    from histolite.models.embedding import tile_embedder
    from histolite.slide.features import TileSettings, slide_features
    from histolite.slide.reader import expand_slide_paths, require_distinct_stems

    settings = TileSettings(
        tile_um=tile_um, tile_px=tile_px, min_tissue=min_tissue, mpp=mpp, batch_size=batch_size
    )
    paths = expand_slide_paths(slides)
    require_distinct_stems(paths)  # one OUT/<stem>.npz per slide
    embed, provenance = tile_embedder(
        backbone, pretrained=pretrained, weights=str(weights) if weights else None
    )
    for path in slide_features(paths, out, settings, embed, provenance, progress=progress):
        typer.echo(f"wrote {path}")


@slide_app.command("predict")
def slide_predict(
    run: Path = typer.Argument(..., help="An attention-MIL run trained on slide features."),
    features: list[Path] = typer.Argument(..., help="Slide feature files (slide features)."),
    out: Path = typer.Option(..., "--out", help="Folder; one OUT/<stem>/ per slide."),
    checkpoint: str = typer.Option("best", help="best, last, or a checkpoint file name."),
) -> None:
    """Slide label from a slide-bag MIL run, with each tile's attention drawn on the slide."""
    import json

    from histolite.data.feature_bags import load_bag
    from histolite.data.folder import Sample
    from histolite.errors import HistoliteError
    from histolite.evaluate.inference import predict_feature_bags
    from histolite.models.loading import load_run
    from histolite.slide.features import write_bag_prediction
    from histolite.slide.layout import BatchOutputs

    loaded = load_run(run, checkpoint, device="cpu")
    if loaded.spec.mil is None or not loaded.spec.mil.precomputed:
        raise HistoliteError(f"{run}: not an attention-MIL run on slide features")
    for path in features:
        bag = load_bag(path)
        (prediction,) = predict_feature_bags(
            loaded, [Sample(path, 0, "", path.stem)], progress=False
        )
        result = write_bag_prediction(
            BatchOutputs(out).slide(path),
            path,
            bag,
            loaded.spec.classes,
            prediction.probs,
            prediction.attention,
        )
        typer.echo(json.dumps({k: result[k] for k in ("features", "class", "probabilities")}))


@slide_app.command("tiles")
def slide_tiles(
    slides: list[Path] = typer.Argument(..., help="Annotated slides, or folders of them."),
    annotations: Path = typer.Option(
        ...,
        "--annotations",
        help="QuPath GeoJSON / ASAP XML: one file (one slide), or a folder of "
        "<slide-stem>.geojson|.json|.xml files.",
    ),
    tile_um: float = typer.Option(..., "--tile-um", min=1.0, help="Tile side in microns."),
    out: Path = typer.Option(..., "--out", help="Dataset folder: OUT/<class>/<tile>.png."),
    tile_px: int | None = typer.Option(
        None,
        "--tile-px",
        min=16,
        help="Saved tile side in pixels (default: --tile-um at 0.5 um/px).",
    ),
    min_coverage: float = typer.Option(
        0.9, "--min-coverage", help="Keep a tile when this fraction lies in one class's region."
    ),
    min_tissue: float = typer.Option(
        0.0,
        "--min-tissue",
        help="Least tissue fraction (by the tissue mask) of an annotated tile; 0: the "
        "annotation decides (the mask drops pale fat).",
    ),
    background_min_tissue: float = typer.Option(
        0.5, "--background-min-tissue", help="Least tissue fraction of a --background tile."
    ),
    classes: str | None = typer.Option(
        None,
        "--classes",
        help="Keep and rename classes: 'Tumor=tumour,Stroma=stroma,Necrosis' (default: all, "
        "as named). Classes left out still count as annotated (never background).",
    ),
    max_per_class: int | None = typer.Option(
        None,
        "--max-per-class-per-slide",
        min=1,
        help="Keep at most this many tiles per class per slide.",
    ),
    background: str | None = typer.Option(
        None, "--background", help="Class for tissue tiles outside every annotation."
    ),
    holes: str | None = typer.Option(
        None,
        "--holes",
        help="Classes whose regions are cut out of all others (CAMELYON16 XML: '_2').",
    ),
    mpp: float | None = typer.Option(
        None, "--mpp", help="Microns per pixel, for slides whose files do not record it."
    ),
    annotation_origin: str = typer.Option(
        "bounds",
        "--annotation-origin",
        help="Where GeoJSON coordinates start on slides with OpenSlide bounds (MIRAX): "
        "'bounds' (QuPath) or 'level0' (tools that read the full level 0). ASAP XML is level 0.",
    ),
    shard: str = typer.Option("0/1", "--shard", help="I/N: cut the I-th of N shares."),
    seed: int = typer.Option(0, help="Seed of the per-slide cap's draw."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Cut training tiles from annotated slides: OUT/<class>/<slide>_x<X>_y<Y>.png, tiles.csv.

    Train on OUT with `histolite train` (data.dataset: slide_tiles, or any recipe with
    data.root=OUT): tiles of one slide never cross splits.
    """
    from histolite.slide.dataset import (
        TileCutSettings,
        cut_tiles,
        default_tile_px,
        parse_class_mapping,
        tile_counts_text,
    )
    from histolite.slide.reader import expand_slide_paths
    from histolite.slide.tiles import parse_shard

    settings = TileCutSettings(
        tile_um=tile_um,
        tile_px=tile_px or default_tile_px(tile_um),
        min_coverage=min_coverage,
        min_tissue=min_tissue,
        background_min_tissue=background_min_tissue,
        classes=parse_class_mapping(classes) if classes else None,
        max_per_class_per_slide=max_per_class,
        background=background,
        holes=tuple(h.strip() for h in holes.split(",") if h.strip()) if holes else (),
        mpp=mpp,
        seed=seed,
        annotation_origin=annotation_origin,
        shard=parse_shard(shard),
    )

    def report(cut: Any, resumed: bool) -> None:
        dropped = ", ".join(f"{n} {why}" for why, n in sorted(cut.dropped.items()) if n)
        typer.echo(
            f"{cut.slide}: {len(cut.rows)} tiles{' (done earlier)' if resumed else ''}"
            + (f"; dropped {dropped}" if dropped else "")
        )

    summary = cut_tiles(
        expand_slide_paths(slides), annotations, out, settings, progress=progress, report=report
    )
    typer.echo(
        f"{summary['tiles']} tiles of {tile_um:g} um at {settings.tile_px} px "
        f"({settings.tile_mpp:.4g} um/px) in {out}: {tile_counts_text(summary)}"
    )
    if summary["note"]:
        typer.secho(summary["note"], fg="yellow", err=True)


@slide_app.command("evaluate")
def slide_evaluate(
    folders: list[Path] = typer.Argument(..., help="OUT/<stem> folders of `slide infer`."),
    annotations: Path = typer.Option(
        ..., "--annotations", help="The slides' annotation file, or a folder of them."
    ),
    out: Path = typer.Option(..., "--out", help="Report folder."),
    min_coverage: float = typer.Option(
        0.9, "--min-coverage", help="A tile's truth: the class covering this fraction of it."
    ),
    classes: str | None = typer.Option(
        None, "--classes", help="Annotation class to model class: 'Tumor=01_TUMOR,...'."
    ),
    holes: str | None = typer.Option(
        None, "--holes", help="Classes cut out of all others (CAMELYON16 XML: '_2')."
    ),
    annotation_origin: str = typer.Option(
        "bounds",
        "--annotation-origin",
        help="Where GeoJSON coordinates start on slides with OpenSlide bounds (MIRAX): "
        "'bounds' (QuPath) or 'level0' (tools that read the full level 0). ASAP XML is level 0.",
    ),
) -> None:
    """Score slide predictions against annotations: tile accuracy, per-class F1, Dice."""
    from histolite.slide.dataset import parse_class_mapping
    from histolite.slide.evaluate import evaluate_slides

    report = evaluate_slides(
        folders,
        annotations,
        out,
        min_coverage=min_coverage,
        mapping=dict(parse_class_mapping(classes)) if classes else None,
        holes=tuple(h.strip() for h in holes.split(",") if h.strip()) if holes else (),
        annotation_origin=annotation_origin,
    )
    interval = report["accuracy_ci95"]
    slides = len(report["slides"])
    spread = (
        f" [{interval['low']:.4f}, {interval['high']:.4f} over slides]"
        if slides > 1
        else " (one slide: no interval over slides)"
    )
    typer.echo(
        f"{report['n']} tiles in {slides} slide(s): accuracy {report['accuracy']:.4f}{spread}, "
        f"balanced {report['balanced_accuracy']:.4f}, macro F1 {report['macro_f1']:.4f}"
    )
    typer.echo(
        "Dice: " + ", ".join(f"{c} {v:.3f}" for c, v in report["dice"].items() if v is not None)
    )
    typer.echo(f"report: {out / 'report.json'}")
