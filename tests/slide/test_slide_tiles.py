"""`histolite slide tiles`: annotated regions in, a tile dataset out, labels exactly as the
geometry says; splits by slide; bad input refused before anything is written."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from histolite.config import DataConfig
from histolite.data.split_policy import load_split
from histolite.errors import DataError, HistoliteWarning
from histolite.fileio import write_json_once
from histolite.slide.dataset import TileCutSettings, claim_folder, cut_tiles
from histolite.slide.layout import TileDataset
from histolite.slide.pyramid import write_pyramidal_tiff
from histolite.slide.reader import SlideError

SVS = Path(__file__).resolve().parents[3] / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
MPP = 0.5
TILE = 64  # level-0 pixels of a 32 um tile at 0.5 um/px
WIDTH, HEIGHT = 1024, 768
PINK = (200, 110, 160)  # saturated enough for the tissue mask
TISSUE = (0, 0, 768, 640)  # x0, y0, x1, y1 of the tissue block; glass elsewhere

# Rectangles (x0, y0, x1, y1), level-0 pixels. "tumour": a square with a hole, and a second
# square (one MultiPolygon); "stroma": a rectangle off the 64 px grid; a "Necrosis" square.
TUMOUR_A, TUMOUR_HOLE, TUMOUR_B = (0, 0, 256, 256), (64, 64, 128, 128), (512, 0, 768, 192)
STROMA = (32, 288, 416, 608)
NECROSIS = (432, 320, 560, 448)  # 16 px from the stroma: tiles between touch both


def _ring(box: tuple[int, int, int, int]) -> list[list[int]]:
    x0, y0, x1, y1 = box
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _feature(geometry: dict, name: str | None, kind: str = "annotation") -> dict:
    properties: dict = {"objectType": kind}
    if name is not None:
        properties["classification"] = {"name": name, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def _annotations() -> dict:
    tumour = {
        "type": "MultiPolygon",
        "coordinates": [[_ring(TUMOUR_A), _ring(TUMOUR_HOLE)[::-1]], [_ring(TUMOUR_B)]],
    }
    return {
        "type": "FeatureCollection",
        "features": [
            _feature(tumour, "Tumor"),
            _feature({"type": "Polygon", "coordinates": [_ring(STROMA)]}, "Stroma"),
            _feature({"type": "Polygon", "coordinates": [_ring(NECROSIS)]}, "Necrosis"),
            _feature({"type": "Polygon", "coordinates": [_ring((0, 0, 10, 10))]}, "Tumor", "cell"),
        ],
    }


def _raster(boxes: list[tuple[int, int, int, int]], minus=()) -> np.ndarray:  # type: ignore[no-untyped-def]
    mask = np.zeros((HEIGHT, WIDTH), bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    for x0, y0, x1, y1 in minus:
        mask[y0:y1, x0:x1] = False
    return mask


def _expected(min_coverage: float = 0.9) -> dict[tuple[int, int], str]:
    """The label of every grid tile, from pixel-exact rasters of the rectangles."""
    regions = {
        "Tumor": _raster([TUMOUR_A, TUMOUR_B], minus=[TUMOUR_HOLE]),
        "Stroma": _raster([STROMA]),
        "Necrosis": _raster([NECROSIS]),
    }
    labels = {}
    for y in range(0, HEIGHT - TILE + 1, TILE):
        for x in range(0, WIDTH - TILE + 1, TILE):
            cover = {n: m[y : y + TILE, x : x + TILE].mean() for n, m in regions.items()}
            hits = [n for n, f in cover.items() if f >= min_coverage]
            if len(hits) == 1:
                labels[(x, y)] = hits[0]
    return labels


@pytest.fixture(scope="module")
def annotated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A pyramidal TIFF (tissue block, glass around it) and its QuPath GeoJSON, by stem."""
    root = tmp_path_factory.mktemp("annotated")
    rng = np.random.default_rng(0)
    level0 = np.full((HEIGHT, WIDTH, 3), 245, np.uint8)
    x0, y0, x1, y1 = TISSUE
    noise = rng.integers(-20, 20, (y1 - y0, x1 - x0, 3))
    level0[y0:y1, x0:x1] = np.clip(np.array(PINK) + noise, 0, 255).astype(np.uint8)
    slides, notes = root / "slides", root / "annotations"
    notes.mkdir()
    write_pyramidal_tiff(slides / "case_a.tif", level0, MPP, levels=2, tile=128)
    (notes / "case_a.geojson").write_text(json.dumps(_annotations()))
    return slides / "case_a.tif", notes


