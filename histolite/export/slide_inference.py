"""Classify every tissue tile of a whole-slide image with an exported model (no torch needed).

Per slide: a low-resolution tissue mask, a grid of tiles of the model's physical size (the
training images' side x their microns per pixel, from the model card), each tile read from the
pyramid level closest above the training resolution, batched through the model's own
preprocessing (stain normalisation before the resize, as in training), streamed to ``tiles.csv``:
memory stays flat in slide size. Then the GeoJSON, heatmap and summary are written from the rows.

``shard=(I, N)`` classifies only the tiles whose grid index is I modulo N, into
``OUT/<stem>/shards/I-of-N/``; :func:`merge_shards` joins the shards into the same outputs an
unsharded run writes. A slide's ``summary.json`` is written after its ``tiles.csv`` and
``tissue_mask.png`` and records their SHA-256 (``outputs_sha256``): a merge takes a shard's files
only if they are the ones its summary describes, so it never joins one run's tiles under
another run's summary (a shard being rerun over an earlier run's folder).
"""

from __future__ import annotations

import csv
import hashlib
import io
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from histolite.errors import DataError, HistoliteError
from histolite.export.runtime import (
    OnnxClassifier,
    file_sha256,
    load_card,
    verify_graphs,
)
from histolite.fileio import atomic_path, read_json, write_json
from histolite.slide.outputs import (
    TileRow,
    parse_tiles_csv,
    render_heatmap,
    tile_header,
    tile_line,
    write_geojson,
    write_mask,
)
from histolite.slide.reader import (
    Slide,
    open_slide,
    read_region,
    require_distinct_stems,
    thumbnail,
)
from histolite.slide.tiles import Tile, mm2, tile_grid, tissue_tiles
from histolite.slide.tissue import tissue_mask

THUMBNAIL_SIDE = 2048
PROBABILITY_DECIMALS = 6  # as tiles.csv writes them: merged shards read back the same values
MODEL_KEYS = ("model", "model_version", "model_sha256", "stain_sha256")  # see model_identity
HASHED_OUTPUTS = ("tiles.csv", "tissue_mask.png")  # summary.json's outputs_sha256


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
    """Name, version and graph hashes of a model, as summaries and shard markers record them.

    Name and version alone are not enough: re-exporting a retrained run to the same folder keeps
    both, and only the graphs' hashes tell its tiles from the old model's.
    """
    return _card_identity(model.card)


def _card_identity(card: dict[str, Any]) -> dict[str, Any]:
    stain_sha256 = (card.get("stain_graph") or {}).get("sha256")
    values = (card.get("name"), card.get("version"), card.get("sha256"), stain_sha256)
    return dict(zip(MODEL_KEYS, values, strict=True))


def exported_model_identity(model_dir: Path) -> dict[str, Any]:
    """:func:`model_identity` of an exported model folder, without loading its graphs.

    The graphs are hashed and compared with the card, as loading the model would, so a folder
    whose files were replaced without their card is refused rather than trusted.
    """
    card = load_card(model_dir)
    verify_graphs(Path(model_dir), card)
    return _card_identity(card)


def _output_dir(out: Path, slide: Path, shard: tuple[int, int]) -> Path:
    base = out / slide.stem
    index, count = shard
    return base if count == 1 else base / "shards" / f"{index}-of-{count}"


def _batches(tiles: Sequence[Tile], size: int) -> Iterator[Sequence[Tile]]:
    for start in range(0, len(tiles), size):
        yield tiles[start : start + size]


def _classify(
    slide: Slide, model: OnnxClassifier, tiles: Sequence[Tile], read_px: int
) -> np.ndarray:
    """Training-size tiles through the served path: stain, resize to the input, model."""
    crops = [read_region(slide, tile.x, tile.y, tile.size, read_px) for tile in tiles]
    return model.predict_batch(model.to_batch(crops))


