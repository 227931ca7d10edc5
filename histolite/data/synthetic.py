"""The built-in default data: procedural H&E-like tissue tiles, deterministic from a seed.

Images are painted as haematoxylin (nuclei) and eosin (cytoplasm, stroma, fibres) concentration
maps and turned into RGB with the Beer-Lambert law, ``I = 255 * exp(-OD)``. Each simulated slide
gets its own perturbed stain vectors and intensities, so colour varies between slides the way it
does between labs and scanners; only morphology tells classes apart, which is what makes stain
normalisation worth having.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from histolite.fileio import write_json

# Ruifrok & Johnston optical-density vectors for haematoxylin and eosin.
_H_VECTOR = np.array([0.650, 0.704, 0.286])
_E_VECTOR = np.array([0.072, 0.990, 0.105])

SYNTHETIC_CLASSES = ("tumor", "stroma", "lympho", "mucosa", "adipose", "empty")
SYNTHETIC_GROUP_REGEX = r"(slide\d+)"

Painter = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    coarse = rng.random((cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _add_nuclei(
    rng: np.random.Generator,
    hema: np.ndarray,
    centres: np.ndarray,
    radius: tuple[float, float],
    elongation: tuple[float, float],
    intensity: tuple[float, float],
    angle: float | None = None,
) -> None:
    """Paint elliptical nuclei with textured chromatin into the haematoxylin map, in place."""
    size = hema.shape[0]
    for cy, cx in centres:
        r = rng.uniform(*radius)
        ry, rx = r, r * rng.uniform(*elongation)
        theta = rng.uniform(0, np.pi) if angle is None else angle + rng.normal(0, 0.15)
        extent = int(np.ceil(max(rx, ry))) + 1
        y0, y1 = max(0, int(cy) - extent), min(size, int(cy) + extent + 1)
        x0, x1 = max(0, int(cx) - extent), min(size, int(cx) + extent + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        dist = (u / rx) ** 2 + (v / ry) ** 2
        value = rng.uniform(*intensity) * (0.8 + 0.4 * rng.random(dist.shape))
        mask = np.clip(1.5 - dist, 0.0, 1.0)  # soft edge
        hema[y0:y1, x0:x1] = np.maximum(hema[y0:y1, x0:x1], mask * value)


def _random_centres(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    return rng.uniform(0, size, size=(count, 2))


def _paint_tumor(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    eosin = 0.35 + 0.25 * _smooth_noise(rng, size, 4)
    hema = 0.05 * _smooth_noise(rng, size, 8)
    count = int(size * size / 90 * rng.uniform(0.8, 1.2))
    _add_nuclei(rng, hema, _random_centres(rng, size, count), (2.6, 4.2), (1.0, 1.7), (0.7, 1.1))
    return hema, eosin


def _paint_stroma(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = _grid(size)
    angle = rng.uniform(0, np.pi)
    warp = 6.0 * _smooth_noise(rng, size, 3)
    phase = xx * np.cos(angle) + yy * np.sin(angle) + warp
    fibres = 0.5 + 0.5 * np.sin(phase * rng.uniform(0.7, 1.1))
    eosin = 0.35 + 0.55 * fibres**3 + 0.1 * _smooth_noise(rng, size, 6)
    hema = 0.03 * _smooth_noise(rng, size, 8)
    count = int(size * size / 700 * rng.uniform(0.6, 1.4))
    _add_nuclei(
        rng,
        hema,
        _random_centres(rng, size, count),
        (1.2, 1.7),
        (2.5, 4.0),
        (0.6, 0.9),
        angle=angle + np.pi / 2,
    )
    return hema, eosin


def _paint_lympho(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    eosin = 0.15 + 0.15 * _smooth_noise(rng, size, 4)
    hema = 0.08 * _smooth_noise(rng, size, 8)
    count = int(size * size / 22 * rng.uniform(0.8, 1.2))
    _add_nuclei(rng, hema, _random_centres(rng, size, count), (1.4, 2.0), (1.0, 1.15), (1.0, 1.4))
    return hema, eosin


def _paint_mucosa(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = _grid(size)
    eosin = 0.4 + 0.2 * _smooth_noise(rng, size, 4)
    hema = 0.03 * _smooth_noise(rng, size, 8)
    for _ in range(max(1, int(rng.integers(1, 4) * size / 64))):
        cy, cx = rng.uniform(0, size, size=2)
        lumen = rng.uniform(0.08, 0.14) * size
        dist = np.hypot(yy - cy, xx - cx)
        eosin = np.where(dist < lumen, 0.03, eosin)
        ring = max(6, int(2 * np.pi * (lumen + 3) / 4.5))
        angles = np.linspace(0, 2 * np.pi, ring, endpoint=False) + rng.uniform(0, 1)
        centres = np.stack(
            [cy + (lumen + 3) * np.sin(angles), cx + (lumen + 3) * np.cos(angles)], 1
        )
        _add_nuclei(rng, hema, centres, (1.3, 1.8), (1.6, 2.2), (0.8, 1.1))
    return hema, eosin


def _paint_adipose(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = _grid(size)
    seeds = _random_centres(rng, size, max(3, int(size * size / 500 * rng.uniform(0.7, 1.3))))
    dists = np.sort(np.hypot(yy[..., None] - seeds[:, 0], xx[..., None] - seeds[:, 1]), axis=-1)
    membrane = np.clip(1.6 - (dists[..., 1] - dists[..., 0]), 0.0, 1.0)
    eosin = 0.02 + 0.6 * membrane
    hema = np.zeros((size, size), np.float32)
    count = int(rng.integers(0, 3))
    _add_nuclei(rng, hema, _random_centres(rng, size, count), (1.0, 1.5), (2.0, 3.0), (0.5, 0.8))
    return hema, eosin


def _paint_empty(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    eosin = 0.02 + 0.05 * _smooth_noise(rng, size, 3)
    hema = 0.01 * _smooth_noise(rng, size, 5)
    return hema, eosin


_PAINTERS: dict[str, Painter] = {
    "tumor": _paint_tumor,
    "stroma": _paint_stroma,
    "lympho": _paint_lympho,
    "mucosa": _paint_mucosa,
    "adipose": _paint_adipose,
    "empty": _paint_empty,
}


def _slide_stains(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Per-slide stain vectors and strengths: the colour variation normalisation removes."""
    h = _H_VECTOR + rng.normal(0, 0.08, 3)
    e = _E_VECTOR + rng.normal(0, 0.08, 3)
    h = np.abs(h) / np.linalg.norm(h)
    e = np.abs(e) / np.linalg.norm(e)
    return h, e, rng.uniform(0.6, 1.5), rng.uniform(0.5, 1.5)


