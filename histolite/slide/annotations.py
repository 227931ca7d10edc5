"""Region annotations of whole slides, as one shape per class in level-0 slide pixels.

Training tiles are cut where a pathologist drew a region, and predicted tiles are scored against
those regions, so both need the same answer to "what fraction of this tile lies in each class".
Two writers matter in practice: QuPath (GeoJSON, in every layout its versions and scripts
produce) and ASAP (the XML of the CAMELYON16 challenge). Both are read into one valid
(Multi)Polygon per class; overlapping drawings of a class are merged so no area counts twice,
and broken rings are repaired rather than refused, because QuPath and ASAP both let an annotator
draw a self-crossing outline. Everything left out (detections, points, unclassified shapes) is
counted, so a file that yields nothing says why.

Coverage of many tiles at once goes through an R-tree of small pieces of the regions: a tile
wholly inside a piece costs one prepared-geometry test, only tiles on a boundary are intersected.
"""

from __future__ import annotations

import json
import math
import numbers
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Final

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from histolite.errors import DataError

GEOJSON_SUFFIXES: Final = (".geojson", ".json")
XML_SUFFIXES: Final = (".xml",)
SUFFIXES: Final = GEOJSON_SUFFIXES + XML_SUFFIXES

# Reasons a feature is skipped, besides its object type ("detection", "cell", "tile", ...).
UNCLASSIFIED: Final = "unclassified"
NOT_AN_AREA: Final = "not an area"
EMPTY: Final = "empty"

# QuPath 0.2 names the object type in the feature's "id".
_QUPATH_02_TYPES: Final = {
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
    "TMACoreObject": "TMA core",
    "PathRootObject": "root",
}
_AREA_TYPES: Final = ("Polygon", "MultiPolygon", "GeometryCollection")
_OTHER_TYPES: Final = ("Point", "MultiPoint", "LineString", "MultiLineString")
_ASAP_AREAS: Final = ("polygon", "spline", "rectangle")
_ASAP_OTHERS: Final = ("dot", "pointset", "measurement")
_SHOW = 80  # characters of a bad value quoted in an error
PIECE_VERTICES = 256  # coverage tests pieces of the regions this small (see coverage)


class Reason:
    """Why :func:`label_by_coverage` did or did not label a box (plain strings, numpy-friendly).

    KEPT: one class covers at least ``min_coverage`` of the box.
    OUTSIDE: no class region touches the box (coverage 0 for every class).
    MIXED: two or more classes cover part of the box, none reaching ``min_coverage``.
    PARTIAL: only one class covers part of the box, below ``min_coverage``.
    AMBIGUOUS: two classes each reach ``min_coverage``: their annotations overlap.
    """

    KEPT: Final = "kept"
    OUTSIDE: Final = "outside"
    MIXED: Final = "mixed"
    PARTIAL: Final = "partial"
    AMBIGUOUS: Final = "ambiguous"
    ALL: Final = (KEPT, OUTSIDE, MIXED, PARTIAL, AMBIGUOUS)


