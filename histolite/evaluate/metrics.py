"""Classification metrics in the report format every histolite command shares."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from histolite.fileio import atomic_path


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro/weighted F1, per-class P/R/F1, confusion matrix."""
    labels = list(range(len(classes)))
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if len(y_true) == 0:
        raise ValueError("no predictions to score")
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    present = [i for i in labels if support[i] > 0]
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(np.mean([recall[i] for i in present])),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
        ),
        "weighted_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)
        ),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "classes": list(classes),
    }


def _resampled_groups(
    groups: Sequence[str], replicates: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each item's group index, each group's size, and (replicates, groups) drawn group indices."""
    if any(not g for g in groups):
        raise ValueError("every result needs a group name (got an empty one)")
    names, index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    sizes = np.bincount(index, minlength=len(names)).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, len(names), size=(replicates, len(names)))
    return index, sizes, draws


def group_bootstrap_accuracy(
    correct: Sequence[bool] | np.ndarray,
    groups: Sequence[str],
    replicates: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """A 95% interval for accuracy that resamples whole groups (source images, patients).

    Tiles of one source image succeed or fail together, so a tile-level interval is far too
    narrow: on Kather's grouped split one image holds up to 15% of a class's test tiles. The
    percentile bootstrap over groups gives the interval a rerun on new images would show.
    """
    correct = np.asarray(correct, dtype=bool)
    if len(correct) != len(groups):
        raise ValueError(f"{len(correct)} results but {len(groups)} groups")
    if len(correct) == 0:
        raise ValueError("no predictions to score")
    index, sizes, draws = _resampled_groups(groups, replicates, seed)
    hits = np.bincount(index, weights=correct.astype(np.float64), minlength=len(sizes))
    accuracies = hits[draws].sum(axis=1) / sizes[draws].sum(axis=1)
    low, high = np.percentile(accuracies, [2.5, 97.5])
    return {
        "low": float(low),
        "high": float(high),
        "groups": len(sizes),
        "replicates": replicates,
        "method": "percentile bootstrap over groups",
    }


def group_bootstrap_difference(
    correct_a: Sequence[Sequence[bool]] | np.ndarray,
    correct_b: Sequence[Sequence[bool]] | np.ndarray,
    groups: Sequence[str],
    replicates: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """A 95% interval for accuracy(A) - accuracy(B) on the same items, resampling whole groups.

    ``correct_a`` and ``correct_b`` are (runs, items) boolean arrays of paired runs (seed i of
    A against seed i of B); the statistic is the mean paired difference over runs, and every
    replicate resamples the groups once for all runs, so the interval keeps the pairing. It
    covers which test images were drawn, not seed-to-seed variation of training: report the
    per-seed differences beside it.
    """
    a = np.atleast_2d(np.asarray(correct_a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(correct_b, dtype=np.float64))
    if a.shape != b.shape or a.shape[1] != len(groups):
        raise ValueError(f"shapes {a.shape} and {b.shape} do not pair with {len(groups)} groups")
    if a.size == 0:
        raise ValueError("no paired results to compare")
    index, sizes, draws = _resampled_groups(groups, replicates, seed)
    per_group = np.stack([np.bincount(index, weights=row, minlength=len(sizes)) for row in a - b])
    diffs = per_group[:, draws].sum(axis=2) / sizes[draws].sum(axis=1)  # (runs, replicates)
    low, high = np.percentile(diffs.mean(axis=0), [2.5, 97.5])
    return {
        "difference": float((a - b).mean()),
        "low": float(low),
        "high": float(high),
        "groups": len(sizes),
        "runs": a.shape[0],
        "replicates": replicates,
    }


def write_class_report_csv(path: Path, metrics: dict[str, Any]) -> None:
    """``classification_report.csv``: per-class P/R/F1/support, then accuracy and F1 rows."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class", "precision", "recall", "f1", "support"])
        for name, row in metrics["per_class"].items():
            writer.writerow(
                [
                    name,
                    f"{row['precision']:.4f}",
                    f"{row['recall']:.4f}",
                    f"{row['f1']:.4f}",
                    row["support"],
                ]
            )
        total = sum(r["support"] for r in metrics["per_class"].values())
        writer.writerow(["accuracy", "", "", f"{metrics['accuracy']:.4f}", total])
        writer.writerow(["macro_f1", "", "", f"{metrics['macro_f1']:.4f}", total])
        writer.writerow(["weighted_f1", "", "", f"{metrics['weighted_f1']:.4f}", total])
