"""Model registry: histolite students, timm / torchvision backbones by name."""

from histolite.models import resnet_cifar as _resnet_cifar  # noqa: F401  (registers models)
from histolite.models.registry import (
    FEATURED_BACKBONES,
    BreakHisHead,
    ModelSize,
    count_parameters,
    create_model,
    model_size,
    model_source,
    register_model,
    registered_models,
    weight_size_mb,
)
from histolite.models.wrapper import NormalizedClassifier

__all__ = [
    "FEATURED_BACKBONES",
    "BreakHisHead",
    "ModelSize",
    "NormalizedClassifier",
    "count_parameters",
    "create_model",
    "model_size",
    "model_source",
    "register_model",
    "registered_models",
    "weight_size_mb",
]
