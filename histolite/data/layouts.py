"""How each public dataset lays out its files, and what its file names encode.

A layout turns a dataset folder into :class:`LabelledImages` whose ``group`` is the patient
wherever the dataset names one, so that splits can keep a patient's images together. Parsers
are strict: a file name that does not follow the published pattern is an error naming the file,
because a silently skipped or mislabelled image is worse than a stopped run.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from histolite.data.feature_bags import FEATURE_SUFFIX
from histolite.data.folder import LabelledImages, Sample, scan_image_folder
from histolite.data.registry import DatasetSpec, get_dataset
from histolite.errors import DataError
from histolite.registry import Registry


@dataclass(frozen=True)
class LayoutOptions:
    """Choices a dataset's layout may offer.

    Attributes:
        labels: label scheme, for datasets with more than one (BreakHis: binary or subtype).
        magnification: keep only this magnification (BreakHis: 40, 100, 200 or 400).
        group_regex: for plain class folders, the regex whose first group is the slide/patient.
    """

    labels: str | None = None
    magnification: int | None = None
    group_regex: str | None = None


LayoutParser = Callable[[Path, DatasetSpec, LayoutOptions], LabelledImages]
_LAYOUTS: Registry[LayoutParser] = Registry("layout")
register_layout = _LAYOUTS.register


def scan_dataset(
    dataset: str,
    root: str | Path,
    *,
    labels: str | None = None,
    magnification: int | None = None,
    group_regex: str | None = None,
) -> LabelledImages:
    """Index a dataset folder with its registered layout (labels, patients, metadata)."""
    spec = get_dataset(dataset)
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    if labels is not None and labels not in spec.label_schemes:
        offered = ", ".join(spec.label_schemes) or "none"
        raise DataError(
            f"data.labels={labels!r} is not offered by dataset {dataset!r} (offered: {offered})"
        )
    if magnification is not None and spec.layout != "breakhis":
        raise DataError(f"data.magnification applies to BreakHis only, not to {dataset!r}")
    options = LayoutOptions(labels=labels, magnification=magnification, group_regex=group_regex)
    return _LAYOUTS[spec.layout](root, spec, options)


def _non_empty(images: LabelledImages, root: Path, expected: str) -> LabelledImages:
    if not images.samples:
        raise DataError(f"{root}: no images found; expected {expected}")
    return images


@register_layout("class_folders")
def _class_folders(root: Path, spec: DatasetSpec, options: LayoutOptions) -> LabelledImages:
    images = scan_image_folder(root, group_regex=options.group_regex)
    if spec.classes:
        unknown = sorted(set(images.classes) - set(spec.classes))
        if unknown:
            raise DataError(
                f"{root}: class folder(s) {unknown} are not classes of {spec.name} "
                f"(expected some of {list(spec.classes)})"
            )
    return images


@register_layout("feature_bags")
def _feature_bags(root: Path, spec: DatasetSpec, options: LayoutOptions) -> LabelledImages:
    """``ROOT/<class>/<slide>.npz``: one feature file per slide (``histolite slide features``)."""
    class_dirs = sorted(
        d for d in root.iterdir() if d.is_dir() and any(d.glob(f"*{FEATURE_SUFFIX}"))
    )
    samples = [
        Sample(path, label, folder.name, group=path.stem)
        for label, folder in enumerate(class_dirs)
        for path in sorted(folder.glob(f"*{FEATURE_SUFFIX}"))
    ]
    classes = tuple(d.name for d in class_dirs)
    return _non_empty(
        LabelledImages(classes, tuple(samples)), root, "ROOT/<class>/<slide>.npz feature files"
    )


@register_layout("bach2018")
def _bach(root: Path, spec: DatasetSpec, options: LayoutOptions) -> LabelledImages:
    """``[ICIAR2018_BACH_Challenge/]Photos/{Normal,Benign,InSitu,Invasive}/*.tif``.

    BACH publishes no patient ids, so each photo is its own group: patches cut from one photo
    still never cross splits.
    """
    classes = spec.classes  # Normal, Benign, InSitu, Invasive: the registry entry's order
    candidates = [root / "ICIAR2018_BACH_Challenge" / "Photos", root / "Photos", root]
    photos = next((c for c in candidates if all((c / n).is_dir() for n in classes)), None)
    if photos is None:
        raise DataError(
            f"{root}: BACH layout not found; expected ICIAR2018_BACH_Challenge/Photos/"
            f"{{{','.join(classes)}}}/*.tif"
        )
    samples = [
        Sample(path, label, name, group=path.stem)
        for label, name in enumerate(classes)
        for path in sorted((photos / name).glob("*.tif"))
    ]
    return _non_empty(LabelledImages(classes, tuple(samples)), photos, "*.tif photos")


BREAKHIS_NAME = re.compile(
    r"^SOB_(?P<tumour>[BM])_(?P<subtype>[A-Z]{1,2})-(?P<year>\d{2})-(?P<patient>[0-9]+[A-Z]*)"
    r"-(?P<magnification>40|100|200|400)-(?P<seq>\d{3})\.png$"
)
BREAKHIS_SUBTYPES = {
    "A": ("B", "adenosis"),
    "F": ("B", "fibroadenoma"),
    "PT": ("B", "phyllodes_tumor"),
    "TA": ("B", "tubular_adenoma"),
    "DC": ("M", "ductal_carcinoma"),
    "LC": ("M", "lobular_carcinoma"),
    "MC": ("M", "mucinous_carcinoma"),
    "PC": ("M", "papillary_carcinoma"),
}
BREAKHIS_BINARY = ("benign", "malignant")
BREAKHIS_SUBTYPE_CLASSES = tuple(name for _, name in BREAKHIS_SUBTYPES.values())


def parse_breakhis_name(path: Path) -> dict[str, str]:
    """Tumour class, subtype, patient and magnification from a BreakHis file name.

    ``SOB_B_A-14-22549AB-40-001.png``: benign (B), adenosis (A), year 2014, patient 22549AB,
    40X, image 001. The patient id keeps the year (``14-22549AB``), as the folders do.
    """
    match = BREAKHIS_NAME.match(path.name)
    if match is None:
        raise DataError(
            f"{path}: not a BreakHis file name; expected "
            "SOB_<B|M>_<subtype>-<year>-<patient>-<40|100|200|400>-<seq>.png"
        )
    tumour, subtype = match["tumour"], match["subtype"]
    if BREAKHIS_SUBTYPES.get(subtype, ("", ""))[0] != tumour:
        raise DataError(
            f"{path}: subtype {subtype!r} does not belong to tumour class {tumour!r} "
            f"(benign: A, F, PT, TA; malignant: DC, LC, MC, PC)"
        )
    return {
        "tumour": BREAKHIS_BINARY[0] if tumour == "B" else BREAKHIS_BINARY[1],
        "subtype": BREAKHIS_SUBTYPES[subtype][1],
        "patient": f"{match['year']}-{match['patient']}",
        "magnification": match["magnification"],
        "seq": match["seq"],
    }


@register_layout("breakhis")
def _breakhis(root: Path, spec: DatasetSpec, options: LayoutOptions) -> LabelledImages:
    """Every ``SOB_*.png`` under ``root`` (the folder tree is not needed: names say it all)."""
    scheme = options.labels or "binary"
    classes = BREAKHIS_BINARY if scheme == "binary" else BREAKHIS_SUBTYPE_CLASSES
    key = "tumour" if scheme == "binary" else "subtype"
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for path in sorted(root.rglob("*.png")):
        meta = parse_breakhis_name(path)
        if (
            options.magnification is not None
            and int(meta["magnification"]) != options.magnification
        ):
            continue
        samples.append(Sample(path, index[meta[key]], meta[key], meta["patient"], meta))
    where = f" at {options.magnification}X" if options.magnification else ""
    return _non_empty(
        LabelledImages(classes, tuple(samples)), root, f"SOB_*.png BreakHis images{where}"
    )


IDC_NAME = re.compile(r"^(?P<patient>\d+)_idx5_x(?P<x>\d+)_y(?P<y>\d+)_class(?P<label>[01])\.png$")


def parse_idc_name(path: Path) -> dict[str, str]:
    """Patient, patch coordinates and class of an IDC patch, checked against its folders."""
    match = IDC_NAME.match(path.name)
    if match is None:
        raise DataError(
            f"{path}: not an IDC patch name; expected <patient>_idx5_x<X>_y<Y>_class<0|1>.png"
        )
    if path.parent.name != match["label"] or path.parent.parent.name != match["patient"]:
        raise DataError(
            f"{path}: name says patient {match['patient']}, class {match['label']}, but the file "
            f"lies in {path.parent.parent.name}/{path.parent.name}/; expected "
            "<patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<0|1>.png"
        )
    return {"patient": match["patient"], "x": match["x"], "y": match["y"], "class": match["label"]}


@register_layout("idc")
def _idc(root: Path, spec: DatasetSpec, options: LayoutOptions) -> LabelledImages:
    """``<patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<0|1>.png`` (50 x 50 px patches)."""
    samples = []
    for path in sorted(root.rglob("*_idx5_*.png")):
        meta = parse_idc_name(path)
        label = int(meta["class"])
        samples.append(Sample(path, label, spec.classes[label], meta["patient"], meta))
    return _non_empty(
        LabelledImages(spec.classes, tuple(samples)),
        root,
        "<patient>/<0|1>/<patient>_idx5_x<X>_y<Y>_class<0|1>.png",
    )
