"""Whole-slide images: one reader interface over OpenSlide and tifffile.

OpenSlide (the ``openslide-python`` + ``openslide-bin`` wheels, no system package) reads the
vendor formats (Aperio SVS, Hamamatsu, MIRAX, ...). Pyramidal TIFF and OME-TIFF that OpenSlide
cannot read go through tifffile, which decodes only the tiles a region touches, so memory stays
flat in slide size. Microns per pixel come from the file (OpenSlide properties, the Aperio
description, OME-XML, TIFF resolution tags) unless given; a slide without them is an error,
because tiles at an unknown magnification are tiles at the wrong magnification.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from histolite.errors import DataError


class SlideError(DataError):
    """A slide cannot be opened or read; the message names the file."""


@dataclass(frozen=True)
class SlideInfo:
    """Geometry of a slide: level 0 size, the pyramid, and the physical pixel size."""

    path: Path
    width: int
    height: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float
    mpp_source: str
    reader: str
    # where the scanned area starts in level-0 pixels (OpenSlide's bounds-x/y, e.g. MIRAX):
    # QuPath's coordinates start there, so its annotations are shifted by it
    origin: tuple[int, int] = (0, 0)

    def level_for(self, downsample: float) -> int:
        """The coarsest level at least as fine as ``downsample`` (so reads resize down)."""
        fine_enough = [
            level for level, f in enumerate(self.level_downsamples) if f <= downsample * 1.001
        ]
        return max(fine_enough, key=lambda level: self.level_downsamples[level], default=0)


class Slide(Protocol):
    info: SlideInfo

    def read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 pixels of a ``width`` x ``height`` box of ``level``, at level coordinates."""
        ...

    def close(self) -> None: ...


def read_region(slide: Slide, x: int, y: int, size: int, out: int) -> np.ndarray:
    """A square of ``size`` level-0 pixels at (x, y), as ``out`` x ``out`` RGB.

    Reads the pyramid level closest above the needed resolution and resizes from there.
    Pixels outside the slide are white (background).
    """
    info = slide.info
    level = info.level_for(size / out)
    factor = info.level_downsamples[level]
    lx, ly = int(x / factor), int(y / factor)
    side = max(1, round(size / factor))
    pixels = slide.read_level(level, lx, ly, side, side)
    if pixels.shape[0] != out or pixels.shape[1] != out:
        pixels = np.asarray(
            Image.fromarray(pixels).resize((out, out), Image.Resampling.BILINEAR, reducing_gap=None)
        )
    return pixels


THUMBNAIL_BLOCK = 1024  # level pixels per side of one read: bounds a thumbnail's memory


def thumbnail(
    slide: Slide, max_side: int, check: Callable[[], None] | None = None
) -> tuple[np.ndarray, float]:
    """The whole slide at most ``max_side`` pixels on its longer side, and its downsample.

    The level is read in blocks of about ``THUMBNAIL_BLOCK`` pixels a side, each box-filtered
    to its share of the thumbnail, because a single-level slide would otherwise be decoded
    whole (gigabytes). Each block is cut at the exact (fractional) source box of its output
    pixels, so the result equals one resize of the whole level. ``check`` is called before
    every block: it may raise to stop the read (a job over its time budget).
    """
    info = slide.info
    scale = max(info.width, info.height) / max_side
    level = info.level_for(max(scale, 1.0))
    width, height = info.level_dimensions[level]
    out_w = max(1, round(info.width / max(scale, 1.0)))
    out_h = max(1, round(info.height / max(scale, 1.0)))
    fx, fy = width / out_w, height / out_h
    step_x = max(1, int(THUMBNAIL_BLOCK / fx))  # output pixels per block
    step_y = max(1, int(THUMBNAIL_BLOCK / fy))
    out = np.empty((out_h, out_w, 3), np.uint8)
    for oy in range(0, out_h, step_y):
        oy1 = min(oy + step_y, out_h)
        sy0, sy1 = oy * fy, oy1 * fy
        ry0, ry1 = int(sy0), min(height, int(np.ceil(sy1)))
        for ox in range(0, out_w, step_x):
            ox1 = min(ox + step_x, out_w)
            sx0, sx1 = ox * fx, ox1 * fx
            rx0, rx1 = int(sx0), min(width, int(np.ceil(sx1)))
            if check is not None:
                check()
            block = _read_block_image(slide, level, rx0, ry0, rx1 - rx0, ry1 - ry0)
            if block.size != (ox1 - ox, oy1 - oy):
                box = (sx0 - rx0, sy0 - ry0, sx1 - rx0, sy1 - ry0)
                block = block.resize((ox1 - ox, oy1 - oy), Image.Resampling.BOX, box=box)
            out[oy:oy1, ox:ox1] = np.asarray(block)
    return out, info.width / out_w


