"""Lightning training: supervised classification (distillation and MIL build on it)."""

from histolite.train.module import ClassifierModule
from histolite.train.runner import build_classifier, resolve_config, train_run

__all__ = ["ClassifierModule", "build_classifier", "resolve_config", "train_run"]
