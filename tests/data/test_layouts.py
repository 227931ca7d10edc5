"""Public dataset layouts: labels, patients and magnifications parsed from exact file names."""

from __future__ import annotations

import dataclasses
import io
import shutil
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import BREAKHIS_PATIENTS, make_bach, make_breakhis, make_idc, make_nct
from typer.testing import CliRunner

from histolite.cli import app
from histolite.config import DataConfig
from histolite.data.layouts import parse_breakhis_name, scan_dataset
from histolite.data.registry import download_dataset, file_digests, get_dataset, safe_extract
from histolite.data.split_policy import load_split
from histolite.data.splits import LeakageWarning
from histolite.errors import DataError


@pytest.fixture(scope="module")
def breakhis_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_breakhis(tmp_path_factory.mktemp("breakhis"))


def test_breakhis_name_parses_every_field() -> None:
    meta = parse_breakhis_name(Path("SOB_B_TA-14-3411F-200-007.png"))
    assert meta == {
        "tumour": "benign",
        "subtype": "tubular_adenoma",
        "patient": "14-3411F",
        "magnification": "200",
        "seq": "007",
    }


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("SOB_B_DC-14-2523-40-001.png", "does not belong"),  # ductal carcinoma is malignant
        ("SOB_M_DC-14-2523-50-001.png", "not a BreakHis file name"),  # no 50X
        ("SOB_M_DC-14-2523-40-1.png", "not a BreakHis file name"),
    ],
)
def test_breakhis_bad_names_are_refused(name: str, why: str) -> None:
    with pytest.raises(DataError, match=why):
        parse_breakhis_name(Path(name))


def test_breakhis_binary_labels_patients_and_magnifications(breakhis_root: Path) -> None:
    images = scan_dataset("breakhis", breakhis_root)
    assert images.classes == ("benign", "malignant")
    assert len(images.samples) == len(BREAKHIS_PATIENTS) * 4 * 2
    benign_patients = {f"{y}-{p}" for t, _, p, y in BREAKHIS_PATIENTS if t == "B"}
    for sample in images.samples:
        assert sample.class_name == ("benign" if sample.group in benign_patients else "malignant")
        assert sample.meta["magnification"] in {"40", "100", "200", "400"}
        assert sample.path.name.split("-")[3] == sample.meta["magnification"]
    # patient 13412 is filed under two subtypes but is one patient
    assert len({s.group for s in images.samples}) == len(BREAKHIS_PATIENTS) - 1


def test_breakhis_magnification_filter_and_subtype_labels(breakhis_root: Path) -> None:
    images = scan_dataset("breakhis", breakhis_root, labels="subtype", magnification=200)
    assert len(images.classes) == 8
    assert {s.meta["magnification"] for s in images.samples} == {"200"}
    assert len(images.samples) == len(BREAKHIS_PATIENTS) * 2
    by_name = {s.path.name: s.class_name for s in images.samples}
    assert by_name["SOB_M_LC-14-13412-200-001.png"] == "lobular_carcinoma"
    assert by_name["SOB_B_PT-14-21998AB-200-002.png"] == "phyllodes_tumor"


def test_breakhis_stray_file_is_named(tmp_path: Path) -> None:
    root = make_breakhis(tmp_path, images_per_magnification=1)
    stray = next(root.rglob("*.png")).with_name("scan_0001.png")
    stray.write_bytes(b"")
    with pytest.raises(DataError, match=r"scan_0001\.png: not a BreakHis file name"):
        scan_dataset("breakhis", root)


def test_idc_patients_coordinates_and_labels(tmp_path: Path) -> None:
    root = make_idc(tmp_path)
    images = scan_dataset("idc", root)
    assert images.classes == ("non_idc", "idc")
    assert {s.group for s in images.samples} == {"10253", "8863", "12868"}
    for sample in images.samples:
        assert sample.path.parent.name == str(sample.label)
        assert sample.path.name == (
            f"{sample.group}_idx5_x{sample.meta['x']}_y{sample.meta['y']}_class{sample.label}.png"
        )
    assert sorted(int(s.meta["x"]) for s in images.samples if s.group == "8863")[:2] == [1001, 1001]


def test_idc_file_in_the_wrong_folder_is_refused(tmp_path: Path) -> None:
    root = make_idc(tmp_path, patients=("10253",))
    patch = next((root / "IDC_regular_ps50_idx5" / "10253" / "1").glob("*.png"))
    patch.rename(patch.parent.parent / "0" / patch.name)
    with pytest.raises(DataError, match="name says patient 10253, class 1"):
        scan_dataset("idc", root)


def test_bach_classes_in_paper_order(tmp_path: Path) -> None:
    images = scan_dataset("bach2018", make_bach(tmp_path))
    assert images.classes == ("Normal", "Benign", "InSitu", "Invasive")
    assert [s.class_name for s in images.samples] == [c for c in images.classes for _ in range(2)]
    assert {s.path.suffix for s in images.samples} == {".tif"}
    assert len({s.group for s in images.samples}) == 8  # no patient ids: one group per photo


