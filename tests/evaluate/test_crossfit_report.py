"""``evaluate`` on a cross-fitted teacher run: the same checks and files as a single run's
report (training images counted and warned about, metadata.json), and calibration reported
for all folds, never from the first fold alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from support import write_config

from histolite.data.splits import LeakageWarning, read_split_csv
from histolite.errors import HistoliteError
from histolite.evaluate.calibration import calibrate_run
from histolite.evaluate.inference import predict
from histolite.evaluate.report import evaluate_run
from histolite.models.loading import load_run
from histolite.train import resolve_config
from histolite.train.crossfit import Crossfit, crossfit_run


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> Path:
    """Two cross-fitted ResNet-8 teachers (one epoch each) on the synthetic tiles' slides."""
    root = tmp_path_factory.mktemp("crossfit_report")
    config = write_config(
        root / "teacher.yaml",
        synthetic_dir,
        data={"group_regex": r"^(slide\d+)_", "split_by": "group", "val_fraction": 0.25},
        crossfit={"folds": 2},
    )
    cfg = resolve_config(config, [], root / "teachers", resume=False)
    return crossfit_run(cfg, root / "teachers", progress=False)


def _copy(teachers: Path, tmp_path: Path) -> Path:
    """A copy to calibrate (split.csv paths are relative: the copy sits at the same depth)."""
    out = tmp_path / "teachers"
    shutil.copytree(teachers, out)
    return out


def test_training_images_are_counted_and_warned_about(teachers: Path, tmp_path: Path) -> None:
    train = list(read_split_csv(teachers / "split.csv").subset("train").samples)
    with pytest.warns(LeakageWarning, match=rf"{len(train)} of the {len(train)} images .*TRAINING"):
        report = evaluate_run(
            teachers, teachers / "split.csv", tmp_path / "train", split="train", progress=False
        )
    assert report["training_images_evaluated"] == len(train)
    assert "inflated" in report["warning"]
    clean = evaluate_run(
        teachers, teachers / "split.csv", tmp_path / "val", split="val", progress=False
    )
    assert clean["training_images_evaluated"] == 0 and "warning" not in clean
    assert clean["crossfit"]["out_of_fold"] is None  # no validation image is in a fold


def test_training_images_are_scored_by_the_fold_that_left_them_out(
    teachers: Path, tmp_path: Path
) -> None:
    """What out-of-fold distillation's targets are worth, next to the inflated ensemble."""
    train = list(read_split_csv(teachers / "split.csv").subset("train").samples)
    with pytest.warns(LeakageWarning):
        report = evaluate_run(
            teachers, teachers / "split.csv", tmp_path / "train", split="train", progress=False
        )
    crossfit = Crossfit.load(teachers)
    assert crossfit is not None
    folds = [load_run(teachers / f"fold_{k}") for k in range(crossfit.folds)]
    probs = [predict(fold, train, progress=False).probs for fold in folds]
    right = [
        probs[crossfit.fold_of(sample)][i].argmax()
        == folds[0].spec.classes.index(sample.class_name)
        for i, sample in enumerate(train)
    ]
    assert set(map(crossfit.fold_of, train)) == set(range(crossfit.folds))
    assert report["crossfit"]["out_of_fold"] == {
        "accuracy": np.mean(right),
        "n": len(train),
        "class_seen": {"accuracy": np.mean(right), "n": len(train)},  # every slide, every class
    }


def test_images_of_a_class_their_fold_never_saw_are_reported_apart(tmp_path: Path) -> None:
    """Out-of-fold distillation learns those from labels: ``class_seen`` is what it uses."""
    from histolite.data.folder import Sample
    from histolite.evaluate.inference import Predictions
    from histolite.evaluate.report import _out_of_fold_accuracy

    samples = [
        Sample(Path(f"{group}_{i}.png"), label, str(label), group)
        for group, label in (("a", 0), ("b", 0), ("c", 1))
        for i in range(2)
    ]  # class 1 has one group, in fold 1: fold 1's model never trained on it
    crossfit = Crossfit(tmp_path, 2, {"a": 0, "b": 1, "c": 1}, seed=0)
    lines = [
        "path,label,group,split",
        *(f"{s.path},{s.class_name},{s.group},train" for s in samples),
    ]
    (tmp_path / "split.csv").write_text("\n".join(lines) + "\n")  # what the folds trained on
    fold_probs = [
        np.array([[0.9, 0.1], [0.2, 0.8], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]]),
        np.array([[0.1, 0.9], [0.1, 0.9], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]]),
    ]  # samples 0-1 (fold 0): one right; 2-3 (fold 1): right; 4-5 (fold 1, class 1): wrong
    ensemble = Predictions(
        probs=np.mean(fold_probs, axis=0),
        labels=np.array([s.label for s in samples]),
        image_index=np.arange(6),
        patch_level=False,
    )
    result = _out_of_fold_accuracy(crossfit, samples, ensemble, fold_probs)
    assert result == {"accuracy": 3 / 6, "n": 6, "class_seen": {"accuracy": 3 / 4, "n": 4}}


def test_metadata_is_written_beside_the_report(teachers: Path, tmp_path: Path) -> None:
    evaluate_run(teachers, teachers / "split.csv", tmp_path / "eval", split="val", progress=False)
    meta = json.loads((tmp_path / "eval" / "metadata.json").read_text())
    assert meta["run"] == str(teachers.resolve()) and meta["checkpoint"] == "best"
    assert meta["folds"] == [str((teachers / f"fold_{k}").resolve()) for k in range(2)]
    assert meta["dataset_fingerprint"] and meta["histolite_version"]


def test_calibration_is_applied_for_all_folds_or_refused(teachers: Path, tmp_path: Path) -> None:
    run = _copy(teachers, tmp_path)
    report = evaluate_run(run, run / "split.csv", tmp_path / "raw", split="val", progress=False)
    assert report["calibration"]["applied"] is False
    calibrate_run(run / "fold_0", progress=False)
    # the first fold alone calibrated used to be reported as "applied" for the whole ensemble
    with pytest.raises(HistoliteError, match=r"folds \[0\] are calibrated but folds \[1\] are not"):
        evaluate_run(run, run / "split.csv", tmp_path / "mixed", split="val", progress=False)
    assert not (tmp_path / "mixed").exists()
    calibrate_run(run / "fold_1", method="vector", progress=False)
    report = evaluate_run(run, run / "split.csv", tmp_path / "all", split="val", progress=False)
    calibration = report["calibration"]
    assert calibration["applied"] is True and calibration["method"] == "per fold"
    assert [f["method"] for f in calibration["per_fold"]] == ["temperature", "vector"]
    assert all(f["calibrated"] for f in report["crossfit"]["per_fold"])
    # and the ensemble's probabilities are the mean of the folds' calibrated ones
    samples = list(read_split_csv(run / "split.csv").subset("val").samples)
    folds = [load_run(run / f"fold_{k}") for k in range(2)]
    assert all(fold.calibration is not None for fold in folds)
    mean = np.mean([predict(fold, samples, progress=False).probs for fold in folds], axis=0)
    lines = (tmp_path / "all" / "predictions.csv").read_text().splitlines()[1:]
    served = np.array([[float(v) for v in line.split(",")[3:]] for line in lines])
    np.testing.assert_allclose(served, mean, atol=1e-5)
