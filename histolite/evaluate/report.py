"""``histolite evaluate``: the report bundle for a run on a folder or a split CSV."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from histolite.data.folder import Sample, scan_image_folder
from histolite.data.overlap import Overlap, find_overlap, training_rows_in, warn_training_rows
from histolite.data.patches import ImageLevelPrediction, aggregate_patch_predictions
from histolite.data.splits import read_split_csv
from histolite.errors import DataError, HistoliteError
from histolite.evaluate.inference import (
    BagPrediction,
    Predictions,
    bag_level_predictions,
    predict,
    predict_bags,
)
from histolite.evaluate.metrics import (
    accuracy_coverage,
    calibration_metrics,
    classification_metrics,
    group_bootstrap_accuracy,
    group_bootstrap_calibration,
    selective_summary,
    write_class_report_csv,
)
from histolite.evaluate.plots import (
    plot_accuracy_coverage,
    plot_confusion_matrix,
    plot_reliability,
    plot_training_curves,
)
from histolite.fileio import atomic_path, write_json
from histolite.models.loading import LoadedRun, load_run
from histolite.runinfo import fingerprint_files, run_metadata
from histolite.runspec import RunDir
from histolite.train.crossfit import Crossfit


def load_eval_samples(
    data: str | Path, classes: tuple[str, ...], split: str = "test"
) -> list[Sample]:
    """Samples from an image folder (all of it) or from one split of a split CSV."""
    data = Path(data)
    if data.suffix.lower() == ".csv":
        table = read_split_csv(data, classes=classes)
        samples = list(table.subset(split).samples)
        if not samples:
            raise DataError(f"{data}: no rows with split {split!r}")
        return samples
    return list(scan_image_folder(data, classes=classes).samples)


def _write_predictions_csv(
    path: Path, samples: list[Sample], probs: np.ndarray, classes: tuple[str, ...]
) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "true", "predicted", *[f"p_{c}" for c in classes]])
        for sample, p in zip(samples, probs, strict=True):
            writer.writerow(
                [
                    str(sample.path),
                    sample.class_name,
                    classes[int(p.argmax())],
                    *[f"{v:.6f}" for v in p],
                ]
            )


def _write_attention_csv(
    path: Path, samples: list[Sample], bags: list[BagPrediction], classes: tuple[str, ...]
) -> None:
    """One row per patch: where it is in its image and the attention it got."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["path", "true", "predicted", "patch_y", "patch_x", "patch_size", "attention"]
        )
        for sample, bag in zip(samples, bags, strict=True):
            predicted = classes[int(bag.probs.argmax())]
            for (y, x), weight in zip(bag.positions, bag.attention, strict=True):
                writer.writerow(
                    [
                        str(sample.path),
                        sample.class_name,
                        predicted,
                        y,
                        x,
                        bag.patch_size,
                        f"{weight:.6f}",
                    ]
                )


def image_results(preds: Predictions) -> list[ImageLevelPrediction] | None:
    """Patch predictions aggregated per image (None when the predictions are per image)."""
    if not preds.patch_level:
        return None
    return aggregate_patch_predictions(preds.image_index.tolist(), preds.probs)


def build_report(
    run: LoadedRun,
    samples: list[Sample],
    preds: Predictions,
    images: list[ImageLevelPrediction] | None = None,
) -> dict[str, Any]:
    """Metrics at the model's level, plus image-level metrics when it classified patches."""
    classes = run.spec.classes
    metrics = classification_metrics(preds.labels, preds.probs.argmax(axis=1), classes)
    level = "bag" if run.is_mil else "patch" if preds.patch_level else "image"
    report: dict[str, Any] = {"level": level, **metrics}
    groups = [samples[i].group or str(samples[i].path) for i in preds.image_index]
    correct = preds.probs.argmax(axis=1) == preds.labels
    interval = group_bootstrap_accuracy(correct, groups)
    distinct_images = len({int(i) for i in preds.image_index})
    interval["unit"] = (
        "images (the data name no groups)" if interval["groups"] == distinct_images else "groups"
    )
    if interval["groups"] < 10:
        interval["warning"] = f"only {interval['groups']} groups: the interval is unreliable"
    report["accuracy_ci95"] = interval
    report["calibration_metrics"] = calibration_metrics(preds.probs, preds.labels)
    report["calibration_ci95"] = group_bootstrap_calibration(preds.probs, preds.labels, groups)
    report["selective"] = selective_summary(preds.probs, preds.labels)
    report["calibration"] = _calibration_note(run)
    if preds.patch_level:
        images = images if images is not None else image_results(preds)
        assert images is not None
        truth = [samples[r.image_index].label for r in images]
        report["image_level"] = {
            "majority_vote": classification_metrics(
                truth, [r.majority_vote for r in images], classes
            ),
            "mean_probability": classification_metrics(
                truth, [r.mean_probability for r in images], classes
            ),
        }
    threshold = report["calibration"].get("abstain_below")
    if threshold is not None:
        report["calibration"]["at_threshold"] = abstention_on(preds, images, samples, threshold)
    return report


