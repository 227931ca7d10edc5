"""Optimisers and learning-rate schedulers from config."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import nn

from histolite.config import OptimizerConfig, SchedulerConfig


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov,
        )
    optimizers: dict[str, Callable[..., torch.optim.Optimizer]] = {
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "adamax": torch.optim.Adamax,
    }
    return optimizers[cfg.name](params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, max_epochs: int, monitor: str
) -> dict[str, Any] | None:
    """A Lightning ``lr_scheduler`` dict stepping once per epoch, or None."""
    from torch.optim import lr_scheduler

    scheduler: Any
    if cfg.name == "none":
        return None
    if cfg.name == "step":
        scheduler = lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    elif cfg.name == "exponential":
        scheduler = lr_scheduler.ExponentialLR(optimizer, gamma=cfg.gamma)
    elif cfg.name == "cosine":
        scheduler = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs, eta_min=cfg.min_lr)
    else:
        mode: Literal["min", "max"] = "max" if monitor.endswith("acc") else "min"
        scheduler = lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=cfg.factor, patience=cfg.patience, min_lr=cfg.min_lr
        )
        return {"scheduler": scheduler, "interval": "epoch", "monitor": monitor}
    return {"scheduler": scheduler, "interval": "epoch"}
