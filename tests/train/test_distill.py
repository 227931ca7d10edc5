"""Knowledge distillation: loss, frozen teacher, multi-part schedule, resume, errors, compare."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from support import write_config

from histolite.config import DistillConfig, PatchConfig, StainConfig
from histolite.data.split_policy import load_split
from histolite.data.splits import LeakageWarning
from histolite.errors import HistoliteError
from histolite.evaluate.inference import class_probabilities
from histolite.export.compare import compare_runs
from histolite.models import NormalizedClassifier, create_model
from histolite.runspec import RunDir, RunSpec
from histolite.train import resolve_config, train_run
from histolite.train.distill import (
    DistillModule,
    TeacherInterval,
    describe_plan,
    distill_run,
    plan_intervals,
    teacher_mismatches,
)
from histolite.train.losses import DistillationLoss, kd_divergence
from histolite.train.schedule import AtEpochs, EveryNEpochs
from histolite.train.teacher import OnnxTeacher, TorchTeacher


def test_kd_loss_equals_hand_computation() -> None:
    student = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    teacher = torch.tensor([[3.0, 1.0, -2.0], [-1.0, 0.0, 2.0]])
    target = torch.tensor([0, 2])
    temperature, ce_weight, kd_weight = 5.0, 1.0, 0.5

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    s, t = student.numpy().astype(np.float64), teacher.numpy().astype(np.float64)
    p_t, p_s = softmax(t / temperature), softmax(s / temperature)
    kl = np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1).mean()
    ce = -np.mean(np.log(softmax(s)[np.arange(2), target.numpy()]))
    expected = ce_weight * ce + kd_weight * temperature**2 * kl

    loss = DistillationLoss(ce_weight, kd_weight, temperature)(student, teacher, target)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert kd_divergence(student, teacher, temperature).item() == pytest.approx(
        temperature**2 * kl, rel=1e-5
    )
    assert kd_divergence(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_checkpoint_schedules() -> None:
    assert EveryNEpochs(5).epochs(50) == [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]
    assert EveryNEpochs(5).epochs(12) == [5, 10, 12]  # the final teacher is always kept
    assert AtEpochs((3, 1, 99)).epochs(6) == [1, 3, 6]


def _module(
    intervals: list[TeacherInterval], teacher_run: Path, tmp_path: Path, teacher_tta: bool = False
) -> DistillModule:
    from histolite.config import OptimizerConfig, SchedulerConfig

    teacher = NormalizedClassifier(create_model("resnet8", 4), (0.5,) * 3, (0.25,) * 3)
    student = NormalizedClassifier(create_model("resnet8", 4), (0.4,) * 3, (0.2,) * 3)
    return DistillModule(
        student,
        TorchTeacher(teacher, channels_last=False),
        teacher_run,
        24,
        intervals,
        DistillationLoss(),
        tmp_path / "sw.json",
        teacher_tta=teacher_tta,
        optimizer=OptimizerConfig(),
        scheduler=SchedulerConfig(),
        max_epochs=2,
    )


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no Trainer here
def test_a_test_time_augmented_teacher_labels_every_orientation_alike(tmp_path: Path) -> None:
    module = _module([TeacherInterval(0, 1, "x.ckpt", None)], tmp_path, tmp_path, teacher_tta=True)
    seen: list[torch.Tensor] = []

    class Recorder(torch.nn.Module):  # the loss, recording what the teacher said
        def forward(self, student: torch.Tensor, teacher: torch.Tensor, *_: object) -> torch.Tensor:
            seen.append(teacher)
            return student.sum()

    module.kd = Recorder()
    x, y = torch.rand(2, 3, 24, 24), torch.tensor([0, 1])
    module.training_loss(x, y, None)
    module.training_loss(torch.rot90(x, 1, dims=(-2, -1)), y, None)
    module.training_loss(torch.flip(x, dims=(-1,)), y, None)
    assert torch.allclose(seen[0], seen[1], atol=1e-5)
    assert torch.allclose(seen[0], seen[2], atol=1e-5)
    teacher = module.teacher.model  # type: ignore[attr-defined]
    with torch.no_grad():
        expected = class_probabilities(teacher, x, tta=True)
    assert torch.allclose(seen[0].exp(), expected, atol=1e-5)  # log of the 8-view mean
    plain = _module([TeacherInterval(0, 1, "x.ckpt", None)], tmp_path, tmp_path)
    plain.kd = module.kd
    plain.training_loss(x, y, None)
    plain.training_loss(torch.rot90(x, 1, dims=(-2, -1)), y, None)
    assert not torch.allclose(seen[3], seen[4], atol=1e-3)  # a plain teacher is not invariant


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no Trainer here
def test_gradients_reach_only_the_student_and_teacher_stays_frozen(tmp_path: Path) -> None:
    module = _module([TeacherInterval(0, 1, "x.ckpt", None)], tmp_path, tmp_path)
    module.train()
    teacher = module.teacher.model  # type: ignore[attr-defined]
    assert not teacher.training  # BatchNorm statistics must not move
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss, logits = module.training_loss(x, y, None)  # teacher input resized 32 -> 24 px
    loss.backward()
    assert logits.shape == (4, 4)
    assert not teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in module.model.parameters() if p.requires_grad)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any(k.startswith("teacher") for k in module.state_dict())
    optimizer_params = {id(p) for p in module.configure_optimizers().param_groups[0]["params"]}
    assert optimizer_params.isdisjoint({id(p) for p in teacher.parameters()})


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> Path:
    """A small teacher trained 4 epochs with checkpoints after epochs 2 and 4."""
    tmp = tmp_path_factory.mktemp("teacher")
    config = write_config(
        tmp / "teacher.yaml",
        synthetic_dir,
        data={"test_fraction": 0.25},
        model={"name": "resnet14"},
    )
    cfg = resolve_config(
        config, ["trainer.max_epochs=4", "trainer.checkpoint_every=2"], tmp / "run", resume=False
    )
    return train_run(cfg, tmp / "run", progress=False)


def _student_config(tmp_path: Path, data: Path, mode: str, epochs: int) -> DistillConfig:
    config = write_config(
        tmp_path / f"{mode}.yaml",
        data,
        data={"test_fraction": 0.25, "image_size": 24},
        distill={"mode": mode, "temperature": 4.0},
    )
    cfg = resolve_config(
        config, [f"trainer.max_epochs={epochs}"], tmp_path / mode, resume=False, model=DistillConfig
    )
    assert isinstance(cfg, DistillConfig)
    return cfg


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.ckpt"))
    }


def test_multipart_switches_checkpoints_at_the_right_epochs(
    tmp_path: Path, teacher_run: Path, synthetic_dir: Path
) -> None:
    assert sorted(_digest(teacher_run / "checkpoints")) == [
        "best.ckpt",
        "epoch_002.ckpt",
        "epoch_004.ckpt",
        "last.ckpt",
    ]
    before = _digest(teacher_run / "checkpoints")
    cfg = _student_config(tmp_path, synthetic_dir, "multipart", epochs=4)
    run = distill_run(cfg, teacher_run, tmp_path / "multipart", progress=False)
    switches = json.loads(RunDir(run).teacher_switches.read_text())
    assert [(s["student_epoch"], s["checkpoint"]) for s in switches] == [
        (0, "epoch_002.ckpt"),
        (2, "epoch_004.ckpt"),
    ]
    assert _digest(teacher_run / "checkpoints") == before  # teacher untouched
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert not any(k.startswith("teacher") for k in state)
    plan = json.loads((run / "distill_plan.json").read_text())
    assert plan["mode"] == "multipart" and len(plan["intervals"]) == 2
    logged = _epoch_metrics(run, "teacher_train_acc")
    assert len(logged) == 4 and all(0.0 <= a <= 1.0 for a in logged)
    assert len(_epoch_metrics(run, "teacher_agreement")) == 4


def _epoch_metrics(run: Path, name: str) -> list[float]:
    (metrics,) = run.glob("logs/csv*/metrics.csv")
    with metrics.open() as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


def test_student_with_fewer_epochs_gets_scaled_intervals(teacher_run: Path) -> None:
    intervals = plan_intervals(teacher_run, "multipart", 2)
    assert [(i.first_epoch, i.last_epoch, i.checkpoint) for i in intervals] == [
        (0, 0, "epoch_002.ckpt"),
        (1, 1, "epoch_004.ckpt"),
    ]
    longer = plan_intervals(teacher_run, "multipart", 10)
    assert [(i.first_epoch, i.last_epoch) for i in longer] == [(0, 4), (5, 9)]
    # each teacher checkpoint carries its validation accuracy from the teacher's schedule.json
    scores = {
        item["epochs_done"]: item["val_acc"]
        for item in json.loads((teacher_run / "checkpoints" / "schedule.json").read_text())["saved"]
    }
    assert sorted(scores) == [2, 4] and all(0.0 <= a <= 1.0 for a in scores.values())
    assert [i.teacher_val_acc for i in longer] == [scores[2], scores[4]]
    lines = describe_plan(longer)
    assert lines[0].startswith("student epoch 1-5: epoch_002.ckpt (teacher epoch 2, validation")
    assert f"{scores[4]:.1%}" in lines[1]
    vanilla = plan_intervals(teacher_run, "vanilla", 10)  # the final teacher by default
    assert [(i.first_epoch, i.last_epoch, i.checkpoint) for i in vanilla] == [(0, 9, "last.ckpt")]
    chosen = plan_intervals(teacher_run, "vanilla", 10, teacher_checkpoint="best")
    assert [i.checkpoint for i in chosen] == ["best.ckpt"]


class _StopAfter(L.Callback):
    """Simulates an interruption: stop cleanly after ``epochs`` epochs."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


