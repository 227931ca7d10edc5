"""The run directory: one owner for its layout, and ``run.json``, what inference needs.

Every module that reads or writes a run goes through :class:`RunDir` for file names, so the
layout is written down once::

    RUN/config.yaml           resolved config (what was actually used)
    RUN/metadata.json         version, git commit, torch, platform, seed, dataset fingerprint
    RUN/run.json              model + preprocessing contract for inference (RunSpec)
    RUN/split.csv             the exact split (path, label, group, split)
    RUN/split_report.json     images and groups per class per split, leakage warnings
    RUN/skipped_files.json    unreadable files left out (only with data.skip_unreadable)
    RUN/checkpoints/          best.ckpt, last.ckpt, scheduled epoch_NNN.ckpt + schedule.json
    RUN/logs/csvN/, tbN/      metrics.csv and TensorBoard events per (re)start
    RUN/train_summary.json    best score, epochs, wall time
    RUN/reports/test/         the report on the run's own test split
    RUN/distill_plan.json     distillation: teacher run and checkpoint per student epoch
    RUN/teacher_switches.json distillation: when each teacher checkpoint was loaded
    RUN/features/             MIL: cached patch features
    RUN/calibration.json      post-hoc calibration fitted on validation (CalibrationSpec)
    RUN/calibration/          reliability and accuracy-coverage figures of that fit

Evaluation, export and serving rebuild the model and its preprocessing from ``run.json`` alone
(:class:`RunSpec`, with typed :class:`PatchSpec`, :class:`StainSpec` and :class:`MilSpec`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from histolite.errors import HistoliteError
from histolite.fileio import read_json, write_json

RUN_SPEC_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"
SPLIT_FILE = "split.csv"


@dataclass(frozen=True)
class RunDir:
    """File names of one run directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metadata(self) -> Path:
        return self.root / "metadata.json"

    @property
    def spec(self) -> Path:
        return self.root / RUN_SPEC_FILE

    @property
    def split_csv(self) -> Path:
        return self.root / SPLIT_FILE

    @property
    def split_report(self) -> Path:
        return self.root / "split_report.json"

    @property
    def skipped_files(self) -> Path:
        return self.root / "skipped_files.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINT_DIR

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def train_summary(self) -> Path:
        return self.root / "train_summary.json"

    @property
    def test_report_dir(self) -> Path:
        return self.root / "reports" / "test"

    @property
    def distill_plan(self) -> Path:
        return self.root / "distill_plan.json"

    @property
    def teacher_switches(self) -> Path:
        return self.root / "teacher_switches.json"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration.json"

    @property
    def calibration_figures(self) -> Path:
        return self.root / "calibration"

    def checkpoint(self, which: str = "best") -> Path:
        """``best`` / ``last`` or an explicit checkpoint file name; must exist."""
        name = which if which.endswith(".ckpt") else f"{which}.ckpt"
        path = self.checkpoints / name
        if not path.is_file():
            raise HistoliteError(f"{path}: checkpoint not found; did training finish an epoch?")
        return path

    def metric_files(self) -> list[Path]:
        """Every ``metrics.csv`` of the run, one per (re)start, in order."""
        return sorted(self.logs.glob("csv*/metrics.csv"))


@dataclass(frozen=True)
class PatchSpec:
    """Grid patches of an image: side, step between patches (default: no overlap), tissue."""

    size: int
    stride: int | None = None
    min_tissue: float = 0.0

    @property
    def step(self) -> int:
        return self.stride or self.size

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchSpec:
        return cls(
            size=int(data["size"]),
            stride=int(data["stride"]) if data.get("stride") else None,
            min_tissue=float(data.get("min_tissue", 0.0)),
        )


@dataclass(frozen=True)
class StainSpec:
    """The stain target, kept so inference needs no reference image.

    Reinhard: CIELAB mean and std. Macenko: the H and E stain vectors, their 99th-percentile
    strengths and the fallback for tiles without enough tissue.
    """

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    ignore_background: bool = False
    method: str = "reinhard"
    colour_space: str = "CIELAB-D65"
    source: str | None = None
    stain_matrix: tuple[tuple[float, ...], ...] | None = None
    max_concentrations: tuple[float, ...] | None = None
    fallback: str | None = None
    min_tissue: float | None = None

    def statistics(self) -> tuple[Any, ...]:
        """What decides the normalisation (not where the target was read from)."""
        return (
            self.method,
            self.colour_space,
            self.mean,
            self.std,
            self.ignore_background,
            self.stain_matrix,
            self.max_concentrations,
            self.fallback,
        )

    def describe(self) -> str:
        if self.method == "macenko":
            return f"macenko to stains {self.stain_matrix}"
        return f"{self.method} to mean {list(self.mean or ())}, std {list(self.std or ())}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StainSpec:
        def floats(key: str) -> tuple[float, ...] | None:
            return tuple(float(v) for v in data[key]) if data.get(key) is not None else None

        matrix = data.get("stain_matrix")
        return cls(
            mean=floats("mean"),
            std=floats("std"),
            ignore_background=bool(data.get("ignore_background", False)),
            method=str(data.get("method", "reinhard")),
            colour_space=str(data.get("colour_space", "CIELAB-D65")),
            source=data.get("source"),
            stain_matrix=tuple(tuple(float(v) for v in row) for row in matrix) if matrix else None,
            max_concentrations=floats("max_concentrations"),
            fallback=data.get("fallback"),
            min_tissue=float(data["min_tissue"]) if data.get("min_tissue") is not None else None,
        )


