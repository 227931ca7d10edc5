"""Training tiles from annotated whole slides: QuPath / ASAP regions in, an image folder out.

Each slide is laid out on the same grid ``slide infer`` uses (tiles of ``tile_um`` microns in
level-0 pixels from the slide's corner). A tile is kept for a class when at least
``min_coverage`` of it lies inside that class's region (holes excluded); tiles touching two
classes below that, claimed by two overlapping classes, or only partly inside one, are dropped
and counted by reason. The annotation decides what an annotated tile is (``min_tissue`` is 0 by
default: fat and mucus are pale, and a saturation mask would drop annotated adipose); with
``background``, tiles outside every annotation (selected or not) that the tissue mask finds
at least ``background_min_tissue`` tissue become that class.

Everything that can be wrong with the input (slides without microns per pixel, unreadable or
unmatched annotation files, regions outside the slide, unknown or unsafe class names, a dataset
folder made with other settings) is found before the first tile is written. Tiles are written
atomically and each finished slide (or shard of it) leaves a progress file naming what it was
cut from, so a rerun skips what is done and re-cuts a slide whose file or annotations changed;
``tiles.csv`` and ``summary.json`` are rewritten from every progress file in the folder at the
end of every run. The folder layout is :class:`~histolite.slide.layout.TileDataset`.
"""

from __future__ import annotations

import csv
import re
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from histolite.data.registry import SLIDE_TILE_COLUMNS
from histolite.errors import DataError, HistoliteWarning
from histolite.fileio import atomic_path, file_sha256, read_json, write_json, write_json_once
from histolite.slide.annotations import (
    Reason,
    SlideAnnotations,
    annotation_file_for,
    geojson_offset,
    label_by_coverage,
    read_annotations,
    unmatched_annotation_files,
)
from histolite.slide.layout import TileDataset
from histolite.slide.reader import SlideInfo, open_slide, read_region, require_distinct_stems
from histolite.slide.tiles import GridBoxes, grid_boxes, plan_tissue_tiles

# class names become folder names: letters, digits and a few separators only
SAFE_CLASS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.+()-]*$")
NO_TISSUE = "no tissue"  # drop reasons besides the coverage ones (annotations.Reason)
UNSELECTED = "unselected class"
OVER_CAP = "over the per-slide cap"
DEFAULT_TILE_MPP = 0.5  # a tile's pixels when --tile-px is not given: 20x


@dataclass(frozen=True)
class TileCutSettings:
    """How tiles are cut; everything here but ``shard`` decides which tiles a dataset holds."""

    tile_um: float
    tile_px: int
    min_coverage: float = 0.9
    min_tissue: float = 0.0  # annotated tiles: the annotation decides (fat, mucus are pale)
    background_min_tissue: float = 0.5  # background tiles: tissue by the mask, as slide infer
    classes: tuple[tuple[str, str], ...] | None = None  # (annotation class, dataset class)
    max_per_class_per_slide: int | None = None
    background: str | None = None
    holes: tuple[str, ...] = ()
    mpp: float | None = None
    seed: int = 0
    annotation_origin: str = "bounds"  # GeoJSON from the bounds corner (QuPath) or level 0
    shard: tuple[int, int] = field(default=(0, 1), compare=False)

    def __post_init__(self) -> None:
        if not self.tile_um > 0:
            raise DataError(f"--tile-um {self.tile_um}: expected a positive size in microns")
        if not self.tile_px >= 8:
            raise DataError(f"--tile-px {self.tile_px}: expected at least 8 pixels")
        if not 0.0 < self.min_coverage <= 1.0:
            raise DataError(f"--min-coverage {self.min_coverage}: expected a fraction in (0, 1]")
        for flag, value in (
            ("--min-tissue", self.min_tissue),
            ("--background-min-tissue", self.background_min_tissue),
        ):
            if not 0.0 <= value <= 1.0:
                raise DataError(f"{flag} {value}: expected a fraction in [0, 1]")
        cap = self.max_per_class_per_slide
        if cap is not None and cap < 1:
            raise DataError(f"--max-per-class-per-slide {cap}: expected at least 1")
        geojson_offset(self.annotation_origin, (0, 0))  # refuses an unknown choice
        names = [new for _, new in self.classes or ()]
        for name in [*names, *([self.background] if self.background else [])]:
            require_safe_class(name, "--classes / --background")

    @property
    def tile_mpp(self) -> float:
        """Microns per pixel of the written tiles (what training records as data.mpp)."""
        return self.tile_um / self.tile_px

    def fingerprint(self) -> dict[str, Any]:
        """What decides the tiles: a dataset folder holds tiles of one fingerprint only."""
        values = asdict(self)
        values.pop("shard")
        if values["annotation_origin"] == "bounds":  # folders cut before the choice existed
            values.pop("annotation_origin")
        values["classes"] = [list(pair) for pair in self.classes] if self.classes else None
        values["holes"] = list(self.holes)
        return values


