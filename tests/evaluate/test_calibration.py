"""Calibration end to end: fitted on validation, applied by evaluate, carried by the export
and the service, refused when stale, abstention and out-of-distribution flags everywhere."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from support import train_small_run

from histolite.data.images import load_rgb
from histolite.data.splits import read_split_csv
from histolite.errors import HistoliteError
from histolite.evaluate.calibration import calibrate_run
from histolite.evaluate.inference import predict, predict_image
from histolite.evaluate.report import evaluate_run
from histolite.export.onnx import export_run
from histolite.models.calibration import fit_temperature, fit_vector_scaling
from histolite.models.loading import load_run
from histolite.runspec import CalibrationSpec
from histolite.runtime.classifier import OnnxClassifier
from histolite.uncertainty import softmax


def _nll(logits: np.ndarray, labels: np.ndarray) -> float:
    p = softmax(logits)
    return float(-np.log(p[np.arange(len(labels)), labels]).mean())


def test_temperature_recovers_a_known_overconfidence() -> None:
    """Labels drawn from softmax(z); the model reports 2.5 z: the fitted temperature is ~2.5."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, size=(20000, 4))
    labels = np.array([rng.choice(4, p=p) for p in softmax(z)])
    assert fit_temperature(2.5 * z, labels) == pytest.approx(2.5, rel=0.05)
    assert fit_temperature(z, labels) == pytest.approx(1.0, rel=0.05)


def test_vector_scaling_fits_a_per_class_bias() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, size=(20000, 3))
    labels = np.array([rng.choice(3, p=p) for p in softmax(z)])
    shifted = z + np.array([1.5, 0.0, -1.0])  # the model favours class 0 for no reason
    scale, bias = fit_vector_scaling(shifted, labels)
    fixed = shifted * np.array(scale) + np.array(bias)
    assert _nll(fixed, labels) < _nll(shifted, labels) - 0.05
    assert bias[0] - bias[2] == pytest.approx(-2.5, abs=0.2)  # the shift, undone


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> Path:
    """A small run with validation and test splits, calibrated (temperature, target 0.9)."""
    run = train_small_run(tmp_path_factory.mktemp("calibrated"), synthetic_dir, epochs=3)
    calibrate_run(run, target=0.9, progress=False)
    return run


def test_calibration_is_fitted_on_validation_and_applied_by_evaluate(
    calibrated: Path, tmp_path: Path
) -> None:
    spec = CalibrationSpec.load(calibrated)
    assert spec is not None and spec.method == "temperature" and spec.temperature
    assert spec.scale == pytest.approx((1 / spec.temperature,))
    # the fit lowered the validation NLL (it is the quantity minimised)
    assert spec.validation["after"]["nll"] <= spec.validation["before"]["nll"] + 1e-9
    validation = list(read_split_csv(calibrated / "split.csv").subset("val").samples)
    assert spec.validation["images"] == len(validation)
    for name in ("reliability.png", "accuracy_coverage.png"):
        assert (calibrated / "calibration" / name).stat().st_size > 1000
    # evaluate's probabilities are softmax(logits / T), and it says so
    raw = load_run(calibrated, calibrated=False)
    test = list(read_split_csv(calibrated / "split.csv").subset("test").samples)
    logits = predict(raw, test, progress=False).logits
    assert logits is not None
    report = evaluate_run(calibrated, calibrated / "split.csv", tmp_path / "eval", progress=False)
    assert report["calibration"]["applied"] and report["calibration"]["temperature"] > 0
    served = predict(load_run(calibrated), test, progress=False).probs
    assert np.allclose(served, softmax(logits / spec.temperature), atol=1e-5)
    # temperature scaling keeps every argmax, so accuracy is unchanged
    assert np.array_equal(served.argmax(axis=1), logits.argmax(axis=1))
    for key in ("ece", "nll", "brier"):
        assert key in report["calibration_metrics"] and key in report["calibration_ci95"]
    assert (tmp_path / "eval" / "reliability.png").is_file()
    assert (tmp_path / "eval" / "accuracy_coverage.png").is_file()
    # the validation-fitted abstention threshold, applied to the held-out images as served
    assert spec.abstain_below is not None
    rows = predict(load_run(calibrated), test, progress=False)
    index = np.unique(rows.image_index)
    per_image = np.stack([rows.probs[rows.image_index == i].mean(axis=0) for i in index])
    labels = np.array([test[i].label for i in index])
    answered = per_image.max(axis=1) >= spec.abstain_below
    at = report["calibration"]["at_threshold"]
    assert (at["n"], at["answered"]) == (len(index), int(answered.sum()))
    if answered.any():
        right = per_image.argmax(axis=1) == labels
        assert at["accuracy_answered"] == pytest.approx(right[answered].mean())


