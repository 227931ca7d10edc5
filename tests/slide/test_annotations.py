"""Slide annotations: QuPath GeoJSON and ASAP XML read into per-class regions, tile coverage.

Every expected area and fraction below is worked out by hand from the drawn coordinates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely

from histolite.errors import DataError
from histolite.slide.annotations import (
    Reason,
    annotation_file_for,
    label_by_coverage,
    read_annotations,
    unmatched_annotation_files,
)
from histolite.slide.outputs import TileRow, write_geojson


def square(x: float, y: float, size: float) -> list[list[float]]:
    """A closed ring, counter-clockwise, of the square with corner (x, y)."""
    return [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]


def polygon(*rings: list[list[float]]) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": list(rings)}


def feature(
    geometry: dict[str, Any] | None,
    classification: Any = "Tumor",
    object_type: str | None = "annotation",
    **extra: Any,
) -> dict[str, Any]:
    """A QuPath 0.4-style feature; ``classification`` None leaves it unclassified."""
    properties: dict[str, Any] = {}
    if object_type is not None:
        properties["objectType"] = object_type
    if isinstance(classification, str):
        classification = {"name": classification, "color": [200, 0, 0]}
    if classification is not None:
        properties["classification"] = classification
    return {"type": "Feature", "geometry": geometry, "properties": properties, **extra}


def collection(*features: dict[str, Any]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": list(features)}


def write(tmp_path: Path, data: Any, name: str = "slide.geojson") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


# --- QuPath GeoJSON ------------------------------------------------------------------------


def test_feature_collection_with_a_hole_and_a_multipolygon(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        collection(
            feature(polygon(square(0, 0, 100), square(40, 40, 20)), "Tumor"),
            feature(
                {
                    "type": "MultiPolygon",
                    "coordinates": [[square(200, 0, 10)], [square(300, 0, 20)]],
                },
                "Stroma",
            ),
        ),
    )
    annotations = read_annotations(path)
    assert annotations.source == path
    assert annotations.classes == ["Stroma", "Tumor"]  # sorted: the coverage column order
    assert annotations.regions["Tumor"].area == 100 * 100 - 20 * 20
    assert annotations.regions["Stroma"].area == 10 * 10 + 20 * 20
    assert annotations.regions["Tumor"].bounds == (0.0, 0.0, 100.0, 100.0)
    assert annotations.union().area == 9600 + 500
    counts = annotations.counts
    assert (counts.features, counts.kept, counts.repaired, counts.clipped) == (2, 2, 0, 0)
    assert counts.skipped == {}


def test_bare_array_and_single_feature_read_like_a_collection(tmp_path: Path) -> None:
    one = feature(polygon(square(0, 0, 100), square(40, 40, 20)))
    from_collection = read_annotations(write(tmp_path, collection(one), "a.geojson"))
    from_array = read_annotations(write(tmp_path, [one], "b.json"))
    from_feature = read_annotations(write(tmp_path, one, "c.geojson"))
    for other in (from_array, from_feature):
        assert other.classes == ["Tumor"]
        assert other.regions["Tumor"].equals(from_collection.regions["Tumor"])
        assert other.regions["Tumor"].area == 9600


def test_every_classification_form_of_qupath(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            feature(polygon(square(0, 0, 10)), {"name": "Tumor", "color": [200, 0, 0]}),
            feature(polygon(square(20, 0, 10)), {"names": ["Tumor", "Positive"]}),
            feature(polygon(square(40, 0, 10)), "Stroma"),  # helper writes name + color
            {
                "type": "Feature",
                "geometry": polygon(square(60, 0, 10)),
                "properties": {"classification": "Necrosis"},
            },  # a bare string, no object type
            {
                "type": "Feature",
                "id": "PathAnnotationObject",
                "geometry": polygon(square(80, 0, 10)),
                "properties": {"classification": {"name": "Immune", "colorRGB": -3670016}},
            },
        ],
    )
    annotations = read_annotations(path)
    assert annotations.classes == ["Immune", "Necrosis", "Stroma", "Tumor", "Tumor: Positive"]
    assert all(region.area == 100 for region in annotations.regions.values())
    assert annotations.counts.kept == 5


def test_only_annotations_are_kept_and_the_rest_is_counted(tmp_path: Path) -> None:
    area = polygon(square(0, 0, 10))
    path = write(
        tmp_path,
        collection(
            feature(area, object_type="annotation"),
            feature(area, object_type="detection"),
            feature(area, object_type="cell"),
            feature(area, object_type="cell"),
            feature(area, object_type="tile"),
            feature(area, object_type="tma_core"),
            {
                "type": "Feature",
                "geometry": area,
                "properties": {"object_type": "detection", "classification": {"name": "Tumor"}},
            },  # QuPath 0.3
            {
                "type": "Feature",
                "id": "PathDetectionObject",
                "geometry": area,
                "properties": {"classification": {"name": "Tumor", "colorRGB": -1}},
            },  # QuPath 0.2
            {"type": "Feature", "id": "PathCellObject", "geometry": area, "properties": {}},
            {
                "type": "Feature",
                "id": "PathAnnotationObject",
                "geometry": polygon(square(20, 0, 10)),
                "properties": {"classification": {"name": "Tumor"}},
            },
            feature(polygon(square(40, 0, 10)), object_type=None),  # generic GeoJSON
            feature(area, classification=None),
            feature({"type": "Point", "coordinates": [5, 5]}),
            feature({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}),
        ),
    )
    annotations = read_annotations(path)
    assert annotations.counts.features == 14
    assert annotations.counts.kept == 3
    assert annotations.counts.skipped == {
        "cell": 3,
        "detection": 3,
        "not an area": 2,
        "tile": 1,
        "tma_core": 1,
        "unclassified": 1,
    }
    assert annotations.regions["Tumor"].area == 300
    summary = annotations.counts.summary()
    assert summary.startswith("14 features: 3 kept; skipped 3 cell, 3 detection")


def test_geometry_collection_keeps_its_polygons(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            feature(
                {
                    "type": "GeometryCollection",
                    "geometries": [
                        polygon(square(0, 0, 10)),
                        {"type": "Point", "coordinates": [50, 50]},
                        {"type": "MultiPolygon", "coordinates": [[square(20, 0, 5)]]},
                    ],
                }
            ),
            feature(
                {
                    "type": "GeometryCollection",
                    "geometries": [{"type": "Point", "coordinates": [1, 1]}],
                }
            ),
        ],
    )
    annotations = read_annotations(path)
    assert annotations.regions["Tumor"].area == 100 + 25
    assert annotations.counts.skipped == {"not an area": 1}


def test_overlapping_annotations_of_a_class_are_counted_once(tmp_path: Path) -> None:
    path = write(tmp_path, [feature(polygon(square(0, 0, 10))), feature(polygon(square(5, 5, 10)))])
    assert read_annotations(path).regions["Tumor"].area == 100 + 100 - 25


def test_offset_is_added_to_geojson_coordinates(tmp_path: Path) -> None:
    path = write(tmp_path, [feature(polygon(square(0, 0, 100), square(40, 40, 20)))])
    annotations = read_annotations(path, offset=(1000.0, 500.0))
    assert annotations.regions["Tumor"].bounds == (1000.0, 500.0, 1100.0, 600.0)
    assert annotations.regions["Tumor"].area == 9600
    hole = shapely.box(1040, 540, 1060, 560)
    assert annotations.regions["Tumor"].intersection(hole).area == 0


def test_written_tiles_round_trip_through_the_same_offset(tmp_path: Path) -> None:
    """Tiles go out in QuPath's frame (minus the bounds origin) and read back where they were."""
    rows = [
        TileRow(0, 1064, 532, 128, 1.0, (0.9, 0.1)),
        TileRow(1, 1192, 532, 128, 1.0, (0.2, 0.8)),
    ]
    path = tmp_path / "tiles.geojson"
    write_geojson(path, rows, ["Tumor", "Stroma"], origin=(1000, 500))
    collection = json.loads(path.read_text())
    first = collection["features"][0]["geometry"]["coordinates"][0]
    assert first[0] == [64, 32] and first[2] == [192, 160]
    for tile in collection["features"]:  # as if a pathologist kept the tiles as annotations
        tile["properties"]["objectType"] = "annotation"
    path.write_text(json.dumps(collection))
    back = read_annotations(path, offset=(1000.0, 500.0))
    assert back.regions["Tumor"].bounds == (1064.0, 532.0, 1192.0, 660.0)
    assert back.regions["Stroma"].bounds == (1192.0, 532.0, 1320.0, 660.0)


