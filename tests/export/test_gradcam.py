"""Grad-CAM as an ONNX output: for networks that end in global average pooling and one linear
layer, ``ReLU(W A)`` is Grad-CAM up to its normalisation, so serving explains without torch.

The graph's maps are checked against ``evaluate/explain.py``'s gradient Grad-CAM, per model
family; heads where the closed form does not hold are refused by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from histolite.evaluate.explain import grad_cam
from histolite.export.graph import CamServingGraph, gradcam_head
from histolite.models import NormalizedClassifier, create_model

SIZE = 64  # every family below still has a spatial map (at least 2 x 2) at this input


def _classifier(name: str, **kwargs: object) -> NormalizedClassifier:
    torch.manual_seed(0)
    net = create_model(name, 4, **kwargs)  # type: ignore[arg-type]
    return NormalizedClassifier(net, [0.7, 0.5, 0.7], [0.2, 0.2, 0.2]).eval()


@pytest.mark.parametrize(
    "name",
    [
        "resnet8",  # histolite CIFAR ResNet
        "mobile_student_s",  # histolite inverted residuals
        "resnet18",  # timm: forward_features + forward_head
        "mobilenet_v2",  # torchvision: Sequential(backbone, Linear)
    ],
)
def test_graph_cam_is_explain_gradcam_for_every_class(name: str, tmp_path: Path) -> None:
    model = _classifier(name)
    layer, classifier = gradcam_head(model, SIZE)
    path = tmp_path / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(
            CamServingGraph(model, layer, classifier).eval(),
            (torch.rand(1, 3, SIZE, SIZE),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["probabilities", "cam"],
            dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}, "cam": {0: "b"}},
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    probabilities, cams = session.run(["probabilities", "cam"], {"image": images.numpy()})
    assert cams.shape[:2] == (1, 4) and cams.shape[2] * cams.shape[3] > 1
    for i in range(1):
        for target in range(4):
            reference, probs = grad_cam(model, images[i : i + 1].clone(), target, layer)
            served = cams[i, target] / cams[i, target].max() if cams[i, target].max() > 0 else 0
            np.testing.assert_allclose(served, reference.numpy(), atol=1e-4)
            np.testing.assert_allclose(probabilities[i], probs.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("mobilenetv3_small_050", {}),  # timm: pooling, then a 1x1 conv and activation
        ("resnet18", {"head": "breakhis"}),  # the BreakHis MLP head
    ],
)
def test_heads_without_a_closed_form_are_refused_by_name(name: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=r"not one linear layer .* global average"):
        gradcam_head(_classifier(name, **kwargs), SIZE)


def test_large_images_get_a_coarser_grid_with_the_hot_spot_in_place() -> None:
    """A 4,000 px wide image of 32 px patches with 8 x 8 maps would be 1,000 cells wide."""
    from histolite.runtime.cam import MAX_CAM_CELLS, CamCanvas

    boxes = [(y, x, 32, 32) for y in (0, 32) for x in range(0, 4000 - 31, 32)]
    cams = np.zeros((len(boxes), 2, 8, 8), np.float32)
    hot = boxes.index((32, 2048, 32, 32))
    cams[hot, 1, 2:4, 4:6] = 5.0  # class 1, in image pixels y 40-48, x 2064-2072
    canvas = CamCanvas(boxes)
    for start in range(0, len(boxes), 16):  # batches, as the service runs them
        canvas.add(cams[start : start + 16])
    grid = canvas.grid(1)
    rows, cols = grid.values.shape
    assert max(rows, cols) <= MAX_CAM_CELLS and cols * grid.cell_width == 4000 - 4000 % 32
    r, c = np.unravel_index(grid.values.argmax(), grid.values.shape)
    assert r * grid.cell_height <= 44 < (r + 1) * grid.cell_height
    assert c * grid.cell_width <= 2068 < (c + 1) * grid.cell_width
    assert canvas.grid(0).values.max() == 0.0  # nothing for class 0


def test_overlapping_patches_land_on_their_own_pixels() -> None:
    """Found in review: each patch edge was rounded to a cell on its own, so with 224 px
    patches at stride 112 and 7 x 7 maps a patch was painted half a cell off (and some
    patches squeezed to fewer cells): up to 0.47 off the pixel-level stitching."""
    from PIL import Image

    from histolite.evaluate.explain import normalise
    from histolite.runtime.cam import CamCanvas

    rng = np.random.default_rng(0)
    size, stride, side = 224, 112, 448
    boxes = [(y, x, size, size) for y in range(0, side - size + 1, stride)
             for x in range(0, side - size + 1, stride)]  # fmt: skip
    cams = rng.random((len(boxes), 1, 7, 7)).astype(np.float32)
    canvas = CamCanvas(boxes, stride)
    canvas.add(cams)
    grid = canvas.grid(0)
    # explain.py's way, in pixels: each map scaled by its maximum, resized, overlaps averaged
    total, count = np.zeros((side, side), np.float32), np.zeros((side, side), np.float32)
    for (y, x, h, w), cam in zip(boxes, cams[:, 0], strict=True):
        scaled = Image.fromarray(cam / cam.max(), mode="F").resize(
            (w, h), Image.Resampling.BILINEAR
        )
        total[y : y + h, x : x + w] += np.asarray(scaled)
        count[y : y + h, x : x + w] += 1
    pixels = normalise(total / count)
    rows, cols = grid.values.shape
    centres_y = ((np.arange(rows) + 0.5) * grid.cell_height).astype(int)
    centres_x = ((np.arange(cols) + 0.5) * grid.cell_width).astype(int)
    sampled = pixels[np.ix_(centres_y, centres_x)]
    assert rows * grid.cell_height == side and cols * grid.cell_width == side
    assert np.abs(sampled - grid.values).max() < 0.2
    assert np.corrcoef(sampled.ravel(), grid.values.ravel())[0, 1] > 0.9