@dataclass(frozen=True)
class AnnotationCounts:
    """What happened to the features (QuPath objects, ASAP annotations) of a file.

    ``kept`` features contributed area to a class; ``repaired`` of them were invalid and fixed;
    ``clipped`` were cut at the slide's edge by :meth:`SlideAnnotations.check_inside`;
    ``skipped`` maps a reason (an object type such as "detection", or "unclassified",
    "not an area", "empty") to the number of features left out for it.
    """

    features: int
    kept: int
    repaired: int = 0
    clipped: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for logs and errors, e.g. ``"5 features: 3 kept (1 repaired); skipped ..."``."""
        text = f"{self.features} features: {self.kept} kept"
        pairs = ((self.repaired, "repaired"), (self.clipped, "clipped"))
        notes = [f"{n} {what}" for n, what in pairs if n]
        if notes:
            text += f" ({', '.join(notes)})"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{n} {why}" for why, n in self.skipped.items())
        return text


@dataclass(frozen=True)
class SlideAnnotations:
    """Class regions of one slide: a valid (Multi)Polygon per class, in level-0 pixels.

    ``regions`` is sorted by class name, which fixes the column order of :meth:`coverage`.
    ``feature_bounds`` holds the (minx, miny, maxx, maxy) of every kept feature of a class, so
    :meth:`check_inside` can count features rather than polygons.
    """

    source: Path
    regions: dict[str, BaseGeometry]
    counts: AnnotationCounts
    feature_bounds: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def classes(self) -> list[str]:
        return list(self.regions)

    def select(self, mapping: dict[str, str]) -> SlideAnnotations:
        """Keep the classes named in ``mapping`` under their new names; drop the others.

        Several names may map to one (their regions are merged), so a file's "Tumor" and
        "Tumor: Positive" can both train "tumour". A name the file lacks is an error rather than
        an empty class: it is usually a spelling or a different annotation scheme.
        """
        if not mapping:
            raise DataError(f"{self.source}: no classes selected; the file has {self.classes}")
        missing = [name for name in mapping if name not in self.regions]
        if missing:
            raise DataError(
                f"{self.source}: class{'es' if len(missing) > 1 else ''} "
                f"{', '.join(map(repr, missing))} not in the annotations; "
                f"the file has {', '.join(map(repr, self.classes))}"
            )
        grouped: dict[str, list[str]] = {}
        for old, new in mapping.items():
            grouped.setdefault(new, []).append(old)
        regions: dict[str, BaseGeometry] = {}
        bounds: dict[str, np.ndarray] = {}
        for new in sorted(grouped):
            olds = grouped[new]
            regions[new] = _region(shapely.union_all([self.regions[old] for old in olds]))
            bounds[new] = np.concatenate([self._bounds(old) for old in olds])
        return replace(self, regions=regions, feature_bounds=bounds)

    def check_inside(self, width: int, height: int) -> SlideAnnotations:
        """Clip the regions to a ``width`` x ``height`` slide; a class wholly outside is an error.

        A region with no area on the slide almost always means the file belongs to another
        slide, or that the slide has OpenSlide bounds (MIRAX) and the GeoJSON needed an offset;
        cutting on would silently produce no tiles. Features partly outside (a stroke past the
        tissue edge) are clipped and counted.
        """
        if width <= 0 or height <= 0:
            raise DataError(f"{self.source}: slide size {width} x {height} must be positive")
        slide = shapely.box(0, 0, width, height)
        inside = {
            name: region if shapely.covers(slide, region) else _region(region.intersection(slide))
            for name, region in self.regions.items()
        }
        outside = [name for name, region in inside.items() if region.area == 0]
        if outside:
            boxes = "; ".join(
                f"{name!r} spans x {b[0]:.0f}..{b[2]:.0f}, y {b[1]:.0f}..{b[3]:.0f}"
                for name in outside
                for b in [self.regions[name].bounds]
            )
            raise DataError(
                f"{self.source}: annotations lie entirely outside the {width} x {height} slide "
                f"({boxes}); is this the annotation file of another slide? On a slide with "
                "OpenSlide bounds (MIRAX), GeoJSON is read as QuPath writes it, from the "
                "corner of the bounds; GeoJSON measured from the level-0 corner needs "
                "--annotation-origin level0"
            )
        bounds: dict[str, np.ndarray] = {}
        clipped = 0
        for name in inside:
            b = self._bounds(name)
            past = (b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > width) | (b[:, 3] > height)
            clipped += int(past.sum())
            bounds[name] = np.clip(b, 0, [width, height, width, height])
        counts = replace(self.counts, clipped=self.counts.clipped + clipped)
        return replace(self, regions=inside, counts=counts, feature_bounds=bounds)

    def coverage(self, boxes: np.ndarray) -> np.ndarray:
        """Fraction of each box inside each class region, shape (N, len(classes)).

        ``boxes`` is (N, 4): x, y, width, height in level-0 pixels. Holes count as outside.
        The regions are cut into pieces of at most ``PIECE_VERTICES`` vertices (once, cached) so
        no test walks a whole 20k-vertex tumour outline; pieces are found through an R-tree, a
        box a piece covers scores its full area, and only boxes on a boundary are intersected.
        That keeps 100k tiles of a slide to a second or two.
        """
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must have shape (N, 4), got {boxes.shape}")
        out = np.zeros((len(boxes), len(self.regions)), dtype=np.float64)
        if len(boxes) == 0 or not self.regions:
            return out
        x, y, w, h = boxes.T
        if not (np.all(w > 0) and np.all(h > 0)):
            raise ValueError("box widths and heights must be positive")
        rects = shapely.box(x, y, x + w, y + h)
        tree, parts, part_class = self._index
        box_i, part_i = tree.query(rects)  # bounding boxes overlap
        touching = shapely.intersects(parts[part_i], rects[box_i])  # prepared pieces: fast
        box_i, part_i = box_i[touching], part_i[touching]
        area = w * h
        covered = shapely.covers(parts[part_i], rects[box_i])
        overlap = np.where(covered, area[box_i], 0.0)
        edge = ~covered
        overlap[edge] = shapely.area(shapely.intersection(rects[box_i[edge]], parts[part_i[edge]]))
        np.add.at(out, (box_i, part_class[part_i]), overlap)
        return np.minimum(out / area[:, None], 1.0)  # pieces are disjoint: only rounding

    def union(self) -> BaseGeometry:
        """All class regions together (e.g. "annotated at all", to restrict evaluation)."""
        return _region(shapely.union_all(list(self.regions.values())))

    @cached_property
    def _index(self) -> tuple[shapely.STRtree, np.ndarray, np.ndarray]:
        """An R-tree over the pieces of every region, the (prepared) pieces, and their classes."""
        parts: list[BaseGeometry] = []
        owner: list[int] = []
        for column, region in enumerate(self.regions.values()):
            pieces = [piece for polygon in _polygons(region) for piece in _pieces(polygon)]
            parts.extend(pieces)
            owner.extend([column] * len(pieces))
        array = np.array(parts, dtype=object)
        shapely.prepare(array)
        return shapely.STRtree(array), array, np.array(owner, dtype=np.intp)

    def _bounds(self, name: str) -> np.ndarray:
        return self.feature_bounds.get(name, np.zeros((0, 4)))


# Where GeoJSON coordinates are measured from on slides with OpenSlide bounds (MIRAX):
# "bounds" (the corner QuPath shows, the default) or "level0" (the full level-0 corner).
ANNOTATION_ORIGINS = ("bounds", "level0")


def geojson_offset(annotation_origin: str, slide_origin: tuple[int, int]) -> tuple[float, float]:
    """What to add to GeoJSON coordinates to reach OpenSlide level 0.

    QuPath measures from the corner of the OpenSlide bounds, so "bounds" adds the slide's
    origin; GeoJSON written by tools that read the full level 0 needs "level0" (nothing added).
    Slides without bounds have origin (0, 0), where both agree.

    Raises:
        DataError: ``annotation_origin`` is not one of :data:`ANNOTATION_ORIGINS`.
    """
    if annotation_origin not in ANNOTATION_ORIGINS:
        raise DataError(
            f"--annotation-origin {annotation_origin!r}: expected one of "
            f"{', '.join(ANNOTATION_ORIGINS)}"
        )
    if annotation_origin == "level0":
        return (0.0, 0.0)
    return (float(slide_origin[0]), float(slide_origin[1]))


def read_annotations(
    path: Path, *, offset: tuple[float, float] = (0.0, 0.0), holes: Sequence[str] = ()
) -> SlideAnnotations:
    """Class regions of an annotation file: QuPath GeoJSON (.geojson, .json) or ASAP XML (.xml).

    ``offset`` is added to GeoJSON coordinates: QuPath measures from the corner of the image it
    shows, which for slides with OpenSlide bounds (MIRAX) is (bounds-x, bounds-y) of OpenSlide's
    level 0. It does not apply to ASAP XML, which is written in full level-0 coordinates, so it
    is ignored there (the caller may pass the slide's offset whatever the format).

    The regions of the classes in ``holes`` are cut out of every other class and are not
    classes themselves: CAMELYON16 marks non-tumour islands inside tumour as group "_2".
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(
            f"{path}: not an annotation file; expected QuPath GeoJSON "
            f"({', '.join(GEOJSON_SUFFIXES)}) or ASAP XML ({', '.join(XML_SUFFIXES)})"
        )
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    collector = _Collector(path)
    if suffix in XML_SUFFIXES:
        _read_asap(path, collector)
    else:
        _read_geojson(path, collector, (float(offset[0]), float(offset[1])))
    return collector.finish(tuple(holes))


def label_by_coverage(coverage: np.ndarray, min_coverage: float) -> tuple[np.ndarray, np.ndarray]:
    """Per box, the class index covering at least ``min_coverage`` (-1 if none), and a reason.

    Reasons are the :class:`Reason` strings. A box two classes both claim (overlapping
    annotations) is "ambiguous" and unlabelled: guessing would put wrong labels in training
    data. Coverage within 1e-9 below the threshold counts as reaching it (float rounding).
    """
    if isinstance(min_coverage, bool) or not (
        isinstance(min_coverage, numbers.Real) and 0.0 < min_coverage <= 1.0
    ):
        raise DataError(f"min coverage {min_coverage!r}: expected a fraction in (0, 1]")
    coverage = np.asarray(coverage, dtype=np.float64)
    if coverage.ndim != 2:
        raise ValueError(f"coverage must have shape (N, classes), got {coverage.shape}")
    reached = coverage >= min_coverage - 1e-9
    n_reached = reached.sum(axis=1)
    n_touched = (coverage > 0).sum(axis=1)
    labels = np.where(n_reached == 1, reached.argmax(axis=1) if coverage.shape[1] else 0, -1)
    reasons = np.select(
        [n_reached == 1, n_reached >= 2, n_touched == 0, n_touched >= 2],
        [Reason.KEPT, Reason.AMBIGUOUS, Reason.OUTSIDE, Reason.MIXED],
        default=Reason.PARTIAL,
    )
    return labels.astype(np.int64), reasons


def slide_stems(slide: Path) -> tuple[str, ...]:
    """Names an annotation file of ``slide`` may have before its suffix.

    The stem, and for OME-TIFF also the name without ".ome.tif(f)" (QuPath strips both).
    """
    stems = [slide.stem]
    for compound in (".ome.tiff", ".ome.tif"):
        if slide.name.lower().endswith(compound):
            stems.append(slide.name[: -len(compound)])
    return tuple(dict.fromkeys(stems))


def annotation_file_for(annotations: Path, slide: Path) -> Path:
    """The annotation file of ``slide``: ``annotations`` itself, or the match in that folder.

    In a folder the file is ``<slide stem>`` + .geojson, .json or .xml (suffix in any case).
    Two matches are an error rather than a silent pick, since they may disagree.
    """
    annotations = Path(annotations)
    if annotations.is_file():
        return annotations
    if not annotations.is_dir():
        raise DataError(f"{annotations}: no such annotation file or folder")
    stems = slide_stems(Path(slide))
    found = [p for p in _annotation_files(annotations) if p.stem in stems]
    if not found:
        tried = ", ".join(stem + suffix for stem in stems for suffix in SUFFIXES)
        raise DataError(
            f"{annotations}: no annotation file for slide {Path(slide).name}; tried {tried}"
        )
    if len(found) > 1:
        raise DataError(
            f"{annotations}: several annotation files for slide {Path(slide).name} "
            f"({', '.join(p.name for p in found)}); keep one and move the others away"
        )
    return found[0]


def unmatched_annotation_files(annotations: Path, slides: Sequence[Path]) -> list[Path]:
    """Annotation files in the folder ``annotations`` that belong to none of ``slides``.

    A leftover usually means a renamed slide or a typo, whose regions would silently be
    unused. A single annotation file (not a folder) matches nothing here: it returns [].
    """
    annotations = Path(annotations)
    if not annotations.is_dir():
        return []
    stems = {stem for slide in slides for stem in slide_stems(Path(slide))}
    return [p for p in _annotation_files(annotations) if p.stem not in stems]


def _annotation_files(folder: Path) -> list[Path]:
    """Files with an annotation suffix, skipping hidden ones (macOS "._" copies, editors)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in SUFFIXES
    )


# --- reading -------------------------------------------------------------------------------


_Rings = list[np.ndarray]  # a polygon: the shell, then its holes; each (n, 2) float64


class _Collector:
    """Polygons by class, and the tally of what was kept, repaired and skipped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.features = 0
        self.kept = 0
        self.repaired = 0
        self.skipped: dict[str, int] = {}
        self.polygons: dict[str, list[BaseGeometry]] = {}
        self.bounds: dict[str, list[np.ndarray]] = {}

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def add(self, name: str, polygons: list[_Rings]) -> None:
        """One feature's polygons; invalid ones repaired, degenerate ones dropped."""
        parts: list[BaseGeometry] = []
        repaired = False
        for rings in polygons:
            if _distinct_points(rings[0]) < 3:
                continue
            holes = [hole for hole in rings[1:] if _distinct_points(hole) >= 3]
            polygon = shapely.Polygon(rings[0], holes)
            if not polygon.is_valid:
                # "structure": the area the outline encloses, even where a stroke loops over
                # itself (the default even-odd rule would punch a hole there).
                polygon = shapely.make_valid(polygon, method="structure", keep_collapsed=False)
                repaired = True
            parts.extend(p for p in _polygons(polygon) if p.area > 0)
        if not parts:
            self.skip(EMPTY)
            return
        self.kept += 1
        self.repaired += repaired
        self.polygons.setdefault(name, []).extend(parts)
        self.bounds.setdefault(name, []).append(shapely.total_bounds(parts))

    def finish(self, holes: tuple[str, ...]) -> SlideAnnotations:
        regions = {name: _region(shapely.union_all(polys)) for name, polys in self.polygons.items()}
        cut = [regions.pop(name) for name in holes if name in regions]
        if cut:
            hole = shapely.union_all(cut)
            regions = {name: _region(region.difference(hole)) for name, region in regions.items()}
            regions = {name: region for name, region in regions.items() if not region.is_empty}
        counts = AnnotationCounts(
            self.features, self.kept, self.repaired, 0, dict(sorted(self.skipped.items()))
        )
        if not regions:
            why = f" (the holes {list(holes)} cover everything)" if cut else ""
            raise DataError(
                f"{self.path}: no usable class regions{why}; {counts.summary()}. Only classified "
                "area annotations (polygons, rectangles) make regions; detections, cells, "
                "points, lines and unclassified objects are skipped"
            )
        return SlideAnnotations(
            source=self.path,
            regions=dict(sorted(regions.items())),
            counts=counts,
            feature_bounds={
                name: np.array(self.bounds[name], dtype=np.float64).reshape(-1, 4)
                for name in sorted(regions)
            },
        )


def _read_geojson(path: Path, collector: _Collector, offset: tuple[float, float]) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    expected = "a GeoJSON FeatureCollection, a Feature or an array of features"
    features: Any
    if isinstance(data, list):
        features = data
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise DataError(
                f"{path}: FeatureCollection field 'features' is {_show(features)}; expected an "
                "array of features"
            )
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict):
        raise DataError(
            f"{path}: top-level 'type' is {_show(data.get('type'))}; expected {expected}"
        )
    else:
        raise DataError(f"{path}: top level is {_show(data)}; expected {expected}")
    for index, feature in enumerate(features):
        collector.features += 1
        _read_feature(path, collector, index, feature, offset)


