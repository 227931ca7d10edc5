"""A frozen distillation teacher that labels the student's batches, in PyTorch or ONNX Runtime.

The teacher runs on every augmented batch the student sees ("consistent" teaching, Beyer et al.
2022), so its forward pass is the largest cost of distillation on a CPU. ONNX Runtime runs the
same graph faster on CPU than eager PyTorch (depthwise convolutions in particular; see
BENCHMARKS.md), so ``distill.teacher_runtime: onnx`` exports each teacher checkpoint once to a
temporary ONNX file and labels batches through it. On a GPU the PyTorch teacher stays on the
device and needs no copies.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from histolite.models import NormalizedClassifier
from histolite.models.loading import model_state_from_checkpoint
from histolite.runspec import RunDir

ONNX_OPSET = 17


class Teacher(Protocol):
    """Logits of a batch of float RGB images in [0, 1] (B, 3, H, W)."""

    def load(self, checkpoint: Path) -> None: ...

    def __call__(self, x: Tensor) -> Tensor: ...


class TorchTeacher:
    """The teacher as a PyTorch module in eval mode, on the student's device."""

    def __init__(self, model: NormalizedClassifier, channels_last: bool) -> None:
        self.model = model.requires_grad_(False).eval()
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    def load(self, checkpoint: Path) -> None:
        self.model.load_state_dict(model_state_from_checkpoint(checkpoint))

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        self.model.to(x.device).eval()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)


class OnnxTeacher:
    """The teacher exported to ONNX (FP32) and run by ONNX Runtime on the CPU.

    Each checkpoint is exported once when it is loaded; the file lives in a temporary folder
    that is removed with the object.
    """

    def __init__(self, model: NormalizedClassifier, image_size: int, threads: int = 0) -> None:
        self.model = model.requires_grad_(False).eval().cpu()
        self.image_size = image_size
        self.threads = threads or torch.get_num_threads()
        self._folder = tempfile.TemporaryDirectory(prefix="histolite-teacher-")
        self._session: object | None = None
        self._export()

    def _export(self) -> None:
        import onnxruntime as ort

        path = Path(self._folder.name) / "teacher.onnx"
        with torch.no_grad():
            torch.onnx.export(
                self.model,
                (torch.rand(1, 3, self.image_size, self.image_size),),
                str(path),
                dynamo=False,
                input_names=["image"],
                output_names=["logits"],
                opset_version=ONNX_OPSET,
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        os.remove(path)  # the session holds the graph

    def load(self, checkpoint: Path) -> None:
        self.model.load_state_dict(model_state_from_checkpoint(checkpoint))
        self._export()

    def __call__(self, x: Tensor) -> Tensor:
        assert self._session is not None
        batch = np.ascontiguousarray(x.detach().float().cpu().numpy())
        (logits,) = self._session.run(None, {"image": batch})  # type: ignore[attr-defined]
        return torch.from_numpy(logits).to(x.device)


def create_teacher(
    model: NormalizedClassifier, runtime: str, image_size: int, channels_last: bool
) -> Teacher:
    """``torch`` or ``onnx`` (CPU only: a GPU run keeps the PyTorch teacher on the device)."""
    if runtime == "onnx":
        return OnnxTeacher(model, image_size)
    return TorchTeacher(model, channels_last)


class CrossfitTeacher:
    """K fold teachers (``train.crossfit``): each image is labelled out of fold, by the teacher
    that never trained on its group, or by the mean of all K (``ensemble``).

    Ensemble targets are the log of the K teachers' mean probabilities, which work as logits
    (softmax(log p / T) is the tempered mean prediction), as the TTA teacher's do.
    """

    def __init__(self, teachers: list[Teacher], fold_dirs: list[Path], targets: str) -> None:
        if targets not in ("out_of_fold", "ensemble"):
            raise ValueError(f"unknown cross-fitted targets {targets!r}")
        self.teachers = teachers
        self.fold_dirs = fold_dirs
        self.targets = targets

    def load(self, checkpoint: Path) -> None:
        """The same checkpoint (by name: last, best, epoch_NNN) of every fold teacher."""
        for teacher, folder in zip(self.teachers, self.fold_dirs, strict=True):
            teacher.load(RunDir(folder).checkpoints / checkpoint.name)

    def labelled_rows(self, folds: Tensor | None) -> Tensor | None:
        """Which images of a batch get a teacher's target (None: all of them); out of fold,
        those whose teacher never saw their class (fold ``-1``) learn from their labels alone."""
        if self.targets == "ensemble" or folds is None:
            return None
        return folds >= 0

    def __call__(self, x: Tensor, folds: Tensor | None = None) -> Tensor:
        """Teacher logits for ``x``; out of fold, rows without a teacher (fold ``-1``) are 0."""
        if self.targets == "ensemble":
            probs = torch.stack([torch.softmax(t(x).float(), dim=1) for t in self.teachers])
            return torch.log(probs.mean(dim=0).clamp_min(1e-12))
        if folds is None:
            raise ValueError("out-of-fold targets need each image's fold")
        logits: Tensor | None = None
        for fold in torch.unique(folds).tolist():
            if fold < 0:
                continue
            rows = folds == fold
            out = self.teachers[int(fold)](x[rows])
            if logits is None:
                logits = out.new_zeros((len(x), out.shape[1]))
            logits[rows] = out
        if logits is None:
            raise ValueError("no image of this batch has an out-of-fold teacher")
        return logits
