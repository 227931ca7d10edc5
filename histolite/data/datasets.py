"""Torch datasets over labelled images or their grid patches."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from histolite.data.folder import Sample
from histolite.data.images import load_rgb
from histolite.data.patches import PatchRef
from histolite.data.transforms import image_tensor, preprocess

TensorTransform = Callable[[Tensor], Tensor]


class ImageDataset(Dataset[tuple[Tensor, int]]):
    """Whole images, or their patches when ``patches`` is given.

    Order of operations per item: read RGB -> crop patch -> stain normalise (uint8 in, uint8
    out) -> ``transform`` (resize, augment, to float). A few decoded images are cached per
    worker because consecutive patches often come from the same large image.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: TensorTransform,
        *,
        stain: TensorTransform | None = None,
        patches: Sequence[PatchRef] | None = None,
        cache_images: int = 8,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.stain = stain
        self.patches = list(patches) if patches is not None else None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = cache_images

    def __len__(self) -> int:
        return len(self.patches) if self.patches is not None else len(self.samples)

    def _image(self, index: int) -> np.ndarray:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        pixels = load_rgb(self.samples[index].path)
        if self._cache_size:
            self._cache[index] = pixels
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return pixels

    def source_index(self, item: int) -> int:
        """Index of the whole image an item comes from."""
        return self.patches[item].image_index if self.patches is not None else item

    def label(self, item: int) -> int:
        return self.patches[item].label if self.patches is not None else self.samples[item].label

    def __getitem__(self, item: int) -> tuple[Tensor, int]:
        if self.patches is not None:
            ref = self.patches[item]
            image = image_tensor(self._image(ref.image_index))
            return preprocess(
                image, self.transform, self.stain, (ref.y, ref.x, ref.size)
            ), ref.label
        image = image_tensor(load_rgb(self.samples[item].path))
        return preprocess(image, self.transform, self.stain), self.samples[item].label