def require_safe_class(name: str, where: str) -> None:
    if not SAFE_CLASS.match(name) or name in (".", ".."):
        raise DataError(
            f"{where}: class name {name!r} cannot be a folder name; use letters, digits, "
            "spaces and _ . + ( ) - (rename with --classes 'Old name=new_name')"
        )


def parse_class_mapping(text: str) -> tuple[tuple[str, str], ...]:
    """``"Tumor=tumour, Stroma=stroma, Necrosis"`` -> (("Tumor", "tumour"), ...)."""
    pairs = []
    for item in text.split(","):
        if not item.strip():
            continue
        old, _, new = item.partition("=")
        old, new = old.strip(), (new.strip() or old.strip())
        if not old:
            raise DataError(f"--classes {text!r}: {item!r} names no annotation class")
        pairs.append((old, new))
    if not pairs:
        raise DataError(f"--classes {text!r}: no classes named")
    olds = [old for old, _ in pairs]
    if len(set(olds)) != len(olds):
        raise DataError(f"--classes {text!r}: an annotation class is named twice")
    return tuple(pairs)


def default_tile_px(tile_um: float) -> int:
    """Pixels of a ``tile_um`` tile at ``DEFAULT_TILE_MPP`` (20x)."""
    return max(8, round(tile_um / DEFAULT_TILE_MPP))


@dataclass(frozen=True)
class AnnotatedSlide:
    """A slide checked and ready to cut: its geometry and its class regions in dataset names."""

    path: Path
    info: SlideInfo
    annotations: SlideAnnotations
    names: dict[str, str | None]  # region class -> dataset class (None: annotated, not kept)


def prepare_slides(
    slides: Sequence[Path], annotations: Path, settings: TileCutSettings
) -> list[AnnotatedSlide]:
    """Open every slide and read its annotations; any problem is an error before any tile."""
    require_distinct_stems(list(slides))
    if not slides:
        raise DataError("no slides given")
    if annotations.is_file() and len(slides) > 1:
        raise DataError(
            f"{annotations}: one annotation file for {len(slides)} slides; give a folder of "
            "<slide-stem>.geojson / .xml files instead"
        )
    stray = unmatched_annotation_files(annotations, slides)
    if stray:
        raise DataError(
            f"{annotations}: annotation file(s) {', '.join(p.name for p in stray)} match no "
            "slide given (their stem must be the slide's file stem); rename them, move them "
            "away, or add their slides"
        )
    mapping = dict(settings.classes) if settings.classes else None
    prepared = []
    for path in slides:
        slide = open_slide(path, settings.mpp)
        try:
            info = slide.info
        finally:
            slide.close()
        regions = read_annotations(
            annotation_file_for(annotations, path),
            offset=geojson_offset(settings.annotation_origin, info.origin),
            holes=settings.holes,
        ).check_inside(info.width, info.height)
        names = _dataset_names(regions, mapping)
        prepared.append(AnnotatedSlide(path, info, regions, names))
    if mapping is not None:
        found = {c for p in prepared for c in p.annotations.classes}
        absent = sorted(set(mapping) - found)
        if absent:
            raise DataError(
                f"--classes: {absent} in no annotation file; the files have {sorted(found)}"
            )
    return prepared


def _dataset_names(
    annotations: SlideAnnotations, mapping: dict[str, str] | None
) -> dict[str, str | None]:
    """Each region class's dataset class; classes left out of ``mapping`` map to None."""
    if mapping is None:
        for name in annotations.classes:
            require_safe_class(name, f"{annotations.source}")
        return {name: name for name in annotations.classes}
    return {name: mapping.get(name) for name in annotations.classes}


