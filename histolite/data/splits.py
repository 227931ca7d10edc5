"""Reproducible train/val/test splits and the split CSV that training and evaluation read.

Randomness comes from NumPy's PCG64 seeded explicitly, over inputs sorted by path, so the same
seed gives the same split on every machine and file system.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histolite.data.folder import LabelledImages, Sample
from histolite.errors import DataError
from histolite.fileio import atomic_path

SPLIT_NAMES = ("train", "val", "test")
CSV_COLUMNS = ("path", "label", "group", "split")


@dataclass(frozen=True)
class SplitFractions:
    val: float
    test: float

    def __post_init__(self) -> None:
        for name, value in (("val", self.val), ("test", self.test)):
            if not 0.0 <= value < 1.0:
                raise DataError(f"{name} fraction must be in [0, 1), got {value}")
        if self.val + self.test >= 1.0:
            raise DataError(
                f"val + test fractions must leave a training part, got {self.val} + {self.test}"
            )


def _allocate(n: int, fractions: SplitFractions) -> tuple[int, int]:
    """Counts for (val, test) out of n, each at least one when asked for and n allows it."""
    n_val = round(n * fractions.val)
    n_test = round(n * fractions.test)
    if fractions.val > 0 and n_val == 0 and n >= 3:
        n_val = 1
    if fractions.test > 0 and n_test == 0 and n >= 3:
        n_test = 1
    while n_val + n_test >= n and (n_val or n_test):
        if n_test >= n_val and n_test:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def stratified_split(samples: Sequence[Sample], fractions: SplitFractions, seed: int) -> list[str]:
    """Per-class random split; returns the split name of each sample, in input order."""
    rng = np.random.Generator(np.random.PCG64(seed))
    by_class: dict[int, list[int]] = defaultdict(list)
    order = sorted(range(len(samples)), key=lambda i: str(samples[i].path))
    for i in order:
        by_class[samples[i].label].append(i)
    result = ["train"] * len(samples)
    for label in sorted(by_class):
        indices = np.array(by_class[label])
        rng.shuffle(indices)
        n_val, n_test = _allocate(len(indices), fractions)
        for i in indices[:n_val]:
            result[i] = "val"
        for i in indices[n_val : n_val + n_test]:
            result[i] = "test"
    return result


def _fill_by_deficit(
    groups: Sequence[str], sizes: dict[str, int], fractions: SplitFractions
) -> dict[str, str]:
    """Each group (in the given order) goes to the split furthest below its share of images."""
    total = sum(sizes[g] for g in groups)
    targets = {"val": fractions.val * total, "test": fractions.test * total}
    filled = {"val": 0, "test": 0}
    assignment: dict[str, str] = {}
    for group in groups:
        deficits = {name: targets[name] - filled[name] for name in targets if targets[name] > 0}
        best = max(deficits, key=lambda name: deficits[name], default=None)
        if best is not None and deficits[best] >= sizes[group] / 2:
            assignment[group] = best
            filled[best] += sizes[group]
        else:
            assignment[group] = "train"
    return assignment


def grouped_split(samples: Sequence[Sample], fractions: SplitFractions, seed: int) -> list[str]:
    """Whole groups (slides, patients) go to one split, so no group leaks across splits.

    Groups are stratified by their majority class: within each class, groups are visited in a
    seeded random order and each goes to the split furthest below its target share of that
    class's images. So BreakHis test patients are both benign and malignant whenever there are
    enough patients of each. A split still missing a class is warned about.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    sizes: dict[str, int] = defaultdict(int)
    label_counts: dict[str, Counter[int]] = defaultdict(Counter)
    for s in samples:
        sizes[s.group] += 1
        label_counts[s.group][s.label] += 1
    if len(sizes) < 2 and (fractions.val or fractions.test):
        raise DataError(
            f"grouped split needs at least 2 groups, found {len(sizes)}; check data.group_regex"
        )
    by_majority: dict[int, list[str]] = defaultdict(list)
    for group in sorted(sizes):
        counts = label_counts[group]
        majority = min(counts, key=lambda label: (-counts[label], label))
        by_majority[majority].append(group)
    assignment: dict[str, str] = {}
    for label in sorted(by_majority):
        groups = np.array(by_majority[label])
        rng.shuffle(groups)
        assignment.update(_fill_by_deficit([str(g) for g in groups], sizes, fractions))
    result = [assignment[s.group] for s in samples]
    classes_in = {
        name: {s.label for s, r in zip(samples, result, strict=True) if r == name}
        for name in SPLIT_NAMES
    }
    all_labels = {s.label for s in samples}
    for name in SPLIT_NAMES:
        if classes_in[name] and classes_in[name] != all_labels:
            warnings.warn(
                f"grouped split: the {name} split lacks {len(all_labels - classes_in[name])} "
                "class(es); groups are not spread evenly over classes",
                stacklevel=2,
            )
    return result


def make_split(
    images: LabelledImages,
    *,
    val: float,
    test: float,
    seed: int,
    grouped: bool,
) -> list[str]:
    """Split names for every sample of ``images`` (grouped or stratified)."""
    fractions = SplitFractions(val=val, test=test)
    splitter = grouped_split if grouped else stratified_split
    return splitter(images.samples, fractions, seed)


def write_split_csv(path: str | Path, images: LabelledImages, splits: Sequence[str]) -> Path:
    """Write ``path,label,group,split`` rows; paths are relative to the CSV's folder."""
    path = Path(path)
    base = path.resolve().parent
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for sample, split in zip(images.samples, splits, strict=True):
            rel = os.path.relpath(sample.path.resolve(), base)
            writer.writerow((Path(rel).as_posix(), sample.class_name, sample.group, split))
    return path


@dataclass(frozen=True)
class SplitTable:
    """A split CSV read back: classes (sorted, or as given) and samples per split."""

    classes: tuple[str, ...]
    rows: tuple[tuple[Sample, str], ...]

    def subset(self, split: str) -> LabelledImages:
        return LabelledImages(
            classes=self.classes, samples=tuple(s for s, name in self.rows if name == split)
        )


def read_split_csv(path: str | Path, classes: Sequence[str] | None = None) -> SplitTable:
    """Read a split CSV; every problem names the file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: split CSV not found")
    base = path.resolve().parent
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {missing}; expected header {','.join(CSV_COLUMNS)}"
            )
        raw = list(reader)
    if not raw:
        raise DataError(f"{path}: no rows")
    names = sorted({r["label"] for r in raw}) if classes is None else list(classes)
    index = {name: i for i, name in enumerate(names)}
    rows = []
    for line, r in enumerate(raw, start=2):
        if r["split"] not in SPLIT_NAMES:
            raise DataError(
                f"{path}:{line}: split {r['split']!r} is not one of {', '.join(SPLIT_NAMES)}"
            )
        if r["label"] not in index:
            raise DataError(f"{path}:{line}: label {r['label']!r} is not among classes {names}")
        file = Path(r["path"])
        file = file if file.is_absolute() else base / file
        rows.append((Sample(file, index[r["label"]], r["label"], r["group"]), r["split"]))
    return SplitTable(classes=tuple(names), rows=tuple(rows))


class LeakageWarning(UserWarning):
    """An image-level split of data whose patients are known: test accuracy will be inflated."""


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
    shared = sorted(g for g, names in where.items() if len(names) > 1)
    return {
        "split_by": split_by,
        "group_kind": group_kind,
        "splits": splits,
        "shared_groups": len(shared),
        "shared_group_examples": shared[:20],
        "warnings": list(warnings_given),
    }
