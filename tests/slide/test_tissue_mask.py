"""The tissue mask: glass, pen ink and blank slides are not tissue; a field of tissue is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histolite.slide.tissue import rgb_to_hsv, tissue_mask

MPP = 4.0  # a thumbnail's microns per pixel
SIDE = 200


def _glass(rng: np.random.Generator, tint: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """Near-white glass with scanner noise (and a faint colour cast)."""
    noise = rng.integers(-4, 5, (SIDE, SIDE, 3))
    return np.clip(244 + noise + np.array(tint), 0, 255).astype(np.uint8)


def _tissue(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """H&E-like texture: pale eosin pink with patches of dark haematoxylin purple."""
    pink = np.array([236, 170, 200])  # saturation about 0.28
    purple = np.array([120, 60, 150])  # saturation about 0.6
    patches = (
        np.asarray(
            Image.fromarray(
                (rng.random((shape[0] // 8, shape[1] // 8)) * 255).astype(np.uint8)
            ).resize(shape[::-1], Image.Resampling.BILINEAR)
        )
        / 255.0
    )
    mix = (patches > 0.5)[..., None]
    pixels = np.where(mix, purple, pink) + rng.integers(-8, 9, (*shape, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def test_tissue_on_white_glass_is_found() -> None:
    rng = np.random.default_rng(0)
    view = _glass(rng)
    view[40:160, 50:170] = _tissue(rng, (120, 120))
    mask = tissue_mask(view, MPP)
    truth = np.zeros((SIDE, SIDE), bool)
    truth[40:160, 50:170] = True
    assert (mask & truth).sum() / (mask | truth).sum() > 0.95  # intersection over union
    assert not mask[~truth].any()


@pytest.mark.parametrize(
    "ink", [(40, 70, 200), (30, 150, 60), (20, 20, 25)], ids=["blue", "green", "black"]
)
def test_pen_marks_are_not_tissue(ink: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(1)
    view = _glass(rng)
    view[30:170, 20:80] = _tissue(rng, (140, 60))
    view[30:170, 120:150] = ink  # a pen stroke on the glass beside the tissue
    view[90:110, 20:80] = ink  # and one across the tissue
    mask = tissue_mask(view, MPP)
    assert not mask[30:170, 120:150].any()
    assert not mask[92:108, 20:80].any()
    assert mask[30:85, 25:75].mean() > 0.95


def test_a_field_of_tissue_with_no_glass_stays_tissue() -> None:
    """Otsu alone splits pale eosin from dark haematoxylin when there is no glass."""
    rng = np.random.default_rng(2)
    view = _tissue(rng, (SIDE, SIDE))
    saturation = rgb_to_hsv(view)[..., 1]
    assert saturation.min() > 0.2 and saturation.max() > 0.5  # two populations of tissue
    assert tissue_mask(view, MPP).mean() > 0.99


@pytest.mark.parametrize("tint", [(0, 0, 0), (-6, -10, -4)], ids=["white", "tinted"])
def test_a_blank_slide_has_no_tissue(tint: tuple[int, int, int]) -> None:
    view = _glass(np.random.default_rng(3), tint)
    assert not tissue_mask(view, MPP).any()


def test_a_mosaic_of_real_kather_tiles_is_all_tissue(kather_dir: Path) -> None:
    """8 x 8 real H&E tiles (no fat, no empty glass) at 0.495 um/px, then as a thumbnail."""
    classes = ["01_TUMOR", "02_STROMA", "03_COMPLEX", "04_LYMPHO", "05_DEBRIS", "06_MUCOSA"]
    rows = []
    for r in range(8):
        row = []
        for c in range(8):
            name = classes[(r * 8 + c) % len(classes)]
            path = sorted((kather_dir / name).iterdir())[r * 8 + c]
            row.append(np.asarray(Image.open(path).convert("RGB")))
        rows.append(np.concatenate(row, axis=1))
    mosaic = np.concatenate(rows, axis=0)
    assert tissue_mask(mosaic, 0.495).mean() > 0.95
    thumb = np.asarray(Image.fromarray(mosaic).resize((150, 150), Image.Resampling.BOX))
    assert tissue_mask(thumb, 0.495 * 8).mean() > 0.95
