"""Score ``slide infer`` outputs against the slides' annotations.

Two views of one question. **Tiles**: a classified tile has a true class when at least
``min_coverage`` of it lies in one class's region (the rule ``slide tiles`` uses to cut training
tiles); accuracy, balanced accuracy, per-class P/R/F1 and the confusion matrix are over those
tiles. **Areas**: per class, the Dice of predicted against annotated area. Each tile owns the
central ``stride x stride`` cell of its box (its whole box without overlap), so areas never
count twice; Dice is measured where the truth is known and the model answered, i.e. inside the
annotations and inside the classified tiles::

    Dice_c = 2 |P_c ∩ A_c| / (|P_c ∩ A| + |A_c ∩ T|)

with P_c the cells predicted c, A_c the region of c, A all regions, T all cells. Several slides
make one report: a row per slide and a total (tiles pooled, Dice from pooled areas), with a 95%
interval for accuracy that resamples whole slides.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from histolite.errors import DataError
from histolite.fileio import atomic_path, file_sha256, read_json, write_json
from histolite.slide.annotations import (
    Reason,
    SlideAnnotations,
    annotation_file_for,
    geojson_offset,
    label_by_coverage,
    read_annotations,
)
from histolite.slide.layout import SlideOutputs
from histolite.slide.outputs import TileRow, read_tiles_csv
from histolite.slide.tiles import mm2


@dataclass(frozen=True)
class SlideScore:
    """One slide's evaluated tiles and area sums (cells of one tile's owned area each)."""

    stem: str
    truth: np.ndarray  # (n,) class index of each tile with a true class
    predicted: np.ndarray  # (n,) the model's class of those tiles
    rows: list[tuple[TileRow, str, str, float]]  # tile, truth, predicted, coverage
    excluded: dict[str, int]  # tiles without a true class, by reason
    dice_parts: np.ndarray  # (C, 3): |P_c ∩ A_c|, |P_c ∩ A|, |A_c ∩ T|, in level-0 pixels
    annotated_mm2: dict[str, float]
    mpp: float


def _model_regions(
    annotations: SlideAnnotations, classes: Sequence[str], mapping: Mapping[str, str] | None
) -> SlideAnnotations:
    """Regions renamed to the model's classes; an annotation class the model lacks is an error."""
    names = {name: (mapping or {}).get(name, name) for name in annotations.classes}
    unknown = sorted(old for old, new in names.items() if new not in classes)
    if unknown:
        raise DataError(
            f"{annotations.source}: annotation class(es) {unknown} are not classes of the model "
            f"{list(classes)}; map them with --classes 'Annotation name=model_class'"
        )
    return annotations.select(names)


def owned_cells(rows: Sequence[TileRow], stride: int) -> np.ndarray:
    """(N, 4) x, y, w, h of the central ``stride``-wide cell each tile owns."""
    if not rows:
        return np.zeros((0, 4))
    boxes = np.array([(r.x, r.y, r.size) for r in rows], dtype=np.float64)
    side = np.minimum(boxes[:, 2], stride)
    inset = (boxes[:, 2] - side) / 2
    return np.stack([boxes[:, 0] + inset, boxes[:, 1] + inset, side, side], axis=1)