def _rows(dataset: Path) -> list[dict[str, str]]:
    with (dataset / "tiles.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_tiles_and_labels_are_what_the_geometry_says(
    annotated: tuple[Path, Path], tmp_path: Path
) -> None:
    slide, notes = annotated
    settings = TileCutSettings(tile_um=32.0, tile_px=64, min_tissue=0.0)
    summary = cut_tiles([slide], notes, tmp_path / "ds", settings, progress=False)
    got = {(int(r["x"]), int(r["y"])): r["class"] for r in _rows(tmp_path / "ds")}
    assert got == _expected() and len(got) == summary["tiles"]
    # the hole's tiles and the tiles straddling the stroma rectangle's off-grid edges are out
    assert (64, 64) not in got and (0, 0) in got and (0, 320) not in got and (384, 320) not in got
    assert {r["class"] for r in _rows(tmp_path / "ds")} == {"Tumor", "Stroma", "Necrosis"}
    row = next(r for r in _rows(tmp_path / "ds") if r["class"] == "Stroma")
    assert row["slide"] == "case_a" and float(row["mpp"]) == MPP and float(row["tile_mpp"]) == 0.5
    assert float(row["coverage"]) >= 0.9 and row["width"] == row["height"] == str(TILE)
    tile = np.asarray(Image.open(tmp_path / "ds" / row["path"]))
    level0 = tifffile.imread(slide, level=0)
    x, y = int(row["x"]), int(row["y"])
    assert np.array_equal(tile, level0[y : y + TILE, x : x + TILE])  # saved at native size
    assert Path(row["path"]).name == f"case_a_x{x}_y{y}.png"
    per_slide = summary["slides"]["case_a"]
    assert per_slide["annotations"]["skipped"] == {"cell": 1}
    assert per_slide["dropped"]["partial"] > 0 and per_slide["dropped"]["mixed"] > 0
    assert summary["per_class"] == {
        name: sum(1 for v in _expected().values() if v == name)
        for name in ("Necrosis", "Stroma", "Tumor")
    }


def test_background_classes_cap_and_tissue_filter(
    annotated: tuple[Path, Path], tmp_path: Path
) -> None:
    slide, notes = annotated
    settings = TileCutSettings(
        tile_um=32.0,
        tile_px=32,
        classes=(("Tumor", "tumour"), ("Stroma", "stroma")),
        background="other",
        max_per_class_per_slide=5,
        seed=3,
    )
    summary = cut_tiles([slide], notes, tmp_path / "ds", settings, progress=False)
    rows = _rows(tmp_path / "ds")
    assert summary["per_class"] == {"other": 5, "stroma": 5, "tumour": 5}
    expected = _expected()
    for row in rows:
        x, y = int(row["x"]), int(row["y"])
        if row["class"] == "other":  # tissue, touched by no annotation (Necrosis included)
            assert (x, y) not in expected and x + TILE <= TISSUE[2] and y + TILE <= TISSUE[3]
            assert not any(
                x < b[2] and x + TILE > b[0] and y < b[3] and y + TILE > b[1]
                for b in (TUMOUR_A, TUMOUR_B, STROMA, NECROSIS)
            )
        else:
            assert expected[(x, y)] == {"tumour": "Tumor", "stroma": "Stroma"}[row["class"]]
        assert Image.open(tmp_path / "ds" / row["path"]).size == (32, 32)
    dropped = summary["slides"]["case_a"]["dropped"]
    assert dropped["unselected class"] == sum(1 for v in expected.values() if v == "Necrosis")
    assert dropped["over the per-slide cap"] > 0
    # the same draw again: the cap is seeded
    again = cut_tiles([slide], notes, tmp_path / "again", settings, progress=False)
    assert [r["path"] for r in _rows(tmp_path / "again")] == [r["path"] for r in rows]
    assert again["per_class"] == summary["per_class"]
    # two shards: the same tiles, and each drop (the cap's included) counted by one shard
    for index in (0, 1):
        shard = replace(settings, shard=(index, 2))
        halves = cut_tiles([slide], notes, tmp_path / "sharded", shard, progress=False)
    assert [r["path"] for r in _rows(tmp_path / "sharded")] == [r["path"] for r in rows]
    assert halves["dropped"] == summary["dropped"]


