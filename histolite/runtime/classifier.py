"""Run an exported model with ONNX Runtime and NumPy only (no torch): the serving path.

An exported model folder holds ``model.onnx`` and ``model.json`` (the model card), plus
``stain.onnx`` when the model normalises stain. Each patch goes through the training order:
crop -> stain (uint8, at the patch's own resolution) -> bilinear resize to the model's input ->
``model.onnx`` (float32 RGB in [0, 1], (N, 3, S, S)) -> class probabilities. Reinhard runs
through the training path's own OpenCV kernel (``stain.reinhard_uint8``) when OpenCV is
installed, so served probabilities equal ``evaluate``'s; ``stain.onnx`` (a few 8-bit levels
apart) serves installs without OpenCV, and every other normaliser. Images larger than one patch
are cut into the card's grid and the patch probabilities are averaged, which also gives a
per-patch heatmap. Graphs with a ``cam`` output (``export.graph.CamServingGraph``) also give
each image's Grad-CAM as a grid in image pixels.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from histolite.data.images import ImageTooLarge
from histolite.data.patches import bag_positions, grid_positions
from histolite.errors import HistoliteError
from histolite.runtime.cam import CamCanvas, CamGrid
from histolite.runtime.card import (
    MIL_HEAD_FILE,
    MODEL_FILE,
    STAIN_FILE,
    load_card,
    require_current_calibration,
    verify_graphs,
)
from histolite.runtime.preprocess import CropStain, crops_to_batch, grid_crops
from histolite.stain.reinhard_uint8 import (
    DEFAULT_BACKGROUND_LIGHTNESS,
    ReinhardCrops,
    opencv_available,
)
from histolite.uncertainty import UncertaintyPolicy, score

DEFAULT_MAX_INSTANCES = 4096  # patches per bag when a card sets no bound (exports before 3)


@dataclass(frozen=True)
class Prediction:
    """Image probabilities plus what is behind them: the patch grid (classifiers) or the
    attention each patch got (attention-MIL bag models)."""

    probabilities: np.ndarray  # (C,)
    patch_probabilities: np.ndarray  # (rows, cols, C); (0, 0, C) for bag models
    patch_size: int
    stride: int
    attention: list[tuple[int, int, float]] | None = None  # bag models: (y, x, weight) per patch
    explanation: CamGrid | None = None  # classifiers whose graph has a ``cam`` output
    # confidence, entropy, uncertain, ood_score, out_of_distribution (UncertaintyPolicy.assess)
    uncertainty: dict[str, Any] = field(default_factory=dict)

    def top_class(self) -> int:
        return int(self.probabilities.argmax())


def _providers(device: str) -> list[str]:
    """ONNX Runtime providers for ``cpu``, ``cuda`` (an error if absent) or ``auto``."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in available:
        raise HistoliteError(
            "device cuda: this ONNX Runtime has no CUDA provider; pip install onnxruntime-gpu"
        )
    use_cuda = device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available)
    return [*(["CUDAExecutionProvider"] if use_cuda else []), "CPUExecutionProvider"]