def test_a_bow_tie_is_repaired_and_degenerate_rings_are_skipped(tmp_path: Path) -> None:
    bow_tie = [[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]  # crosses itself at (5, 5)
    two_points = [[50, 50], [60, 60], [50, 50], [50, 50]]
    collinear = [[70, 70], [80, 80], [90, 90], [70, 70]]
    path = write(
        tmp_path,
        [
            feature(polygon(bow_tie)),
            feature(polygon(two_points)),
            feature(polygon(collinear)),
            feature({"type": "Polygon", "coordinates": []}),
            feature(polygon(square(100, 0, 10))),
        ],
    )
    annotations = read_annotations(path)
    # Two triangles of base 10 and height 5 meet at the crossing: 25 each.
    assert annotations.regions["Tumor"].area == 25 + 25 + 100
    assert annotations.regions["Tumor"].is_valid
    assert annotations.counts.repaired == 1
    assert annotations.counts.kept == 2
    assert annotations.counts.skipped == {"empty": 3}
    assert "2 kept (1 repaired)" in annotations.counts.summary()


def test_a_stroke_looping_over_itself_keeps_the_enclosed_area(tmp_path: Path) -> None:
    # Around the 10 x 10 square, then around a 6 x 6 square inside it: the overlap stays in.
    ring = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0], [2, 2], [8, 2], [8, 8], [2, 8], [2, 2]]
    annotations = read_annotations(write(tmp_path, [feature(polygon(ring))]))
    assert annotations.regions["Tumor"].area == 100
    assert annotations.counts.repaired == 1


