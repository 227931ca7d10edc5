"""Classification metrics in the report format every histolite command shares."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
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


# Calibration, selective prediction and out-of-distribution scores. A pathologist reads a
# tile's probability as "how often is this call right"; these say whether that reading holds,
# what abstaining on the least confident tiles buys, and how well a score separates tiles
# the model knows from tiles it does not.

ROW_SUM_TOLERANCE = 1e-3  # float16 softmax or JSON-rounded rows drift by ~1e-4; logits do not
NLL_FLOOR = 1e-12  # a zero probability for the true class costs -log(1e-12) ~ 27.6, not inf
SELECTIVE_COVERAGES = (1.0, 0.95, 0.9, 0.8)


def _check_probs(probs: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities as float64 (N, C) and labels as int64 (N,), or a ValueError naming the fault.

    Every calibration number silently turns into nonsense when fed logits, a transposed
    array or one-hot labels, so the checks are strict: rows must be probabilities that sum to
    1 (within ``ROW_SUM_TOLERANCE``) and labels must be class indices.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or p.shape[1] == 0:
        raise ValueError(f"probs must be a (samples, classes) array, got shape {p.shape}")
    if p.shape[0] == 0:
        raise ValueError("no predictions to score")
    if y.shape != (p.shape[0],):
        raise ValueError(f"labels must have shape ({p.shape[0]},) to match probs, got {y.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contain NaN or infinite values")
    if p.min() < 0 or p.max() > 1:
        raise ValueError(
            f"probs must lie in [0, 1] (found {p.min():.4g} to {p.max():.4g}); "
            "pass softmax outputs, not logits"
        )
    sums = p.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > ROW_SUM_TOLERANCE:
        raise ValueError(
            f"probability rows must sum to 1 (row {worst} sums to {sums[worst]:.6g}); "
            "pass softmax outputs, not logits"
        )
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)  # integral floats (e.g. read back from a CSV) are fine
    if y.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(
            f"labels must be class indices in [0, {p.shape[1] - 1}] (found {y.min()} to {y.max()})"
        )
    return p, y


def _top_label(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's confidence (max probability) and whether its argmax is the true class.

    Ties between classes go to the lowest class index, as ``argmax`` (and the classifier's
    own prediction) does.
    """
    pred = p.argmax(axis=1)
    return p[np.arange(len(p)), pred], pred == y


def _check_bins(bins: int) -> None:
    if int(bins) != bins or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins}")


def _bin_edges(bins: int) -> np.ndarray:
    """Equal-width edges over [0, 1], each edge ``k / bins`` rounded once.

    ``np.linspace`` would put 0.3 at 0.30000000000000004 and ``floor(conf * bins)`` puts
    15/22 below its edge; dividing once makes a confidence written as ``k / bins`` land
    exactly on its edge.
    """
    return np.arange(bins + 1, dtype=np.float64) / bins


def _bin_index(conf: np.ndarray, bins: int) -> np.ndarray:
    """Bin of each confidence: bins are [low, high), except the last, which is [low, 1]."""
    index = np.searchsorted(_bin_edges(bins), conf, side="right") - 1
    return np.clip(index, 0, bins - 1)


