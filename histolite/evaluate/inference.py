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
    """Per item (image or patch): probabilities, logits, true label, and source image index.

    ``logits`` are the model's (calibrated when the run is); with test-time augmentation they
    are the mean over the views, while ``probs`` is the mean of the views' softmax.
    """

    probs: np.ndarray
    labels: np.ndarray
    image_index: np.ndarray
    patch_level: bool
    logits: np.ndarray | None = None


def class_scores(
    model: torch.nn.Module, x: torch.Tensor, tta: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax probabilities, logits); with ``tta``, averaged over the 8 dihedral views."""
    if not tta:
        logits = model(x)
        return torch.softmax(logits, dim=1), logits
    views = torch.stack([model(v) for v in dihedral_views(x)])
    return torch.softmax(views, dim=2).mean(dim=0), views.mean(dim=0)


def class_probabilities(model: torch.nn.Module, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Softmax output; with ``tta``, averaged over the 8 dihedral views of each image."""
    return class_scores(model, x, tta)[0]


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
    chunks, logit_chunks, labels = [], [], []
    with torch.inference_mode():
        for x, y in tqdm(loader, desc="predicting", disable=not progress, leave=False):
            probs, logits = class_scores(run.model, x.to(device), tta)
            chunks.append(probs.float().cpu().numpy())
            logit_chunks.append(logits.float().cpu().numpy())
            labels.append(y.numpy())
    image_index = np.array([dataset.source_index(i) for i in range(len(dataset))], dtype=np.int64)
    empty = np.zeros((0, run.spec.num_classes))
    return Predictions(
        probs=np.concatenate(chunks) if chunks else empty,
        labels=np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64),
        image_index=image_index,
        patch_level=patches is not None,
        logits=np.concatenate(logit_chunks) if logit_chunks else empty,
    )


def predict_image(run: LoadedRun, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Class probabilities for one HxWx3 uint8 image (patch mean if the run used patches)."""
    return predict_image_scores(run, pixels, batch_size)[0]


def predict_image_scores(
    run: LoadedRun, pixels: np.ndarray, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities of the image, logits of each patch or bag (N, C)), as served."""
    from histolite.data.patches import grid_positions

    if run.is_mil:
        bag = predict_bag_pixels(run, pixels)
        assert bag.logits is not None
        return bag.probs, bag.logits[None]
    transform = build_eval_transform(run.spec.image_size)
    image = image_tensor(pixels)
    boxes: list[tuple[int, int, int] | None] = [None]  # smaller than a patch: the whole image
    if run.spec.patches is not None:
        size, stride = run.spec.patches.size, run.spec.patches.step
        grid = grid_positions(image.shape[1], image.shape[2], size, stride)
        boxes = [(y, x, size) for y, x in grid] or boxes
    device = next(run.model.parameters()).device
    logits = []
    with torch.inference_mode():
        for start in range(0, len(boxes), batch_size):
            batch = torch.stack(
                [
                    preprocess(image, transform, run.stain, b)
                    for b in boxes[start : start + batch_size]
                ]
            )
            logits.append(run.model(batch.to(device)).float().cpu())
    patch_logits = torch.cat(logits)
    return torch.softmax(patch_logits, dim=1).mean(dim=0).numpy(), patch_logits.numpy()


@dataclass
class BagPrediction:
    """One image classified as a bag: class probabilities and each patch's attention weight."""

    probs: np.ndarray
    attention: np.ndarray
    positions: list[tuple[int, int]]
    patch_size: int
    logits: np.ndarray | None = None


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
    raw = logits.float().cpu().numpy()
    weights = attention.float().cpu().numpy()
    return [
        BagPrediction(probs[i], weights[i, : len(bags[i])], positions[i], size, raw[i])
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
    empty = np.zeros((0, run.spec.num_classes))
    logits = [b.logits for b in bags if b.logits is not None]
    return Predictions(
        probs=np.stack([b.probs for b in bags]) if bags else empty,
        labels=np.array([s.label for s in samples], dtype=np.int64),
        image_index=np.arange(len(samples), dtype=np.int64),
        patch_level=False,
        logits=np.stack(logits) if bags and len(logits) == len(bags) else None,
    )
