"""sRGB <-> CIELAB (D65) in batched torch, numerically matching scikit-image's conversion.

CIELAB is an affine function of f = (f(X/Xn), f(Y/Yn), f(Z/Zn)):
``Lab = F_TO_LAB @ f + LAB_OFFSET``. Working on f lets Reinhard normalisation fold its
per-channel Lab affine map into one 3x3 matrix per image (see ``reinhard.py``), which saves
most full-image passes; the public helpers here are used for statistics and tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

# sRGB (linear) -> XYZ and the D65 2-degree white, as in scikit-image.
_RGB_TO_XYZ = torch.tensor(
    [[0.412453, 0.357580, 0.180423],
     [0.212671, 0.715160, 0.072169],
     [0.019334, 0.119193, 0.950227]],
    dtype=torch.float64,
)  # fmt: skip
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
# linear RGB -> white-normalised XYZ, and back
RGB_TO_XYZN = _RGB_TO_XYZ / _WHITE_D65[:, None]
XYZN_TO_RGB = torch.linalg.inv(RGB_TO_XYZN)
# f -> Lab: L = 116 fy - 16, a = 500 (fx - fy), b = 200 (fy - fz)
F_TO_LAB = torch.tensor(
    [[0.0, 116.0, 0.0], [500.0, -500.0, 0.0], [0.0, 200.0, -200.0]], dtype=torch.float64
)
LAB_TO_F = torch.linalg.inv(F_TO_LAB)
LAB_OFFSET = torch.tensor([-16.0, 0.0, 0.0], dtype=torch.float64)

_EPSILON = 0.008856
_SLOPE = 7.787
_OFFSET = 16.0 / 116.0
_F_EPSILON = 0.2068966  # f at the knee


def _srgb_lut() -> Tensor:
    values = torch.arange(256, dtype=torch.float64) / 255.0
    return torch.where(values > 0.04045, ((values + 0.055) / 1.055) ** 2.4, values / 12.92)


SRGB_TO_LINEAR_LUT = _srgb_lut()


def mix(matrix: Tensor, flat: Tensor) -> Tensor:
    """Apply a (3, 3) or per-image (B, 3, 3) colour matrix to (B, 3, N) pixels."""
    return torch.matmul(matrix.to(flat), flat)


# The three piecewise curves below are continuous at their knees, so each is written as
# curve(max(x, knee)) + line(min(x, knee)) - line(knee) instead of torch.where: the same values,
# but elementwise max/min are vectorised in ONNX Runtime, where `Where` took a third of the
# stain graph's time.


def linearize(rgb: Tensor) -> Tensor:
    """sRGB -> linear RGB; uint8 input goes through a 256-entry table (exact and fast)."""
    if rgb.dtype == torch.uint8:
        lut = SRGB_TO_LINEAR_LUT.to(device=rgb.device, dtype=torch.float32)
        return lut.take(rgb.long())
    knee = 0.04045
    high = rgb.clamp_min(knee).add_(0.055).div_(1.055).pow_(2.4)
    return high.add_(rgb.clamp_max(knee).sub_(knee).div_(12.92))


def delinearize(linear: Tensor) -> Tensor:
    """Linear RGB -> sRGB clipped to [0, 1]."""
    knee = 0.0031308
    high = linear.clamp_min(knee).pow_(1.0 / 2.4).mul_(1.055).sub_(0.055)
    return high.add_(linear.clamp_max(knee).sub_(knee).mul_(12.92)).clamp_(0.0, 1.0)


def lab_f(xyz_normalised: Tensor) -> Tensor:
    """CIELAB's companding function f(t), elementwise."""
    cube_root = xyz_normalised.clamp_min(_EPSILON).pow_(1.0 / 3.0)
    return cube_root.add_(xyz_normalised.clamp_max(_EPSILON).sub_(_EPSILON).mul_(_SLOPE))


def lab_f_inverse(f: Tensor) -> Tensor:
    above = f.clamp_min(_F_EPSILON)
    cube = above * above * above
    return cube.add_(f.clamp_max(_F_EPSILON).sub_(_F_EPSILON).div_(_SLOPE))


def rgb_to_f(rgb: Tensor) -> Tensor:
    """(B, 3, N) sRGB (uint8, or float in [0, 1]) -> f of CIELAB, (B, 3, N)."""
    return lab_f(mix(RGB_TO_XYZN, linearize(rgb)))


def f_to_rgb(f: Tensor) -> Tensor:
    """(B, 3, N) f of CIELAB -> float sRGB in [0, 1]. fz is floored at 0 as scikit-image does."""
    f = f.clone()
    f[:, 2].clamp_min_(0.0)
    return delinearize(mix(XYZN_TO_RGB, lab_f_inverse(f)))


def _flatten(image: Tensor) -> tuple[Tensor, torch.Size]:
    if image.shape[-3] != 3:
        raise ValueError(f"expected (..., 3, H, W), got {tuple(image.shape)}")
    return image.reshape(-1, 3, image.shape[-2] * image.shape[-1]), image.shape


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """(..., 3, H, W) sRGB (uint8, or float in [0, 1]) -> CIELAB (L in [0, 100])."""
    flat, shape = _flatten(rgb)
    f = rgb_to_f(
        flat if rgb.dtype == torch.uint8 else flat.to(torch.promote_types(rgb.dtype, torch.float32))
    )
    lab = mix(F_TO_LAB, f) + LAB_OFFSET.to(f).view(3, 1)
    return lab.reshape(shape)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """(..., 3, H, W) CIELAB -> float sRGB clipped to [0, 1]."""
    flat, shape = _flatten(lab)
    f = mix(LAB_TO_F, flat - LAB_OFFSET.to(flat).view(3, 1))
    return f_to_rgb(f).reshape(shape)