def test_bach_missing_class_folder(tmp_path: Path) -> None:
    root = make_bach(tmp_path)
    photos = root / "ICIAR2018_BACH_Challenge" / "Photos"
    for f in (photos / "InSitu").iterdir():
        f.unlink()
    (photos / "InSitu").rmdir()
    with pytest.raises(DataError, match="BACH layout not found"):
        scan_dataset("bach2018", root)


@pytest.mark.parametrize("name", ["nct_crc_he_100k", "crc_val_he_7k"])
def test_nct_crc_tiles(tmp_path: Path, name: str) -> None:
    folder = "NCT-CRC-HE-100K" if name == "nct_crc_he_100k" else "CRC-VAL-HE-7K"
    images = scan_dataset(name, make_nct(tmp_path, folder))
    assert images.classes == get_dataset(name).classes
    assert len(images.samples) == 18


def test_nct_unknown_class_folder(tmp_path: Path) -> None:
    root = make_nct(tmp_path)
    (root / "NCT-CRC-HE-100K" / "TUM").rename(root / "NCT-CRC-HE-100K" / "TUMOUR")
    with pytest.raises(DataError, match=r"\['TUMOUR'\] are not classes of nct_crc_he_100k"):
        scan_dataset("nct_crc_he_100k", root)


def test_label_scheme_must_be_offered(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not offered by dataset 'idc'"):
        scan_dataset("idc", make_idc(tmp_path), labels="subtype")


def _breakhis_config(root: Path, **changes: object) -> DataConfig:
    base = DataConfig(dataset="breakhis", root=str(root), val_fraction=0.2, test_fraction=0.2)
    return base.model_copy(update=changes)


def test_breakhis_defaults_to_a_patient_level_split(breakhis_root: Path) -> None:
    cfg = _breakhis_config(breakhis_root)
    report = load_split(cfg, seed=0).report
    assert report["split_by"] == "group" and report["group_kind"] == "patient"
    assert report["shared_groups"] == 0 and report["warnings"] == []
    per_split = report["splits"]
    assert isinstance(per_split, dict)
    assert sum(per_split[n]["images"] for n in ("train", "val", "test")) == 96
    # patients are stratified by class: both classes reach the test split
    assert all(row["images"] > 0 for row in per_split["test"]["per_class"].values())


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 10_000),
    val=st.floats(0.0, 0.4),
    test=st.floats(0.0, 0.4),
)
def test_patient_split_never_shares_a_patient(
    breakhis_root: Path, seed: int, val: float, test: float
) -> None:
    cfg = _breakhis_config(breakhis_root, val_fraction=val, test_fraction=test, split_seed=seed)
    seen: dict[str, str] = {}
    for name, part in load_split(cfg, seed=0).parts.items():
        for sample in part:
            assert seen.setdefault(sample.group, name) == name, sample.group


def test_image_level_split_of_patient_data_warns_loudly(breakhis_root: Path) -> None:
    cfg = _breakhis_config(breakhis_root, split_by="stratified")
    with pytest.warns(LeakageWarning, match="IMAGE-LEVEL SPLIT OF BREAKHIS"):
        report = load_split(cfg, seed=0).report
    assert report["split_by"] == "stratified"
    assert isinstance(report["shared_groups"], int) and report["shared_groups"] > 0
    assert "inflated" in str(report["warnings"])


def _tar_gz(folder: Path, target: Path) -> Path:
    with tarfile.open(target, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return target


def test_breakhis_tar_gz_download_from_a_local_archive(tmp_path: Path) -> None:
    make_breakhis(tmp_path / "src", images_per_magnification=1)
    archive = _tar_gz(tmp_path / "src" / "BreaKHis_v1", tmp_path / "BreaKHis_v1.tar.gz")
    spec = dataclasses.replace(get_dataset("breakhis"), md5=file_digests(archive)["md5"])
    extracted = download_dataset(
        "breakhis", tmp_path / "out", source=archive, spec=spec, progress=False
    )
    assert extracted.name == "BreaKHis_v1"
    assert len(scan_dataset("breakhis", extracted).samples) == len(BREAKHIS_PATIENTS) * 4


def test_tar_member_escaping_the_folder_is_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tf:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DataError, match="cannot extract"):
        safe_extract(evil, tmp_path / "dest")
    assert not (tmp_path / "outside.txt").exists()
    assert not (tmp_path / ".dest.extracting").exists()


def test_download_without_a_published_checksum_prints_one(tmp_path: Path) -> None:
    make_idc(tmp_path / "src", patients=("10253",))
    archive = tmp_path / "IDC_regular_ps50_idx5.zip"
    shutil.make_archive(str(archive.with_suffix("")), "zip", tmp_path / "src")
    result = CliRunner().invoke(
        app, ["data", "download", "idc", "--to", str(tmp_path / "out"), "--source", str(archive)]
    )
    assert result.exit_code == 0, result.output
    assert f"md5 {file_digests(archive)['md5']}" in result.output
    extracted = tmp_path / "out" / "IDC_regular_ps50_idx5"
    assert len(scan_dataset("idc", extracted).samples) == 6
