"""Metrics, reports and plots for trained runs."""

from histolite.evaluate.loading import LoadedRun, load_run
from histolite.evaluate.metrics import classification_metrics
from histolite.evaluate.report import evaluate_run

__all__ = ["LoadedRun", "classification_metrics", "evaluate_run", "load_run"]
