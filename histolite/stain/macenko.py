"""Macenko stain normalisation (Macenko et al. 2009), batched, and safe on background tiles.

Each tile's optical density (OD = -log(I / 255)) is a mix of two stain vectors, haematoxylin and
eosin. The stain vectors are the extreme angles (robust percentiles) of the tissue pixels' OD
projected on the plane of the two largest eigenvectors; the concentrations are the least-squares
solution, and normalising means rebuilding the tile with the *target's* stain vectors and
concentrations rescaled to the target's 99th percentiles.

The method breaks on tiles with little tissue (empty glass, fat): too few OD pixels, or a
degenerate plane. Such tiles are detected (tissue fraction below ``min_tissue``, or stain vectors
that are not finite, nearly parallel or with the wrong sign) and handled as ``fallback`` says:
``unchanged`` returns the tile as it is, ``target`` uses the target's stain vectors as the
tile's own (a colour-only correction). Either way no NaN ever comes out, and ``counts`` says
how many tiles fell back and why. Works on (B, 3, H, W) uint8 or float tensors, CPU or CUDA.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from histolite.errors import DataError
from histolite.fileio import read_json, write_json

Fallback = Literal["unchanged", "target"]
OD_BACKGROUND = 0.15  # a pixel with OD below this in any channel is glass (Macenko's beta)
ALPHA = 1.0  # percentile of the extreme angles (robust maximum)
MAX_CONCENTRATION_PERCENTILE = 99.0
MIN_ANGLE = 0.05  # radians: stain vectors closer than this are one stain, not two


@dataclass(frozen=True)
class MacenkoStats:
    """A target: the H and E stain vectors (OD per RGB channel) and 99th-percentile strengths."""

    stain_matrix: tuple[tuple[float, float, float], tuple[float, float, float]]
    max_concentrations: tuple[float, float]

    def to_dict(self) -> dict[str, object]:
        return {
            "method": "macenko",
            "stain_matrix": [list(v) for v in self.stain_matrix],
            "max_concentrations": list(self.max_concentrations),
        }

    @classmethod
    def from_dict(cls, data: dict[str, object], source: str = "stain target") -> MacenkoStats:
        try:
            rows = [tuple(float(v) for v in row) for row in data["stain_matrix"]]  # type: ignore[attr-defined]
            maxima = tuple(float(v) for v in data["max_concentrations"])  # type: ignore[attr-defined]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{source}: expected {{'stain_matrix': [[r, g, b], [r, g, b]], "
                f"'max_concentrations': [h, e]}} ({exc})"
            ) from exc
        if len(rows) != 2 or any(len(r) != 3 for r in rows) or len(maxima) != 2:
            raise DataError(f"{source}: a 2 x 3 stain matrix and 2 maxima are needed")
        return cls((rows[0], rows[1]), (maxima[0], maxima[1]))  # type: ignore[arg-type]


def optical_density(images: Tensor) -> Tensor:
    """(B, 3, N) float OD of uint8 or [0, 1] float RGB; light is clamped away from zero."""
    scaled = images.float() if images.dtype == torch.uint8 else images.float() * 255.0
    return -torch.log(scaled.clamp(min=1.0) / 255.0)


def _stain_vectors(od: Tensor) -> tuple[Tensor, str | None]:
    """Stain matrix (2, 3) of one tile's tissue OD (3, N), or why it cannot be trusted."""
    covariance = torch.cov(od)
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    plane = vectors[:, 1:].flip(1)  # the two largest
    plane = plane * torch.where(plane[0:1] < 0, -1.0, 1.0)  # point into positive OD
    projected = plane.T @ od  # (2, N)
    angles = torch.atan2(projected[1], projected[0])
    low = torch.quantile(angles, ALPHA / 100.0)
    high = torch.quantile(angles, 1.0 - ALPHA / 100.0)
    if float(high - low) < MIN_ANGLE:
        return torch.zeros(2, 3, dtype=od.dtype, device=od.device), "one stain only"
    first = plane @ torch.stack([torch.cos(low), torch.sin(low)])
    second = plane @ torch.stack([torch.cos(high), torch.sin(high)])
    # haematoxylin is the vector with more red-channel OD (it absorbs red light)
    pair = torch.stack([first, second] if first[0] > second[0] else [second, first])
    pair = pair / pair.norm(dim=1, keepdim=True)
    if not bool(torch.isfinite(pair).all()) or bool((pair < -1e-3).any()):
        return pair, "implausible stain vectors"
    return pair, None


def _concentrations(od: Tensor, stains: Tensor) -> Tensor:
    """Least-squares concentrations (2, N) of OD (3, N) in the two stains (2, 3)."""
    return torch.linalg.pinv(stains.T) @ od


def tissue_pixels(od: Tensor) -> Tensor:
    """(N,) mask of pixels with OD above the background level in every channel."""
    return (od > OD_BACKGROUND).all(dim=0)


