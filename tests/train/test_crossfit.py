"""Cross-fitted teachers: folds by group, out-of-fold and ensemble targets, the early teacher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from support import write_config

from histolite.config import DistillConfig
from histolite.data.folder import Sample
from histolite.data.split_policy import load_split
from histolite.data.splits import read_split_csv
from histolite.errors import HistoliteError
from histolite.evaluate.report import evaluate_run
from histolite.fileio import write_json
from histolite.train import resolve_config
from histolite.train.crossfit import (
    NO_OUT_OF_FOLD_TEACHER,
    Crossfit,
    assign_folds,
    classes_unseen,
    crossfit_run,
    describe_unseen,
    out_of_fold_teachers,
)
from histolite.train.distill import distill_run, early_checkpoint
from histolite.train.losses import DistillationLoss
from histolite.train.teacher import CrossfitTeacher

SLIDE = r"^(slide\d+)_"  # the synthetic tiles' source slide


def _samples(groups: dict[str, tuple[int, int]]) -> list[Sample]:
    """``count`` samples of ``label`` per group name."""
    return [
        Sample(Path(f"{g}_{i}.png"), label, str(label), g)
        for g, (label, count) in groups.items()
        for i in range(count)
    ]


def _crossfit_on(root: Path, train: list[Sample], assignment: dict[str, int]) -> Crossfit:
    """A cross-fitted run folder with ``train`` as its split's training rows (no models)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["path,label,group,split"]
    lines += [f"{s.path},{s.class_name},{s.group},train" for s in train]
    (root / "split.csv").write_text("\n".join(lines) + "\n")
    return Crossfit(root, max(assignment.values()) + 1, assignment, seed=0)


def test_folds_hold_whole_groups_and_spread_each_class() -> None:
    groups = {f"g{i:02d}": (i % 3, 5 + i % 4) for i in range(30)}
    assignment = assign_folds(_samples(groups), folds=5, seed=0)
    assert set(assignment) == set(groups) and set(assignment.values()) == set(range(5))
    for label in range(3):  # every fold leaves out groups of every class (10 per class)
        assert {assignment[g] for g, (c, _) in groups.items() if c == label} == set(range(5))
    assert assign_folds(_samples(groups), folds=5, seed=0) == assignment  # seeded
    with pytest.raises(HistoliteError, match="3 training groups cannot make 5 folds"):
        assign_folds(_samples({"a": (0, 2), "b": (1, 2), "c": (0, 2)}), folds=5, seed=0)


def test_a_class_in_one_fold_only_has_no_out_of_fold_teacher(tmp_path: Path) -> None:
    """Kather's 08_EMPTY has one training source image: the fold that holds it trains a teacher
    that never sees the class, which must not label it (it named another class for all 412)."""
    samples = _samples({"a": (0, 3), "b": (0, 2), "c": (1, 4), "d": (0, 2), "e": (1, 1)})
    assignment = {"a": 0, "b": 1, "c": 1, "d": 2, "e": 1}  # every group of class 1 in fold 1
    assert classes_unseen(samples, assignment, folds=3) == {1: [1]}
    crossfit = _crossfit_on(tmp_path / "run", samples, assignment)
    assert crossfit.classes_unseen() == {1: ["1"]}  # by name, from the run's own split
    expected = [0] * 3 + [1] * 2 + [NO_OUT_OF_FOLD_TEACHER] * 4 + [2] * 2
    assert out_of_fold_teachers(crossfit, samples) == [*expected, NO_OUT_OF_FOLD_TEACHER]
    # judged by what the folds trained on, not by the images asked about
    assert out_of_fold_teachers(crossfit, samples[:5]) == [0, 0, 0, 1, 1]
    assert out_of_fold_teachers(crossfit, samples[5:9]) == [NO_OUT_OF_FOLD_TEACHER] * 4
    (line,) = describe_unseen({1: ["1"]}, samples)
    assert "fold 1" in line and "class '1'" in line and "5 training images" in line
    spread = {**assignment, "e": 0}  # class 1 in two folds: each fold's teacher saw one group
    assert classes_unseen(samples, spread, folds=3) == {}
    spread_run = _crossfit_on(tmp_path / "spread", samples, spread)
    assert NO_OUT_OF_FOLD_TEACHER not in out_of_fold_teachers(spread_run, samples)