# --- coverage and labels ---------------------------------------------------------------------


@pytest.fixture
def tumour_and_stroma(tmp_path: Path) -> Any:
    """Tumor: 100 x 100 at the origin with a 20 x 20 hole at (40, 40); Stroma: right of it."""
    return read_annotations(
        write(
            tmp_path,
            [
                feature(polygon(square(0, 0, 100), square(40, 40, 20)), "Tumor"),
                feature(polygon(square(100, 0, 100)), "Stroma"),
            ],
        )
    )


def test_coverage_of_boxes_is_exact(tumour_and_stroma: Any) -> None:
    boxes = np.array(
        [
            [10, 10, 20, 20],  # inside Tumor
            [-10, 10, 20, 20],  # half over Tumor's left edge
            [40, 40, 20, 20],  # exactly the hole
            [30, 30, 20, 20],  # a quarter on the hole
            [90, 10, 20, 20],  # half Tumor, half Stroma
            [-2, 0, 20, 20],  # 18 of 20 columns in Tumor: 0.9
            [500, 500, 10, 10],  # nowhere
            [150, 50, 30, 30],  # inside Stroma
        ]
    )
    coverage = tumour_and_stroma.coverage(boxes)
    assert tumour_and_stroma.classes == ["Stroma", "Tumor"]
    assert coverage.dtype == np.float64
    expected = [
        [0.0, 1.0],
        [0.0, 0.5],
        [0.0, 0.0],
        [0.0, 0.75],
        [0.5, 0.5],
        [0.0, 0.9],
        [0.0, 0.0],
        [1.0, 0.0],
    ]
    np.testing.assert_allclose(coverage, expected, rtol=0, atol=1e-12)

    labels, reasons = label_by_coverage(coverage, 0.9)
    assert labels.tolist() == [1, -1, -1, -1, -1, 1, -1, 0]
    assert reasons.tolist() == [
        Reason.KEPT,
        Reason.PARTIAL,
        Reason.OUTSIDE,
        Reason.PARTIAL,
        Reason.MIXED,
        Reason.KEPT,
        Reason.OUTSIDE,
        Reason.KEPT,
    ]
    assert (reasons == Reason.KEPT).sum() == 3  # plain strings: numpy compares them


def test_coverage_of_no_boxes_and_bad_boxes(tumour_and_stroma: Any) -> None:
    assert tumour_and_stroma.coverage(np.zeros((0, 4), dtype=int)).shape == (0, 2)
    with pytest.raises(ValueError, match="shape"):
        tumour_and_stroma.coverage(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="positive"):
        tumour_and_stroma.coverage(np.array([[0, 0, 0, 10]]))


