"""Training losses as small, named pieces (torchdistill style): cross-entropy of a mixed batch,
the temperature-scaled KL divergence, and their weighted sum for distillation."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Mix:
    """Mixup of a batch: each image is ``lam`` itself and ``1 - lam`` the image ``other`` came
    from (Zhang et al. 2018); the labels mix with the same weight."""

    other: Tensor
    lam: float


def mixed_cross_entropy(
    logits: Tensor, y: Tensor, mix: Mix | None, label_smoothing: float = 0.0
) -> Tensor:
    """Cross-entropy with the labels of a (possibly mixed) batch."""
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    if mix is None:
        return loss
    other = F.cross_entropy(logits, mix.other, label_smoothing=label_smoothing)
    return mix.lam * loss + (1.0 - mix.lam) * other


def kd_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    rows: Tensor | None = None,
) -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch (Hinton et al. 2015).

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones
    whatever the temperature. ``rows`` (bool, one per image) keeps the images that have a
    teacher; the others add 0, so each image's weight does not depend on its batch.
    """
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    if rows is None:
        kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    else:
        per_image = F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(1)
        kl = (per_image * rows.to(per_image.dtype)).sum() / len(per_image)
    return kl * temperature**2


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

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        mix: Mix | None = None,
        teacher_rows: Tensor | None = None,
    ) -> Tensor:
        """``teacher_rows`` (bool per image, None: all) marks the images with a teacher's
        target; the others contribute their cross-entropy only."""
        ce = mixed_cross_entropy(student_logits, target, mix, self.label_smoothing)
        kd = kd_divergence(student_logits, teacher_logits, self.temperature, teacher_rows)
        return self.ce_weight * ce + self.kd_weight * kd
