"""Batched prediction over images or patches, with a progress bar."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from histolite.data.bags import ImageBagDataset, collate_bags, cut_instances
from histolite.data.datasets import ImageDataset
from histolite.data.feature_bags import load_bag
from histolite.data.folder import Sample
from histolite.data.patches import bag_positions, index_patches
from histolite.data.transforms import build_eval_transform, image_tensor, preprocess
from histolite.models.loading import LoadedRun
from histolite.models.tta import dihedral_views


@dataclass
class Predictions:
    """Per item (image or patch): probabilities, true label, and source image index."""

    probs: np.ndarray
    labels: np.ndarray
    image_index: np.ndarray
    patch_level: bool


def class_probabilities(model: torch.nn.Module, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Softmax output; with ``tta``, averaged over the 8 dihedral views of each image."""
    if not tta:
        return torch.softmax(model(x), dim=1)
    return torch.stack([torch.softmax(model(v), dim=1) for v in dihedral_views(x)]).mean(dim=0)


def predict(
    run: LoadedRun,
    samples: Sequence[Sample],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    tta: bool = False,
) -> Predictions:
    """Softmax probabilities for every image, or every grid patch when the run used patches."""
    if run.is_mil:
        return bag_level_predictions(run, samples, predict_bags(run, samples, progress=progress))
    patches = None
    if run.spec.patches is not None:
        patches = index_patches(samples, run.spec.patches)
    dataset = ImageDataset(
        samples, build_eval_transform(run.spec.image_size), stain=run.stain, patches=patches
    )
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    device = next(run.model.parameters()).device
    chunks, labels = [], []
    with torch.inference_mode():
        for x, y in tqdm(loader, desc="predicting", disable=not progress, leave=False):
            chunks.append(class_probabilities(run.model, x.to(device), tta).float().cpu().numpy())
            labels.append(y.numpy())
    image_index = np.array([dataset.source_index(i) for i in range(len(dataset))], dtype=np.int64)
    return Predictions(
        probs=np.concatenate(chunks) if chunks else np.zeros((0, run.spec.num_classes)),
        labels=np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64),
        image_index=image_index,
        patch_level=patches is not None,
    )


def predict_image(run: LoadedRun, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Class probabilities for one HxWx3 uint8 image (patch mean if the run used patches)."""
    from histolite.data.patches import grid_positions

    if run.is_mil:
        return predict_bag_pixels(run, pixels).probs
    transform = build_eval_transform(run.spec.image_size)
    image = image_tensor(pixels)
    boxes: list[tuple[int, int, int] | None] = [None]  # smaller than a patch: the whole image
    if run.spec.patches is not None:
        size, stride = run.spec.patches.size, run.spec.patches.step
        grid = grid_positions(image.shape[1], image.shape[2], size, stride)
        boxes = [(y, x, size) for y, x in grid] or boxes
    device = next(run.model.parameters()).device
    probs = []
    with torch.inference_mode():
        for start in range(0, len(boxes), batch_size):
            batch = torch.stack(
                [
                    preprocess(image, transform, run.stain, b)
                    for b in boxes[start : start + batch_size]
                ]
            )
            probs.append(torch.softmax(run.model(batch.to(device)), dim=1).float().cpu())
    return torch.cat(probs).mean(dim=0).numpy()


@dataclass
class BagPrediction:
    """One image classified as a bag: class probabilities and each patch's attention weight."""

    probs: np.ndarray
    attention: np.ndarray
    positions: list[tuple[int, int]]
    patch_size: int


def _bag_dataset(run: LoadedRun, samples: Sequence[Sample]) -> ImageBagDataset:
    assert run.spec.mil is not None and run.spec.mil.patch is not None
    patch = run.spec.mil.patch
    return ImageBagDataset(
        samples,
        patch.size,
        patch.step,
        build_eval_transform(run.spec.image_size),
        min_tissue=patch.min_tissue,
        stain=run.stain,
    )


def _classify_bags(
    run: LoadedRun, bags: list[torch.Tensor], positions: list[list[tuple[int, int]]], size: int
) -> list[BagPrediction]:
    device = next(run.model.parameters()).device
    x, mask, _ = collate_bags([(bag, 0) for bag in bags])
    with torch.inference_mode():
        logits, attention = run.model(x.to(device), mask.to(device))
    probs = torch.softmax(logits, dim=1).float().cpu().numpy()
    weights = attention.float().cpu().numpy()
    return [
        BagPrediction(probs[i], weights[i, : len(bags[i])], positions[i], size)
        for i in range(len(bags))
    ]


def predict_feature_bags(
    run: LoadedRun, samples: Sequence[Sample], *, batch_size: int = 8, progress: bool = True
) -> list[BagPrediction]:
    """Slide-level probabilities and per-tile attention from slide feature files."""
    results: list[BagPrediction] = []
    for start in tqdm(
        range(0, len(samples), batch_size), desc="predicting slides", disable=not progress
    ):
        bags = [load_bag(s.path) for s in samples[start : start + batch_size]]
        tensors = [torch.from_numpy(b.features) for b in bags]
        positions = [[(int(y), int(x)) for x, y, _, _ in b.boxes] for b in bags]
        size = int(bags[0].boxes[0][2])
        results += _classify_bags(run, tensors, positions, size)
    return results


def predict_bags(
    run: LoadedRun, samples: Sequence[Sample], *, batch_size: int = 8, progress: bool = True
) -> list[BagPrediction]:
    """Bag-level probabilities and attention for every image (or slide) of an MIL run."""
    assert run.spec.mil is not None
    if run.spec.mil.precomputed:
        return predict_feature_bags(run, samples, batch_size=batch_size, progress=progress)
    dataset = _bag_dataset(run, samples)
    results: list[BagPrediction] = []
    with tqdm(total=len(dataset), desc="predicting bags", disable=not progress, leave=False) as bar:
        for start in range(0, len(dataset), batch_size):
            bags, positions = [], []
            for index in range(start, min(start + batch_size, len(dataset))):
                pixels, where = dataset.load(index)
                bags.append(
                    cut_instances(pixels, where, dataset.size, dataset.transform, dataset.stain)
                )
                positions.append(where)
            results += _classify_bags(run, bags, positions, dataset.size)
            bar.update(len(bags))
    return results


def predict_bag_pixels(run: LoadedRun, pixels: np.ndarray) -> BagPrediction:
    """One HxWx3 uint8 image through an attention-MIL run."""
    dataset = _bag_dataset(run, [])
    where = bag_positions(pixels, dataset.size, dataset.stride, dataset.min_tissue)
    bag = cut_instances(pixels, where, dataset.size, dataset.transform, dataset.stain)
    return _classify_bags(run, [bag], [where], dataset.size)[0]


def bag_level_predictions(
    run: LoadedRun, samples: Sequence[Sample], bags: Sequence[BagPrediction]
) -> Predictions:
    """Bag results in the shape the report code takes (one row per image)."""
    return Predictions(
        probs=np.stack([b.probs for b in bags]) if bags else np.zeros((0, run.spec.num_classes)),
        labels=np.array([s.label for s in samples], dtype=np.int64),
        image_index=np.arange(len(samples), dtype=np.int64),
        patch_level=False,
    )