def test_overlapping_classes_make_a_box_ambiguous(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            feature(polygon(square(0, 0, 100)), "Tumor"),
            feature(polygon(square(0, 0, 50)), "Necrosis"),
        ],
    )
    annotations = read_annotations(path)
    coverage = annotations.coverage(np.array([[10, 10, 20, 20], [60, 60, 20, 20]]))
    np.testing.assert_allclose(coverage, [[1.0, 1.0], [0.0, 1.0]], rtol=0, atol=1e-12)
    labels, reasons = label_by_coverage(coverage, 0.9)
    assert labels.tolist() == [-1, 1]
    assert reasons.tolist() == [Reason.AMBIGUOUS, Reason.KEPT]


def test_label_by_coverage_rules() -> None:
    coverage = np.array(
        [
            [0.95, 0.05, 0.0],  # one class reaches the threshold despite a neighbour: kept
            [0.5, 0.3, 0.0],  # two classes, neither reaches it: mixed
            [0.0, 0.0, 0.4],  # one class below it: partial
            [0.0, 0.0, 0.0],  # outside
            [0.9, 0.9, 0.0],  # two reach it: ambiguous
            [0.0, 0.0, 0.9 - 1e-12],  # within rounding of the threshold: kept
        ]
    )
    labels, reasons = label_by_coverage(coverage, 0.9)
    assert labels.dtype == np.int64
    assert labels.tolist() == [0, -1, -1, -1, -1, 2]
    assert reasons.tolist() == ["kept", "mixed", "partial", "outside", "ambiguous", "kept"]
    labels, reasons = label_by_coverage(coverage, 1.0)
    assert labels.tolist() == [-1] * 6
    for bad in (0, 0.0, -0.1, 1.01, math.nan, True):
        with pytest.raises(DataError, match="min coverage"):
            label_by_coverage(coverage, bad)


