"""Cross-fitted teachers: K models, each trained without one fold of the training groups.

A teacher labels the student's training images, the only images distillation shows it; a
teacher trained on them answers almost exactly as their labels do (Kather: 98% right, as
confident as its smoothed labels), so its soft targets add little. K teachers trained on folds
drawn by *group* (source image, patient, slide) give every training image a teacher that never
saw it, or any image of its group: out-of-fold targets (Dao et al., ICLR 2021). Averaging all K
gives an ensemble teacher (Hinton et al. 2015) for comparison.

The run directory holds the K fold runs and what ties them together::

    RUN/crossfit.json        folds, the group -> fold assignment, the classes, each fold's
                             run and time
    RUN/split.csv            the student's split (train / val / test) the folds were cut from
    RUN/split_report.json    how that split was made
    RUN/fold_0 ... fold_K-1  ordinary runs: fold k trained on training groups not in fold k,
                             validated on the shared validation split; test is untouched

Validation and test images are in no teacher's training data, so the checks distillation runs
against a single teacher hold for every fold.

A class whose training groups all fall in one fold (a class with one training source image,
such as Kather 2016's 08_EMPTY under a grouped split) is absent from that fold's training data:
its out-of-fold teacher has never seen the class and cannot label it. The run records such
classes (``classes_unseen`` in ``crossfit.json``) and warns when the folds are drawn;
out-of-fold distillation trains those images on their labels alone
(:data:`NO_OUT_OF_FOLD_TEACHER`).

``--resume`` reads the split back from ``RUN/split.csv`` (never re-splits the data, which may
have changed), refuses a changed ``crossfit`` section (the folds were drawn when the run
started), skips finished folds, resumes a fold from its ``last.ckpt``, and restarts a fold that
was stopped before its first checkpoint.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from histolite.config import TrainConfig, dump_config, load_config
from histolite.data.datasets import ImageDataset
from histolite.data.folder import Sample
from histolite.data.split_policy import Split, load_split
from histolite.data.splits import SPLIT_NAMES, read_split_csv, write_split_csv
from histolite.errors import HistoliteError, HistoliteWarning
from histolite.fileio import read_json, write_json, write_text
from histolite.runspec import RunDir, RunSpec, is_rank_zero

CROSSFIT_FILE = "crossfit.json"
NO_OUT_OF_FOLD_TEACHER = -1  # the image's out-of-fold teacher never saw its class


@dataclass(frozen=True)
class Crossfit:
    """A cross-fitted teacher run: its folds and which fold each training group belongs to."""

    root: Path
    folds: int
    groups: dict[str, int]  # training group -> the fold that left it out
    seed: int

    def fold_dir(self, fold: int) -> Path:
        return self.root / f"fold_{fold}"

    @property
    def fold_dirs(self) -> list[Path]:
        return [self.fold_dir(k) for k in range(self.folds)]

    def fold_of(self, sample: Sample) -> int:
        """The fold whose model never trained on ``sample``'s group."""
        try:
            return self.groups[sample.group]
        except KeyError:
            raise HistoliteError(
                f"{sample.path}: its group {sample.group!r} is in no fold of {self.root}; the "
                "student's training split must be the one the teachers were cross-fitted on "
                "(the same data, split settings and data.split_seed)"
            ) from None

    def classes_unseen(self) -> dict[int, list[str]]:
        """Fold -> the names of the classes its teacher never trained on, from the training
        rows of the run's own split (what the fold models were trained on, not the images a
        caller happens to hold)."""
        path = RunDir(self.root).split_csv
        if not path.is_file():
            raise HistoliteError(
                f"{path}: missing; the cross-fitted run's split says which classes each fold "
                "trained on"
            )
        table = read_split_csv(path)
        train = [s for s, name in table.rows if name == "train"]
        for sample in train:
            self.fold_of(sample)  # a clear error for a group the folds do not know
        unseen = classes_unseen(train, self.groups, self.folds)
        return {fold: [table.classes[label] for label in labels] for fold, labels in unseen.items()}

    @classmethod
    def load(cls, root: str | Path) -> Crossfit | None:
        """The cross-fitted run at ``root``, or None if it is an ordinary run."""
        path = Path(root) / CROSSFIT_FILE
        if not path.is_file():
            return None
        data = read_json(path)
        return cls(Path(root), int(data["folds"]), dict(data["groups"]), int(data["seed"]))


def assign_folds(samples: list[Sample], folds: int, seed: int) -> dict[str, int]:
    """Each group of ``samples`` to one of ``folds`` folds, classes spread evenly.

    Groups are ordered by their majority class, shuffled within it (seeded), and dealt to the
    fold with the fewest images of that class so far, so every fold leaves out some of each
    class and about a K-th of the images.
    """
    if folds < 2:
        raise HistoliteError(f"crossfit.folds {folds}: need at least 2 folds")
    members: dict[str, list[Sample]] = {}
    for sample in samples:
        members.setdefault(sample.group, []).append(sample)
    if len(members) < folds:
        raise HistoliteError(
            f"{len(members)} training groups cannot make {folds} folds; use fewer folds"
        )
    rng = np.random.default_rng(seed)
    majority = {g: Counter(s.label for s in m).most_common(1)[0][0] for g, m in members.items()}
    order = sorted(members, key=lambda g: (majority[g], rng.random()))
    load = np.zeros((folds, max(majority.values()) + 1))
    assignment: dict[str, int] = {}
    for group in order:
        label = majority[group]
        fold = int(np.argmin(load[:, label] + 1e-6 * load.sum(axis=1)))
        assignment[group] = fold
        load[fold, label] += len(members[group])
    return assignment


