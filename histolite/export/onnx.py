"""``histolite export``: a run -> ONNX (FP32 or INT8) + model card, verified before it is kept.

Everything is written into a temporary folder next to ``--out`` and renamed into place only
after the parity check passes: a failed export leaves nothing behind.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from histolite import __version__
from histolite.data.folder import Sample
from histolite.data.images import image_size, load_rgb
from histolite.data.splits import read_split_csv
from histolite.errors import HistoliteError
from histolite.evaluate.calibration import abstention_unit
from histolite.evaluate.inference import predict, predict_bag_pixels, predict_image
from histolite.evaluate.report import build_report
from histolite.export.graph import (
    CamServingGraph,
    MilHeadGraph,
    MilInstanceGraph,
    ServingGraph,
    StainGraph,
    gradcam_head,
)
from histolite.fileio import file_sha256, read_json, write_json
from histolite.models import count_parameters
from histolite.models.loading import LoadedRun, load_run, require_classifier
from histolite.models.mil import AttentionMIL
from histolite.runspec import RunDir
from histolite.runtime.card import (
    CARD_FILE,
    CARD_FORMAT_VERSION,
    MIL_HEAD_FILE,
    MODEL_FILE,
    STAIN_FILE,
)
from histolite.runtime.classifier import OnnxClassifier
from histolite.runtime.preprocess import CropStain, bag_to_batch, image_to_batch
from histolite.stain import ReinhardNormalizer

OPSET = 17
# Largest attention difference (ONNX against PyTorch) an exported bag model may have. Attention
# weights sum to 1 over the bag; measured differences on real Kather bags were 1.5e-8 (FP32)
# and 8.7e-5 (INT8), so 0.01 leaves two orders of magnitude for quantisation while a wrong graph
# (patches out of order, a broken gate or softmax) moves weights by about their own size (1/N for
# a bag of N), which is far above it. At 0.01 the page's heatmap shades are indistinguishable.
MAX_ATTENTION_DIFF = 0.01
GRADCAM_CHECKS = 16  # parity images whose served Grad-CAM is compared with explain.py's
INTENDED_USE = (
    "Research use: classifying H&E tissue tiles of the classes listed, from the same kind of "
    "scanner, magnification and staining as the training data. Not a medical device; not for "
    "diagnosis. Predictions on other tissue types, stains, magnifications or artefacts are "
    "unreliable; accuracy figures come from the held-out split named in `metrics`."
)


class ExportError(HistoliteError):
    """The exported model disagrees with the trained one (parity failed) or cannot be built."""


@dataclass(frozen=True)
class ExportResult:
    model_dir: Path
    top1_agreement: float
    max_abs_probability_diff: float
    parity_samples: int
    size_bytes: int
    max_abs_attention_diff: float | None = None  # bag models only
    explanation: str | None = None  # "gradcam", "attention" or why there is none


def _split_samples(run: LoadedRun, preferred: Sequence[str]) -> list[Sample]:
    split_csv = RunDir(run.run_dir).split_csv
    if not split_csv.is_file():
        raise ExportError(
            f"{run.run_dir}: split.csv missing; cannot pick parity/calibration images"
        )
    table = read_split_csv(split_csv, classes=run.spec.classes)
    for name in preferred:
        samples = list(table.subset(name).samples)
        if samples:
            return samples
    raise ExportError(f"{split_csv}: no images in splits {list(preferred)}")


def _spread(samples: list[Sample], count: int) -> list[Sample]:
    """Up to ``count`` samples spread evenly over the list (so every class is represented)."""
    if len(samples) <= count:
        return samples
    step = len(samples) / count
    return [samples[int(i * step)] for i in range(count)]


def _tile_geometry(run: LoadedRun, train: list[Sample]) -> tuple[int, int, str]:
    """Patch size and stride for serving: the run's patches (or MIL instances), else its usual
    training tile."""
    if run.spec.mil is not None and run.spec.mil.patch is not None:
        return run.spec.mil.patch.size, run.spec.mil.patch.step, "MIL instances"
    if run.spec.patches is not None:
        return run.spec.patches.size, run.spec.patches.step, "training patches"
    sizes = Counter(image_size(s.path) for s in _spread(train, 200))
    (height, width), _ = sizes.most_common(1)[0]
    side = min(height, width)
    return side, side, "most common training tile size"


class _Calibration:
    """ONNX Runtime calibration reader over a few preprocessed training images."""

    def __init__(self, batches: list[np.ndarray], input_name: str) -> None:
        self._items: Iterator[dict[str, np.ndarray]] = iter([{input_name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)

    def rewind(self) -> None:  # pragma: no cover - called by some ORT versions only
        pass


def _quantize(fp32: Path, int8: Path, batches: list[np.ndarray], input_name: str) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(_Calibration, CalibrationDataReader):
        pass

    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Fold BatchNorm into Conv first so activation scales are calibrated on real outputs.
    prepared = fp32.with_name("model_prepared.onnx")
    quant_pre_process(str(fp32), str(prepared))
    # Quantise Conv/Gemm only (the stain normalisation's small MatMuls stay exact), with
    # per-channel weight scales, keeping the first convolution and the classifier in float:
    # they are the most sensitive layers. On the Kather ResNet-8 this kept top-1 agreement with
    # FP32 at 99.5% (per-tensor, everything quantised: 97.5%). In mobile nets (depthwise
    # convolutions present) the depthwise and the linear-bottleneck projections stay in float
    # too: nine weights per channel, and outputs without a ReLU to bound them, quantise badly
    # (mobile_student_s: 98.3% agreement with them quantised, 99.7% without, on 300 Kather test
    # tiles); the 1x1 expansions, which hold most of the compute, are quantised.
    import onnx

    nodes = onnx.load(str(prepared)).graph.node
    convs = [n for n in nodes if n.op_type == "Conv"]
    depthwise = [n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    consumers: dict[str, list[str]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    linear = [
        n.name
        for n in convs
        if depthwise and not {"Relu", "Clip"} & set(consumers.get(n.output[0], []))
    ]
    keep_float = [
        *(n.name for n in convs[:1]),
        *depthwise,
        *linear,
        *(n.name for n in nodes if n.op_type == "Gemm"),
    ]
    quantize_static(
        str(prepared),
        str(int8),
        Reader(batches, input_name),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["Conv", "Gemm"],
        nodes_to_exclude=keep_float,
    )


_CARD_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "n", "level")


def _run_metrics(run: LoadedRun) -> dict[str, Any] | None:
    """Held-out metrics for the card: the run's test report, else computed on its test split."""
    files = RunDir(run.run_dir)
    report_path = files.test_report_dir / "report.json"
    if report_path.is_file():
        report = read_json(report_path)
    else:
        split_csv = files.split_csv
        test = (
            list(read_split_csv(split_csv, classes=run.spec.classes).subset("test").samples)
            if split_csv.is_file()
            else []
        )
        if not test:
            return None
        report = build_report(run, test, predict(run, test, progress=False))
    return {"source": "run test split", **{k: report[k] for k in _CARD_METRICS if k in report}}


