"""Test-time augmentation over the dihedral group: tissue has no preferred orientation.

One owner for evaluation (``histolite evaluate --tta``) and for a distillation teacher that
labels each student view as the mean of its 8 flips/rotations (``distill.teacher_tta``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def dihedral_views(x: Tensor) -> list[Tensor]:
    """The 8 flips/rotations of a (B, 3, H, W) batch."""
    views = []
    for k in range(4):
        rotated = torch.rot90(x, k, dims=(-2, -1))
        views += [rotated, torch.flip(rotated, dims=(-1,))]
    return views


def dihedral_log_probabilities(logits_of: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Log of the class probabilities averaged over the 8 views, from one 8B-image call.

    The result works as logits: softmax(log p / T) is the tempered average prediction.
    """
    batch = len(x)
    logits = logits_of(torch.cat(dihedral_views(x)))
    probs = torch.softmax(logits.float(), dim=1).view(8, batch, -1).mean(dim=0)
    return torch.log(probs.clamp_min(1e-12))