def _read_feature(
    path: Path, collector: _Collector, index: int, feature: Any, offset: tuple[float, float]
) -> None:
    where = f"feature {index}"
    if not isinstance(feature, dict):
        raise _bad(path, where, "the feature", feature, "a GeoJSON Feature object")
    properties = feature.get("properties") or {}
    labels = [f"id {feature['id']!r}"] if isinstance(feature.get("id"), str) else []
    if isinstance(properties, dict) and isinstance(properties.get("name"), str):
        labels.append(f"name {properties['name']!r}")
    if labels:
        where += f" ({', '.join(labels)})"
    if not isinstance(properties, dict):
        raise _bad(path, where, "properties", properties, "an object")

    kind = _object_type(path, where, feature, properties)
    if kind != "annotation":
        collector.skip(kind)
        return
    geometry = feature.get("geometry")
    if geometry is None:
        raise _bad(path, where, "geometry", geometry, "a Polygon or MultiPolygon (none given)")
    polygons = _geojson_polygons(path, where, "geometry", geometry)
    if polygons is None:
        collector.skip(NOT_AN_AREA)
        return
    name = _class_name(path, where, properties.get("classification"))
    if name is None:
        collector.skip(UNCLASSIFIED)
        return
    dx, dy = offset
    if dx or dy:
        shift = np.array([dx, dy])
        polygons = [[ring + shift for ring in rings] for rings in polygons]
    collector.add(name, polygons)


