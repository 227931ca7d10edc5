"""Where did the model look? MIL attention and Grad-CAM as heatmaps, through one overlay API.

Every method returns an :class:`Explanation` whose heatmap has the image's own height and width,
so :func:`render_overlay` can draw any of them over the original pixels.

Grad-CAM (Selvaraju et al. 2017) weights a convolutional layer's feature maps by the mean
gradient of the target class score and keeps the positive part. By default the layer is the
last module whose output is still a spatial map, found by running the model once, so it works
for any registry CNN (timm, torchvision, histolite) without per-architecture layer names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from histolite.data.patches import grid_positions
from histolite.data.transforms import build_eval_transform, image_tensor, preprocess
from histolite.errors import HistoliteError
from histolite.evaluate.inference import predict_bag_pixels
from histolite.fileio import atomic_path
from histolite.models.loading import LoadedRun, require_classifier

METHODS = ("auto", "attention", "gradcam")


@dataclass
class Explanation:
    """A heatmap in [0, 1] of the image's size, with the prediction it explains."""

    heatmap: np.ndarray
    probs: np.ndarray
    target: int
    method: str


def normalise(heat: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a flat map (nothing stands out) becomes all zeros."""
    heat = heat.astype(np.float32) - float(heat.min())
    top = float(heat.max())
    return heat / top if top > 0 else heat


def paint_patches(
    shape: tuple[int, int], positions: Sequence[tuple[int, int]], size: int, values: Sequence[float]
) -> np.ndarray:
    """An image-sized map where each patch carries its value (overlaps averaged)."""
    total = np.zeros(shape, np.float32)
    count = np.zeros(shape, np.float32)
    for (y, x), value in zip(positions, values, strict=True):
        total[y : y + size, x : x + size] += value
        count[y : y + size, x : x + size] += 1
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def _resize(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    image = Image.fromarray(heat.astype(np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))


def attention_explanation(run: LoadedRun, pixels: np.ndarray) -> Explanation:
    """Each patch coloured by its MIL attention weight."""
    if not run.is_mil:
        raise HistoliteError(
            f"{run.run_dir} is not an attention-MIL run; use --method gradcam for CNN classifiers"
        )
    bag = predict_bag_pixels(run, pixels)
    heat = paint_patches(pixels.shape[:2], bag.positions, bag.patch_size, bag.attention.tolist())
    return Explanation(normalise(heat), bag.probs, int(bag.probs.argmax()), "attention")


def last_spatial_layer(model: nn.Module, example: Tensor) -> str:
    """Name of the last module, in execution order, whose output is a (B, C, H, W) map, H*W > 1."""
    finished: list[str] = []
    names = {module: name for name, module in model.named_modules() if name}

    def hook(module: nn.Module, inputs: object, output: object) -> None:
        if isinstance(output, Tensor) and output.dim() == 4 and output.shape[-2:].numel() > 1:
            finished.append(names[module])

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    if not finished:
        raise HistoliteError("the model has no spatial feature map for Grad-CAM")
    return finished[-1]


def grad_cam(model: nn.Module, x: Tensor, target: int | None, layer: str) -> tuple[Tensor, Tensor]:
    """(class activation map (H', W') in [0, 1], softmax probabilities) of one (1, 3, H, W)."""
    modules = dict(model.named_modules())
    if layer not in modules:
        raise HistoliteError(f"layer {layer!r} not found; e.g. {', '.join(list(modules)[-5:])}")
    captured: dict[str, Tensor] = {}

    def keep(module: nn.Module, inputs: object, output: Tensor) -> None:
        captured["maps"] = output
        output.register_hook(lambda grad: captured.__setitem__("grads", grad))

    handle = modules[layer].register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x.requires_grad_(True))
            index = int(logits.argmax(dim=1)) if target is None else target
            model.zero_grad(set_to_none=True)
            logits[0, index].backward()
    finally:
        handle.remove()
    maps, grads = captured["maps"].detach(), captured["grads"].detach()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * maps).sum(dim=1))[0]
    cam = cam / cam.max() if float(cam.max()) > 0 else cam
    return cam, torch.softmax(logits.detach(), dim=1)[0]


def gradcam_explanation(
    run: LoadedRun, pixels: np.ndarray, target: int | None = None, layer: str | None = None
) -> Explanation:
    """Grad-CAM of the whole image, or of every grid patch for runs trained on patches."""
    model = require_classifier(run, "Grad-CAM")
    device = next(model.parameters()).device
    transform = build_eval_transform(run.spec.image_size)
    image = image_tensor(pixels)
    height, width = pixels.shape[:2]
    if run.spec.patches is not None:
        size = run.spec.patches.size
        positions = grid_positions(height, width, size, run.spec.patches.step) or [(0, 0)]
    else:
        size, positions = max(height, width), [(0, 0)]

    def tensor(y: int, x: int) -> Tensor:
        box = (y, x, size) if run.spec.patches else None
        return preprocess(image, transform, run.stain, box).unsqueeze(0).to(device)

    layer = layer or last_spatial_layer(model, tensor(*positions[0]))
    if target is None:  # explain the image-level prediction, not each patch's own
        with torch.no_grad():
            probs = torch.stack([torch.softmax(model(tensor(y, x)), 1)[0] for y, x in positions])
        target = int(probs.mean(0).argmax())
    heat = np.zeros((height, width), np.float32)
    count = np.zeros((height, width), np.float32)
    all_probs = []
    for y, x in positions:
        cam, probs = grad_cam(model, tensor(y, x), target, layer)
        all_probs.append(probs.cpu().numpy())
        h, w = (
            (min(size, height - y), min(size, width - x)) if run.spec.patches else (height, width)
        )
        heat[y : y + h, x : x + w] += _resize(cam.cpu().numpy(), h, w)
        count[y : y + h, x : x + w] += 1
    heat = np.divide(heat, count, out=np.zeros_like(heat), where=count > 0)
    return Explanation(normalise(heat), np.mean(all_probs, axis=0), target, "gradcam")


def explain_image(
    run: LoadedRun,
    pixels: np.ndarray,
    *,
    method: str = "auto",
    target: int | None = None,
    layer: str | None = None,
) -> Explanation:
    """``auto``: attention for MIL runs, Grad-CAM for CNN classifiers."""
    if method not in METHODS:
        raise HistoliteError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "attention" or (method == "auto" and run.is_mil):
        if target is not None:
            raise HistoliteError("attention explains the predicted class; --target is for gradcam")
        return attention_explanation(run, pixels)
    return gradcam_explanation(run, pixels, target, layer)


def render_overlay(
    pixels: np.ndarray,
    heatmap: np.ndarray,
    out: str | Path,
    *,
    alpha: float = 0.45,
    colormap: str = "jet",
) -> Path:
    """Blend the heatmap's colours over the image and write a PNG of exactly the image's size."""
    import matplotlib

    if heatmap.shape != pixels.shape[:2]:
        raise HistoliteError(
            f"heatmap shape {heatmap.shape} does not match the image {pixels.shape[:2]}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise HistoliteError(f"alpha must be in [0, 1], got {alpha}")
    colours = matplotlib.colormaps[colormap](np.clip(heatmap, 0, 1))[..., :3] * 255.0
    blended = pixels.astype(np.float32) * (1 - alpha) + colours * alpha
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8)).save(tmp, format="PNG")
    return out