def _read_block_image(
    slide: Slide, level: int, x: int, y: int, width: int, height: int
) -> Image.Image:
    """A box of ``level`` as an RGB PIL image, without array round trips where the reader can.

    The overview's blocks are only resized, so an OpenSlide region stays in PIL: converting
    and copying it through numpy was a third of the mask + grid time of a small slide.
    """
    if isinstance(slide, OpenSlideSlide):
        return slide.read_level_image(level, x, y, width, height)
    return Image.fromarray(slide.read_level(level, x, y, width, height))


def _flatten_alpha(rgba: np.ndarray) -> np.ndarray:
    """RGBA onto white: OpenSlide marks pixels outside the scanned area transparent.

    Most regions are opaque everywhere: then the colour channels are returned as they are, and
    otherwise only the pixels that are not opaque are blended (this was a third of a small
    slide's mask time when every pixel went through 16-bit arithmetic).
    """
    if rgba.shape[-1] == 3:
        return rgba
    alpha = rgba[..., 3]
    rgb = np.ascontiguousarray(rgba[..., :3])
    if int(alpha.min()) == 255:
        return rgb
    seen = alpha != 255
    weight = alpha[seen].astype(np.uint16)[:, None]
    rgb[seen] = ((rgb[seen].astype(np.uint16) * weight + 255 * (255 - weight) + 127) // 255).astype(
        np.uint8
    )
    return rgb


_APERIO_MPP = re.compile(r"\bMPP\s*=\s*([0-9.]+)")


# Microns per pixel a slide file may record: 0.05 (beyond 100x optics) to 16 (a 0.6x overview).
# Outside it the value is a mislabelled unit or an editor's dpi, and tiles would be cut at a
# physical size hundreds of times off, silently.
_RECORDED_MPP_RANGE = (0.05, 16.0)
# Inch-based resolution coarser than this is a desktop dpi (2400 dpi = 10.6 µm), not a scan.
_MAX_INCH_MPP = 5.0


def mpp_from_resolution(unit: Any, x_resolution: Any) -> float | None:
    """Microns per pixel from TIFF XResolution (pixels per unit) and ResolutionUnit."""
    try:
        if isinstance(x_resolution, tuple):
            x_resolution = x_resolution[0] / x_resolution[1]
        pixels_per_unit = float(x_resolution)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    microns = {2: 25400.0, 3: 10000.0, "inch": 25400.0, "centimeter": 10000.0}.get(unit)
    if microns is None or pixels_per_unit <= 1.0:  # 1 pixel per inch: no resolution recorded
        return None
    mpp = microns / pixels_per_unit
    if microns == 25400.0 and mpp > _MAX_INCH_MPP:
        return None  # a desktop dpi (72, 300, 600 ...) written by an image editor, not a scanner
    return mpp


def _check_mpp(
    path: Path, mpp: float | None, source: str, override: float | None
) -> tuple[float, str]:
    if override is not None:
        if not 0.01 <= override <= 100:
            raise SlideError(
                f"{path}: --mpp {override} is not a plausible microns per pixel "
                "(expected 0.01-100, e.g. 0.25 for 40x or 0.5 for 20x scans)"
            )
        return override, "given (--mpp)"
    low, high = _RECORDED_MPP_RANGE
    if mpp is None:
        raise SlideError(
            f"{path}: the file records no usable microns per pixel; pass --mpp (e.g. 0.25 for "
            "40x or 0.5 for 20x scans) so tiles are cut at the right physical size"
        )
    if not low <= mpp <= high:
        raise SlideError(
            f"{path}: the file's {source} give {mpp:g} microns per pixel, outside the {low:g}-"
            f"{high:g} a slide scan can have; pass --mpp with the scan's real value (e.g. 0.25 "
            "for 40x or 0.5 for 20x scans)"
        )
    return mpp, source


def _int_property(props: Any, key: str) -> int:
    try:
        return int(props.get(key) or 0)
    except ValueError:
        return 0


