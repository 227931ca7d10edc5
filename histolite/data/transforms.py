"""Tensor transforms (torchvision.transforms.v2) and train-set mean/std.

Samples flow as uint8 (3, H, W) tensors until the last step, which turns them into float in
[0, 1]; mean/std normalisation happens inside the model (``NormalizedClassifier``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from histolite.data.patches import resize_square

Transform = Callable[[Tensor], Tensor]


def image_tensor(pixels: np.ndarray) -> Tensor:
    """An H x W x 3 uint8 array as a (3, H, W) uint8 tensor, without copying when possible."""
    return torch.from_numpy(np.require(pixels, requirements=["C", "W"])).permute(2, 0, 1)


def preprocess(
    image: Tensor,
    transform: Transform,
    stain: Transform | None = None,
    box: tuple[int, int, int] | None = None,
) -> Tensor:
    """The one order every path uses: crop ``box`` (y, x, size) -> stain -> transform.

    Stain normalisation sees the uint8 crop at its own resolution, before any resize, in
    training, evaluation, explanation and MIL alike.
    """
    if box is not None:
        y, x, size = box
        image = image[:, y : y + size, x : x + size]
    if stain is not None:
        image = stain(image)
    return transform(image)


class RandomRot90(torch.nn.Module):
    """Rotate by a random multiple of 90 degrees: tissue has no canonical orientation."""

    def forward(self, image: Tensor) -> Tensor:
        k = int(torch.randint(0, 4, ()).item())
        return torch.rot90(image, k, dims=(-2, -1)) if k else image


def build_train_transform(image_size: int, augment: Any) -> Transform:
    """Resize (or crop and resize), then the augmentations switched on in ``augment``."""
    steps: list[Any] = [
        v2.RandomResizedCrop(image_size, scale=augment.crop_scale, antialias=True)
        if augment.crop_scale is not None
        else v2.Resize((image_size, image_size), antialias=True)
    ]
    if augment.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if augment.vflip:
        steps.append(v2.RandomVerticalFlip())
    if augment.rot90:
        steps.append(RandomRot90())
    if augment.rotation_degrees > 0:
        steps.append(v2.RandomRotation(augment.rotation_degrees, fill=255))
    jitter = augment.color_jitter
    if jitter is not None:
        steps.append(
            v2.ColorJitter(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        )
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


class ServedResize(torch.nn.Module):
    """Resize a (3, H, W) uint8 tensor exactly as the runtime does (``resize_square``).

    Evaluation measures what is served: Pillow's bilinear resize rather than torchvision's,
    which differs by up to one 8-bit level. Other input (float, batches) goes to torchvision.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, image: Tensor) -> Tensor:
        if image.dtype != torch.uint8 or image.ndim != 3 or image.device.type != "cpu":
            return v2.functional.resize(image, [self.size, self.size], antialias=True)
        if tuple(image.shape[-2:]) == (self.size, self.size):
            return image
        pixels = image.permute(1, 2, 0).numpy()
        return torch.from_numpy(resize_square(pixels, self.size).copy()).permute(2, 0, 1)


def build_eval_transform(image_size: int) -> Transform:
    return v2.Compose([ServedResize(image_size), v2.ToDtype(torch.float32, scale=True)])


def compute_mean_std(
    dataset: Dataset[tuple[Tensor, int]],
    max_samples: int = 2000,
    batch_size: int = 64,
    num_workers: int = 0,
) -> tuple[list[float], list[float]]:
    """Per-channel mean/std over up to ``max_samples`` evenly spaced images (eval transform)."""
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("cannot compute mean/std of an empty dataset")
    step = max(1, n // max_samples)
    subset = Subset(dataset, list(range(0, n, step))[:max_samples])
    loader = DataLoader(subset, batch_size=batch_size, num_workers=num_workers)
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    for images, _ in loader:
        flat = images.double().transpose(0, 1).reshape(3, -1)
        total += flat.sum(dim=1)
        total_sq += (flat**2).sum(dim=1)
        count += flat.shape[1]
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()
