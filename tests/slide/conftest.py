"""Fixtures of the slide tests: a small exported model at 0.5 um/px and a mosaic slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import mosaic_slide, write_config

from histolite.export.onnx import export_run
from histolite.export.runtime import OnnxClassifier
from histolite.train import resolve_config, train_run

COLUMNS, ROWS = 6, 4


@pytest.fixture(scope="session")
def model(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> OnnxClassifier:
    """A small classifier of 32 px synthetic tiles at 0.5 um/px (16 um tiles)."""
    root = tmp_path_factory.mktemp("slide_model")
    config = write_config(root / "cfg.yaml", synthetic_dir, data={"mpp": 0.5})
    cfg = resolve_config(config, ["trainer.max_epochs=3"], root / "run", resume=False)
    run = train_run(cfg, root / "run", progress=False)
    export_run(run, root / "model", progress=False, parity_samples=16)
    return OnnxClassifier(root / "model")


@pytest.fixture(scope="session")
def mosaic(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> tuple[Path, list]:
    """6 x 4 cells of known synthetic tiles; the last column is glass."""
    classes = sorted(p.name for p in synthetic_dir.iterdir() if p.is_dir())
    tiles: list[list[np.ndarray | None]] = []
    truth: list[list[tuple[str, np.ndarray] | None]] = []
    for r in range(ROWS):
        row, known = [], []
        for c in range(COLUMNS):
            if c == COLUMNS - 1:
                row.append(None)
                known.append(None)
                continue
            name = classes[(r + c) % len(classes)]
            pixels = np.asarray(Image.open(sorted((synthetic_dir / name).iterdir())[r + c]))
            row.append(pixels)
            known.append((name, pixels))
        tiles.append(row)
        truth.append(known)
    path = mosaic_slide(tmp_path_factory.mktemp("mosaic") / "mosaic.tif", tiles, mpp=0.5)
    return path, truth