@pytest.mark.parametrize(("stop_after", "expected"), [(3, "epoch_004.ckpt"), (1, "epoch_002.ckpt")])
def test_resume_mid_interval_restores_the_right_checkpoint(
    tmp_path: Path,
    teacher_run: Path,
    synthetic_dir: Path,
    stop_after: int,
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import histolite.train.distill as distill_module

    cfg = _student_config(tmp_path, synthetic_dir, "multipart", epochs=4)
    original = distill_module.train_run

    def interrupted(*args: object, **kwargs: object) -> Path:
        kwargs["extra_callbacks"] = [_StopAfter(stop_after)]
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(distill_module, "train_run", interrupted)
    run = distill_run(cfg, teacher_run, tmp_path / "multipart", progress=False)
    assert (
        torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == stop_after - 1
    )
    monkeypatch.setattr(distill_module, "train_run", original)

    resumed_cfg = resolve_config(None, [], run, resume=True, model=DistillConfig)
    distill_run(resumed_cfg, None, run, resume=True, progress=False)  # teacher from the plan
    switches = json.loads(RunDir(run).teacher_switches.read_text())
    resumed = [s for s in switches if s["student_epoch"] == stop_after]
    assert resumed and resumed[0]["checkpoint"] == expected
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 3


def test_missing_or_mismatched_teacher_is_a_clear_error(
    tmp_path: Path, teacher_run: Path, synthetic_dir: Path
) -> None:
    cfg = _student_config(tmp_path, synthetic_dir, "vanilla", epochs=1)
    with pytest.raises(HistoliteError, match="not a histolite run"):
        distill_run(cfg, tmp_path / "no_teacher", tmp_path / "a", progress=False)
    cfg.distill.teacher_checkpoint = "epoch_999"
    with pytest.raises(HistoliteError, match=r"epoch_999\.ckpt: checkpoint not found"):
        distill_run(cfg, teacher_run, tmp_path / "b", progress=False)
    # a teacher without scheduled checkpoints cannot drive multi-part KD
    plain = tmp_path / "plain_teacher"
    config = write_config(tmp_path / "plain.yaml", synthetic_dir)
    train_run(
        resolve_config(config, ["trainer.checkpoint_every=null"], plain, resume=False),
        plain,
        progress=False,
    )
    with pytest.raises(HistoliteError, match="no scheduled teacher checkpoints"):
        distill_run(
            _student_config(tmp_path, synthetic_dir, "multipart", 1),
            plain,
            tmp_path / "c",
            progress=False,
        )
    # different classes
    import shutil

    other = tmp_path / "other_data"
    shutil.copytree(synthetic_dir, other)
    shutil.rmtree(other / "adipose")
    cfg = _student_config(tmp_path, other, "vanilla", epochs=1)
    with pytest.raises(HistoliteError, match="classes differ"):
        distill_run(cfg, teacher_run, tmp_path / "d", progress=False)


def test_distill_command_prints_the_plan_and_compare_builds_one_table(
    tmp_path: Path,
    teacher_run: Path,
    synthetic_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    run_cli: Callable[[list[str]], tuple[int, str, str]],
) -> None:
    config = write_config(
        tmp_path / "student.yaml",
        synthetic_dir,
        data={"test_fraction": 0.25, "image_size": 24},
        distill={"mode": "multipart", "temperature": 4.0},
    )
    student = tmp_path / "multipart"
    args = ["distill", str(config), "--teacher", str(teacher_run), "--out", str(student)]
    code, out, err = run_cli([*args, "--set", "trainer.max_epochs=2", "--no-progress"])
    assert code == 0, err
    assert "teacher plan:\n  student epoch 1: epoch_002.ckpt (teacher epoch 2, validation" in out
    assert "student epoch 2: epoch_004.ckpt" in out
    report = json.loads((student / "reports" / "test" / "report.json").read_text())
    assert f"test split: accuracy {report['accuracy']:.4f}" in out
    assert report["n"] == 16 and report["split"] == "test"
    rows = compare_runs(
        [teacher_run, student],
        teacher_run / "split.csv",
        tmp_path / "cmp",
        names=["teacher", "student_multipart_kd"],
        progress=False,
        speed_seconds=0.1,
    )
    assert [r["name"] for r in rows] == ["teacher", "student_multipart_kd"]
    assert rows[0]["parameters"] > rows[1]["parameters"]
    assert all(r["cpu_images_per_s_b1"] > 0 and r["cpu_images_per_s_b64"] > 0 for r in rows)
    assert rows[0]["n"] == rows[1]["n"] == 16
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| teacher | resnet14 |" in table and "Per-class precision / recall / F1" in table
    assert "16 groups]" in table and rows[0]["accuracy_ci95"]["groups"] == 16
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())[1]["model"] == "resnet8"
    assert rows[0]["test_time_augmentation"] is None
    with_tta = compare_runs(
        [teacher_run],
        teacher_run / "split.csv",
        tmp_path / "cmp_tta8",
        progress=False,
        int8=False,
        tta=True,
        speed_seconds=0.1,
    )
    assert with_tta[0]["test_time_augmentation"] == "8 dihedral views"
    assert "8 dihedral views (--tta;" in (tmp_path / "cmp_tta8" / "compare.md").read_text()


