"""Whole-slide inference on mosaic slides with known tiles, the real SVS excerpt, bad files."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from histolite.errors import HistoliteError
from histolite.runtime.classifier import OnnxClassifier
from histolite.slide.inference import (
    SlideSettings,
    classify_slide,
    require_tile_classifier,
)
from histolite.slide.pyramid import write_pyramidal_tiff
from histolite.slide.reader import OpenSlideSlide, SlideError, TiffSlide, open_slide, read_region
from histolite.slide.tiles import TileBudgetExceeded

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


def test_a_tile_budget_refuses_the_slide_before_any_tile_is_read(
    mosaic: tuple[Path, list], model: OnnxClassifier, tmp_path: Path
) -> None:
    """``max_tiles`` (a service's slide job budget) is checked while the grid is walked: a
    slide over it is refused by name with nothing written; one at it is classified."""
    path, _ = mosaic
    settings = SlideSettings(min_tissue=0.01)
    with pytest.raises(TileBudgetExceeded, match=r"mosaic\.tif: the slide has more than the 3 "):
        classify_slide(path, model, tmp_path / "over", settings, progress=False, max_tiles=3)
    assert not (tmp_path / "over").exists()
    summary = classify_slide(path, model, tmp_path / "all", settings, progress=False)
    assert summary["tiles"] > 3
    at = classify_slide(
        path, model, tmp_path / "at", settings, progress=False, max_tiles=summary["tiles"]
    )
    assert at["tiles"] == summary["tiles"]


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
