"""Real H&E: a small model trained briefly on a Kather subset beats chance by a wide margin."""

from pathlib import Path

import pytest
from support import write_config

from histolite.evaluate.report import evaluate_run
from histolite.train import resolve_config, train_run

TRAIN_PER_CLASS, TEST_PER_CLASS = 60, 20


def _subset(kather_dir: Path, root: Path) -> tuple[Path, Path]:
    """Symlinked train/test folders from disjoint tiles of each class."""
    for class_dir in sorted(p for p in kather_dir.iterdir() if p.is_dir()):
        tiles = sorted(class_dir.iterdir())
        for split, chosen in (
            ("train", tiles[:TRAIN_PER_CLASS]),
            ("test", tiles[-TEST_PER_CLASS:]),
        ):
            target = root / split / class_dir.name
            target.mkdir(parents=True)
            for tile in chosen:
                (target / tile.name).symlink_to(tile)
    return root / "train", root / "test"


@pytest.mark.kather
@pytest.mark.slow
def test_student_beats_chance_on_real_tiles(tmp_path: Path, kather_dir: Path) -> None:
    train_dir, test_dir = _subset(kather_dir, tmp_path / "kather")
    config = write_config(
        tmp_path / "cfg.yaml",
        train_dir,
        data={"image_size": 64, "batch_size": 32, "val_fraction": 0.1},
        model={"name": "mobile_student_s"},
        optimizer={"name": "adamw", "lr": 0.004},
    )
    cfg = resolve_config(
        config,
        ["trainer.max_epochs=6", "augment.vflip=true", "scheduler.name=cosine"],
        tmp_path / "run",
        resume=False,
    )
    run = train_run(cfg, tmp_path / "run", progress=False)
    report = evaluate_run(run, test_dir, tmp_path / "report", progress=False)
    assert report["n"] == 8 * TEST_PER_CLASS
    assert report["accuracy"] >= 0.5, report["accuracy"]  # chance is 0.125
