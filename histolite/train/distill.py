"""Knowledge distillation: a frozen teacher run guides a student, vanilla or multi-part.

Vanilla KD mimics one teacher checkpoint for the whole run. Multi-part KD (Kather MixNet-L ->
MixNet-S) walks the teacher's scheduled checkpoints: the student's training is cut into the
same intervals (scaled if the student trains for a different number of epochs) and during
interval i it mimics checkpoint C_i, ending on the final teacher. Which checkpoint applies is a
pure function of the epoch, so ``--resume`` mid-interval reloads the right one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from histolite.config import DistillConfig, TrainConfig
from histolite.data.datasets import ImageDataset
from histolite.data.overlap import describe_overlap, find_overlap
from histolite.data.split_policy import Split, load_split
from histolite.data.splits import LeakageWarning, read_split_csv
from histolite.errors import HistoliteError, HistoliteWarning
from histolite.fileio import read_json, write_json
from histolite.models.loading import (
    load_run,
    require_classifier,
)
from histolite.models.tta import dihedral_log_probabilities
from histolite.runspec import RunDir, RunSpec, checkpoint_path, is_rank_zero
from histolite.train.crossfit import Crossfit, FoldTagged, describe_unseen, out_of_fold_teachers
from histolite.train.data import ImageDataModule, PreparedData, build_stain, stain_spec
from histolite.train.losses import DistillationLoss, Mix
from histolite.train.module import ClassifierModule, module_options, resize_batch
from histolite.train.runner import run_split, train_run
from histolite.train.schedule import ScheduledCheckpoint, read_schedule
from histolite.train.teacher import CrossfitTeacher, Teacher, create_teacher


@dataclass(frozen=True)
class TeacherInterval:
    """Student epochs ``first_epoch``..``last_epoch`` (0-based, inclusive) mimic ``checkpoint``."""

    first_epoch: int
    last_epoch: int
    checkpoint: str
    teacher_epochs_done: int | None
    teacher_val_acc: float | None = None


def plan_intervals(
    teacher_run: Path, mode: str, student_epochs: int, teacher_checkpoint: str = "last"
) -> list[TeacherInterval]:
    """Which teacher checkpoint the student follows in each of its epochs."""
    if mode == "vanilla":
        if teacher_checkpoint == "early":
            kept = early_checkpoint(teacher_run)
            return [
                TeacherInterval(
                    0, student_epochs - 1, kept.path.name, kept.epochs_done, kept.val_acc
                )
            ]
        path = checkpoint_path(teacher_run, teacher_checkpoint)
        return [TeacherInterval(0, student_epochs - 1, path.name, None)]
    schedule = read_schedule(RunDir(teacher_run).checkpoints)
    if not schedule:
        raise HistoliteError(
            f"{teacher_run}: no scheduled teacher checkpoints (checkpoints/schedule.json); "
            "train the teacher with trainer.checkpoint_every=N for multi-part distillation"
        )
    teacher_total = schedule[-1].epochs_done
    intervals: list[TeacherInterval] = []
    start = 0
    for index, kept in enumerate(schedule):
        end = (
            student_epochs
            if index == len(schedule) - 1
            else round(kept.epochs_done * student_epochs / teacher_total)
        )
        if end <= start:  # fewer student epochs than checkpoints: later checkpoints win
            continue
        intervals.append(
            TeacherInterval(start, end - 1, kept.path.name, kept.epochs_done, kept.val_acc)
        )
        start = end
    return intervals


EARLY_WITHIN = 0.01  # an early teacher: within this much validation accuracy of the best


def early_checkpoint(teacher_run: Path) -> ScheduledCheckpoint:
    """The earliest scheduled checkpoint whose validation accuracy is within ``EARLY_WITHIN``
    of the best one's: an early-stopped teacher (Cho & Hariharan 2019), chosen on validation."""
    schedule = [kept for kept in read_schedule(RunDir(teacher_run).checkpoints) if kept.val_acc]
    if not schedule:
        raise HistoliteError(
            f"{teacher_run}: distill.teacher_checkpoint=early needs scheduled checkpoints with "
            "validation accuracy (train the teacher with trainer.checkpoint_every=N and a "
            "validation split)"
        )
    best = max(kept.val_acc or 0.0 for kept in schedule)
    return next(kept for kept in schedule if (kept.val_acc or 0.0) >= best - EARLY_WITHIN)