@dataclass(frozen=True)
class CalibrationSpec:
    """What ``histolite calibrate`` fitted on a run's validation split, and for which weights.

    ``scale`` / ``bias`` multiply and shift the logits (temperature T: scale 1/T, bias 0).
    ``abstain_below``: answers with a top probability under it are flagged uncertain (chosen so
    the answered validation images reach ``abstention["target"]`` accuracy; None if none did).
    ``ood``: the out-of-distribution score chosen on validation and the value under which an
    image is flagged. The file records the checkpoint's SHA-256: a calibration applies only to
    the weights it was fitted for.
    """

    method: str
    scale: tuple[float, ...]
    bias: tuple[float, ...]
    checkpoint: str
    checkpoint_sha256: str
    temperature: float | None = None
    abstain_below: float | None = None
    abstention: dict[str, Any] | None = None
    ood: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None  # metrics before and after, on validation

    def save(self, run_dir: str | Path) -> Path:
        return write_json(RunDir(Path(run_dir)).calibration, asdict(self))

    @classmethod
    def load(cls, run_dir: str | Path) -> CalibrationSpec | None:
        """The run's calibration, or None if it has none."""
        path = RunDir(Path(run_dir)).calibration
        if not path.is_file():
            return None
        data = read_json(path)
        try:
            data["scale"] = tuple(float(v) for v in data["scale"])
            data["bias"] = tuple(float(v) for v in data["bias"])
            return cls(**data)
        except (KeyError, TypeError, ValueError) as exc:
            raise HistoliteError(f"{path}: malformed calibration ({exc})") from exc


@dataclass(frozen=True)
class MilSpec:
    """What rebuilds an attention-MIL model: pooling, layer sizes, and its instances' patches."""

    pooling: str
    embed_dim: int
    attention_dim: int
    dropout: float
    patch: PatchSpec | None
    feature_dim: int | None = None  # slide bags: precomputed features per tile
    features: dict[str, Any] | None = None  # slide bags: how the features were made

    @property
    def precomputed(self) -> bool:
        return self.patch is None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MilSpec:
        return cls(
            pooling=str(data["pooling"]),
            embed_dim=int(data["embed_dim"]),
            attention_dim=int(data["attention_dim"]),
            dropout=float(data["dropout"]),
            patch=PatchSpec.from_dict(data["patch"]) if data.get("patch") else None,
            feature_dim=int(data["feature_dim"]) if data.get("feature_dim") else None,
            features=data.get("features"),
        )


@dataclass(frozen=True)
class RunSpec:
    model_name: str
    classes: tuple[str, ...]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    head: str = "default"
    head_dropout: float = 0.4
    stain: StainSpec | None = None
    patches: PatchSpec | None = None
    mil: MilSpec | None = None
    mpp: float | None = None  # microns per pixel of the training images, as read

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def save(self, run_dir: str | Path) -> Path:
        return write_json(RunDir(Path(run_dir)).spec, asdict(self))

    @classmethod
    def load(cls, run_dir: str | Path) -> RunSpec:
        path = RunDir(Path(run_dir)).spec
        if not path.is_file():
            raise HistoliteError(
                f"{run_dir}: not a histolite run (no {RUN_SPEC_FILE}); pass the --out folder of "
                "`histolite train`"
            )
        data = read_json(path)
        try:
            data.pop("extra", None)  # written by histolite <= 0.1, never read
            data["classes"] = tuple(data["classes"])
            data["mean"] = tuple(data["mean"])
            data["std"] = tuple(data["std"])
            for key, kind in (("stain", StainSpec), ("patches", PatchSpec), ("mil", MilSpec)):
                if data.get(key) is not None:
                    data[key] = kind.from_dict(data[key])
            return cls(**data)
        except (KeyError, TypeError, ValueError) as exc:
            raise HistoliteError(f"{path}: malformed run spec ({exc})") from exc


def checkpoint_path(run_dir: str | Path, which: str = "best") -> Path:
    """``best`` / ``last`` or an explicit checkpoint file name in the run's checkpoints folder."""
    return RunDir(Path(run_dir)).checkpoint(which)


def is_rank_zero() -> bool:
    """True in the main process of a (possibly distributed) run, even before Lightning starts."""
    return all(int(os.environ.get(var, "0")) == 0 for var in ("RANK", "LOCAL_RANK", "NODE_RANK"))