def _export(
    graph: torch.nn.Module,
    example: torch.Tensor | tuple[torch.Tensor, ...],
    path: Path,
    **names: Any,
) -> None:
    # the tracer warns about shape checks and constant targets, which are meant as constants
    examples = example if isinstance(example, tuple) else (example,)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            graph.eval(), examples, str(path), dynamo=False, opset_version=OPSET, **names
        )


def _free_first_axis(name: str, *tensors: str) -> dict[str, dict[int, str]]:
    """ONNX dynamic axes: the first axis of each named tensor is ``name`` (batch, instances)."""
    return {tensor: {0: name} for tensor in tensors}


def _export_graph(run: LoadedRun, path: Path) -> dict[str, Any]:
    """The FP32 model graph: model + softmax on resized input; returns the card's explanation.

    Classifiers take a batch of images (N free) and, when their head is global average pooling
    plus one linear layer, also return Grad-CAM maps of every class (``cam``); bag models are
    an instance graph (N patches in, in chunks) and a head over the bag, ``MIL_HEAD_FILE``.
    """
    size = run.spec.image_size
    if isinstance(run.model, AttentionMIL):
        _export_bag_graphs(run.model, size, path)
        return {"method": "attention", "output": "attention"}
    model = require_classifier(run, "ONNX export")
    image = torch.rand(1, 3, size, size)
    try:
        layer, classifier = gradcam_head(model, size)
    except ValueError as exc:  # served without an explanation, and the card says why
        outputs = ["probabilities", "logits"]
        _export(
            ServingGraph(model),
            image,
            path,
            input_names=["image"],
            output_names=outputs,
            dynamic_axes=_free_first_axis("batch", "image", *outputs),
        )
        return {"method": None, "reason": f"no Grad-CAM in the graph: {exc}"}
    outputs = ["probabilities", "cam", "logits"]
    _export(
        CamServingGraph(model, layer, classifier),
        image,
        path,
        input_names=["image"],
        output_names=outputs,
        dynamic_axes=_free_first_axis("batch", "image", *outputs),
    )
    return {
        "method": "gradcam",
        "output": "cam",
        "layer": layer,
        "classifier": classifier,
        "maps": (
            "ReLU(classifier weights, times the calibration's scale of the class, x feature "
            "maps) per class, at feature resolution"
        ),
    }


