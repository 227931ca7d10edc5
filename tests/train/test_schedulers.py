"""Learning-rate schedules built from config, with and without linear warm-up."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from support import write_config

from histolite.config import SchedulerConfig, load_config
from histolite.errors import ConfigError
from histolite.train import resolve_config, train_run
from histolite.train.optim import build_scheduler


def _scheduled_lrs(cfg: SchedulerConfig, epochs: int, steps_per_epoch: int = 1) -> list[float]:
    """The learning rate each scheduler step runs at: per epoch, or per batch for step schedules."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    built = build_scheduler(optimizer, cfg, epochs, "val_acc", steps_per_epoch)
    steps = epochs * (steps_per_epoch if built and built["interval"] == "step" else 1)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if built is not None:
            built["scheduler"].step()
    return lrs


def test_cosine_without_warmup_starts_at_lr_and_decays() -> None:
    lrs = _scheduled_lrs(SchedulerConfig(name="cosine"), 6)
    assert lrs[0] == pytest.approx(1.0)
    assert lrs == sorted(lrs, reverse=True)


def test_warmup_ramps_then_cosine_reaches_min_lr_on_time() -> None:
    lrs = _scheduled_lrs(SchedulerConfig(name="cosine", warmup_epochs=2, min_lr=0.0), 7)
    assert lrs[:3] == pytest.approx([0.1, 0.55, 1.0])
    # cosine over the 5 remaining epochs: 1, cos steps, ending one step before min_lr
    assert lrs[3:] == pytest.approx([0.5 * (1 + math.cos(k * math.pi / 5)) for k in range(1, 5)])


def test_warmup_with_constant_and_step_schedules() -> None:
    assert _scheduled_lrs(SchedulerConfig(name="none"), 3) == [1.0, 1.0, 1.0]
    assert _scheduled_lrs(SchedulerConfig(name="none", warmup_epochs=1), 3) == pytest.approx(
        [0.1, 1.0, 1.0]
    )
    step = SchedulerConfig(name="step", step_size=2, gamma=0.5, warmup_epochs=1)
    assert _scheduled_lrs(step, 6) == pytest.approx([0.1, 1.0, 1.0, 0.5, 0.5, 0.25])


@pytest.mark.parametrize("name", ["plateau", "cosine_restarts"])
def test_warmup_is_refused_where_it_does_not_combine(tmp_path: Path, name: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"scheduler: {{name: {name}, warmup_epochs: 2}}\n")
    with pytest.raises(ConfigError, match=f"warmup_epochs does not combine with the {name}"):
        load_config(path)


def test_cosine_restarts_anneal_to_min_lr_at_each_cycle_end() -> None:
    cfg = SchedulerConfig(name="cosine_restarts", cycle_epochs=1, cycle_mult=2, min_lr=0.01)
    assert cfg.cycle_ends(15) == [1, 3, 7, 15]
    assert cfg.cycle_ends(10) == [1, 3, 7]
    steps_per_epoch = 4
    lrs = _scheduled_lrs(cfg, 15, steps_per_epoch)  # learning rate used by each batch
    assert len(lrs) == 15 * steps_per_epoch  # the scheduler steps per batch
    for end in cfg.cycle_ends(15):
        last_batch = lrs[end * steps_per_epoch - 1]
        assert last_batch < 0.2  # the cycle's last batches run near min_lr ...
        if end < 15:
            assert lrs[end * steps_per_epoch] == pytest.approx(1.0)  # ... then it restarts
    assert min(lrs) >= 0.01


def test_snapshot_teacher_recipe_keeps_a_checkpoint_at_every_cycle_end() -> None:
    recipe = Path(__file__).parents[2] / "configs" / "kather2016_resnet18_snapshot_teacher.yaml"
    cfg = load_config(recipe, ["data.root=unused"])
    assert cfg.scheduler.name == "cosine_restarts"
    assert cfg.trainer.checkpoint_at == cfg.scheduler.cycle_ends(cfg.trainer.max_epochs)


def test_cosine_restarts_step_per_batch_in_training(tmp_path: Path, synthetic_dir: Path) -> None:
    config = write_config(
        tmp_path / "c.yaml",
        synthetic_dir,
        scheduler={"name": "cosine_restarts", "cycle_epochs": 2, "min_lr": 0.0},
        trainer={"max_epochs": 3, "checkpoint_every": None},
    )
    cfg = resolve_config(config, [], tmp_path / "run", resume=False)
    run = train_run(cfg, tmp_path / "run", progress=False)
    (metrics,) = run.glob("logs/csv*/metrics.csv")
    with metrics.open() as f:
        lrs = [float(row["lr"]) for row in csv.DictReader(f) if row.get("lr")]
    # epoch starts: full lr, half-way down the 2-epoch cosine, then a restart to full lr
    assert lrs == pytest.approx([0.003, 0.0015, 0.003], rel=0.05)