class MacenkoNormalizer:
    """Callable on (3, H, W) or (B, 3, H, W) tensors, uint8 or float, CPU or CUDA.

    Args:
        target: the stain vectors and maximum concentrations to match.
        min_tissue: tiles with a smaller fraction of tissue pixels (OD above ``OD_BACKGROUND``)
            fall back instead of estimating stains from a handful of pixels.
        fallback: ``unchanged`` or ``target`` (see the module docstring).
    """

    def __init__(
        self, target: MacenkoStats, *, min_tissue: float = 0.05, fallback: Fallback = "unchanged"
    ) -> None:
        if fallback not in ("unchanged", "target"):
            raise DataError(f"fallback must be 'unchanged' or 'target', got {fallback!r}")
        self.target = target
        self.min_tissue = min_tissue
        self.fallback = fallback
        self.counts: Counter[str] = Counter()

    @classmethod
    def fit(cls, image: Tensor | np.ndarray, **kwargs: object) -> MacenkoNormalizer:
        """Stain vectors of one reference image (H x W x 3 uint8 array, or a tensor)."""
        tensor = (
            torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)
            if isinstance(image, np.ndarray)
            else image
        )
        od = optical_density(tensor.reshape(1, 3, -1))[0].double()
        tissue = od[:, tissue_pixels(od)]
        if tissue.shape[1] < 100:
            raise DataError("the stain target has almost no tissue; pick a tile with H&E stain")
        stains, problem = _stain_vectors(tissue)
        if problem is not None:
            raise DataError(f"cannot fit Macenko stains to the target: {problem}")
        maxima = torch.quantile(
            _concentrations(tissue, stains), MAX_CONCENTRATION_PERCENTILE / 100.0, dim=1
        )
        stats = MacenkoStats(
            (tuple(stains[0].tolist()), tuple(stains[1].tolist())),
            (float(maxima[0]), float(maxima[1])),
        )
        return cls(stats, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: object) -> MacenkoNormalizer:
        path = Path(path)
        if path.suffix.lower() == ".json":
            return cls(MacenkoStats.from_dict(read_json(path), source=str(path)), **kwargs)  # type: ignore[arg-type]
        from histolite.data.images import load_rgb

        return cls.fit(load_rgb(path), **kwargs)

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.target.to_dict())

    def __call__(self, images: Tensor) -> Tensor:
        if images.ndim not in (3, 4) or images.shape[-3] != 3:
            raise DataError(
                f"expected a (3, H, W) or (B, 3, H, W) RGB tensor, got {tuple(images.shape)}"
            )
        unbatched = images.ndim == 3
        batch = images.unsqueeze(0) if unbatched else images
        n, _, height, width = batch.shape
        od = optical_density(batch.reshape(n, 3, -1))
        target = torch.tensor(self.target.stain_matrix, dtype=od.dtype, device=od.device)
        target_max = torch.tensor(self.target.max_concentrations, dtype=od.dtype, device=od.device)
        out_od = od.clone()
        keep = torch.zeros(n, dtype=torch.bool, device=od.device)  # tiles left unchanged
        for i in range(n):
            tissue_mask = tissue_pixels(od[i])
            fraction = float(tissue_mask.float().mean())
            problem = None if fraction >= self.min_tissue else "too little tissue"
            stains = target
            if problem is None:
                stains, problem = _stain_vectors(od[i][:, tissue_mask])
            if problem is not None:
                self.counts[problem] += 1
                if self.fallback == "unchanged":
                    keep[i] = True
                    continue
                stains = target
            concentrations = _concentrations(od[i], stains)
            tissue = concentrations[:, tissue_mask] if bool(tissue_mask.any()) else concentrations
            maxima = torch.quantile(tissue, MAX_CONCENTRATION_PERCENTILE / 100.0, dim=1)
            if problem is None and bool((maxima < 0.1 * target_max).any()):
                # a faint stain would be amplified ten-fold or more: noise, not tissue
                self.counts["faint stain"] += 1
                if self.fallback == "unchanged":
                    keep[i] = True
                    continue
            # a fallback tile keeps its strengths: only its colours move to the target's
            scale = torch.ones_like(maxima) if problem else target_max / maxima.clamp_min(1e-6)
            out_od[i] = target.T @ (concentrations * scale[:, None])
        light = 255.0 * torch.exp(-out_od)
        light = torch.nan_to_num(light, nan=255.0).clamp(0.0, 255.0)
        if images.dtype == torch.uint8:
            result = light.round().to(torch.uint8)
        else:
            result = (light / 255.0).to(images.dtype)
        result = result.reshape(n, 3, height, width)
        result[keep] = batch[keep]
        return result[0] if unbatched else result

    def __repr__(self) -> str:
        return f"MacenkoNormalizer(stains={self.target.stain_matrix}, fallback={self.fallback})"