def render_tile(
    class_name: str,
    size: int,
    rng: np.random.Generator,
    stains: tuple[np.ndarray, np.ndarray, float, float],
) -> np.ndarray:
    """One HxWx3 uint8 tile of ``class_name`` stained with a slide's ``stains``."""
    h_vec, e_vec, h_strength, e_strength = stains
    hema, eosin = _PAINTERS[class_name](rng, size)
    od = hema[..., None] * h_vec * h_strength + eosin[..., None] * e_vec * e_strength
    rgb = 255.0 * np.exp(-od) + rng.normal(0, 3.0, od.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def generate_synthetic_dataset(
    out: str | Path,
    *,
    images_per_class: int = 60,
    image_size: int = 64,
    slides: int = 6,
    seed: int = 0,
    classes: Sequence[str] = SYNTHETIC_CLASSES,
    progress: bool = True,
) -> Path:
    """Write ``OUT/<class>/slideNN_<class>_NNNN.png`` tiles.

    The same arguments give the same pixels.

    Each image is assigned to a slide round-robin, so every slide holds every class and a
    slide-grouped split (``group_regex: "(slide\\d+)"``) stays class-balanced.
    """
    unknown = [c for c in classes if c not in _PAINTERS]
    if unknown:
        raise ValueError(f"unknown synthetic class(es) {unknown}; choose from {list(_PAINTERS)}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 px, got {image_size}")
    out = Path(out)
    slide_rng = np.random.Generator(np.random.PCG64(seed))
    slide_stains = [_slide_stains(slide_rng) for _ in range(slides)]
    total = len(classes) * images_per_class
    with tqdm(total=total, desc="synthetic tiles", disable=not progress, leave=False) as bar:
        for class_index, name in enumerate(classes):
            (out / name).mkdir(parents=True, exist_ok=True)
            for i in range(images_per_class):
                slide = i % slides
                rng = np.random.Generator(np.random.PCG64([seed, class_index, i]))
                tile = render_tile(name, image_size, rng, slide_stains[slide])
                Image.fromarray(tile).save(out / name / f"slide{slide:02d}_{name}_{i:04d}.png")
                bar.update()
    write_json(
        out / "dataset.json",
        {
            "generator": "histolite.data.synthetic",
            "classes": list(classes),
            "images_per_class": images_per_class,
            "image_size": image_size,
            "slides": slides,
            "seed": seed,
            "group_regex": SYNTHETIC_GROUP_REGEX,
        },
    )
    return out
