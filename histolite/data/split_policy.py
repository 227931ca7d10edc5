"""Split policy: which images may sit on which side of a split, decided once per run.

A :class:`SplitPolicy` says whether a dataset is split by group or by image, what a group is
(source image, patient, slide, or a user regex), and how validation is drawn. :func:`load_split`
decides it, indexes the images, calls the assignment (``splits.make_split``) once, builds the
parts and the report, all in one pass (or reads a split CSV), and returns one :class:`Split`
that training, distillation and evaluation pass on; nothing downstream decides splits again.
"""

from __future__ import annotations

import csv
import re
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from histolite.config import DataConfig
from histolite.data.folder import LabelledImages, Sample
from histolite.data.layouts import scan_dataset
from histolite.data.registry import get_dataset, is_slide_tile_dataset, list_datasets
from histolite.data.splits import SPLIT_NAMES, LeakageWarning, make_split, read_split_csv
from histolite.errors import DataError

GROUP_DESCRIPTIONS = {
    "source_image": "tiles cut from one source image",
    "patient": "images of one patient",
    "slide": "images of one slide",
    "group": "files whose names match data.group_regex with the same key",
    "image": "one image (no grouping known)",
}


@dataclass(frozen=True)
class SplitPolicy:
    """How one dataset is split."""

    grouped: bool
    group_kind: str
    group_regex: str | None
    val_split_by: str
    val: float
    test: float
    seed: int

    def describe(self) -> str:
        level = f"{self.group_kind}-level" if self.grouped else "image-level (stratified)"
        if self.grouped and self.val and self.val_split_by == "stratified":
            level += "; validation: images of the training groups"
        elif self.grouped and self.val and self.val_split_by == "group_if_possible":
            level += "; validation: whole groups where a class has enough, else images"
        return level


def effective_dataset(cfg: DataConfig) -> str:
    """The dataset entry that describes ``data.root``: a plain folder written by ``histolite
    slide tiles`` is a ``slide_tiles`` dataset, so its tiles are split by slide unasked."""
    if cfg.dataset == "folder" and cfg.root is not None and is_slide_tile_dataset(cfg.root):
        return "slide_tiles"
    return cfg.dataset


def resolve_grouping(cfg: DataConfig) -> tuple[str, str | None]:
    """(group kind, regex or None when the layout sets groups) for this data."""
    spec = get_dataset(effective_dataset(cfg))
    offered = dict(spec.groupings)
    if cfg.group_regex is not None:
        return "group", cfg.group_regex
    if spec.patient_level:
        if cfg.group_by not in (None, "patient"):
            raise DataError(f"data.group_by={cfg.group_by!r}: {spec.name} groups by patient only")
        return "patient", None
    if cfg.group_by is not None:
        if cfg.group_by not in offered:
            names = ", ".join(offered) or "none; set data.group_regex"
            raise DataError(
                f"data.group_by={cfg.group_by!r} is not a grouping of dataset {spec.name!r} "
                f"(offered: {names})"
            )
        return cfg.group_by, offered[cfg.group_by]
    if spec.groupings:
        return spec.groupings[0]
    return "image", None


def resolve_policy(cfg: DataConfig, seed: int) -> SplitPolicy:
    """``split_by: auto`` groups wherever a grouping is known (dataset entry or regex)."""
    kind, regex = resolve_grouping(cfg)
    by = cfg.split_by
    if by == "auto":
        by = "stratified" if kind == "image" else "group"
    if by == "group" and kind == "image":
        raise DataError(
            "data.split_by=group needs data.group_regex (a regex whose first group is the "
            "slide or patient id in each file name)"
        )
    if cfg.patients is not None:
        if kind == "image":
            raise DataError(
                f"data.patients={cfg.patients!r} maps groups (slides) to patients, but no group "
                "is known for these images; set data.group_regex (or use a dataset that names "
                "its slides, e.g. slide_tiles)"
            )
        kind = "patient"
    return SplitPolicy(
        grouped=by == "group",
        group_kind=kind,
        group_regex=regex,
        val_split_by=cfg.val_split_by,
        val=cfg.val_fraction,
        test=cfg.test_fraction,
        seed=cfg.split_seed if cfg.split_seed is not None else seed,
    )