def score_slide(
    slide_dir: Path,
    annotations: Path,
    *,
    min_coverage: float = 0.9,
    mapping: Mapping[str, str] | None = None,
    holes: Sequence[str] = (),
    annotation_origin: str = "bounds",
) -> SlideScore:
    """Score one ``OUT/<stem>`` folder of ``slide infer`` against its annotation file."""
    outputs = SlideOutputs(slide_dir, slide_dir.name)
    summary = read_json(outputs.summary)
    if "total" not in summary.get("timings_s", {}):
        raise DataError(f"{outputs.summary}: not final (the slide is still being classified?)")
    if summary.get("shard", {}).get("count", 1) != 1 and summary["shard"].get("index") is not None:
        raise DataError(f"{slide_dir}: one shard of a slide; merge the shards first")
    recorded = (summary.get("outputs_sha256") or {}).get("tiles.csv")
    if recorded is not None and file_sha256(outputs.tiles_csv) != recorded:
        raise DataError(
            f"{outputs.tiles_csv}: not the file {outputs.summary.name} records (changed, or "
            "re-written by a run that did not finish); classify the slide again"
        )
    classes: list[str] = list(summary["classes"])
    slide = Path(summary["slide"])
    origin = summary.get("origin") or (0, 0)
    regions = read_annotations(
        annotation_file_for(annotations, slide),
        offset=geojson_offset(annotation_origin, (int(origin[0]), int(origin[1]))),
        holes=holes,
    ).check_inside(int(summary["width"]), int(summary["height"]))
    regions = _model_regions(regions, classes, mapping)
    rows = read_tiles_csv(outputs.tiles_csv, classes)
    column = [classes.index(c) for c in regions.classes]
    boxes = np.array([(r.x, r.y, r.size, r.size) for r in rows], dtype=np.float64).reshape(-1, 4)
    coverage = np.zeros((len(rows), len(classes)))
    coverage[:, column] = regions.coverage(boxes)
    labels, reasons = label_by_coverage(coverage, min_coverage)
    predicted = np.array([int(np.argmax(r.probabilities)) for r in rows], dtype=np.int64)
    kept = reasons == Reason.KEPT
    excluded = {
        str(reason): int(n)
        for reason, n in zip(*np.unique(reasons[~kept], return_counts=True), strict=True)
    }
    stride = max(1, round(int(summary.get("tile_px_level0") or 1) * (1 - summary["overlap"])))
    dice_parts = _dice_parts(regions, classes, column, rows, predicted, stride)
    evaluated = [
        (row, classes[int(t)], classes[int(p)], float(coverage[i, t]))
        for i, (row, t, p) in enumerate(zip(rows, labels, predicted, strict=True))
        if kept[i]
    ]
    mpp = float(summary["mpp"])
    return SlideScore(
        stem=slide.stem,
        truth=labels[kept],
        predicted=predicted[kept],
        rows=evaluated,
        excluded=excluded,
        dice_parts=dice_parts,
        annotated_mm2={c: round(mm2(r.area, mpp), 4) for c, r in regions.regions.items()},
        mpp=mpp,
    )


def _dice_parts(
    regions: SlideAnnotations,
    classes: Sequence[str],
    column: Sequence[int],
    rows: Sequence[TileRow],
    predicted: np.ndarray,
    stride: int,
) -> np.ndarray:
    """Per class: |P_c ∩ A_c|, |P_c ∩ A|, |A_c ∩ T| in level-0 pixels (see the module doc)."""
    parts = np.zeros((len(classes), 3))
    cells = owned_cells(rows, stride)
    if not len(cells):
        return parts
    area = cells[:, 2] * cells[:, 3]
    in_class = np.zeros((len(cells), len(classes)))
    in_class[:, column] = regions.coverage(cells) * area[:, None]
    rects = shapely.box(
        cells[:, 0], cells[:, 1], cells[:, 0] + cells[:, 2], cells[:, 1] + cells[:, 3]
    )
    union = regions.union()
    shapely.prepare(union)
    in_any = shapely.area(shapely.intersection(rects, union))
    for c in range(len(classes)):
        mine = predicted == c
        parts[c] = (in_class[mine, c].sum(), in_any[mine].sum(), in_class[:, c].sum())
    return parts


def dice(parts: np.ndarray) -> np.ndarray:
    """Dice per class from :func:`_dice_parts` sums; NaN where a class is neither predicted nor
    annotated inside the evaluated area."""
    denominator = parts[:, 1] + parts[:, 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * parts[:, 0] / denominator, np.nan)


def _dice_dict(parts: np.ndarray, classes: Sequence[str]) -> dict[str, float | None]:
    return {
        c: (None if np.isnan(v) else round(float(v), 4))
        for c, v in zip(classes, dice(parts), strict=True)
    }