def classes_unseen(
    samples: list[Sample], assignment: dict[str, int], folds: int
) -> dict[int, list[int]]:
    """Fold -> the classes of ``samples`` its teacher never trains on (sorted, only folds with
    some): every training group of such a class was left out by that fold."""
    labels_by_fold: list[set[int]] = [set() for _ in range(folds)]
    for sample in samples:
        labels_by_fold[assignment[sample.group]].add(sample.label)
    everything = set().union(*labels_by_fold)
    unseen = {}
    for fold in range(folds):
        trained_on = set().union(*(labels_by_fold[k] for k in range(folds) if k != fold))
        if everything - trained_on:
            unseen[fold] = sorted(everything - trained_on)
    return unseen


def describe_unseen(unseen: dict[int, list[str]], samples: list[Sample]) -> list[str]:
    """One readable line per fold whose teacher misses a class (by name), with the number of
    ``samples`` (the training images) it concerns."""
    lines = []
    for fold, names in unseen.items():
        for name in names:
            images = sum(1 for s in samples if s.class_name == name)
            lines.append(
                f"fold {fold} holds every training group of class {name!r}, so its "
                f"teacher never sees that class; out-of-fold distillation learns its {images} "
                "training images from their labels alone (ensemble targets are unaffected)"
            )
    return lines


def out_of_fold_teachers(crossfit: Crossfit, samples: list[Sample]) -> list[int]:
    """Each sample's out-of-fold teacher, or :data:`NO_OUT_OF_FOLD_TEACHER` where that teacher
    never trained on the sample's class (it would label the image with a wrong class)."""
    folds = [crossfit.fold_of(s) for s in samples]
    unseen = crossfit.classes_unseen()
    return [
        NO_OUT_OF_FOLD_TEACHER if s.class_name in unseen.get(fold, ()) else fold
        for s, fold in zip(samples, folds, strict=True)
    ]


def fold_split(split: Split, assignment: dict[str, int], fold: int) -> Split:
    """The split fold ``fold`` trains on: the training groups of every other fold, the same
    validation and test images; fold ``fold``'s training images are in none of its parts."""
    parts = {name: list(split.parts[name]) for name in SPLIT_NAMES}
    parts["train"] = [s for s in split.parts["train"] if assignment[s.group] != fold]
    report = dict(split.report)
    report["crossfit"] = {
        "fold": fold,
        "left_out_groups": sorted(g for g, k in assignment.items() if k == fold),
        "left_out_images": len(split.parts["train"]) - len(parts["train"]),
    }
    return Split(split.classes, parts, report, split.source)


def crossfit_run(
    cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True
) -> Path:
    """Train ``cfg.crossfit.folds`` teachers into ``out/fold_*``; finished folds are kept.

    The split is made once from ``cfg`` (or read back from ``out/split.csv`` on resume), the
    folds are drawn from its training groups, and each fold is an ordinary run on its
    :func:`fold_split`.

    Raises:
        HistoliteError: ``out`` holds cross-fitted teachers and ``resume`` is not given; or on
            resume, the ``crossfit`` section differs from the one the run started with, or the
            saved split is missing.
    """
    from histolite.train.runner import train_run

    assert cfg.crossfit is not None
    out = Path(out)
    files = RunDir(out)
    existing = Crossfit.load(out)
    if existing is not None and not resume:
        raise HistoliteError(
            f"{out} already holds cross-fitted teachers; pass --resume to finish them, or "
            "choose another --out"
        )
    seed = cfg.crossfit.seed if cfg.crossfit.seed is not None else cfg.seed
    folds = cfg.crossfit.folds
    if existing is not None:
        record: dict[str, Any] = read_json(out / CROSSFIT_FILE)
        _require_same_crossfit(cfg, out, record)
        split = saved_split(out, record, cfg)
        record.setdefault("classes", list(split.classes))  # runs from before it was recorded
        assignment = existing.groups
    else:
        split = load_split(cfg.data, cfg.seed)
        assignment = assign_folds(split.parts["train"], folds, seed)
        record = {
            "folds": folds,
            "seed": seed,
            "group_kind": split.report.get("group_kind"),
            "classes": list(split.classes),  # the order of the classes, for a resume
            "groups": assignment,
            "runs": [f"fold_{k}" for k in range(folds)],
            "train_seconds": {},
        }
    unseen = {
        fold: [split.classes[label] for label in labels]
        for fold, labels in classes_unseen(split.parts["train"], assignment, folds).items()
    }
    record["classes_unseen"] = {str(fold): names for fold, names in unseen.items()}
    if is_rank_zero():
        for line in describe_unseen(unseen, split.parts["train"]):
            warnings.warn(line, HistoliteWarning, stacklevel=2)
        out.mkdir(parents=True, exist_ok=True)
        write_text(files.config, dump_config(cfg))  # what --resume reads back
        if existing is None:  # a resume keeps the split the folds were drawn from
            write_split_csv(files.split_csv, split.as_images(), split.split_names())
            write_json(files.split_report, split.report)
        write_json(out / CROSSFIT_FILE, record)
    for fold in range(folds):
        fold_out = out / f"fold_{fold}"
        fold_files = RunDir(fold_out)
        if fold_files.train_summary.is_file():
            continue  # finished earlier
        started = time.perf_counter()
        # run.json is written before the first epoch ends: only a checkpoint can be resumed
        fold_resume = (fold_files.checkpoints / "last.ckpt").is_file()
        if not fold_resume and fold_out.exists() and is_rank_zero():
            shutil.rmtree(fold_out)  # stopped in its first epoch: start the fold again
        train_run(
            cfg,
            fold_out,
            resume=fold_resume,
            progress=progress,
            split=None if fold_resume else fold_split(split, assignment, fold),
            extra_metadata={"crossfit_fold": fold, "crossfit_folds": folds},
        )
        record["train_seconds"][str(fold)] = round(time.perf_counter() - started, 1)
        if is_rank_zero():
            write_json(out / CROSSFIT_FILE, record)
    record["total_train_seconds"] = round(sum(record["train_seconds"].values()), 1)
    if is_rank_zero():
        write_json(out / CROSSFIT_FILE, record)
    return out


