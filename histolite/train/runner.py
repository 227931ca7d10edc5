"""Run a training job into a run directory (layout: :class:`histolite.runspec.RunDir`)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, overload

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from histolite.config import TrainConfig, dump_config, load_config
from histolite.data.feature_bags import feature_dimension
from histolite.data.folder import LabelledImages
from histolite.data.registry import dataset_mpp
from histolite.data.split_policy import Split
from histolite.data.splits import SPLIT_NAMES, read_split_csv, write_split_csv
from histolite.errors import HistoliteError
from histolite.fileio import read_json, write_json, write_text
from histolite.models import NormalizedClassifier, create_model
from histolite.runinfo import run_metadata
from histolite.runspec import MilSpec, RunDir, RunSpec, is_rank_zero
from histolite.stain.augment import BatchStainAugment, lab_spread, macenko_spread
from histolite.train.data import (
    ImageDataModule,
    PreparedData,
    build_stain,
    normalisation_stats,
    prepare_data,
    stain_spec,
)
from histolite.train.module import ClassifierModule, module_options
from histolite.train.rng import RngState
from histolite.train.schedule import (
    AtEpochs,
    CheckpointSchedule,
    EveryNEpochs,
    ScheduledCheckpoints,
)

ModuleBuilder = Callable[[nn.Module, TrainConfig, RunSpec], L.LightningModule]
ModelBuilder = Callable[[RunSpec, TrainConfig], nn.Module]
DataModuleBuilder = Callable[
    [PreparedData, TrainConfig, RunSpec, nn.Module, Path, bool], L.LightningDataModule
]


def default_module(model: nn.Module, cfg: TrainConfig, spec: RunSpec) -> L.LightningModule:
    return ClassifierModule(model, cfg.optimizer, cfg.scheduler, **module_options(cfg))


ConfigT = TypeVar("ConfigT", bound=TrainConfig)


@overload
def resolve_config(
    config_path: str | Path | None, overrides: Sequence[str], out: Path, resume: bool
) -> TrainConfig: ...


@overload
def resolve_config(
    config_path: str | Path | None,
    overrides: Sequence[str],
    out: Path,
    resume: bool,
    model: type[ConfigT],
) -> ConfigT: ...


def resolve_config(
    config_path: str | Path | None,
    overrides: Sequence[str],
    out: Path,
    resume: bool,
    model: type[TrainConfig] = TrainConfig,
) -> TrainConfig:
    """The config to run: the file + overrides, or on resume the run's saved config + overrides."""
    if resume:
        saved = RunDir(out).config
        if not saved.is_file():
            raise HistoliteError(f"{out}: nothing to resume (no config.yaml); start a new run")
        before = load_config(saved, [], model, recipe=False)
        after = load_config(saved, list(overrides), model, recipe=False)
        changed = [
            key for key in ("seed", "data", "model") if getattr(before, key) != getattr(after, key)
        ]
        if changed:
            raise HistoliteError(
                f"--resume cannot change {', '.join(changed)} of {out} (the split, seed and model "
                "are fixed when a run starts); start a new run with --out instead"
            )
        return after
    # DDP workers start after rank 0 has written the run files: only rank 0 guards the folder.
    if RunDir(out).spec.exists() and is_rank_zero():
        files = RunDir(out)
        started = files.train_summary.is_file() or any(files.checkpoints.glob("*.ckpt"))
        if not started:
            raise HistoliteError(
                f"{out} holds a run with no checkpoint yet (stopped, or still in its first "
                "epoch): nothing to resume; if it is not running, delete the folder or choose "
                "another --out"
            )
        raise HistoliteError(
            f"{out} already holds a run; pass --resume to continue it, or choose another --out"
        )
    if config_path is None:
        raise HistoliteError("a CONFIG file is required unless --resume is given")
    return load_config(config_path, list(overrides), model)


def run_split(run_dir: Path) -> Split:
    """The split a run trained on, read back from its ``split.csv`` (classes in the run's order)."""
    files = RunDir(run_dir)
    path = files.split_csv
    if not path.is_file():
        raise HistoliteError(f"{path}: missing; cannot resume without the run's split")
    classes = RunSpec.load(run_dir).classes
    table = read_split_csv(path, classes=classes)
    parts = {name: list(table.subset(name).samples) for name in SPLIT_NAMES}
    report = read_json(files.split_report) if files.split_report.is_file() else {}
    return Split(classes, parts, report, str(path))


def default_datamodule(
    prepared: PreparedData,
    cfg: TrainConfig,
    spec: RunSpec,
    model: nn.Module,
    out: Path,
    progress: bool,
) -> L.LightningDataModule:
    return ImageDataModule(prepared, cfg.data, cfg.augment, build_stain(cfg.data))