def _export_bag_graphs(model: AttentionMIL, size: int, path: Path) -> None:
    """The instance graph (``path``) and the bag head (``MIL_HEAD_FILE`` beside it)."""
    _export(
        MilInstanceGraph(model),
        torch.rand(3, 3, size, size),
        path,
        input_names=["patches"],
        output_names=["embeddings", "scores"],
        dynamic_axes=_free_first_axis("instances", "patches", "embeddings", "scores"),
    )
    head_inputs = (torch.rand(3, model.embed_dim), torch.rand(3))
    _export(
        MilHeadGraph(model),
        head_inputs,
        path.with_name(MIL_HEAD_FILE),
        input_names=["embeddings", "scores"],
        output_names=["probabilities", "attention", "logits"],
        dynamic_axes=_free_first_axis("instances", "embeddings", "scores", "attention"),
    )


def _stain_normalizer(run: LoadedRun) -> ReinhardNormalizer | None:
    stain = run.stain
    if not (stain is None or isinstance(stain, ReinhardNormalizer)):
        raise ExportError(
            f"{run.run_dir} uses {stain.__class__.__name__}: its per-tile stain estimation "
            "(eigenvectors, percentiles) is not part of an ONNX graph; to deploy, train with "
            "Reinhard normalisation, or with stain augmentation (augment.hed_jitter, "
            "augment.random_macenko)"
        )
    return stain


def _export_stain_graph(stain: ReinhardNormalizer, path: Path) -> None:
    """The stain graph: uint8 patches of any size and number, normalised before the resize
    (uint8 in and out, as in training: exact sRGB table on the way in, rounding on the way
    out; and a quarter faster than float I/O in ONNX Runtime)."""
    axes = {0: "patches", 2: "height", 3: "width"}
    _export(
        StainGraph(stain),
        torch.randint(0, 256, (2, 3, 40, 48), dtype=torch.uint8),
        path,
        input_names=["patches"],
        output_names=["normalised"],
        dynamic_axes={"patches": axes, "normalised": axes},
    )


def torch_crop_stain(stain: ReinhardNormalizer | None) -> CropStain | None:
    """The training-time normaliser as a crop transform (INT8 calibration batches)."""
    if stain is None:
        return None

    def normalise(crops: list[np.ndarray]) -> list[np.ndarray]:
        tensors = [torch.from_numpy(np.ascontiguousarray(c)).permute(2, 0, 1) for c in crops]
        return [stain(t).permute(1, 2, 0).numpy() for t in tensors]

    return normalise


MAX_BAG_INSTANCES = 4096  # patches a served bag may have (its image: this many strides squared)