def _require_same_crossfit(cfg: TrainConfig, out: Path, record: dict[str, Any]) -> None:
    """Refuse a resume whose ``crossfit`` section differs from the one the run started with:
    the folds were drawn once, and a changed count or seed would mix two assignments."""
    assert cfg.crossfit is not None
    changed = []
    saved = RunDir(out).config
    if saved.is_file():
        before = load_config(saved, [], type(cfg), recipe=False).crossfit
        now = cfg.crossfit.model_dump()
        earlier = before.model_dump() if before is not None else {}
        changed += [
            f"crossfit.{key}: {earlier.get(key)!r} -> {now.get(key)!r}"
            for key in sorted(set(now) | set(earlier))
            if now.get(key) != earlier.get(key)
        ]
    seed = cfg.crossfit.seed if cfg.crossfit.seed is not None else cfg.seed
    drawn = {"folds": cfg.crossfit.folds, "seed": seed}
    changed += [
        f"{key} of the folds: {record.get(key)!r} in {CROSSFIT_FILE} -> {value!r}"
        for key, value in drawn.items()
        if record.get(key) != value and not any(c.startswith(f"crossfit.{key}:") for c in changed)
    ]
    if changed:
        raise HistoliteError(
            f"--resume cannot change the crossfit section of {out} ({'; '.join(changed)}): the "
            "folds were drawn when the run started; resume without that change, or start a new "
            "run with another --out"
        )


def saved_split(out: Path, record: dict[str, Any], cfg: TrainConfig) -> Split:
    """The split a cross-fitted run drew its folds from, read back from ``out/split.csv``.

    Classes keep the run's order: from ``crossfit.json`` (runs since it records them), else
    from a fold's ``run.json``, else as the data config gives them.
    """
    files = RunDir(out)
    if not files.split_csv.is_file():
        raise HistoliteError(
            f"{files.split_csv}: missing; cannot resume the cross-fitted teachers without the "
            "split their folds were drawn from"
        )
    classes: list[str] | None = record.get("classes")
    if classes is None:
        specs = [RunDir(out / run).spec for run in record.get("runs", [])]
        started = [path.parent for path in specs if path.is_file()]
        classes = (
            list(RunSpec.load(started[0]).classes)
            if started
            else list(load_split(cfg.data, cfg.seed).classes)
        )
    table = read_split_csv(files.split_csv, classes=classes)
    parts = {name: list(table.subset(name).samples) for name in SPLIT_NAMES}
    report = read_json(files.split_report) if files.split_report.is_file() else {}
    return Split(table.classes, parts, report, str(files.split_csv))


def describe_folds(crossfit: Crossfit, samples: list[Sample]) -> str:
    """``"fold 0: 560 images (12 groups), ..."``: how the training split was cut."""
    images = Counter(crossfit.groups.get(s.group, -1) for s in samples)
    groups = Counter(crossfit.groups.values())
    return ", ".join(
        f"fold {k}: {images[k]} images ({groups[k]} groups)" for k in range(crossfit.folds)
    )


class FoldTagged(Dataset[tuple[Tensor, int, int]]):
    """A training dataset whose items also say which fold left their image out, so that
    out-of-fold teachers can label each image of a batch with the right model."""

    def __init__(self, dataset: ImageDataset, folds: list[int]) -> None:
        self.dataset = dataset
        self.folds = folds

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int) -> tuple[Tensor, int, int]:
        x, y = self.dataset[item]
        return x, y, self.folds[self.dataset.source_index(item)]