class _Constant:
    """A stand-in teacher whose logits say which teacher it is."""

    def __init__(self, index: int, classes: int = 3) -> None:
        self.index = index
        self.classes = classes
        self.loaded: list[str] = []

    def load(self, checkpoint: Path) -> None:
        self.loaded.append(str(checkpoint))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), self.classes)
        logits[:, self.index] = 5.0
        return logits


def test_out_of_fold_rows_are_labelled_by_the_teacher_that_left_them_out(tmp_path: Path) -> None:
    teachers = [_Constant(k) for k in range(3)]
    folders = [tmp_path / f"fold_{k}" for k in range(3)]
    oof = CrossfitTeacher(teachers, folders, "out_of_fold")  # type: ignore[arg-type]
    folds = torch.tensor([2, 0, 1, 2, 0])
    logits = oof(torch.rand(5, 3, 8, 8), folds)
    assert logits.argmax(dim=1).tolist() == folds.tolist()
    oof.load(tmp_path / "checkpoints" / "last.ckpt")
    assert [t.loaded for t in teachers] == [[str(f / "checkpoints" / "last.ckpt")] for f in folders]
    ensemble = CrossfitTeacher(teachers, folders, "ensemble")  # type: ignore[arg-type]
    targets = torch.softmax(ensemble(torch.rand(2, 3, 8, 8)), dim=1)
    one = torch.softmax(torch.tensor([5.0, 0.0, 0.0]), dim=0)
    expected = torch.stack([one.roll(k) for k in range(3)]).mean(dim=0)  # the mean of the three
    assert torch.allclose(targets, expected.expand(2, -1), atol=1e-6)
    with pytest.raises(ValueError, match="need each image's fold"):
        oof(torch.rand(2, 3, 8, 8))


def test_images_without_an_out_of_fold_teacher_learn_from_their_labels(tmp_path: Path) -> None:
    teachers = [_Constant(k) for k in range(3)]
    folders = [tmp_path / f"fold_{k}" for k in range(3)]
    oof = CrossfitTeacher(teachers, folders, "out_of_fold")  # type: ignore[arg-type]
    folds = torch.tensor([1, -1, 2, -1])
    rows = oof.labelled_rows(folds)
    assert rows is not None and rows.tolist() == [True, False, True, False]
    teacher = oof(torch.rand(4, 3, 8, 8), folds)
    assert teacher[rows].argmax(dim=1).tolist() == [1, 2] and not teacher[~rows].any()
    with pytest.raises(ValueError, match="no image of this batch"):
        oof(torch.rand(2, 3, 8, 8), torch.tensor([-1, -1]))
    ensemble = CrossfitTeacher(teachers, folders, "ensemble")  # type: ignore[arg-type]
    assert ensemble.labelled_rows(folds) is None  # the mean of all K labels every image
    # the loss: a row without a teacher gets exactly its cross-entropy gradient, the others
    # exactly the full loss's, as if each were alone in the batch
    loss = DistillationLoss(ce_weight=0.5, kd_weight=1.0, temperature=2.0)
    student = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1])
    loss(student, teacher, y, None, rows).backward()
    assert student.grad is not None
    for i in range(4):
        alone = student.detach()[i : i + 1].clone().requires_grad_(True)
        if rows[i]:
            part = loss(alone, teacher[i : i + 1], y[i : i + 1])
        else:
            part = 0.5 * torch.nn.functional.cross_entropy(alone, y[i : i + 1])
        part.backward()
        assert alone.grad is not None
        assert torch.allclose(student.grad[i] * 4, alone.grad[0], atol=1e-6)


