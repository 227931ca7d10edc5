"""How images are assigned to train/val/test, and the split CSV that later steps read.

These functions only assign: given samples, fractions and a seed they return one split name
per sample (``make_split``). Deciding the policy, building the parts and reporting them is
``split_policy.load_split``'s, in one pass. Randomness comes from NumPy's PCG64 seeded
explicitly, over inputs sorted by path, so the same seed gives the same split on every machine
and file system.
"""

from __future__ import annotations

import csv
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histolite.data.folder import LabelledImages, Sample
from histolite.errors import DataError, HistoliteWarning
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
    groups: Sequence[str],
    sizes: dict[str, int],
    fractions: SplitFractions,
    assignment: dict[str, str],
) -> None:
    """Each unassigned group (in the given order) goes to the split furthest below its share.

    Shares are of the images of ``groups`` (pre-assigned ones count towards their split).
    """
    total = sum(sizes[g] for g in groups)
    targets = {"val": fractions.val * total, "test": fractions.test * total}
    filled = {"val": 0, "test": 0}
    for group in groups:
        if assignment.get(group) in filled:
            filled[assignment[group]] += sizes[group]
    for group in groups:
        if group in assignment:
            continue
        deficits = {name: targets[name] - filled[name] for name in targets if targets[name] > 0}
        best = max(deficits, key=lambda name: deficits[name], default=None)
        if best is not None and deficits[best] >= sizes[group] / 2:
            assignment[group] = best
            filled[best] += sizes[group]
        else:
            assignment[group] = "train"


def _seed_every_split(
    groups: Sequence[str],
    sizes: dict[str, int],
    fractions: SplitFractions,
    assignment: dict[str, str],
) -> None:
    """Give each requested split one group of this class first, if the class has enough.

    The group chosen is the one closest in size to the split's share, so a class with one huge
    and one small group keeps the huge one for training. The largest group never leaves
    training, so training always holds the class.
    """
    total = sum(sizes[g] for g in groups)
    wanted = [name for name, share in (("test", fractions.test), ("val", fractions.val)) if share]
    spare = sorted(groups, key=lambda g: -sizes[g])[1:]  # stable: keeps the shuffled order
    for name in wanted:
        free = [g for g in groups if g in spare and g not in assignment]
        if not free:
            return
        share = (fractions.test if name == "test" else fractions.val) * total
        chosen = min(free, key=lambda g: abs(sizes[g] - share))
        assignment[chosen] = name


def _repair_missing_classes(
    label_counts: dict[str, Counter[int]],
    sizes: dict[str, int],
    fractions: SplitFractions,
    assignment: dict[str, str],
) -> None:
    """Move training groups into val/test splits that lack one of their classes.

    Needed when groups mix classes (a patient with tissue of every kind): a class may be in no
    group's majority. Only groups whose move keeps every class in training are moved, the
    smallest first, so the split stays as close to its shares as it can.
    """
    all_labels = {label for counts in label_counts.values() for label in counts}
    wanted = [n for n, f in (("test", fractions.test), ("val", fractions.val)) if f]

    def labels_in(split: str) -> set[int]:
        return {lab for g, name in assignment.items() if name == split for lab in label_counts[g]}

    for _ in range(len(assignment)):
        missing = [(n, lab) for n in wanted for lab in sorted(all_labels - labels_in(n))]
        if not missing:
            return
        split, label = missing[0]
        train_groups = [g for g, name in assignment.items() if name == "train"]
        movable = [
            g
            for g in sorted(train_groups, key=lambda g: (sizes[g], g))
            if label in label_counts[g]
            and all(
                any(lab in label_counts[other] for other in train_groups if other != g)
                for lab in label_counts[g]
            )
        ]
        if not movable:
            return
        assignment[movable[0]] = split


