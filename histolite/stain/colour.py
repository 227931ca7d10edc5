"""sRGB <-> CIELAB (D65) in batched torch, numerically matching scikit-image's conversion."""

from __future__ import annotations

import torch

# sRGB (linear) -> XYZ, and the D65 2-degree reference white, as used by scikit-image.
_RGB_TO_XYZ = torch.tensor(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ],
    dtype=torch.float64,
)
_XYZ_TO_RGB = torch.linalg.inv(_RGB_TO_XYZ)
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
_EPSILON = 0.008856
_KAPPA_SLOPE = 7.787
_OFFSET = 16.0 / 116.0


def _mix(image: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 colour matrix over the channel axis (dim -3) of a (..., 3, H, W) tensor."""
    return torch.einsum("ij,...jhw->...ihw", matrix.to(image), image)


def _channel_vector(vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return vector.to(like).view(3, 1, 1)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) float sRGB in [0, 1] -> CIELAB (L in [0, 100])."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = _mix(linear, _RGB_TO_XYZ) / _channel_vector(_WHITE_D65, rgb)
    f = torch.where(
        xyz > _EPSILON, xyz.clamp_min(_EPSILON) ** (1.0 / 3.0), _KAPPA_SLOPE * xyz + _OFFSET
    )
    fx, fy, fz = f.unbind(-3)
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=-3)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) CIELAB -> float sRGB clipped to [0, 1]."""
    lightness, a, b = lab.unbind(-3)
    fy = (lightness + 16.0) / 116.0
    fx = a / 500.0 + fy
    fz = (fy - b / 200.0).clamp_min(0.0)
    f = torch.stack((fx, fy, fz), dim=-3)
    xyz = torch.where(f > 0.2068966, f**3, (f - _OFFSET) / _KAPPA_SLOPE)
    linear = _mix(xyz * _channel_vector(_WHITE_D65, lab), _XYZ_TO_RGB)
    rgb = torch.where(
        linear > 0.0031308,
        1.055 * linear.clamp_min(0.0031308) ** (1.0 / 2.4) - 0.055,
        12.92 * linear,
    )
    return rgb.clamp(0.0, 1.0)
