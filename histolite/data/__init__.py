"""Datasets, splits, patches, transforms and the built-in synthetic data."""

from histolite.data.folder import LabelledImages, Sample, scan_image_folder
from histolite.data.images import IMAGE_EXTENSIONS, load_rgb

__all__ = ["IMAGE_EXTENSIONS", "LabelledImages", "Sample", "load_rgb", "scan_image_folder"]