class OpenSlideSlide:
    """A slide read by OpenSlide."""

    def __init__(self, path: Path, mpp: float | None = None) -> None:
        import openslide

        try:
            self._slide = openslide.OpenSlide(str(path))
        except Exception as exc:  # OpenSlideError, OpenSlideUnsupportedFormatError
            raise SlideError(f"{path}: OpenSlide cannot open it ({exc})") from exc
        try:
            self.info = self._describe(path, mpp)
        except BaseException:
            self._slide.close()  # a refused slide must not keep its file open
            raise

    def _describe(self, path: Path, mpp: float | None) -> SlideInfo:
        props = self._slide.properties
        found: float | None = None
        source = ""
        # generic-tiff's mpp-x is the TIFF resolution tags, which image editors fill with a dpi
        if props.get("openslide.mpp-x") and props.get("openslide.vendor") != "generic-tiff":
            found, source = float(props["openslide.mpp-x"]), "openslide.mpp-x"
        else:
            found = mpp_from_resolution(
                props.get("tiff.ResolutionUnit"), props.get("tiff.XResolution")
            )
            source = "TIFF resolution tags"
        value, source = _check_mpp(path, found, source, mpp)
        width, height = self._slide.dimensions
        return SlideInfo(
            path=path,
            width=width,
            height=height,
            level_dimensions=tuple(self._slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in self._slide.level_downsamples),
            mpp=value,
            mpp_source=source,
            reader=f"openslide ({props.get('openslide.vendor', 'unknown vendor')})",
            origin=(
                _int_property(props, "openslide.bounds-x"),
                _int_property(props, "openslide.bounds-y"),
            ),
        )

    def read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return _flatten_alpha(np.asarray(self._read_rgba(level, x, y, width, height)))

    def read_level_image(self, level: int, x: int, y: int, width: int, height: int) -> Image.Image:
        """The same pixels as :meth:`read_level`, as an RGB PIL image."""
        region = self._read_rgba(level, x, y, width, height)
        if region.getchannel("A").getextrema() == (255, 255):
            return region.convert("RGB")
        return Image.fromarray(_flatten_alpha(np.asarray(region)))

    def _read_rgba(self, level: int, x: int, y: int, width: int, height: int) -> Image.Image:
        factor = self.info.level_downsamples[level]
        try:
            return self._slide.read_region(
                (int(x * factor), int(y * factor)), level, (width, height)
            )
        except Exception as exc:
            raise SlideError(
                f"{self.info.path}: cannot read level {level} at ({x}, {y}): {exc}"
            ) from exc

    def close(self) -> None:
        self._slide.close()


_NOT_TISSUE = ("label", "macro", "thumbnail", "overview")


