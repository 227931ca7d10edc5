"""Shared fixtures: synthetic datasets, configs, the CLI, the real data when present.

Tests reach these through fixtures only (never ``from conftest import``). The folders under
``tests/`` mirror the package: ``tests/data`` tests ``histolite/data``, and so on.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings as hypothesis_settings
from support import KATHER_DIR, REPO_ROOT, kather_available

from histolite.cli import main
from histolite.data.synthetic import generate_synthetic_dataset

os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")

# `make test` runs one pytest-xdist worker per core: each worker (and the processes it starts)
# gets its share of the cores, not torch's default of one thread per core in every worker.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    import torch

    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
    torch.set_num_threads(_THREADS)

# Hypothesis draws new examples every run locally, to keep finding new inputs. In CI (the `CI`
# environment variable set, to any value) it draws the same examples every run, so a red build
# is a reproducible bug rather than a rare draw, and prints the blob that replays a failure.
# Registered here, not taken from Hypothesis' own "ci" profile, which older releases lack.
# `pytest --hypothesis-profile ci` runs the CI examples locally.
hypothesis_settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if "CI" in os.environ:
    hypothesis_settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    """In-process CLI runs change the process environment (`histolite serve` exports every
    HISTOLITE_* setting): none of it may outlive its test and change the next one."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` run first, so parallel workers never wait on one long tail."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def kather_dir() -> Path:
    """The real Kather tiles; tests that need them are skipped (visibly) where they are absent."""
    if not kather_available():
        pytest.skip(f"Kather tiles not found at {KATHER_DIR} (set HISTOLITE_KATHER)")
    return KATHER_DIR


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


@pytest.fixture(scope="session")
def exported_model(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> Path:
    """A small classifier trained on ``synthetic_dir`` and exported; shared, so never modify it."""
    from support import export_small_model

    return export_small_model(tmp_path_factory.mktemp("exported_model"), synthetic_dir)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


CliRunner = Callable[[list[str]], tuple[int, str, str]]


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """``run_cli(ARGS) -> (exit code, stdout, stderr)`` of ``histolite ARGS``, in-process."""

    def run(args: list[str]) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["histolite", *args])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def mosaic_bags(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> Path:
    """2x2 mosaics of 32 px synthetic tiles; positive iff a 'tumor' tile is present."""
    out = tmp_path_factory.mktemp("bags") / "bags"
    from typer.testing import CliRunner

    from histolite.cli import app

    result = CliRunner().invoke(
        app,
        [
            "data", "bags", str(synthetic_dir), "--out", str(out), "--positive", "tumor",
            "--grid", "2", "--bags-per-class", "24", "--tile-size", "32", "--max-positive", "1",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out
