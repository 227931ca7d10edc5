"""From config to ready-to-train data: scan or read the split, check images, normalisation stats."""

from __future__ import annotations

import os
from collections.abc import Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import lightning as L
from torch.utils.data import DataLoader, Dataset

from histolite.config import AugmentConfig, DataConfig
from histolite.data.check import check_images
from histolite.data.datasets import ImageDataset, TensorTransform
from histolite.data.folder import Sample
from histolite.data.patches import index_patches
from histolite.data.split_policy import Split, load_split
from histolite.data.transforms import build_eval_transform, build_train_transform, compute_mean_std
from histolite.errors import DataError
from histolite.models import pretrained_mean_std
from histolite.runinfo import fingerprint_files
from histolite.runspec import StainSpec
from histolite.stain import ReinhardNormalizer
from histolite.stain.macenko import MacenkoNormalizer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class PreparedData:
    """The run's split, read once and checked, plus the files skipped as unreadable."""

    split: Split
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.split.classes

    @property
    def splits(self) -> dict[str, list[Sample]]:
        return self.split.parts

    @property
    def split_report(self) -> dict[str, object]:
        return self.split.report

    @property
    def all_samples(self) -> list[Sample]:
        return self.split.all_samples

    def split_names(self) -> list[str]:
        return self.split.split_names()

    def fingerprint(self) -> str:
        root = os.path.commonpath([str(s.path.resolve().parent) for s in self.all_samples])
        return fingerprint_files(
            (f"{os.path.relpath(s.path.resolve(), root)}|{split}", s.class_name)
            for s, split in zip(self.all_samples, self.split_names(), strict=True)
        )


def prepare_data(
    cfg: DataConfig, seed: int, *, progress: bool = True, split: Split | None = None
) -> PreparedData:
    """Load the split (or take the given one) and read every image once.

    Unreadable files stop the run unless ``data.skip_unreadable`` is set.
    """
    split = split if split is not None else load_split(cfg, seed)
    report = check_images(split.all_samples, split.classes, progress=progress)
    skipped: list[tuple[str, str]] = []
    if report.problems:
        listing = "\n".join(f"  {p}: {why}" for p, why in report.problems[:20])
        more = len(report.problems) - 20
        if not cfg.skip_unreadable:
            raise DataError(
                f"{len(report.problems)} unreadable image(s):\n{listing}"
                + (f"\n  ... and {more} more" if more > 0 else "")
                + "\nfix or remove them, or set data.skip_unreadable=true to train without them"
            )
        skipped = [(str(p), why) for p, why in report.problems]
        split = split.without({p for p, _ in report.problems})
    if not split.parts["train"]:
        raise DataError("the training split is empty; check data.root / data.split_csv")
    return PreparedData(split=split, skipped=skipped)


def build_stain(cfg: DataConfig) -> ReinhardNormalizer | MacenkoNormalizer | None:
    """The configured stain normaliser (uint8 tiles in, uint8 out), or None."""
    if cfg.stain is None:
        return None
    if cfg.stain.method == "macenko":
        return MacenkoNormalizer.from_file(
            cfg.stain.target, fallback=cfg.stain.fallback, min_tissue=cfg.stain.min_tissue
        )
    return ReinhardNormalizer.from_file(
        cfg.stain.target, ignore_background=cfg.stain.ignore_background
    )


def make_dataset(
    samples: Sequence[Sample],
    cfg: DataConfig,
    transform: TensorTransform,
    stain: TensorTransform | None,
) -> ImageDataset:
    patches = None
    if cfg.patches is not None:
        patches = index_patches(samples, cfg.patches.spec())
    return ImageDataset(samples, transform, stain=stain, patches=patches)


def normalisation_stats(
    cfg: DataConfig, train: Sequence[Sample], stain: TensorTransform | None, model_name: str
) -> tuple[list[float], list[float]]:
    """Input mean/std the model will carry (``data.normalize``)."""
    if cfg.normalize == "imagenet":
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    if cfg.normalize == "model":
        mean, std = pretrained_mean_std(model_name)
        return list(mean), list(std)
    if cfg.normalize == "none":
        return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    dataset = make_dataset(train, cfg, build_eval_transform(cfg.image_size), stain)
    return compute_mean_std(dataset, cfg.mean_std_samples, num_workers=cfg.num_workers)


class ImageDataModule(L.LightningDataModule):
    """Train (augmented, shuffled) and validation loaders over prepared samples."""

    def __init__(
        self,
        prepared: PreparedData,
        cfg: DataConfig,
        augment: AugmentConfig,
        stain: TensorTransform | None,
        train_image_size: int | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        train_transform = build_train_transform(train_image_size or cfg.image_size, augment)
        # a Dataset: distillation from cross-fitted teachers wraps it to tag each item's fold
        self.train_set: Dataset[Any] = make_dataset(
            prepared.splits["train"], cfg, train_transform, stain
        )
        self.val_set = (
            make_dataset(prepared.splits["val"], cfg, build_eval_transform(cfg.image_size), stain)
            if prepared.splits["val"]
            else None
        )

    def _loader(self, dataset: Dataset[Any], shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            shuffle=shuffle,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
            drop_last=shuffle and len(cast(Sized, dataset)) > self.cfg.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []


def stain_spec(cfg: DataConfig) -> StainSpec | None:
    """The stain target as saved statistics, so inference needs no reference image."""
    normalizer = build_stain(cfg)
    if normalizer is None:
        return None
    assert cfg.stain is not None
    source = str(Path(cfg.stain.target))
    if isinstance(normalizer, MacenkoNormalizer):
        return StainSpec(
            method="macenko",
            colour_space="optical density",
            source=source,
            stain_matrix=normalizer.target.stain_matrix,
            max_concentrations=normalizer.target.max_concentrations,
            fallback=cfg.stain.fallback,
            min_tissue=cfg.stain.min_tissue,
        )
    return StainSpec(
        mean=tuple(normalizer.target.mean),
        std=tuple(normalizer.target.std),
        ignore_background=cfg.stain.ignore_background,
        source=source,
    )
