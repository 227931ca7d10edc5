"""Shards of `slide infer` and their merge (``slide/merge.py``): disjoint, complete, never mixed."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from histolite.errors import HistoliteError
from histolite.runtime.classifier import OnnxClassifier
from histolite.slide.inference import (
    SlideSettings,
    classify_slide,
    classify_slides,
    model_identity,
)
from histolite.slide.merge import merge_batch, merge_shards
from histolite.slide.outputs import read_tiles_csv, write_tiles_csv

COLUMNS, ROWS = 6, 4


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "tiles.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_shards_are_disjoint_and_merge_to_the_unsharded_result(
    mosaic: tuple[Path, list], model: OnnxClassifier, tmp_path: Path
) -> None:
    path, _ = mosaic
    settings = SlideSettings(min_tissue=0.01, batch_size=5)
    whole = classify_slide(path, model, tmp_path / "whole", settings, progress=False)
    for index in range(3):
        shard = SlideSettings(min_tissue=0.01, batch_size=5, shard=(index, 3))
        classify_slides([path], model, tmp_path / "sharded", shard, progress=False)
    # each shard reports its own batch: none overwrites another's
    reports = sorted(p.name for p in (tmp_path / "sharded").glob("batch_summary*.json"))
    assert reports == [f"batch_summary.{i}-of-3.json" for i in range(3)]
    parts = [_rows(tmp_path / "sharded" / "mosaic" / "shards" / f"{i}-of-3") for i in range(3)]
    indices = [{r["index"] for r in part} for part in parts]
    assert all(a.isdisjoint(b) for i, a in enumerate(indices) for b in indices[i + 1 :])
    merged = merge_shards(tmp_path / "sharded" / "mosaic", progress=False)
    one, joined = tmp_path / "whole" / "mosaic", tmp_path / "sharded" / "mosaic"
    assert _rows(joined) == _rows(one)
    assert merged["tiles"] == sum(len(p) for p in parts)
    assert (joined / "heatmap.png").is_file()
    # the merged outputs are the unsharded run's: mask, GeoJSON to the digit, summary keys
    for name in ("tissue_mask.png", "mosaic.geojson"):
        assert (joined / name).read_bytes() == (one / name).read_bytes(), name
    on_disk = json.loads((joined / "summary.json").read_text())
    assert on_disk == merged and merged.keys() == whole.keys()
    assert merged["timings_s"].keys() == whole["timings_s"].keys()
    assert merged["timings_s"]["tiles_per_s"] > 0
    assert {k: v for k, v in merged.items() if k not in ("timings_s", "shard")} == {
        k: v for k, v in whole.items() if k not in ("timings_s", "shard")
    }
    shutil.rmtree(tmp_path / "sharded" / "mosaic" / "shards" / "1-of-3")
    with pytest.raises(HistoliteError, match=r"shards \[1\] of 3 are missing"):
        merge_shards(tmp_path / "sharded" / "mosaic", progress=False)


def test_batch_merge_waits_for_every_shard_to_finish(
    mosaic: tuple[Path, list], model: OnnxClassifier, tmp_path: Path
) -> None:
    """A slide folder complete in all shards is not enough: merge waits for the shard markers."""
    slides = [tmp_path / "a.tif", tmp_path / "b.tif"]
    for slide in slides:
        shutil.copy(mosaic[0], slide)
    out = tmp_path / "out"
    classify_slides(slides, model, out, SlideSettings(shard=(0, 2)), progress=False)
    # shard 1 is between slides: a.tif done, b.tif not started, no marker yet
    classify_slide(slides[0], model, out, SlideSettings(shard=(1, 2)), progress=False)
    with pytest.raises(HistoliteError, match=r"shards \[1\] of 2 have not finished"):
        merge_batch(out, 2)
    assert not (out / "a" / "tiles.csv").exists()
    late = threading.Timer(
        0.3, classify_slides, (slides, model, out, SlideSettings(shard=(1, 2))), {"progress": False}
    )
    late.start()
    try:
        batch = merge_batch(out, 2, wait_s=60, poll_s=0.05, progress=False)
    finally:
        late.join()
    assert [Path(d["slide"]).name for d in batch["classified"]] == ["a.tif", "b.tif"]
    assert batch["failed"] == []
    marker = json.loads((out / ".shards" / "1-of-2.done").read_text())
    # the slide shard 1 had finished before was not redone (resume)
    assert [d["resumed"] for d in marker["classified"]] == [True, False]
    assert (out / "b" / "heatmap.png").is_file()
    assert json.loads((out / "batch_summary.json").read_text()) == batch


def test_a_resumed_shard_redoes_slides_of_a_retrained_model(
    mosaic: tuple[Path, list], model: OnnxClassifier, retrained: OnnxClassifier, tmp_path: Path
) -> None:
    """Regression: resume matched the model by name and version only, so re-exporting a
    retrained run to the same folder reused the old model's tiles."""
    assert retrained.card["name"] == model.card["name"]
    assert retrained.card["version"] == model.card["version"]
    out, shard = tmp_path / "out", SlideSettings(shard=(0, 2))
    classify_slides([mosaic[0]], model, out, shard, progress=False)
    summary = json.loads((out / "mosaic" / "shards" / "0-of-2" / "summary.json").read_text())
    assert summary["model_sha256"] == model.card["sha256"] and summary["stain_sha256"] is None
    again = classify_slides([mosaic[0]], model, out, shard, progress=False)
    assert [d["resumed"] for d in again["classified"]] == [True]  # same model: reused
    redone = classify_slides([mosaic[0]], retrained, out, shard, progress=False)
    assert [d["resumed"] for d in redone["classified"]] == [False]
    summary = json.loads((out / "mosaic" / "shards" / "0-of-2" / "summary.json").read_text())
    assert summary["model_sha256"] == retrained.card["sha256"] != model.card["sha256"]


