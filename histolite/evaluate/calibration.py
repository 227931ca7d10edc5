"""``histolite calibrate RUN``: probabilities that mean what they say, and when not to answer.

Everything is fitted on the run's **validation** split (never test): the temperature (or
per-class vector scaling) that minimises the validation NLL, the abstention threshold (the
lowest confidence at which the answered validation images reach a target accuracy), and an
out-of-distribution score with its threshold (the score that best separates right from wrong
validation answers, flagging the least in-distribution ``ood_flag_rate`` of validation). The
result goes to ``RUN/calibration.json`` (:class:`~histolite.runspec.CalibrationSpec`) with the
checkpoint's SHA-256, so it is applied only to the weights it was fitted for; ``evaluate``,
``export`` (the ONNX graph scales its logits) and serving then use it.

The abstention threshold's unit is one served answer: an image, whose confidence for a run
trained on patches is that of its patches' mean probabilities (as ``predict`` and the service
answer). ``slide infer`` compares it with each tile's own confidence: the same unit when the
model answers one tile per image (tile runs, and patch runs whose images are single patches);
otherwise a patch is a noisier answer than its image's mean, and the tiles answered need not
reach the target accuracy. ``calibration.json`` names the unit (``abstention.unit``), and so
do model cards and slide summaries (``abstention_unit``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histolite.data.splits import read_split_csv
from histolite.errors import HistoliteError
from histolite.evaluate.inference import Predictions, predict
from histolite.evaluate.metrics import (
    accuracy_coverage,
    auroc,
    calibration_metrics,
    choose_abstention_threshold,
    selective_summary,
)
from histolite.evaluate.plots import plot_accuracy_coverage, plot_reliability
from histolite.fileio import file_sha256
from histolite.models.calibration import METHODS, fit_temperature, fit_vector_scaling
from histolite.models.loading import load_run
from histolite.runspec import CalibrationSpec, RunDir
from histolite.uncertainty import SCORES, score, softmax

MIN_VALIDATION = 50  # fewer images give a temperature, but an unreliable one: say so


@dataclass(frozen=True)
class ImageScores:
    """Validation results per served answer (an image; patch results averaged per image)."""

    probs: np.ndarray
    labels: np.ndarray
    scores: dict[str, np.ndarray]


def abstention_unit(patch_level: bool, bag: bool = False) -> str:
    """What one confidence compared with the abstention threshold stands for (the images
    :func:`per_image` fits it on)."""
    if bag:
        return "image (a bag of patches: its bag prediction)"
    if patch_level:
        return "image (the mean of its patches' probabilities)"
    return "image"


def per_image(preds: Predictions, probs: np.ndarray, logits: np.ndarray) -> ImageScores:
    """Probabilities and scores per image, as served: patch rows are averaged per image."""
    scores = {name: score(name, probs, logits) for name in SCORES}
    if not preds.patch_level:
        return ImageScores(probs, preds.labels, scores)
    images, first = np.unique(preds.image_index, return_index=True)
    where = np.searchsorted(images, preds.image_index)
    count = np.bincount(where).astype(np.float64)

    def mean(values: np.ndarray) -> np.ndarray:
        total = np.zeros((len(images), *values.shape[1:]))
        np.add.at(total, where, values)
        return total / count.reshape(-1, *([1] * (values.ndim - 1)))

    return ImageScores(
        mean(probs), preds.labels[first], {name: mean(v) for name, v in scores.items()}
    )


def choose_ood_score(images: ImageScores, flag_rate: float) -> dict[str, Any]:
    """The score that best tells right from wrong validation answers (AUROC), and the value
    below which the least in-distribution ``flag_rate`` of validation images fall."""
    right = images.probs.argmax(axis=1) == images.labels
    if right.all() or not right.any():
        return {"score": None, "reason": "validation answers are all right or all wrong"}
    separation = {
        name: round(auroc(values[right], values[~right]), 4)
        for name, values in images.scores.items()
    }
    best = max(separation, key=lambda name: separation[name])
    threshold = float(np.quantile(images.scores[best], flag_rate))
    return {
        "score": best,
        "threshold": threshold,
        "validation_flag_rate": float(np.mean(images.scores[best] < threshold)),
        "auroc_right_vs_wrong": separation,
        "chosen_by": "AUROC of right vs wrong validation answers",
    }


def fit_scaling(
    logits: np.ndarray, labels: np.ndarray, method: str
) -> tuple[float | None, list[float], list[float]]:
    """(temperature or None, scale, bias) of ``logits * scale + bias`` fitted by NLL."""
    if method == "temperature":
        temperature = fit_temperature(logits, labels)
        return temperature, [1.0 / temperature], [0.0]
    scale, bias = fit_vector_scaling(logits, labels)
    return None, scale, bias


def calibrate_run(
    run_dir: str | Path,
    *,
    checkpoint: str = "best",
    method: str = "temperature",
    target: float = 0.99,
    ood_flag_rate: float = 0.05,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit and write ``RUN/calibration.json`` and its figures; returns the spec as a dict."""
    if method not in METHODS:
        raise HistoliteError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    if not 0.0 < ood_flag_rate < 1.0:
        raise HistoliteError(f"--ood-flag-rate {ood_flag_rate}: expected a fraction in (0, 1)")
    run_dir = Path(run_dir)
    layout = RunDir(run_dir)
    run = load_run(run_dir, checkpoint, calibrated=False)
    validation = list(read_split_csv(layout.split_csv).subset("val").samples)
    if not validation:
        raise HistoliteError(
            f"{run_dir}: the run has no validation images, and calibration is fitted on "
            "validation, never on test; retrain with data.val_fraction > 0"
        )
    preds = predict(run, validation, batch_size=batch_size, progress=progress)
    if preds.logits is None:
        raise HistoliteError(f"{run_dir}: the model gave no logits to calibrate")
    logits, labels = preds.logits.astype(np.float64), preds.labels
    if np.all(np.argmax(logits, axis=1) == labels):
        # the likelihood then keeps rising as the scaling sharpens: T would collapse towards 0
        # wherever the optimiser stops, and every answer would read 1.0
        raise HistoliteError(
            f"{run_dir}: all {len(labels)} validation images are classified right, so there is "
            "no error to calibrate against (the fitted temperature would collapse to 0); "
            "calibrate with a larger or harder validation split (data.val_fraction)"
        )
    temperature, scale, bias = fit_scaling(logits, labels, method)
    scaled = logits * np.asarray(scale) + np.asarray(bias)
    before = per_image(preds, softmax(logits), logits)
    after = per_image(preds, softmax(scaled), scaled)
    metrics: dict[str, Any] = {
        "images": len(validation),
        "before": calibration_metrics(before.probs, before.labels),
        "after": calibration_metrics(after.probs, after.labels),
        "selective": selective_summary(after.probs, after.labels),
    }
    if len(validation) < MIN_VALIDATION:
        metrics["warning"] = f"only {len(validation)} validation images: thresholds are noisy"
    abstention = choose_abstention_threshold(after.probs, after.labels, target)
    abstention["unit"] = abstention_unit(preds.patch_level, run.is_mil)  # what it was fitted per
    assert run.checkpoint is not None
    spec = CalibrationSpec(
        method=method,
        scale=tuple(float(v) for v in scale),
        bias=tuple(float(v) for v in bias),
        checkpoint=run.checkpoint.name,
        checkpoint_sha256=file_sha256(run.checkpoint),
        temperature=temperature,
        abstain_below=abstention.get("threshold"),
        abstention=abstention,
        ood=choose_ood_score(after, ood_flag_rate),
        validation=metrics,
    )
    spec.save(run_dir)
    figures = layout.calibration_figures
    figures.mkdir(exist_ok=True)
    plot_reliability(
        [("before", metrics["before"]), ("after", metrics["after"])],
        figures / "reliability.png",
        title=f"{run_dir.name}: validation, {method} scaling",
    )
    plot_accuracy_coverage(
        [("validation", accuracy_coverage(after.probs, after.labels))],
        figures / "accuracy_coverage.png",
        title=f"{run_dir.name}: validation after calibration",
    )
    return {"file": str(layout.calibration), **spec.__dict__}
