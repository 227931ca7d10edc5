"""Rebuild a trained classifier from a run directory, without unpickling anything.

Lives in `models` so that training (a distillation teacher) and evaluation can both use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from histolite.errors import HistoliteError
from histolite.fileio import file_sha256
from histolite.models import NormalizedClassifier, create_model
from histolite.models.calibration import logit_scaling_of
from histolite.models.mil import build_attention_mil
from histolite.runspec import CalibrationSpec, RunDir, RunSpec, checkpoint_path
from histolite.stain import ReinhardNormalizer, ReinhardStats
from histolite.stain.macenko import MacenkoNormalizer, MacenkoStats


@dataclass
class LoadedRun:
    """A trained model with its preprocessing; ``model`` is an :class:`AttentionMIL` for MIL runs
    (it returns logits and attention) and a :class:`NormalizedClassifier` otherwise."""

    run_dir: Path
    spec: RunSpec
    model: nn.Module
    stain: ReinhardNormalizer | MacenkoNormalizer | None
    checkpoint: Path | None = None
    calibration: CalibrationSpec | None = None  # applied to ``model``
    calibration_note: str | None = None  # why a run's calibration was not applied

    @property
    def is_mil(self) -> bool:
        return self.spec.mil is not None


def model_state_from_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The ``model.*`` tensors of a Lightning checkpoint, loaded with ``weights_only=True``."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise HistoliteError(f"{path}: cannot read checkpoint ({exc})") from exc
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise HistoliteError(f"{path}: not a Lightning checkpoint (no state_dict)")
    prefix = "model."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def stain_from_spec(spec: RunSpec) -> ReinhardNormalizer | MacenkoNormalizer | None:
    """The run's stain normaliser, rebuilt from run.json (no reference image needed)."""
    stain = spec.stain
    if stain is None:
        return None
    if stain.method == "macenko":
        assert stain.stain_matrix is not None and stain.max_concentrations is not None
        target = MacenkoStats(
            (tuple(stain.stain_matrix[0]), tuple(stain.stain_matrix[1])),  # type: ignore[arg-type]
            (stain.max_concentrations[0], stain.max_concentrations[1]),
        )
        return MacenkoNormalizer(
            target,
            min_tissue=stain.min_tissue if stain.min_tissue is not None else 0.05,
            fallback=stain.fallback or "unchanged",  # type: ignore[arg-type]
        )
    assert stain.mean is not None and stain.std is not None
    stats = ReinhardStats(mean=stain.mean, std=stain.std)
    return ReinhardNormalizer(stats, ignore_background=stain.ignore_background)


def load_run(
    run_dir: str | Path,
    checkpoint: str = "best",
    device: str | None = None,
    *,
    calibrated: bool = True,
) -> LoadedRun:
    """Model (eval mode) + preprocessing of a run; ``checkpoint`` is best, last or a file name.

    With ``calibrated``, the run's ``calibration.json`` is applied when it was fitted for these
    very weights (its checkpoint SHA-256); otherwise ``calibration_note`` says why not.
    """
    run_dir = Path(run_dir)
    spec = RunSpec.load(run_dir)
    model: nn.Module
    if spec.mil is not None:
        model = build_attention_mil(
            spec.model_name, spec.num_classes, spec.mean, spec.std, spec.mil
        )
    else:
        net = create_model(
            spec.model_name,
            spec.num_classes,
            head=spec.head,  # type: ignore[arg-type]
            head_dropout=spec.head_dropout,
        )
        model = NormalizedClassifier(net, spec.mean, spec.std)
    path = checkpoint_path(run_dir, checkpoint)
    state = model_state_from_checkpoint(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise HistoliteError(f"{path}: weights do not fit {spec.model_name} ({exc})") from exc
    loaded = LoadedRun(run_dir, spec, model, stain_from_spec(spec), checkpoint=path)
    if calibrated:
        apply_calibration(loaded)
    model.eval().to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return loaded


def apply_calibration(run: LoadedRun) -> None:
    """Put the run's calibration into its model, if it was fitted for the loaded weights."""
    calibration = CalibrationSpec.load(run.run_dir)
    if calibration is None or run.checkpoint is None:
        return
    if calibration.checkpoint_sha256 != file_sha256(run.checkpoint):
        run.calibration_note = (
            f"{RunDir(run.run_dir).calibration} was fitted for {calibration.checkpoint}, not "
            f"{run.checkpoint.name}: probabilities are uncalibrated (run `histolite calibrate "
            f"{run.run_dir} --checkpoint {run.checkpoint.stem}`)"
        )
        return
    logit_scaling_of(run.model).set(calibration.scale, calibration.bias)
    run.calibration = calibration


def require_classifier(run: LoadedRun, purpose: str) -> NormalizedClassifier:
    """The run's image classifier, or a clear error for MIL runs (bag models)."""
    if not isinstance(run.model, NormalizedClassifier):
        raise HistoliteError(
            f"{run.run_dir} is an attention-MIL run; {purpose} needs an image or patch "
            "classifier run"
        )
    return run.model
