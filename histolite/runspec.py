"""``run.json``: what a trained model needs at inference, readable without torch or the config.

Evaluation, export and serving rebuild the model and its preprocessing from this file alone.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from histolite.errors import HistoliteError
from histolite.fileio import read_json, write_json

RUN_SPEC_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"
SPLIT_FILE = "split.csv"
SPLIT_REPORT_FILE = "split_report.json"


@dataclass(frozen=True)
class RunSpec:
    model_name: str
    classes: tuple[str, ...]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    head: str = "default"
    head_dropout: float = 0.4
    stain: dict[str, Any] | None = None
    patches: dict[str, Any] | None = None
    mil: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def save(self, run_dir: str | Path) -> Path:
        return write_json(Path(run_dir) / RUN_SPEC_FILE, asdict(self))

    @classmethod
    def load(cls, run_dir: str | Path) -> RunSpec:
        run_dir = Path(run_dir)
        path = run_dir / RUN_SPEC_FILE
        if not path.is_file():
            raise HistoliteError(
                f"{run_dir}: not a histolite run (no {RUN_SPEC_FILE}); pass the --out folder of "
                "`histolite train`"
            )
        data = read_json(path)
        try:
            data["classes"] = tuple(data["classes"])
            data["mean"] = tuple(data["mean"])
            data["std"] = tuple(data["std"])
            return cls(**data)
        except (KeyError, TypeError) as exc:
            raise HistoliteError(f"{path}: malformed run spec ({exc})") from exc


def checkpoint_path(run_dir: str | Path, which: str = "best") -> Path:
    """``best`` / ``last`` or an explicit checkpoint file name in the run's checkpoints folder."""
    run_dir = Path(run_dir)
    name = which if which.endswith(".ckpt") else f"{which}.ckpt"
    path = run_dir / CHECKPOINT_DIR / name
    if not path.is_file():
        raise HistoliteError(f"{path}: checkpoint not found; did training finish an epoch?")
    return path


def is_rank_zero() -> bool:
    """True in the main process of a (possibly distributed) run, even before Lightning starts."""
    return all(int(os.environ.get(var, "0")) == 0 for var in ("RANK", "LOCAL_RANK", "NODE_RANK"))
