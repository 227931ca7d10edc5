"""Training, resuming, evaluating and predicting on tiny synthetic data (CPU, seconds)."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import write_config

from histolite.config import load_config
from histolite.data.splits import LeakageWarning
from histolite.errors import DataError, HistoliteError
from histolite.evaluate.inference import predict_image
from histolite.evaluate.plots import read_epoch_metrics
from histolite.evaluate.report import evaluate_run
from histolite.models.loading import load_run
from histolite.runspec import PatchSpec, RunSpec
from histolite.train import resolve_config, train_run


def _train(
    tmp_path: Path,
    data_root: Path,
    name: str = "run",
    overrides: list[str] | None = None,
    **sections: dict,
) -> Path:
    cfg_path = write_config(tmp_path / f"{name}.yaml", data_root, **sections)
    out = tmp_path / name
    cfg = resolve_config(cfg_path, overrides or [], out, resume=False)
    return train_run(cfg, out, progress=False)


def test_run_directory_holds_everything(tmp_path: Path, synthetic_dir: Path) -> None:
    run = _train(
        tmp_path, synthetic_dir, overrides=["data.test_fraction=0.25", "trainer.max_epochs=2"]
    )
    for name in (
        "config.yaml",
        "metadata.json",
        "run.json",
        "split.csv",
        "train_summary.json",
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        "logs/csv0/metrics.csv",
    ):
        assert (run / name).is_file(), name
    assert list((run / "logs" / "tb0").glob("events.out.tfevents.*"))
    meta = json.loads((run / "metadata.json").read_text())
    for key in (
        "histolite_version",
        "git_commit",
        "torch_version",
        "platform",
        "seed",
        "dataset_fingerprint",
    ):
        assert key in meta
    assert meta["seed"] == 0 and len(meta["dataset_fingerprint"]) == 64
    spec = RunSpec.load(run)
    assert spec.classes == ("adipose", "lympho", "stroma", "tumor")
    assert all(0.0 < m < 1.0 for m in spec.mean) and all(s > 0 for s in spec.std)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["epochs_completed"] == 2
    assert summary["stain_augment_fallbacks"] == {}  # no random Macenko in this run
    assert load_config(run / "config.yaml").trainer.max_epochs == 2
    with (run / "split.csv").open() as fh:
        splits = {row["split"] for row in csv.DictReader(fh)}
    assert splits == {"train", "val", "test"}

    report_dir = tmp_path / "report"
    report = evaluate_run(run, run / "split.csv", report_dir, progress=False)
    assert set(report) >= {
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "weighted_f1",
        "per_class",
        "confusion_matrix",
        "classes",
    }
    assert report["n"] == 16 and report["level"] == "image"
    assert np.sum(report["confusion_matrix"]) == 16
    assert set(report["per_class"]["tumor"]) == {"precision", "recall", "f1", "support"}
    for name in (
        "report.json",
        "classification_report.csv",
        "confusion_matrix.png",
        "training_curves.png",
        "predictions.csv",
        "metadata.json",
    ):
        assert (report_dir / name).is_file(), name
    with Image.open(report_dir / "confusion_matrix.png") as img:
        assert img.size[0] > 300

    # the same checkpoint gives the same probabilities through predict_image
    loaded = load_run(run, device="cpu")
    tile = np.array(Image.open(sorted((synthetic_dir / "tumor").iterdir())[0]).convert("RGB"))
    probs = predict_image(loaded, tile)
    assert probs.shape == (4,) and abs(probs.sum() - 1) < 1e-5


def test_training_learns_the_synthetic_task(tmp_path: Path, synthetic_dir: Path) -> None:
    run = _train(
        tmp_path, synthetic_dir, overrides=["trainer.max_epochs=6", "data.test_fraction=0.25"]
    )
    report = evaluate_run(run, run / "split.csv", tmp_path / "rep", progress=False)
    assert report["accuracy"] >= 0.6  # chance is 0.25
    interval = report["accuracy_ci95"]
    assert interval["low"] <= report["accuracy"] <= interval["high"]
    assert interval["groups"] == report["n"]  # synthetic tiles are their own groups


def test_evaluate_warns_about_training_images_even_in_a_copy(
    tmp_path: Path, synthetic_dir: Path
) -> None:
    run = _train(tmp_path, synthetic_dir, overrides=["data.test_fraction=0.25"])
    with pytest.warns(LeakageWarning, match=r"\d+ of the \d+ images evaluated were TRAINING"):
        report = evaluate_run(
            run, run / "split.csv", tmp_path / "rep", split="train", progress=False
        )
    assert report["training_images_evaluated"] == report["n"] > 0
    assert "TRAINING" in report["warning"]
    copy = tmp_path / "copy"  # the same images elsewhere are still the training images
    shutil.copytree(synthetic_dir, copy)
    with pytest.warns(LeakageWarning):
        report = evaluate_run(run, copy, tmp_path / "rep_copy", progress=False)
    assert 0 < report["training_images_evaluated"] < report["n"]
    clean = evaluate_run(run, run / "split.csv", tmp_path / "rep_test", progress=False)
    assert clean["training_images_evaluated"] == 0 and "warning" not in clean


def test_resume_continues_without_losing_epochs(tmp_path: Path, synthetic_dir: Path) -> None:
    run = _train(tmp_path, synthetic_dir, overrides=["trainer.max_epochs=1"])
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["epoch"] == 0
    cfg = resolve_config(None, ["trainer.max_epochs=3"], run, resume=True)
    train_run(cfg, run, resume=True, progress=False)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2
    epochs = read_epoch_metrics(run)["train_loss"]
    assert sorted(epochs) == [0, 1, 2]
    assert json.loads((run / "train_summary.json").read_text())["resumed"] is True
    with pytest.raises(HistoliteError, match="already holds a run"):
        resolve_config(tmp_path / "run.yaml", [], run, resume=False)


def test_a_model_that_cannot_be_built_leaves_no_run_behind(
    tmp_path: Path, synthetic_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from histolite.models import pretrained

    monkeypatch.setattr(pretrained, "_host_reachable", lambda host, *a, **k: False)
    monkeypatch.setattr(pretrained, "timm_weights_cached", lambda name: False)
    with pytest.raises(HistoliteError, match=r"model\.weights=PATH"):
        _train(tmp_path, synthetic_dir, model={"name": "resnet18", "pretrained": True})
    assert not (tmp_path / "run" / "run.json").exists()
    # the corrected command reuses the same --out instead of "already holds a run"
    run = _train(tmp_path, synthetic_dir, model={"name": "resnet8"})
    assert (run / "checkpoints" / "last.ckpt").is_file()
    (run / "checkpoints" / "last.ckpt").unlink()  # a finished run, pruned: still a run
    with pytest.raises(HistoliteError, match="already holds a run"):
        resolve_config(tmp_path / "run.yaml", [], run, resume=False)
    for ckpt in (run / "checkpoints").glob("*.ckpt"):  # as if stopped in its first epoch
        ckpt.unlink()
    (run / "train_summary.json").unlink()
    with pytest.raises(HistoliteError, match="no checkpoint yet"):
        resolve_config(tmp_path / "run.yaml", [], run, resume=False)


def test_final_model_last_epoch_ignores_the_validation_ranking(
    tmp_path: Path, synthetic_dir: Path
) -> None:
    run = _train(
        tmp_path,
        synthetic_dir,
        overrides=["trainer.max_epochs=2", "trainer.final_model=last_epoch"],
    )
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert best["epoch"] == last["epoch"] == 1
    assert all(torch.equal(best["state_dict"][k], v) for k, v in last["state_dict"].items())
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["final_model"] == "last epoch" and summary["monitor"] is None
    assert "val_acc" in read_epoch_metrics(run)  # validation is still measured and logged


def test_patch_training_reports_patch_and_image_level(tmp_path: Path, synthetic_dir: Path) -> None:
    run = _train(
        tmp_path,
        synthetic_dir,
        overrides=[
            "data.patches={size: 16, stride: 8}",
            "data.image_size=16",
            "data.test_fraction=0.25",
        ],
    )
    spec = RunSpec.load(run)
    assert spec.patches == PatchSpec(size=16, stride=8, min_tissue=0.0)
    assert spec.patches.step == 8
    report = evaluate_run(run, run / "split.csv", tmp_path / "rep", progress=False)
    assert report["level"] == "patch"
    assert report["n"] == 16 * 9  # 16 test images x 3 x 3 patches
    for method in ("majority_vote", "mean_probability"):
        assert report["image_level"][method]["n"] == 16
    assert (tmp_path / "rep" / "confusion_matrix_image_level.png").is_file()


def test_stain_normalisation_is_part_of_the_run(tmp_path: Path, synthetic_dir: Path) -> None:
    target = sorted((synthetic_dir / "stroma").iterdir())[0]
    run = _train(tmp_path, synthetic_dir, overrides=[f"data.stain={{target: {target}}}"])
    spec = RunSpec.load(run)
    assert spec.stain is not None and spec.stain.method == "reinhard"
    assert load_run(run).stain is not None


def _copy_dataset(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_unreadable_files_refused_or_skipped_and_recorded(
    tmp_path: Path, synthetic_dir: Path
) -> None:
    data = _copy_dataset(synthetic_dir, tmp_path / "data")
    (data / "tumor" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    Image.new("L", (32, 32)).save(data / "stroma" / "gray.png")
    with pytest.raises(
        DataError, match=r"2 unreadable image\(s\)(.|\n)*broken.png(.|\n)*skip_unreadable"
    ):
        _train(tmp_path, data, name="refused")
    run = _train(tmp_path, data, name="skipped", overrides=["data.skip_unreadable=true"])
    skipped = json.loads((run / "skipped_files.json").read_text())
    assert sorted(Path(s["path"]).name for s in skipped) == ["broken.png", "gray.png"]
    assert json.loads((run / "metadata.json").read_text())["skipped_files"] == 2


def test_test_time_augmentation_averages_the_eight_views() -> None:
    from histolite.evaluate.inference import class_probabilities
    from histolite.models import create_model
    from histolite.models.tta import dihedral_views

    x = torch.rand(2, 3, 16, 16)
    views = dihedral_views(x)
    assert len(views) == 8
    assert len({tuple(v[0, 0].flatten()[:6].tolist()) for v in views}) == 8  # all distinct
    model = create_model("resnet8", 3).eval()
    with torch.no_grad():
        expected = torch.stack([torch.softmax(model(v), 1) for v in views]).mean(0)
        assert torch.allclose(class_probabilities(model, x, tta=True), expected)
        assert torch.allclose(class_probabilities(model, x), torch.softmax(model(x), 1))
