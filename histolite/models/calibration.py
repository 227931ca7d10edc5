"""Post-hoc calibration of a classifier's logits: temperature or vector scaling.

A network trained with label smoothing answers 0.83 where it is right nine times in ten, so its
probabilities cannot be read as frequencies. One scalar (temperature) or one scale and bias per
class (vector scaling), fitted on validation logits by minimising the negative log-likelihood,
fixes most of that without changing which class wins (temperature) or while changing it only
slightly (vector scaling). The scaling lives *inside* the model as :class:`LogitScaling`, so
evaluation, export (the ONNX graph multiplies too) and serving all see the same probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

METHODS = ("temperature", "vector")


class LogitScaling(nn.Module):
    """``logits * scale + bias``; the identity until calibrated.

    Its buffers are not persistent: checkpoints stay the trained network's, and a run's
    calibration (``calibration.json``) is applied when the run is loaded.
    """

    scale: Tensor
    bias: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(1), persistent=False)
        self.register_buffer("bias", torch.zeros(1), persistent=False)
        self.active = False

    def set(self, scale: Sequence[float], bias: Sequence[float]) -> None:
        device = self.scale.device
        self.scale = torch.tensor(list(scale), dtype=torch.float32, device=device)
        self.bias = torch.tensor(list(bias), dtype=torch.float32, device=device)
        self.active = True

    def forward(self, logits: Tensor) -> Tensor:
        if not self.active:  # no multiply in uncalibrated graphs
            return logits
        return logits * self.scale + self.bias


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 200) -> float:
    """The temperature T > 0 minimising the NLL of ``softmax(logits / T)`` (LBFGS on log T).

    Fitting log T keeps T positive without constraints; the NLL is convex in 1/T, so LBFGS
    from T = 1 finds the optimum in a few steps.
    """
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    _require(z, y)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.exp().item())


def fit_vector_scaling(
    logits: np.ndarray, labels: np.ndarray, max_iter: int = 500, l2: float = 1e-3
) -> tuple[list[float], list[float]]:
    """Per-class scale and bias minimising the NLL of ``softmax(logits * scale + bias)``.

    A small L2 pull towards the identity keeps classes with few validation samples from
    getting extreme scales.
    """
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    _require(z, y)
    classes = z.shape[1]
    scale = torch.ones(classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [scale, bias], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        penalty = l2 * (((scale - 1) ** 2).sum() + (bias**2).sum())
        loss = nn.functional.cross_entropy(z * scale + bias, y) + penalty
        loss.backward()
        return loss

    optimizer.step(closure)
    return scale.detach().tolist(), bias.detach().tolist()


def _require(logits: Tensor, labels: Tensor) -> None:
    if logits.dim() != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(
            f"need (N, C) logits and N labels, got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits contain NaN or infinity")


def logit_scaling_of(model: nn.Module) -> LogitScaling:
    """The :class:`LogitScaling` that ends a classifier or attention-MIL model."""
    scaling = getattr(model, "calibration", None)
    if not isinstance(scaling, LogitScaling):
        raise TypeError(f"{type(model).__name__} has no calibration layer")
    return scaling