def evaluate_slides(
    slide_dirs: Sequence[Path],
    annotations: Path,
    out: Path,
    *,
    min_coverage: float = 0.9,
    mapping: Mapping[str, str] | None = None,
    holes: Sequence[str] = (),
    annotation_origin: str = "bounds",
) -> dict[str, Any]:
    """Score every slide folder, then write ``OUT/report.json``, ``classification_report.csv``,
    ``predictions.csv`` (one row per evaluated tile), ``slides.csv`` and
    ``confusion_matrix.png``. All slides are scored before anything is written."""
    from histolite.evaluate.metrics import (
        classification_metrics,
        group_bootstrap_accuracy,
        write_class_report_csv,
    )
    from histolite.evaluate.plots import plot_confusion_matrix

    if not slide_dirs:
        raise DataError("no slide folders given (the OUT/<stem> folders of `slide infer`)")
    classes = _shared_classes(slide_dirs)
    geojson_offset(annotation_origin, (0, 0))  # an unknown choice is refused before any work
    scores = [
        score_slide(
            d,
            annotations,
            min_coverage=min_coverage,
            mapping=mapping,
            holes=holes,
            annotation_origin=annotation_origin,
        )
        for d in slide_dirs
    ]
    truth = np.concatenate([s.truth for s in scores])
    predicted = np.concatenate([s.predicted for s in scores])
    if not len(truth):
        raise DataError(
            "no classified tile lies inside an annotation (at --min-coverage "
            f"{min_coverage}); are these the right annotations?"
        )
    report: dict[str, Any] = {
        "level": "tile",
        "min_coverage": min_coverage,
        **classification_metrics(truth, predicted, classes),
    }
    groups = [s.stem for s in scores for _ in s.truth]
    interval = group_bootstrap_accuracy(truth == predicted, groups)
    interval["unit"] = "slides"
    if interval["groups"] < 10:
        interval["warning"] = f"only {interval['groups']} slides: the interval is unreliable"
    report["accuracy_ci95"] = interval
    total = sum((s.dice_parts for s in scores), np.zeros((len(classes), 3)))
    report["dice"] = _dice_dict(total, classes)
    report["slides"] = [_slide_row(s, classes) for s in scores]
    report["excluded_tiles"] = _sum_counts(s.excluded for s in scores)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    write_class_report_csv(out / "classification_report.csv", report)
    _write_predictions(out / "predictions.csv", scores)
    _write_slide_rows(out / "slides.csv", report["slides"], classes)
    plot_confusion_matrix(
        report["confusion_matrix"],
        classes,
        out / "confusion_matrix.png",
        title=f"{len(scores)} slide(s): tiles inside annotations (coverage >= {min_coverage})",
    )
    return report


def _shared_classes(slide_dirs: Sequence[Path]) -> list[str]:
    found = {tuple(read_json(SlideOutputs(d, d.name).summary)["classes"]) for d in slide_dirs}
    if len(found) != 1:
        raise DataError(
            f"the slide folders were classified by models of different classes: {found}"
        )
    return list(found.pop())


def _slide_row(score: SlideScore, classes: Sequence[str]) -> dict[str, Any]:
    n = len(score.truth)
    present = sorted(set(score.truth.tolist()))
    recalls = [float(np.mean(score.predicted[score.truth == c] == c)) for c in present]
    return {
        "slide": score.stem,
        "tiles": n,
        "accuracy": float(np.mean(score.truth == score.predicted)) if n else None,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "dice": _dice_dict(score.dice_parts, classes),
        "annotated_mm2": score.annotated_mm2,
        "excluded_tiles": score.excluded,
    }


def _sum_counts(counts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for entry in counts:
        for key, n in entry.items():
            total[key] = total.get(key, 0) + n
    return dict(sorted(total.items()))


def _write_predictions(path: Path, scores: Sequence[SlideScore]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide", "index", "x", "y", "size", "true", "predicted", "coverage"])
        for score in scores:
            for row, truth, predicted, coverage in score.rows:
                writer.writerow(
                    [
                        score.stem,
                        row.index,
                        row.x,
                        row.y,
                        row.size,
                        truth,
                        predicted,
                        f"{coverage:.4f}",
                    ]
                )


def _write_slide_rows(path: Path, rows: Sequence[dict[str, Any]], classes: Sequence[str]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["slide", "tiles", "accuracy", "balanced_accuracy", *(f"dice_{c}" for c in classes)]
        )
        for row in rows:
            writer.writerow(
                [
                    row["slide"],
                    row["tiles"],
                    "" if row["accuracy"] is None else f"{row['accuracy']:.4f}",
                    "" if row["balanced_accuracy"] is None else f"{row['balanced_accuracy']:.4f}",
                    *("" if row["dice"][c] is None else f"{row['dice'][c]:.4f}" for c in classes),
                ]
            )