def _open_session(path: Path, options: Any, providers: list[str]) -> Any:
    """An ONNX Runtime session, or a one-line error for a corrupt graph."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # ONNX Runtime's own error types for a corrupt graph
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HistoliteError(f"{path}: not a loadable ONNX graph ({first_line[:300]})") from exc


class StainStep:
    """``stain.onnx`` applied to uint8 crops, same-size crops in one call.

    The graph takes and returns uint8 (N, 3, H, W), as the training path's normaliser does
    (input through a 256-entry sRGB table, output rounded). Graphs exported earlier on the
    day this arrived took float in [0, 1]; they are fed and rounded here instead.
    """

    def __init__(self, session: Any, max_batch: int) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.takes_uint8 = session.get_inputs()[0].type == "tensor(uint8)"
        self.max_batch = max_batch

    def run(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, 3, H, W) -> normalised uint8 (N, 3, H, W)."""
        if self.takes_uint8:
            return np.asarray(self.session.run(None, {self.input_name: batch})[0])
        (normalised,) = self.session.run(None, {self.input_name: batch.astype(np.float32) / 255})
        return np.rint(np.clip(normalised, 0.0, 1.0) * 255.0).astype(np.uint8)

    def __call__(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, crop in enumerate(crops):
            by_shape.setdefault(crop.shape, []).append(i)
        result: list[np.ndarray] = list(crops)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.max_batch):
                chunk = indices[start : start + self.max_batch]
                batch = np.stack([crops[i] for i in chunk]).transpose(0, 3, 1, 2)
                pixels = self.run(np.ascontiguousarray(batch))
                for i, image in zip(chunk, pixels.transpose(0, 2, 3, 1), strict=True):
                    result[i] = image
        return result


def _stain_step(
    card: dict[str, Any], open_graph: Callable[[], Any], max_batch: int, threads: int | None
) -> tuple[CropStain | None, str | None]:
    """The crops' stain step and its name: ``opencv``, ``onnx`` or None (no stain step).

    Older exports carried Reinhard inside ``model.onnx``: their cards name no stain graph.
    """
    if card.get("stain_graph") is None:
        return None, None
    stain = card.get("stain") or {}
    if stain.get("method") == "reinhard" and opencv_available():
        return (
            ReinhardCrops(
                stain["mean"],
                stain["std"],
                ignore_background=bool(stain.get("ignore_background", False)),
                background_lightness=float(
                    stain.get("background_lightness", DEFAULT_BACKGROUND_LIGHTNESS)
                ),
                # as many threads as ONNX Runtime is given (its default: every core)
                threads=threads or (os.cpu_count() or 1),
            ),
            "opencv",
        )
    return StainStep(open_graph(), max_batch), "onnx"