@dataclass
class Split:
    """Samples per split and what the run records about how they were split."""

    classes: tuple[str, ...]
    parts: dict[str, list[Sample]]
    report: dict[str, object] = field(default_factory=dict)
    source: str = ""

    @property
    def all_samples(self) -> list[Sample]:
        return [s for name in SPLIT_NAMES for s in self.parts[name]]

    def split_names(self) -> list[str]:
        return [name for name in SPLIT_NAMES for _ in self.parts[name]]

    def as_images(self) -> LabelledImages:
        return LabelledImages(self.classes, tuple(self.all_samples))

    def without(self, paths: set[Path]) -> Split:
        """The same split without some files (unreadable ones the user chose to skip)."""
        parts = {
            name: [s for s in part if s.path not in paths] for name, part in self.parts.items()
        }
        return Split(self.classes, parts, self.report, self.source)


def read_patient_map(path: str | Path) -> dict[str, str]:
    """``group -> patient`` from a CSV whose columns include ``patient`` and one of ``slide`` or
    ``group`` (the key the dataset's groups use)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data.patients file not found")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        key = next((k for k in ("slide", "group") if k in fields), None)
        if key is None or "patient" not in fields:
            raise DataError(
                f"{path}: columns {fields}; expected a 'slide' (or 'group') and a 'patient' column"
            )
        mapping: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            group, patient = (row.get(key) or "").strip(), (row.get("patient") or "").strip()
            if not group or not patient:
                raise DataError(f"{path}, line {line}: empty {key} or patient")
            if mapping.setdefault(group, patient) != patient:
                raise DataError(
                    f"{path}, line {line}: {key} {group!r} is mapped to patients "
                    f"{mapping[group]!r} and {patient!r}; a {key} belongs to one patient"
                )
    return mapping


def group_by_patient(images: LabelledImages, patients: dict[str, str]) -> LabelledImages:
    """The same images grouped by patient; each image keeps its slide (group) in ``meta``."""
    missing = sorted({s.group for s in images.samples} - set(patients))
    if missing:
        raise DataError(
            f"data.patients names no patient for {len(missing)} slide(s)/group(s), e.g. "
            f"{missing[:5]}; add a row for each"
        )
    samples = tuple(
        Sample(s.path, s.label, s.class_name, patients[s.group], {**s.meta, "slide": s.group})
        for s in images.samples
    )
    return LabelledImages(images.classes, samples)


def names_that_hold_groups(samples: Sequence[Sample], dataset: str) -> list[str]:
    """Warn when a plain folder's file names say where its images came from.

    Kather tiles read as ``dataset: folder`` would otherwise be split tile by tile, silently
    letting tiles of one source image sit in training and test.
    """
    names = [s.path.name for s in samples]
    for spec in list_datasets():
        if spec.name == dataset or not spec.groupings or not names:
            continue
        kind, pattern = spec.groupings[0]
        matched = sum(1 for n in names if re.search(pattern, n))
        if matched >= 0.9 * len(names):
            group = kind.replace("_", " ")
            message = (
                f"IMAGE-LEVEL SPLIT, but {matched} of the {len(names)} file names carry a "
                f"{spec.name} {group} ({pattern}): tiles of one {group} will sit in training "
                f"and test. Use dataset {spec.name} (data.dataset / --dataset) to split by {group}."
            )
            warnings.warn(message, LeakageWarning, stacklevel=2)
            return [message]
    return []


def load_split(cfg: DataConfig, seed: int) -> Split:
    """Samples per split, from ``data.split_csv`` or by splitting ``data.root`` per policy.

    In one pass: decide the policy, index the images, assign each one a split, and report;
    the assignment algorithms (``data.splits``) are called once and return split names only.
    """
    if cfg.split_csv is not None:
        table = read_split_csv(cfg.split_csv)
        read = {name: list(table.subset(name).samples) for name in SPLIT_NAMES}
        LabelledImages(table.classes, tuple(read["train"])).require_trainable(cfg.split_csv)
        report = split_report(table.classes, read, split_by="csv", group_kind="group")
        return Split(table.classes, read, report, cfg.split_csv)
    if cfg.root is None:
        raise DataError("set data.root (an image folder) or data.split_csv (a split CSV)")
    policy = resolve_policy(cfg, seed)
    dataset = effective_dataset(cfg)
    spec = get_dataset(dataset)
    images = scan_dataset(
        dataset,
        cfg.root,
        labels=cfg.labels,
        magnification=cfg.magnification,
        group_regex=policy.group_regex,
    )
    if cfg.patients is not None:
        images = group_by_patient(images, read_patient_map(cfg.patients))
    images.require_trainable(cfg.root)
    given = [] if policy.grouped or not spec.patient_level else [warn_image_level_split(spec.name)]
    if not policy.grouped and cfg.split_by == "auto":
        given += names_that_hold_groups(images.samples, dataset)
    names = make_split(
        images,
        val=policy.val,
        test=policy.test,
        seed=policy.seed,
        grouped=policy.grouped,
        val_split_by=policy.val_split_by,
    )
    parts: dict[str, list[Sample]] = {name: [] for name in SPLIT_NAMES}
    for sample, name in zip(images.samples, names, strict=True):
        parts[name].append(sample)
    report = split_report(
        images.classes,
        parts,
        split_by="group" if policy.grouped else "stratified",
        group_kind=policy.group_kind,
        warnings_given=given,
    )
    report.update(
        policy=policy.describe(),
        group_regex=policy.group_regex,
        val_split_by=policy.val_split_by,
        seed=policy.seed,
    )
    return Split(images.classes, parts, report, cfg.root)


def warn_image_level_split(dataset: str) -> str:
    """Warn loudly (and return the message, for the run's split report)."""
    message = (
        f"IMAGE-LEVEL SPLIT OF {dataset.upper()}, WHOSE FILES NAME THEIR PATIENTS: images of one "
        "patient will sit in both training and test data, and accuracy will be inflated (BreakHis "
        "literature: 97-99% on random image splits against 85-93% on patient-level ones). Use "
        "data.split_by=group (the default for this dataset) for honest numbers."
    )
    warnings.warn(message, LeakageWarning, stacklevel=2)
    return message


MAX_LISTED_GROUPS = 200  # split reports name each split's groups up to this many in all


def split_report(
    classes: Sequence[str],
    samples_by_split: Mapping[str, Sequence[Sample]],
    *,
    split_by: str,
    group_kind: str,
    warnings_given: Sequence[str] = (),
) -> dict[str, object]:
    """Images and groups (patients, slides) per class per split, and any groups shared by splits.

    ``shared_groups`` lists groups found in more than one split: empty for a grouped split, and
    the measure of leakage for an image-level one.
    """
    where: dict[str, set[str]] = defaultdict(set)
    splits: dict[str, object] = {}
    for name in SPLIT_NAMES:
        part = samples_by_split.get(name, ())
        per_class = {
            c: {
                "images": sum(1 for s in part if s.class_name == c),
                group_kind + "s": len({s.group for s in part if s.class_name == c}),
            }
            for c in classes
        }
        for s in part:
            where[s.group].add(name)
        splits[name] = {
            "images": len(part),
            group_kind + "s": len({s.group for s in part}),
            "per_class": per_class,
        }
    for name in SPLIT_NAMES:  # which slides / patients, where there are few enough to list
        part = samples_by_split.get(name, ())
        entry = splits[name]
        assert isinstance(entry, dict)
        if len(where) <= MAX_LISTED_GROUPS:
            entry[group_kind + "_names"] = sorted({s.group for s in part})
        slides = {s.meta["slide"] for s in part if "slide" in s.meta}
        if slides:  # grouped by patient, but the images came from slides
            entry["slides"] = len(slides)
            if len(slides) <= MAX_LISTED_GROUPS:
                entry["slide_names"] = sorted(slides)
    shared = sorted(g for g, names in where.items() if len(names) > 1)
    return {
        "split_by": split_by,
        "group_kind": group_kind,
        "group_description": GROUP_DESCRIPTIONS.get(group_kind, group_kind),
        "splits": splits,
        "shared_groups": len(shared),
        "shared_group_examples": shared[:20],
        "warnings": list(warnings_given),
    }
