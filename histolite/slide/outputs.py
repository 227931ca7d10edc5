"""What slide inference writes: tiles.csv, QuPath GeoJSON, heatmap.png, summary.json.

Everything is written through a temporary file and renamed, so an interrupted run leaves no
half-written output. The GeoJSON is what QuPath's File > Import objects reads: one tile object
per tile, a classification with a colour, and the class probabilities as measurements.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from histolite.fileio import atomic_path
from histolite.uncertainty import entropy

# Distinct, colour-blind-friendly colours (Okabe-Ito, then Tableau) for up to 16 classes.
PALETTE = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (100, 100, 100),
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
)
PANEL_SIDE = 640
TILE_COLUMNS = (
    "index",
    "x",
    "y",
    "width",
    "height",
    "tissue_fraction",
    "label",
    "confidence",
    "entropy",
)


def class_colour(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


@dataclass(frozen=True)
class TileRow:
    """One classified tile (level-0 pixels)."""

    index: int
    x: int
    y: int
    size: int
    tissue: float
    probabilities: tuple[float, ...]

    def label(self, classes: Sequence[str]) -> str:
        return classes[int(np.argmax(self.probabilities))]

    @property
    def confidence(self) -> float:
        return float(max(self.probabilities))

    @property
    def entropy(self) -> float:
        return float(entropy(np.asarray(self.probabilities)))


def tile_header(classes: Sequence[str]) -> list[str]:
    return [*TILE_COLUMNS, *(f"prob_{c}" for c in classes)]


def tile_line(row: TileRow, classes: Sequence[str]) -> list[object]:
    return [
        row.index,
        row.x,
        row.y,
        row.size,
        row.size,
        f"{row.tissue:.4f}",
        row.label(classes),
        f"{row.confidence:.6f}",
        f"{row.entropy:.6f}",
        *(f"{p:.6f}" for p in row.probabilities),
    ]


def read_tiles_csv(path: Path, classes: Sequence[str]) -> list[TileRow]:
    with path.open(newline="", encoding="utf-8") as fh:
        return parse_tiles_csv(fh, classes, str(path))


def parse_tiles_csv(lines: Iterable[str], classes: Sequence[str], source: str) -> list[TileRow]:
    """The rows of a ``tiles.csv`` already read (e.g. bytes checked against a hash first)."""
    reader = csv.DictReader(lines)
    expected = tile_header(classes)
    if reader.fieldnames != expected:
        raise ValueError(f"{source}: columns {reader.fieldnames} are not {expected}")
    return [
        TileRow(
            int(r["index"]),
            int(r["x"]),
            int(r["y"]),
            int(r["width"]),
            float(r["tissue_fraction"]),
            tuple(float(r[f"prob_{c}"]) for c in classes),
        )
        for r in reader
    ]


def write_tiles_csv(path: Path, rows: Iterable[TileRow], classes: Sequence[str]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(tile_header(classes))
        for row in rows:
            writer.writerow(tile_line(row, classes))


def geojson(
    rows: Sequence[TileRow], classes: Sequence[str], origin: Sequence[int] = (0, 0)
) -> dict[str, Any]:
    """A FeatureCollection of tile polygons that QuPath imports as classified tiles.

    Tiles are placed in OpenSlide's level-0 frame; QuPath measures from the corner of the
    slide's bounds (``origin``, non-zero on MIRAX and other bounded slides), so it is
    subtracted, mirroring what reading annotations adds.
    """
    features = []
    dx, dy = int(origin[0]), int(origin[1])
    for row in rows:
        x, y, s = row.x - dx, row.y - dy, row.size
        best = int(np.argmax(row.probabilities))
        features.append(
            {
                "type": "Feature",
                "id": f"tile-{row.index}",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]],
                },
                "properties": {
                    "objectType": "tile",
                    "classification": {"name": classes[best], "color": list(class_colour(best))},
                    "measurements": {
                        "tissue_fraction": row.tissue,
                        "confidence": row.confidence,
                        "entropy": row.entropy,
                        **{
                            f"prob_{c}": float(p)
                            for c, p in zip(classes, row.probabilities, strict=True)
                        },
                    },
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(
    path: Path, rows: Sequence[TileRow], classes: Sequence[str], origin: Sequence[int] = (0, 0)
) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(geojson(rows, classes, origin)), encoding="utf-8")


def _probability_colours(values: np.ndarray) -> np.ndarray:
    """A dark-blue -> yellow ramp (viridis-like) for probabilities in [0, 1]."""
    stops = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]])
    position = np.clip(values, 0, 1) * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    frac = (position - low)[..., None]
    return (stops[low] * (1 - frac) + stops[low + 1] * frac).astype(np.uint8)


def _fit_panel(thumb: np.ndarray, scale: float) -> tuple[np.ndarray, float]:
    """The thumbnail shrunk to at most ``PANEL_SIDE`` on a side, and its new scale."""
    shrink = max(thumb.shape[:2]) / PANEL_SIDE
    if shrink <= 1:
        return thumb, scale
    size = (max(1, round(thumb.shape[1] / shrink)), max(1, round(thumb.shape[0] / shrink)))
    return np.asarray(Image.fromarray(thumb).resize(size, Image.Resampling.BOX)), scale * shrink


def render_heatmap(
    thumb: np.ndarray,
    scale: float,
    rows: Sequence[TileRow],
    classes: Sequence[str],
    path: Path,
    *,
    weights: Sequence[float] | None = None,
    title: str = "",
) -> None:
    """Thumbnail, class map over it, one probability map per class (and attention), legend.

    ``scale`` is level-0 pixels per thumbnail pixel; ``weights`` (e.g. MIL attention, one per
    row) add a panel of their own. Panels are at most ``PANEL_SIDE`` pixels on a side.
    """
    thumb, scale = _fit_panel(thumb, scale)
    height, width = thumb.shape[:2]
    n = len(classes)
    class_map = np.full((height, width), -1, np.int32)
    probs = np.zeros((n, height, width), np.float32)
    covered = np.zeros((height, width), bool)
    attention = np.zeros((height, width), np.float32)
    top = max(weights) if weights else 1.0
    for i, row in enumerate(rows):
        x0, y0 = int(row.x / scale), int(row.y / scale)
        x1 = max(x0 + 1, round((row.x + row.size) / scale))
        y1 = max(y0 + 1, round((row.y + row.size) / scale))
        class_map[y0:y1, x0:x1] = int(np.argmax(row.probabilities))
        probs[:, y0:y1, x0:x1] = np.asarray(row.probabilities)[:, None, None]
        covered[y0:y1, x0:x1] = True
        if weights:
            attention[y0:y1, x0:x1] = weights[i] / top if top > 0 else 0.0
    overlay = thumb.copy()
    for k in range(n):
        where = class_map == k
        overlay[where] = (0.45 * thumb[where] + 0.55 * np.array(class_colour(k))).astype(np.uint8)
    panels = [("slide", thumb), ("predicted class", overlay)]
    faded = (0.35 * thumb + 0.65 * 255).astype(np.uint8)
    for k, name in enumerate(classes):
        panel = faded.copy()
        panel[covered] = _probability_colours(probs[k][covered])
        panels.append((f"p({name})", panel))
    if weights:
        panel = faded.copy()
        panel[covered] = _probability_colours(attention[covered])
        panels.append(("attention (max = 1)", panel))
    _save_panels(panels, classes, path, title)


def render_uncertainty(
    thumb: np.ndarray,
    scale: float,
    rows: Sequence[TileRow],
    classes: Sequence[str],
    path: Path,
    *,
    abstain_below: float | None = None,
    title: str = "",
) -> None:
    """Where the model is unsure: entropy (0 to log C) and confidence per tile, and the tiles
    under the model card's abstention threshold (when it has one) in red over the slide."""
    thumb, scale = _fit_panel(thumb, scale)
    height, width = thumb.shape[:2]
    spread = np.zeros((height, width), np.float32)
    sure = np.zeros((height, width), np.float32)
    covered = np.zeros((height, width), bool)
    flagged = np.zeros((height, width), bool)
    top = float(np.log(len(classes))) if len(classes) > 1 else 1.0
    for row in rows:
        x0, y0 = int(row.x / scale), int(row.y / scale)
        x1 = max(x0 + 1, round((row.x + row.size) / scale))
        y1 = max(y0 + 1, round((row.y + row.size) / scale))
        spread[y0:y1, x0:x1] = row.entropy / top
        sure[y0:y1, x0:x1] = row.confidence
        covered[y0:y1, x0:x1] = True
        if abstain_below is not None and row.confidence < abstain_below:
            flagged[y0:y1, x0:x1] = True
    faded = (0.35 * thumb + 0.65 * 255).astype(np.uint8)
    panels = [("slide", thumb)]
    for name, values in (("entropy / log C", spread), ("confidence", sure)):
        panel = faded.copy()
        panel[covered] = _probability_colours(values[covered])
        panels.append((name, panel))
    if abstain_below is not None:
        panel = thumb.copy()
        panel[flagged] = (0.4 * thumb[flagged] + 0.6 * np.array([220, 30, 30])).astype(np.uint8)
        panels.append((f"uncertain (confidence < {abstain_below:.3f})", panel))
    _save_panels(panels, [], path, title)


