"""Reinhard colour transfer: match each image's per-channel Lab mean and std to a target's.

Used as H&E stain normalisation by the BACH ResNet-50 -> ResNet-8 paper. Two paths, one result:

- uint8 images on the CPU go through OpenCV's float CIELAB conversions (SIMD, ~0.8 ms per 224 px
  tile per core), when ``opencv-python-headless`` is installed;
- everything else (float input, CUDA tensors, ONNX export traces) goes through batched torch
  (``colour.py``): a (B, 3, H, W) batch in one pass, on CPU or CUDA, uint8 or float.

Both agree with scikit-image's Lab to well within 0.5/255 on real tiles (tests, BENCHMARKS.md).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from histolite.errors import DataError
from histolite.fileio import read_json, write_json
from histolite.stain import reinhard_uint8
from histolite.stain.colour import F_TO_LAB, LAB_OFFSET, LAB_TO_F, f_to_rgb, rgb_to_f, rgb_to_lab
from histolite.stain.reinhard_uint8 import MIN_STD


def opencv_available() -> bool:
    """Whether uint8 CPU images take the OpenCV fast path (asked by ``histolite info``).

    Answers from the import ``reinhard_uint8`` already made, so the report cannot disagree with
    what ``ReinhardNormalizer.__call__`` does.
    """
    return reinhard_uint8.opencv_available()


@dataclass(frozen=True)
class ReinhardStats:
    """Target Lab channel means and standard deviations."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "method": "reinhard",
            "colour_space": "CIELAB-D65",
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, data: dict[str, object], source: str = "stain target") -> ReinhardStats:
        try:
            mean = tuple(float(v) for v in data["mean"])  # type: ignore[attr-defined]
            std = tuple(float(v) for v in data["std"])  # type: ignore[attr-defined]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{source}: expected {{'mean': [L, a, b], 'std': [L, a, b]}} ({exc})"
            ) from exc
        if len(mean) != 3 or len(std) != 3 or not all(np.isfinite(mean + std)):
            raise DataError(f"{source}: mean and std need 3 finite values each")
        return cls(mean=mean, std=std)


def _as_batch(images: torch.Tensor) -> tuple[torch.Tensor, bool, bool]:
    """(B, 3, H, W) view of the input; remembers whether it was uint8 and unbatched."""
    if images.ndim not in (3, 4) or images.shape[-3] != 3:
        raise DataError(
            f"expected a (3, H, W) or (B, 3, H, W) RGB tensor, got {tuple(images.shape)}"
        )
    unbatched = images.ndim == 3
    batch = images.unsqueeze(0) if unbatched else images
    return batch, batch.dtype == torch.uint8, unbatched