def describe_plan(intervals: list[TeacherInterval]) -> list[str]:
    """One human line per interval, 1-based like progress bars and logs."""
    lines = []
    for i in intervals:
        epochs = (
            f"{i.first_epoch + 1}-{i.last_epoch + 1}"
            if i.last_epoch > i.first_epoch
            else f"{i.first_epoch + 1}"
        )
        source = f"teacher epoch {i.teacher_epochs_done}" if i.teacher_epochs_done else "teacher"
        score = (
            f", validation accuracy {i.teacher_val_acc:.1%}"
            if i.teacher_val_acc is not None
            else ""
        )
        lines.append(f"student epoch {epochs}: {i.checkpoint} ({source}{score})")
    return lines


def interval_for_epoch(intervals: list[TeacherInterval], epoch: int) -> TeacherInterval:
    for interval in intervals:
        if interval.first_epoch <= epoch <= interval.last_epoch:
            return interval
    return intervals[-1]  # training extended past the plan (--resume with more epochs)


class DistillModule(ClassifierModule):
    """Student training with a frozen teacher on the same augmented (and mixed) batch.

    The teacher is deliberately not a registered submodule: it gets no gradients, is not in the
    optimizer, and is not written into the student's checkpoints. Batches arrive at the larger
    of the two input sizes; each model gets its own size from the same view.
    """

    teacher: Teacher

    def __init__(
        self,
        model: nn.Module,
        teacher: Teacher,
        teacher_run: Path,
        teacher_image_size: int,
        intervals: list[TeacherInterval],
        loss: DistillationLoss,
        switches_file: Path,
        teacher_tta: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        self.teacher_tta = teacher_tta
        object.__setattr__(self, "teacher", teacher)
        self.teacher_run = teacher_run
        self.teacher_image_size = teacher_image_size
        self.intervals = intervals
        self.kd = loss
        self.switches_file = switches_file
        self.loaded_checkpoint: str | None = None

    def _ensure_teacher(self, epoch: int) -> TeacherInterval:
        interval = interval_for_epoch(self.intervals, epoch)
        if interval.checkpoint != self.loaded_checkpoint:
            for path in teacher_checkpoint_files(self.teacher_run, interval.checkpoint):
                if not path.is_file():
                    raise HistoliteError(f"{path}: teacher checkpoint missing (was it deleted?)")
            self.teacher.load(RunDir(self.teacher_run).checkpoints / interval.checkpoint)
            self.loaded_checkpoint = interval.checkpoint
            if is_rank_zero():
                history = read_json(self.switches_file) if self.switches_file.is_file() else []
                history.append(
                    {
                        "student_epoch": epoch,
                        "checkpoint": interval.checkpoint,
                        "teacher_epochs_done": interval.teacher_epochs_done,
                    }
                )
                write_json(self.switches_file, history)
        return interval

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        interval = self._ensure_teacher(self.current_epoch)
        if interval.teacher_epochs_done is not None:
            self.log(
                "teacher_epochs_done",
                float(interval.teacher_epochs_done),
                on_epoch=True,
                on_step=False,
                sync_dist=True,
            )

    def training_loss(
        self, x: Tensor, y: Tensor, mix: Mix | None, folds: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        rows = None
        teacher_logits: Tensor | None = None
        with torch.no_grad():
            teacher_x = x
            if x.shape[-1] != self.teacher_image_size or x.shape[-2] != self.teacher_image_size:
                teacher_x = resize_batch(x, self.teacher_image_size)
            if isinstance(self.teacher, CrossfitTeacher):
                rows = self.teacher.labelled_rows(folds)
                if rows is None or bool(rows.any()):  # else labels alone for all of them
                    teacher_logits = self.teacher(teacher_x, folds)
            elif self.teacher_tta:
                teacher_logits = dihedral_log_probabilities(self.teacher, teacher_x)
            else:
                teacher_logits = self.teacher(teacher_x)
        student_logits = self(x)
        if teacher_logits is None:  # masked out of the KD term: any value will do
            teacher_logits = torch.zeros_like(student_logits.detach())
        shown = y if mix is None or mix.lam >= 0.5 else mix.other
        self._log_teacher_metrics(student_logits, teacher_logits, shown, rows)
        return self.kd(student_logits, teacher_logits, y, mix, rows), student_logits

    def _log_teacher_metrics(
        self, student_logits: Tensor, teacher_logits: Tensor, y: Tensor, rows: Tensor | None
    ) -> None:
        """How good the guide is on these augmented batches, and how closely the student follows
        (over the images that have a teacher).

        A teacher far less accurate here than on its own validation set points at a
        preprocessing mismatch between the two runs.
        """
        if rows is not None:
            student_logits, teacher_logits, y = student_logits[rows], teacher_logits[rows], y[rows]
        if len(y) == 0:
            return
        teacher_pred = teacher_logits.argmax(dim=1)
        self.log_epoch_mean("teacher_train_acc", (teacher_pred == y).float().mean(), len(y))
        agreement = (student_logits.detach().argmax(dim=1) == teacher_pred).float().mean()
        self.log_epoch_mean("teacher_agreement", agreement, len(y))


def teacher_checkpoint_files(teacher_run: Path, name: str) -> list[Path]:
    """The files a teacher checkpoint name stands for: one, or one per cross-fitted fold."""
    crossfit = Crossfit.load(teacher_run)
    runs = crossfit.fold_dirs if crossfit is not None else [teacher_run]
    return [RunDir(run).checkpoints / name for run in runs]


def teacher_mismatches(
    teacher_dir: Path, teacher_spec: RunSpec, cfg: TrainConfig, split: Split
) -> list[str]:
    """Why this teacher cannot teach this student, as readable lines (empty: it can).

    Teacher and student must see the same classes, the same stain normalisation and the same
    field of view (whole images or the same patch geometry; resolution may differ, the batch is
    resized). A teacher that trained on images in the student's validation or test split has
    seen the answers there and would inflate the student's scores.
    """
    problems = []
    if tuple(teacher_spec.classes) != tuple(split.classes):
        problems.append(
            f"classes differ: the teacher has {list(teacher_spec.classes)}, the student's data "
            f"{list(split.classes)}"
        )
    theirs, ours = teacher_spec.stain, stain_spec(cfg.data)
    if (theirs and theirs.statistics()) != (ours and ours.statistics()):
        problems.append(
            "stain normalisation differs: the teacher used "
            f"{theirs.describe() if theirs else 'none'}, the student "
            f"{ours.describe() if ours else 'none'}"
        )
    student_patches = cfg.data.patches.spec() if cfg.data.patches else None
    if teacher_spec.patches != student_patches:
        teacher_patches = teacher_spec.patches or "whole images"
        problems.append(
            f"input geometry differs: the teacher's patches are {teacher_patches}, "
            f"the student's {student_patches or 'whole images'}"
        )
    crossfit = Crossfit.load(teacher_dir)
    if crossfit is not None:  # every fold must pass the checks a single teacher does
        for folder in crossfit.fold_dirs:
            problems += [f"{folder.name}: {p}" for p in _split_leaks(folder, split)]
        return problems
    return problems + _split_leaks(teacher_dir, split)


def _split_leaks(teacher_dir: Path, split: Split) -> list[str]:
    """Images of the student's validation or test split that the teacher trained on."""
    problems = []
    teacher_split = RunDir(teacher_dir).split_csv
    if teacher_split.is_file():
        table = read_split_csv(teacher_split)
        teacher_train = [s for s, name in table.rows if name == "train"]
        for name in ("val", "test"):
            overlap = find_overlap(teacher_train, split.parts[name])
            where = f"of the {len(split.parts[name])} images in the student's {name} split"
            if overlap.confirmed:
                problems.append(
                    f"the teacher trained on {overlap.confirmed} {where}; use the teacher's "
                    "split (the same data.split_seed and split settings, or "
                    "data.split_csv=TEACHER/split.csv)"
                )
            elif overlap.by_name:  # cannot be confirmed: say so, do not refuse
                warnings.warn(
                    f"the teacher may have trained on {overlap.by_name} {where}"
                    f"{describe_overlap(overlap)}; if so, the student's {name} scores are "
                    "inflated",
                    LeakageWarning,
                    stacklevel=2,
                )
    return problems


def resolve_teacher_runtime(cfg: DistillConfig) -> str:
    """``auto``: ONNX Runtime when training on the CPU, the PyTorch teacher on a GPU."""
    if cfg.distill.teacher_runtime != "auto":
        return cfg.distill.teacher_runtime
    on_cpu = cfg.trainer.accelerator == "cpu" or (
        cfg.trainer.accelerator == "auto" and not torch.cuda.is_available()
    )
    return "onnx" if on_cpu else "torch"


def _teacher_dir_for_resume(out: Path) -> Path:
    plan = RunDir(out).distill_plan
    if not plan.is_file():
        raise HistoliteError(f"{out}: no {plan.name}; pass --teacher TEACHER_RUN")
    return Path(read_json(plan)["teacher_run"])


@dataclass(frozen=True)
class DistillPlan:
    """Which teacher run teaches, and which of its checkpoints in each student epoch."""

    teacher_dir: Path
    teacher_spec: RunSpec
    mode: str
    intervals: list[TeacherInterval]

    @classmethod
    def make(
        cls, cfg: DistillConfig, teacher_run: str | Path | None, out: Path, resume: bool
    ) -> DistillPlan:
        """A new plan, or on resume the stored one (kept even when epochs are added)."""
        teacher_dir = Path(teacher_run) if teacher_run is not None else _teacher_dir_for_resume(out)
        crossfit = Crossfit.load(teacher_dir)
        if crossfit is not None:
            _require_crossfit_settings(cfg, teacher_dir)
        # fold teachers share their recipe: the first one speaks for all
        reference = crossfit.fold_dir(0) if crossfit is not None else teacher_dir
        teacher_spec = RunSpec.load(reference)
        stored = RunDir(out).distill_plan
        if resume and stored.is_file():
            intervals = [TeacherInterval(**item) for item in read_json(stored)["intervals"]]
        else:
            intervals = plan_intervals(
                reference,
                cfg.distill.mode,
                cfg.trainer.max_epochs,
                cfg.distill.teacher_checkpoint,
            )
        return cls(teacher_dir, teacher_spec, cfg.distill.mode, intervals)

    @property
    def crossfit(self) -> Crossfit | None:
        return Crossfit.load(self.teacher_dir)

    def save(self, path: Path) -> None:
        write_json(
            path,
            {
                "teacher_run": str(self.teacher_dir.resolve()),
                "teacher_model": self.teacher_spec.model_name,
                "mode": self.mode,
                "intervals": [asdict(i) for i in self.intervals],
            },
        )


def _require_crossfit_settings(cfg: DistillConfig, teacher_dir: Path) -> None:
    """What cross-fitted teachers cannot do, refused before anything is written."""
    section = cfg.distill
    problems = []
    if section.mode != "vanilla":
        problems.append("multi-part KD walks one teacher's checkpoints: use distill.mode=vanilla")
    if section.teacher_tta:
        problems.append("distill.teacher_tta is for a single teacher: set it to false")
    if section.teacher_checkpoint == "early":
        problems.append("distill.teacher_checkpoint=early would pick a different epoch per fold")
    if section.crossfit_targets == "out_of_fold" and cfg.augment.mixup_alpha > 0:
        problems.append(
            "a mixed image comes from two groups, so it has no out-of-fold teacher: set "
            "augment.mixup_alpha=0 or distill.crossfit_targets=ensemble"
        )
    if problems:
        raise HistoliteError(
            f"{teacher_dir} holds cross-fitted teachers:\n  " + "\n  ".join(problems)
        )


def _label_only_classes(plan: DistillPlan, cfg: DistillConfig, split: Split) -> list[str]:
    """Classes whose out-of-fold teacher never saw them (learnt from labels alone), warned
    about; empty for ensemble targets and single teachers."""
    crossfit = plan.crossfit
    if crossfit is None or cfg.distill.crossfit_targets != "out_of_fold":
        return []
    unseen = crossfit.classes_unseen()
    names = sorted({name for names in unseen.values() for name in names})
    if names and cfg.distill.ce_weight <= 0:
        raise HistoliteError(
            f"distill.ce_weight {cfg.distill.ce_weight}: the images of {names} have no "
            "out-of-fold teacher (their fold holds every training group of the class) and "
            "learn from their labels alone, which needs distill.ce_weight > 0"
        )
    if is_rank_zero():
        for line in describe_unseen(unseen, split.parts["train"]):
            warnings.warn(line, HistoliteWarning, stacklevel=3)
    return names


def _build_teacher(
    plan: DistillPlan, cfg: DistillConfig, runtime: str, channels_last: bool
) -> Teacher:
    """The teacher as trained (its temperature is the KD loss's, and later checkpoints are
    loaded into this model, which must not keep a calibration fitted for the first); for a
    cross-fitted run, one per fold behind a :class:`CrossfitTeacher`."""
    size = plan.teacher_spec.image_size
    crossfit = plan.crossfit
    runs = crossfit.fold_dirs if crossfit is not None else [plan.teacher_dir]
    teachers = [
        create_teacher(
            require_classifier(
                load_run(run, plan.intervals[0].checkpoint, device="cpu", calibrated=False),
                "a distillation teacher",
            ),
            runtime,
            size,
            channels_last,
        )
        for run in runs
    ]
    if crossfit is None:
        return teachers[0]
    return CrossfitTeacher(teachers, runs, cfg.distill.crossfit_targets)


def _distill_module(
    plan: DistillPlan, cfg: DistillConfig, switches: Path
) -> Callable[[nn.Module, TrainConfig, RunSpec], DistillModule]:
    size = plan.teacher_spec.image_size

    def build(model: nn.Module, config: TrainConfig, spec: RunSpec) -> DistillModule:
        loss = DistillationLoss(
            cfg.distill.ce_weight,
            cfg.distill.kd_weight,
            cfg.distill.temperature,
            config.trainer.label_smoothing,
        )
        runtime = resolve_teacher_runtime(cfg)
        return DistillModule(
            model,
            _build_teacher(plan, cfg, runtime, config.trainer.channels_last),
            plan.teacher_dir,
            size,
            plan.intervals,
            loss,
            switches,
            teacher_tta=cfg.distill.teacher_tta,
            optimizer=config.optimizer,
            scheduler=config.scheduler,
            **{**module_options(config), "input_size": config.data.image_size},
        )

    return build


def _shared_view_datamodule(
    plan: DistillPlan,
) -> Callable[[PreparedData, TrainConfig, RunSpec, nn.Module, Path, bool], ImageDataModule]:
    """Training batches at the larger of the two input sizes: one view, each model its size."""

    def datamodule(
        prepared: PreparedData,
        config: TrainConfig,
        spec: RunSpec,
        model: nn.Module,
        run_dir: Path,
        show: bool,
    ) -> ImageDataModule:
        size = max(plan.teacher_spec.image_size, config.data.image_size)
        stain = build_stain(config.data)
        module = ImageDataModule(
            prepared, config.data, config.augment, stain, train_image_size=size
        )
        crossfit = plan.crossfit
        if crossfit is not None:  # each training image carries the fold that left it out
            folds = out_of_fold_teachers(crossfit, prepared.splits["train"])
            assert isinstance(module.train_set, ImageDataset)
            module.train_set = FoldTagged(module.train_set, folds)
        return module

    return datamodule


def distill_run(
    cfg: DistillConfig,
    teacher_run: str | Path | None,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    announce: Callable[[list[str]], None] | None = None,
) -> Path:
    """Distil ``teacher_run`` into the student described by ``cfg``; writes a normal run.

    The teacher is checked against the student's split before anything is written.
    ``announce`` receives the teacher plan as readable lines before training starts.
    """
    if cfg.mil is not None:
        raise HistoliteError("distillation trains image/patch classifiers; remove the mil section")
    out = Path(out)
    files = RunDir(out)
    plan = DistillPlan.make(cfg, teacher_run, out, resume)
    split = run_split(out) if resume else load_split(cfg.data, cfg.seed)
    problems = teacher_mismatches(plan.teacher_dir, plan.teacher_spec, cfg, split)
    if problems:
        raise HistoliteError(
            f"teacher {plan.teacher_dir} does not fit this student:\n  " + "\n  ".join(problems)
        )
    label_only = _label_only_classes(plan, cfg, split)
    if announce is not None:
        announce(describe_plan(plan.intervals))
    if is_rank_zero():
        out.mkdir(parents=True, exist_ok=True)
        plan.save(files.distill_plan)
    return train_run(
        cfg,
        out,
        resume=resume,
        progress=progress,
        split=split,
        module_builder=_distill_module(plan, cfg, files.teacher_switches),
        datamodule_builder=_shared_view_datamodule(plan),
        extra_metadata={
            "teacher_run": str(plan.teacher_dir.resolve()),
            "teacher_model": plan.teacher_spec.model_name,
            "distill_mode": cfg.distill.mode,
            "crossfit_targets": cfg.distill.crossfit_targets if plan.crossfit else None,
            "crossfit_label_only_classes": label_only,
        },
    )
