"""Run an exported model with ONNX Runtime and NumPy only (no torch): the serving path.

An exported model folder holds ``model.onnx`` and ``model.json`` (the model card), plus
``stain.onnx`` when the model normalises stain. Each patch goes through the training order:
crop -> stain (``stain.onnx``, uint8, at the patch's own resolution) -> bilinear
resize to the model's input -> ``model.onnx`` (float32 RGB in [0, 1], (N, 3, S, S)) -> class
probabilities. Images larger than one patch are cut into the card's grid and the patch
probabilities are averaged, which also gives a per-patch heatmap. Graphs with a ``cam`` output
(``export.graph.CamServingGraph``) also give each image's Grad-CAM as a grid in image pixels.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from histolite.data.patches import bag_positions, grid_positions, patch_grid_shape
from histolite.errors import HistoliteError

MODEL_FILE = "model.onnx"
STAIN_FILE = "stain.onnx"
CARD_FILE = "model.json"
# 2: Reinhard lives in stain.onnx, applied before the resize (1: inside model.onnx, or none)
CARD_FORMAT_VERSION = 2

# uint8 H x W x 3 crops in, the same crops stain normalised out
CropStain = Callable[[list[np.ndarray]], list[np.ndarray]]
# Grad-CAM grids have at most this many cells a side: a 60 Mpx upload would otherwise answer
# with about a million cells, far finer than the page can show.
MAX_CAM_CELLS = 128


@dataclass(frozen=True)
class CamGrid:
    """Grad-CAM of the image's class over the image: ``values[r, c]`` in [0, 1] covers image
    pixels ``[r * cell_height, (r + 1) * cell_height) x [c * cell_width, (c + 1) * cell_width)``.
    """

    values: np.ndarray  # (rows, cols) float32
    cell_height: float
    cell_width: float


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

    def top_class(self) -> int:
        return int(self.probabilities.argmax())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_card(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        raise HistoliteError(
            f"{model_dir}: not an exported model (no {CARD_FILE}); run "
            "`histolite export RUN --out MODEL_DIR` first"
        )
    try:
        card: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HistoliteError(f"{path}: not valid JSON ({exc})") from exc
    for key in ("classes", "input_size", "patch_size", "patch_stride"):
        if key not in card:
            raise HistoliteError(f"{path}: model card lacks {key!r}")
    made_by = card.get("format_version", 1)
    if not isinstance(made_by, int) or made_by > CARD_FORMAT_VERSION:
        raise HistoliteError(
            f"{path}: model card format {made_by!r} is newer than this histolite understands "
            f"(up to {CARD_FORMAT_VERSION}); upgrade histolite to serve this export"
        )
    return card


def crops_to_batch(
    crops: list[np.ndarray], input_size: int, stain: CropStain | None = None
) -> np.ndarray:
    """Crops stain normalised (at their own size), resized (bilinear) to ``input_size``, as
    float32 (N, 3, S, S) in [0, 1]."""
    if stain is not None and crops:
        crops = stain(crops)
    batch = np.empty((len(crops), 3, input_size, input_size), dtype=np.float32)
    for i, crop in enumerate(crops):
        image = Image.fromarray(np.ascontiguousarray(crop))
        if image.size != (input_size, input_size):
            image = image.resize((input_size, input_size), Image.Resampling.BILINEAR)
        batch[i] = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return batch


def bag_to_batch(
    pixels: np.ndarray,
    input_size: int,
    patch_size: int,
    stride: int,
    min_tissue: float,
    stain: CropStain | None = None,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A bag model's instances: the patches training cut (tissue filter included)."""
    positions = bag_positions(pixels, patch_size, stride, min_tissue)
    crops = [pixels[y : y + patch_size, x : x + patch_size] for y, x in positions]
    return crops_to_batch(crops, input_size, stain), positions