class OnnxClassifier:
    """ONNX Runtime sessions shared by all requests (``run`` is thread-safe)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        threads: int | None = None,
        max_batch: int = 16,
        card: dict[str, Any] | None = None,
        device: str = "cpu",
    ) -> None:
        """``max_batch``: patches per ONNX Runtime call. Runtime's arena keeps the largest
        call's activations: on a Kather student a 16 Mpx upload cost 415 MB at 64 and 130 MB
        at 16 (``benchmarks/decode_memory.py``).

        ``card``: use this model card instead of reading ``model.json`` (export staging).

        ``device``: ``cpu``, ``cuda`` (ONNX Runtime's CUDA provider, an error if absent) or
        ``auto`` (CUDA when the installed ONNX Runtime offers it, else CPU).
        """
        import onnxruntime as ort

        self.model_dir = Path(model_dir)
        self.card = card if card is not None else load_card(self.model_dir)
        path = self.model_dir / MODEL_FILE
        # a card handed in is export's staging copy: its hashes are written after parity
        verify_graphs(self.model_dir, self.card, hashes=card is None)
        if card is None:
            require_current_calibration(self.model_dir, self.card)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = _providers(device)
        self.device = "cuda" if "CUDAExecutionProvider" in providers else "cpu"

        def side_graph(key: str, name: str) -> Any:
            if self.card.get(key) is None:
                return None
            return _open_session(self.model_dir / name, options, providers)

        self.session = _open_session(path, options, providers)
        self.stain, self.stain_kernel = _stain_step(
            self.card, lambda: side_graph("stain_graph", STAIN_FILE), max_batch, threads
        )
        # bag models since card format 3: patches in chunks through model.onnx, then this
        self.mil_head = side_graph("mil_head", MIL_HEAD_FILE)
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        # older exports and non-GAP heads have no ``cam`` output: they answer without one
        self.has_cam = "cam" in outputs
        self._probabilities = outputs[:1]
        self.policy = UncertaintyPolicy.from_card(self.card)
        # graphs exported before the logits output cannot give a logit-based score
        self._logits = "logits" in outputs and self.policy.needs_logits
        self.classes: list[str] = list(self.card["classes"])
        self.input_size = int(self.card["input_size"])
        self.patch_size = int(self.card["patch_size"])
        self.stride = int(self.card["patch_stride"])
        self.is_bag_model = self.card.get("kind") == "mil"
        mil = self.card.get("mil") or {}
        self.min_tissue = float(mil.get("min_tissue", 0.0))
        # a bag's work per request: older cards set no bound, so the default one applies
        self.max_instances = int(mil.get("max_instances", DEFAULT_MAX_INSTANCES))
        self.max_image_pixels = int(
            mil.get("max_image_pixels", self.max_instances * self.stride * self.stride)
        )
        self.max_batch = max_batch
        self._ready = threading.Event()
        self.warm_up()

    def warm_up(self) -> None:
        dummy = np.full((1, 3, self.input_size, self.input_size), 0.8, dtype=np.float32)
        if self.stain is not None:
            self.stain([np.full((self.patch_size, self.patch_size, 3), 200, dtype=np.uint8)])
        outputs = self.session.run(None, {self.input_name: dummy})
        if self.mil_head is not None:  # the instance graph's embeddings and scores, pooled
            self.mil_head.run(None, {"embeddings": outputs[0], "scores": outputs[1]})
        self._ready.set()

    @property
    def calibrated(self) -> bool:
        """Whether the graph's logits were calibrated (``histolite calibrate`` before export)."""
        return bool((self.card.get("calibration") or {}).get("method"))

    def to_batch(self, crops: list[np.ndarray]) -> np.ndarray:
        """uint8 crops at their own size -> the model graph's input (stain, then resize)."""
        return crops_to_batch(crops, self.input_size, self.stain)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities only (slide tiles, benchmarks): a ``cam`` output is not fetched."""
        feed, step = self.input_name, self.max_batch
        chunks = [
            self.session.run(self._probabilities, {feed: batch[i : i + step]})[0]
            for i in range(0, len(batch), step)
        ]
        return np.concatenate(chunks).astype(np.float64)

    def _ood_values(self, probabilities: np.ndarray, logits: np.ndarray | None) -> np.ndarray:
        """The card's out-of-distribution score of each row (NaN when it cannot be computed)."""
        name = self.policy.ood_score
        if name is None or (self.policy.needs_logits and logits is None):
            return np.full(len(probabilities), np.nan)
        return score(name, probabilities, logits)

    def _assess(self, probabilities: np.ndarray, ood_values: np.ndarray) -> dict[str, Any]:
        value = float(np.mean(ood_values)) if len(ood_values) else float("nan")
        return self.policy.assess(probabilities, None if np.isnan(value) else value)

    def _bag_outputs(
        self, pixels: np.ndarray, positions: list[tuple[int, int]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(probabilities (C,), attention (N,), logits (C,) or None) of one bag.

        Card format 3: the patches go through ``model.onnx`` ``max_batch`` at a time and only
        their embeddings and scores are kept, so memory stays that of one chunk whatever the
        image; ``mil_head.onnx`` then pools the whole bag. Older exports are one graph.
        """
        size = self.patch_size
        crops = [pixels[y : y + size, x : x + size] for y, x in positions]
        if self.mil_head is None:  # an older single-graph export: the whole bag at once
            names = ["probabilities", "attention", *(["logits"] if self._logits else [])]
            outputs = self.session.run(names, {self.input_name: self.to_batch(crops)})
        else:
            embeddings, scores = [], []
            for start in range(0, len(crops), self.max_batch):
                batch = self.to_batch(crops[start : start + self.max_batch])
                h, s = self.session.run(["embeddings", "scores"], {self.input_name: batch})
                embeddings.append(h)
                scores.append(s)
            feed = {"embeddings": np.concatenate(embeddings), "scores": np.concatenate(scores)}
            outputs = self.mil_head.run(["probabilities", "attention", "logits"], feed)
        logits = outputs[2][0].astype(np.float64) if len(outputs) > 2 else None
        return outputs[0][0].astype(np.float64), outputs[1].astype(np.float64), logits

    def _require_bag_size(self, pixels: np.ndarray, count: int | None = None) -> None:
        """A bag's work is bounded per model: its card's pixels per image and patches per bag."""
        height, width = pixels.shape[:2]
        if height * width > self.max_image_pixels:
            raise ImageTooLarge(
                f"image of {width} x {height} pixels: this bag model takes at most "
                f"{self.max_image_pixels} pixels ({self.max_instances} patches of its grid)"
            )
        if count is not None and count > self.max_instances:
            raise ImageTooLarge(
                f"the image makes a bag of {count} patches: this model takes at most "
                f"{self.max_instances}"
            )

    def predict(self, pixels: np.ndarray) -> Prediction:
        """Probabilities for one HxWx3 uint8 image (a bag of its patches for bag models)."""
        if self.is_bag_model:
            self._require_bag_size(pixels)
            positions = bag_positions(pixels, self.patch_size, self.stride, self.min_tissue)
            self._require_bag_size(pixels, len(positions))
            probabilities, attention, logits = self._bag_outputs(pixels, positions)
            ood = self._ood_values(probabilities[None], None if logits is None else logits[None])
            return Prediction(
                probabilities=probabilities,
                patch_probabilities=np.zeros((0, 0, len(self.classes))),
                patch_size=self.patch_size,
                stride=self.stride,
                attention=[
                    (y, x, float(w)) for (y, x), w in zip(positions, attention, strict=True)
                ],
                uncertainty=self._assess(probabilities, ood),
            )
        # one batch of patches at a time: memory stays flat in image size (a 60 Mpx upload
        # would otherwise hold ~2,700 float patches, 400 MB, at once)
        crops, (rows, cols) = grid_crops(pixels, self.patch_size, self.stride)
        probs, ood, explanation = self._predict_patches(pixels, crops)
        mean = probs.mean(axis=0)
        return Prediction(
            probabilities=mean,
            patch_probabilities=probs.reshape(rows, cols, -1),
            patch_size=self.patch_size,
            stride=self.stride,
            explanation=explanation,
            uncertainty=self._assess(mean, ood),
        )

    def _predict_patches(
        self, pixels: np.ndarray, crops: list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, CamGrid | None]:
        """Patch probabilities, their out-of-distribution scores and (graphs with ``cam``) the
        Grad-CAM grid of the image-level class (the class the answer names, as ``explain.py``
        explains it), one batch of patches at a time."""
        names = [
            "probabilities",
            *(["cam"] if self.has_cam else []),
            *(["logits"] if self._logits else []),
        ]
        canvas = self._cam_canvas(pixels) if self.has_cam else None
        probs, scores = [], []
        for i in range(0, len(crops), self.max_batch):
            batch = self.to_batch(crops[i : i + self.max_batch])
            run = self.session.run(names, {self.input_name: batch})
            outputs = dict(zip(names, run, strict=True))
            chunk = outputs["probabilities"].astype(np.float64)
            probs.append(chunk)
            scores.append(self._ood_values(chunk, outputs.get("logits")))
            if canvas is not None:
                canvas.add(outputs["cam"])
        patch_probs = np.concatenate(probs)
        explanation = None
        if canvas is not None:
            explanation = canvas.grid(int(patch_probs.mean(axis=0).argmax()))
        return patch_probs, np.concatenate(scores), explanation

    def _cam_canvas(self, pixels: np.ndarray) -> CamCanvas:
        height, width = pixels.shape[:2]
        size = self.patch_size
        positions = grid_positions(height, width, size, self.stride)
        boxes = [(y, x, size, size) for y, x in positions] or [(0, 0, height, width)]
        return CamCanvas(boxes, self.stride if positions else None)
