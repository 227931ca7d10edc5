"""Fixtures of the serving tests: a model repository with a classifier and a bag model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support import write_config

from histolite.export.onnx import export_run
from histolite.train import resolve_config
from histolite.train.mil import mil_run


@pytest.fixture(scope="session")
def repository(
    tmp_path_factory: pytest.TempPathFactory, exported_model: Path, mosaic_bags: Path
) -> Path:
    """tiles/1, tiles/2 and tiles/10 (one classifier), bags/1 (a MIL model), and junk."""
    root = tmp_path_factory.mktemp("repo")
    for version in ("1", "2", "10"):
        shutil.copytree(exported_model, root / "models" / "tiles" / version)
    config = write_config(
        root / "mil.yaml",
        mosaic_bags,
        data={"image_size": 32, "batch_size": 8, "val_fraction": 0.2, "test_fraction": 0.2},
        mil={"patch": {"size": 32}, "freeze_backbone": False, "cache_features": False},
    )
    cfg = resolve_config(config, ["trainer.max_epochs=2"], root / "mil", resume=False)
    export_run(mil_run(cfg, root / "mil", progress=False), root / "models" / "bags" / "1",
               progress=False, parity_samples=8)  # fmt: skip
    broken = root / "models" / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.json").write_text("{not json")
    return root / "models"
