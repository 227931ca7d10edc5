"""Attention-MIL training: images as bags of patches, a backbone frozen (with cached features) or
fine-tuned, several padded bags per batch.

With a frozen backbone every epoch would recompute the same patch features, so they are computed
once, written to ``RUN/features/`` (or ``mil.feature_cache``) under a key of everything that
determines them, and reused by later epochs, resumed runs and other runs with the same key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from histolite.config import MILConfig, TrainConfig
from histolite.data.bags import (
    FeatureBagDataset,
    FeatureFileBags,
    ImageBagDataset,
    collate_bags,
)
from histolite.data.folder import Sample
from histolite.data.transforms import build_eval_transform, build_train_transform
from histolite.errors import ConfigError
from histolite.fileio import atomic_path
from histolite.models.mil import AttentionMIL, build_attention_mil
from histolite.runspec import RunDir, RunSpec
from histolite.train.data import PreparedData, build_stain
from histolite.train.module import ClassifierModule, module_options
from histolite.train.runner import train_run


def build_mil_model(spec: RunSpec, cfg: TrainConfig) -> AttentionMIL:
    assert spec.mil is not None
    model = build_attention_mil(
        cfg.model.name,
        spec.num_classes,
        spec.mean,
        spec.std,
        spec.mil,
        pretrained=cfg.model.pretrained,
        weights=cfg.model.weights,
    )
    if cfg.mil is not None and cfg.mil.freeze_backbone and model.encoder is not None:
        model.encoder.requires_grad_(False)
    return model


class MILModule(ClassifierModule):
    """Cross-entropy on bag labels; batches are (instances, mask, labels)."""

    def __init__(self, model: AttentionMIL, cfg: TrainConfig) -> None:
        # instances arrive as (B, N, 3, H, W): no channels-last layout for 5-D input
        options = {**module_options(cfg), "channels_last": False}
        super().__init__(model, cfg.optimizer, cfg.scheduler, **options)
        self.frozen = cfg.mil is not None and cfg.mil.freeze_backbone

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        logits, _ = self.model(x, mask)
        return logits

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, mask, y = batch
        logits = self(x, mask)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self._log_metrics("train", loss, logits, y)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, mask, y = batch
        logits = self(x, mask)
        self._log_metrics("val", F.cross_entropy(logits, y), logits, y)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        encoder = getattr(self.model, "encoder", None)
        if self.frozen and isinstance(encoder, nn.Module):
            encoder.eval()  # frozen means frozen BatchNorm statistics too


def feature_cache_key(cfg: TrainConfig, spec: RunSpec, samples: Sequence[Sample]) -> str:
    """A digest of everything the cached features depend on."""
    assert cfg.mil is not None
    weights = cfg.model.weights
    identity: dict[str, Any] = {
        "backbone": cfg.model.name,
        "pretrained": cfg.model.pretrained,
        "weights": [str(Path(weights).resolve()), Path(weights).stat().st_size]
        if weights
        else None,
        # a randomly initialised frozen backbone depends on the seed
        "seed": None if (cfg.model.pretrained or weights) else cfg.seed,
        "image_size": spec.image_size,
        "mean": spec.mean,
        "std": spec.std,
        "stain": asdict(spec.stain) if spec.stain else None,
        "patch": cfg.mil.patch.model_dump() if cfg.mil.patch else None,
        "files": [str(s.path.resolve()) for s in samples],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


@torch.inference_mode()
def compute_bag_features(
    encoder: nn.Module, bags: ImageBagDataset, *, chunk: int = 256, progress: bool, desc: str
) -> list[Tensor]:
    """Instance features (N, F) of every bag, computed in eval mode."""
    encoder.eval()
    device = next(encoder.parameters()).device
    features = []
    for index in tqdm(range(len(bags)), desc=desc, disable=not progress, unit="bag"):
        instances, _ = bags[index]
        parts = [
            encoder(instances[i : i + chunk].to(device)) for i in range(0, len(instances), chunk)
        ]
        features.append(torch.cat(parts).float().cpu())
    return features


def load_or_compute_features(
    path: Path, encoder: nn.Module, bags: ImageBagDataset, *, progress: bool, desc: str
) -> list[Tensor]:
    """Read ``path`` (an .npz without pickles) or compute and write it atomically."""
    if path.is_file():
        with np.load(path, allow_pickle=False) as stored:
            if len(stored.files) == len(bags):
                return [torch.from_numpy(stored[f"bag{i:06d}"]) for i in range(len(bags))]
    features = compute_bag_features(encoder, bags, progress=progress, desc=desc)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        arrays = {f"bag{i:06d}": f.numpy() for i, f in enumerate(features)}
        np.savez(fh, **arrays)  # type: ignore[arg-type]
    return features


class MILDataModule(L.LightningDataModule):
    """Bags for training and validation: image bags, or cached feature bags (frozen backbone)."""

    def __init__(
        self,
        prepared: PreparedData,
        cfg: TrainConfig,
        model: AttentionMIL,
        spec: RunSpec,
        cache_dir: Path,
        progress: bool,
    ) -> None:
        super().__init__()
        if cfg.mil is None:
            raise ConfigError("MIL training needs a mil section in the config")
        self.cfg = cfg
        self.mil: MILConfig = cfg.mil
        self.model = model
        self.spec = spec
        self.cache_dir = cache_dir
        self.progress = progress
        self.train_set: Dataset[tuple[Tensor, int]]
        self.val_set: Dataset[tuple[Tensor, int]] | None
        val = prepared.splits["val"]
        if self.mil.patch is None:  # slide bags: features were computed per slide already
            self.use_cache = False
            self.train_set = FeatureFileBags(prepared.splits["train"], self.mil.max_instances)
            self.val_set = FeatureFileBags(val) if val else None
            return
        self.use_cache = self.mil.freeze_backbone and self.mil.cache_features
        stain = build_stain(cfg.data)
        eval_tf = build_eval_transform(cfg.data.image_size)
        train_tf = (
            eval_tf if self.use_cache else build_train_transform(cfg.data.image_size, cfg.augment)
        )
        patch = self.mil.patch.spec()

        def bags(
            samples: list[Sample], transform: Any, max_instances: int | None
        ) -> ImageBagDataset:
            return ImageBagDataset(
                samples,
                patch.size,
                patch.step,
                transform,
                min_tissue=patch.min_tissue,
                stain=stain,
                max_instances=max_instances,
            )

        self.train_images = bags(
            prepared.splits["train"], train_tf, None if self.use_cache else self.mil.max_instances
        )
        self.val_images = bags(val, eval_tf, None) if val else None
        self.train_set = self.train_images
        self.val_set = self.val_images

    def setup(self, stage: str) -> None:
        if not self.use_cache or isinstance(self.train_set, FeatureBagDataset):
            return
        encoder = self.model.encoder
        assert encoder is not None
        if torch.cuda.is_available():  # features once on the GPU if there is one
            encoder = encoder.to("cuda")
        self.train_set = self._cached(encoder, self.train_images, "train", self.mil.max_instances)
        if self.val_images is not None:
            self.val_set = self._cached(encoder, self.val_images, "val", None)
        self.model.encoder = encoder.to("cpu")

    def _cached(
        self, encoder: nn.Module, bags: ImageBagDataset, split: str, max_instances: int | None
    ) -> FeatureBagDataset:
        key = feature_cache_key(self.cfg, self.spec, bags.samples)
        path = self.cache_dir / f"{split}-{key}.npz"
        features = load_or_compute_features(
            path, encoder, bags, progress=self.progress, desc=f"features ({split})"
        )
        return FeatureBagDataset(features, [s.label for s in bags.samples], max_instances)

    def _loader(self, dataset: Dataset[tuple[Tensor, int]], shuffle: bool) -> DataLoader:
        in_memory = isinstance(dataset, (FeatureBagDataset, FeatureFileBags))
        workers = 0 if in_memory else self.cfg.data.num_workers
        return DataLoader(
            dataset,
            batch_size=self.cfg.data.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            persistent_workers=workers > 0,
            collate_fn=collate_bags,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []


def mil_run(
    cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True
) -> Path:
    """Train an attention-MIL run into ``out`` (same run layout as ``train_run``)."""
    if cfg.mil is None:
        raise ConfigError("mil_run needs a config with a mil section")
    if cfg.mil.cache_features and not cfg.mil.freeze_backbone:
        raise ConfigError(
            "mil.cache_features needs mil.freeze_backbone=true: a fine-tuned backbone's "
            "features change every step"
        )
    out = Path(out)
    mil = cfg.mil
    cache_dir = Path(mil.feature_cache) if mil.feature_cache else RunDir(out).features

    def datamodule_builder(
        prepared: PreparedData,
        config: TrainConfig,
        spec: RunSpec,
        model: nn.Module,
        run: Path,
        show: bool,
    ) -> L.LightningDataModule:
        assert isinstance(model, AttentionMIL)
        return MILDataModule(prepared, config, model, spec, cache_dir, show)

    def module_builder(model: nn.Module, config: TrainConfig, spec: RunSpec) -> L.LightningModule:
        assert isinstance(model, AttentionMIL)
        return MILModule(model, config)

    return train_run(
        cfg,
        out,
        resume=resume,
        progress=progress,
        module_builder=module_builder,
        model_builder=build_mil_model,
        datamodule_builder=datamodule_builder,
    )
