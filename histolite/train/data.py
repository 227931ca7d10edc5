"""From config to ready-to-train data: scan or read the split, check images, normalisation stats."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from histolite.config import AugmentConfig, DataConfig
from histolite.data.check import check_images
from histolite.data.datasets import ImageDataset, TensorTransform
from histolite.data.folder import LabelledImages, Sample
from histolite.data.layouts import scan_dataset
from histolite.data.patches import index_patches
from histolite.data.registry import get_dataset
from histolite.data.splits import (
    make_split,
    read_split_csv,
    split_report,
    warn_image_level_split,
)
from histolite.data.transforms import build_eval_transform, build_train_transform, compute_mean_std
from histolite.errors import DataError
from histolite.runinfo import fingerprint_files
from histolite.stain import ReinhardNormalizer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class PreparedData:
    """Samples per split plus what the run records about them."""

    classes: tuple[str, ...]
    splits: dict[str, list[Sample]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    split_report: dict[str, object] = field(default_factory=dict)

    @property
    def all_samples(self) -> list[Sample]:
        return [s for name in ("train", "val", "test") for s in self.splits[name]]

    def split_names(self) -> list[str]:
        return [name for name in ("train", "val", "test") for _ in self.splits[name]]

    def fingerprint(self) -> str:
        root = os.path.commonpath([str(s.path.resolve().parent) for s in self.all_samples])
        return fingerprint_files(
            (f"{os.path.relpath(s.path.resolve(), root)}|{split}", s.class_name)
            for s, split in zip(self.all_samples, self.split_names(), strict=True)
        )


def resolve_split_by(cfg: DataConfig) -> str:
    """``auto`` means patient-level wherever the dataset names patients."""
    if cfg.split_by != "auto":
        return cfg.split_by
    return "group" if get_dataset(cfg.dataset).patient_level else "stratified"


def group_kind(cfg: DataConfig) -> str:
    """What a group is for this data, for reports: patient, slide, group (a user regex) or image."""
    spec = get_dataset(cfg.dataset)
    if spec.patient_level:
        return "patient"
    if cfg.group_regex:
        return "group"
    return "slide" if spec.group_regex else "image"


def load_labelled_data(
    cfg: DataConfig, seed: int
) -> tuple[tuple[str, ...], dict[str, list[Sample]], list[str]]:
    """Samples per split (from ``data.split_csv`` or by splitting ``data.root``) and warnings."""
    if cfg.split_csv is not None:
        table = read_split_csv(cfg.split_csv)
        from_csv = {name: list(table.subset(name).samples) for name in ("train", "val", "test")}
        LabelledImages(table.classes, tuple(from_csv["train"])).require_trainable(cfg.split_csv)
        return table.classes, from_csv, []
    assert cfg.root is not None
    spec = get_dataset(cfg.dataset)
    grouped = resolve_split_by(cfg) == "group"
    regex = cfg.group_regex or spec.group_regex
    if grouped and spec.layout == "class_folders" and regex is None:
        raise DataError(
            "data.split_by=group needs data.group_regex (a regex whose first group is the "
            "slide or patient id in each file name)"
        )
    images = scan_dataset(
        cfg.dataset,
        cfg.root,
        labels=cfg.labels,
        magnification=cfg.magnification,
        group_regex=regex if grouped or cfg.group_regex else None,
    )
    images.require_trainable(cfg.root)
    given = [] if grouped or not spec.patient_level else [warn_image_level_split(spec.name)]
    names = make_split(
        images,
        val=cfg.val_fraction,
        test=cfg.test_fraction,
        seed=cfg.split_seed if cfg.split_seed is not None else seed,
        grouped=grouped,
    )
    splits: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for sample, name in zip(images.samples, names, strict=True):
        splits[name].append(sample)
    return images.classes, splits, given


def prepared_split_report(
    cfg: DataConfig,
    classes: Sequence[str],
    splits: dict[str, list[Sample]],
    warnings_given: Sequence[str],
) -> dict[str, object]:
    return split_report(
        classes,
        splits,
        split_by="csv" if cfg.split_csv else resolve_split_by(cfg),
        group_kind=group_kind(cfg),
        warnings_given=warnings_given,
    )


def prepare_data(cfg: DataConfig, seed: int, *, progress: bool = True) -> PreparedData:
    """Load the split and read every image once; refuse unreadable files unless told to skip."""
    classes, splits, given = load_labelled_data(cfg, seed)
    everything = [s for part in splits.values() for s in part]
    report = check_images(everything, classes, progress=progress)
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
        bad = {p for p, _ in report.problems}
        skipped = [(str(p), why) for p, why in report.problems]
        splits = {name: [s for s in part if s.path not in bad] for name, part in splits.items()}
    if not splits["train"]:
        raise DataError("the training split is empty; check data.root / data.split_csv")
    counts = prepared_split_report(cfg, classes, splits, given)
    return PreparedData(classes=classes, splits=splits, skipped=skipped, split_report=counts)


def build_stain(cfg: DataConfig) -> ReinhardNormalizer | None:
    if cfg.stain is None:
        return None
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
        patches = index_patches(samples, cfg.patches.size, cfg.patches.step, cfg.patches.min_tissue)
    return ImageDataset(samples, transform, stain=stain, patches=patches)


def normalisation_stats(
    cfg: DataConfig, train: Sequence[Sample], stain: TensorTransform | None
) -> tuple[list[float], list[float]]:
    if cfg.normalize == "imagenet":
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
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
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.train_set = make_dataset(
            prepared.splits["train"], cfg, build_train_transform(cfg.image_size, augment), stain
        )
        self.val_set = (
            make_dataset(prepared.splits["val"], cfg, build_eval_transform(cfg.image_size), stain)
            if prepared.splits["val"]
            else None
        )

    def _loader(self, dataset: ImageDataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            shuffle=shuffle,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
            drop_last=shuffle and len(dataset) > self.cfg.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []


def stain_spec(cfg: DataConfig) -> dict[str, object] | None:
    """The stain target as saved statistics, so inference needs no reference image."""
    normalizer = build_stain(cfg)
    if normalizer is None:
        return None
    assert cfg.stain is not None
    return {
        **normalizer.target.to_dict(),
        "ignore_background": cfg.stain.ignore_background,
        "source": str(Path(cfg.stain.target)),
    }