class TiffSlide:
    """A pyramidal (or single-level) tiled TIFF / OME-TIFF read tile by tile with tifffile."""

    def __init__(self, path: Path, mpp: float | None = None) -> None:
        import tifffile

        try:
            self._tif = tifffile.TiffFile(str(path))
        except Exception as exc:
            raise SlideError(
                f"{path}: truncated or not a slide: not a readable TIFF ({exc})"
            ) from exc
        try:
            self.info = self._describe(path, mpp)
        except BaseException:
            self._tif.close()  # a refused slide must not keep its file open
            raise

    def _describe(self, path: Path, mpp: float | None) -> SlideInfo:
        try:
            series = [
                s
                for s in self._tif.series
                if not any(word in (s.name or "").lower() for word in _NOT_TISSUE)
            ] or list(self._tif.series)
            if not series:  # e.g. an SVS cut short: its directories sit at the end of the file
                raise SlideError(f"{path}: truncated or not a slide: no image pages could be read")
            main = max(series, key=lambda s: int(np.prod(s.levels[0].shape[:2])))
            # tifffile types pages as page-or-frame-or-None; slides have real pages
            self._pages: list[Any] = [level.pages[0] for level in main.levels]
            self._series_index = list(self._tif.series).index(main)
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(
                f"{path}: truncated or not a slide: not a readable TIFF ({exc})"
            ) from exc
        dims = []
        for page in self._pages:
            shape = page.shape
            if len(shape) != 3 or shape[-1] not in (3, 4):
                raise SlideError(f"{path}: expected RGB pages, found shape {shape}")
            dims.append((int(shape[1]), int(shape[0])))
        found, source = self._mpp()
        value, source = _check_mpp(path, found, source, mpp)
        return SlideInfo(
            path=path,
            width=dims[0][0],
            height=dims[0][1],
            level_dimensions=tuple(dims),
            level_downsamples=tuple(dims[0][0] / w for w, _ in dims),
            mpp=value,
            mpp_source=source,
            reader="tifffile",
        )

    def _mpp(self) -> tuple[float | None, str]:
        page = self._pages[0]
        description = page.description or ""
        match = _APERIO_MPP.search(description)
        if match:
            return float(match.group(1)), "Aperio description"
        if self._tif.is_ome and self._tif.ome_metadata:
            # one <Pixels> per OME image, in series order: read the one of the series chosen,
            # not a label or macro image declared before it
            pixels = re.findall(r"<(?:\w+:)?Pixels\b[^>]*>", self._tif.ome_metadata)
            tag = (
                pixels[self._series_index]
                if self._series_index < len(pixels)
                else self._tif.ome_metadata
            )
            size = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tag)
            size_unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tag)
            if size and (size_unit is None or size_unit.group(1) in ("µm", "um", "micron")):
                return float(size.group(1)), "OME-XML PhysicalSizeX"
        unit = page.tags.get("ResolutionUnit")
        resolution = page.tags.get("XResolution")
        if unit is not None and resolution is not None:
            return mpp_from_resolution(int(unit.value), resolution.value), "TIFF resolution tags"
        return None, ""

    def read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        page = self._pages[level]
        out = np.full((height, width, 3), 255, np.uint8)
        full_h, full_w = page.shape[:2]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, full_w), min(y + height, full_h)
        if x1 <= x0 or y1 <= y0:
            return out
        try:
            if page.planarconfig != 1:  # colour planes stored apart (rare): decode the page
                whole = page.asarray()
                out[y0 - y : y1 - y, x0 - x : x1 - x] = whole[y0:y1, x0:x1, :3]
                return out
            self._copy_tiles(page, out, x, y, (x0, y0, x1, y1))
        except SlideError:
            raise
        except Exception as exc:
            raise SlideError(
                f"{self.info.path}: cannot decode level {level} at ({x}, {y}): {exc}"
            ) from exc
        return out

    def _copy_tiles(
        self, page: Any, out: np.ndarray, x: int, y: int, box: tuple[int, int, int, int]
    ) -> None:
        """Decode only the tiles (or strips: tiles a page wide) that ``box`` touches."""
        x0, y0, x1, y1 = box
        if page.is_tiled:
            tw, th = page.tilewidth, page.tilelength
        else:
            tw, th = page.shape[1], min(page.rowsperstrip or page.shape[0], page.shape[0])
        across = (page.shape[1] + tw - 1) // tw
        handle = self._tif.filehandle
        for row in range(y0 // th, (y1 - 1) // th + 1):
            for col in range(x0 // tw, (x1 - 1) // tw + 1):
                index = row * across + col
                offset, count = page.dataoffsets[index], page.databytecounts[index]
                if count == 0:
                    continue  # sparse tile: background
                handle.seek(offset)
                data = handle.read(count)
                if len(data) != count:
                    raise SlideError(
                        f"{self.info.path}: truncated or not a slide: tile {index} lies past "
                        "the end of the file"
                    )
                tile, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
                # a page's last strip may be short: its decoded shape says how many rows
                tile = np.asarray(tile).reshape(shape[1], shape[2], -1)[..., :3]
                ty, tx = row * th, col * tw
                sy0, sx0 = max(y0, ty), max(x0, tx)
                sy1, sx1 = min(y1, ty + th), min(x1, tx + tw)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[
                    sy0 - ty : sy1 - ty, sx0 - tx : sx1 - tx
                ]

    def close(self) -> None:
        self._tif.close()


SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"}
)


def expand_slide_paths(paths: list[Path]) -> list[Path]:
    """Files as given; a folder stands for the slide files directly inside it, sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)
            if not inside:
                raise SlideError(
                    f"{path}: no slide files ({', '.join(sorted(SLIDE_SUFFIXES))}) in this folder"
                )
            found += inside
        else:
            found.append(path)
    return found


def require_distinct_stems(paths: list[Path]) -> None:
    """Refuse slides that share a file stem: their outputs (``OUT/<stem>/``) would collide.

    Checked before any work, so a batch never silently overwrites one slide with another.
    """
    seen: dict[str, Path] = {}
    for path in paths:
        other = seen.setdefault(path.stem, path)
        if other != path:
            raise SlideError(
                f"{other} and {path} share the name {path.stem!r}, so both would write to "
                f"OUT/{path.stem}/; rename one or run them into different --out folders"
            )


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """OpenSlide where it can read the file, tifffile for pyramidal TIFF / OME-TIFF otherwise."""
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: slide file not found")
    errors = []
    no_mpp: SlideError | None = None
    try:
        import openslide  # noqa: F401
    except ImportError:
        errors.append("OpenSlide not installed (pip install 'histolite[slide]')")
    else:
        try:
            return OpenSlideSlide(path, mpp)
        except SlideError as exc:
            if "microns per pixel" not in str(exc):
                errors.append(str(exc))
            else:
                # OpenSlide reads OME-TIFF as generic-tiff, blind to the OME-XML PhysicalSizeX:
                # tifffile may still find the scale, so the missing-mpp error waits for it
                no_mpp = exc
    try:
        return TiffSlide(path, mpp)
    except SlideError as exc:
        if no_mpp is not None:
            raise no_mpp from exc
        if "microns per pixel" in str(exc):
            raise
        errors.append("tifffile: " + str(exc).removeprefix(f"{path}: truncated or not a slide: "))
    # each reader's reason, without the path that the message already starts with
    reasons = "; ".join(e.removeprefix(f"{path}: ") for e in errors)
    raise SlideError(f"{path}: truncated or not a slide ({reasons})")
