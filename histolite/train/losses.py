"""Training losses as small, named, registered pieces (torchdistill style)."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

LossFactory = Callable[..., nn.Module]
_LOSSES: dict[str, LossFactory] = {}


def register_loss(name: str) -> Callable[[LossFactory], LossFactory]:
    def decorator(factory: LossFactory) -> LossFactory:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        _LOSSES[name] = factory
        return factory

    return decorator


def create_loss(name: str, **kwargs: float) -> nn.Module:
    if name not in _LOSSES:
        raise KeyError(f"unknown loss {name!r}; known: {', '.join(sorted(_LOSSES))}")
    return _LOSSES[name](**kwargs)


def kd_divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch (Hinton et al. 2015).

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones
    whatever the temperature.
    """
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


@register_loss("kd")
class DistillationLoss(nn.Module):
    """``ce_weight * CE(y, s) + kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T))``."""

    def __init__(
        self,
        ce_weight: float = 1.0,
        kd_weight: float = 0.5,
        temperature: float = 4.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.label_smoothing = label_smoothing

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        ce = F.cross_entropy(student_logits, target, label_smoothing=self.label_smoothing)
        kd = kd_divergence(student_logits, teacher_logits, self.temperature)
        return self.ce_weight * ce + self.kd_weight * kd


@register_loss("ce")
class CrossEntropy(nn.Module):
    """Plain cross-entropy with optional label smoothing (the supervised baseline)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