def _model_card(
    run: LoadedRun,
    *,
    int8: bool,
    name: str,
    version: str,
    checkpoint: str,
    geometry: tuple[int, int, str],
) -> dict[str, Any]:
    """What a served model needs to preprocess inputs, and what a reader needs to trust it."""
    patch_size, stride, geometry_source = geometry
    metadata = RunDir(run.run_dir).metadata
    return {
        "name": name,
        "version": version,
        "format": "onnx",
        "format_version": CARD_FORMAT_VERSION,
        "precision": "int8" if int8 else "fp32",
        "opset": OPSET,
        "input": _input_section(run),
        **_kind_section(run, patch_size, stride),
        "classes": list(run.spec.classes),
        "input_size": run.spec.image_size,
        "mean": list(run.spec.mean),
        "std": list(run.spec.std),
        "stain": asdict(run.spec.stain) if run.spec.stain else None,
        "patch_size": patch_size,
        "patch_stride": stride,
        "patch_geometry_source": geometry_source,
        # physical scale: slides are tiled at tile_um microns, read at mpp microns per pixel
        "mpp": run.spec.mpp,
        "tile_um": round(patch_size * run.spec.mpp, 3) if run.spec.mpp else None,
        "model": run.spec.model_name,
        "parameters": count_parameters(run.model),
        "metrics": _run_metrics(run),
        "training_data_fingerprint": read_json(metadata).get("dataset_fingerprint")
        if metadata.is_file()
        else None,
        "source_run": str(run.run_dir.resolve()),
        "checkpoint": checkpoint,
        "checkpoint_sha256": file_sha256(run.checkpoint) if run.checkpoint else None,
        **_uncertainty_sections(run),
        "intended_use": INTENDED_USE,
        "histolite_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _input_section(run: LoadedRun) -> dict[str, Any]:
    """What the model graph takes, and how pixels get there (the runtime's contract)."""
    return {
        "name": "patches" if run.is_mil else "image",
        "layout": "NCHW",
        "dtype": "float32",
        "range": [0.0, 1.0],
        "colour": "RGB",
        "resize": "bilinear",
        "preprocessing": (
            f"each patch through {STAIN_FILE} at its own size (uint8 NCHW in and out), "
            "then a bilinear resize to input_size, then / 255"
            if run.stain is not None
            else "each patch resized (bilinear) to input_size"
        ),
    }


def _kind_section(run: LoadedRun, patch_size: int, stride: int) -> dict[str, Any]:
    """A classifier's outputs, or a bag model's instances, bounds and outputs."""
    mil = run.spec.mil
    if mil is None:
        return {"kind": "classifier", "output": {"name": "probabilities", "softmax": True}}
    return {
        "kind": "mil",
        "mil": {
            "pooling": mil.pooling,
            "instances": "grid patches of the image, in image pixels",
            "patch_size": patch_size,
            "patch_stride": stride,
            "min_tissue": mil.patch.min_tissue if mil.patch else 0.0,
            # bounds one request's work: more patches than this is a 413
            "max_instances": MAX_BAG_INSTANCES,
            "max_image_pixels": MAX_BAG_INSTANCES * stride * stride,
        },
        "output": {"name": "probabilities", "softmax": True, "attention": "attention"},
    }


def _uncertainty_sections(run: LoadedRun) -> dict[str, Any]:
    """The card's ``calibration``, ``abstention`` and ``ood``: what the graph's logits were
    scaled by, and the thresholds the runtime flags answers with (None when uncalibrated)."""
    spec = run.calibration
    if spec is None:
        return {
            "calibration": {"method": None, "note": run.calibration_note or "not calibrated"},
            "abstention": None,
            "ood": None,
        }
    validation = spec.validation or {}
    abstention = dict(spec.abstention or {})
    # calibrations fitted before the unit was recorded: it was the same, one served image
    abstention.setdefault(
        "unit", abstention_unit(run.spec.patches is not None and not run.is_mil, run.is_mil)
    )
    return {
        "calibration": {
            "method": spec.method,
            "temperature": spec.temperature,
            "fitted_on": "validation",
            "validation_ece_before": (validation.get("before") or {}).get("ece"),
            "validation_ece_after": (validation.get("after") or {}).get("ece"),
            "file_sha256": file_sha256(RunDir(run.run_dir).calibration),
        },
        "abstention": abstention if abstention.get("threshold") is not None else None,
        "ood": spec.ood,
    }


def _parity(
    run: LoadedRun, exported: OnnxClassifier, samples: list[Sample], progress: bool
) -> tuple[float, float, float | None]:
    """Top-1 agreement, largest probability difference and, for bag models, largest attention
    difference of ONNX against PyTorch."""
    agree, max_diff, attention_diff = 0, 0.0, 0.0
    for sample in tqdm(samples, desc="parity check", disable=not progress, leave=False):
        pixels = load_rgb(sample.path)
        served = exported.predict(pixels)
        if run.is_mil:
            bag = predict_bag_pixels(run, pixels)
            reference = bag.probs
            weights = np.array([w for _, _, w in served.attention or []])
            attention_diff = max(attention_diff, float(np.abs(bag.attention - weights).max()))
        else:
            reference = predict_image(run, pixels)
        agree += int(reference.argmax() == served.probabilities.argmax())
        max_diff = max(max_diff, float(np.abs(reference - served.probabilities).max()))
    return agree / len(samples), max_diff, attention_diff if run.is_mil else None


def _gradcam_agreement(
    run: LoadedRun, exported: OnnxClassifier, samples: list[Sample]
) -> float | None:
    """The lowest correlation, over ``samples``, between the served Grad-CAM grid and
    ``explain.py``'s gradient Grad-CAM of the same class (sampled at the grid's cell centres):
    recorded so an INT8 graph's explanation is checked, not assumed. None without ``cam``."""
    from histolite.evaluate.explain import gradcam_explanation

    lowest: float | None = None
    for sample in samples:
        pixels = load_rgb(sample.path)
        served = exported.predict(pixels)
        grid = served.explanation
        if grid is None:
            return None
        reference = gradcam_explanation(run, pixels, target=served.top_class()).heatmap
        rows, cols = grid.values.shape
        height, width = reference.shape
        ys = np.minimum(((np.arange(rows) + 0.5) * grid.cell_height).astype(int), height - 1)
        xs = np.minimum(((np.arange(cols) + 0.5) * grid.cell_width).astype(int), width - 1)
        sampled = reference[np.ix_(ys, xs)].ravel()
        if sampled.std() == 0 or grid.values.std() == 0:
            continue  # a flat map has no shape to agree on
        r = float(np.corrcoef(sampled, grid.values.ravel())[0, 1])
        lowest = r if lowest is None else min(lowest, r)
    return lowest


def _quantization_batch(
    run: LoadedRun, pixels: np.ndarray, geometry: tuple[int, int, str], stain: CropStain | None
) -> np.ndarray:
    """What the model graph sees for one training image: its patch grid, or its bag, stain
    normalised and resized."""
    size, (patch_size, stride, _) = run.spec.image_size, geometry
    if run.spec.mil is not None and run.spec.mil.patch is not None:
        min_tissue = run.spec.mil.patch.min_tissue
        return bag_to_batch(pixels, size, patch_size, stride, min_tissue, stain=stain)[0]
    return image_to_batch(pixels, size, patch_size, stride, stain=stain)[0]


def _make_readable(folder: Path) -> None:
    """Folder and files as a plain ``mkdir``/``open`` would make them under the umask.

    ``mkdtemp``/``mkstemp`` create 0700/0600, which a container's non-root user cannot read.
    """
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~mask)


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    int8: bool = False,
    checkpoint: str = "best",
    name: str | None = None,
    version: str = "1",
    parity_samples: int = 200,
    quantization_samples: int = 64,
    min_agreement: float = 0.99,
    progress: bool = True,
) -> ExportResult:
    """Export ``run_dir`` to ``out`` (model.onnx + model.json) after a parity check.

    Everything is staged in a temporary folder beside ``out`` and renamed into place only when
    the exported graph agrees with PyTorch on ``min_agreement`` of the parity images.
    """
    run_dir, out = Path(run_dir), Path(out)
    if out.exists():
        raise HistoliteError(f"{out} already exists; choose another --out or remove it")
    run = load_run(run_dir, checkpoint, device="cpu")
    if run.spec.mil is not None and run.spec.mil.precomputed:
        raise HistoliteError(
            f"{run_dir} is an attention-MIL run on slide features: it has no image encoder to "
            "export; predict slides with `histolite slide predict`"
        )
    stain = _stain_normalizer(run)
    train = _split_samples(run, ("train",))
    geometry = _tile_geometry(run, train)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # INT8 calibration images: training images spread over the classes
        images = [load_rgb(s.path) for s in _spread(train, quantization_samples)] if int8 else []
        explanation = _write_graphs(run, staging, stain, int8, images, geometry)
        card = _model_card(
            run,
            int8=int8,
            name=name or run_dir.name,
            version=version,
            checkpoint=checkpoint,
            geometry=geometry,
        )
        card["explanation"] = explanation
        card.update(_side_graphs(run, staging, stain))
        checks = _spread(_split_samples(run, ("test", "val", "train")), parity_samples)
        parity = _check_parity(
            run, OnnxClassifier(staging, card=card), checks, min_agreement, progress
        )
        card["size_bytes"] = (staging / MODEL_FILE).stat().st_size
        card["sha256"] = file_sha256(staging / MODEL_FILE)  # serve refuses a swapped graph
        card["parity"] = parity
        write_json(staging / CARD_FILE, card)
        _make_readable(staging)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return ExportResult(
        out,
        parity["top1_agreement"],
        parity["max_abs_probability_diff"],
        parity["samples"],
        card["size_bytes"],
        parity["max_abs_attention_diff"],
        explanation["method"] or explanation["reason"],
    )