def abstention_on(
    preds: Predictions,
    images: list[ImageLevelPrediction] | None,
    samples: list[Sample],
    threshold: float,
) -> dict[str, Any]:
    """Coverage and accuracy of the answered images at the validation-fitted threshold.

    The threshold was chosen on validation, so on held-out images both numbers move; this is
    what the served model will do. One row per image, as served (patch probabilities averaged).
    """
    if images is not None:
        probs = np.stack([r.mean_probs for r in images])
        labels = np.array([samples[r.image_index].label for r in images])
    else:
        probs, labels = preds.probs, preds.labels
    answered = probs.max(axis=1) >= threshold  # the service abstains below it
    right = probs.argmax(axis=1) == labels
    n_answered = int(answered.sum())
    return {
        "unit": "image",
        "n": len(labels),
        "answered": n_answered,
        "coverage": n_answered / len(labels) if len(labels) else None,
        "accuracy_answered": float(right[answered].mean()) if n_answered else None,
    }


def _calibration_note(run: LoadedRun) -> dict[str, Any]:
    """Whether these probabilities went through the run's calibration, and which."""
    spec = run.calibration
    if spec is None:
        return {"applied": False, "note": run.calibration_note or "the run is not calibrated"}
    return {
        "applied": True,
        "method": spec.method,
        "temperature": spec.temperature,
        "fitted_on": "validation",
        "file": str(RunDir(run.run_dir).calibration),
        "abstain_below": spec.abstain_below,
    }


def _predict_samples(
    run: LoadedRun,
    samples: list[Sample],
    batch_size: int,
    num_workers: int,
    progress: bool,
    tta: bool,
) -> tuple[Predictions, list[BagPrediction] | None]:
    if run.is_mil:
        bags = predict_bags(run, samples, progress=progress)
        return bag_level_predictions(run, samples, bags), bags
    preds = predict(
        run, samples, batch_size=batch_size, num_workers=num_workers, progress=progress, tta=tta
    )
    return preds, None


def _write_report_files(
    out: Path,
    run: LoadedRun,
    samples: list[Sample],
    report: dict[str, Any],
    preds: Predictions,
    images: list[ImageLevelPrediction] | None,
    bags: list[BagPrediction] | None,
) -> None:
    classes = run.spec.classes
    write_json(out / "report.json", report)
    if bags is not None:
        _write_attention_csv(out / "attention.csv", samples, bags, classes)
    write_class_report_csv(out / "classification_report.csv", report)
    probs = np.stack([r.mean_probs for r in images]) if images is not None else preds.probs
    _write_predictions_csv(out / "predictions.csv", samples, probs, classes)
    title = f"{run.spec.model_name}: {report['level']} level"
    plot_confusion_matrix(report["confusion_matrix"], classes, out / "confusion_matrix.png", title)
    state = "calibrated" if report["calibration"]["applied"] else "uncalibrated"
    plot_reliability([(state, report["calibration_metrics"])], out / "reliability.png", title=title)
    plot_accuracy_coverage(
        [(state, accuracy_coverage(preds.probs, preds.labels))],
        out / "accuracy_coverage.png",
        title=title,
    )
    if images is not None:
        plot_confusion_matrix(
            report["image_level"]["mean_probability"]["confusion_matrix"],
            classes,
            out / "confusion_matrix_image_level.png",
            title=f"{run.spec.model_name}: image level (mean probability)",
        )
    plot_training_curves(run.run_dir, out / "training_curves.png")


