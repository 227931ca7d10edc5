"""Join the shards of ``slide infer --shard I/N`` into the outputs an unsharded run writes.

A shard is taken only if its summary is final and its ``tiles.csv`` and mask are the files that
summary hashed, so one run's tiles are never joined under another run's summary (a shard rerun
over an earlier run's folder). A batch of slides run as N shards is merged once all N shard
markers exist, list no failures, and name one model.
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histolite.errors import DataError, HistoliteError
from histolite.fileio import atomic_path, file_sha256, read_json, write_json
from histolite.runtime.card import IDENTITY_KEYS, describe_identity
from histolite.slide.inference import class_counts, write_slide_outputs
from histolite.slide.layout import HASHED_OUTPUTS, BatchOutputs, SlideOutputs
from histolite.slide.outputs import TileRow, parse_tiles_csv, write_tiles_csv
from histolite.slide.reader import open_slide
from histolite.slide.tiles import read_overview

# settings every shard of one slide must share
SHARED_KEYS = ("slide", *IDENTITY_KEYS, "tile_um", "overlap", "min_tissue", "mpp", "classes")


def _final_summaries(
    shards: list[SlideOutputs], model: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Each shard's summary, refused unless final and (with ``model``) made by that model."""
    summaries = [read_json(shard.summary) for shard in shards]
    for shard, summary in zip(shards, summaries, strict=True):
        if "total" not in summary.get("timings_s", {}) or "outputs_sha256" not in summary:
            raise DataError(
                f"{shard.root}: summary.json is not final (the shard is still being written, or "
                "was written by an older histolite); wait for the shard, or rerun it"
            )
        found = {k: summary.get(k) for k in IDENTITY_KEYS}
        if model is not None and found != model:
            raise DataError(
                f"{shard.root}: made by {describe_identity(found)}, not "
                f"{describe_identity(model)} (an earlier run's shard?); "
                "rerun the shard with that model"
            )
    return summaries


def _require_complete_set(slide_dir: Path, summaries: list[dict[str, Any]]) -> int:
    """The shard count, once every shard 0..N-1 is present and all agree on the settings."""
    counts = {s["shard"]["count"] for s in summaries}
    if len(counts) != 1:
        raise DataError(f"{slide_dir}: shards of different counts {sorted(counts)}")
    (count,) = counts
    have = sorted(s["shard"]["index"] for s in summaries)
    if have != list(range(count)):
        missing = sorted(set(range(count)) - set(have))
        raise DataError(f"{slide_dir}: shards {missing} of {count} are missing; run them first")
    first = summaries[0]
    for summary in summaries[1:]:
        differing = [k for k in SHARED_KEYS if summary.get(k) != first.get(k)]
        if differing:
            raise DataError(f"{slide_dir}: shards disagree on {differing}")
    return int(count)


def _shard_file(shard: SlideOutputs, summary: dict[str, Any], name: str) -> bytes:
    """The bytes of a shard's output file, refused unless they are those its summary hashed."""
    path = shard.hashed(name)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    if hashlib.sha256(data).hexdigest() != summary["outputs_sha256"].get(name):
        raise DataError(
            f"{path}: not the file its summary.json describes (another run of the shard is "
            "rewriting the folder, or it was interrupted); wait for the shard, or rerun it"
        )
    return data


def _merged_rows(
    shards: list[SlideOutputs], summaries: list[dict[str, Any]], classes: list[str]
) -> list[TileRow]:
    """Every shard's rows in grid order; each file read once and checked against its hash."""
    rows: list[TileRow] = []
    for shard, summary in zip(shards, summaries, strict=True):
        text = _shard_file(shard, summary, "tiles.csv").decode("utf-8")
        rows += parse_tiles_csv(io.StringIO(text, newline=""), classes, str(shard.tiles_csv))
    return sorted(rows, key=lambda r: r.index)


