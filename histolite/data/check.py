"""Read every image of a dataset once and report what would break or bias training."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from histolite.data.feature_bags import FEATURE_SUFFIX, load_bag
from histolite.data.folder import Sample
from histolite.data.images import load_rgb
from histolite.errors import DataError


@dataclass
class CheckReport:
    """Class counts, image sizes, and each problem file with what is wrong with it."""

    class_counts: dict[str, int]
    sizes: Counter[tuple[int, int]] = field(default_factory=Counter)
    problems: list[tuple[Path, str]] = field(default_factory=list)
    odd_size: list[tuple[Path, tuple[int, int]]] = field(default_factory=list)

    def summary_lines(self) -> list[str]:
        lines = ["class counts:"]
        lines += [f"  {name}: {n}" for name, n in self.class_counts.items()]
        lines.append("image sizes (HxW: count):")
        lines += [f"  {h}x{w}: {n}" for (h, w), n in self.sizes.most_common(10)]
        if self.problems:
            lines.append(f"{len(self.problems)} unreadable / wrong-mode file(s):")
            lines += [f"  {p}: {why}" for p, why in self.problems]
        if self.odd_size:
            lines.append(f"{len(self.odd_size)} file(s) differ from the usual size:")
            lines += [f"  {p}: {h}x{w}" for p, (h, w) in self.odd_size[:50]]
        if not self.problems and not self.odd_size:
            lines.append("no problems found")
        return lines


def _probe(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    try:
        if path.suffix == FEATURE_SUFFIX:  # a slide bag: (tiles, features)
            bag = load_bag(path)
            return (int(bag.features.shape[0]), int(bag.features.shape[1])), None
        array = load_rgb(path)
    except DataError as exc:
        message = str(exc)
        prefix = f"{path}: "
        return None, message[len(prefix) :] if message.startswith(prefix) else message
    return (array.shape[0], array.shape[1]), None


def check_images(
    samples: Sequence[Sample], classes: Sequence[str], *, progress: bool = True, workers: int = 4
) -> CheckReport:
    """Decode every image (threads: decoding releases the GIL) and collect problems."""
    counts = Counter(s.class_name for s in samples)
    report = CheckReport(class_counts={name: counts.get(name, 0) for name in classes})
    paths = [s.path for s in samples]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(
            tqdm(
                pool.map(_probe, paths),
                total=len(paths),
                desc="checking images",
                disable=not progress,
                leave=False,
            )
        )
    for path, (size, problem) in zip(paths, results, strict=True):
        if problem is not None:
            report.problems.append((path, problem))
        elif size is not None:
            report.sizes[size] += 1
    if report.sizes:
        usual = report.sizes.most_common(1)[0][0]
        report.odd_size = [
            (path, size)
            for path, (size, problem) in zip(paths, results, strict=True)
            if problem is None and size is not None and size != usual
        ]
    return report