def test_a_tissue_threshold_drops_annotated_glass(
    annotated: tuple[Path, Path], tmp_path: Path
) -> None:
    """Annotated tiles are kept as annotated unless --min-tissue asks for tissue."""
    slide, _ = annotated
    glass = (768, 640, 1024, 768)  # outside the tissue block: 4 x 2 tiles of bare glass
    notes = _write(
        tmp_path / "case_a.geojson",
        [_feature({"type": "Polygon", "coordinates": [_ring(glass)]}, "Tumor")],
    )
    kept = cut_tiles(
        [slide], notes, tmp_path / "kept", TileCutSettings(tile_um=32.0, tile_px=64), progress=False
    )
    assert kept["tiles"] == 8
    strict = TileCutSettings(tile_um=32.0, tile_px=64, min_tissue=0.5)
    dropped = cut_tiles([slide], notes, tmp_path / "strict", strict, progress=False)
    # the 12 x 10 tiles of the tissue block lie outside every annotation (no --background)
    assert dropped["tiles"] == 0 and dropped["dropped"] == {"no tissue": 8, "outside": 120}


def test_shards_resume_and_settings_guard(
    annotated: tuple[Path, Path], tmp_path: Path, run_cli: Callable
) -> None:
    slide, notes = annotated
    whole = tmp_path / "whole"
    code, _, err = run_cli(
        ["slide", "tiles", str(slide), "--annotations", str(notes), "--tile-um", "32",
         "--min-tissue", "0", "--out", str(whole), "--no-progress"]
    )  # fmt: skip
    assert code == 0, err
    sharded = tmp_path / "sharded"
    shard_dropped: Counter[str] = Counter()
    for index in (0, 1):
        code, out, err = run_cli(
            ["slide", "tiles", str(slide), "--annotations", str(notes), "--tile-um", "32",
             "--min-tissue", "0", "--out", str(sharded), "--shard", f"{index}/2", "--no-progress"]
        )  # fmt: skip
        assert code == 0, err
        # after the first shard the listing is partial, and says so; the second completes it
        assert ("1 slide(s) not finished" in err) == (index == 0)
        # each shard's line counts its own boxes' drops, not the whole slide's
        line = next(x for x in out.splitlines() if x.startswith("case_a:"))
        counts = line.partition("; dropped ")[2]
        shard_dropped.update({why: int(n) for n, why in re.findall(r"(\d+) ([a-z ]+)", counts)})
    assert sorted(r["path"] for r in _rows(sharded)) == sorted(r["path"] for r in _rows(whole))
    # the dropped counts add up over the shards to the unsharded ones (they were N times them)
    whole_summary = json.loads((whole / "summary.json").read_text())
    sharded_summary = json.loads((sharded / "summary.json").read_text())
    assert whole_summary["dropped"] and whole_summary["dropped"]["partial"] > 0
    assert sharded_summary["dropped"] == whole_summary["dropped"]
    assert sharded_summary["slides"]["case_a"]["dropped"] == whole_summary["dropped"]
    assert dict(shard_dropped) == whole_summary["dropped"]
    # a rerun finds every slide done and rewrites nothing
    tile = sharded / _rows(sharded)[0]["path"]
    before = tile.stat().st_mtime_ns
    code, out, _ = run_cli(
        ["slide", "tiles", str(slide), "--annotations", str(notes), "--tile-um", "32",
         "--min-tissue", "0", "--out", str(sharded), "--shard", "1/2", "--no-progress"]
    )  # fmt: skip
    assert code == 0 and "done earlier" in out and tile.stat().st_mtime_ns == before
    # other settings into the same folder: refused, nothing mixed in
    code, _, err = run_cli(
        ["slide", "tiles", str(slide), "--annotations", str(notes), "--tile-um", "48",
         "--out", str(whole), "--no-progress"]
    )  # fmt: skip
    assert code != 0 and "other settings" in err and "tile_um" in err