def build_classifier(spec: RunSpec, cfg: TrainConfig) -> NormalizedClassifier:
    net = create_model(
        cfg.model.name,
        spec.num_classes,
        pretrained=cfg.model.pretrained,
        weights=cfg.model.weights,
        head=cfg.model.head,
        head_dropout=cfg.model.head_dropout,
    )
    return NormalizedClassifier(net, spec.mean, spec.std)


def _write_run_files(
    out: Path, cfg: TrainConfig, spec: RunSpec, prepared: PreparedData, extra_meta: dict[str, Any]
) -> None:
    files = RunDir(out)
    write_text(files.config, dump_config(cfg))
    spec.save(out)
    write_split_csv(
        files.split_csv,
        LabelledImages(prepared.classes, tuple(prepared.all_samples)),
        prepared.split_names(),
    )
    write_json(files.split_report, prepared.split_report)
    if prepared.skipped:
        write_json(files.skipped_files, [{"path": p, "problem": w} for p, w in prepared.skipped])
    write_json(
        files.metadata,
        run_metadata(
            seed=cfg.seed,
            dataset_fingerprint=prepared.fingerprint(),
            split_counts={k: len(v) for k, v in prepared.splits.items()},
            skipped_files=len(prepared.skipped),
            **extra_meta,
        ),
    )


def _run_spec(cfg: TrainConfig, prepared: PreparedData, out: Path, resume: bool) -> RunSpec:
    if resume and RunDir(out).spec.is_file():
        return RunSpec.load(out)  # reuse the stored mean/std: computed once per run
    stain = build_stain(cfg.data)
    if cfg.data.dataset == "slide_features":  # features, not pixels: nothing to normalise
        mean, std = [0.0] * 3, [1.0] * 3
    else:
        mean, std = normalisation_stats(cfg.data, prepared.splits["train"], stain, cfg.model.name)
    return RunSpec(
        model_name=cfg.model.name,
        classes=prepared.classes,
        image_size=cfg.data.image_size,
        mean=tuple(mean),
        std=tuple(std),
        head=cfg.model.head,
        head_dropout=cfg.model.head_dropout,
        stain=stain_spec(cfg.data),
        patches=cfg.data.patches.spec() if cfg.data.patches else None,
        mpp=cfg.data.mpp or dataset_mpp(cfg.data.dataset, cfg.data.root),
        mil=_mil_spec(cfg, prepared) if cfg.mil else None,
    )


def _mil_spec(cfg: TrainConfig, prepared: PreparedData) -> MilSpec:
    """MIL settings for run.json; slide bags also record their feature size and provenance."""
    assert cfg.mil is not None
    patch = cfg.mil.patch.spec() if cfg.mil.patch is not None else None
    dim, made_by = (None, None) if patch else feature_dimension(prepared.splits["train"])
    return MilSpec(
        cfg.mil.pooling,
        cfg.mil.embed_dim,
        cfg.mil.attention_dim,
        cfg.mil.dropout,
        patch,
        feature_dim=dim,
        features=made_by,
    )


def checkpoint_callbacks(directory: Path, monitor: str | None) -> list[ModelCheckpoint]:
    """``last.ckpt`` every epoch (for --resume) and, with validation data, ``best.ckpt``.

    Two callbacks because Lightning 2.6 only refreshes ``save_last`` in epochs where the
    monitored checkpoint was saved too, which would make a resume lose epochs.
    """
    callbacks = [
        ModelCheckpoint(
            dirpath=directory,
            filename="last",
            monitor=None,
            save_top_k=1,
            enable_version_counter=False,
        )
    ]
    if monitor is not None:
        callbacks.append(
            ModelCheckpoint(
                dirpath=directory,
                filename="best",
                monitor=monitor,
                mode="max" if monitor.endswith("acc") else "min",
                save_top_k=1,
                enable_version_counter=False,
            )
        )
    return callbacks


def checkpoint_schedule(cfg: TrainConfig) -> CheckpointSchedule | None:
    if cfg.trainer.checkpoint_at:
        return AtEpochs(tuple(cfg.trainer.checkpoint_at))
    if cfg.trainer.checkpoint_every:
        return EveryNEpochs(cfg.trainer.checkpoint_every)
    return None


def _next_log_version(out: Path) -> int:
    logs = RunDir(out).logs
    return len(list(logs.glob("csv*"))) if logs.is_dir() else 0