def test_distill_with_a_test_time_augmented_teacher_runs_end_to_end(
    tmp_path: Path, teacher_run: Path, synthetic_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from histolite.train import distill

    calls: list[int] = []
    real = distill.dihedral_log_probabilities
    monkeypatch.setattr(
        distill, "dihedral_log_probabilities", lambda t, x: (calls.append(len(x)), real(t, x))[1]
    )
    cfg = _student_config(tmp_path, synthetic_dir, "vanilla", epochs=1)
    cfg.distill.teacher_tta = True
    run = distill_run(cfg, teacher_run, tmp_path / "tta", progress=False)
    assert calls and sum(calls) == len(load_split(cfg.data, cfg.seed).parts["train"])
    saved = (run / "config.yaml").read_text()
    assert "teacher_tta: true" in saved
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_teacher_refuses_other_stain_geometry_or_a_leaky_split(
    tmp_path: Path, teacher_run: Path, synthetic_dir: Path
) -> None:
    stats = tmp_path / "target.json"
    stats.write_text(json.dumps({"mean": [70.0, 10.0, -5.0], "std": [12.0, 6.0, 4.0]}))
    cfg = _student_config(tmp_path, synthetic_dir, "vanilla", epochs=1)
    stained = cfg.model_copy(deep=True)
    stained.data.stain = StainConfig(target=str(stats))
    with pytest.raises(HistoliteError, match="stain normalisation differs"):
        distill_run(stained, teacher_run, tmp_path / "s", progress=False)
    patched = cfg.model_copy(deep=True)
    patched.data.patches = PatchConfig(size=16)
    with pytest.raises(HistoliteError, match="input geometry differs"):
        distill_run(patched, teacher_run, tmp_path / "g", progress=False)
    # another split seed puts teacher training images into the student's val/test splits
    leaky = cfg.model_copy(deep=True)
    leaky.data.split_seed = 123
    with pytest.raises(
        HistoliteError, match=r"the teacher trained on \d+ of the \d+ images in the"
    ):
        distill_run(leaky, teacher_run, tmp_path / "l", progress=False)
    assert not (tmp_path / "l" / "checkpoints").exists()  # refused before training
    # a copy of the data does not hide it: the copies are the teacher's training images
    data_copy = tmp_path / "data_copy"
    shutil.copytree(synthetic_dir, data_copy)
    leaky.data.root = str(data_copy)
    with pytest.raises(HistoliteError, match=r"the teacher trained on \d+ of the"):
        distill_run(leaky, teacher_run, tmp_path / "c", progress=False)
    # a teacher run moved away from its data: matched by name only, said but not refused
    moved = tmp_path / "elsewhere" / "deeper" / "teacher"
    shutil.copytree(teacher_run, moved)
    leaky.trainer.max_epochs = 1
    with pytest.warns(LeakageWarning, match=r"may have trained on \d+ .* by class and file name"):
        problems = teacher_mismatches(moved, RunSpec.load(moved), leaky, load_split(leaky.data, 0))
    assert problems == []


def test_onnx_teacher_matches_the_torch_teacher(teacher_run: Path) -> None:
    from histolite.models.loading import load_run

    run = load_run(teacher_run, "epoch_002", device="cpu")
    assert isinstance(run.model, NormalizedClassifier)
    torch_teacher = TorchTeacher(run.model, channels_last=True)
    onnx_teacher = OnnxTeacher(load_run(teacher_run, "epoch_002", device="cpu").model, 32)
    x = torch.rand(5, 3, 32, 32)
    assert torch.allclose(onnx_teacher(x), torch_teacher(x), atol=1e-4)
    later = teacher_run / "checkpoints" / "epoch_004.ckpt"
    before = onnx_teacher(x)
    onnx_teacher.load(later)  # re-exported on a checkpoint switch
    torch_teacher.load(later)
    assert torch.allclose(onnx_teacher(x), torch_teacher(x), atol=1e-4)
    assert not torch.allclose(before, onnx_teacher(x), atol=1e-4)


def test_mixup_mixes_images_and_labels_with_one_weight() -> None:
    from histolite.config import OptimizerConfig, SchedulerConfig
    from histolite.train.losses import Mix, mixed_cross_entropy
    from histolite.train.module import ClassifierModule

    module = ClassifierModule(
        create_model("resnet8", 3),
        OptimizerConfig(),
        SchedulerConfig(),
        max_epochs=1,
        mixup_alpha=0.4,
    )
    torch.manual_seed(0)
    x, y = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    mixed, mix = module.mix_batch(x, y)
    assert mix is not None and 0.0 <= mix.lam <= 1.0
    assert mixed.shape == x.shape and not torch.equal(mixed, x)
    logits = torch.randn(6, 3)
    expected = mix.lam * torch.nn.functional.cross_entropy(logits, y) + (
        1 - mix.lam
    ) * torch.nn.functional.cross_entropy(logits, mix.other)
    assert torch.allclose(mixed_cross_entropy(logits, y, mix), expected)
    assert torch.allclose(
        mixed_cross_entropy(logits, y, Mix(y, 1.0)), mixed_cross_entropy(logits, y, None)
    )
