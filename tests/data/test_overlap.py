"""Has this model seen these images? Matched wherever runs and data now live, never guessed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from histolite.data.folder import Sample
from histolite.data.overlap import Overlap, find_overlap


def _tif(path: Path, value: int) -> Sample:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.full((8, 8, 3), value, np.uint8))  # uncompressed: equal sizes
    return Sample(path, 0, "tumor", path.stem)


def _copy(sample: Sample, folder: Path, suffix: str | None = None) -> Sample:
    target = folder / sample.class_name / (sample.path.stem + (suffix or sample.path.suffix))
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        target.write_bytes(sample.path.read_bytes())
    else:
        Image.open(sample.path).save(target)
    return Sample(target, sample.label, sample.class_name, sample.group)


def test_copies_and_conversions_are_the_same_images(tmp_path: Path) -> None:
    trained = [_tif(tmp_path / "a" / "tumor" / f"t{i}.tif", 10 * i) for i in range(3)]
    assert find_overlap(trained, trained) == Overlap(confirmed=3)
    copies = [_copy(s, tmp_path / "b") for s in trained[:2]]
    assert find_overlap(trained, copies) == Overlap(confirmed=2)
    converted = [_copy(s, tmp_path / "png", ".png") for s in trained]
    assert find_overlap(trained, converted) == Overlap(confirmed=3)


def test_other_images_that_reuse_names_are_not_seen(tmp_path: Path) -> None:
    trained = [_tif(tmp_path / "a" / "tumor" / f"{i:04d}.tif", 10 * i) for i in range(3)]
    # another hospital's tiles: same names, same (uncompressed) file sizes, other pixels
    other = [_tif(tmp_path / "b" / "tumor" / f"{i:04d}.tif", 200 + i) for i in range(3)]
    assert other[0].path.stat().st_size == trained[0].path.stat().st_size
    assert find_overlap(trained, other) == Overlap()
    other_png = [_copy(s, tmp_path / "c", ".png") for s in other]
    assert find_overlap(trained, other_png) == Overlap()
    relabelled = [Sample(trained[0].path, 1, "stroma", "x")]
    assert find_overlap(trained, relabelled) == Overlap()


def test_matches_whose_training_file_is_gone_are_counted_apart(tmp_path: Path) -> None:
    data = [_tif(tmp_path / "a" / "tumor" / f"t{i}.tif", i) for i in range(3)]
    gone = [Sample(tmp_path / "moved" / "tumor" / s.path.name, 0, "tumor", "g") for s in data]
    overlap = find_overlap(gone, data)
    assert overlap == Overlap(by_name=3) and overlap.total == 3