def lab_statistics(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel mean and (population) std: (B, 3, 1, 1) each."""
    mean = lab.mean(dim=(-2, -1), keepdim=True)
    std = lab.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return mean, std


class ReinhardNormalizer:
    """Reinhard stain normaliser; callable as a transform on (3, H, W) or (B, 3, H, W) tensors.

    Args:
        target: the Lab statistics to match.
        ignore_background: compute statistics on tissue only (L below ``background_lightness``)
            and leave background pixels untouched, so bare glass is not tinted; a tile with no
            tissue passes through unchanged. Off by default to match the published method.
    """

    def __init__(
        self,
        target: ReinhardStats,
        *,
        ignore_background: bool = False,
        background_lightness: float = 88.0,
    ) -> None:
        self.target = target
        self.ignore_background = ignore_background
        self.background_lightness = background_lightness

    @classmethod
    def fit(cls, image: torch.Tensor | np.ndarray, **kwargs: object) -> ReinhardNormalizer:
        """Use one reference image (HxWx3 uint8 array, or a tensor) as the target."""
        tensor = (
            torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)
            if isinstance(image, np.ndarray)
            else image
        )
        batch, was_uint8, _ = _as_batch(tensor)
        batch = batch.double() / 255.0 if was_uint8 else batch.double()
        mean, std = lab_statistics(rgb_to_lab(batch))
        stats = ReinhardStats(
            mean=tuple(mean[0, :, 0, 0].tolist()),
            std=tuple(std[0, :, 0, 0].tolist()),
        )
        return cls(stats, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: object) -> ReinhardNormalizer:
        """Target from saved statistics (``.json``) or from a reference image (any other type)."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            return cls(ReinhardStats.from_dict(read_json(path), source=str(path)), **kwargs)  # type: ignore[arg-type]
        from histolite.data.images import load_rgb

        return cls.fit(load_rgb(path), **kwargs)

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.target.to_dict())

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise (3, H, W) or (B, 3, H, W); uint8 in -> uint8 out, float in -> float out."""
        if (
            images.dtype == torch.uint8
            and images.device.type == "cpu"
            and reinhard_uint8.opencv_available()
            and not torch.jit.is_tracing()
            and images.ndim in (3, 4)
            and images.shape[-3] == 3
        ):
            return self._opencv(images)
        return self.torch_normalize(images)

    def _opencv_one(self, image: np.ndarray) -> np.ndarray:
        """One H x W x 3 uint8 image through the shared OpenCV kernel (it releases the GIL)."""
        return reinhard_uint8.reinhard_uint8(
            image,
            self.target.mean,
            self.target.std,
            ignore_background=self.ignore_background,
            background_lightness=self.background_lightness,
        )

    def _opencv(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 CPU path: images spread over ``torch.get_num_threads()`` threads."""
        batch = images.unsqueeze(0) if images.ndim == 3 else images
        pixels = batch.permute(0, 2, 3, 1).contiguous().numpy()
        threads = min(len(pixels), torch.get_num_threads())
        if threads > 1:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                results = list(pool.map(self._opencv_one, pixels))
        else:
            results = [self._opencv_one(image) for image in pixels]
        tensor = torch.from_numpy(np.stack(results)).permute(0, 3, 1, 2)
        return tensor[0] if images.ndim == 3 else tensor

    def torch_normalize(
        self,
        images: torch.Tensor,
        targets: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The batched torch path (any device, uint8 or float, traceable to ONNX).

        Lab = A f + c is affine in f (see ``colour.py``), so matching Lab means and stds is
        f' = K f + k with a per-image 3x3 ``K``: one batched matmul instead of a round trip
        through Lab, and Lab statistics come from f's 3x3 covariance.
        """
        batch, was_uint8, unbatched = _as_batch(images)
        flat = batch.flatten(2)  # (n, 3, pixels); no Python sizes, so ONNX keeps H and W free
        f = rgb_to_f(flat if was_uint8 else flat.to(torch.promote_types(flat.dtype, torch.float32)))
        to_lab, to_f = F_TO_LAB.to(f), LAB_TO_F.to(f)
        offset = LAB_OFFSET.to(f)

        mask = None
        if self.ignore_background:  # tissue: L = 116 fy - 16 below the background lightness
            mask = f[:, 1:2] < (self.background_lightness + 16.0) / 116.0
            weight = mask.to(f.dtype)
            count = weight.sum(dim=-1).clamp_min(1.0)  # (n, 1)
            mean_f = (f * weight).sum(dim=-1) / count
            centred = (f - mean_f[..., None]) * weight
        else:
            # counted from the input (not from Python ints) so an ONNX trace keeps every axis free
            count = torch.ones_like(f[:, :1]).sum(dim=-1)
            mean_f = f.mean(dim=-1)
            centred = f - mean_f[..., None]
        covariance = torch.bmm(centred, centred.transpose(1, 2)) / count[..., None]
        lab_mean = mean_f @ to_lab.T + offset
        lab_var = torch.einsum("ij,njk,ik->ni", to_lab, covariance, to_lab)
        lab_std = lab_var.clamp_min(0.0).sqrt()

        if targets is None:
            target_mean = torch.tensor(self.target.mean, dtype=f.dtype, device=f.device)
            target_std = torch.tensor(self.target.std, dtype=f.dtype, device=f.device)
        else:  # one target per image (B, 3) each: random-target augmentation
            target_mean, target_std = (t.to(dtype=f.dtype, device=f.device) for t in targets)
        scale = target_std / lab_std.clamp_min(MIN_STD)  # (n, 3)
        shift = target_mean - lab_mean * scale
        matrix = (to_f * scale[:, None, :]) @ to_lab  # to_f @ diag(scale) @ to_lab
        bias = (scale * offset + shift - offset) @ to_f.T
        normalised = torch.baddbmm(bias[..., None], matrix, f)
        if mask is not None:  # background untouched; a tile without tissue passes through
            normalised = torch.where(mask, normalised, f)
        out = f_to_rgb(normalised)
        if was_uint8:
            out = out.mul_(255.0).round_().to(torch.uint8)
        out = out.reshape_as(batch)
        return out[0] if unbatched else out

    def __repr__(self) -> str:
        return f"ReinhardNormalizer(mean={self.target.mean}, std={self.target.std})"