def classify_slide(
    path: Path,
    model: OnnxClassifier,
    out: Path,
    settings: SlideSettings,
    *,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Classify one slide's tissue tiles into ``OUT/<stem>/``; returns its summary.

    ``on_progress(done, total)`` is called after every batch of tiles (job status pages).
    """
    require_tile_classifier(model)
    started = time.perf_counter()
    classes = list(model.classes)
    slide = open_slide(path, settings.mpp)
    try:
        info = slide.info
        thumb, scale = thumbnail(slide, min(THUMBNAIL_SIDE, max(info.width, info.height)))
        tile_um, read_px = model_geometry(model, settings.tile_um)
        # specks smaller than a quarter tile cannot fill a tile; bigger ones are kept
        mask = tissue_mask(
            thumb,
            info.mpp * scale,
            min_object_um2=min(5000.0, tile_um**2 / 4),
            hole_um2=min(2000.0, tile_um**2 / 8),
        )
        grid = tile_grid(info, tile_um, settings.overlap)
        tiles = tissue_tiles(grid, mask, scale, settings.min_tissue, settings.shard)
        target = _output_dir(out, path, settings.shard)
        target.mkdir(parents=True, exist_ok=True)
        write_mask(target / "tissue_mask.png", mask)
        masked = time.perf_counter()
        rows: list[TileRow] = []
        with (
            atomic_path(target / "tiles.csv") as tmp,
            tmp.open("w", newline="", encoding="utf-8") as fh,
            tqdm(total=len(tiles), desc=path.name, unit="tile", disable=not progress) as bar,
        ):
            writer = csv.writer(fh)
            writer.writerow(tile_header(classes))
            for chunk in _batches(tiles, settings.batch_size):
                probabilities = _classify(slide, model, chunk, read_px)
                for tile, p in zip(chunk, probabilities, strict=True):
                    # rounded as in tiles.csv, so labels, GeoJSON and heatmap of an unsharded
                    # run equal those merged from shards' CSVs
                    rounded = tuple(round(float(v), PROBABILITY_DECIMALS) for v in p)
                    row = TileRow(tile.index, tile.x, tile.y, tile.size, tile.tissue, rounded)
                    writer.writerow(tile_line(row, classes))
                    rows.append(row)
                bar.update(len(chunk))
                if on_progress is not None:
                    on_progress(len(rows), len(tiles))
        classified = time.perf_counter()
    finally:
        slide.close()
    summary = _summary(path, model, info, settings, tile_um, read_px, grid.count, rows, mask, scale)
    # what this run's tiles.csv and mask are: a merge refuses a shard whose files are not these
    summary["outputs_sha256"] = {name: file_sha256(target / name) for name in HASHED_OUTPUTS}
    summary["timings_s"] = {
        "tissue_mask": round(masked - started, 3),
        "classification": round(classified - masked, 3),
        "tiles_per_s": round(len(rows) / max(classified - masked, 1e-9), 2),
    }
    _write_outputs(
        target, path, rows, classes, summary, thumb, scale, partial=settings.shard[1] > 1
    )
    summary["timings_s"]["total"] = round(time.perf_counter() - started, 3)
    write_json(target / "summary.json", summary)
    return summary


def _summary(
    path: Path,
    model: OnnxClassifier,
    info: Any,
    settings: SlideSettings,
    tile_um: float,
    read_px: int,
    grid_tiles: int,
    rows: Sequence[TileRow],
    mask: np.ndarray,
    scale: float,
) -> dict[str, Any]:
    classes = list(model.classes)
    labels = [r.label(classes) for r in rows]
    tissue_mm2 = mm2(float(mask.sum()) * scale * scale, info.mpp)
    counts = {c: labels.count(c) for c in classes}
    return {
        "slide": str(path),
        "reader": info.reader,
        "width": info.width,
        "height": info.height,
        "mpp": info.mpp,
        "mpp_source": info.mpp_source,
        **model_identity(model),
        "device": model.device,  # cpu or cuda: timings mean little without it
        "classes": classes,
        "tile_um": tile_um,
        "tile_px_level0": rows[0].size if rows else round(tile_um / info.mpp),
        "tile_px_model": read_px,
        "overlap": settings.overlap,
        "min_tissue": settings.min_tissue,
        "shard": {"index": settings.shard[0], "count": settings.shard[1]},
        "grid_tiles": grid_tiles,
        "tiles": len(rows),
        "tissue_area_mm2": round(tissue_mm2, 4),
        "class_counts": counts,
        "class_fractions": {c: (n / len(rows) if rows else 0.0) for c, n in counts.items()},
        "note": _note(rows),
    }


def _note(rows: Sequence[TileRow]) -> str | None:
    return None if rows else "no tissue found: the slide looks blank at this tile size"


def _write_outputs(
    target: Path,
    path: Path,
    rows: Sequence[TileRow],
    classes: Sequence[str],
    summary: dict[str, Any],
    thumb: np.ndarray,
    scale: float,
    *,
    partial: bool,
    weights: Sequence[float] | None = None,
) -> None:
    write_geojson(target / f"{path.stem}.geojson", rows, classes)
    if not partial:
        counts = ", ".join(f"{c} {n}" for c, n in summary["class_counts"].items() if n)
        render_heatmap(
            thumb,
            scale,
            rows,
            classes,
            target / "heatmap.png",
            weights=weights,
            title=f"{path.name}: {len(rows)} tiles of {summary['tile_um']:.1f} um ({counts})",
        )
    write_json(target / "summary.json", summary)


def merge_shards(
    slide_dir: Path,
    progress: bool = True,
    count: int | None = None,
    *,
    model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Join ``slide_dir/shards/I-of-N`` into the unsharded outputs; refuses an incomplete set.

    ``count`` picks the ``*-of-N`` folders of that N (others are left over from other runs).
    ``model`` (a :func:`model_identity`): refuse shards whose summary names another model (an
    earlier run's, not yet redone). A shard is taken only if its summary is final and its
    ``tiles.csv`` and mask are the files that summary hashed: never one run's tiles under
    another run's summary.

    The merged ``summary.json`` has the keys an unsharded run writes. Its ``timings_s`` sum the
    shards' (work done, not wall-clock: shards run in parallel); ``tiles_per_s`` is tiles over
    that summed classification time, and ``total`` adds the merge's own time.
    """
    started = time.perf_counter()
    shard_dirs = sorted((slide_dir / "shards").glob(f"*-of-{count or '*'}"))
    if not shard_dirs:
        raise DataError(f"{slide_dir}: no shards/I-of-N folders to merge")
    summaries = [read_json(d / "summary.json") for d in shard_dirs]
    for folder, summary in zip(shard_dirs, summaries, strict=True):
        if "total" not in summary.get("timings_s", {}) or "outputs_sha256" not in summary:
            raise DataError(
                f"{folder}: summary.json is not final (the shard is still being written, or was "
                "written by an older histolite); wait for the shard, or rerun it"
            )
        found = {k: summary.get(k) for k in MODEL_KEYS}
        if model is not None and found != model:
            raise DataError(
                f"{folder}: made by {_describe_model(tuple(found.values()))}, not "
                f"{_describe_model(tuple(model.values()))} (an earlier run's shard?); "
                "rerun the shard with that model"
            )
    counts = {s["shard"]["count"] for s in summaries}
    if len(counts) != 1:
        raise DataError(f"{slide_dir}: shards of different counts {sorted(counts)}")
    (count,) = counts
    have = sorted(s["shard"]["index"] for s in summaries)
    if have != list(range(count)):
        missing = sorted(set(range(count)) - set(have))
        raise DataError(f"{slide_dir}: shards {missing} of {count} are missing; run them first")
    first = summaries[0]
    keys = ("slide", *MODEL_KEYS, "tile_um", "overlap", "min_tissue", "mpp", "classes")
    for summary in summaries[1:]:
        differing = [k for k in keys if summary.get(k) != first.get(k)]
        if differing:
            raise DataError(f"{slide_dir}: shards disagree on {differing}")
    classes = first["classes"]
    # each file read once, checked against its summary's hash, then used from those bytes
    files = [_shard_file(d, s, "tiles.csv") for d, s in zip(shard_dirs, summaries, strict=True)]
    rows = sorted(
        (
            r
            for d, data in zip(shard_dirs, files, strict=True)
            for r in parse_tiles_csv(
                io.StringIO(data.decode("utf-8"), newline=""), classes, str(d / "tiles.csv")
            )
        ),
        key=lambda r: r.index,
    )
    mask = _shard_file(shard_dirs[0], summaries[0], "tissue_mask.png")
    from histolite.slide.outputs import write_tiles_csv

    write_tiles_csv(slide_dir / "tiles.csv", rows, classes)
    slide_path = Path(first["slide"])
    slide = open_slide(slide_path, first["mpp"] if first["mpp_source"] == "given (--mpp)" else None)
    try:
        info = slide.info
        thumb, scale = thumbnail(slide, min(THUMBNAIL_SIDE, max(info.width, info.height)))
    finally:
        slide.close()
    # every shard wrote the same mask of the whole slide
    with atomic_path(slide_dir / "tissue_mask.png") as tmp:
        tmp.write_bytes(mask)
    labels = [r.label(classes) for r in rows]
    timings = {
        key: round(sum(s["timings_s"][key] for s in summaries), 3)
        for key in ("tissue_mask", "classification", "total")
    }
    timings["tiles_per_s"] = round(len(rows) / max(timings["classification"], 1e-9), 2)
    merged = {
        **first,
        "shard": {"index": None, "count": count, "merged_from": [str(d) for d in shard_dirs]},
        "tiles": len(rows),
        "class_counts": {c: labels.count(c) for c in classes},
        "class_fractions": {c: (labels.count(c) / len(rows) if rows else 0.0) for c in classes},
        "note": _note(rows),
        "device": "+".join(sorted({str(s.get("device")) for s in summaries})),
        "outputs_sha256": {name: file_sha256(slide_dir / name) for name in HASHED_OUTPUTS},
        "timings_s": timings,
    }
    _write_outputs(slide_dir, slide_path, rows, classes, merged, thumb, scale, partial=False)
    timings["total"] = round(timings["total"] + time.perf_counter() - started, 3)
    write_json(slide_dir / "summary.json", merged)
    return merged


def _shard_file(folder: Path, summary: dict[str, Any], name: str) -> bytes:
    """The bytes of a shard's output file, refused unless they are those its summary hashed."""
    try:
        data = (folder / name).read_bytes()
    except FileNotFoundError:
        data = b""
    if hashlib.sha256(data).hexdigest() != summary["outputs_sha256"].get(name):
        raise DataError(
            f"{folder / name}: not the file its summary.json describes (another run of the shard "
            "is rewriting the folder, or it was interrupted); wait for the shard, or rerun it"
        )
    return data


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
    completion marker (:func:`shard_marker_path`), which :func:`merge_batch` waits for.
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
    out.mkdir(parents=True, exist_ok=True)
    write_json(batch_summary_path(out, settings.shard), batch)
    if settings.shard[1] > 1:
        index, count = settings.shard
        # the model too: merge refuses a set of markers from two models (a stale one)
        marker = {"shard": [index, count], **model_identity(model), **batch}
        write_json(shard_marker_path(out, count, index), marker)
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
    target = _output_dir(out, path, settings.shard)
    try:
        summary: dict[str, Any] = read_json(target / "summary.json")
        tile_um, read_px = model_geometry(model, settings.tile_um)
    except HistoliteError:
        return None
    given_mpp = summary.get("mpp_source") == "given (--mpp)"
    same = (
        "total" in summary.get("timings_s", {})
        and _outputs_match(target, summary)
        and summary.get("slide") == str(path)
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


def _outputs_match(folder: Path, summary: dict[str, Any]) -> bool:
    hashes = summary.get("outputs_sha256") or {}
    try:
        return all(file_sha256(folder / n) == hashes.get(n) for n in HASHED_OUTPUTS)
    except OSError:
        return False


def shard_marker_path(out: Path, count: int, index: int) -> Path:
    """``OUT/.shards/I-of-N.done``: shard I of N has been through every slide of its batch.

    A slide's folder appears as soon as its mask is made, so folders cannot tell a merge that
    the shards are done; these markers, written at the very end of each shard's run, can.
    """
    return out / ".shards" / f"{index}-of-{count}.done"


def merge_batch(
    out: Path,
    count: int,
    *,
    wait_s: float = 0.0,
    poll_s: float = 10.0,
    progress: bool = True,
    model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge every slide of a batch run as N shards into ``OUT``, once all N have finished.

    Waits up to ``wait_s`` seconds until the N shard markers exist, list no failed slide and
    name one model. A marker listing failures is not final: its pod exits 1 and is retried, and
    a clean retry overwrites it. Nor is one naming another model: an earlier run's, until its
    shard rewrites it. After the wait, missing markers or several models are an error naming
    them; slides that failed in some shard are reported, not merged, and the rest are merged.
    ``OUT/batch_summary.json`` lists both, as an unsharded run's does.

    ``model`` (the :func:`model_identity` the shards must have used): a marker naming any other
    model counts as not yet written, so an earlier run's markers *of one model* are not merged
    either (without it they cannot be told from this run's). Each slide's shard summaries must
    name the markers' model too.
    """
    deadline = time.monotonic() + wait_s
    while True:
        paths = {i: shard_marker_path(out, count, i) for i in range(count)}
        markers = {i: read_json(p) for i, p in paths.items() if p.is_file()}  # written atomically
        stale = {
            i: tuple(marker.get(k) for k in MODEL_KEYS)
            for i, marker in markers.items()
            if model is not None and {k: marker.get(k) for k in MODEL_KEYS} != model
        }
        missing = [i for i in range(count) if i not in markers]
        failing = [i for i, marker in markers.items() if marker["failed"] and i not in stale]
        by_model: dict[tuple[Any, ...], list[int]] = {}
        for i, marker in markers.items():
            by_model.setdefault(tuple(marker.get(k) for k in MODEL_KEYS), []).append(i)
        if not (missing or stale or failing or len(by_model) > 1):
            break
        if time.monotonic() >= deadline:
            break
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
    if missing or stale:
        problems = []
        if missing:
            problems.append(f"no {', '.join(str(paths[i]) for i in missing)}")
        if stale:
            assert model is not None
            problems.append(
                "; ".join(f"{paths[i]} by {_describe_model(m)}" for i, m in stale.items())
                + f" instead of {_describe_model(tuple(model.values()))} (an earlier run's)"
            )
        raise DataError(
            f"{out}: shards {sorted([*missing, *stale])} of {count} have not finished "
            f"({'; '.join(problems)}) after waiting {wait_s:g} s; wait for the shard pods, or "
            "rerun those shards"
        )
    if len(by_model) > 1:
        # merging would mix two models' tiles; only a person knows which run is the stale one
        groups = "; ".join(
            f"{', '.join(paths[i].name for i in shards)} by {_describe_model(model)}"
            for model, shards in by_model.items()
        )
        raise DataError(
            f"{out}: shard markers of different models after waiting {wait_s:g} s ({groups}); "
            f"markers left by an earlier run? delete {out / '.shards'} and rerun the shards"
        )
    (agreed,) = by_model  # one model: each slide's shard summaries must name it too
    slides: dict[str, list[str]] = {}  # slide -> errors of the shards where it failed
    for i, marker in markers.items():
        for entry in marker["classified"]:
            slides.setdefault(entry["slide"], [])
        for entry in marker["failed"]:
            slides.setdefault(entry["slide"], []).append(f"shard {i}: {entry['error']}")
    done: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for slide, errors in slides.items():
        classified_in = sum(
            any(e["slide"] == slide for e in marker["classified"]) for marker in markers.values()
        )
        if errors or classified_in != count:
            reason = errors[0] if errors else "not in every shard's batch (slides changed?)"
            failed.append({"slide": slide, "error": f"not merged: {reason}"})
            continue
        try:
            merged = merge_shards(
                out / Path(slide).stem,
                progress=progress,
                count=count,
                model=dict(zip(MODEL_KEYS, agreed, strict=True)),
            )
        except (DataError, HistoliteError, OSError) as exc:
            failed.append({"slide": slide, "error": str(exc)})
            continue
        done.append({"slide": slide, "tiles": merged["tiles"]})
    batch = {"classified": done, "failed": failed}
    write_json(batch_summary_path(out, (0, 1)), batch)
    return batch


def _describe_model(model: tuple[Any, ...]) -> str:
    name, version, sha256, _ = model
    if not any(model):
        return "no recorded model (an older histolite)"
    return f"{name} {version} (model.onnx sha256 {str(sha256)[:12] if sha256 else 'unknown'})"


def batch_summary_path(out: Path, shard: tuple[int, int]) -> Path:
    """``OUT/batch_summary.json``, or ``OUT/batch_summary.I-of-N.json`` for a shard.

    Shards share ``OUT``: one file each, so no shard's report overwrites another's.
    """
    index, count = shard
    return out / ("batch_summary.json" if count == 1 else f"batch_summary.{index}-of-{count}.json")
