"""Lightning module for supervised classification."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from histolite.config import OptimizerConfig, SchedulerConfig, TrainConfig
from histolite.train.losses import Mix, mixed_cross_entropy
from histolite.train.optim import build_optimizer, build_scheduler


class ClassifierModule(L.LightningModule):
    """Cross-entropy training of ``model``; logs loss/accuracy per epoch for train and val.

    Distillation changes the objective by overriding :meth:`training_loss`; MIL, whose batches
    carry a padding mask, overrides the steps themselves. Mixup (``mixup_alpha``) and a fixed
    model input size (``input_size``, for batches loaded larger for a teacher) apply to both.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerConfig,
        scheduler: SchedulerConfig,
        *,
        max_epochs: int,
        monitor: str = "val_acc",
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        mixup_alpha: float = 0.0,
        input_size: int | None = None,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        self.mixup_alpha = mixup_alpha
        self.input_size = input_size
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        # batch-level stain augmentation (runs on the batch's device); set by train_run
        self.batch_augment: Callable[[Tensor], Tensor] | None = None
        self.optimizer_cfg = optimizer
        self.scheduler_cfg = scheduler
        self.max_epochs = max_epochs
        self.monitor = monitor
        self.label_smoothing = label_smoothing

    def forward(self, x: Tensor) -> Tensor:
        if self.input_size is not None and x.shape[-1] != self.input_size:
            x = resize_batch(x, self.input_size)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def log_epoch_mean(
        self, name: str, value: Tensor, batch_size: int, prog_bar: bool = False
    ) -> None:
        """Log ``value`` as a per-epoch mean over batches (and devices)."""
        self.log(
            name,
            value,
            prog_bar=prog_bar,
            on_step=False,
            on_epoch=True,
            sync_dist=True,
            batch_size=batch_size,
        )

    def _log_metrics(self, stage: str, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log_epoch_mean(f"{stage}_loss", loss, len(y), prog_bar=stage == "val")
        self.log_epoch_mean(f"{stage}_acc", acc, len(y), prog_bar=True)

    def training_loss(
        self, x: Tensor, y: Tensor, mix: Mix | None, folds: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(loss, student logits) for one batch; ``folds`` (cross-fitted distillation) says
        which teacher fold left each image out."""
        logits = self(x)
        return mixed_cross_entropy(logits, y, mix, self.label_smoothing), logits

    def mix_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Mix | None]:
        """Mixup with a Beta(alpha, alpha) weight per batch, when ``mixup_alpha`` is set."""
        if self.mixup_alpha <= 0 or len(y) < 2:
            return x, None
        lam = float(torch.distributions.Beta(self.mixup_alpha, self.mixup_alpha).sample())
        order = torch.randperm(len(y), device=y.device)
        return lam * x + (1.0 - lam) * x[order], Mix(y[order], lam)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, y, *tags = batch
        if self.batch_augment is not None:
            x = self.batch_augment(x)
        x, mix = self.mix_batch(x, y)
        loss, logits = self.training_loss(x, y, mix, tags[0] if tags else None)
        shown = y if mix is None or mix.lam >= 0.5 else mix.other  # the dominant image's label
        self._log_metrics("train", loss, logits, shown)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self._log_metrics("val", F.cross_entropy(logits, y), logits, y)

    def on_train_epoch_start(self) -> None:
        optimizer = self.optimizers()
        if isinstance(optimizer, list):  # pragma: no cover - one optimizer is configured
            optimizer = optimizer[0]
        lr = optimizer.param_groups[0]["lr"]
        self.log("lr", torch.tensor(lr), on_step=False, on_epoch=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        trainable = (p for p in self.model.parameters() if p.requires_grad)  # frozen parts stay out
        optimizer = build_optimizer(trainable, self.optimizer_cfg)
        steps_per_epoch = 1
        if self.scheduler_cfg.name == "cosine_restarts":  # steps per batch
            steps_per_epoch = max(
                1, int(self.trainer.estimated_stepping_batches) // self.max_epochs
            )
        scheduler = build_scheduler(
            optimizer, self.scheduler_cfg, self.max_epochs, self.monitor, steps_per_epoch
        )
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def resize_batch(x: Tensor, size: int) -> Tensor:
    """Bilinear, antialiased resize of a float batch to ``size`` x ``size``."""
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def module_options(cfg: TrainConfig) -> dict[str, Any]:
    """The :class:`ClassifierModule` settings a config decides (supervised and MIL training)."""
    return {
        "max_epochs": cfg.trainer.max_epochs,
        "monitor": cfg.trainer.monitor,
        "label_smoothing": cfg.trainer.label_smoothing,
        "channels_last": cfg.trainer.channels_last,
        "mixup_alpha": cfg.augment.mixup_alpha,
    }