def render_attention(
    thumb: np.ndarray,
    scale: float,
    boxes: Sequence[tuple[int, int, int]],
    weights: Sequence[float],
    path: Path,
    title: str = "",
) -> None:
    """A slide-level MIL prediction: the thumbnail and each tile's attention (max = 1)."""
    thumb, scale = _fit_panel(thumb, scale)
    height, width = thumb.shape[:2]
    heat = np.zeros((height, width), np.float32)
    covered = np.zeros((height, width), bool)
    top = max(weights) if weights else 1.0
    for (x, y, side), weight in zip(boxes, weights, strict=True):
        x0, y0 = int(x / scale), int(y / scale)
        x1, y1 = max(x0 + 1, round((x + side) / scale)), max(y0 + 1, round((y + side) / scale))
        heat[y0:y1, x0:x1] = weight / top if top > 0 else 0.0
        covered[y0:y1, x0:x1] = True
    panel = (0.35 * thumb + 0.65 * 255).astype(np.uint8)
    panel[covered] = _probability_colours(heat[covered])
    _save_panels([("slide", thumb), ("attention (max = 1)", panel)], [], path, title)


def _save_panels(
    panels: list[tuple[str, np.ndarray]], classes: Sequence[str], path: Path, title: str
) -> None:
    font = ImageFont.load_default(size=15)
    height, width = panels[0][1].shape[:2]
    per_row = 4
    rows = (len(panels) + per_row - 1) // per_row
    caption, legend_h = 22, 24 * ((len(classes) + 3) // 4) + 34
    canvas = Image.new(
        "RGB",
        (per_row * width + 10 * (per_row + 1), rows * (height + caption + 10) + legend_h + 24),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    draw.text((10, 4), title, fill=(0, 0, 0), font=font)
    for i, (name, pixels) in enumerate(panels):
        r, c = divmod(i, per_row)
        x = 10 + c * (width + 10)
        y = 24 + r * (height + caption + 10)
        draw.text((x, y), name, fill=(0, 0, 0), font=font)
        canvas.paste(Image.fromarray(pixels), (x, y + caption))
    y = 24 + rows * (height + caption + 10)
    for k, name in enumerate(classes):
        r, c = divmod(k, 4)
        x = 10 + c * 240
        yy = y + r * 24
        draw.rectangle((x, yy, x + 16, yy + 16), fill=class_colour(k), outline=(0, 0, 0))
        draw.text((x + 22, yy + 2), name, fill=(0, 0, 0), font=font)
    ramp = _probability_colours(np.linspace(0, 1, 200))[None].repeat(12, 0)
    ry = y + 24 * ((len(classes) + 3) // 4) + 4
    canvas.paste(Image.fromarray(ramp), (10, ry))
    draw.text((215, ry), "probability 0 -> 1", fill=(0, 0, 0), font=font)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def write_mask(path: Path, mask: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray((mask * 255).astype(np.uint8)).save(tmp, format="PNG")
