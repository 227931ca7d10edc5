"""Checkpoint schedules: which epochs of a (teacher) run keep a checkpoint.

Multi-part distillation (Kather MixNet-L -> MixNet-S) cuts the teacher's training into
intervals with a checkpoint at the end of each; the student mimics checkpoint i during its
interval i. The schedule is a small strategy object so other spacings (e.g. denser early on)
plug in without touching the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import lightning as L
from lightning.pytorch.callbacks import Callback

from histolite.fileio import read_json, write_json

SCHEDULE_FILE = "schedule.json"


class CheckpointSchedule(Protocol):
    def epochs(self, max_epochs: int) -> list[int]:
        """1-based epoch counts after which a checkpoint is kept (the last epoch always is)."""
        ...


@dataclass(frozen=True)
class EveryNEpochs:
    every: int

    def epochs(self, max_epochs: int) -> list[int]:
        marks = list(range(self.every, max_epochs + 1, self.every))
        return marks if marks and marks[-1] == max_epochs else [*marks, max_epochs]


@dataclass(frozen=True)
class AtEpochs:
    at: tuple[int, ...]

    def epochs(self, max_epochs: int) -> list[int]:
        marks = sorted({e for e in self.at if 0 < e <= max_epochs})
        return marks if marks and marks[-1] == max_epochs else [*marks, max_epochs]


def checkpoint_name(epochs_done: int) -> str:
    return f"epoch_{epochs_done:03d}.ckpt"


@dataclass(frozen=True)
class ScheduledCheckpoint:
    """One kept checkpoint: after how many epochs, where, and how it scored on validation."""

    epochs_done: int
    path: Path
    val_acc: float | None = None


class ScheduledCheckpoints(Callback):
    """Save ``checkpoints/epoch_NNN.ckpt`` after scheduled epochs; list them in schedule.json.

    Each entry keeps the epoch's validation accuracy, so a multi-part student's plan can show how
    strong each teacher checkpoint was.
    """

    def __init__(self, schedule: CheckpointSchedule, directory: Path, max_epochs: int) -> None:
        self.directory = Path(directory)
        self.marks = schedule.epochs(max_epochs)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done = trainer.current_epoch + 1
        if done not in self.marks:
            return
        # weights only: multi-part KD needs nothing else, and files are ~3x smaller with Adam
        trainer.save_checkpoint(self.directory / checkpoint_name(done), weights_only=True)
        if not trainer.is_global_zero:
            return
        val_acc = trainer.callback_metrics.get("val_acc")
        scores = {e.epochs_done: e.val_acc for e in read_schedule(self.directory)}  # resume
        scores[done] = float(val_acc) if val_acc is not None else None
        saved = sorted(e for e in self.marks if (self.directory / checkpoint_name(e)).exists())
        write_json(
            self.directory / SCHEDULE_FILE,
            {
                "planned_epochs": self.marks,
                "saved": [
                    {"epochs_done": e, "file": checkpoint_name(e), "val_acc": scores.get(e)}
                    for e in saved
                ],
            },
        )


def read_schedule(checkpoint_dir: Path) -> list[ScheduledCheckpoint]:
    """Every scheduled checkpoint that exists, in training order."""
    path = checkpoint_dir / SCHEDULE_FILE
    if not path.is_file():
        return []
    data: dict[str, Any] = read_json(path)
    entries = [
        ScheduledCheckpoint(
            int(item["epochs_done"]), checkpoint_dir / item["file"], item.get("val_acc")
        )
        for item in data["saved"]
    ]
    return sorted((e for e in entries if e.path.is_file()), key=lambda e: e.epochs_done)
