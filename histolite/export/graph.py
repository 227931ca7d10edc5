"""The modules that go into ONNX graphs.

Two graphs per exported model when it normalises stain, because training normalises each tile
at its own resolution *before* resizing it to the model's input (``data.transforms.preprocess``):

- ``StainGraph`` (``stain.onnx``): Reinhard on a batch of same-size patches of any height and
  width, uint8 RGB in and out, as the training path's normaliser; the runtime then resizes;
- ``ServingGraph`` (``model.onnx``): model + softmax on resized input (the logits, calibrated
  when the run is, are an output too: out-of-distribution scores);
- bag models: ``MilInstanceGraph`` (``model.onnx``: patches -> embeddings and attention scores,
  run in chunks) and ``MilHeadGraph`` (``mil_head.onnx``: the bag's pooling and classifier);
  ``MilServingGraph`` is the earlier single graph, kept for comparison (benchmarks/mil_export.py);
  ``CamServingGraph`` adds Grad-CAM maps for networks that end in global average pooling and
  one linear layer (``gradcam_head``), so the service can explain without torch or gradients.

Normalising after the resize instead (one graph) changes each tile's Lab statistics and skips
the 8-bit rounding: 97.5% top-1 agreement with the trained model on Kather test tiles, against
100% in this order. Serving still needs only ONNX Runtime and NumPy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from histolite.errors import HistoliteError
from histolite.evaluate.explain import last_spatial_layer
from histolite.models import NormalizedClassifier
from histolite.models.mil import AttentionMIL
from histolite.stain import ReinhardNormalizer


class StainGraph(nn.Module):
    def __init__(self, stain: ReinhardNormalizer) -> None:
        super().__init__()
        self.stain = stain

    def forward(self, patches: Tensor) -> Tensor:
        return self.stain.torch_normalize(patches)


class ServingGraph(nn.Module):
    def __init__(self, model: NormalizedClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.model(images)  # calibrated, when the run is
        return torch.softmax(logits, dim=1), logits


def gradcam_head(model: NormalizedClassifier, input_size: int) -> tuple[str, str]:
    """(feature map layer, linear classifier) of a network whose logits are
    ``classifier(mean over space of the layer's maps)``.

    The layer is the one ``explain.py``'s Grad-CAM uses (the last spatial map). The structure
    is checked numerically on random images rather than by architecture, so any backbone
    (histolite, timm, torchvision) qualifies exactly when its head is global average pooling
    plus one linear layer. The check reads the logits before the model's calibration
    (``LogitScaling``), which :class:`CamServingGraph` accounts for per class.

    Raises:
        ValueError: why Grad-CAM has no closed form for this network (e.g. timm MobileNetV3's
            convolution after the pooling, the BreakHis MLP head, vision transformers).
    """
    example = torch.rand(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    maps: list[Tensor] = []
    raw: list[Tensor] = []
    linears: list[tuple[str, Tensor]] = []
    names = {module: name for name, module in model.named_modules() if name}
    try:
        try:
            layer = last_spatial_layer(model, example[:1])
        except HistoliteError as exc:
            raise ValueError(str(exc)) from exc
        handles = [
            module.register_forward_hook(lambda m, i, out: linears.append((names[m], out)))
            for module in names
            if isinstance(module, nn.Linear)
        ]
        handles.append(
            model.get_submodule(layer).register_forward_hook(lambda m, i, out: maps.append(out))
        )
        # the classifier's own logits: a calibrated run scales them after the linear layer
        handles.append(model.calibration.register_forward_hook(lambda m, i, out: raw.append(i[0])))
        try:
            with torch.no_grad():
                model(example)
        finally:
            for handle in handles:
                handle.remove()
    finally:
        model.train(was_training)
    if not linears:
        raise ValueError("the network has no linear classifier")
    classifier = linears[-1][0]
    linear = model.get_submodule(classifier)
    assert isinstance(linear, nn.Linear)
    features, logits = maps[-1], raw[-1]
    closed_form = linear.in_features == features.shape[1] and torch.allclose(
        linear(features.mean(dim=(2, 3))),
        logits,
        rtol=1e-4,
        atol=1e-4 * (1 + float(logits.abs().max())),
    )
    if not closed_form:
        raise ValueError(
            f"its logits are not one linear layer ({classifier}) over the global average of its "
            f"last feature map ({layer}), so Grad-CAM needs gradients"
        )
    return layer, classifier


class CamServingGraph(nn.Module):
    """Images (N, 3, S, S) -> probabilities (N, C) and Grad-CAM maps of every class (N, C, h, w).

    With ``logit_c = sum_k w_ck mean(A_k) + b_c`` the gradient of ``logit_c`` at every position
    of map ``A_k`` is ``w_ck / (h w)``, so Grad-CAM's ``ReLU(sum_k grad_k A_k)`` equals
    ``ReLU(sum_k w_ck A_k)`` up to a positive factor that its normalisation removes: a graph
    output, no gradients. The maps are kept per class so that a multi-patch image can be
    explained for its image-level class, as ``explain.py`` does.

    A calibrated model's logits are ``s_c logit_c + beta_c`` (``LogitScaling``), whose gradient
    is ``s_c w_ck / (h w)``: the weights are scaled by ``s_c`` first. For a temperature that is
    one positive factor (normalised away); vector scaling's ``s_c`` may be negative, which turns
    the class's map inside out exactly as the gradient Grad-CAM of the calibrated model does.
    """

    def __init__(self, model: NormalizedClassifier, layer: str, classifier: str) -> None:
        super().__init__()
        self.model = model
        self.layer, self.classifier = layer, classifier

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        maps: list[Tensor] = []
        hook = self.model.get_submodule(self.layer).register_forward_hook(
            lambda m, i, out: maps.append(out)
        )
        try:
            logits = self.model(images)
        finally:
            hook.remove()
        linear = self.model.get_submodule(self.classifier)
        assert isinstance(linear, nn.Linear)
        weight = linear.weight  # (C, K)
        scaling = self.model.calibration
        if scaling.active:  # d(s_c logit_c)/dA = s_c w_c: the calibrated class score's gradient
            weight = weight * scaling.scale.reshape(-1, 1)  # (1, 1) temperature, (C, 1) vector
        cam = torch.relu(torch.einsum("ck,nkhw->nchw", weight, maps[-1]))
        return torch.softmax(logits, dim=1), cam, logits


class MilServingGraph(nn.Module):
    """One bag of any size: patches (N, 3, S, S) in [0, 1] -> probabilities (1, C), attention (N,).

    The backbone, the instance embedding, attention pooling, classifier and softmax in one
    graph, so serving a bag is one ONNX Runtime call (after the stain graph) with no torch.
    """

    def __init__(self, model: AttentionMIL) -> None:
        super().__init__()
        if model.encoder is None:
            raise ValueError("a MIL model on precomputed features has no image encoder to export")
        self.model = model

    def forward(self, patches: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        assert self.model.encoder is not None
        h = self.model.embed(self.model.encoder(patches)).unsqueeze(0)  # (1, N, D)
        mask = torch.ones_like(h[..., 0], dtype=torch.bool)
        pooled, attention = self.model.pool(h, mask)
        logits = self.model.classify(pooled)
        return torch.softmax(logits, dim=1), attention[0], logits


class MilInstanceGraph(nn.Module):
    """A bag's patches in any number and chunk: patches (N, 3, S, S) in [0, 1] -> embeddings
    (N, D) and attention scores (N,). The costly part of a bag model, run chunk by chunk, so a
    large image's memory stays that of one chunk (``MilHeadGraph`` then pools the bag)."""

    def __init__(self, model: AttentionMIL) -> None:
        super().__init__()
        if model.encoder is None:
            raise ValueError("a MIL model on precomputed features has no image encoder to export")
        self.model = model

    def forward(self, patches: Tensor) -> tuple[Tensor, Tensor]:
        assert self.model.encoder is not None
        h = self.model.embed(self.model.encoder(patches))
        return h, self.model.pool.scores(h)


class MilHeadGraph(nn.Module):
    """A whole bag's embeddings (N, D) and scores (N,) -> probabilities (1, C), attention (N,)
    and logits (1, C): the softmax over the bag, the pooling and the classifier (calibrated
    when the run is)."""

    def __init__(self, model: AttentionMIL) -> None:
        super().__init__()
        self.model = model

    def forward(self, embeddings: Tensor, scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h, s = embeddings.unsqueeze(0), scores.unsqueeze(0)
        pooled, attention = self.model.pool.pool(h, s, torch.ones_like(s, dtype=torch.bool))
        logits = self.model.classify(pooled)
        return torch.softmax(logits, dim=1), attention[0], logits
