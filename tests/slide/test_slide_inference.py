"""Whole-slide inference on mosaic slides with known tiles, the real SVS excerpt, bad files."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from histolite.errors import HistoliteError
from histolite.runtime.classifier import OnnxClassifier
from histolite.slide.inference import (
    SlideSettings,
    classify_slide,
    classify_slides,
    model_identity,
    require_tile_classifier,
)
from histolite.slide.merge import merge_batch, merge_shards
from histolite.slide.outputs import read_tiles_csv, write_tiles_csv
from histolite.slide.pyramid import write_pyramidal_tiff
from histolite.slide.reader import OpenSlideSlide, SlideError, TiffSlide, open_slide, read_region

SVS = Path(__file__).resolve().parents[3] / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
COLUMNS, ROWS = 6, 4


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "tiles.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_tiles_line_up_with_the_mosaic_and_match_direct_prediction(
    mosaic: tuple[Path, list], model: OnnxClassifier, tmp_path: Path
) -> None:
    path, truth = mosaic
    summary = classify_slide(path, model, tmp_path, SlideSettings(min_tissue=0.01), progress=False)
    assert summary["mpp"] == pytest.approx(0.25) and summary["tile_um"] == pytest.approx(16.0)
    assert summary["tile_px_level0"] == 64 and summary["tile_px_model"] == 32
    assert summary["device"] == model.device == "cpu"  # which device ran the model
    rows = _rows(tmp_path / "mosaic")
    assert rows and len(rows) == summary["tiles"]
    seen = set()
    for row in rows:
        x, y = int(row["x"]), int(row["y"])
        assert x % 64 == 0 and y % 64 == 0 and row["width"] == row["height"] == "64"
        cell = truth[y // 64][x // 64]
        assert cell is not None, "a glass cell was classified"
        _, pixels = cell
        expected = model.predict(pixels).probabilities
        got = np.array([float(row[f"prob_{c}"]) for c in model.classes])
        np.testing.assert_allclose(got, expected, atol=1e-5)  # same pixels, same model path
        seen.add((y // 64, x // 64))
    tissue_cells = {(r, c) for r in range(ROWS) for c in range(COLUMNS - 1)}
    # fat is glass-white between thin membranes: a saturation mask keeps little of it
    assert {truth[r][c][0] for r, c in tissue_cells - seen} <= {"adipose"}
    assert len(seen) >= 15
    correct = sum(
        row["label"] == truth[int(row["y"]) // 64][int(row["x"]) // 64][0] for row in rows
    )
    direct = sum(
        model.classes[int(np.argmax(model.predict(truth[r][c][1]).probabilities))] == truth[r][c][0]
        for r, c in seen
    )
    assert correct == direct  # the slide path is as accurate as the model on the tiles


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


def test_geojson_is_a_qupath_feature_collection(
    mosaic: tuple[Path, list], model: OnnxClassifier, tmp_path: Path
) -> None:
    path, _ = mosaic
    classify_slide(path, model, tmp_path, SlideSettings(min_tissue=0.01), progress=False)
    data = json.loads((tmp_path / "mosaic" / "mosaic.geojson").read_text())
    assert data["type"] == "FeatureCollection" and data["features"]
    rows = {r["index"]: r for r in _rows(tmp_path / "mosaic")}
    for feature in data["features"]:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        (ring,) = feature["geometry"]["coordinates"]
        assert len(ring) == 5 and ring[0] == ring[-1]
        props = feature["properties"]
        assert props["objectType"] == "tile"
        assert props["classification"]["name"] in model.classes
        colour = props["classification"]["color"]
        assert len(colour) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in colour)
        row = rows[feature["id"].removeprefix("tile-")]
        assert ring[0] == [int(row["x"]), int(row["y"])]
        assert props["classification"]["name"] == row["label"]
        probs = [props["measurements"][f"prob_{c}"] for c in model.classes]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)


def test_blank_slide_gives_a_summary_not_a_crash(model: OnnxClassifier, tmp_path: Path) -> None:
    blank = write_pyramidal_tiff(
        tmp_path / "blank.tif", np.full((512, 512, 3), 246, np.uint8), mpp=0.25, tile=64
    )
    summary = classify_slide(blank, model, tmp_path / "out", SlideSettings(), progress=False)
    assert summary["tiles"] == 0 and summary["tissue_area_mm2"] == 0
    assert "no tissue" in summary["note"]
    assert (tmp_path / "out" / "blank" / "heatmap.png").is_file()
    assert len(_rows(tmp_path / "out" / "blank")) == 0


def test_broken_and_unscaled_files_are_named(model: OnnxClassifier, tmp_path: Path) -> None:
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    with pytest.raises(SlideError, match=r"notes\.svs"):
        open_slide(text)
    truncated = tmp_path / "cut.svs"
    truncated.write_bytes(SVS.read_bytes()[:150_000] if SVS.is_file() else b"II*\x00" + b"\0" * 64)
    with pytest.raises(SlideError, match=r"cut\.svs"):
        slide = open_slide(truncated)
        read_region(slide, 0, 0, slide.info.width, 256)  # broken tiles fail when read
    no_mpp = tmp_path / "no_mpp.tif"
    import tifffile

    tifffile.imwrite(no_mpp, np.zeros((256, 256, 3), np.uint8), tile=(64, 64), photometric="rgb")
    with pytest.raises(SlideError, match="no usable microns per pixel; pass --mpp"):
        open_slide(no_mpp)
    assert open_slide(no_mpp, mpp=0.5).info.mpp == 0.5


def test_one_bad_slide_does_not_stop_the_batch(
    mosaic: tuple[Path, list],
    tmp_path: Path,
    model: OnnxClassifier,
    run_cli: Callable[[list[str]], tuple[int, str, str]],
) -> None:
    path, _ = mosaic
    bad = tmp_path / "bad.svs"
    bad.write_text("junk")
    code, out, err = run_cli(
        [
            "slide",
            "infer",
            str(bad),
            str(path),
            "--model",
            str(model.model_dir),
            "--out",
            str(tmp_path / "out"),
            "--min-tissue",
            "0.01",
            "--no-progress",
        ]
    )
    assert code == 1
    assert "FAILED" in err and "bad.svs" in err
    assert "mosaic.tif:" in out and (tmp_path / "out" / "mosaic" / "tiles.csv").is_file()
    batch = json.loads((tmp_path / "out" / "batch_summary.json").read_text())
    assert [f["slide"] for f in batch["failed"]] == [str(bad)]
    assert [d["slide"] for d in batch["classified"]] == [str(path)]


@pytest.mark.skipif(not SVS.is_file(), reason="CMU-1-Small-Region.svs not present")
def test_real_svs_excerpt(tmp_path: Path, model: OnnxClassifier) -> None:
    slide = open_slide(SVS)
    assert slide.info.mpp == pytest.approx(0.499)
    # the Label, Macro and Thumbnail pages are not the slide: both readers see the baseline
    assert (slide.info.width, slide.info.height) == (2220, 2967)
    tiff = TiffSlide(SVS)
    assert (tiff.info.width, tiff.info.height, tiff.info.mpp) == (2220, 2967, 0.499)
    region = slide.read_level(0, 600, 900, 256, 256)
    np.testing.assert_array_equal(region, tiff.read_level(0, 600, 900, 256, 256))
    assert isinstance(slide, OpenSlideSlide)
    summary = classify_slide(SVS, model, tmp_path, SlideSettings(), progress=False)
    area_mm2 = 2220 * 2967 * 0.499**2 / 1e6
    # a tissue strip with glass around it (checked by eye): a quarter to a half of the area
    assert 0.2 * area_mm2 < summary["tissue_area_mm2"] < 0.5 * area_mm2
    assert summary["tiles"] > 0 and summary["tile_px_level0"] == round(16 / 0.499)


@pytest.mark.parametrize("compression", ["zlib", "jpeg"])
def test_pyramidal_tiff_reads_back_as_a_slide(compression: str, tmp_path: Path) -> None:
    y, x = np.mgrid[0:300, 0:520]
    level0 = np.stack([x * 255 // 519, y * 255 // 299, (x + y) % 256], axis=-1).astype(np.uint8)
    path = write_pyramidal_tiff(
        tmp_path / "s.tif", level0, mpp=0.5, levels=3, tile=128, compression=compression
    )
    assert [p.name for p in tmp_path.iterdir()] == ["s.tif"]  # no temporary left behind
    slide = open_slide(path)
    try:
        info = slide.info
        assert (info.width, info.height) == (520, 300) and info.mpp == pytest.approx(0.5)
        back = slide.read_level(0, 0, 0, 520, 300)
        error = np.abs(back.astype(int) - level0).mean()
        assert error == 0 if compression == "zlib" else error < 3  # JPEG is lossy
    finally:
        slide.close()
    with pytest.raises(ValueError, match="uint8"):
        write_pyramidal_tiff(tmp_path / "f.tif", level0.astype(np.float32), mpp=0.5)
    assert not (tmp_path / "f.tif").exists()


def test_slides_sharing_a_stem_are_refused_before_any_work(
    mosaic: tuple[Path, list],
    tmp_path: Path,
    model: OnnxClassifier,
    run_cli: Callable[[list[str]], tuple[int, str, str]],
) -> None:
    path, _ = mosaic
    for folder, suffix in (("a", ".tif"), ("b", ".tiff")):
        (tmp_path / folder).mkdir()
        shutil.copy(path, tmp_path / folder / f"s1{suffix}")
    out = tmp_path / "out"
    args = ["slide", "infer", str(tmp_path / "a"), str(tmp_path / "b" / "s1.tiff")]
    code, _, err = run_cli([*args, "--model", str(model.model_dir), "--out", str(out)])
    assert code != 0
    assert str(tmp_path / "a" / "s1.tif") in err and str(tmp_path / "b" / "s1.tiff") in err
    assert "share the name 's1'" in err and not out.exists()  # nothing was written


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


def test_a_bag_model_is_refused_at_once(
    mosaic: tuple[Path, list],
    model: OnnxClassifier,
    tmp_path: Path,
    run_cli: Callable[[list[str]], tuple[int, str, str]],
) -> None:
    bag_model = tmp_path / "bag_model"
    shutil.copytree(model.model_dir, bag_model)
    card = json.loads((bag_model / "model.json").read_text())
    (bag_model / "model.json").write_text(json.dumps({**card, "kind": "mil"}))
    with pytest.raises(HistoliteError, match="bag"):
        require_tile_classifier(OnnxClassifier(bag_model))
    require_tile_classifier(model)  # a tile classifier passes
    out = tmp_path / "out"
    args = ["slide", "infer", str(mosaic[0]), "--model", str(bag_model), "--out", str(out)]
    code, _, err = run_cli(args)
    assert code == 2 and "slide features" in err and "slide predict" in err
    assert not out.exists()  # refused before any slide was opened


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
