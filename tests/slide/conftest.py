"""Fixtures of the slide tests: a small exported model at 0.5 um/px and a mosaic slide."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import mosaic_slide, write_config

from histolite.export.onnx import export_run
from histolite.fileio import file_sha256
from histolite.runtime.classifier import OnnxClassifier
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
def retrained(tmp_path_factory: pytest.TempPathFactory, model: OnnxClassifier) -> OnnxClassifier:
    """``model`` re-exported after retraining: same name and version, another graph."""
    import json

    import onnx

    folder = tmp_path_factory.mktemp("retrained") / "model"
    shutil.copytree(model.model_dir, folder)
    graph = onnx.load(folder / "model.onnx")
    graph.doc_string = "retrained"  # a different file, as new weights would give
    onnx.save(graph, folder / "model.onnx")
    card = json.loads((folder / "model.json").read_text())
    card["sha256"] = file_sha256(folder / "model.onnx")
    (folder / "model.json").write_text(json.dumps(card))
    return OnnxClassifier(folder)


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