def test_coverage_of_10k_boxes_matches_one_box_at_a_time(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    angles = np.linspace(0, 2 * np.pi, 3000, endpoint=False)  # many vertices: cut into pieces
    radius = 4000 + 600 * np.sin(9 * angles) + 40 * rng.standard_normal(len(angles))
    blob = np.c_[5000 + radius * np.cos(angles), 5000 + radius * np.sin(angles)]
    blob_ring = [*blob.tolist(), blob[0].tolist()]
    hole = square(4500, 4500, 700)
    features = [feature(polygon(blob_ring, hole), "Tumor")]
    for cx, cy in rng.uniform(0, 10000, (40, 2)):
        sides = np.linspace(0, 2 * np.pi, 12, endpoint=False)
        ring = np.c_[cx + 300 * np.cos(sides), cy + 300 * np.sin(sides)]
        features.append(feature(polygon([*ring.tolist(), ring[0].tolist()]), "Stroma"))
    annotations = read_annotations(write(tmp_path, features))

    xy = rng.integers(-500, 10500, (10_000, 2))
    sizes = rng.integers(50, 600, (10_000, 1))
    boxes = np.hstack([xy, sizes, sizes])
    coverage = annotations.coverage(boxes)
    assert coverage.shape == (10_000, 2)
    assert coverage.min() >= 0.0 and coverage.max() <= 1.0
    assert 0.0 < coverage[:, 1].mean() < 1.0  # the sample hits inside, outside and edges
    sample = rng.choice(10_000, 300, replace=False)
    for i in sample:
        x, y, w, h = boxes[i]
        box = shapely.box(x, y, x + w, y + h)
        for column, name in enumerate(annotations.classes):
            slow = annotations.regions[name].intersection(box).area / (w * h)
            assert coverage[i, column] == pytest.approx(slow, abs=1e-9)


# --- ASAP / CAMELYON16 XML -------------------------------------------------------------------


def asap(*annotations: str) -> str:
    return (
        '<?xml version="1.0"?>\n<ASAP_Annotations>\n<Annotations>\n'
        + "\n".join(annotations)
        + "\n</Annotations>\n<AnnotationGroups>\n"
        '<Group Name="_0" PartOfGroup="None" Color="#ff0000"><Attributes /></Group>\n'
        "</AnnotationGroups>\n</ASAP_Annotations>\n"
    )


def annotation(
    name: str, kind: str, group: str, points: list[tuple[Any, Any]], order: list[int] | None = None
) -> str:
    """``points`` in ring order; ``order`` writes them in another document order."""
    written = order if order is not None else list(range(len(points)))
    coordinates = "".join(
        f'<Coordinate Order="{i}" X="{points[i][0]}" Y="{points[i][1]}" />' for i in written
    )
    return (
        f'<Annotation Name="{name}" Type="{kind}" PartOfGroup="{group}" Color="#F4FA58">'
        f"<Coordinates>{coordinates}</Coordinates></Annotation>"
    )


def corners(x: float, y: float, size: float) -> list[tuple[Any, Any]]:
    return [(x, y), (x + size, y), (x + size, y + size), (x, y + size)]


def camelyon(tmp_path: Path) -> Path:
    return write(
        tmp_path,
        asap(
            # Written out of order: read in document order it would be a bow-tie.
            annotation("Annotation 0", "Polygon", "_0", corners(0, 0, 100), order=[0, 2, 1, 3]),
            annotation("Annotation 1", "Polygon", "_2", corners(40, 40, 20)),
            annotation(
                "Annotation 2",
                "Rectangle",
                "_1",
                [("200,5", "0"), ("300", "0"), ("300", "50"), ("200,5", "50")],
            ),
            annotation("Annotation 3", "Spline", "_1", [(0, 200), (100, 200), (0, 300)]),
            annotation("Annotation 4", "Dot", "_0", [(5, 5)]),
            annotation("Annotation 5", "PointSet", "_0", [(5, 5), (6, 6)]),
            annotation("Annotation 6", "Polygon", "None", corners(500, 500, 10)),
        ),
        "tumor_001.xml",
    )


def test_asap_xml_with_camelyon_exclusions(tmp_path: Path) -> None:
    annotations = read_annotations(camelyon(tmp_path), holes=("_2",))
    assert annotations.classes == ["_0", "_1"]
    assert annotations.regions["_0"].area == 100 * 100 - 20 * 20  # the _2 island cut out
    # rectangle 200.5..300 x 0..50 (decimal commas) and a triangle of legs 100
    assert annotations.regions["_1"].area == 99.5 * 50 + 100 * 100 / 2
    counts = annotations.counts
    assert (counts.features, counts.kept, counts.repaired) == (7, 4, 0)
    assert counts.skipped == {"not an area": 2, "unclassified": 1}


def test_asap_xml_without_holes_keeps_the_exclusion_group_as_a_class(tmp_path: Path) -> None:
    annotations = read_annotations(camelyon(tmp_path), offset=(1000.0, 1000.0))
    assert annotations.classes == ["_0", "_1", "_2"]
    assert annotations.regions["_0"].area == 10000
    assert annotations.regions["_2"].bounds == (40.0, 40.0, 60.0, 60.0)  # offset not applied


def test_asap_xml_with_a_doctype_is_refused(tmp_path: Path) -> None:
    bomb = (
        '<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
        '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>\n'
        '<ASAP_Annotations><Annotations><Annotation Name="&lol2;" Type="Polygon" '
        'PartOfGroup="_0"><Coordinates /></Annotation></Annotations></ASAP_Annotations>'
    )
    path = write(tmp_path, bomb, "bomb.xml")
    with pytest.raises(DataError, match="DOCTYPE") as error:
        read_annotations(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<ASAP_Annotations><Annotations>", "not valid XML"),
        ("<Annotations />", "root element is <Annotations>; expected <ASAP_Annotations>"),
        (
            asap(annotation("Tumour A", "Polygon", "_0", [(0, 0), ("abc", 0), (5, 5)])),
            "annotation 0 (Name 'Tumour A'): Coordinate 1 X is 'abc'; expected a number",
        ),
        (
            asap(annotation("B", "Circle", "_0", corners(0, 0, 5))),
            "annotation 0 (Name 'B'): Type is 'Circle'; expected Polygon",
        ),
        (
            asap(annotation("C", "Dot", "_0", [(1, 1)])),
            "no usable class regions; 1 features: 0 kept; skipped 1 not an area",
        ),
    ],
)
def test_bad_asap_xml_is_explained(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text, "bad.xml")
    with pytest.raises(DataError) as error:
        read_annotations(path)
    assert str(path) in str(error.value)
    assert message in str(error.value)


