"""Report figures: confusion matrices, training curves, reliability and accuracy-coverage."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


COVERAGE_MARK = 0.9  # the coverage a lab usually quotes: answer nine tiles in ten


def plot_reliability(
    metrics_list: Sequence[tuple[str, dict[str, Any]]], path: Path, title: str = ""
) -> None:
    """Reliability diagrams side by side (e.g. before and after calibration).

    Each panel draws one :func:`~histolite.evaluate.metrics.calibration_metrics` result:
    accuracy per confidence bin against the diagonal, the gap to the bin's mean confidence
    shaded (above the bar: over-confident; below: under-confident) and, beneath, how many
    tiles fall in each bin, since a large gap in a bin of three tiles means little.
    """
    if not metrics_list:
        raise ValueError("nothing to plot: pass at least one (name, calibration metrics) pair")
    panels = len(metrics_list)
    fig, axes = plt.subplots(
        2,
        panels,
        figsize=(4.2 * panels, 5.4),
        sharex="col",
        squeeze=False,
        gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08, "wspace": 0.3},
    )
    for col, (name, metrics) in enumerate(metrics_list):
        rows = metrics["bins"]
        low = np.array([r["low"] for r in rows], dtype=float)
        width = np.array([r["high"] for r in rows], dtype=float) - low
        counts = np.array([r["count"] for r in rows], dtype=float)
        filled = np.array([r["count"] > 0 and r["accuracy"] is not None for r in rows])
        acc = np.array([r["accuracy"] if f else 0.0 for r, f in zip(rows, filled, strict=True)])
        conf = np.array([r["confidence"] if f else 0.0 for r, f in zip(rows, filled, strict=True)])
        top, bottom = axes[0, col], axes[1, col]
        top.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfectly calibrated")
        top.bar(
            low[filled],
            acc[filled],
            width=width[filled],
            align="edge",
            color="tab:blue",
            edgecolor="black",
            lw=0.5,
            label="accuracy",
        )
        top.bar(  # from the accuracy to the mean confidence of the bin
            low[filled],
            np.abs(conf - acc)[filled],
            bottom=np.minimum(conf, acc)[filled],
            width=width[filled],
            align="edge",
            color="tab:red",
            alpha=0.3,
            hatch="//",
            edgecolor="tab:red",
            lw=0.5,
            label="gap to confidence",
        )
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy")
        top.set_title(f"{name}: ECE {metrics['ece']:.3f}" if name else f"ECE {metrics['ece']:.3f}")
        top.grid(alpha=0.3)
        top.legend(loc="upper left", fontsize=8)
        bottom.bar(low, counts, width=width, align="edge", color="grey", edgecolor="black", lw=0.5)
        bottom.set_xlabel("confidence (top-class probability)")
        bottom.set_ylabel("tiles")
        bottom.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def plot_accuracy_coverage(
    curves: Sequence[tuple[str, dict[str, Any]]], path: Path, title: str = ""
) -> None:
    """Accuracy of the answered tiles against coverage, one line per model or calibration.

    Drawn from :func:`~histolite.evaluate.metrics.accuracy_coverage` results; the marker and
    the legend give the accuracy at 90% coverage read off the (possibly thinned) curve, so to
    its resolution: the exact figure is in ``selective_summary``.
    """
    if not curves:
        raise ValueError("nothing to plot: pass at least one (name, accuracy_coverage) pair")
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    for name, curve in curves:
        coverage = np.asarray(curve["coverage"], dtype=float)
        accuracy = np.asarray(curve["accuracy"], dtype=float)
        at_mark = float(np.interp(COVERAGE_MARK, coverage, accuracy))
        # the value goes in the legend: labels next to near-identical curves would overlap
        label = f"{name} ({at_mark:.3f} at {COVERAGE_MARK:.0%} coverage)".lstrip()
        (line,) = ax.plot(coverage, accuracy, lw=1.5, label=label)
        ax.plot([COVERAGE_MARK], [at_mark], "o", color=line.get_color(), ms=6)
    ax.axvline(COVERAGE_MARK, color="grey", ls=":", lw=1)
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("coverage (fraction of tiles answered, most confident first)")
    ax.set_ylabel("accuracy of answered tiles")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    if title:
        ax.set_title(title)
    _save(fig, path)