def merged_regions(prepared: AnnotatedSlide) -> tuple[SlideAnnotations, list[str | None]]:
    """Regions with classes that map to one dataset class merged (so a tile half "Tumor" and
    half "Tumor: Positive" is all tumour), and each merged class's dataset name (None: an
    annotated class that is not kept; it still is not background)."""
    keep = {old: new for old, new in prepared.names.items() if new is not None}
    ignored = [old for old, new in prepared.names.items() if new is None]
    clash = sorted(set(ignored) & set(keep.values()))
    if clash:
        raise DataError(
            f"{prepared.annotations.source}: {clash} are both an unselected annotation class "
            "and a --classes target; rename the target"
        )
    # unselected classes keep their own (prefixed) names so they stay annotated area
    mapping = {**keep, **{old: f"\0{old}" for old in ignored}}
    regions = prepared.annotations.select(mapping)
    return regions, [None if c.startswith("\0") else c for c in regions.classes]


@dataclass
class SlideCut:
    """One slide's (or shard's) kept tiles and what was dropped, as its progress file holds."""

    slide: str
    shard: tuple[int, int]
    rows: list[dict[str, Any]]
    dropped: dict[str, int]
    annotations: dict[str, Any]


def choose_tiles(
    prepared: AnnotatedSlide,
    settings: TileCutSettings,
    boxes: GridBoxes,
    shard: tuple[int, int] = (0, 1),
) -> tuple[np.ndarray, list[str | None], np.ndarray, dict[str, int]]:
    """Which grid boxes become tiles: (kept box positions, class per kept box, coverage per
    kept box, dropped counts by reason). Decided on the whole grid, so shards agree; the
    dropped counts are those of the boxes of ``shard`` only, so the shards of a slide add up
    to the unsharded counts."""
    regions, names = merged_regions(prepared)
    side = np.full_like(boxes.x, boxes.size)
    xywh = np.stack([boxes.x, boxes.y, side, side], axis=1)
    left, top, right, bottom = regions.union().bounds
    # only boxes near an annotation can be covered: a slide is mostly elsewhere
    near = (boxes.x + boxes.size > left) & (boxes.x < right)
    near &= (boxes.y + boxes.size > top) & (boxes.y < bottom)
    coverage = np.zeros((len(xywh), len(names)))
    coverage[near] = regions.coverage(xywh[near])
    labels, reasons = label_by_coverage(coverage, settings.min_coverage)
    tissue_ok = boxes.tissue >= settings.min_tissue
    classes: list[str | None] = [names[i] if i >= 0 else None for i in labels]
    # why each box was dropped ("": kept, or glass outside every region, which is not counted)
    why = np.full(len(xywh), "", dtype=object)
    kept = reasons == Reason.KEPT
    unselected = kept & np.array([c is None for c in classes], bool)
    why[unselected] = UNSELECTED
    kept &= ~unselected
    why[kept & ~tissue_ok] = NO_TISSUE
    kept &= tissue_ok
    # tissue outside every region (glass outside them is not counted: it is most of a slide)
    background_ok = (boxes.tissue >= settings.background_min_tissue) & (boxes.tissue > 0)
    outside = (reasons == Reason.OUTSIDE) & background_ok
    if settings.background is not None:
        kept |= outside
        for i in np.flatnonzero(outside):
            classes[i] = settings.background
    else:
        why[outside] = Reason.OUTSIDE
    for reason in (Reason.MIXED, Reason.PARTIAL, Reason.AMBIGUOUS):
        why[reasons == reason] = reason
    positions = np.flatnonzero(kept)
    if settings.max_per_class_per_slide is not None:
        positions = _capped(positions, classes, settings, prepared.path.stem, why)
    # a kept box's coverage: of its class's region, or for background the share outside all
    kept_coverage = np.array(
        [coverage[i, labels[i]] if labels[i] >= 0 else 1.0 - coverage[i].sum() for i in positions]
    )
    index, count = shard
    mine = why[boxes.index % count == index]
    dropped = Counter(str(reason) for reason in mine[mine != ""])
    return positions, [classes[i] for i in positions], kept_coverage, dict(dropped)