def evaluate_run(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    split: str = "test",
    checkpoint: str = "best",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    tta: bool = False,
) -> dict[str, Any]:
    """Predict ``data`` with the run's model and write the report bundle into ``out``.

    Evaluating images the run trained on is allowed but warned about, and counted in the report.
    A cross-fitted teacher run is reported as its ensemble, with each fold model beside it.
    """
    crossfit = Crossfit.load(run_dir)
    if crossfit is not None:
        return evaluate_crossfit(
            crossfit, data, out, split=split, checkpoint=checkpoint, batch_size=batch_size,
            num_workers=num_workers, progress=progress, tta=tta,
        )  # fmt: skip
    run = load_run(run_dir, checkpoint)
    samples = load_eval_samples(data, run.spec.classes, split)
    seen = training_rows_in(RunDir(run.run_dir).split_csv, samples)
    leak = warn_training_rows(run.run_dir, seen, len(samples)) if seen.total else None
    preds, bags = _predict_samples(run, samples, batch_size, num_workers, progress, tta)
    images = image_results(preds)
    report = build_report(run, samples, preds, images)
    report.update(
        run=str(Path(run_dir)),
        checkpoint=checkpoint,
        test_time_augmentation="8 dihedral views" if tta else None,
        data=str(data),
        split=split if Path(data).suffix.lower() == ".csv" else None,
        training_images_evaluated=seen.total,
        training_images_unverified=seen.by_name,
    )
    if leak is not None:
        report["warning"] = leak
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_report_files(out, run, samples, report, preds, images, bags)
    write_json(
        out / "metadata.json",
        run_metadata(
            dataset_fingerprint=fingerprint_files((str(s.path), s.class_name) for s in samples),
            run=str(Path(run_dir).resolve()),
            checkpoint=checkpoint,
        ),
    )
    return report