def test_batch_merge_waits_for_a_failed_shard_to_be_retried(
    mosaic: tuple[Path, list], model: OnnxClassifier, tmp_path: Path
) -> None:
    """Regression: a marker listing a failed slide was taken as final, so the merge gave up on
    the slide at once while Kubernetes was still retrying its shard."""
    slides = [tmp_path / "a.tif", tmp_path / "b.tif"]
    for slide in slides:
        shutil.copy(mosaic[0], slide)
    out = tmp_path / "out"
    classify_slides(slides, model, out, SlideSettings(shard=(0, 2)), progress=False)
    slides[1].write_text("not yet copied")  # a transient failure in shard 1
    failed = classify_slides(slides, model, out, SlideSettings(shard=(1, 2)), progress=False)
    assert [Path(f["slide"]).name for f in failed["failed"]] == ["b.tif"]
    # the wait runs out with the failure still listed: the good slide is merged, b is named
    started = time.monotonic()
    batch = merge_batch(out, 2, wait_s=0.3, poll_s=0.05, progress=False)
    assert time.monotonic() - started >= 0.3
    assert [Path(d["slide"]).name for d in batch["classified"]] == ["a.tif"]
    ((slide, error),) = [(f["slide"], f["error"]) for f in batch["failed"]]
    assert Path(slide).name == "b.tif" and error.startswith("not merged: shard 1: ")

    def retry() -> None:  # the retried pod: b.tif readable now
        shutil.copy(mosaic[0], slides[1])
        classify_slides(slides, model, out, SlideSettings(shard=(1, 2)), progress=False)

    late = threading.Timer(0.3, retry)
    late.start()
    try:
        batch = merge_batch(out, 2, wait_s=60, poll_s=0.05, progress=False)
    finally:
        late.join()
    assert [Path(d["slide"]).name for d in batch["classified"]] == ["a.tif", "b.tif"]
    assert batch["failed"] == []
    marker = json.loads((out / ".shards" / "1-of-2.done").read_text())
    assert marker["failed"] == []  # the clean retry overwrote the marker
    assert [d["resumed"] for d in marker["classified"]] == [True, False]


def test_batch_merge_refuses_markers_of_another_model(
    mosaic: tuple[Path, list], model: OnnxClassifier, retrained: OnnxClassifier, tmp_path: Path
) -> None:
    """Regression: an earlier run's marker on the same volume was merged with this run's."""
    out, slides = tmp_path / "out", [mosaic[0]]
    for index in range(2):
        classify_slides(slides, model, out, SlideSettings(shard=(index, 2)), progress=False)
    # the next run, with a retrained model: shard 0 is done, shard 1's marker is the old run's
    classify_slides(slides, retrained, out, SlideSettings(shard=(0, 2)), progress=False)
    marker = json.loads((out / ".shards" / "0-of-2.done").read_text())
    assert marker["model_sha256"] == retrained.card["sha256"]
    with pytest.raises(HistoliteError, match="different models") as refused:
        merge_batch(out, 2, wait_s=0.2, poll_s=0.05, progress=False)
    message = str(refused.value)
    assert f"0-of-2.done by {model.card['name']}" in message and "1-of-2.done" in message
    assert retrained.card["sha256"][:12] in message and model.card["sha256"][:12] in message
    assert not (out / "mosaic" / "tiles.csv").exists()
    # within the wait, shard 1 rewrites its marker: the merge goes on, with one model
    late = threading.Timer(
        0.3,
        classify_slides,
        (slides, retrained, out, SlideSettings(shard=(1, 2))),
        {"progress": False},
    )
    late.start()
    try:
        batch = merge_batch(out, 2, wait_s=60, poll_s=0.05, progress=False)
    finally:
        late.join()
    assert batch["failed"] == [] and len(batch["classified"]) == 1
    merged = json.loads((out / "mosaic" / "summary.json").read_text())
    assert merged["model_sha256"] == retrained.card["sha256"]