def merge_shards(
    slide_dir: Path,
    progress: bool = True,
    count: int | None = None,
    *,
    model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Join ``slide_dir/shards/I-of-N`` into the unsharded outputs; refuses an incomplete set.

    ``count`` picks the ``*-of-N`` folders of that N (others are left over from other runs).
    ``model`` (a ``card_identity``): refuse shards whose summary names another model (an
    earlier run's, not yet redone).

    The merged ``summary.json`` has the keys an unsharded run writes. Its ``timings_s`` sum the
    shards' (work done, not wall-clock: shards run in parallel); ``tiles_per_s`` is tiles over
    that summed classification time, and ``total`` adds the merge's own time.
    """
    started = time.perf_counter()
    outputs = SlideOutputs(slide_dir, slide_dir.name)
    shards = outputs.shards(count)
    if not shards:
        raise DataError(f"{slide_dir}: no shards/I-of-N folders to merge")
    summaries = _final_summaries(shards, model)
    count = _require_complete_set(slide_dir, summaries)
    first = summaries[0]
    classes = first["classes"]
    rows = _merged_rows(shards, summaries, classes)
    mask = _shard_file(shards[0], first, "tissue_mask.png")  # every shard masked the whole slide
    outputs = SlideOutputs(slide_dir, Path(first["slide"]).stem)
    write_tiles_csv(outputs.tiles_csv, rows, classes)
    with atomic_path(outputs.mask) as tmp:
        tmp.write_bytes(mask)
    slide_path = Path(first["slide"])
    slide = open_slide(slide_path, first["mpp"] if first["mpp_source"] == "given (--mpp)" else None)
    try:
        overview = read_overview(slide)
    finally:
        slide.close()
    timings = {
        key: round(sum(s["timings_s"][key] for s in summaries), 3)
        for key in ("tissue_mask", "classification", "total")
    }
    timings["tiles_per_s"] = round(len(rows) / max(timings["classification"], 1e-9), 2)
    merged = {
        **first,
        "shard": {"index": None, "count": count, "merged_from": [str(s.root) for s in shards]},
        "tiles": len(rows),
        **class_counts(rows, classes, first.get("abstain_below")),
        "device": "+".join(sorted({str(s.get("device")) for s in summaries})),
        "outputs_sha256": {name: file_sha256(outputs.hashed(name)) for name in HASHED_OUTPUTS},
        "timings_s": timings,
    }
    write_slide_outputs(outputs, slide_path.name, rows, merged, overview, partial=False)
    timings["total"] = round(timings["total"] + time.perf_counter() - started, 3)
    timings["tiles_per_s_overall"] = round(len(rows) / max(timings["total"], 1e-9), 2)
    write_json(outputs.summary, merged)
    return merged


@dataclass
class _Markers:
    """The shard markers of a batch as read at one moment, and what is wrong with them."""

    paths: dict[int, Path]
    found: dict[int, dict[str, Any]]
    missing: list[int]
    stale: dict[int, tuple[Any, ...]]  # markers of a model other than the one asked for
    failing: list[int]
    by_model: dict[tuple[Any, ...], list[int]]

    @property
    def ready(self) -> bool:
        return not (self.missing or self.stale or self.failing or len(self.by_model) > 1)


def _read_markers(layout: BatchOutputs, count: int, model: dict[str, Any] | None) -> _Markers:
    paths = {i: layout.shard_marker(count, i) for i in range(count)}
    found = {i: read_json(p) for i, p in paths.items() if p.is_file()}  # written atomically
    identity = {i: tuple(m.get(k) for k in IDENTITY_KEYS) for i, m in found.items()}
    wanted = tuple(model.values()) if model is not None else None
    stale = {i: m for i, m in identity.items() if wanted is not None and m != wanted}
    by_model: dict[tuple[Any, ...], list[int]] = {}
    for i, m in identity.items():
        by_model.setdefault(m, []).append(i)
    return _Markers(
        paths=paths,
        found=found,
        missing=[i for i in range(count) if i not in found],
        stale=stale,
        failing=[i for i, m in found.items() if m["failed"] and i not in stale],
        by_model=by_model,
    )


def _wait_for_markers(
    layout: BatchOutputs,
    count: int,
    model: dict[str, Any] | None,
    wait_s: float,
    poll_s: float,
) -> _Markers:
    """The markers once ready or after ``wait_s``; an error if some are missing or stale then,
    or if they name several models."""
    deadline = time.monotonic() + wait_s
    markers = _read_markers(layout, count, model)
    while not markers.ready and time.monotonic() < deadline:
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        markers = _read_markers(layout, count, model)
    out = layout.root
    if markers.missing or markers.stale:
        problems = []
        if markers.missing:
            problems.append(f"no {', '.join(str(markers.paths[i]) for i in markers.missing)}")
        if markers.stale:
            assert model is not None
            problems.append(
                "; ".join(
                    f"{markers.paths[i]} by {describe_identity(m)}"
                    for i, m in markers.stale.items()
                )
                + f" instead of {describe_identity(model)} (an earlier run's)"
            )
        raise DataError(
            f"{out}: shards {sorted([*markers.missing, *markers.stale])} of {count} have not "
            f"finished ({'; '.join(problems)}) after waiting {wait_s:g} s; wait for the shard "
            "pods, or rerun those shards"
        )
    if len(markers.by_model) > 1:
        # merging would mix two models' tiles; only a person knows which run is the stale one
        groups = "; ".join(
            f"{', '.join(markers.paths[i].name for i in shards)} by {describe_identity(m)}"
            for m, shards in markers.by_model.items()
        )
        raise DataError(
            f"{out}: shard markers of different models after waiting {wait_s:g} s ({groups}); "
            f"markers left by an earlier run? delete {out / '.shards'} and rerun the shards"
        )
    return markers


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

    ``model`` (the ``card_identity`` the shards must have used): a marker naming any other
    model counts as not yet written, so an earlier run's markers *of one model* are not merged
    either (without it they cannot be told from this run's). Each slide's shard summaries must
    name the markers' model too.
    """
    layout = BatchOutputs(out)
    markers = _wait_for_markers(layout, count, model, wait_s, poll_s)
    (agreed,) = markers.by_model  # one model: each slide's shard summaries must name it too
    identity = dict(zip(IDENTITY_KEYS, agreed, strict=True))
    done: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for slide, error in _slides_to_merge(markers.found, count).items():
        try:
            if error is not None:
                raise DataError(f"not merged: {error}")
            merged = merge_shards(
                layout.slide(slide).root, progress=progress, count=count, model=identity
            )
        except (DataError, HistoliteError, OSError) as exc:
            failed.append({"slide": slide, "error": str(exc)})
            continue
        done.append({"slide": slide, "tiles": merged["tiles"]})
    batch = {"classified": done, "failed": failed}
    write_json(layout.batch_summary(), batch)
    return batch


def _slides_to_merge(markers: dict[int, dict[str, Any]], count: int) -> dict[str, str | None]:
    """Every slide the shards name, with why it cannot be merged (None when it can)."""
    errors: dict[str, list[str]] = {}  # slide -> errors of the shards where it failed
    for i, marker in markers.items():
        for entry in marker["classified"]:
            errors.setdefault(entry["slide"], [])
        for entry in marker["failed"]:
            errors.setdefault(entry["slide"], []).append(f"shard {i}: {entry['error']}")
    verdicts: dict[str, str | None] = {}
    for slide, found in errors.items():
        classified_in = sum(
            any(e["slide"] == slide for e in marker["classified"]) for marker in markers.values()
        )
        if found:
            verdicts[slide] = found[0]
        elif classified_in != count:
            verdicts[slide] = "not in every shard's batch (slides changed?)"
        else:
            verdicts[slide] = None
    return verdicts
