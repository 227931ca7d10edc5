"""Typed experiment config, read from YAML with ``yaml.safe_load`` into pydantic models.

One YAML file describes one experiment. ``--set a.b=value`` overrides take YAML values
(``3``, ``true``, ``null``, ``[1, 2]``). Unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from histolite.errors import ConfigError
from histolite.runspec import PatchSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StainConfig(_Strict):
    method: Literal["reinhard", "macenko"] = "reinhard"
    target: str = Field(
        description="reference image, or the JSON `histolite stain fit` saves (Lab statistics "
        "or stain vectors)"
    )
    ignore_background: bool = Field(default=False, description="reinhard: statistics of tissue")
    fallback: Literal["unchanged", "target"] = Field(
        default="unchanged",
        description="macenko: what tiles with too little tissue get (see histolite.stain.macenko)",
    )
    min_tissue: float = Field(
        default=0.05, ge=0.0, le=1.0, description="macenko: least tissue fraction to fit stains"
    )


class PatchConfig(_Strict):
    size: int = Field(gt=0)
    stride: int | None = Field(default=None, gt=0, description="defaults to size (no overlap)")
    min_tissue: float = Field(default=0.0, ge=0.0, le=1.0)

    def spec(self) -> PatchSpec:
        return PatchSpec(self.size, self.stride, self.min_tissue)


class DataConfig(_Strict):
    dataset: str = "folder"
    root: str | None = None
    split_csv: str | None = None
    image_size: int = Field(default=112, ge=8)
    mpp: float | None = Field(
        default=None,
        gt=0.0,
        description=(
            "microns per pixel of the images (default: the dataset's, e.g. Kather 0.495); "
            "recorded in the model card so slides are tiled at the training magnification"
        ),
    )
    val_fraction: float = Field(default=0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    split_by: Literal["auto", "stratified", "group"] = Field(
        default="auto",
        description=(
            "group: whole groups (source images, slides, patients) per split, no leakage; "
            "stratified: image level; auto: group wherever the dataset or data.group_regex "
            "says what a group is (Kather: source image; BreakHis, IDC: patient)"
        ),
    )
    group_by: str | None = Field(
        default=None,
        description="a grouping the dataset names (kather2016: source_image, patient)",
    )
    group_regex: str | None = Field(
        default=None, description="regex on file names whose first group is the group key"
    )
    patients: str | None = Field(
        default=None,
        description=(
            "CSV with columns group,patient (e.g. slide,patient) mapping each group (slide) to "
            "its patient: grouped splits then keep a patient's slides together"
        ),
    )
    val_split_by: Literal["same", "group_if_possible", "stratified"] = Field(
        default="same",
        description=(
            "grouped splits: same = validation by whole groups like test; group_if_possible = "
            "by whole groups for classes with two or more training groups, by images of the "
            "training groups for the rest; stratified = by images of the training groups"
        ),
    )
    labels: str | None = Field(
        default=None,
        description="label scheme where a dataset offers several (BreakHis: binary, subtype)",
    )
    magnification: Literal[40, 100, 200, 400] | None = Field(
        default=None, description="BreakHis: keep one magnification"
    )
    split_seed: int | None = None
    batch_size: int = Field(default=64, ge=1)
    num_workers: int = Field(default=2, ge=0)
    skip_unreadable: bool = False
    normalize: Literal["train", "imagenet", "model", "none"] = Field(
        default="train",
        description=(
            "input mean/std: of the training images, ImageNet's, the pretrained weights' own "
            "(model), or none"
        ),
    )
    mean_std_samples: int = Field(default=2000, ge=1)
    stain: StainConfig | None = None
    patches: PatchConfig | None = None


class ColorJitterConfig(_Strict):
    brightness: float = Field(default=0.0, ge=0.0)
    contrast: float = Field(default=0.0, ge=0.0)
    saturation: float = Field(default=0.0, ge=0.0)
    hue: float = Field(default=0.0, ge=0.0, le=0.5)


class AugmentConfig(_Strict):
    hflip: bool = True
    vflip: bool = False
    rot90: bool = False
    rotation_degrees: float = Field(default=0.0, ge=0.0, le=180.0)
    color_jitter: ColorJitterConfig | None = None
    crop_scale: tuple[float, float] | None = Field(
        default=None,
        description="random crops of this area fraction range, resized back (e.g. [0.5, 1.0])",
    )
    mixup_alpha: float = Field(
        default=0.0, ge=0.0, description="mixup with Beta(alpha, alpha) weights; 0 = off"
    )
    hed_jitter: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="HED stain jitter (Tellez et al. 2019): scale and shift up to this; 0 = off. "
        "The shift is in natural-log optical density (scikit-image's rgb2hed units x 13.8)",
    )
    random_reinhard: bool = Field(
        default=False,
        description="normalise each training image to Lab statistics drawn around the data's",
    )
    random_macenko: bool = Field(
        default=False,
        description="normalise each training image to H&E stains drawn around the data's",
    )

    @model_validator(mode="after")
    def _crop_scale_range(self) -> AugmentConfig:
        if self.crop_scale is not None:
            low, high = self.crop_scale
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {low}, {high}")
        return self


class ModelConfig(_Strict):
    name: str = "resnet8"
    pretrained: bool = False
    weights: str | None = None
    head: Literal["default", "breakhis"] = "default"
    head_dropout: float = Field(default=0.4, ge=0.0, lt=1.0)


class OptimizerConfig(_Strict):
    name: Literal["adam", "adamw", "adamax", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    nesterov: bool = False


class SchedulerConfig(_Strict):
    name: Literal["none", "step", "exponential", "plateau", "cosine", "cosine_restarts"] = "none"
    step_size: int = Field(default=10, ge=1, description="step: epochs between decays")
    gamma: float = Field(default=0.1, gt=0.0, le=1.0, description="step/exponential decay factor")
    factor: float = Field(default=0.1, gt=0.0, lt=1.0, description="plateau: decay factor")
    patience: int = Field(default=3, ge=0, description="plateau: epochs without improvement")
    min_lr: float = Field(default=0.0, ge=0.0)
    warmup_epochs: int = Field(
        default=0,
        ge=0,
        description="linear warm-up from lr/10 before the schedule starts (not with plateau)",
    )
    cycle_epochs: int = Field(
        default=5, ge=1, description="cosine_restarts: length of the first cosine cycle"
    )
    cycle_mult: int = Field(
        default=1, ge=1, description="cosine_restarts: each cycle is this many times longer"
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> SchedulerConfig:
        if self.warmup_epochs and self.name in ("plateau", "cosine_restarts"):
            raise ValueError(f"warmup_epochs does not combine with the {self.name} scheduler")
        return self

    def cycle_ends(self, max_epochs: int) -> list[int]:
        """cosine_restarts: the epochs (1-based) after which the learning rate reaches min_lr.

        Checkpoints kept there are annealed snapshots, the good teacher checkpoints for
        multi-part distillation (``trainer.checkpoint_at``).
        """
        ends, length, done = [], self.cycle_epochs, 0
        while done + length <= max_epochs:
            done += length
            ends.append(done)
            length *= self.cycle_mult
        return ends


class TrainerConfig(_Strict):
    max_epochs: int = Field(default=10, ge=1)
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = Field(default=1, ge=1)
    strategy: str = "auto"
    precision: str = "32-true"
    deterministic: bool = False
    log_every_n_steps: int = Field(default=10, ge=1)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    monitor: Literal["val_acc", "val_loss"] = "val_acc"
    final_model: Literal["best_val", "last_epoch"] = Field(
        default="best_val",
        description=(
            "the run's model (checkpoints/best.ckpt): the epoch best on `monitor`, or the last "
            "epoch of the schedule; take last_epoch when the validation split is too small to "
            "rank epochs (a few hundred correlated tiles)"
        ),
    )
    progress_bar: bool = True
    channels_last: bool = Field(
        default=True, description="NHWC memory format: ~1.7x faster convolutions on CPU"
    )
    limit_train_batches: float | int | None = None
    checkpoint_every: int | None = Field(
        default=5,
        ge=1,
        description="keep checkpoints/epoch_NNN.ckpt every N epochs (multi-part KD)",
    )
    checkpoint_at: list[int] | None = Field(
        default=None, description="explicit epochs to keep instead of checkpoint_every"
    )


class DistillSection(_Strict):
    """Knowledge distillation from a teacher run."""

    mode: Literal["vanilla", "multipart"] = "vanilla"
    temperature: float = Field(default=4.0, gt=0.0)
    kd_weight: float = Field(default=0.5, ge=0.0)
    ce_weight: float = Field(default=1.0, ge=0.0)
    teacher_checkpoint: str = Field(
        default="last",
        description="vanilla: which teacher checkpoint (last = the final teacher, best, a file "
        "name, or early = the earliest scheduled checkpoint within 1 point of the best "
        "validation accuracy: an early-stopped teacher, chosen on validation)",
    )
    teacher_runtime: Literal["auto", "torch", "onnx"] = Field(
        default="auto",
        description="where the teacher runs: auto = ONNX Runtime on CPU, PyTorch on GPU",
    )
    teacher_tta: bool = Field(
        default=False,
        description="the teacher labels each view as the mean over its 8 flips/rotations "
        "(a stronger guide where `evaluate --tta` shows one; 8x the teacher's cost)",
    )
    crossfit_targets: Literal["out_of_fold", "ensemble"] = Field(
        default="out_of_fold",
        description="a cross-fitted teacher run (crossfit: in its recipe): each image labelled "
        "by the fold teacher that never trained on its group, or by the mean of all K",
    )


class CrossfitConfig(_Strict):
    """Train K teachers, each without one fold of the training groups (``histolite train``)."""

    folds: int = Field(default=5, ge=2, description="teachers, one left-out fold each")
    seed: int | None = Field(
        default=None, description="seed of the fold assignment (default: the run's seed)"
    )


class MILConfig(_Strict):
    """Attention-based multiple-instance learning: each image is a bag of its grid patches."""

    patch: PatchConfig | None = Field(
        default=None,
        description=(
            "instances: grid patches of each image; leave out for data.dataset=slide_features, "
            "whose instances are precomputed tile features"
        ),
    )
    pooling: Literal["attention", "gated"] = Field(
        default="gated", description="Ilse et al. 2018 attention, or its gated variant"
    )
    embed_dim: int = Field(default=128, ge=1, description="instance embedding size")
    attention_dim: int = Field(default=64, ge=1, description="hidden size of the attention net")
    dropout: float = Field(default=0.25, ge=0.0, lt=1.0)
    freeze_backbone: bool = Field(
        default=True, description="train only embedding, attention and classifier"
    )
    cache_features: bool = Field(
        default=True,
        description="frozen backbone: compute patch features once and keep them on disk",
    )
    feature_cache: str | None = Field(
        default=None, description="folder for cached features (default RUN/features)"
    )
    max_instances: int | None = Field(
        default=None, ge=1, description="training: a random subset of each bag's patches"
    )


class TrainConfig(_Strict):
    """One supervised experiment."""

    seed: int = 42
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    distill: DistillSection | None = Field(
        default=None,
        description="used by `histolite distill`; `histolite train` trains the student alone",
    )
    mil: MILConfig | None = Field(
        default=None, description="train an attention-MIL bag classifier instead of a CNN"
    )
    crossfit: CrossfitConfig | None = Field(
        default=None,
        description="train K cross-fitted teachers (folds of the training groups) in one run",
    )

    @model_validator(mode="after")
    def _check_data_source(self) -> TrainConfig:
        if self.data.root is None and self.data.split_csv is None:
            raise ValueError("set data.root (an image folder) or data.split_csv (a split CSV)")
        if self.mil is not None and self.data.patches is not None:
            raise ValueError(
                "data.patches (patch-level classification) and mil (images as bags of patches) "
                "exclude each other; MIL instances are set by mil.patch"
            )
        features = self.data.dataset == "slide_features"
        if self.mil is not None and features and self.mil.patch is not None:
            raise ValueError("slide feature bags are already tiles: remove mil.patch")
        if self.mil is not None and not features and self.mil.patch is None:
            raise ValueError("mil.patch is required: the patches that make each image a bag")
        if features and self.mil is None:
            raise ValueError("data.dataset=slide_features trains attention MIL: add a mil section")
        if self.crossfit is not None and self.mil is not None:
            raise ValueError("crossfit trains image classifiers (teachers): remove the mil section")
        return self


class DistillConfig(TrainConfig):
    """A supervised config whose ``distill`` section is always present."""

    distill: DistillSection = Field(default_factory=DistillSection)


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (['a', 'b', 'c'], YAML-parsed value)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. trainer.max_epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted key in a nested dict (creating sections); returns the same dict."""
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {key!r} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    model: type[_Strict] = TrainConfig,
    *,
    recipe: bool = True,
) -> Any:
    """Read YAML (or start empty), apply ``--set`` overrides, validate into ``model``.

    A relative ``data.stain.target`` written in a recipe is relative to the recipe, so a recipe
    can ship its stain target beside it and run from any directory; ``--set`` paths stay
    relative to the working directory, like every other path on the command line. A run's saved
    ``config.yaml`` is not a recipe (``recipe=False``): its paths are kept as they were given.
    """
    data = read_yaml(path) if path is not None else {}
    if path is not None and recipe:
        _anchor_stain_target(data, Path(path).parent)
    apply_overrides(data, overrides or [])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path or "config"))) from exc


def _anchor_stain_target(data: dict[str, Any], folder: Path) -> None:
    section = data.get("data")
    stain = section.get("stain") if isinstance(section, dict) else None
    if not isinstance(stain, dict):
        return
    target = stain.get("target")
    if isinstance(target, str) and target and not Path(target).expanduser().is_absolute():
        stain["target"] = str((folder / target).resolve())


def dump_config(config: BaseModel) -> str:
    """The resolved config as YAML (what a run actually used)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