def test_batch_merge_with_model_waits_for_stale_markers_of_one_model(
    mosaic: tuple[Path, list],
    model: OnnxClassifier,
    retrained: OnnxClassifier,
    tmp_path: Path,
    run_cli: Callable[[list[str]], tuple[int, str, str]],
) -> None:
    """Regression: rerun on the same volume after re-exporting a retrained model, the merge
    found the earlier run's N markers (all of one model, no failures) and merged them at once."""
    out, slides = tmp_path / "out", [mosaic[0]]
    for index in range(2):
        classify_slides(slides, model, out, SlideSettings(shard=(index, 2)), progress=False)
    expected = model_identity(retrained)
    with pytest.raises(HistoliteError, match=r"shards \[0, 1\] of 2 have not finished") as stale:
        merge_batch(out, 2, wait_s=0.2, poll_s=0.05, progress=False, model=expected)
    assert "0-of-2.done by" in str(stale.value) and "1-of-2.done by" in str(stale.value)
    assert model.card["sha256"][:12] in str(stale.value)
    with pytest.raises(HistoliteError, match="made by"):  # the shard summaries likewise
        merge_shards(out / "mosaic", progress=False, model=expected)
    args = ["slide", "merge", str(out), "--shards", "2", "--no-progress"]
    code, _, err = run_cli([*args, "--model", str(retrained.model_dir)])
    assert code == 2 and "0-of-2.done" in err and "warning" not in err
    assert not (out / "mosaic" / "tiles.csv").exists()

    def rerun() -> None:  # this run's shards, with the retrained model
        for index in range(2):
            classify_slides(slides, retrained, out, SlideSettings(shard=(index, 2)), progress=False)

    late = threading.Timer(0.3, rerun)
    late.start()
    try:
        batch = merge_batch(out, 2, wait_s=60, poll_s=0.05, progress=False, model=expected)
    finally:
        late.join()
    assert batch["failed"] == [] and len(batch["classified"]) == 1
    merged = json.loads((out / "mosaic" / "summary.json").read_text())
    assert merged["model_sha256"] == retrained.card["sha256"]
    code, _, err = run_cli(args)  # without --model: merged as before, with a warning
    assert code == 0 and "warning: without --model" in err


def test_a_torn_shard_folder_is_not_merged(
    mosaic: tuple[Path, list], model: OnnxClassifier, tmp_path: Path
) -> None:
    """Regression: a merge between a rerun shard replacing tiles.csv and writing its
    summary.json took the new tiles under the old summary."""
    out, slides = tmp_path / "out", [mosaic[0]]
    for index in range(2):
        classify_slides(slides, model, out, SlideSettings(shard=(index, 2)), progress=False)
    shard = out / "mosaic" / "shards" / "1-of-2"
    classes = list(model.classes)
    rows = read_tiles_csv(shard / "tiles.csv", classes)
    first = rows[0]
    flipped = tuple(reversed(first.probabilities))  # another run's tiles.csv, newer
    torn = [dataclasses.replace(first, probabilities=flipped), *rows[1:]]
    write_tiles_csv(shard / "tiles.csv", torn, classes)
    with pytest.raises(HistoliteError, match=r"not the file its summary\.json describes"):
        merge_shards(out / "mosaic", progress=False, count=2)
    batch = merge_batch(out, 2, progress=False)
    assert batch["classified"] == [] and "1-of-2/tiles.csv" in batch["failed"][0]["error"]
    assert not (out / "mosaic" / "tiles.csv").exists()
    # the shard's rerun does not take the torn folder for finished: it redoes the slide
    redo = classify_slides(slides, model, out, SlideSettings(shard=(1, 2)), progress=False)
    assert [d["resumed"] for d in redo["classified"]] == [False]
    assert merge_batch(out, 2, progress=False)["failed"] == []
