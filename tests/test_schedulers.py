"""Learning-rate schedules built from config, with and without linear warm-up."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from histolite.config import SchedulerConfig, load_config
from histolite.errors import ConfigError
from histolite.train.optim import build_scheduler


def _epoch_lrs(cfg: SchedulerConfig, epochs: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    built = build_scheduler(optimizer, cfg, epochs, "val_acc")
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if built is not None:
            built["scheduler"].step()
    return lrs


def test_cosine_without_warmup_starts_at_lr_and_decays() -> None:
    lrs = _epoch_lrs(SchedulerConfig(name="cosine"), 6)
    assert lrs[0] == pytest.approx(1.0)
    assert lrs == sorted(lrs, reverse=True)


def test_warmup_ramps_then_cosine_reaches_min_lr_on_time() -> None:
    lrs = _epoch_lrs(SchedulerConfig(name="cosine", warmup_epochs=2, min_lr=0.0), 7)
    assert lrs[:3] == pytest.approx([0.1, 0.55, 1.0])
    # cosine over the 5 remaining epochs: 1, cos steps, ending one step before min_lr
    assert lrs[3:] == pytest.approx([0.5 * (1 + math.cos(k * math.pi / 5)) for k in range(1, 5)])


def test_warmup_with_constant_and_step_schedules() -> None:
    assert _epoch_lrs(SchedulerConfig(name="none"), 3) == [1.0, 1.0, 1.0]
    assert _epoch_lrs(SchedulerConfig(name="none", warmup_epochs=1), 3) == pytest.approx(
        [0.1, 1.0, 1.0]
    )
    step = SchedulerConfig(name="step", step_size=2, gamma=0.5, warmup_epochs=1)
    assert _epoch_lrs(step, 6) == pytest.approx([0.1, 1.0, 1.0, 0.5, 0.5, 0.25])


def test_warmup_with_plateau_is_refused_by_config(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("scheduler: {name: plateau, warmup_epochs: 2}\n")
    with pytest.raises(ConfigError, match="warmup_epochs"):
        load_config(path)