def test_fold_teachers_load_the_files_distillation_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One owner of the run layout: the checkpoint each fold teacher loads is the file
    ``teacher_checkpoint_files`` checks for, wherever ``RunDir`` puts checkpoints."""
    import histolite.runspec as runspec
    from histolite.train.distill import teacher_checkpoint_files

    monkeypatch.setattr(runspec, "CHECKPOINT_DIR", "weights")
    write_json(tmp_path / "crossfit.json", {"folds": 3, "groups": {}, "seed": 0})
    crossfit = Crossfit.load(tmp_path)
    assert crossfit is not None
    teachers = [_Constant(k) for k in range(3)]
    oof = CrossfitTeacher(teachers, crossfit.fold_dirs, "out_of_fold")  # type: ignore[arg-type]
    oof.load(Path("any/best.ckpt"))
    loaded = [Path(t.loaded[0]) for t in teachers]
    assert loaded == teacher_checkpoint_files(tmp_path, "best.ckpt")
    assert loaded[0] == tmp_path / "fold_0" / "weights" / "best.ckpt"


def test_the_early_teacher_is_chosen_on_validation(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    entries = []
    for epoch, acc in ((2, 0.80), (4, 0.865), (6, 0.87), (8, 0.86)):
        (folder / f"epoch_{epoch:03d}.ckpt").write_bytes(b"x")
        entries.append({"file": f"epoch_{epoch:03d}.ckpt", "epochs_done": epoch, "val_acc": acc})
    write_json(folder / "schedule.json", {"saved": entries})
    assert early_checkpoint(tmp_path).path.name == "epoch_004.ckpt"  # within 1 point of 0.87


@pytest.fixture(scope="module")
def crossfit_teachers(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> Path:
    """3 cross-fitted ResNet-8 teachers on the 3 training slides of the synthetic tiles."""
    root = tmp_path_factory.mktemp("crossfit")
    config = write_config(
        root / "teacher.yaml",
        synthetic_dir,
        data={"group_regex": SLIDE, "split_by": "group", "val_fraction": 0.25},
        crossfit={"folds": 3},
    )
    cfg = resolve_config(config, [], root / "teachers", resume=False)
    return crossfit_run(cfg, root / "teachers", progress=False)


def test_each_fold_trains_without_its_groups(crossfit_teachers: Path, tmp_path: Path) -> None:
    crossfit = Crossfit.load(crossfit_teachers)
    assert crossfit is not None and crossfit.folds == 3
    parent = read_split_csv(crossfit_teachers / "split.csv")
    parent_train = [s for s, name in parent.rows if name == "train"]
    for fold, folder in enumerate(crossfit.fold_dirs):
        table = read_split_csv(folder / "split.csv")
        train = [s for s, name in table.rows if name == "train"]
        assert train and all(crossfit.groups[s.group] != fold for s in train)
        left_out = [s for s in parent_train if crossfit.groups[s.group] == fold]
        assert len(train) + len(left_out) == len(parent_train)
        for name in ("val", "test"):  # the shared splits, untouched
            ours = sorted(str(s.path.resolve()) for s, n in table.rows if n == name)
            assert ours == sorted(str(s.path.resolve()) for s, n in parent.rows if n == name)
    record = json.loads((crossfit_teachers / "crossfit.json").read_text())
    assert set(record["train_seconds"]) == {"0", "1", "2"} and record["total_train_seconds"] > 0
    assert record["classes_unseen"] == {}  # every synthetic slide holds every class
    report = evaluate_run(
        crossfit_teachers, crossfit_teachers / "split.csv", tmp_path / "eval", split="val",
        progress=False,
    )  # fmt: skip
    per_fold = report["crossfit"]["per_fold"]
    assert [f["fold"] for f in per_fold] == [0, 1, 2] and report["n"] > 0
    assert report["crossfit"]["ensemble"].startswith("mean")


def _copy_teachers(crossfit_teachers: Path, tmp_path: Path) -> Path:
    """A copy to resume (split.csv paths are relative: the copy sits at the same depth)."""
    out = tmp_path / "teachers"
    shutil.copytree(crossfit_teachers, out)
    return out


def _stop_in_first_epoch(fold: Path) -> None:
    """What a fold killed during its first epoch leaves: run files, no checkpoint yet."""
    shutil.rmtree(fold / "checkpoints")
    (fold / "train_summary.json").unlink()
    assert (fold / "run.json").is_file()


def test_resume_restarts_a_fold_stopped_before_its_first_checkpoint(
    crossfit_teachers: Path, tmp_path: Path
) -> None:
    out = _copy_teachers(crossfit_teachers, tmp_path)
    _stop_in_first_epoch(out / "fold_2")
    kept = {k: (out / f"fold_{k}" / "checkpoints" / "last.ckpt").stat().st_mtime_ns for k in (0, 1)}
    crossfit_run(resolve_config(None, [], out, resume=True), out, resume=True, progress=False)
    assert (out / "fold_2" / "train_summary.json").is_file()
    assert (out / "fold_2" / "checkpoints" / "last.ckpt").is_file()
    summary = json.loads((out / "fold_2" / "train_summary.json").read_text())
    assert summary["resumed"] is False  # started again, not resumed from nothing
    for k, mtime in kept.items():  # finished folds are not trained again
        assert (out / f"fold_{k}" / "checkpoints" / "last.ckpt").stat().st_mtime_ns == mtime


def test_resume_trains_on_the_saved_split_not_a_new_one(
    crossfit_teachers: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data may have changed since the run started: a resume reads RUN/split.csv back."""
    import histolite.train.crossfit as crossfit_module

    out = _copy_teachers(crossfit_teachers, tmp_path)
    _stop_in_first_epoch(out / "fold_1")
    lines = (out / "split.csv").read_text().splitlines()
    moved = next(i for i, line in enumerate(lines) if line.endswith(",val"))
    lines[moved] = lines[moved][: -len("val")] + "test"  # a split load_split would not make
    (out / "split.csv").write_text("\n".join(lines) + "\n")
    saved = (out / "split.csv").read_bytes()

    def no_new_split(*args: object) -> None:
        raise AssertionError("a resume must not split the data again")

    monkeypatch.setattr(crossfit_module, "load_split", no_new_split)
    crossfit_run(resolve_config(None, [], out, resume=True), out, resume=True, progress=False)
    assert (out / "split.csv").read_bytes() == saved  # not overwritten
    moved_image = (out / lines[moved].split(",")[0]).resolve()
    fold = read_split_csv(out / "fold_1" / "split.csv")
    assert [name for s, name in fold.rows if s.path.resolve() == moved_image] == ["test"]
    parent = read_split_csv(out / "split.csv")
    crossfit = Crossfit.load(out)
    assert crossfit is not None
    expected = sorted(
        str(s.path.resolve()) for s, n in parent.rows if n == "train" and crossfit.fold_of(s) != 1
    )
    assert sorted(str(s.path.resolve()) for s, n in fold.rows if n == "train") == expected