def batch_stain_augment(cfg: TrainConfig, prepared: PreparedData) -> BatchStainAugment:
    """The config's stain augmentation; random targets are drawn around 200 training images."""
    if not (cfg.augment.random_reinhard or cfg.augment.random_macenko):
        return BatchStainAugment(cfg.augment.hed_jitter, seed=cfg.seed)
    from histolite.data.images import load_rgb
    from histolite.data.transforms import image_tensor

    train = prepared.splits["train"]
    sample = [image_tensor(load_rgb(s.path)) for s in train[:: max(1, len(train) // 200)][:200]]
    stain = build_stain(cfg.data)
    if stain is not None:  # batches arrive normalised: draw targets around normalised colours
        sample = [stain(image) for image in sample]
    return BatchStainAugment(
        cfg.augment.hed_jitter,
        lab_spread(sample) if cfg.augment.random_reinhard else None,
        macenko_spread(sample) if cfg.augment.random_macenko else None,
        seed=cfg.seed,
    )


def _trainer(
    cfg: TrainConfig, files: RunDir, callbacks: list[Callback], progress: bool
) -> L.Trainer:
    """A Lightning trainer per the config, logging CSV and TensorBoard into the run."""
    version = _next_log_version(files.root)
    return L.Trainer(
        default_root_dir=files.root,
        max_epochs=cfg.trainer.max_epochs,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes,
        strategy=cfg.trainer.strategy,
        precision=cfg.trainer.precision,  # type: ignore[arg-type]
        deterministic=cfg.trainer.deterministic,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        limit_train_batches=cfg.trainer.limit_train_batches,
        enable_progress_bar=progress and cfg.trainer.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        logger=[
            CSVLogger(files.root, name=files.logs.name, version=f"csv{version}"),
            TensorBoardLogger(
                files.root, name=files.logs.name, version=f"tb{version}", default_hp_metric=False
            ),
        ],
    )


def _write_summary(
    files: RunDir,
    trainer: L.Trainer,
    best: ModelCheckpoint | None,
    resumed: bool,
    seconds: float,
    augment: BatchStainAugment,
) -> None:
    score = best.best_model_score if best is not None else None
    write_json(
        files.train_summary,
        {
            "epochs_completed": trainer.current_epoch,
            "monitor": best.monitor if best is not None else None,
            "final_model": "best validation epoch" if best is not None else "last epoch",
            "best_score": float(score) if score is not None else None,
            "train_seconds_this_session": round(seconds, 2),
            "resumed": resumed,
            "devices": trainer.num_devices,
            "num_nodes": trainer.num_nodes,
            "world_size": trainer.world_size,
            # tiles random Macenko left unchanged (glass, fat, one stain), on rank 0
            "stain_augment_fallbacks": dict(augment.fallbacks),
        },
    )
    last = files.checkpoints / "last.ckpt"
    if best is None and last.exists():  # no validation data or final_model: the last epoch
        shutil.copyfile(last, files.checkpoints / "best.ckpt")


def train_run(
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    module_builder: ModuleBuilder = default_module,
    model_builder: ModelBuilder = build_classifier,
    datamodule_builder: DataModuleBuilder = default_datamodule,
    extra_callbacks: Sequence[Callback] = (),
    extra_metadata: dict[str, Any] | None = None,
    split: Split | None = None,
) -> Path:
    """Train per ``cfg`` into ``out``; ``resume`` continues from ``out/checkpoints/last.ckpt``.

    ``split`` is the split to train on when the caller has already made it (distillation checks
    it against the teacher's); a resumed run always reuses its own ``split.csv``.
    """
    out = Path(out)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if resume:
        split = run_split(out)
    prepared = prepare_data(cfg.data, cfg.seed, progress=progress and is_rank_zero(), split=split)
    spec = _run_spec(cfg, prepared, out, resume)
    # The model first: a model that cannot be built (weights missing offline) must not leave a
    # folder behind that blocks the corrected command with "already holds a run".
    model = model_builder(spec, cfg)
    module = module_builder(model, cfg, spec)
    if is_rank_zero():
        out.mkdir(parents=True, exist_ok=True)
        _write_run_files(out, cfg, spec, prepared, extra_metadata or {})
    augment = batch_stain_augment(cfg, prepared)
    if augment and isinstance(module, ClassifierModule):
        module.batch_augment = augment
    datamodule = datamodule_builder(prepared, cfg, spec, model, out, progress and is_rank_zero())
    has_val = getattr(datamodule, "val_set", None) is not None
    select_on_val = has_val and cfg.trainer.final_model == "best_val"
    monitor = cfg.trainer.monitor if select_on_val else None
    files = RunDir(out)
    checkpoints = checkpoint_callbacks(files.checkpoints, monitor)
    schedule = checkpoint_schedule(cfg)
    if schedule is not None:
        extra_callbacks = [
            ScheduledCheckpoints(schedule, files.checkpoints, cfg.trainer.max_epochs),
            *extra_callbacks,
        ]
    trainer = _trainer(cfg, files, [*checkpoints, RngState(), *extra_callbacks], progress)
    last = files.checkpoints / "last.ckpt"
    if resume and not last.is_file():
        raise HistoliteError(f"{last}: no checkpoint to resume from")
    started = time.perf_counter()
    trainer.fit(
        module,
        datamodule=datamodule,
        ckpt_path=last if resume else None,
        weights_only=True,  # checkpoints are loaded without unpickling objects
    )
    if trainer.is_global_zero:
        best = checkpoints[-1] if monitor else None
        _write_summary(files, trainer, best, resume, time.perf_counter() - started, augment)
    return out