def _object_type(path: Path, where: str, feature: dict, properties: dict) -> str:
    """ "annotation", "detection", "cell", "tile", ...; a feature naming no type is an annotation.

    QuPath 0.4+ writes ``objectType``, 0.3 ``object_type``, 0.2 a class name as the feature id.
    Other tools write none: their shapes are taken as annotations.
    """
    for key in ("objectType", "object_type"):
        if key in properties:
            value = properties[key]
            if not isinstance(value, str) or not value.strip():
                raise _bad(path, where, f"properties.{key}", value, 'a string such as "annotation"')
            return value.strip().lower()
    feature_id = feature.get("id")
    if isinstance(feature_id, str):
        return _QUPATH_02_TYPES.get(feature_id, "annotation")
    return "annotation"


def _class_name(path: Path, where: str, value: Any) -> str | None:
    """The class as QuPath displays it; None when unclassified.

    QuPath 0.4+: ``{"name": "Tumor", "color": [r, g, b]}`` or, for derived classes,
    ``{"names": ["Tumor", "Positive"]}`` (shown "Tumor: Positive"); before 0.4
    ``{"name": "Tumor", "colorRGB": -3670016}``; some scripts write a bare string.
    """
    field_ = "properties.classification"
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if not isinstance(value, dict):
        raise _bad(path, where, field_, value, 'an object with "name", or a class name string')
    name = value.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise _bad(path, where, f"{field_}.name", name, "a string")
        return name.strip() or None
    names = value.get("names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _bad(path, where, f"{field_}.names", names, "a list of strings")
        return ": ".join(n.strip() for n in names if n.strip()) or None
    return None


def _geojson_polygons(path: Path, where: str, field_: str, geometry: Any) -> list[_Rings] | None:
    """The polygons of a geometry as coordinate arrays; None when it has no area."""
    if not isinstance(geometry, dict):
        raise _bad(path, where, field_, geometry, "a GeoJSON geometry object")
    kind = geometry.get("type")
    if kind in _OTHER_TYPES:
        return None
    if kind not in _AREA_TYPES:
        raise _bad(
            path, where, f"{field_}.type", kind, f"one of {', '.join(_AREA_TYPES + _OTHER_TYPES)}"
        )
    if kind == "GeometryCollection":
        members = geometry.get("geometries")
        if not isinstance(members, list):
            raise _bad(path, where, f"{field_}.geometries", members, "an array of geometries")
        found: list[_Rings] = []
        for i, member in enumerate(members):
            found.extend(_geojson_polygons(path, where, f"{field_}.geometries[{i}]", member) or [])
        return found or None
    coordinates = geometry.get("coordinates")
    field_ += ".coordinates"
    if coordinates == []:  # an empty geometry: valid GeoJSON, no area
        return []
    if kind == "Polygon":
        return [_polygon(path, where, field_, coordinates)]
    if not isinstance(coordinates, list):
        raise _bad(path, where, field_, coordinates, "an array of polygons")
    return [_polygon(path, where, f"{field_}[{i}]", p) for i, p in enumerate(coordinates)]


def _polygon(path: Path, where: str, field_: str, rings: Any) -> _Rings:
    if not isinstance(rings, list) or not rings:
        raise _bad(path, where, field_, rings, "an array of rings (the outline, then any holes)")
    return [_ring(path, where, f"{field_}[{i}]", ring) for i, ring in enumerate(rings)]


def _ring(path: Path, where: str, field_: str, ring: Any) -> np.ndarray:
    """(n, 2) float64 x, y of a ring of [x, y] (or [x, y, z]) positions."""
    if not isinstance(ring, list):
        raise _bad(path, where, field_, ring, "an array of [x, y] positions")
    if not ring:
        return np.zeros((0, 2))
    try:  # fast path: a well-formed ring converts in one call
        array = np.asarray(ring)
        if array.dtype.kind in "iuf" and array.ndim == 2 and array.shape[1] >= 2:
            xy = array[:, :2].astype(np.float64)
            if np.isfinite(xy).all():
                return xy
    except (ValueError, TypeError, OverflowError):
        pass
    # slow path: find the offending position to name it
    for i, position in enumerate(ring):
        if not isinstance(position, list) or len(position) < 2:
            raise _bad(path, where, f"{field_}[{i}]", position, "an [x, y] position")
        for j, value in enumerate(position[:2]):
            if not _is_number(value):
                raise _bad(path, where, f"{field_}[{i}][{j}]", value, "a finite number")
    return np.array([position[:2] for position in ring], dtype=np.float64)


def _read_asap(path: Path, collector: _Collector) -> None:
    """ASAP / CAMELYON16 XML: ``<ASAP_Annotations><Annotations><Annotation ...>``."""
    parser = ET.XMLParser(target=_NoDoctype())
    try:
        parser.feed(path.read_bytes())
        root = parser.close()
    except _DoctypeFound:
        raise DataError(
            f"{path}: the XML has a DOCTYPE declaration; ASAP never writes one and its entities "
            "could expand without bound, so it is refused. Remove the <!DOCTYPE ...> block"
        ) from None
    except ET.ParseError as exc:
        raise DataError(f"{path}: not valid XML ({exc})") from None
    if root.tag != "ASAP_Annotations":
        raise DataError(
            f"{path}: root element is <{root.tag}>; expected <ASAP_Annotations> (ASAP or "
            "CAMELYON16 XML)"
        )
    for index, annotation in enumerate(root.iterfind("Annotations/Annotation")):
        collector.features += 1
        _read_asap_annotation(path, collector, index, annotation)


def _read_asap_annotation(
    path: Path, collector: _Collector, index: int, annotation: ET.Element
) -> None:
    where = f"annotation {index}"
    if annotation.get("Name"):
        where += f" (Name {annotation.get('Name')!r})"
    kind = (annotation.get("Type") or "").strip()
    if kind.lower() in _ASAP_OTHERS:
        collector.skip(NOT_AN_AREA)
        return
    if kind.lower() not in _ASAP_AREAS:
        raise _bad(path, where, "Type", kind, "Polygon, Spline, Rectangle (areas) or Dot, PointSet")
    points: list[tuple[float, float, float]] = []
    for i, coordinate in enumerate(annotation.iterfind("Coordinates/Coordinate")):
        order_text = coordinate.get("Order")
        try:
            order = float(i) if order_text is None else float(int(order_text))
        except ValueError:
            raise _bad(path, where, f"Coordinate {i} Order", order_text, "an integer") from None
        x = _asap_number(path, where, f"Coordinate {i} X", coordinate.get("X"))
        y = _asap_number(path, where, f"Coordinate {i} Y", coordinate.get("Y"))
        points.append((order, x, y))
    group = (annotation.get("PartOfGroup") or "").strip()
    if group in ("", "None"):
        collector.skip(UNCLASSIFIED)
        return
    points.sort(key=lambda point: point[0])  # stable: equal orders keep document order
    ring = np.array([(x, y) for _, x, y in points], dtype=np.float64).reshape(-1, 2)
    collector.add(group, [[ring]])  # a spline is taken by its control points


def _asap_number(path: Path, where: str, field_: str, text: str | None) -> float:
    """A coordinate; some European-locale ASAP builds write a decimal comma ("1234,5")."""
    try:
        value = float((text or "").strip().replace(",", "."))
    except ValueError:
        raise _bad(path, where, field_, text, "a number") from None
    if not math.isfinite(value):
        raise _bad(path, where, field_, text, "a finite number")
    return value


class _DoctypeFound(Exception):
    pass


class _NoDoctype(ET.TreeBuilder):
    """A tree builder that stops at a DOCTYPE, before any entity it declares is expanded."""

    def doctype(self, name: str, pubid: str | None, system: str | None) -> None:
        raise _DoctypeFound(name)


# --- geometry helpers ----------------------------------------------------------------------


def _polygons(geometry: BaseGeometry) -> list[BaseGeometry]:
    """The non-empty Polygons in a geometry of any type (repairs can yield lines and points)."""
    found = []
    stack = [geometry]
    while stack:
        item = stack.pop()
        kind = shapely.get_type_id(item)
        if kind == 3 and not item.is_empty:  # Polygon
            found.append(item)
        elif kind in (6, 7):  # MultiPolygon, GeometryCollection
            stack.extend(shapely.get_parts(item))
    return found


def _region(geometry: BaseGeometry) -> BaseGeometry:
    """The polygonal part of a geometry as a Polygon or MultiPolygon (empty Polygon if none)."""
    parts = _polygons(geometry)
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return shapely.Polygon()
    return shapely.MultiPolygon(parts[::-1])  # the stack reversed them


def _pieces(polygon: BaseGeometry, depth: int = 0) -> list[BaseGeometry]:
    """``polygon`` cut in halves, recursively, until each piece has <= PIECE_VERTICES vertices.

    Halving the longer side of the bounding box keeps pieces compact; the pieces are disjoint
    and their union is the polygon (exact overlay, not the faster but "dirty" clip_by_rect).
    """
    if shapely.get_num_coordinates(polygon) <= PIECE_VERTICES or depth >= 24:
        return [polygon]
    minx, miny, maxx, maxy = polygon.bounds
    if maxx - minx >= maxy - miny:
        middle = (minx + maxx) / 2
        halves = [(minx, miny, middle, maxy), (middle, miny, maxx, maxy)]
    else:
        middle = (miny + maxy) / 2
        halves = [(minx, miny, maxx, middle), (minx, middle, maxx, maxy)]
    pieces = []
    for half in halves:
        for part in _polygons(shapely.intersection(polygon, shapely.box(*half))):
            if part.area > 0:
                pieces.extend(_pieces(part, depth + 1))
    return pieces


def _distinct_points(ring: np.ndarray) -> int:
    return len(np.unique(ring, axis=0)) if len(ring) else 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOW else text[: _SHOW - 3] + "..."


def _bad(path: Path, where: str, field_: str, value: Any, expected: str) -> DataError:
    return DataError(f"{path}: {where}: {field_} is {_show(value)}; expected {expected}")
