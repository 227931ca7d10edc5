"""Kather splits keep a source image's tiles together, and refuse splits that lose a class."""

from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path

import pytest
from support import KATHER_CLASSES, make_kather

from histolite.config import DataConfig
from histolite.data.layouts import scan_dataset
from histolite.data.split_policy import load_split
from histolite.data.splits import LeakageWarning
from histolite.errors import DataError


@pytest.fixture(scope="module")
def kather_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_kather(tmp_path_factory.mktemp("kather"))


def _cfg(root: Path, **changes: object) -> DataConfig:
    base = DataConfig(dataset="kather2016", root=str(root), val_fraction=0.2, test_fraction=0.25)
    return base.model_copy(update=changes)


def test_groups_are_source_images_by_default(kather_root: Path) -> None:
    split = load_split(_cfg(kather_root, val_split_by="group_if_possible"), seed=0)
    groups = {s.group for s in split.all_samples}
    assert "CRC-Prim-HE-01_000" in groups and len(groups) == 7 * 4 + 2
    where: dict[str, set[str]] = defaultdict(set)
    for name, part in split.parts.items():
        for sample in part:
            where[sample.group].add(name)
    # the test split shares no source image with training; only 08_EMPTY's training image
    # gives validation tiles (it has two source images: one for training, one for test)
    test_groups = {g for g, names in where.items() if "test" in names}
    assert all(where[g] == {"test"} for g in test_groups)
    shared = sorted(g for g, names in where.items() if len(names) > 1)
    assert all(
        {s.class_name for s in split.all_samples if s.group == g} == {"08_EMPTY"} for g in shared
    )
    report = split.report
    assert report["group_kind"] == "source_image"
    assert report["group_description"] == "tiles cut from one source image"
    assert report["split_by"] == "group" and report["shared_groups"] == len(shared) <= 1
    for name in ("train", "val", "test"):
        per_class = report["splits"][name]["per_class"]  # type: ignore[index]
        assert all(per_class[c]["images"] > 0 for c in KATHER_CLASSES), name


def test_a_three_way_grouped_split_names_the_class_it_cannot_place(kather_root: Path) -> None:
    with pytest.raises(DataError, match=r"the val split has no images of 08_EMPTY \(2 group"):
        load_split(_cfg(kather_root), seed=0)
    # two parts are possible: every class in both
    split = load_split(_cfg(kather_root, val_fraction=0.0), seed=0)
    assert {s.class_name for s in split.parts["test"]} == set(KATHER_CLASSES)


def test_patient_grouping_and_tile_level_split_are_options(kather_root: Path) -> None:
    with pytest.raises(DataError, match="the val split is empty"):  # two patients, three parts
        load_split(_cfg(kather_root, group_by="patient", val_split_by="same"), seed=0)
    by_patient = load_split(_cfg(kather_root, group_by="patient", val_fraction=0.0), seed=0)
    assert {s.group for s in by_patient.all_samples} == {"CRC-Prim-HE-01", "CRC-Prim-HE-02"}
    assert by_patient.report["group_kind"] == "patient"
    tiles = load_split(_cfg(kather_root, split_by="stratified"), seed=0)
    assert tiles.report["split_by"] == "stratified"
    with pytest.raises(DataError, match="not a grouping of dataset 'kather2016'"):
        load_split(_cfg(kather_root, group_by="slide"), seed=0)


def test_original_tif_names_and_png_copies_give_the_same_groups(tmp_path: Path) -> None:
    root = make_kather(tmp_path / "tif", images_per_class=2, tiles_per_image=1)
    tif = scan_dataset("kather2016", root, group_regex=r"_(CRC-Prim-HE-[^.]+)\.tif")
    for sample in tif.samples:  # the developers' subset ships PNG copies with the same stems
        sample.path.rename(sample.path.with_suffix(".png"))
    png = scan_dataset("kather2016", root, group_regex=r"_(CRC-Prim-HE-[^.]+)\.tif")
    assert [s.group for s in tif.samples] == [s.group for s in png.samples]


def test_kather_names_read_as_a_plain_folder_warn_of_a_tile_split(kather_root: Path) -> None:
    with pytest.warns(LeakageWarning, match=r"carry a kather2016 source image"):
        split = load_split(_cfg(kather_root, dataset="folder"), seed=0)
    assert any("--dataset" in w for w in split.report["warnings"])
    with warnings.catch_warnings():  # asked for explicitly: no warning
        warnings.simplefilter("error", LeakageWarning)
        load_split(_cfg(kather_root, dataset="folder", split_by="stratified"), seed=0)
        load_split(_cfg(kather_root, val_split_by="group_if_possible"), seed=0)
