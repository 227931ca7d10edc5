"""Stain normalisation (Reinhard et al. 2001; Macenko et al. 2009) and stain augmentation.

Names are imported on first use: ``histolite.stain.reinhard_uint8`` is NumPy and OpenCV only,
and the torch-free runtime imports it without pulling torch in through this package.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from histolite.stain.colour import lab_to_rgb, rgb_to_lab
    from histolite.stain.reinhard import ReinhardNormalizer, ReinhardStats

__all__ = ["ReinhardNormalizer", "ReinhardStats", "lab_to_rgb", "rgb_to_lab"]

_HOMES = {
    "ReinhardNormalizer": "histolite.stain.reinhard",
    "ReinhardStats": "histolite.stain.reinhard",
    "lab_to_rgb": "histolite.stain.colour",
    "rgb_to_lab": "histolite.stain.colour",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'histolite.stain' has no attribute {name!r}")
    return getattr(import_module(home), name)
