"""Which rows of one dataset are images of another: the one owner of "has this model seen it".

Runs and data move between folders and machines, so rows are matched by class and file stem,
then confirmed by content where both files still exist: byte-identical files, or (a PNG
converted from a TIFF) identical pixels. Where the earlier file is gone, only the name is left
to go by; such matches are counted apart, as unverified, so a caller can warn rather than refuse.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from histolite.data.folder import Sample
from histolite.data.images import load_rgb
from histolite.data.splits import LeakageWarning, read_split_csv
from histolite.errors import HistoliteError


class Match(Enum):
    SAME = "same"
    DIFFERENT = "different"
    BY_NAME = "by name"  # the earlier file is gone: cannot be confirmed


@dataclass(frozen=True)
class Overlap:
    """Rows of the data at hand that are images of the earlier data."""

    confirmed: int = 0
    by_name: int = 0

    @property
    def total(self) -> int:
        return self.confirmed + self.by_name


def _digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pixels(path: Path) -> np.ndarray | None:
    try:
        return load_rgb(path)  # what training sees, TIFF layouts and alpha included
    except HistoliteError:
        return None


def match(earlier: Path, path: Path) -> Match:
    """Whether ``path`` is the image ``earlier`` (same class and stem already established)."""
    if earlier.resolve() == path.resolve():
        return Match.SAME
    if not earlier.is_file():
        return Match.BY_NAME
    if not path.is_file():
        return Match.DIFFERENT
    if earlier.stat().st_size == path.stat().st_size and _digest(earlier) == _digest(path):
        return Match.SAME
    if earlier.suffix.lower() != path.suffix.lower():  # converted: compare what it shows
        a, b = _pixels(earlier), _pixels(path)
        if a is not None and b is not None and a.shape == b.shape and np.array_equal(a, b):
            return Match.SAME
    return Match.DIFFERENT


def find_overlap(earlier: Sequence[Sample], samples: Sequence[Sample]) -> Overlap:
    """How many of ``samples`` are images of ``earlier``, wherever either now lives."""
    by_key: dict[tuple[str, str], list[Path]] = {}
    for sample in earlier:
        by_key.setdefault((sample.class_name, sample.path.stem), []).append(sample.path)
    confirmed = by_name = 0
    for sample in samples:
        found = {
            match(p, sample.path) for p in by_key.get((sample.class_name, sample.path.stem), [])
        }
        if Match.SAME in found:
            confirmed += 1
        elif Match.BY_NAME in found:
            by_name += 1
    return Overlap(confirmed, by_name)


def training_rows_in(run_split_csv: Path, samples: Sequence[Sample]) -> Overlap:
    """Which of ``samples`` are training rows of the run whose split CSV this is."""
    if not run_split_csv.is_file():
        return Overlap()
    table = read_split_csv(run_split_csv)
    return find_overlap([s for s, name in table.rows if name == "train"], samples)


def describe_overlap(overlap: Overlap) -> str:
    """The unverified part, said plainly; empty when every match was confirmed."""
    if not overlap.by_name:
        return ""
    return (
        f" ({overlap.by_name} by class and file name only: the training files are no longer "
        "where the run's split.csv records them, so their content could not be compared)"
    )


def warn_training_rows(run: Path, overlap: Overlap, total: int) -> str:
    """Evaluating on images the model trained on: say so loudly (and return the message)."""
    message = (
        f"{overlap.total} of the {total} images evaluated were TRAINING images of {run}"
        f"{describe_overlap(overlap)}: these accuracy figures are inflated. Evaluate on its "
        "test split (RUN/split.csv --split test) or on images it never saw."
    )
    warnings.warn(message, LeakageWarning, stacklevel=2)
    return message
