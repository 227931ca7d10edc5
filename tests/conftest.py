"""Shared fixtures: small synthetic datasets and configs, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from histolite.cli import main
from histolite.data.synthetic import generate_synthetic_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
KATHER_DIR = Path(os.environ.get("HISTOLITE_KATHER", REPO_ROOT.parent / "shared/data/kather2016"))

os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")


def kather_available() -> bool:
    return (KATHER_DIR / "01_TUMOR").is_dir()


requires_kather = pytest.mark.skipif(
    not kather_available(), reason=f"Kather tiles not found at {KATHER_DIR}"
)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 16 tiles of 32 px over 4 slides: enough to train a few steps."""
    root = tmp_path_factory.mktemp("synthetic")
    return generate_synthetic_dataset(
        root / "data",
        images_per_class=16,
        image_size=32,
        slides=4,
        seed=1,
        classes=("tumor", "stroma", "lympho", "adipose"),
        progress=False,
    )


def write_config(path: Path, data_root: Path, **sections: dict) -> Path:
    """A tiny CPU config on ``data_root``; ``sections`` update the defaults per section."""
    cfg: dict = {
        "seed": 0,
        "data": {
            "root": str(data_root),
            "image_size": 32,
            "batch_size": 16,
            "num_workers": 0,
            "val_fraction": 0.25,
        },
        "model": {"name": "resnet8"},
        "optimizer": {"name": "adam", "lr": 0.003},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "progress_bar": False},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {}).update(value) if isinstance(value, dict) else cfg.update(
            {key: value}
        )
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def run_cli(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, str]:
    """Run ``histolite ARGS`` in-process through the real entry point."""
    monkeypatch.setattr(sys, "argv", ["histolite", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
