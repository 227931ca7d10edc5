"""Metrics, reports and plots for trained runs."""

from histolite.evaluate.metrics import classification_metrics
from histolite.evaluate.report import evaluate_run
from histolite.models.loading import LoadedRun, load_run

__all__ = ["LoadedRun", "classification_metrics", "evaluate_run", "load_run"]