def grid_crops(
    pixels: np.ndarray, patch_size: int, stride: int
) -> tuple[list[np.ndarray], tuple[int, int]]:
    """Grid patches as views (or the whole image if smaller than a patch), and the grid."""
    height, width = pixels.shape[:2]
    rows, cols = patch_grid_shape(height, width, patch_size, stride)
    if rows == 0:
        return [pixels], (1, 1)
    crops = [
        pixels[y : y + patch_size, x : x + patch_size]
        for y, x in grid_positions(height, width, patch_size, stride)
    ]
    return crops, (rows, cols)


def image_to_batch(
    pixels: np.ndarray,
    input_size: int,
    patch_size: int,
    stride: int,
    stain: CropStain | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Grid patches (or the whole image if smaller than a patch), resized, as (N, 3, S, S)."""
    crops, grid = grid_crops(pixels, patch_size, stride)
    return crops_to_batch(crops, input_size, stain), grid


def _resize_maps(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, h, w) -> (C, height, width), bilinear as ``explain.py`` resizes its maps; a
    whole-factor shrink (large images' coarser grid) is a block mean, ten times faster."""
    classes, h, w = maps.shape
    if h % height == 0 and w % width == 0:
        return maps.reshape(classes, height, h // height, width, w // width).mean(axis=(2, 4))
    size = (width, height)
    return np.stack(
        [np.asarray(Image.fromarray(m).resize(size, Image.Resampling.BILINEAR)) for m in maps]
    )


def _cell_side(natural: float, stride: int) -> float:
    """A cell side at least ``natural`` that divides the stride (or is a whole number of
    strides): patch starts then fall on cell edges and every patch spans the same number of
    cells, instead of rounding each edge on its own (half-cell shifts with overlaps)."""
    if natural <= stride:
        return stride / max(1, math.floor(stride / natural))
    return float(stride * math.ceil(natural / stride))


def _cells(start: int, length: int, cell: float, limit: int) -> tuple[int, int]:
    """The grid cells a patch covers along one axis: at least one, inside the grid."""
    first = min(int(start / cell + 1e-6), limit - 1)
    return first, min(limit, first + max(1, round(length / cell)))


class CamCanvas:
    """Grad-CAM maps of a batch of patches, pasted into one coarse grid per class as they come
    (memory stays flat in image size), then read out for the image's class.

    As ``explain.py`` does: each patch's map is scaled to [0, 1] by its own maximum, overlaps
    are averaged, and the result is scaled to [0, 1]. A cell is ``patch / feature map`` image
    pixels (coarser for very large images, so that no side exceeds ``MAX_CAM_CELLS``).
    """

    def __init__(self, boxes: list[tuple[int, int, int, int]], stride: int | None = None) -> None:
        self.boxes = boxes  # (y, x, height, width) of every patch, in image pixels
        self.stride = stride or boxes[0][2]  # patch starts are multiples of it
        self.total: np.ndarray | None = None
        self.count: np.ndarray = np.zeros((0, 0), np.float32)
        self.cell = (1.0, 1.0)
        self.seen = 0

    def _start(self, classes: int, height: int, width: int) -> None:
        _, _, box_h, box_w = self.boxes[0]
        bottom = max(y + h for y, _, h, _ in self.boxes)
        right = max(x + w for _, x, _, w in self.boxes)
        cell_h, cell_w = box_h / height, box_w / width
        factor = max(1, math.ceil(max(bottom / cell_h, right / cell_w) / MAX_CAM_CELLS))
        self.cell = (
            _cell_side(cell_h * factor, self.stride),
            _cell_side(cell_w * factor, self.stride),
        )
        rows = math.ceil(bottom / self.cell[0] - 1e-6)
        cols = math.ceil(right / self.cell[1] - 1e-6)
        self.total = np.zeros((classes, rows, cols), np.float32)
        self.count = np.zeros((rows, cols), np.float32)

    def add(self, cams: np.ndarray) -> None:
        """The next patches' maps, (N, C, h, w), in the order of ``boxes``."""
        if self.total is None:
            self._start(*cams.shape[1:])
        assert self.total is not None
        (cell_h, cell_w), (rows, cols) = self.cell, self.count.shape
        top = cams.max(axis=(2, 3), keepdims=True)
        cams = np.divide(cams, top, out=np.zeros_like(cams), where=top > 0)
        for cam, (y, x, h, w) in zip(cams, self.boxes[self.seen :], strict=False):
            r0, r1 = _cells(y, h, cell_h, rows)
            c0, c1 = _cells(x, w, cell_w, cols)
            if (r1 - r0, c1 - c0) != cam.shape[1:]:
                cam = _resize_maps(cam, r1 - r0, c1 - c0)
            self.total[:, r0:r1, c0:c1] += cam
            self.count[r0:r1, c0:c1] += 1
        self.seen += len(cams)

    def grid(self, target: int) -> CamGrid:
        assert self.total is not None
        heat = np.divide(
            self.total[target], self.count, out=np.zeros_like(self.count), where=self.count > 0
        )
        heat -= heat.min()  # as explain.normalise: a flat map means nothing stands out
        top = float(heat.max())
        return CamGrid(heat / top if top > 0 else heat, *self.cell)


def _open_session(path: Path, options: Any, providers: list[str]) -> Any:
    """An ONNX Runtime session, or a one-line error for a corrupt graph."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # ONNX Runtime's own error types for a corrupt graph
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HistoliteError(f"{path}: not a loadable ONNX graph ({first_line[:300]})") from exc


def verify_graphs(model_dir: Path, card: dict[str, Any], *, hashes: bool = True) -> None:
    """The folder's graphs (``model.onnx``, and ``stain.onnx`` when the card names one) exist
    and, with ``hashes``, are the ones the card describes: a swapped or damaged file is refused.
    """
    graphs = [(MODEL_FILE, card.get("sha256"))]
    if card.get("stain_graph") is not None:  # a fixed name: the card names no paths
        graphs.append((STAIN_FILE, card["stain_graph"].get("sha256")))
    for name, expected in graphs:
        path = model_dir / name
        if not path.is_file():
            raise HistoliteError(f"{path}: model file missing")
        if hashes and expected is not None and file_sha256(path) != expected:
            raise HistoliteError(
                f"{path}: the graph is not the one its model card describes (SHA-256 differs "
                "from model.json); refusing to use a swapped or damaged model"
            )


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
        stain_graph = self.card.get("stain_graph")
        stain_path = self.model_dir / STAIN_FILE
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise HistoliteError(
                "device cuda: this ONNX Runtime has no CUDA provider; pip install onnxruntime-gpu"
            )
        use_cuda = device == "cuda" or (device == "auto" and "CUDAExecutionProvider" in available)
        providers = ["CUDAExecutionProvider"] if use_cuda else []
        providers.append("CPUExecutionProvider")
        self.session = _open_session(path, options, providers)
        # older exports carried Reinhard inside model.onnx; their cards name no stain graph
        self.stain: StainStep | None = (
            StainStep(_open_session(stain_path, options, providers), max_batch)
            if stain_graph is not None
            else None
        )
        self.device = "cuda" if use_cuda else "cpu"
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        # older exports and non-GAP heads have no ``cam`` output: they answer without one
        self.has_cam = "cam" in outputs
        self._probabilities = outputs[:1]
        self.classes: list[str] = list(self.card["classes"])
        self.input_size = int(self.card["input_size"])
        self.patch_size = int(self.card["patch_size"])
        self.stride = int(self.card["patch_stride"])
        self.is_bag_model = self.card.get("kind") == "mil"
        self.min_tissue = float((self.card.get("mil") or {}).get("min_tissue", 0.0))
        self.max_batch = max_batch
        self._ready = threading.Event()
        self.warm_up()

    def warm_up(self) -> None:
        dummy = np.full((1, 3, self.input_size, self.input_size), 0.8, dtype=np.float32)
        if self.stain is not None:
            self.stain([np.full((self.patch_size, self.patch_size, 3), 200, dtype=np.uint8)])
        self.session.run(None, {self.input_name: dummy})
        self._ready.set()

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

    def predict_bag(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A bag model on one bag (N, 3, S, S): class probabilities (C,) and attention (N,)."""
        probabilities, attention = self.session.run(None, {self.input_name: batch})
        return probabilities[0].astype(np.float64), attention.astype(np.float64)

    def predict(self, pixels: np.ndarray) -> Prediction:
        """Probabilities for one HxWx3 uint8 image (a bag of its patches for bag models)."""
        if self.is_bag_model:
            batch, positions = bag_to_batch(
                pixels, self.input_size, self.patch_size, self.stride, self.min_tissue, self.stain
            )
            probabilities, attention = self.predict_bag(batch)
            return Prediction(
                probabilities=probabilities,
                patch_probabilities=np.zeros((0, 0, len(self.classes))),
                patch_size=self.patch_size,
                stride=self.stride,
                attention=[
                    (y, x, float(w)) for (y, x), w in zip(positions, attention, strict=True)
                ],
            )
        # one batch of patches at a time: memory stays flat in image size (a 60 Mpx upload
        # would otherwise hold ~2,700 float patches, 400 MB, at once)
        crops, (rows, cols) = grid_crops(pixels, self.patch_size, self.stride)
        if not self.has_cam:
            step = self.max_batch
            probs = np.concatenate(
                [
                    self.predict_batch(self.to_batch(crops[i : i + step]))
                    for i in range(0, len(crops), step)
                ]
            )
            explanation = None
        else:
            probs, explanation = self._predict_with_cam(pixels, crops)
        return Prediction(
            probabilities=probs.mean(axis=0),
            patch_probabilities=probs.reshape(rows, cols, -1),
            patch_size=self.patch_size,
            stride=self.stride,
            explanation=explanation,
        )

    def _predict_with_cam(
        self, pixels: np.ndarray, crops: list[np.ndarray]
    ) -> tuple[np.ndarray, CamGrid]:
        """Patch probabilities and the Grad-CAM grid of the image-level class (the class the
        answer names, as ``explain.py`` explains it), one batch of patches at a time."""
        height, width = pixels.shape[:2]
        size = self.patch_size
        positions = grid_positions(height, width, size, self.stride)
        boxes = [(y, x, size, size) for y, x in positions] or [(0, 0, height, width)]
        canvas, chunks = CamCanvas(boxes, self.stride if positions else None), []
        for i in range(0, len(crops), self.max_batch):
            batch = self.to_batch(crops[i : i + self.max_batch])
            probabilities, cams = self.session.run(None, {self.input_name: batch})
            chunks.append(probabilities.astype(np.float64))
            canvas.add(cams)
        probs = np.concatenate(chunks)
        return probs, canvas.grid(int(probs.mean(axis=0).argmax()))


def onnx_images_per_second(
    model: OnnxClassifier, batch_size: int = 64, *, min_seconds: float = 1.0, max_iters: int = 50
) -> float:
    """Forward passes of the exported graphs on random input until ``min_seconds`` elapse.

    The stain graph, when the model has one, runs on patch-size input first, as served; the
    resize between the two graphs (PIL, outside ONNX) is not timed.
    """
    rng = np.random.default_rng(0)
    size = model.input_size
    x = rng.random((batch_size, 3, size, size), dtype=np.float32)
    side = model.patch_size
    patches = rng.integers(0, 256, (batch_size, 3, side, side), dtype=np.uint8)

    def step() -> None:
        if model.stain is not None:
            model.stain.run(patches)
        model.session.run(None, {model.input_name: x})

    step()
    iters, started = 0, time.perf_counter()
    while iters < max_iters:
        step()
        iters += 1
        if time.perf_counter() - started >= min_seconds:
            break
    return iters * batch_size / (time.perf_counter() - started)
