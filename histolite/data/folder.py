"""Image-folder datasets: ``ROOT/<class>/<image>``, as in the Kather zip and most public sets."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from histolite.data.images import is_image_file
from histolite.errors import DataError


@dataclass(frozen=True)
class Sample:
    """One labelled image. ``group`` (slide or patient) keeps correlated images in one split.

    ``meta`` holds what a dataset's file names encode beyond the label (BreakHis subtype and
    magnification, IDC coordinates); it takes no part in equality or hashing.
    """

    path: Path
    label: int
    class_name: str
    group: str
    meta: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class LabelledImages:
    """A list of samples plus the ordered class names their labels index into."""

    classes: tuple[str, ...]
    samples: tuple[Sample, ...]

    def class_counts(self) -> dict[str, int]:
        counts = Counter(s.class_name for s in self.samples)
        return {name: counts.get(name, 0) for name in self.classes}

    def require_trainable(self, where: str) -> None:
        """Training needs at least two classes, each with at least one image."""
        if len(self.classes) < 2:
            raise DataError(
                f"{where}: found {len(self.classes)} class folder(s) {list(self.classes)}; "
                "a classifier needs at least 2 classes (one sub-folder per class)"
            )
        empty = [name for name, n in self.class_counts().items() if n == 0]
        if empty:
            raise DataError(f"{where}: classes without images: {empty}")


def _find_class_root(root: Path) -> Path:
    """Descend through single wrapper folders (e.g. the folder a zip extracts into)."""
    current = root
    for _ in range(3):
        subdirs = [d for d in current.iterdir() if d.is_dir() and not d.name.startswith(".")]
        has_images_here = any(is_image_file(p) for p in current.iterdir())
        if len(subdirs) == 1 and not has_images_here:
            inner = subdirs[0]
            inner_subdirs = [
                d for d in inner.iterdir() if d.is_dir() and not d.name.startswith(".")
            ]
            if inner_subdirs:
                current = inner
                continue
        break
    return current


def group_from_name(stem: str, pattern: re.Pattern[str] | None, path: Path) -> str:
    """The group key for a file: the regex's first group (or whole match), else the file stem."""
    if pattern is None:
        return stem
    match = pattern.search(path.name)
    if match is None:
        raise DataError(
            f"{path}: group regex {pattern.pattern!r} does not match the file name; "
            "fix data.group_regex or the file name"
        )
    return match.group(1) if match.groups() else match.group(0)


def compile_group_regex(group_regex: str | None) -> re.Pattern[str] | None:
    if group_regex is None:
        return None
    try:
        return re.compile(group_regex)
    except re.error as exc:
        raise DataError(
            f"group regex {group_regex!r} is not a valid regular expression: {exc}"
        ) from exc


def scan_image_folder(
    root: str | Path,
    *,
    group_regex: str | None = None,
    classes: Sequence[str] | None = None,
) -> LabelledImages:
    """Index ``ROOT/<class>/<image>`` (any supported extension, sorted for reproducibility).

    Args:
        root: dataset folder; single wrapper folders around the class folders are skipped.
        group_regex: regex applied to each file name; its first group (or whole match) is the
            group (slide/patient). Without it, each image is its own group.
        classes: fixed class order (e.g. a trained model's); folders not in it are an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    class_root = _find_class_root(root)
    class_dirs = sorted(
        d
        for d in class_root.iterdir()
        if d.is_dir() and not d.name.startswith(".") and any(is_image_file(p) for p in d.iterdir())
    )
    if not class_dirs:
        raise DataError(
            f"{root}: no class folders with images found; expected ROOT/<class>/<image> with "
            "extensions .png .jpg .jpeg .tif .tiff"
        )
    found = [d.name for d in class_dirs]
    if classes is None:
        class_names = tuple(found)
    else:
        class_names = tuple(classes)
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise DataError(
                f"{root}: class folder(s) {unknown} are not among the model's classes "
                f"{list(class_names)}"
            )
    index = {name: i for i, name in enumerate(class_names)}
    pattern = compile_group_regex(group_regex)
    samples = [
        Sample(
            path=p,
            label=index[d.name],
            class_name=d.name,
            group=group_from_name(p.stem, pattern, p),
        )
        for d in class_dirs
        for p in sorted(d.iterdir())
        if is_image_file(p)
    ]
    return LabelledImages(classes=class_names, samples=tuple(samples))
