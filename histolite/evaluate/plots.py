"""Report figures: confusion matrices and training curves (matplotlib, headless)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from histolite.fileio import atomic_path
from histolite.runspec import RunDir


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str = ""
) -> None:
    """Counts and row-normalised (recall) heatmaps side by side."""
    counts = np.asarray(matrix, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    size = max(4.0, 0.6 * len(classes) + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size))
    for ax, data, label, fmt in (
        (axes[0], counts, "count", "{:.0f}"),
        (axes[1], normalised, "fraction of true class", "{:.2f}"),
    ):
        im = ax.imshow(data, cmap="Blues", vmin=0)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        threshold = data.max() / 2 if data.size else 0
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(
                    j,
                    i,
                    fmt.format(data[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if data[i, j] > threshold else "black",
                )
        fig.colorbar(im, ax=ax, label=label, fraction=0.046)
    axes[0].set_title("counts")
    axes[1].set_title("row-normalised")
    if title:
        fig.suptitle(title)
    _save(fig, path)


def read_epoch_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """Epoch-level metrics merged over every (re)start's metrics.csv; later values win."""
    series: dict[str, dict[int, float]] = {}
    for path in RunDir(run_dir).metric_files():
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                if not row.get("epoch"):
                    continue
                epoch = int(float(row["epoch"]))
                for key, value in row.items():
                    if key in ("epoch", "step") or value in ("", None):
                        continue
                    series.setdefault(key, {})[epoch] = float(value)
    return series


def plot_training_curves(run_dir: Path, path: Path) -> bool:
    """Loss and accuracy per epoch, train vs val; False if the run has no logged epochs."""
    series = read_epoch_metrics(run_dir)
    if not series:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "acc"), strict=True):
        for stage, style in (("train", "-o"), ("val", "-s")):
            values = series.get(f"{stage}_{metric}")
            if values:
                epochs = sorted(values)
                ax.plot(
                    [e + 1 for e in epochs],
                    [values[e] for e in epochs],
                    style,
                    label=stage,
                    markersize=3,
                )
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy" if metric == "acc" else "cross-entropy loss")
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)
    return True