def test_resume_refuses_a_changed_crossfit_section(crossfit_teachers: Path, tmp_path: Path) -> None:
    out = _copy_teachers(crossfit_teachers, tmp_path)
    _stop_in_first_epoch(out / "fold_2")
    config = (out / "config.yaml").read_bytes()
    for override, change in (
        ("crossfit.folds=4", "crossfit.folds: 3 -> 4"),
        ("crossfit.seed=7", "crossfit.seed: None -> 7"),
    ):
        cfg = resolve_config(None, [override], out, resume=True)
        with pytest.raises(HistoliteError, match=rf"cannot change the crossfit section.*{change}"):
            crossfit_run(cfg, out, resume=True, progress=False)
    assert (out / "config.yaml").read_bytes() == config  # refused before anything was written
    assert not (out / "fold_2" / "checkpoints").exists() and not (out / "fold_3").exists()


def _student(tmp_path: Path, data: Path, **distill: object) -> DistillConfig:
    config = write_config(
        tmp_path / "student.yaml",
        data,
        data={"group_regex": SLIDE, "split_by": "group", "val_fraction": 0.25, "image_size": 24},
        distill={"temperature": 2.0, **distill},
    )
    cfg = resolve_config(config, [], tmp_path / "student", resume=False, model=DistillConfig)
    assert isinstance(cfg, DistillConfig)
    return cfg