def test_export_serves_the_calibrated_probabilities(calibrated: Path, tmp_path: Path) -> None:
    export_run(calibrated, tmp_path / "model", progress=False, parity_samples=16)
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    spec = CalibrationSpec.load(calibrated)
    assert spec is not None
    assert card["calibration"]["method"] == "temperature"
    assert card["calibration"]["temperature"] == pytest.approx(spec.temperature)
    assert card["calibration"]["validation_ece_after"] == spec.validation["after"]["ece"]
    model = OnnxClassifier(tmp_path / "model")
    run = load_run(calibrated, device="cpu")
    for sample in list(read_split_csv(calibrated / "split.csv").subset("test").samples)[:12]:
        pixels = load_rgb(sample.path)
        served = model.predict(pixels)
        assert np.abs(served.probabilities - predict_image(run, pixels)).max() < 1e-4
        flags = served.uncertainty
        assert flags["confidence"] == pytest.approx(served.probabilities.max())
        if spec.abstain_below is not None:
            assert flags["uncertain"] == (flags["confidence"] < spec.abstain_below)
        assert flags["out_of_distribution"] in (True, False)


def test_a_run_calibrated_after_its_export_is_refused(calibrated: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(calibrated, run)
    (run / "calibration.json").unlink()
    export_run(run, tmp_path / "model", progress=False, parity_samples=8)
    assert OnnxClassifier(tmp_path / "model").calibrated is False
    calibrate_run(run, progress=False)
    with pytest.raises(HistoliteError, match=r"calibrated after this export.*re-export"):
        OnnxClassifier(tmp_path / "model")
    export_run(run, tmp_path / "again", progress=False, parity_samples=8)
    assert OnnxClassifier(tmp_path / "again").calibrated is True


def test_calibration_applies_only_to_its_checkpoint(calibrated: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(calibrated, run)
    spec = json.loads((run / "calibration.json").read_text())
    spec["checkpoint_sha256"] = "0" * 64  # fitted for other weights
    (run / "calibration.json").write_text(json.dumps(spec))
    loaded = load_run(run)
    assert loaded.calibration is None and "not" in (loaded.calibration_note or "")
    report = evaluate_run(run, run / "split.csv", tmp_path / "eval", progress=False)
    assert report["calibration"]["applied"] is False


def test_calibrate_needs_a_validation_split(calibrated: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(calibrated, run)
    rows = (run / "split.csv").read_text().splitlines()
    (run / "split.csv").write_text("\n".join(r for r in rows if not r.endswith(",val")) + "\n")
    with pytest.raises(HistoliteError, match=r"no validation images.*never on test"):
        calibrate_run(run, progress=False)


def test_calibration_without_validation_errors_is_refused(
    calibrated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every validation answer right the NLL falls as T -> 0: T once stopped at 0.16 and
    every served answer read 1.0, so abstention meant nothing."""
    from dataclasses import replace

    import histolite.evaluate.calibration as calibration

    real = calibration.predict

    def all_right(*args: object, **kwargs: object) -> object:
        preds = real(*args, **kwargs)  # type: ignore[arg-type]
        logits = np.eye(preds.probs.shape[1])[preds.labels] * 3.0
        return replace(preds, logits=logits)

    run = tmp_path / "run"
    shutil.copytree(calibrated, run)
    monkeypatch.setattr(calibration, "predict", all_right)
    with pytest.raises(HistoliteError, match=r"validation images are classified right"):
        calibrate_run(run, progress=False)


def test_predict_and_calibrate_commands(
    calibrated: Path, run_cli: Callable[[list[str]], tuple[int, str, str]], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(calibrated, run)
    code, out, err = run_cli(["calibrate", str(run), "--method", "vector", "--no-progress"])
    assert code == 0, err
    assert "vector scaling" in out and "ECE" in out and "calibration.json" in out
    image = next(iter(read_split_csv(run / "split.csv").subset("test").samples)).path
    code, out, err = run_cli(["predict", str(run), str(image)])
    assert code == 0, err
    line = json.loads(out.strip().splitlines()[-1])
    assert line["calibrated"] is True
    assert set(line) >= {"confidence", "entropy", "uncertain", "out_of_distribution"}


def test_slides_and_the_service_carry_the_flags(
    calibrated: Path, tmp_path: Path, synthetic_dir: Path
) -> None:
    """tiles.csv gains confidence and entropy, GeoJSON too, an uncertainty map is drawn; the
    service answers calibrated probabilities with the card's flags."""
    import csv

    from fastapi.testclient import TestClient
    from PIL import Image
    from support import mosaic_slide

    from histolite.serve.app import ServeSettings, create_app
    from histolite.slide.inference import SlideSettings, classify_slide

    export_run(calibrated, tmp_path / "model", progress=False, parity_samples=8)
    model = OnnxClassifier(tmp_path / "model")
    tiles = [np.asarray(Image.open(p)) for p in sorted(synthetic_dir.glob("*/*.png"))[:6]]
    slide = mosaic_slide(tmp_path / "s.tif", [tiles[:3], tiles[3:]], mpp=0.5)
    summary = classify_slide(slide, model, tmp_path / "out", SlideSettings(), progress=False)
    with (tmp_path / "out" / "s" / "tiles.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {"confidence", "entropy"} <= set(rows[0])
    for row in rows:
        probs = np.array([float(row[f"prob_{c}"]) for c in model.classes])
        assert float(row["confidence"]) == pytest.approx(probs.max(), abs=1e-5)
        expected = -(probs[probs > 0] * np.log(probs[probs > 0])).sum()
        assert float(row["entropy"]) == pytest.approx(expected, abs=1e-4)
    feature = json.loads((tmp_path / "out" / "s" / "s.geojson").read_text())["features"][0]
    assert {"confidence", "entropy"} <= set(feature["properties"]["measurements"])
    assert (tmp_path / "out" / "s" / "uncertainty.png").stat().st_size > 1000
    threshold = model.policy.abstain_below
    if threshold is not None:
        expected_uncertain = sum(float(r["confidence"]) < threshold for r in rows)
        assert summary["uncertain_tiles"] == expected_uncertain
    app = create_app(ServeSettings(model_dir=tmp_path / "model", audit_db=None))
    with TestClient(app) as client:
        image = sorted(synthetic_dir.glob("*/*.png"))[0]
        body = client.post("/v1/predict", files={"files": (image.name, image.read_bytes())})
    answer = body.json()["predictions"][0]
    assert answer["calibrated"] is True
    reference = model.predict(load_rgb(image))
    assert answer["confidence"] == pytest.approx(reference.uncertainty["confidence"], abs=1e-6)
    assert answer["uncertain"] == reference.uncertainty["uncertain"]
    assert answer["out_of_distribution"] in (True, False)


def test_the_abstention_threshold_names_its_unit(
    calibrated: Path, tmp_path: Path, synthetic_dir: Path
) -> None:
    """Fitted per validation image (patch runs: the mean of an image's patches), compared per
    tile by slide inference: calibration.json, the card and the slide summary say so."""
    from PIL import Image
    from support import mosaic_slide

    from histolite.evaluate.calibration import abstention_unit
    from histolite.slide.inference import SlideSettings, classify_slide

    assert abstention_unit(patch_level=False) == "image"
    assert abstention_unit(patch_level=True) == "image (the mean of its patches' probabilities)"
    assert abstention_unit(patch_level=True, bag=True).startswith("image (a bag")
    run = tmp_path / "run"
    shutil.copytree(calibrated, run)
    calibrate_run(run, target=0.3, progress=False)  # a target every small run reaches
    spec = json.loads((run / "calibration.json").read_text())
    assert spec["abstain_below"] is not None and spec["abstention"]["unit"] == "image"
    del spec["abstention"]["unit"]  # as calibrations fitted before the unit was recorded
    (run / "calibration.json").write_text(json.dumps(spec))
    export_run(run, tmp_path / "model", progress=False, parity_samples=8)
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    assert card["abstention"]["unit"] == "image"  # the run trained on whole tiles
    model = OnnxClassifier(tmp_path / "model")
    tiles = [np.asarray(Image.open(p)) for p in sorted(synthetic_dir.glob("*/*.png"))[:4]]
    slide = mosaic_slide(tmp_path / "s.tif", [tiles[:2], tiles[2:]], mpp=0.5)
    summary = classify_slide(slide, model, tmp_path / "out", SlideSettings(), progress=False)
    assert summary["abstain_below"] == pytest.approx(spec["abstain_below"])
    assert summary["abstention_unit"] == {
        "fitted_per": "image",
        "applied_per": "tile (each tile's own confidence)",
    }
    saved = json.loads((tmp_path / "out" / "s" / "summary.json").read_text())
    assert saved["abstention_unit"] == summary["abstention_unit"]


def test_bag_models_calibrate_their_bag_probabilities(tmp_path: Path, mosaic_bags: Path) -> None:
    """Attention MIL: the bag logits are scaled, the attention is left as it was."""
    from support import write_config

    from histolite.evaluate.inference import predict_bag_pixels
    from histolite.train import resolve_config
    from histolite.train.mil import mil_run

    config = write_config(
        tmp_path / "mil.yaml",
        mosaic_bags,
        data={"image_size": 32, "batch_size": 8, "val_fraction": 0.3, "test_fraction": 0.2},
        mil={"patch": {"size": 32}, "freeze_backbone": False, "cache_features": False},
    )
    cfg = resolve_config(config, ["trainer.max_epochs=2"], tmp_path / "mil", resume=False)
    run = mil_run(cfg, tmp_path / "mil", progress=False)
    image = load_rgb(next(iter(read_split_csv(run / "split.csv").subset("test").samples)).path)
    before = predict_bag_pixels(load_run(run, calibrated=False), image)
    calibrate_run(run, progress=False)
    spec = CalibrationSpec.load(run)
    assert spec is not None and spec.temperature is not None
    after = predict_bag_pixels(load_run(run), image)
    assert before.logits is not None
    assert np.allclose(after.probs, softmax(before.logits / spec.temperature), atol=1e-5)
    assert np.allclose(after.attention, before.attention)