def test_edited_annotations_recut_and_a_same_named_slide_is_refused(
    annotated: tuple[Path, Path], tmp_path: Path
) -> None:
    """Resume once matched slides by name only: edits were ignored and old labels stayed."""
    slide, notes = annotated
    settings = TileCutSettings(tile_um=32.0, tile_px=64, min_tissue=0.0)
    out = tmp_path / "ds"
    cut_tiles([slide], notes, out, settings, progress=False)
    first = {r["path"]: r["class"] for r in _rows(out)}
    assert "Necrosis" in first.values()
    # the pathologist relabels necrosis as tumour
    edited = tmp_path / "edited"
    edited.mkdir()
    collection = _annotations()
    for feature in collection["features"]:
        if feature["properties"].get("classification", {}).get("name") == "Necrosis":
            feature["properties"]["classification"]["name"] = "Tumor"
    (edited / "case_a.geojson").write_text(json.dumps(collection))
    with pytest.warns(HistoliteWarning, match="annotations changed.*deleted and it is cut again"):
        summary = cut_tiles([slide], edited, out, settings, progress=False)
    second = {r["path"]: r["class"] for r in _rows(out)}
    assert "Necrosis" not in second.values() and summary["tiles"] == len(second)
    on_disk = {p.relative_to(out).as_posix() for p in out.glob("*/*.png")}
    assert on_disk == set(second)  # no necrosis tile left for `train` to read
    # another slide with the same name (other pixels, other size) into the same folder
    other = tmp_path / "site_b" / "case_a.tif"
    level0 = np.full((HEIGHT, WIDTH, 3), 245, np.uint8)
    level0[: HEIGHT // 2, : WIDTH // 2] = PINK
    write_pyramidal_tiff(other, level0, MPP, levels=1, tile=128)
    with pytest.raises(DataError, match=r"slide named 'case_a' cut from .*another slide"):
        cut_tiles([other], edited, out, settings, progress=False)
    assert {p.relative_to(out).as_posix() for p in out.glob("*/*.png")} == on_disk


def test_shards_started_together_on_a_fresh_folder_agree_on_its_settings(
    annotated: tuple[Path, Path], tmp_path: Path
) -> None:
    """A shard that found ".progress" just made by its twin refused the folder as foreign; and
    two runs that both found it fresh could each record their own settings."""
    slide, notes = annotated
    out = tmp_path / "ds"
    (out / ".progress").mkdir(parents=True)  # shard 0/2 has begun its record, nothing more
    settings = TileCutSettings(tile_um=32.0, tile_px=64, min_tissue=0.0)
    cut_tiles([slide], notes, out, replace(settings, shard=(1, 2)), progress=False)
    recorded = json.loads((out / ".progress" / "settings.json").read_text())
    assert recorded == settings.fingerprint()
    # a run with other settings that got past the fresh-folder check at the same moment
    other = replace(settings, tile_um=48.0)
    with pytest.raises(DataError, match=r"other settings \(tile_um differ"):
        claim_folder(TileDataset(out), other)
    assert json.loads((out / ".progress" / "settings.json").read_text()) == recorded
    # anything besides ".progress" is still another program's folder
    foreign = tmp_path / "foreign"
    (foreign / ".progress").mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a tile dataset"):
        cut_tiles([slide], notes, foreign, settings, progress=False)


def test_the_annotation_origin_is_part_of_the_settings_and_old_folders_resume(
    annotated: tuple[Path, Path], tmp_path: Path
) -> None:
    settings = TileCutSettings(tile_um=32.0, tile_px=64, min_tissue=0.0)
    # folders cut before the choice existed recorded no key: the default must still match them
    assert "annotation_origin" not in settings.fingerprint()
    level0 = replace(settings, annotation_origin="level0")
    assert level0.fingerprint()["annotation_origin"] == "level0"
    with pytest.raises(DataError, match="--annotation-origin 'qupath': expected one of"):
        replace(settings, annotation_origin="qupath")
    slide, notes = annotated
    for first, second in ((settings, level0), (level0, settings)):
        out = tmp_path / f"ds_{first.annotation_origin}"
        cut_tiles([slide], notes, out, first, progress=False)  # no bounds: both cut alike
        with pytest.raises(DataError, match=r"other settings \(annotation_origin differ"):
            cut_tiles([slide], notes, out, second, progress=False)


def test_write_json_once_keeps_the_first_record(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "record.json"
    assert write_json_once(target, {"a": 1}) == {"a": 1}
    assert write_json_once(target, {"a": 2}) == {"a": 1}  # the winner's, unchanged
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["record.json"]  # no temporary left


def test_the_listing_keeps_slides_cut_by_earlier_runs(
    annotated: tuple[Path, Path], tmp_path: Path
) -> None:
    slide, notes = annotated
    second = tmp_path / "slides" / "case_b.tif"
    second.parent.mkdir()
    second.write_bytes(slide.read_bytes())
    (notes_b := tmp_path / "notes").mkdir()
    (notes_b / "case_b.geojson").write_text((notes / "case_a.geojson").read_text())
    settings = TileCutSettings(tile_um=32.0, tile_px=64, min_tissue=0.0)
    out = tmp_path / "ds"
    first = cut_tiles([slide], notes, out, settings, progress=False)
    summary = cut_tiles([second], notes_b, out, settings, progress=False)
    assert sorted(summary["slides"]) == ["case_a", "case_b"]
    assert summary["tiles"] == 2 * first["tiles"] == len(list(out.glob("*/*.png")))
    assert Counter(r["slide"] for r in _rows(out)) == {
        "case_a": first["tiles"],
        "case_b": first["tiles"],
    }


def test_first_shard_alone_lists_the_slide_as_pending(
    annotated: tuple[Path, Path], tmp_path: Path
) -> None:
    slide, notes = annotated
    settings = TileCutSettings(tile_um=32.0, tile_px=64, min_tissue=0.0, shard=(0, 2))
    summary = cut_tiles([slide], notes, tmp_path / "ds", settings, progress=False)
    assert summary["pending_slides"] == ["case_a"] and summary["tiles"] == 0
    assert "not finished" in summary["note"]


def _write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("notes", "message"),
    [
        ("{not json", "not valid JSON"),
        ({"type": "FeatureCollection", "features": [_feature(
            {"type": "Polygon", "coordinates": [_ring((5000, 5000, 6000, 6000))]}, "Tumor")]},
         "entirely outside"),
        ({"type": "FeatureCollection", "features": [_feature(
            {"type": "Polygon", "coordinates": [_ring((0, 0, 64, 64))]}, "Tumor: Positive")]},
         "cannot be a folder name"),
    ],
)  # fmt: skip
def test_bad_annotations_are_refused_before_any_tile(
    annotated: tuple[Path, Path], tmp_path: Path, notes: object, message: str
) -> None:
    slide, _ = annotated
    folder = tmp_path / "notes"
    _write(folder / "case_a.geojson", notes)
    out = tmp_path / "ds"
    with pytest.raises(DataError, match=message) as caught:
        cut_tiles([slide], folder, out, TileCutSettings(tile_um=32.0, tile_px=64), progress=False)
    assert "case_a.geojson" in str(caught.value)
    assert not out.exists()


def test_unmatched_files_missing_annotations_and_missing_mpp(
    annotated: tuple[Path, Path], tmp_path: Path
) -> None:
    slide, notes = annotated
    settings = TileCutSettings(tile_um=32.0, tile_px=64)
    stray = tmp_path / "notes"
    _write(stray / "case_a.geojson", _annotations())
    _write(stray / "case_b.geojson", _annotations())
    with pytest.raises(DataError, match=r"case_b\.geojson match no slide"):
        cut_tiles([slide], stray, tmp_path / "ds", settings, progress=False)
    with pytest.raises(DataError, match=r"no annotation file for slide case_a\.tif"):
        cut_tiles([slide], tmp_path, tmp_path / "ds", settings, progress=False)
    bare = tmp_path / "bare" / "case_a.tif"
    bare.parent.mkdir()
    tifffile.imwrite(bare, np.full((256, 256, 3), 200, np.uint8), tile=(128, 128))
    with pytest.raises(SlideError, match="microns per pixel"):
        cut_tiles([bare], notes / "case_a.geojson", tmp_path / "ds", settings, progress=False)
    with pytest.raises(DataError, match=r"--classes: \['Tumour'\] in no annotation file"):
        cut_tiles(
            [slide],
            notes,
            tmp_path / "ds",
            TileCutSettings(tile_um=32.0, tile_px=64, classes=(("Tumour", "t"),)),
            progress=False,
        )
    assert not (tmp_path / "ds").exists()


def test_a_tile_dataset_is_split_by_slide(annotated: tuple[Path, Path], tmp_path: Path) -> None:
    """Four slides (copies of one, new stems): whole slides per split, patients optional."""
    slide, _ = annotated
    slides, folder = [], tmp_path / "notes"
    for stem in ("s1", "s2", "s3", "s4"):
        copy = tmp_path / "slides" / f"{stem}.tif"
        copy.parent.mkdir(exist_ok=True)
        copy.write_bytes(slide.read_bytes())
        _write(folder / f"{stem}.geojson", _annotations())
        slides.append(copy)
    settings = TileCutSettings(tile_um=32.0, tile_px=32, min_tissue=0.0)
    cut_tiles(slides, folder, tmp_path / "ds", settings, progress=False)
    cfg = DataConfig(root=str(tmp_path / "ds"), val_fraction=0.25, test_fraction=0.25)
    split = load_split(cfg, seed=0)
    by_split = {name: {s.group for s in part} for name, part in split.parts.items()}
    assert split.report["group_kind"] == "slide" and split.report["shared_groups"] == 0
    assert [len(by_split[name]) for name in ("train", "val", "test")] == [2, 1, 1]
    assert set().union(*by_split.values()) == {"s1", "s2", "s3", "s4"}
    listed = split.report["splits"]["test"]["slide_names"]  # type: ignore[index]
    assert listed == sorted(by_split["test"])
    patients = _write(tmp_path / "patients.csv", "slide,patient\ns1,p1\ns2,p1\ns3,p2\ns4,p3\n")
    cfg = DataConfig(
        root=str(tmp_path / "ds"), val_fraction=0.3, test_fraction=0.3, patients=str(patients)
    )
    split = load_split(cfg, seed=0)
    assert split.report["group_kind"] == "patient" and split.report["shared_groups"] == 0
    where = {s.meta["slide"]: name for name, part in split.parts.items() for s in part}
    assert where["s1"] == where["s2"]  # one patient, one split
    missing = _write(tmp_path / "partial.csv", "slide,patient\ns1,p1\n")
    with pytest.raises(DataError, match="no patient for 3 slide"):
        load_split(DataConfig(root=str(tmp_path / "ds"), patients=str(missing)), seed=0)


@pytest.mark.skipif(not SVS.is_file(), reason="CMU-1-Small-Region.svs not present")
def test_real_svs_excerpt_with_a_polygon(tmp_path: Path) -> None:
    """A triangle on the real Aperio excerpt: tiles whose box it covers >= 90%, exactly."""
    import shapely

    triangle = [[200, 300], [1800, 400], [600, 2600], [200, 300]]
    notes = _write(
        tmp_path / "CMU-1-Small-Region.geojson",
        [_feature({"type": "Polygon", "coordinates": [triangle]}, "tissue")],  # bare array
    )
    settings = TileCutSettings(tile_um=64.0, tile_px=64, min_tissue=0.0)
    summary = cut_tiles([SVS], notes, tmp_path / "ds", settings, progress=False)
    side = round(64.0 / 0.499)  # 128 level-0 pixels
    polygon = shapely.Polygon(triangle)
    expected = {
        (x, y)
        for y in range(0, 2967 - side + 1, side)
        for x in range(0, 2220 - side + 1, side)
        if polygon.intersection(shapely.box(x, y, x + side, y + side)).area >= 0.9 * side**2
    }
    got = {(int(r["x"]), int(r["y"])) for r in _rows(tmp_path / "ds")}
    assert got == expected and summary["tiles"] == len(expected) > 20
    assert {r["width"] for r in _rows(tmp_path / "ds")} == {str(side)}


def test_the_recipe_trains_on_a_tile_dataset_at_its_recorded_mpp(
    annotated: tuple[Path, Path], tmp_path: Path, repo_root: Path
) -> None:
    """The shipped recipe's data section on a slide tile dataset: split by slide, data.mpp
    from tiles.csv (so the exported card tiles new slides at the same physical size)."""
    import yaml
    from support import write_config

    from histolite.runspec import RunSpec
    from histolite.train import resolve_config, train_run

    slide, _ = annotated
    slides, folder = [], tmp_path / "notes"
    for stem in ("s1", "s2", "s3"):
        copy = tmp_path / "slides" / f"{stem}.tif"
        copy.parent.mkdir(exist_ok=True)
        copy.write_bytes(slide.read_bytes())
        _write(folder / f"{stem}.geojson", _annotations())
        slides.append(copy)
    cut_tiles(
        slides, folder, tmp_path / "ds", TileCutSettings(tile_um=32.0, tile_px=32), progress=False
    )
    recipe = yaml.safe_load((repo_root / "configs" / "slide_tiles_student.yaml").read_text())
    data = {k: recipe["data"][k] for k in ("dataset", "split_by")}
    config = write_config(
        tmp_path / "cfg.yaml",
        tmp_path / "ds",
        data={**data, "val_fraction": 0.34, "val_split_by": "same"},
    )
    cfg = resolve_config(config, [], tmp_path / "run", resume=False)
    run = train_run(cfg, tmp_path / "run", progress=False)
    spec = RunSpec.load(run)
    assert spec.mpp == pytest.approx(1.0)  # 32 um tiles saved at 32 px
    report = json.loads((run / "split_report.json").read_text())
    assert report["group_kind"] == "slide" and report["shared_groups"] == 0
    assert sorted(
        report["splits"]["train"]["slide_names"] + report["splits"]["val"]["slide_names"]
    ) == [
        "s1",
        "s2",
        "s3",
    ]
