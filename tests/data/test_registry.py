import hashlib
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from histolite.data.folder import scan_image_folder
from histolite.data.registry import download_dataset, get_dataset, safe_extract
from histolite.errors import DataError


def _kather_like_zip(path: Path) -> Path:
    """A tiny archive with the official layout: one wrapper folder, 8 class folders of TIFFs."""
    spec = get_dataset("kather2016")
    staging = path.parent / "staging" / "Kather_texture_2016_image_tiles_5000"
    with zipfile.ZipFile(path, "w") as zf:
        for cls in spec.classes:
            for i in range(2):
                staging.mkdir(parents=True, exist_ok=True)
                tile = staging / f"{i}_CRC-Prim-HE-0{i + 1}_001.tif_Row_1_Col_1.tif"
                Image.new("RGB", (150, 150), (150 + i, 80, 160)).save(tile)
                zf.write(tile, f"Kather_texture_2016_image_tiles_5000/{cls}/{tile.name}")
    return path


def test_registry_has_kather_with_official_source() -> None:
    spec = get_dataset("kather2016")
    assert "zenodo.org/records/53169" in (spec.url or "")
    assert spec.md5 and len(spec.md5) == 32 and len(spec.classes) == 8
    with pytest.raises(DataError, match="unknown dataset"):
        get_dataset("kather2099")


def test_download_from_local_archive_is_verified_and_extracted(tmp_path: Path) -> None:
    archive = _kather_like_zip(tmp_path / "fixture.zip")
    data = archive.read_bytes()
    spec = replace(
        get_dataset("kather2016"),
        md5=hashlib.md5(data).hexdigest(),
        sha384=hashlib.sha384(data).hexdigest(),
        size_bytes=len(data),
    )
    extracted = download_dataset(
        "kather2016", tmp_path / "out", source=archive, spec=spec, progress=False
    )
    images = scan_image_folder(extracted, group_regex=dict(spec.groupings)["patient"])
    assert images.classes == spec.classes
    assert len(images.samples) == 16
    assert {s.group for s in images.samples} == {"CRC-Prim-HE-01", "CRC-Prim-HE-02"}
    # re-running reuses the verified archive already in place
    assert download_dataset("kather2016", tmp_path / "out", spec=spec, progress=False) == extracted


def test_checksum_mismatch_is_refused(tmp_path: Path) -> None:
    archive = _kather_like_zip(tmp_path / "fixture.zip")
    with pytest.raises(DataError, match=r"md5 .* does not match"):
        download_dataset("kather2016", tmp_path / "out", source=archive, progress=False)
    assert not (tmp_path / "out" / "Kather_texture_2016_image_tiles_5000").exists()


def test_zip_slip_is_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../outside.txt", "x")
    with pytest.raises(DataError, match="escapes"):
        safe_extract(evil, tmp_path / "dest")
    assert not (tmp_path / "outside.txt").exists()


def test_folder_dataset_has_no_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no download"):
        download_dataset("folder", tmp_path)
