"""Reinhard on uint8 pixels with NumPy and OpenCV only: the one kernel training, evaluation,
slides and the service share.

No torch here, so the torch-free runtime (``histolite[serve]``) normalises a tile with the very
arithmetic its model was trained on; served probabilities then equal ``evaluate``'s to the
model's float rounding instead of differing by a few 8-bit levels of stain (measured: up to
4 levels and 0.03 in probability through the ONNX stain graph).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

# A flat (all-background) image has zero spread; this floor keeps the division finite.
MIN_STD = 1e-3
DEFAULT_BACKGROUND_LIGHTNESS = 88.0


def _load_cv2() -> Any:
    """OpenCV, or None when ``opencv-python-headless`` is not installed.

    Imported through a function so the type stays ``Any`` whichever OpenCV stubs are installed.
    """
    try:
        import cv2
    except ImportError:
        return None
    cv2.setNumThreads(1)  # images are spread over threads here; OpenCV's own pool only adds cost
    return cv2


_cv2: Any = _load_cv2()


def opencv_available() -> bool:
    """Whether this process can take the OpenCV path (``histolite info`` reports it)."""
    return _cv2 is not None


def reinhard_uint8(
    image: np.ndarray,
    target_mean: Sequence[float],
    target_std: Sequence[float],
    *,
    ignore_background: bool = False,
    background_lightness: float = DEFAULT_BACKGROUND_LIGHTNESS,
) -> np.ndarray:
    """One H x W x 3 uint8 image matched to the target's Lab means and spreads (uint8 out).

    OpenCV's float CIELAB conversions (SIMD; they release the GIL), the affine Lab map in one
    ``cv2.transform``, then clip and round. With ``ignore_background`` the statistics come
    from tissue (L below ``background_lightness``) and background pixels are left as they were.

    Raises:
        RuntimeError: OpenCV is not installed.
    """
    if _cv2 is None:
        raise RuntimeError(
            "the uint8 Reinhard path needs OpenCV: pip install opencv-python-headless"
        )
    rgb = image.astype(np.float32)
    rgb *= 1.0 / 255.0
    lab = _cv2.cvtColor(rgb, _cv2.COLOR_RGB2Lab)
    mask = None
    if ignore_background:
        mask = (lab[..., 0] < background_lightness).astype(np.uint8)
        if not mask.any():  # no tissue: pass through unchanged
            return image
    mean, std = _cv2.meanStdDev(lab, mask=mask)
    scale = np.asarray(target_std) / np.maximum(std.ravel(), MIN_STD)
    shift = np.asarray(target_mean) - mean.ravel() * scale
    affine = np.hstack([np.diag(scale), shift[:, None]]).astype(np.float32)
    normalised = _cv2.cvtColor(_cv2.transform(lab, affine), _cv2.COLOR_Lab2RGB)
    np.clip(normalised, 0.0, 1.0, out=normalised)
    result: np.ndarray = _cv2.convertScaleAbs(normalised, alpha=255.0)
    if mask is not None:
        result[mask == 0] = image[mask == 0]
    return result


class ReinhardCrops:
    """``reinhard_uint8`` over a list of crops of any sizes, spread over ``threads`` threads.

    The runtime's stain step for Reinhard models (a ``CropStain``): the same kernel as the
    training path's ``ReinhardNormalizer`` on CPU uint8 images.
    """

    def __init__(
        self,
        target_mean: Sequence[float],
        target_std: Sequence[float],
        *,
        ignore_background: bool = False,
        background_lightness: float = DEFAULT_BACKGROUND_LIGHTNESS,
        threads: int = 1,
    ) -> None:
        self.target_mean = tuple(float(v) for v in target_mean)
        self.target_std = tuple(float(v) for v in target_std)
        self.ignore_background = ignore_background
        self.background_lightness = background_lightness
        self.threads = max(1, threads)

    def one(self, image: np.ndarray) -> np.ndarray:
        return reinhard_uint8(
            image,
            self.target_mean,
            self.target_std,
            ignore_background=self.ignore_background,
            background_lightness=self.background_lightness,
        )

    def __call__(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        if self.threads > 1 and len(crops) > 1:
            with ThreadPoolExecutor(max_workers=min(self.threads, len(crops))) as pool:
                return list(pool.map(self.one, crops))
        return [self.one(crop) for crop in crops]