def _capped(
    positions: np.ndarray,
    classes: list[str | None],
    settings: TileCutSettings,
    stem: str,
    why: np.ndarray,
) -> np.ndarray:
    """At most ``max_per_class_per_slide`` per class, drawn by a generator seeded by the run's
    seed and the slide's name (the same tiles on every run and in every shard); the boxes left
    out are marked ``OVER_CAP`` in ``why``."""
    cap = settings.max_per_class_per_slide
    assert cap is not None
    rng = np.random.default_rng([settings.seed, zlib.crc32(stem.encode())])
    chosen = []
    for name in sorted({classes[i] for i in positions}, key=str):
        members = np.array([i for i in positions if classes[i] == name])
        if len(members) > cap:
            kept = np.sort(rng.choice(members, cap, replace=False))
            why[np.setdiff1d(members, kept)] = OVER_CAP
            members = kept
        chosen.append(members)
    return np.sort(np.concatenate(chosen)) if chosen else positions


def cut_slide(
    prepared: AnnotatedSlide,
    settings: TileCutSettings,
    dataset: TileDataset,
    *,
    progress: bool = True,
) -> SlideCut:
    """Write this shard's tiles of one slide; returns what its progress file records."""
    stem = prepared.path.stem
    slide = open_slide(prepared.path, settings.mpp)
    try:
        plan = plan_tissue_tiles(slide, settings.tile_um)
        boxes = grid_boxes(plan.grid, plan.mask, plan.mask_scale)
        positions, classes, coverage, dropped = choose_tiles(
            prepared, settings, boxes, settings.shard
        )
        index, count = settings.shard
        mine = [k for k, p in enumerate(positions) if boxes.index[p] % count == index]
        rows = []
        for k in tqdm(mine, desc=prepared.path.name, unit="tile", disable=not progress):
            position, name = positions[k], classes[k]
            assert name is not None
            x, y = int(boxes.x[position]), int(boxes.y[position])
            pixels = read_region(slide, x, y, boxes.size, settings.tile_px)
            target = dataset.tile(name, stem, x, y)
            with atomic_path(target) as tmp:
                Image.fromarray(pixels).save(tmp, format="PNG")
            rows.append(
                {
                    "path": target.relative_to(dataset.root).as_posix(),
                    "slide": stem,
                    "x": x,
                    "y": y,
                    "width": boxes.size,
                    "height": boxes.size,
                    "class": name,
                    "coverage": round(float(coverage[k]), 4),
                    "mpp": prepared.info.mpp,
                    "tile_mpp": round(settings.tile_mpp, 6),
                }
            )
    finally:
        slide.close()
    counts = prepared.annotations.counts
    return SlideCut(
        slide=stem,
        shard=settings.shard,
        rows=rows,
        dropped=dropped,
        annotations={
            "file": str(prepared.annotations.source),
            "classes": prepared.annotations.classes,
            "features": counts.features,
            "kept": counts.kept,
            "repaired": counts.repaired,
            "clipped": counts.clipped,
            "skipped": counts.skipped,
        },
    )


def _finished(
    dataset: TileDataset, stem: str, settings: TileCutSettings, shard: tuple[int, int]
) -> SlideCut | None:
    """Shard ``shard`` of the slide as an earlier run finished it (every tile still on disk)."""
    path = dataset.progress(stem, shard)
    if not path.is_file():
        return None
    record = read_json(path)
    if record.get("settings") != settings.fingerprint():
        return None
    cut = SlideCut(
        slide=record["slide"],
        shard=(int(record["shard"][0]), int(record["shard"][1])),
        rows=record["rows"],
        dropped=record["dropped"],
        annotations=record["annotations"],
    )
    if not all((dataset.root / row["path"]).is_file() for row in cut.rows):
        return None
    return cut