def _write_graphs(
    run: LoadedRun,
    staging: Path,
    stain: ReinhardNormalizer | None,
    int8: bool,
    images: list[np.ndarray],
    geometry: tuple[int, int, str],
) -> dict[str, Any]:
    """The model graph (and the stain graph, the MIL head) into ``staging``; INT8 quantised on
    ``images`` when asked. Returns the card's explanation."""
    fp32 = staging / ("model_fp32.onnx" if int8 else MODEL_FILE)
    explanation = _export_graph(run, fp32)
    if stain is not None:
        _export_stain_graph(stain, staging / STAIN_FILE)
    if int8:
        crop_stain = torch_crop_stain(stain)
        batches = [_quantization_batch(run, pixels, geometry, crop_stain) for pixels in images]
        _quantize(fp32, staging / MODEL_FILE, batches, "patches" if run.is_mil else "image")
        for leftover in staging.glob("model_*.onnx"):
            leftover.unlink()
    return explanation


def _side_graphs(run: LoadedRun, staging: Path, stain: ReinhardNormalizer | None) -> dict[str, Any]:
    """The card's records of the graphs beside model.onnx, with their SHA-256."""
    records: dict[str, Any] = {}
    if run.is_mil:
        records["mil_head"] = {
            "file": MIL_HEAD_FILE,
            "sha256": file_sha256(staging / MIL_HEAD_FILE),
            "order": "model.onnx on the bag's patches in chunks, then this on the whole bag",
        }
    if stain is not None:
        records["stain_graph"] = {
            "file": STAIN_FILE,
            "sha256": file_sha256(staging / STAIN_FILE),
            "order": "each patch at its own resolution (uint8 in and out), then resized",
        }
    return records


