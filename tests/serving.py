"""Shared helpers for the export / serve / browser tests: a small exported model."""

from __future__ import annotations

from pathlib import Path

from conftest import write_config

from histolite.export.onnx import export_run
from histolite.train import resolve_config, train_run


def train_small_run(root: Path, data: Path, epochs: int = 4) -> Path:
    config = write_config(root / "cfg.yaml", data, data={"test_fraction": 0.25})
    cfg = resolve_config(config, [f"trainer.max_epochs={epochs}"], root / "run", resume=False)
    return train_run(cfg, root / "run", progress=False)


def export_small_model(root: Path, data: Path, *, int8: bool = False) -> Path:
    run = root / "run" if (root / "run" / "run.json").is_file() else train_small_run(root, data)
    out = root / ("model_int8" if int8 else "model")
    export_run(run, out, int8=int8, progress=False, parity_samples=32)
    return out
