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


def _export_cam_graph(graph: CamServingGraph, path: Path) -> ort.InferenceSession:
    with torch.no_grad():
        torch.onnx.export(
            graph.eval(),
            (torch.rand(1, 3, SIZE, SIZE),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["image"],
            output_names=["probabilities", "cam", "logits"],
            dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}, "cam": {0: "b"}},
        )
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    ("scale", "bias"),
    [
        ([1 / 2.5], [0.0]),  # temperature 2.5
        ([1.3, -0.7, 0.5, -1.2], [0.2, -0.1, 0.0, 0.4]),  # vector scaling, two negative scales
    ],
    ids=["temperature", "vector"],
)
def test_calibrated_models_keep_their_cam_and_its_sign(
    scale: list[float], bias: list[float], tmp_path: Path
) -> None:
    """Calibration scales the logits after the linear layer: the closed form still holds on
    the raw logits, and each class's map is Grad-CAM of its *calibrated* score (a negative
    vector scale turns the map inside out, as the gradient does)."""
    model = _classifier("resnet8")
    model.calibration.set(scale, bias)
    layer, classifier = gradcam_head(model, SIZE)  # was refused when temperature != 1
    session = _export_cam_graph(CamServingGraph(model, layer, classifier), tmp_path / "m.onnx")
    images = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    probabilities, cams = session.run(["probabilities", "cam"], {"image": images.numpy()})
    flat = 0
    for target in range(4):
        reference, probs = grad_cam(model, images.clone(), target, layer)
        top = cams[0, target].max()
        served = cams[0, target] / top if top > 0 else np.zeros_like(cams[0, target])
        flat += int(top == 0)
        np.testing.assert_allclose(served, reference.numpy(), atol=1e-4)
        np.testing.assert_allclose(probabilities[0], probs.numpy(), atol=1e-5)
    assert flat < 4  # the maps compared have a shape, not only zeros
