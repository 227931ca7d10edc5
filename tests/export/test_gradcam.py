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
