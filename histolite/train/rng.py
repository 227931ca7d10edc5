"""Random-number state in checkpoints, so a resumed run continues the same random stream.

Lightning restores weights, optimizer, scheduler and loop counters, but not the generators that
shuffle batches and draw augmentations. Without them a resumed run is a different run: same
split and epochs, other batches. This callback stores the Python, NumPy and torch CPU generator
states in every checkpoint (as plain tensors and ints, so ``weights_only`` loading still works)
and puts them back on resume, with the stain augmenter's own generator (seeded per rank in
``setup``). With ``data.num_workers: 0`` a run killed and resumed then
repeats the uninterrupted run exactly; worker processes draw their own seeds when they start,
so with workers the augmentations after a resume differ (statistically the same).
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

KEY = "histolite_rng"


def _stain_generator(pl_module: L.LightningModule) -> torch.Generator | None:
    augment = getattr(pl_module, "batch_augment", None)
    return getattr(augment, "generator", None)


class RngState(Callback):
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        start = getattr(getattr(pl_module, "batch_augment", None), "start", None)
        if start is not None:
            start(trainer.global_rank)

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        kind, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
        version, internal, gauss_next = random.getstate()
        numpy_keys = torch.from_numpy(np.asarray(keys, dtype=np.int64))
        checkpoint[KEY] = {
            "torch": torch.get_rng_state(),
            "numpy": (str(kind), numpy_keys, int(position), int(has_gauss), float(gauss)),
            "python": (version, list(internal), gauss_next),
        }
        generator = _stain_generator(pl_module)
        if generator is not None:
            checkpoint[KEY]["stain_augment"] = generator.get_state()

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get(KEY)
        if state is None:  # a checkpoint from before this callback existed
            return
        torch.set_rng_state(state["torch"])
        kind, keys, position, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
        generator = _stain_generator(pl_module)
        if generator is not None and "stain_augment" in state:
            generator.set_state(state["stain_augment"])
