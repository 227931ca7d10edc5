"""Classify every tissue tile of a whole-slide image with an exported model (no torch needed).

Per slide: one overview read, a tissue mask at about 8 um/px, a grid of tiles of the model's
physical size (the training images' side x their microns per pixel, from the model card), each
tile read from the pyramid level closest above the training resolution, batched through the
model's own preprocessing (stain normalisation before the resize, as in training), streamed to
``tiles.csv``: memory stays flat in slide size. Then the GeoJSON, heatmap and summary are
written from the rows; the folder layout is :class:`~histolite.slide.layout.SlideOutputs`.

``shard=(I, N)`` classifies only the tiles whose grid index is I modulo N, into
``OUT/<stem>/shards/I-of-N/``; :mod:`histolite.slide.merge` joins the shards into the same
outputs an unsharded run writes. A slide's ``summary.json`` is written last and records the
SHA-256 of its ``tiles.csv`` and ``tissue_mask.png`` (``outputs_sha256``): a merge takes a
shard's files only if they are the ones its summary describes.

Uncertain tiles (``uncertain_tiles``, ``uncertainty.png``) are those whose own confidence is
under the model card's abstention threshold. ``histolite calibrate`` fits that threshold per
validation *image* (for a run trained on patches, on the mean of each image's patch
probabilities, as the service answers an image). That is the slide tile's unit when the model
answers one tile per image (tile runs, and patch runs whose images are single patches); for
patch runs on larger images a patch is a noisier answer than its image's mean, so the tiles
answered need not reach the accuracy the threshold was chosen for. ``summary.json`` names both
units (``abstention_unit``).
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from histolite.errors import DataError, HistoliteError
from histolite.fileio import atomic_path, file_sha256, read_json, write_json
from histolite.runtime.card import card_identity
from histolite.runtime.classifier import OnnxClassifier
from histolite.slide.layout import HASHED_OUTPUTS, BatchOutputs, SlideOutputs, outputs_match
from histolite.slide.outputs import (
    TileRow,
    render_heatmap,
    render_uncertainty,
    tile_header,
    tile_line,
    write_geojson,
    write_mask,
)
from histolite.slide.reader import Slide, SlideInfo, open_slide, read_region, require_distinct_stems
from histolite.slide.tiles import Tile, TissueTiles, mm2, plan_tissue_tiles

PROBABILITY_DECIMALS = 6  # as tiles.csv writes them: merged shards read back the same values
# what a caller may rename in a summary (the service names slides and models as its clients do)
RENAMEABLE = frozenset({"slide", "model", "model_version"})


@dataclass(frozen=True)
class SlideSettings:
    """How slides are tiled; ``None`` fields come from the model card."""

    tile_um: float | None = None
    overlap: float = 0.0
    min_tissue: float = 0.5
    batch_size: int = 32
    mpp: float | None = None  # override for slides whose files lack it
    shard: tuple[int, int] = (0, 1)


def require_tile_classifier(model: OnnxClassifier) -> None:
    """Refuse a bag (MIL) model for tile-by-tile slide inference, before any work.

    A bag model gives one prediction for a whole image from its patches, not one per tile, so
    it cannot label a slide's tiles; slide-level MIL goes through cached slide features.
    Public so that anything submitting slide jobs (the service) can check at submission.
    """
    if model.card.get("kind") == "mil":
        raise HistoliteError(
            f"{model.model_dir}: a bag (MIL) model classifies whole images from their patches, "
            "not slide tiles one by one; for slide-level MIL use `histolite slide features` "
            "then `histolite slide predict`, or give `slide infer` a tile classifier"
        )


def model_geometry(model: OnnxClassifier, tile_um: float | None) -> tuple[float, int]:
    """(tile side in microns, tile side in pixels at the training resolution) for a model."""
    card = model.card
    train_mpp = card.get("mpp")
    read_px = int(card.get("patch_size") or card["input_size"])
    if tile_um is None:
        if not train_mpp:
            raise HistoliteError(
                f"{model.model_dir}: the model card records no training microns per pixel, so "
                "the tile size is unknown; pass --tile-um (the physical side of a training "
                "image, e.g. 74.25 for 150 px Kather tiles at 0.495 um/px), or re-export the "
                "run after setting data.mpp"
            )
        tile_um = float(card.get("tile_um") or read_px * float(train_mpp))
    elif train_mpp:
        read_px = max(1, round(tile_um / float(train_mpp)))
    return tile_um, read_px


def model_identity(model: OnnxClassifier) -> dict[str, Any]:
    """Name, version and graph hashes of a loaded model (see ``runtime.card.card_identity``)."""
    return card_identity(model.card)


def _batches(tiles: Sequence[Tile], size: int) -> Iterator[Sequence[Tile]]:
    for start in range(0, len(tiles), size):
        yield tiles[start : start + size]


def _classify_tiles(
    slide: Slide,
    model: OnnxClassifier,
    tiles: Sequence[Tile],
    read_px: int,
    outputs: SlideOutputs,
    batch_size: int,
    on_batch: Callable[[int], None],
) -> list[TileRow]:
    """Tiles through the served path (read, stain, resize, model), streamed to ``tiles.csv``."""
    classes = list(model.classes)
    rows: list[TileRow] = []
    with atomic_path(outputs.tiles_csv) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(tile_header(classes))
        for chunk in _batches(tiles, batch_size):
            crops = [read_region(slide, tile.x, tile.y, tile.size, read_px) for tile in chunk]
            probabilities = model.predict_batch(model.to_batch(crops))
            for tile, p in zip(chunk, probabilities, strict=True):
                # rounded as in tiles.csv, so labels, GeoJSON and heatmap of an unsharded
                # run equal those merged from shards' CSVs
                rounded = tuple(round(float(v), PROBABILITY_DECIMALS) for v in p)
                row = TileRow(tile.index, tile.x, tile.y, tile.size, tile.tissue, rounded)
                writer.writerow(tile_line(row, classes))
                rows.append(row)
            on_batch(len(chunk))
    return rows


def classify_slide(
    path: Path,
    model: OnnxClassifier,
    out: Path,
    settings: SlideSettings,
    *,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    rename: Mapping[str, str] | None = None,
    check: Callable[[], None] | None = None,
    max_tiles: int | None = None,
) -> dict[str, Any]:
    """Classify one slide's tissue tiles into ``OUT/<stem>/``; returns its summary.

    ``on_progress(done, total)`` is called after every batch of tiles (job status pages), and
    first with ``(0, total)`` once the tissue tiles are known: it may raise to refuse the
    slide. ``max_tiles`` refuses a slide (shard) with more tissue tiles than that earlier,
    while the grid is walked (:class:`~histolite.slide.tiles.TileBudgetExceeded`), so a file
    declaring an enormous grid costs no more memory than the budget: a caller with a tile
    budget (a service's slide jobs) passes it here. ``check()`` is called throughout the
    overview read, the grid walk and before every batch: it may raise to stop the work (a
    job's time budget). ``rename`` replaces the summary's ``slide``, ``model`` and
    ``model_version`` with the names the caller's users know (the service's relative slide
    path and repository names).
    """
    require_tile_classifier(model)
    unknown = set(rename or {}) - RENAMEABLE
    if unknown:
        raise ValueError(f"rename: only {sorted(RENAMEABLE)} can be renamed, not {unknown}")
    started = time.perf_counter()
    tile_um, read_px = model_geometry(model, settings.tile_um)
    outputs = BatchOutputs(out).slide(path, settings.shard)
    slide = open_slide(path, settings.mpp)
    try:
        plan = plan_tissue_tiles(
            slide,
            tile_um,
            overlap=settings.overlap,
            min_tissue=settings.min_tissue,
            shard=settings.shard,
            check=check,
            max_tiles=max_tiles,
        )
        if on_progress is not None:
            on_progress(0, len(plan.tiles))
        outputs.root.mkdir(parents=True, exist_ok=True)
        # a crash below must not leave an earlier run's summary beside this run's files
        outputs.summary.unlink(missing_ok=True)
        write_mask(outputs.mask, plan.mask)
        masked = time.perf_counter()
        rows = _classify_with_progress(
            slide, model, plan, read_px, outputs, settings.batch_size, progress, on_progress, check
        )
        classified = time.perf_counter()
        info = slide.info
    finally:
        slide.close()
    summary = {
        **_summary(path, model, info, settings, tile_um, read_px, plan, rows),
        **(rename or {}),
        # what this run's tiles.csv and mask are: a merge refuses a shard whose files are not these
        "outputs_sha256": {name: file_sha256(outputs.hashed(name)) for name in HASHED_OUTPUTS},
        "timings_s": {
            "tissue_mask": round(masked - started, 3),
            "classification": round(classified - masked, 3),
            "tiles_per_s": round(len(rows) / max(classified - masked, 1e-9), 2),
        },
    }
    overview = (plan.overview, plan.overview_scale)
    write_slide_outputs(outputs, path.name, rows, summary, overview, partial=settings.shard[1] > 1)
    summary["timings_s"]["total"] = round(time.perf_counter() - started, 3)
    summary["timings_s"]["tiles_per_s_overall"] = round(
        len(rows) / max(summary["timings_s"]["total"], 1e-9), 2
    )
    write_json(outputs.summary, summary)
    return summary


def _classify_with_progress(
    slide: Slide,
    model: OnnxClassifier,
    plan: TissueTiles,
    read_px: int,
    outputs: SlideOutputs,
    batch_size: int,
    progress: bool,
    on_progress: Callable[[int, int], None] | None,
    check: Callable[[], None] | None,
) -> list[TileRow]:
    """The plan's tiles classified with a progress bar; the caller's hooks after every batch."""
    total = len(plan.tiles)
    with tqdm(total=total, desc=slide.info.path.name, unit="tile", disable=not progress) as bar:

        def advance(count: int) -> None:
            bar.update(count)
            if on_progress is not None:
                on_progress(bar.n, total)
            if check is not None:
                check()

        return _classify_tiles(slide, model, plan.tiles, read_px, outputs, batch_size, advance)


def _summary(
    path: Path,
    model: OnnxClassifier,
    info: SlideInfo,
    settings: SlideSettings,
    tile_um: float,
    read_px: int,
    plan: TissueTiles,
    rows: Sequence[TileRow],
) -> dict[str, Any]:
    classes = list(model.classes)
    tissue_mm2 = mm2(float(plan.mask.sum()) * plan.mask_scale**2, info.mpp)
    return {
        "slide": str(path.resolve()),  # merge and evaluate may run from another folder
        "reader": info.reader,
        "width": info.width,
        "height": info.height,
        "mpp": info.mpp,
        "mpp_source": info.mpp_source,
        "origin": list(info.origin),  # where QuPath's coordinates start (OpenSlide bounds)
        **model_identity(model),
        "device": model.device,  # cpu or cuda: timings mean little without it
        "classes": classes,
        "tile_um": tile_um,
        "tile_px_level0": plan.grid.size,
        "tile_px_model": read_px,
        "overlap": settings.overlap,
        "min_tissue": settings.min_tissue,
        "shard": {"index": settings.shard[0], "count": settings.shard[1]},
        "grid_tiles": plan.grid.count,
        "tiles": len(rows),
        "tissue_area_mm2": round(tissue_mm2, 4),
        **class_counts(rows, classes, model.policy.abstain_below),
        "abstention_unit": abstention_unit(model),
    }


def abstention_unit(model: OnnxClassifier) -> dict[str, str] | None:
    """What the card's abstention threshold was fitted per (``histolite calibrate``: one
    validation image) and what slide inference compares it with (each tile's own confidence);
    None when the card has no threshold."""
    if model.policy.abstain_below is None:
        return None
    fitted = (model.card.get("abstention") or {}).get("unit")
    return {
        "fitted_per": str(fitted or "image (the card predates recording the unit)"),
        "applied_per": "tile (each tile's own confidence)",
    }


def class_counts(
    rows: Sequence[TileRow], classes: Sequence[str], abstain_below: float | None = None
) -> dict[str, Any]:
    """The summary's counts: tiles per predicted class, their fractions, a note if none, and
    the tiles whose own confidence is under the model card's abstention threshold (None when
    it has none; the threshold was fitted per image, see :func:`abstention_unit`)."""
    labels = [r.label(classes) for r in rows]
    counts = {c: labels.count(c) for c in classes}
    return {
        "class_counts": counts,
        "class_fractions": {c: (n / len(rows) if rows else 0.0) for c, n in counts.items()},
        "abstain_below": abstain_below,
        "uncertain_tiles": (
            None if abstain_below is None else sum(r.confidence < abstain_below for r in rows)
        ),
        "note": None if rows else "no tissue found: the slide looks blank at this tile size",
    }


def write_slide_outputs(
    outputs: SlideOutputs,
    slide_name: str,
    rows: Sequence[TileRow],
    summary: dict[str, Any],
    overview: tuple[np.ndarray, float],
    *,
    partial: bool,
) -> None:
    """GeoJSON, and for a whole slide (not one shard of it) the heatmap; summary.json is the
    caller's, written last."""
    classes = summary["classes"]
    write_geojson(outputs.geojson, rows, classes, summary.get("origin") or (0, 0))
    if partial:
        return
    counts = ", ".join(f"{c} {n}" for c, n in summary["class_counts"].items() if n)
    render_heatmap(
        *overview,
        rows,
        classes,
        outputs.heatmap,
        title=f"{slide_name}: {len(rows)} tiles of {summary['tile_um']:.1f} um ({counts})",
    )
    uncertain = summary.get("uncertain_tiles")
    render_uncertainty(
        *overview,
        rows,
        classes,
        outputs.uncertainty,
        abstain_below=summary.get("abstain_below"),
        title=f"{slide_name}: {len(rows)} tiles"
        + (f", {uncertain} uncertain" if uncertain is not None else ""),
    )


