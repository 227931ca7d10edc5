"""Bags for multiple-instance learning: an image's grid patches, or their cached features.

Bags differ in size (images differ in size, the tissue filter drops patches), so batches are
padded to the largest bag with a mask marking the real instances; this trains several bags per
step instead of the batch size of 1 common in MIL code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from histolite.data.feature_bags import load_bag
from histolite.data.folder import Sample
from histolite.data.images import load_rgb
from histolite.data.patches import bag_positions
from histolite.data.transforms import image_tensor, preprocess

TensorTransform = Callable[[Tensor], Tensor]


def cut_instances(
    pixels: np.ndarray,
    positions: Sequence[tuple[int, int]],
    size: int,
    transform: TensorTransform,
    stain: TensorTransform | None = None,
) -> Tensor:
    """(N, 3, S, S) tensor of the patches at ``positions``, stain-normalised and transformed."""
    image = image_tensor(pixels)
    return torch.stack([preprocess(image, transform, stain, (y, x, size)) for y, x in positions])


class ImageBagDataset(Dataset[tuple[Tensor, int]]):
    """Each item is one image as a bag of patch tensors (N, 3, S, S) and the image's label.

    Args:
        max_instances: when set, a random subset of that many patches per bag and epoch:
            bounds memory on large images and acts as augmentation.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        size: int,
        stride: int,
        transform: TensorTransform,
        *,
        min_tissue: float = 0.0,
        stain: TensorTransform | None = None,
        max_instances: int | None = None,
    ) -> None:
        self.samples = list(samples)
        self.size = size
        self.stride = stride
        self.min_tissue = min_tissue
        self.transform = transform
        self.stain = stain
        self.max_instances = max_instances

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """The image's pixels and the positions of all its instances."""
        pixels = load_rgb(self.samples[index].path)
        return pixels, bag_positions(pixels, self.size, self.stride, self.min_tissue)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        pixels, positions = self.load(index)
        if self.max_instances is not None and len(positions) > self.max_instances:
            keep = np.sort(np.random.choice(len(positions), self.max_instances, replace=False))
            positions = [positions[i] for i in keep]
        bag = cut_instances(pixels, positions, self.size, self.transform, self.stain)
        return bag, self.samples[index].label


class FeatureBagDataset(Dataset[tuple[Tensor, int]]):
    """Bags of precomputed instance features (N, F), e.g. from a frozen backbone's cache."""

    def __init__(
        self, features: Sequence[Tensor], labels: Sequence[int], max_instances: int | None = None
    ) -> None:
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} feature bags but {len(labels)} labels")
        self.features = list(features)
        self.labels = list(labels)
        self.max_instances = max_instances

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return subsample(self.features[index], self.max_instances), self.labels[index]


class FeatureFileBags(Dataset[tuple[Tensor, int]]):
    """Bags read from slide feature files on demand (memory holds one batch of slides)."""

    def __init__(self, samples: Sequence[Sample], max_instances: int | None = None) -> None:
        self.samples = list(samples)
        self.max_instances = max_instances

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        bag = torch.from_numpy(load_bag(self.samples[index].path).features)
        return subsample(bag, self.max_instances), self.samples[index].label


def subsample(bag: Tensor, max_instances: int | None) -> Tensor:
    """A random subset of ``max_instances`` instances, in their original order (all if fewer)."""
    if max_instances is None or len(bag) <= max_instances:
        return bag
    keep = torch.randperm(len(bag))[:max_instances].sort().values
    return bag[keep]


def collate_bags(batch: Sequence[tuple[Tensor, int]]) -> tuple[Tensor, Tensor, Tensor]:
    """Pad bags to the largest one: (B, N_max, ...) instances, (B, N_max) mask, (B,) labels."""
    if not batch:
        raise ValueError("empty batch")
    longest = max(len(bag) for bag, _ in batch)
    first = batch[0][0]
    padded = first.new_zeros((len(batch), longest, *first.shape[1:]))
    mask = torch.zeros((len(batch), longest), dtype=torch.bool)
    for i, (bag, _) in enumerate(batch):
        if len(bag) == 0:
            raise ValueError(f"bag {i} of the batch has no instances")
        padded[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    labels = torch.tensor([label for _, label in batch], dtype=torch.long)
    return padded, mask, labels
