"""Stain normalisation (Reinhard et al. 2001)."""

from histolite.stain.colour import lab_to_rgb, rgb_to_lab
from histolite.stain.reinhard import ReinhardNormalizer, ReinhardStats

__all__ = ["ReinhardNormalizer", "ReinhardStats", "lab_to_rgb", "rgb_to_lab"]
