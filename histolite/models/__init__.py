"""Model registry: histolite students, timm / torchvision backbones by name."""

from histolite.models import mobile_student as _mobile_student  # noqa: F401  (registers models)
from histolite.models import resnet_cifar as _resnet_cifar  # noqa: F401  (registers models)
from histolite.models.compute import ModelCost, count_macs, count_parameters, weight_size_mb
from histolite.models.registry import (
    FEATURED_BACKBONES,
    BreakHisHead,
    create_model,
    has_installable_weights,
    list_model_names,
    model_cost,
    model_source,
    pretrained_mean_std,
    register_model,
    registered_models,
)
from histolite.models.wrapper import NormalizedClassifier

__all__ = [
    "FEATURED_BACKBONES",
    "BreakHisHead",
    "ModelCost",
    "NormalizedClassifier",
    "count_macs",
    "count_parameters",
    "create_model",
    "has_installable_weights",
    "list_model_names",
    "model_cost",
    "model_source",
    "pretrained_mean_std",
    "register_model",
    "registered_models",
    "weight_size_mb",
]
