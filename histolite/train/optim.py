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
    optimizer: torch.optim.Optimizer,
    cfg: SchedulerConfig,
    max_epochs: int,
    monitor: str,
    steps_per_epoch: int = 1,
) -> dict[str, Any] | None:
    """A Lightning ``lr_scheduler`` dict, or None.

    Schedules step once per epoch, except ``cosine_restarts``, which steps every batch so that
    each cycle really ends at ``min_lr`` (SGDR, Loshchilov & Hutter 2017). With
    ``warmup_epochs`` the learning rate climbs linearly from lr/10 first; the main schedule then
    runs over the remaining epochs, so a cosine schedule still ends at ``min_lr``.
    """
    from torch.optim import lr_scheduler

    if cfg.name == "cosine_restarts":
        restarts = lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer,
            T_0=cfg.cycle_epochs * steps_per_epoch,
            T_mult=cfg.cycle_mult,
            eta_min=cfg.min_lr,
        )
        return {"scheduler": restarts, "interval": "step"}
    if cfg.name == "plateau":
        mode: Literal["min", "max"] = "max" if monitor.endswith("acc") else "min"
        plateau = lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=cfg.factor, patience=cfg.patience, min_lr=cfg.min_lr
        )
        return {"scheduler": plateau, "interval": "epoch", "monitor": monitor}
    warmup = min(cfg.warmup_epochs, max_epochs - 1)
    main_epochs = max_epochs - warmup
    scheduler: lr_scheduler.LRScheduler
    if cfg.name == "none":
        if not warmup:
            return None
        scheduler = lr_scheduler.ConstantLR(optimizer, factor=1.0)
    elif cfg.name == "step":
        scheduler = lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    elif cfg.name == "exponential":
        scheduler = lr_scheduler.ExponentialLR(optimizer, gamma=cfg.gamma)
    else:
        scheduler = lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_epochs, eta_min=cfg.min_lr)
    if warmup:
        ramp = lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warmup)
        scheduler = lr_scheduler.SequentialLR(optimizer, [ramp, scheduler], milestones=[warmup])
    return {"scheduler": scheduler, "interval": "epoch"}
