"""How sure a prediction is: confidence, entropy, out-of-distribution scores, and the flags.

One leaf module (NumPy only) so that calibration (which chooses thresholds on validation), the
runtime (which serves the flags) and reports compute the same numbers. Every score follows one
convention: **higher means more confident / more in-distribution**, so one rule flags an input
("score below the threshold").

- ``msp``: the maximum softmax probability (Hendrycks & Gimpel 2017);
- ``max_logit``: the largest logit;
- ``energy``: ``logsumexp(logits)``, the negative free energy (Liu et al. 2020);
- ``neg_entropy``: minus the predictive entropy (nats).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

SCORES = ("msp", "max_logit", "energy", "neg_entropy")
NEEDS_LOGITS = frozenset({"max_logit", "energy"})


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for logits of any size."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Predictive entropy in nats (0: certain; log C: uniform over C classes)."""
    p = np.asarray(probabilities, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=-1)


def logsumexp(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=-1)
    return top + np.log(np.exp(z - top[..., None]).sum(axis=-1))


def score(name: str, probabilities: np.ndarray, logits: np.ndarray | None = None) -> np.ndarray:
    """One named score per row (see the module doc); logits needed for max_logit and energy."""
    if name == "msp":
        return np.asarray(probabilities, dtype=np.float64).max(axis=-1)
    if name == "neg_entropy":
        return -entropy(probabilities)
    if name not in NEEDS_LOGITS:
        raise ValueError(f"unknown score {name!r}; known: {', '.join(SCORES)}")
    if logits is None:
        raise ValueError(f"score {name!r} needs logits")
    if name == "max_logit":
        return np.asarray(logits, dtype=np.float64).max(axis=-1)
    return logsumexp(logits)


def ood_scores(logits: np.ndarray) -> dict[str, np.ndarray]:
    """Every named score of each row of ``(samples, classes)`` logits, through :func:`score`.

    The same function the runtime serves, so a benchmark's numbers are the served numbers;
    it only adds the shape and finiteness checks a report's input needs.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] == 0:
        raise ValueError(f"logits must be a (samples, classes) array, got shape {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits contain NaN or infinite values")
    probabilities = softmax(z)
    return {name: score(name, probabilities, z) for name in SCORES}


@dataclass(frozen=True)
class UncertaintyPolicy:
    """The thresholds a model card carries: abstain below a confidence, flag below a score."""

    abstain_below: float | None = None
    ood_score: str | None = None
    ood_threshold: float | None = None

    @property
    def needs_logits(self) -> bool:
        return self.ood_score in NEEDS_LOGITS

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> UncertaintyPolicy:
        abstention = card.get("abstention") or {}
        ood = card.get("ood") or {}
        return cls(
            abstain_below=abstention.get("threshold"),
            ood_score=ood.get("score"),
            ood_threshold=ood.get("threshold"),
        )

    def assess(self, probabilities: np.ndarray, ood_value: float | None = None) -> dict[str, Any]:
        """What a response says about one prediction (its mean class probabilities).

        ``uncertain`` and ``out_of_distribution`` are None when the card sets no threshold.
        """
        p = np.asarray(probabilities, dtype=np.float64)
        confidence = float(p.max())
        flagged = ood_value is not None and self.ood_threshold is not None
        return {
            "confidence": confidence,
            "entropy": float(entropy(p)),
            "uncertain": None if self.abstain_below is None else confidence < self.abstain_below,
            "ood_score": None if ood_value is None else float(ood_value),
            "out_of_distribution": (
                bool(ood_value < self.ood_threshold) if flagged else None  # type: ignore[operator]
            ),
        }