def claim_folder(dataset: TileDataset, settings: TileCutSettings) -> None:
    """Record the settings a dataset folder's tiles are cut with, or check them if recorded.

    A folder holds tiles of one setting; tiles cut otherwise are refused, not mixed in. The
    record is created atomically, so shards started together on a fresh folder agree on it
    instead of one refusing the folder the other has just begun.
    """
    recorded = dataset.root / ".progress" / "settings.json"
    # ".progress" alone: a shard started with this one is creating the record
    if (
        not recorded.is_file()
        and dataset.root.is_dir()
        and any(p.name != ".progress" for p in dataset.root.iterdir())
    ):
        raise DataError(
            f"{dataset.root}: not empty and not a tile dataset written by `histolite slide "
            "tiles`; choose a new or empty --out folder"
        )
    wanted = settings.fingerprint()
    earlier = write_json_once(recorded, wanted)
    if earlier != wanted:
        if not isinstance(earlier, dict):
            raise DataError(f"{recorded}: damaged (expected a JSON object of tile settings)")
        differing = sorted(k for k in {*wanted, *earlier} if earlier.get(k) != wanted.get(k))
        raise DataError(
            f"{dataset.root}: holds tiles cut with other settings ({', '.join(differing)} "
            "differ); use a new --out folder, or delete this one to start again"
        )


def slide_source(prepared: AnnotatedSlide) -> dict[str, Any]:
    """What a slide's tiles are cut from; a progress record with another source is stale.

    The slide is known by its size (a moved or copied file is the same slide), the annotations
    by their content: an edited annotation file must re-cut, not resume.
    """
    return {
        "slide": str(prepared.path.resolve()),
        "slide_bytes": prepared.path.stat().st_size,
        "annotations_sha256": file_sha256(prepared.annotations.source),
    }


# a progress file's name after the slide stem: unsharded, or shard I of N
_PROGRESS_SUFFIX = r"(?:\.\d+-of-\d+)?\.json"


def _progress_files(dataset: TileDataset, stem: str) -> list[Path]:
    """Every progress record of one slide: unsharded and each shard of any shard count."""
    folder = dataset.root / ".progress"
    if not folder.is_dir():
        return []
    pattern = re.compile(re.escape(stem) + _PROGRESS_SUFFIX)
    return sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name))


def _stale_records(
    dataset: TileDataset, stem: str, source: Mapping[str, Any]
) -> list[tuple[Path, dict[str, Any]]]:
    """This slide's progress records cut from an older file or other annotations.

    Raises:
        DataError: the records are of another slide that shares this one's name; tiles are
            split by slide name, so two slides in one dataset cannot share one.
    """
    stale = []
    for path in _progress_files(dataset, stem):
        record = read_json(path)
        earlier = record.get("source")
        if earlier is None or earlier == source:  # None: written before sources were recorded
            continue
        if (
            earlier.get("slide") != source["slide"]
            and earlier.get("slide_bytes") != source["slide_bytes"]
        ):
            raise DataError(
                f"{dataset.root}: already holds tiles of a slide named '{stem}' cut from "
                f"{earlier.get('slide')}; {source['slide']} is another slide with the same "
                "name. Tiles are split by slide name, so two slides cannot share one: rename "
                "one, or cut into another --out folder"
            )
        stale.append((path, record))
    return stale


def _delete_stale(
    dataset: TileDataset, stem: str, stale: list[tuple[Path, dict[str, Any]]]
) -> None:
    """Delete stale tiles before re-cutting: left on disk, ``train`` would read old labels."""
    tiles = 0
    for path, record in stale:
        for row in record.get("rows", []):
            (dataset.root / row["path"]).unlink(missing_ok=True)
            tiles += 1
        path.unlink(missing_ok=True)  # a parallel shard may have removed it already
    warnings.warn(
        f"{stem}: the slide file or its annotations changed since the earlier cut; its {tiles} "
        "earlier tile(s) were deleted and it is cut again",
        HistoliteWarning,
        stacklevel=3,
    )


def _recorded_stems(dataset: TileDataset) -> list[str]:
    """Slides with a progress record in the dataset, from this run or earlier ones."""
    folder = dataset.root / ".progress"
    if not folder.is_dir():
        return []
    names = (p.name for p in folder.glob("*.json") if p.name != "settings.json")
    return sorted({re.sub(_PROGRESS_SUFFIX + "$", "", name) for name in names})