def _per_sample_losses(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Negative log-likelihood of the true class (floored) and multi-class Brier score."""
    rows = np.arange(len(y))
    nll = -np.log(np.clip(p[rows, y], NLL_FLOOR, None))
    residual = p.copy()
    residual[rows, y] -= 1.0
    return nll, np.square(residual).sum(axis=1)


def calibration_metrics(
    probs: npt.ArrayLike, labels: npt.ArrayLike, bins: int = 15
) -> dict[str, Any]:
    """How far top-label confidence is from accuracy, plus the NLL and Brier score.

    * ``ece``: expected calibration error, ``sum_b (n_b / N) |acc_b - conf_b|`` over
      ``bins`` equal-width bins of confidence (the max probability). Bins are [low, high);
      the last also holds a confidence of exactly 1.0 and the first holds 0.
    * ``mce``: the largest ``|acc_b - conf_b|`` over non-empty bins: the worst promise made.
    * ``nll``: mean ``-log p(true class)``, with ``p`` clipped at ``NLL_FLOOR`` (1e-12) so a
      confident miss with probability exactly 0 costs about 27.6 rather than infinity.
    * ``brier``: mean over samples of ``sum_c (p_c - onehot_c)^2`` (0 is perfect, 2 is worst).
    * ``mean_confidence`` and ``accuracy``: their difference is the overall over-confidence.
    * ``bins``: per bin ``low``, ``high``, ``count``, ``accuracy`` and ``confidence`` (the
      last two ``None`` when empty), so a reliability diagram can be redrawn from report.json.

    ECE depends on the binning and is biased upwards on small sets (noise never cancels in
    ``|.|``), so compare models with the same ``bins`` and report NLL/Brier beside it.
    """
    _check_bins(bins)
    p, y = _check_probs(probs, labels)
    conf, correct = _top_label(p, y)
    index = _bin_index(conf, bins)
    counts = np.bincount(index, minlength=bins)
    conf_sums = np.bincount(index, weights=conf, minlength=bins)
    hit_sums = np.bincount(index, weights=correct.astype(np.float64), minlength=bins)
    filled = counts > 0
    acc_b = np.divide(hit_sums, counts, out=np.zeros(bins), where=filled)
    conf_b = np.divide(conf_sums, counts, out=np.zeros(bins), where=filled)
    nll, brier = _per_sample_losses(p, y)
    edges = _bin_edges(bins)
    n = len(y)
    return {
        "n": n,
        # (n_b / N) |acc_b - conf_b| == |hits_b - conf_sum_b| / N, the form the bootstrap uses
        "ece": float(np.abs(hit_sums - conf_sums).sum() / n),
        "mce": float(np.abs(acc_b - conf_b)[filled].max()),
        "nll": float(nll.mean()),
        "brier": float(brier.mean()),
        "mean_confidence": float(conf.mean()),
        "accuracy": float(correct.mean()),
        "bins": [
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "count": int(counts[b]),
                "accuracy": float(acc_b[b]) if filled[b] else None,
                "confidence": float(conf_b[b]) if filled[b] else None,
            }
            for b in range(bins)
        ],
    }


def group_bootstrap_calibration(
    probs: npt.ArrayLike,
    labels: npt.ArrayLike,
    groups: Sequence[str],
    replicates: int = 2000,
    seed: int = 0,
    bins: int = 15,
) -> dict[str, Any]:
    """95% percentile intervals for ECE, NLL and Brier that resample whole groups.

    As for accuracy, tiles of one source image (patient, slide) are miscalibrated together, so
    only a group bootstrap gives an honest interval. Each group is reduced once to per-bin
    sums of ``correct - confidence`` and to NLL/Brier sums; a replicate's ECE is then
    ``sum_b |sum over drawn groups| / (tiles drawn)``, computed for all replicates at once
    (one pass per bin, no loop over replicates). The draws are those of
    :func:`group_bootstrap_accuracy` for the same groups and seed.

    ECE's bootstrap distribution sits above the point estimate when the model is nearly
    calibrated (resampling adds noise that ``|.|`` cannot cancel), so the interval may then
    exclude the point estimate; read it as the spread, not as a bias correction.
    """
    _check_bins(bins)
    if replicates < 1:
        raise ValueError(f"replicates must be at least 1, got {replicates}")
    p, y = _check_probs(probs, labels)
    if len(groups) != len(y):
        raise ValueError(f"{len(y)} results but {len(groups)} groups")
    index, sizes, draws = _resampled_groups(groups, replicates, seed)
    n_groups = len(sizes)
    conf, correct = _top_label(p, y)
    cell = index * bins + _bin_index(conf, bins)  # (group, bin) flattened
    gap = np.bincount(
        cell, weights=correct.astype(np.float64) - conf, minlength=n_groups * bins
    ).reshape(n_groups, bins)
    nll, brier = _per_sample_losses(p, y)
    nll_sums = np.bincount(index, weights=nll, minlength=n_groups)
    brier_sums = np.bincount(index, weights=brier, minlength=n_groups)
    totals = sizes[draws].sum(axis=1)  # tiles in each replicate
    ece = np.zeros(replicates)
    for b in range(bins):  # one (replicates, groups) gather at a time keeps memory flat
        ece += np.abs(gap[:, b][draws].sum(axis=1))
    statistics = {
        "ece": ece / totals,
        "nll": nll_sums[draws].sum(axis=1) / totals,
        "brier": brier_sums[draws].sum(axis=1) / totals,
    }
    result: dict[str, Any] = {}
    for name, values in statistics.items():
        low, high = np.percentile(values, [2.5, 97.5])
        result[name] = {"low": float(low), "high": float(high)}
    result.update(groups=n_groups, replicates=replicates, method="percentile bootstrap over groups")
    return result


def _selective_curve(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Confidences sorted high to low and the accuracy of the top k, for k = 1..N.

    The sort is stable, so tiles of equal confidence keep their input order; with many ties
    the curve between tie boundaries depends on that order.
    """
    conf, correct = _top_label(p, y)
    order = np.argsort(-conf, kind="stable")
    hits = np.cumsum(correct[order])
    return conf[order], hits / np.arange(1, len(hits) + 1)


def _answered_count(coverage: float, n: int) -> int:
    """ceil(coverage * n), at least 1; rounding first so 0.7 * 10 gives 7, not 8."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    return max(1, math.ceil(round(coverage * n, 9)))


def accuracy_coverage(
    probs: npt.ArrayLike, labels: npt.ArrayLike, max_points: int = 200
) -> dict[str, Any]:
    """Accuracy of the most confident k tiles against coverage k/N: what abstaining buys.

    The full curve has one point per tile; for report.json it is thinned to at most
    ``max_points`` evenly spaced points, always keeping k = 1 and k = N (full coverage).
    """
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points}")
    p, y = _check_probs(probs, labels)
    _, accuracy = _selective_curve(p, y)
    n = len(accuracy)
    keep = np.unique(np.round(np.linspace(0, n - 1, min(n, max_points))).astype(np.int64))
    return {
        "n": n,
        "coverage": ((keep + 1) / n).tolist(),
        "accuracy": accuracy[keep].tolist(),
    }


def accuracy_at_coverage(probs: npt.ArrayLike, labels: npt.ArrayLike, coverage: float) -> float:
    """Accuracy of the ``ceil(coverage * N)`` most confident tiles (ties in input order)."""
    p, y = _check_probs(probs, labels)
    _, accuracy = _selective_curve(p, y)
    return float(accuracy[_answered_count(coverage, len(accuracy)) - 1])


def selective_summary(probs: npt.ArrayLike, labels: npt.ArrayLike) -> dict[str, Any]:
    """Accuracy at 100/95/90/80% coverage and the area under the accuracy-coverage curve.

    ``area_under_accuracy_coverage`` is the mean of the top-k accuracy over k = 1..N (the
    discrete area over coverage): 1 if every confident tile is right, the accuracy itself if
    confidence carries no information about correctness. ``aurc`` is ``1 - area``, the
    area under the risk-coverage curve of Geifman & El-Yaniv (lower is better).
    """
    p, y = _check_probs(probs, labels)
    _, accuracy = _selective_curve(p, y)
    n = len(accuracy)
    area = float(accuracy.mean())
    return {
        "n": n,
        "accuracy_at_coverage": {
            str(c): float(accuracy[_answered_count(c, n) - 1]) for c in SELECTIVE_COVERAGES
        },
        "area_under_accuracy_coverage": area,
        "aurc": 1.0 - area,
    }


def choose_abstention_threshold(
    probs: npt.ArrayLike, labels: npt.ArrayLike, target: float
) -> dict[str, Any]:
    """The lowest confidence at which validation accuracy of the answered rows reaches target.

    A row is one answer, in the unit the threshold will be applied to: ``histolite calibrate``
    passes one row per image (patch probabilities averaged per image), see
    ``evaluate.calibration.abstention_unit``. Candidate thresholds are the observed
    confidences; a row is answered when its confidence is ``>= threshold`` (so every row tied
    at the threshold is answered too). The lowest qualifying threshold answers the most rows.
    Returns ``threshold``, ``target``, ``coverage`` (fraction answered), ``accuracy`` (of the
    answered), ``answered`` and ``n`` (validation rows). If even the most confident rows miss
    the target, ``threshold`` is ``None`` and ``reason`` gives the best accuracy reached and
    its coverage.

    The threshold is fitted on validation rows; on new data both coverage and accuracy move,
    so report them on the test set too.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target accuracy must be in (0, 1], got {target}")
    p, y = _check_probs(probs, labels)
    conf, accuracy = _selective_curve(p, y)
    n = len(conf)
    # a threshold answers a whole run of tied confidences: only each run's last tile counts
    ends = np.flatnonzero(np.r_[conf[1:] != conf[:-1], True])
    reached = ends[accuracy[ends] >= target]
    result: dict[str, Any] = {"threshold": None, "target": float(target)}
    if reached.size:
        last = int(reached[-1])  # most tiles answered, i.e. the lowest threshold
        result.update(
            threshold=float(conf[last]),
            coverage=(last + 1) / n,
            accuracy=float(accuracy[last]),
            answered=last + 1,
            n=n,
        )
        return result
    best_accuracy = accuracy[ends].max()
    best = int(ends[accuracy[ends] == best_accuracy][-1])  # widest coverage among the best
    result.update(
        coverage=None,
        accuracy=None,
        answered=0,
        n=n,
        best_accuracy=float(best_accuracy),
        best_coverage=(best + 1) / n,
        reason=(
            f"no confidence threshold reaches accuracy {target:.4g}: the best is "
            f"{best_accuracy:.4g}, answering {best + 1} of {n} tiles "
            f"({(best + 1) / n:.1%} coverage) at confidence >= {conf[best]:.4g}"
        ),
    )
    return result


def auroc(positive_scores: npt.ArrayLike, negative_scores: npt.ArrayLike) -> float:
    """P(score of a random positive > score of a random negative), ties counting half.

    With :func:`ood_scores` the positives are the in-distribution (or correctly classified)
    tiles, since every score there is higher for them: 1 separates perfectly, 0.5 is chance.
    """
    pos = np.asarray(positive_scores, dtype=np.float64)
    neg = np.asarray(negative_scores, dtype=np.float64)
    if pos.ndim != 1 or neg.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shapes {pos.shape} and {neg.shape}")
    if pos.size == 0 or neg.size == 0:
        raise ValueError(
            f"AUROC needs at least one positive and one negative score "
            f"(got {pos.size} and {neg.size})"
        )
    if not (np.all(np.isfinite(pos)) and np.all(np.isfinite(neg))):
        raise ValueError("scores contain NaN or infinite values")
    truth = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    return float(roc_auc_score(truth, np.r_[pos, neg]))