def grouped_split(samples: Sequence[Sample], fractions: SplitFractions, seed: int) -> list[str]:
    """Whole groups (source images, slides, patients) go to one split: no group leaks.

    Groups are stratified by their majority class: within each class, groups are visited in a
    seeded random order; first each requested split gets one group of the class (where the
    class has enough groups), then each remaining group goes to the split furthest below its
    target share of that class's images. A requested split that still ends up empty or
    without some class is an error naming them: an evaluation without a class is not one.
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
        groups = [str(g) for g in rng.permutation(np.array(by_majority[label]))]
        _seed_every_split(groups, sizes, fractions, assignment)
        _fill_by_deficit(groups, sizes, fractions, assignment)
    _repair_missing_classes(label_counts, sizes, fractions, assignment)
    result = [assignment[s.group] for s in samples]
    require_classes_in_splits(samples, result, fractions)
    return result


def require_classes_in_splits(
    samples: Sequence[Sample], result: Sequence[str], fractions: SplitFractions
) -> None:
    """Every requested split is non-empty and holds every class; else a DataError naming them."""
    wanted = ["train"] + [n for n, f in (("val", fractions.val), ("test", fractions.test)) if f]
    names = {s.label: s.class_name for s in samples}
    groups_of: dict[str, set[str]] = defaultdict(set)
    present: dict[str, set[int]] = {name: set() for name in SPLIT_NAMES}
    for sample, split in zip(samples, result, strict=True):
        present[split].add(sample.label)
        groups_of[sample.class_name].add(sample.group)
    problems = []
    for split in wanted:
        if not present[split]:
            problems.append(f"the {split} split is empty")
            continue
        missing = sorted(names[label] for label in set(names) - present[split])
        if missing:
            detail = ", ".join(f"{c} ({len(groups_of[c])} group(s))" for c in missing)
            problems.append(f"the {split} split has no images of {detail}")
    if problems:
        raise DataError(
            "grouped split failed: "
            + "; ".join(problems)
            + f". A class needs a group for each of the {len(wanted)} splits ({', '.join(wanted)})."
            " Ask for fewer splits (val or test 0), draw validation from the training groups "
            "(data.val_split_by=stratified), group more coarsely or finely (data.group_by), or "
            "split by image (data.split_by=stratified, which lets correlated images leak)."
        )


def _validation_from_training(
    samples: Sequence[Sample], result: list[str], val: float, seed: int, by_group: bool
) -> list[str]:
    """Move a ``val`` share of the training samples into validation, in place.

    ``by_group``: classes that are the majority of two or more training groups give whole
    groups (validation then measures generalisation to unseen groups); the others give images
    from their training groups. Without ``by_group`` every class gives images.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    train = [i for i, name in enumerate(result) if name == "train"]
    fractions = SplitFractions(val=val, test=0.0)
    sizes: dict[str, int] = defaultdict(int)
    label_counts: dict[str, Counter[int]] = defaultdict(Counter)
    for i in train:
        sizes[samples[i].group] += 1
        label_counts[samples[i].group][samples[i].label] += 1
    by_majority: dict[int, list[str]] = defaultdict(list)
    for group in sorted(sizes):
        counts = label_counts[group]
        by_majority[min(counts, key=lambda lab: (-counts[lab], lab))].append(group)
    assignment: dict[str, str] = {}
    image_level: set[int] = set()
    for label in sorted({samples[i].label for i in train}):
        groups = by_majority.get(label, [])
        if by_group and len(groups) >= 2:
            ordered = [str(g) for g in rng.permutation(np.array(groups))]
            _seed_every_split(ordered, sizes, fractions, assignment)
            _fill_by_deficit(ordered, sizes, fractions, assignment)
        else:
            image_level.add(label)
    for i in train:
        if assignment.get(samples[i].group) == "val":
            result[i] = "val"
    rest = [i for i in train if result[i] == "train" and samples[i].label in image_level]
    inner = stratified_split([samples[i] for i in rest], fractions, seed + 1)
    for i, name in zip(rest, inner, strict=True):
        result[i] = name
    return result


def make_split(
    images: LabelledImages,
    *,
    val: float,
    test: float,
    seed: int,
    grouped: bool,
    val_split_by: str = "same",
) -> list[str]:
    """Split names for every sample of ``images`` (grouped or stratified).

    With a grouped split, ``val_split_by`` says how validation is drawn:

    - ``same``: like test, whole groups (fails if a class has too few groups);
    - ``group_if_possible``: test by whole groups; validation by whole training groups for
      every class that has two or more of them, by images of the training groups for the rest;
    - ``stratified``: test by whole groups; validation by images of the training groups.

    Validation images that share a group with training are fine for choosing checkpoints but
    optimistic as an estimate; test stays leakage-free either way.
    """
    fractions = SplitFractions(val=val, test=test)
    if not grouped:
        return stratified_split(images.samples, fractions, seed)
    if val_split_by == "same" or val == 0:
        return grouped_split(images.samples, fractions, seed)
    result = grouped_split(images.samples, SplitFractions(val=0.0, test=test), seed)
    _validation_from_training(
        images.samples, result, val / (1.0 - test), seed + 1, val_split_by == "group_if_possible"
    )
    require_classes_in_splits(images.samples, result, fractions)
    return result


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


class LeakageWarning(HistoliteWarning):
    """An image-level split of data whose patients are known: test accuracy will be inflated."""
