"""Exporting attention-MIL bag models: one graph for a bag of any size, attention included."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import write_config

from histolite.errors import HistoliteError
from histolite.evaluate.inference import predict_bag_pixels
from histolite.export.onnx import export_run
from histolite.models.loading import load_run
from histolite.runtime.classifier import OnnxClassifier
from histolite.train import resolve_config
from histolite.train.mil import mil_run


@pytest.fixture(scope="module")
def mil_run_dir(tmp_path_factory: pytest.TempPathFactory, mosaic_bags: Path) -> Path:
    root = tmp_path_factory.mktemp("mil_export")
    config = write_config(
        root / "mil.yaml",
        mosaic_bags,
        data={"image_size": 32, "batch_size": 8, "val_fraction": 0.2, "test_fraction": 0.2},
        mil={"patch": {"size": 32}, "freeze_backbone": False, "cache_features": False},
    )
    cfg = resolve_config(config, ["trainer.max_epochs=3"], root / "run", resume=False)
    return mil_run(cfg, root / "run", progress=False)


@pytest.mark.parametrize("int8", [False, True])
def test_bag_export_matches_pytorch_on_real_bags(
    mil_run_dir: Path, mosaic_bags: Path, tmp_path: Path, int8: bool
) -> None:
    out = tmp_path / ("int8" if int8 else "fp32")
    result = export_run(mil_run_dir, out, int8=int8, progress=False, parity_samples=24)
    card = json.loads((out / "model.json").read_text())
    assert card["kind"] == "mil" and card["input"]["name"] == "patches"
    assert card["mil"]["pooling"] == "gated" and card["mil"]["patch_size"] == 32
    assert card["parity"]["samples"] == result.parity_samples > 0
    assert card["parity"]["top1_agreement"] >= 0.99
    limit = 0.05 if int8 else 1e-4
    assert card["parity"]["max_abs_attention_diff"] < limit
    assert card["parity"]["max_abs_probability_diff"] < limit
    served = OnnxClassifier(out)
    run = load_run(mil_run_dir, device="cpu")
    for image in sorted((mosaic_bags / "positive").glob("*.png"))[:4]:
        pixels = np.asarray(Image.open(image).convert("RGB"))
        prediction = served.predict(pixels)
        reference = predict_bag_pixels(run, pixels)
        assert prediction.attention is not None and len(prediction.attention) == 4
        assert sum(w for _, _, w in prediction.attention) == pytest.approx(1.0, abs=1e-5)
        assert [(y, x) for y, x, _ in prediction.attention] == reference.positions
        np.testing.assert_allclose(
            [w for _, _, w in prediction.attention], reference.attention, atol=limit
        )
        np.testing.assert_allclose(prediction.probabilities, reference.probs, atol=limit)
    # bags of other sizes go through the same graph
    big = np.concatenate([pixels, pixels], axis=1)  # 64 x 128: 8 patches
    assert len(served.predict(big).attention or []) == 8


def test_slide_feature_runs_are_not_exported(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(
        json.dumps(
            {
                "model_name": "tf_efficientnet_lite0",
                "classes": ["a", "b"],
                "image_size": 64,
                "mean": [0, 0, 0],
                "std": [1, 1, 1],
                "mil": {
                    "pooling": "gated",
                    "embed_dim": 8,
                    "attention_dim": 4,
                    "dropout": 0.0,
                    "patch": None,
                    "feature_dim": 16,
                },
            }
        )
    )
    from histolite.models.mil import build_attention_mil
    from histolite.runspec import RunSpec

    spec = RunSpec.load(run)
    assert spec.mil is not None
    model = build_attention_mil(spec.model_name, 2, spec.mean, spec.std, spec.mil)
    import torch

    (run / "checkpoints").mkdir()
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}},
        run / "checkpoints" / "best.ckpt",
    )
    with pytest.raises(HistoliteError, match="slide features: it has no image encoder"):
        export_run(run, tmp_path / "out", progress=False)


def test_attention_beyond_the_bound_fails_the_export_and_writes_nothing(
    mil_run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the attention difference was recorded in the card but never checked."""
    from histolite.export.onnx import MAX_ATTENTION_DIFF, ExportError

    original = OnnxClassifier.predict

    def shifted(self: OnnxClassifier, pixels: np.ndarray):  # type: ignore[no-untyped-def]
        prediction = original(self, pixels)
        attention = prediction.attention or []
        moved = [(y, x, w + (0.05 if i == 0 else 0.0)) for i, (y, x, w) in enumerate(attention)]
        object.__setattr__(prediction, "attention", moved)
        return prediction

    monkeypatch.setattr(OnnxClassifier, "predict", shifted)
    assert MAX_ATTENTION_DIFF < 0.05
    with pytest.raises(ExportError, match="attention weights differ"):
        export_run(mil_run_dir, tmp_path / "out", progress=False, parity_samples=8)
    assert not list(tmp_path.iterdir())  # neither the model nor its staging folder


def test_export_prints_the_attention_difference_of_a_bag_model(
    mil_run_dir: Path, tmp_path: Path, run_cli: Callable[[list[str]], tuple[int, str, str]]
) -> None:
    code, out, err = run_cli(
        ["export", str(mil_run_dir), "--out", str(tmp_path / "m"), "--parity-samples", "8"]
    )
    assert code == 0, err
    assert "largest attention difference" in out
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    assert card["parity"]["allowed_attention_diff"] == 0.01