# --- errors --------------------------------------------------------------------------------


def test_invalid_json_names_the_file_and_the_place(tmp_path: Path) -> None:
    path = write(tmp_path, '{"type": "FeatureCollection", "features": [}')
    with pytest.raises(DataError, match="not valid JSON") as error:
        read_annotations(path)
    assert str(path) in str(error.value)
    assert "line 1" in str(error.value)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (42, "top level is 42; expected a GeoJSON FeatureCollection, a Feature or an array"),
        ({"type": "Polygon"}, "top-level 'type' is 'Polygon'; expected a GeoJSON"),
        ({"type": "FeatureCollection", "features": {}}, "'features' is {}; expected an array"),
        (["not a feature"], "feature 0: the feature is 'not a feature'; expected a GeoJSON"),
        (
            [{"type": "Feature", "id": "abc-1", "properties": {"name": "Tumour 1"}}],
            "feature 0 (id 'abc-1', name 'Tumour 1'): geometry is None; expected a Polygon",
        ),
        (
            [
                feature(polygon(square(0, 0, 5))),
                feature(polygon([[0, 0], [10, 0], ["ten", 10], [0, 0]])),
            ],
            "feature 1: geometry.coordinates[0][2][0] is 'ten'; expected a finite number",
        ),
        (
            [feature(polygon([[0, 0], [10, 0], [5], [0, 0]]))],
            "geometry.coordinates[0][2] is [5]; expected an [x, y] position",
        ),
        (
            [feature({"type": "Circle", "coordinates": [0, 0]})],
            "geometry.type is 'Circle'; expected one of Polygon, MultiPolygon",
        ),
        (
            [feature(polygon(square(0, 0, 5)), classification=7)],
            "properties.classification is 7; expected an object",
        ),
        (
            [feature(polygon(square(0, 0, 5)), classification={"names": "Tumor"})],
            "properties.classification.names is 'Tumor'; expected a list of strings",
        ),
        (
            [feature(polygon(square(0, 0, 5)), object_type=None, properties=[1])],
            "feature 0: properties is [1]; expected an object",
        ),
        (
            [feature(polygon(square(0, 0, 5)), object_type="detection")] * 2,
            "no usable class regions; 2 features: 0 kept; skipped 2 detection",
        ),
        (collection(), "no usable class regions; 0 features: 0 kept"),
    ],
)
def test_bad_geojson_is_explained(tmp_path: Path, data: Any, message: str) -> None:
    path = write(tmp_path, data)
    with pytest.raises(DataError) as error:
        read_annotations(path)
    assert str(path) in str(error.value)
    assert message in str(error.value)


def test_a_long_bad_value_is_shortened(tmp_path: Path) -> None:
    path = write(tmp_path, [feature(polygon([[0, 0], [1, 0], ["x" * 500, 1], [0, 0]]))])
    with pytest.raises(DataError) as error:
        read_annotations(path)
    assert "'xxxx" in str(error.value)
    assert "x" * 100 not in str(error.value)
    assert "..." in str(error.value)


def test_unknown_suffix_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"slide\.txt: not an annotation file.*\.geojson"):
        read_annotations(write(tmp_path, "[]", "slide.txt"))
    with pytest.raises(DataError, match="not found"):
        read_annotations(tmp_path / "missing.geojson")


# --- checks against the slide, class selection ------------------------------------------------


def test_check_inside_clips_features_partly_outside(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            feature(polygon(square(-10, 0, 100)), "Tumor"),  # 10 columns left of the slide
            feature(polygon(square(0, 200, 50)), "Tumor"),
            feature(polygon(square(900, 900, 200)), "Stroma"),  # 100 x 100 on the slide
        ],
    )
    annotations = read_annotations(path)
    inside = annotations.check_inside(1000, 1000)
    assert inside is not annotations
    assert annotations.regions["Tumor"].area == 10000 + 2500  # the original is unchanged
    assert inside.regions["Tumor"].area == 90 * 100 + 2500
    assert inside.regions["Stroma"].area == 100 * 100
    assert inside.counts.clipped == 2
    assert "(2 clipped)" in inside.counts.summary()
    assert inside.check_inside(1000, 1000).counts.clipped == 2  # nothing more to clip


