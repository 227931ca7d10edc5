"""`histolite slide evaluate`: hand-made predictions against hand-made annotations, every
number worked out by hand."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from histolite.errors import DataError
from histolite.fileio import file_sha256
from histolite.slide.evaluate import evaluate_slides
from histolite.slide.outputs import TileRow, write_tiles_csv

SIDE, TILE = 512, 64
CLASSES = ["A", "B"]
REGION_A = (0, 0, 256, 512)  # left half
REGION_B = (256, 0, 448, 256)


def _polygon(box: tuple[int, int, int, int], name: str) -> dict:
    x0, y0, x1, y1 = box
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"objectType": "annotation", "classification": {"name": name}},
    }


def _inferred(
    out: Path, stem: str, predict: Callable[[int], str], origin: tuple[int, int] = (0, 0)
) -> Path:
    """An OUT/<stem> folder as `slide infer` writes it: 8 x 8 tiles, class by column."""
    folder = out / stem
    folder.mkdir(parents=True)
    rows = [
        TileRow(
            index=r * 8 + c,
            x=c * TILE,
            y=r * TILE,
            size=TILE,
            tissue=1.0,
            probabilities=(0.9, 0.1) if predict(c * TILE) == "A" else (0.2, 0.8),
        )
        for r in range(8)
        for c in range(8)
    ]
    write_tiles_csv(folder / "tiles.csv", rows, CLASSES)
    summary = {
        "slide": f"/slides/{stem}.svs",
        "width": SIDE,
        "height": SIDE,
        "mpp": 0.5,
        "origin": list(origin),
        "classes": CLASSES,
        "tile_px_level0": TILE,
        "overlap": 0.0,
        "shard": {"index": 0, "count": 1},
        "timings_s": {"total": 1.0},
        "outputs_sha256": {"tiles.csv": file_sha256(folder / "tiles.csv")},
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def _notes(folder: Path, stem: str, names: tuple[str, str] = ("A", "B")) -> Path:
    folder.mkdir(exist_ok=True)
    features = [_polygon(REGION_A, names[0]), _polygon(REGION_B, names[1])]
    path = folder / f"{stem}.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _columns(x: int) -> str:
    return "A" if x < 192 or x >= 320 else "B"


def test_tile_metrics_and_dice_by_hand(tmp_path: Path) -> None:
    folder = _inferred(tmp_path / "infer", "s1", _columns)
    _notes(tmp_path / "notes", "s1")
    report = evaluate_slides([folder], tmp_path / "notes", tmp_path / "report")
    # truth: A = columns x 0..192 (32 tiles), B = x 256..384, rows 0..192 (12 tiles)
    # right: A at x < 192 (24), B at x = 256 (4); wrong: A at 192 (8), B at 320, 384 (8)
    assert report["n"] == 44
    assert report["accuracy"] == pytest.approx(28 / 44)
    assert report["balanced_accuracy"] == pytest.approx((24 / 32 + 4 / 12) / 2)
    assert report["confusion_matrix"] == [[24, 8], [8, 4]]
    # Dice A: 2 * 192*512 / ((192*512 + 128*256) + 256*512); Dice B: 2 * 64*256 / (2 * 192*256)
    assert report["dice"]["A"] == pytest.approx(0.75, abs=1e-4)
    assert report["dice"]["B"] == pytest.approx(1 / 3, abs=1e-4)
    # tiles not evaluated: outside every annotation (x = 448; x = 256..384 below row 256)
    assert report["excluded_tiles"] == {"outside": 8 + 12}
    assert [row["slide"] for row in report["slides"]] == ["s1"]
    for name in ("report.json", "classification_report.csv", "predictions.csv", "slides.csv"):
        assert (tmp_path / "report" / name).is_file()
    assert (tmp_path / "report" / "confusion_matrix.png").stat().st_size > 1000


def test_several_slides_pool_tiles_and_areas(tmp_path: Path, run_cli: Callable) -> None:
    perfect = _inferred(tmp_path / "infer", "s2", lambda x: "A" if x < 256 else "B")
    wrong = _inferred(tmp_path / "infer", "s1", _columns)
    for stem in ("s1", "s2"):
        _notes(tmp_path / "notes", stem, names=("Tumour", "Stroma"))
    code, out, err = run_cli(
        ["slide", "evaluate", str(wrong), str(perfect), "--annotations", str(tmp_path / "notes"),
         "--out", str(tmp_path / "report"), "--classes", "Tumour=A,Stroma=B"]
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    rows = {row["slide"]: row for row in report["slides"]}
    assert rows["s2"]["accuracy"] == 1.0 and rows["s2"]["dice"]["A"] == pytest.approx(1.0)
    assert rows["s1"]["accuracy"] == pytest.approx(28 / 44)
    assert report["n"] == 88 and report["accuracy"] == pytest.approx((28 + 44) / 88)
    # pooled Dice A: 2 * (98304 + 131072) / ((131072 + 131072) + (131072 + 131072))
    assert report["dice"]["A"] == pytest.approx(2 * 229376 / 524288, abs=1e-4)
    assert report["accuracy_ci95"]["unit"] == "slides" and "unreliable" in str(
        report["accuracy_ci95"]["warning"]
    )
    assert "88 tiles in 2 slide(s)" in out and "Dice: A" in out


def test_geojson_measured_from_level_0_on_a_bounded_slide(
    tmp_path: Path, run_cli: Callable
) -> None:
    """A slide whose OpenSlide bounds start 64 px in (MIRAX): QuPath's GeoJSON is measured
    from the bounds corner (the default adds 64); GeoJSON of the full level 0 must not be."""
    folder = _inferred(tmp_path / "infer", "s1", lambda x: "A" if x < 256 else "B", (64, 0))
    _notes(tmp_path / "notes", "s1")  # drawn in level-0 coordinates
    as_qupath = evaluate_slides([folder], tmp_path / "notes", tmp_path / "bounds")
    # read as QuPath's: A spans x 64..320, so the tiles at x = 256 are truth A, predicted B
    assert as_qupath["accuracy"] < 1.0
    code, _, err = run_cli(
        ["slide", "evaluate", str(folder), "--annotations", str(tmp_path / "notes"),
         "--out", str(tmp_path / "level0"), "--annotation-origin", "level0"]
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((tmp_path / "level0" / "report.json").read_text())
    assert report["accuracy"] == 1.0 and report["n"] == 32 + 12
    code, _, err = run_cli(
        ["slide", "evaluate", str(folder), "--annotations", str(tmp_path / "notes"),
         "--out", str(tmp_path / "typo"), "--annotation-origin", "level-0"]
    )  # fmt: skip
    assert code != 0 and "--annotation-origin 'level-0': expected one of bounds, level0" in err
    assert not (tmp_path / "typo").exists()


def test_annotation_class_not_in_the_model_is_refused(tmp_path: Path) -> None:
    folder = _inferred(tmp_path / "infer", "s1", _columns)
    _notes(tmp_path / "notes", "s1", names=("A", "Necrosis"))
    with pytest.raises(DataError, match=r"\['Necrosis'\] are not classes of the model"):
        evaluate_slides([folder], tmp_path / "notes", tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_a_shard_or_unfinished_folder_is_refused(tmp_path: Path) -> None:
    folder = _inferred(tmp_path / "infer", "s1", _columns)
    _notes(tmp_path / "notes", "s1")
    summary = json.loads((folder / "summary.json").read_text())
    summary["timings_s"] = {}
    (folder / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(DataError, match="not final"):
        evaluate_slides([folder], tmp_path / "notes", tmp_path / "report")


def test_tiles_not_the_ones_the_summary_records_are_refused(tmp_path: Path) -> None:
    """A crashed re-run leaves new tiles beside the old summary: scoring them would mix runs."""
    folder = _inferred(tmp_path / "infer", "s1", _columns)
    _notes(tmp_path / "notes", "s1")
    text = (folder / "tiles.csv").read_text()
    (folder / "tiles.csv").write_text(text.replace("0.9", "0.8", 1))
    with pytest.raises(DataError, match=r"s1/tiles\.csv: not the file summary\.json records"):
        evaluate_slides([folder], tmp_path / "notes", tmp_path / "report")