@pytest.mark.parametrize("targets", ["out_of_fold", "ensemble"])
def test_distillation_from_cross_fitted_teachers(
    crossfit_teachers: Path,
    synthetic_dir: Path,
    tmp_path: Path,
    targets: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every training image reaches the student labelled by the right teacher(s)."""
    seen: list[tuple[int, list[int] | None]] = []
    real = CrossfitTeacher.__call__

    def spy(self: CrossfitTeacher, x: torch.Tensor, folds: torch.Tensor | None = None):  # type: ignore[no-untyped-def]
        seen.append((len(x), None if folds is None else folds.tolist()))
        return real(self, x, folds)

    monkeypatch.setattr(CrossfitTeacher, "__call__", spy)
    cfg = _student(tmp_path, synthetic_dir, crossfit_targets=targets)
    run = distill_run(cfg, crossfit_teachers, tmp_path / "run", progress=False)
    crossfit = Crossfit.load(crossfit_teachers)
    assert crossfit is not None
    train = load_split(cfg.data, cfg.seed).parts["train"]
    assert sum(n for n, _ in seen) == len(train)  # one epoch: each image once
    if targets == "out_of_fold":
        folds = [f for _, batch in seen for f in batch or []]
        expected = sorted(crossfit.fold_of(s) for s in train)
        assert sorted(folds) == expected and len(set(folds)) == 3
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["crossfit_targets"] == targets


def test_a_class_its_fold_never_saw_is_distilled_from_labels(
    crossfit_teachers: Path,
    synthetic_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The wiring from the folds to the loss: images of a class their out-of-fold teacher never
    trained on are tagged, never sent to a teacher, warned about and recorded. Every synthetic
    slide holds every class, so fold 0 is made to have "never seen" class 0."""
    from histolite.errors import HistoliteWarning

    cfg = _student(tmp_path, synthetic_dir)
    classes = load_split(cfg.data, cfg.seed).classes

    def fold_0_missed_class_0(self: Crossfit) -> dict[int, list[str]]:
        return {0: [classes[0]]}

    monkeypatch.setattr(Crossfit, "classes_unseen", fold_0_missed_class_0)
    tags: list[int] = []
    masks: list[bool] = []
    real = CrossfitTeacher.__call__
    real_loss = DistillationLoss.forward

    def spy(self: CrossfitTeacher, x: torch.Tensor, folds: torch.Tensor | None = None):  # type: ignore[no-untyped-def]
        assert folds is not None
        tags.extend(folds.tolist())
        return real(self, x, folds)

    def loss_spy(self: DistillationLoss, *args, **kwargs):  # type: ignore[no-untyped-def]
        rows = args[4] if len(args) > 4 else kwargs.get("teacher_rows")
        assert rows is not None
        masks.extend(rows.tolist())
        return real_loss(self, *args, **kwargs)

    monkeypatch.setattr(CrossfitTeacher, "__call__", spy)
    monkeypatch.setattr(DistillationLoss, "forward", loss_spy)
    with pytest.warns(HistoliteWarning, match=r"fold 0 holds every training group of class"):
        run = distill_run(cfg, crossfit_teachers, tmp_path / "run", progress=False)
    crossfit = Crossfit.load(crossfit_teachers)
    assert crossfit is not None
    split = load_split(cfg.data, cfg.seed)
    train = split.parts["train"]
    label_only = [s for s in train if s.label == 0 and crossfit.fold_of(s) == 0]
    assert label_only and tags.count(NO_OUT_OF_FOLD_TEACHER) == len(label_only)
    assert len(tags) == len(train)
    assert masks == [tag != NO_OUT_OF_FOLD_TEACHER for tag in tags]  # the loss got the mask
    cfg.distill.ce_weight = 0.0  # those images would learn nothing: refused
    with pytest.raises(HistoliteError, match=r"needs distill\.ce_weight > 0"):
        distill_run(cfg, crossfit_teachers, tmp_path / "no_labels", progress=False)
    assert not (tmp_path / "no_labels").exists()
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["crossfit_label_only_classes"] == [split.classes[0]]


def test_what_cross_fitted_teachers_cannot_do_is_refused(
    crossfit_teachers: Path, synthetic_dir: Path, tmp_path: Path
) -> None:
    cfg = _student(tmp_path, synthetic_dir, mode="multipart")
    cfg.augment.mixup_alpha = 0.4
    with pytest.raises(HistoliteError, match=r"(?s)multi-part.*mixed image"):
        distill_run(cfg, crossfit_teachers, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_ensemble_probabilities_are_the_mean_of_the_folds(
    crossfit_teachers: Path, tmp_path: Path
) -> None:
    from histolite.evaluate.inference import predict
    from histolite.models.loading import load_run

    crossfit = Crossfit.load(crossfit_teachers)
    assert crossfit is not None
    samples = list(read_split_csv(crossfit_teachers / "split.csv").subset("val").samples)
    mean = np.mean(
        [predict(load_run(f), samples, progress=False).probs for f in crossfit.fold_dirs], axis=0
    )
    evaluate_run(
        crossfit_teachers, crossfit_teachers / "split.csv", tmp_path / "eval", split="val",
        progress=False,
    )  # fmt: skip
    import csv

    with (tmp_path / "eval" / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    served = np.array([[float(r[k]) for k in r if k.startswith("p_")] for r in rows])
    assert np.allclose(served, mean, atol=1e-5)