def evaluate_crossfit(
    crossfit: Crossfit,
    data: str | Path,
    out: str | Path,
    *,
    split: str = "test",
    checkpoint: str = "best",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    tta: bool = False,
) -> dict[str, Any]:
    """Every fold model of a cross-fitted run on ``data``, and their ensemble (the mean of the
    K models' probabilities), whose metrics are the report's own.

    As :func:`evaluate_run`: images any fold trained on are warned about and counted (the
    ensemble has seen them), ``metadata.json`` is written beside the report, and
    ``calibration.applied`` says whether the probabilities averaged were calibrated.

    Raises:
        HistoliteError: some folds are calibrated and others are not (their mean would mix
            calibrated and raw probabilities).
    """
    runs = [load_run(folder, checkpoint) for folder in crossfit.fold_dirs]
    calibration = _crossfit_calibration(crossfit, runs)
    first = runs[0]
    samples = load_eval_samples(data, first.spec.classes, split)
    seen = _crossfit_training_rows(crossfit, samples)
    leak = warn_training_rows(crossfit.root, seen, len(samples)) if seen.total else None
    per_fold, probs = [], []
    for fold, run in enumerate(runs):
        preds, _ = _predict_samples(run, samples, batch_size, num_workers, progress, tta)
        metrics = build_report(run, samples, preds)
        per_fold.append(
            {
                "fold": fold,
                "run": str(run.run_dir),
                **{k: metrics[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")},
                "ece": metrics["calibration_metrics"]["ece"],
                "calibrated": metrics["calibration"]["applied"],
            }
        )
        probs.append(preds.probs)
    ensemble = Predictions(
        probs=np.mean(probs, axis=0),
        labels=preds.labels,
        image_index=preds.image_index,
        patch_level=preds.patch_level,
    )
    report = build_report(first, samples, ensemble)
    report["calibration"] = calibration  # every fold's, not the first fold's alone
    accuracies = [f["accuracy"] for f in per_fold]
    report.update(
        run=str(crossfit.root),
        checkpoint=checkpoint,
        test_time_augmentation="8 dihedral views" if tta else None,
        data=str(data),
        split=split if Path(data).suffix.lower() == ".csv" else None,
        training_images_evaluated=seen.total,
        training_images_unverified=seen.by_name,
        crossfit={
            "folds": crossfit.folds,
            "ensemble": "mean of the fold models' probabilities",
            "per_fold": per_fold,
            "fold_accuracy_mean": float(np.mean(accuracies)),
            "fold_accuracy_sd": float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0,
            "out_of_fold": _out_of_fold_accuracy(crossfit, samples, ensemble, probs),
        },
    )
    if leak is not None:
        report["warning"] = leak
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_report_files(out, first, samples, report, ensemble, image_results(ensemble), None)
    write_json(
        out / "metadata.json",
        run_metadata(
            dataset_fingerprint=fingerprint_files((str(s.path), s.class_name) for s in samples),
            run=str(crossfit.root.resolve()),
            checkpoint=checkpoint,
            folds=[str(run.run_dir.resolve()) for run in runs],
        ),
    )
    return report


def _out_of_fold_accuracy(
    crossfit: Crossfit, samples: list[Sample], ensemble: Predictions, fold_probs: list[np.ndarray]
) -> dict[str, Any] | None:
    """Accuracy on the cross-fitted training images, each predicted by the one fold model that
    never trained on it: what out-of-fold distillation's targets are worth (None when ``data``
    holds no training images). The ensemble's accuracy on them is inflated, this one is not.

    ``class_seen`` leaves out the images whose fold model never trained on their class (all of
    its training groups in that fold): out-of-fold distillation learns those from their labels.
    """
    rows = [
        (row, crossfit.groups[samples[index].group])
        for row, index in enumerate(ensemble.image_index)
        if samples[index].group in crossfit.groups
    ]
    if not rows:
        return None
    predicted = np.array([fold_probs[fold][row].argmax() for row, fold in rows])
    truth = ensemble.labels[[row for row, _ in rows]]
    unseen = crossfit.classes_unseen()
    names = [samples[ensemble.image_index[row]].class_name for row, _ in rows]
    seen = np.array(
        [name not in unseen.get(fold, ()) for (_, fold), name in zip(rows, names, strict=True)],
        dtype=bool,
    )
    correct = predicted == truth
    return {
        "accuracy": float(np.mean(correct)),
        "n": len(rows),
        "class_seen": {
            "accuracy": float(np.mean(correct[seen])) if seen.any() else None,
            "n": int(seen.sum()),
        },
    }


def _crossfit_training_rows(crossfit: Crossfit, samples: list[Sample]) -> Overlap:
    """Which of ``samples`` some fold trained on: the training rows of every fold's split
    (together the cross-fitted run's training split, whose rows each fold but one saw)."""
    train: dict[Path, Sample] = {}
    for folder in [crossfit.root, *crossfit.fold_dirs]:
        path = RunDir(folder).split_csv
        if path.is_file():
            rows = read_split_csv(path).rows
            train.update((s.path, s) for s, name in rows if name == "train")
    return find_overlap(list(train.values()), samples)


def _crossfit_calibration(crossfit: Crossfit, runs: list[LoadedRun]) -> dict[str, Any]:
    """The report's ``calibration`` for the mean of the folds: applied only when every fold's
    calibration was; a mix is refused, since the mean would blend calibrated and raw
    probabilities and neither description would be true."""
    notes = [_calibration_note(run) for run in runs]
    applied = [k for k, note in enumerate(notes) if note["applied"]]
    if not applied:
        return {
            "applied": False,
            "note": "no fold is calibrated",
            "per_fold": [note["note"] for note in notes],
        }
    if len(applied) < len(runs):
        raw = [k for k in range(len(runs)) if k not in applied]
        reasons = "; ".join(f"fold {k}: {notes[k]['note']}" for k in raw)
        raise HistoliteError(
            f"{crossfit.root}: folds {applied} are calibrated but folds {raw} are not ({reasons}); "
            "the ensemble would average calibrated and uncalibrated probabilities. Calibrate "
            "every fold (histolite calibrate RUN/fold_K) or none"
        )
    methods = sorted({str(note["method"]) for note in notes})
    return {
        "applied": True,
        "method": methods[0] if len(methods) == 1 else "per fold",
        "temperature": None,  # one per fold: see per_fold
        "fitted_on": "validation",
        "ensemble": "mean of the folds' calibrated probabilities",
        "per_fold": notes,
    }