def _check_parity(
    run: LoadedRun,
    exported: OnnxClassifier,
    checks: list[Sample],
    min_agreement: float,
    progress: bool,
) -> dict[str, Any]:
    """The exported graphs against PyTorch on ``checks``; an ExportError (nothing written)
    when they disagree, else the card's ``parity`` record."""
    agreement, max_diff, attention_diff = _parity(run, exported, checks, progress)
    if agreement < min_agreement:
        raise ExportError(
            f"parity check failed: the ONNX model agrees with the PyTorch model on "
            f"{agreement:.1%} of {len(checks)} images (need {min_agreement:.0%}); largest "
            f"probability difference {max_diff:.4f}. Nothing was written."
        )
    if attention_diff is not None and attention_diff > MAX_ATTENTION_DIFF:
        raise ExportError(
            f"parity check failed: the ONNX model's attention weights differ from the "
            f"PyTorch model's by up to {attention_diff:.4g} (allowed {MAX_ATTENTION_DIFF}); "
            "the served attention map would not be the trained one. Nothing was written."
        )
    return {
        "samples": len(checks),
        "top1_agreement": agreement,
        "max_abs_probability_diff": max_diff,
        "max_abs_attention_diff": attention_diff,
        "gradcam_min_correlation": None
        if run.is_mil
        else _gradcam_agreement(run, exported, checks[:GRADCAM_CHECKS]),
        "allowed_attention_diff": MAX_ATTENTION_DIFF if attention_diff is not None else None,
        "required_agreement": min_agreement,
        "reference": "PyTorch checkpoint through histolite's evaluation path",
    }