def test_check_inside_refuses_a_class_wholly_outside(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            feature(polygon(square(0, 0, 10)), "Tumor"),
            feature(polygon(square(5000, 0, 10)), "Stroma"),
        ],
    )
    with pytest.raises(DataError) as error:
        read_annotations(path).check_inside(1000, 800)
    message = str(error.value)
    assert str(path) in message
    assert "'Stroma' spans x 5000..5010, y 0..10" in message
    assert "1000 x 800 slide" in message
    assert "Tumor" not in message


def test_select_renames_and_merges_classes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            feature(polygon(square(0, 0, 10)), "Tumor"),
            feature(polygon(square(5, 0, 10)), {"names": ["Tumor", "Positive"]}),
            feature(polygon(square(100, 0, 10)), "Stroma"),
            feature(polygon(square(200, 0, 10)), "Other"),
        ],
    )
    annotations = read_annotations(path)
    selected = annotations.select(
        {"Tumor": "tumour", "Tumor: Positive": "tumour", "Stroma": "stroma"}
    )
    assert selected.classes == ["stroma", "tumour"]
    assert selected.regions["tumour"].area == 15 * 10  # the two overlap by 5 x 10
    assert selected.regions["stroma"].area == 100
    assert annotations.classes == ["Other", "Stroma", "Tumor", "Tumor: Positive"]
    with pytest.raises(DataError) as error:
        annotations.select({"Tumour": "tumour"})
    assert "'Tumour' not in the annotations" in str(error.value)
    assert "the file has 'Other', 'Stroma', 'Tumor', 'Tumor: Positive'" in str(error.value)
    with pytest.raises(DataError, match="no classes selected"):
        annotations.select({})
    # Each merged feature is still counted: only "Tumor: Positive" (x 5..15) passes x = 12.
    clipped = selected.select({"tumour": "tumour"}).check_inside(12, 1000)
    assert clipped.classes == ["tumour"]
    assert clipped.regions["tumour"].area == 12 * 10
    assert clipped.counts.clipped == 1


# --- finding the file of a slide -------------------------------------------------------------


def test_annotation_file_for_a_file_or_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "annotations"
    folder.mkdir()
    (folder / "case_1.geojson").write_text("[]")
    (folder / "case_2.XML").write_text("<x/>")
    (folder / "case_3.ome.json").write_text("[]")
    (folder / "._case_1.geojson").write_text("")  # macOS litter
    (folder / "notes.txt").write_text("")
    single = folder / "case_1.geojson"
    assert annotation_file_for(single, Path("anything.svs")) == single
    assert annotation_file_for(folder, Path("/slides/case_1.svs")) == single
    assert annotation_file_for(folder, Path("case_2.mrxs")) == folder / "case_2.XML"
    assert annotation_file_for(folder, Path("case_3.ome.tiff")) == folder / "case_3.ome.json"

    with pytest.raises(DataError) as error:
        annotation_file_for(folder, Path("case_9.svs"))
    assert str(folder) in str(error.value)
    assert "tried case_9.geojson, case_9.json, case_9.xml" in str(error.value)

    (folder / "case_1.xml").write_text("<x/>")
    with pytest.raises(DataError) as error:
        annotation_file_for(folder, Path("case_1.svs"))
    assert "case_1.geojson, case_1.xml" in str(error.value)
    assert "keep one" in str(error.value)

    with pytest.raises(DataError, match="no such annotation file or folder"):
        annotation_file_for(tmp_path / "nowhere", Path("case_1.svs"))


def test_unmatched_annotation_files(tmp_path: Path) -> None:
    (tmp_path / "case_1.geojson").write_text("[]")
    (tmp_path / "case_2.xml").write_text("<x/>")
    (tmp_path / "case_3.json").write_text("[]")
    (tmp_path / "readme.md").write_text("")
    slides = [Path("case_1.svs"), Path("case_3.ome.tif")]
    assert unmatched_annotation_files(tmp_path, slides) == [tmp_path / "case_2.xml"]
    assert unmatched_annotation_files(tmp_path / "case_1.geojson", slides) == []