def classify_slides(
    paths: Sequence[Path],
    model: OnnxClassifier,
    out: Path,
    settings: SlideSettings,
    *,
    progress: bool = True,
    report: Callable[[Path, dict[str, Any] | None, str | None], None] | None = None,
) -> dict[str, Any]:
    """Classify several slides; one bad slide is reported and the others go on.

    Slides sharing a file stem are refused before any work: they would share ``OUT/<stem>/``.
    A shard (``settings.shard`` of N > 1) skips slides its earlier runs completed with the same
    model and settings, so a retried pod redoes only what failed, and ends by writing its
    completion marker (``BatchOutputs.shard_marker``), which ``merge_batch`` waits for.
    """
    require_tile_classifier(model)
    require_distinct_stems(list(paths))
    done: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for path in paths:
        summary = _completed_shard(path, model, out, settings)
        resumed = summary is not None
        try:
            if summary is None:
                summary = classify_slide(path, model, out, settings, progress=progress)
        except (DataError, HistoliteError, OSError) as exc:
            failed.append({"slide": str(path), "error": str(exc)})
            if report is not None:
                report(path, None, str(exc))
            continue
        done.append({"slide": str(path), "tiles": summary["tiles"], "resumed": resumed})
        if report is not None:
            report(path, summary, None)
    batch = {"classified": done, "failed": failed}
    layout = BatchOutputs(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(layout.batch_summary(settings.shard), batch)
    if settings.shard[1] > 1:
        index, count = settings.shard
        # the model too: merge refuses a set of markers from two models (a stale one)
        marker = {"shard": [index, count], **model_identity(model), **batch}
        write_json(layout.shard_marker(count, index), marker)
    return batch


def _completed_shard(
    path: Path, model: OnnxClassifier, out: Path, settings: SlideSettings
) -> dict[str, Any] | None:
    """The summary of this slide's shard if an earlier run finished it the same way, else None.

    ``summary.json`` is written last, so its final form (with the total time) means the shard's
    outputs are complete; the model and every setting that changes the tiles must match.
    """
    if settings.shard[1] == 1:
        return None  # an unsharded run always redoes (and overwrites) its slide
    outputs = BatchOutputs(out).slide(path, settings.shard)
    try:
        summary: dict[str, Any] = read_json(outputs.summary)
        tile_um, read_px = model_geometry(model, settings.tile_um)
    except HistoliteError:
        return None
    given_mpp = summary.get("mpp_source") == "given (--mpp)"
    same = (
        "total" in summary.get("timings_s", {})
        and outputs_match(outputs, summary)
        and summary.get("slide") == str(path.resolve())
        # the graphs' hashes too: a retrained model re-exported under the same name and version
        and all(summary.get(k) == v for k, v in model_identity(model).items())
        and summary.get("classes") == list(model.classes)
        and summary.get("tile_um") == tile_um
        and summary.get("tile_px_model") == read_px
        and summary.get("overlap") == settings.overlap
        and summary.get("min_tissue") == settings.min_tissue
        and summary.get("shard") == {"index": settings.shard[0], "count": settings.shard[1]}
        and (summary.get("mpp") == settings.mpp if given_mpp else settings.mpp is None)
    )
    return summary if same else None