def cut_tiles(
    slides: Sequence[Path],
    annotations: Path,
    out: Path,
    settings: TileCutSettings,
    *,
    progress: bool = True,
    report: Callable[[SlideCut, bool], None] | None = None,
) -> dict[str, Any]:
    """Cut every slide's annotated tiles into ``out``; returns the dataset summary.

    ``report(cut, resumed)`` is called after each slide (resumed: done by an earlier run).
    """
    dataset = TileDataset(out)
    prepared = prepare_slides(slides, annotations, settings)
    claim_folder(dataset, settings)
    sources = [slide_source(item) for item in prepared]
    # every name clash is refused before any tile is deleted or written
    stale = [
        _stale_records(dataset, item.path.stem, source)
        for item, source in zip(prepared, sources, strict=True)
    ]
    for item, source, old in zip(prepared, sources, stale, strict=True):
        if old:
            _delete_stale(dataset, item.path.stem, old)
        cut = _finished(dataset, item.path.stem, settings, settings.shard)
        resumed = cut is not None
        if cut is None:
            cut = cut_slide(item, settings, dataset, progress=progress)
            record = {"settings": settings.fingerprint(), "source": source, **asdict(cut)}
            write_json(dataset.progress(item.path.stem, settings.shard), record)
        if report is not None:
            report(cut, resumed)
    # the listing covers every slide in the folder: earlier runs' tiles are trained on too
    stems = sorted({*_recorded_stems(dataset), *(p.path.stem for p in prepared)})
    return write_listing(dataset, stems, settings)


_SHARD_PROGRESS = re.compile(r"\.\d+-of-(\d+)\.json$")


def _complete_cuts(dataset: TileDataset, stem: str, settings: TileCutSettings) -> list[SlideCut]:
    """The cuts that together cover a slide: the unsharded one, or every shard of one N."""
    whole = _finished(dataset, stem, settings, (0, 1))
    if whole is not None:
        return [whole]
    counts = sorted(
        {
            int(match[1])
            for path in _progress_files(dataset, stem)
            if (match := _SHARD_PROGRESS.search(path.name))
        }
    )
    for count in counts:
        cuts = [_finished(dataset, stem, settings, (i, count)) for i in range(count)]
        if all(cut is not None for cut in cuts):
            return [cut for cut in cuts if cut is not None]
    return []


def write_listing(
    dataset: TileDataset, stems: Sequence[str], settings: TileCutSettings
) -> dict[str, Any]:
    """``tiles.csv`` and ``summary.json`` from the progress files of the slides done so far."""
    rows: list[dict[str, Any]] = []
    slides: dict[str, Any] = {}
    pending = []
    for stem in stems:
        cuts = _complete_cuts(dataset, stem, settings)
        if not cuts:
            pending.append(stem)
            continue
        mine = [row for cut in cuts for row in cut.rows]
        rows += mine
        dropped: Counter[str] = Counter()
        for cut in cuts:
            dropped.update(cut.dropped)
        slides[stem] = {
            "tiles": len(mine),
            "per_class": dict(sorted(Counter(r["class"] for r in mine).items())),
            "dropped": dict(sorted((k, v) for k, v in dropped.items() if v)),
            "annotations": cuts[0].annotations,
        }
    rows.sort(key=lambda r: (r["slide"], r["y"], r["x"]))
    with atomic_path(dataset.tiles_csv) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=SLIDE_TILE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    totals: Counter[str] = Counter(r["class"] for r in rows)
    dropped_total: Counter[str] = Counter()
    for entry in slides.values():
        dropped_total.update(entry["dropped"])
    summary = {
        "settings": settings.fingerprint(),
        "tile_mpp": settings.tile_mpp,
        "tiles": len(rows),
        "per_class": dict(sorted(totals.items())),
        "dropped": dict(sorted(dropped_total.items())),
        "slides": slides,
        "pending_slides": pending,
        "note": (
            f"{len(pending)} slide(s) not finished (shards still running?); rerun the command "
            "to finish them and complete this listing"
            if pending
            else None
        ),
    }
    write_json(dataset.summary, summary)
    return summary


def tile_counts_text(summary: Mapping[str, Any]) -> str:
    """``"tumour 120, stroma 80"``: a summary's tiles per class for one line of output."""
    return ", ".join(f"{name} {n}" for name, n in summary["per_class"].items()) or "no tiles"
