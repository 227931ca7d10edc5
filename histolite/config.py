"""Typed experiment config, read from YAML with ``yaml.safe_load`` into pydantic models.

One YAML file describes one experiment. ``--set a.b=value`` overrides take YAML values
(``3``, ``true``, ``null``, ``[1, 2]``). Unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from histolite.errors import ConfigError
from histolite.runspec import PatchSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StainConfig(_Strict):
    """Stain normalisation of every image before the model sees it (training and serving)."""

    method: Literal["reinhard", "macenko"] = Field(
        default="reinhard", description="Reinhard (Lab statistics) or Macenko (stain vectors)"
    )
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
    """A grid of square patches cut from each image."""

    size: int = Field(gt=0, description="patch side in pixels of the source image")
    stride: int | None = Field(default=None, gt=0, description="defaults to size (no overlap)")
    min_tissue: float = Field(
        default=0.0, ge=0.0, le=1.0, description="patches with less tissue than this are dropped"
    )

    def spec(self) -> PatchSpec:
        return PatchSpec(self.size, self.stride, self.min_tissue)


class DataConfig(_Strict):
    """Where the images are, how they are split, and what is done to them before the model."""

    dataset: str = Field(
        default="folder",
        description="registry name (`histolite data list`): its file layout, classes and groups",
    )
    root: str | None = Field(default=None, description="`ROOT/<class>/<image>` folders")
    split_csv: str | None = Field(
        default=None,
        description="instead of root: a split CSV (path,label,group,split) from `histolite data "
        "split`",
    )
    image_size: int = Field(default=112, ge=8, description="images (or patches) resized to this")
    mpp: float | None = Field(
        default=None,
        gt=0.0,
        description=(
            "microns per pixel of the images (default: the dataset's, e.g. Kather 0.495); "
            "recorded in the model card so slides are tiled at the training magnification"
        ),
    )
    val_fraction: float = Field(
        default=0.15, ge=0.0, lt=1.0, description="share of root held out for validation"
    )
    test_fraction: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="share of root held out for test"
    )
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
    split_seed: int | None = Field(
        default=None,
        description="seed of the split (default: the run's seed); fix it so runs with other "
        "seeds share one split, as distillation requires",
    )
    batch_size: int = Field(default=64, ge=1)
    num_workers: int = Field(default=2, ge=0, description="data-loading processes")
    skip_unreadable: bool = Field(
        default=False,
        description="train without unreadable files (listed in RUN/skipped_files.json) instead "
        "of stopping",
    )
    normalize: Literal["train", "imagenet", "model", "none"] = Field(
        default="train",
        description=(
            "input mean/std: of the training images, ImageNet's, the pretrained weights' own "
            "(model), or none"
        ),
    )
    mean_std_samples: int = Field(
        default=2000, ge=1, description="normalize=train: training images the mean/std is from"
    )
    stain: StainConfig | None = None
    patches: PatchConfig | None = Field(
        default=None, description="train and evaluate on grid patches of each image"
    )


class ColorJitterConfig(_Strict):
    """torchvision ColorJitter strengths on training images."""

    brightness: float = Field(default=0.0, ge=0.0)
    contrast: float = Field(default=0.0, ge=0.0)
    saturation: float = Field(default=0.0, ge=0.0)
    hue: float = Field(default=0.0, ge=0.0, le=0.5)


class AugmentConfig(_Strict):
    """Random changes to training images (never to validation or test)."""

    hflip: bool = Field(default=True, description="random horizontal flips")
    vflip: bool = Field(default=False, description="random vertical flips")
    rot90: bool = Field(default=False, description="random multiples of 90 degrees")
    rotation_degrees: float = Field(
        default=0.0, ge=0.0, le=180.0, description="random rotation up to this many degrees"
    )
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
    """The network (`histolite models list`)."""

    name: str = Field(default="resnet8", description="histolite, timm or torchvision name")
    pretrained: bool = Field(
        default=False,
        description="ImageNet weights: installed offline for tf_efficientnet_lite0/1/2, else a "
        "download",
    )
    weights: str | None = Field(
        default=None, description="a local weights file (safetensors / state dict, never unpickled)"
    )
    head: Literal["default", "breakhis"] = Field(
        default="default",
        description="breakhis: FC 256 -> ReLU -> dropout -> FC 100 -> ReLU -> dropout -> FC n",
    )
    head_dropout: float = Field(
        default=0.4, ge=0.0, lt=1.0, description="dropout of the breakhis head"
    )


class OptimizerConfig(_Strict):
    """The optimiser of every trainable parameter."""

    name: Literal["adam", "adamw", "adamax", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0.0, description="peak learning rate")
    weight_decay: float = Field(default=0.0, ge=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="sgd only")
    nesterov: bool = Field(default=False, description="sgd only")


class SchedulerConfig(_Strict):
    """How the learning rate changes over the epochs."""

    name: Literal["none", "step", "exponential", "plateau", "cosine", "cosine_restarts"] = "none"
    step_size: int = Field(default=10, ge=1, description="step: epochs between decays")
    gamma: float = Field(default=0.1, gt=0.0, le=1.0, description="step/exponential decay factor")
    factor: float = Field(default=0.1, gt=0.0, lt=1.0, description="plateau: decay factor")
    patience: int = Field(default=3, ge=0, description="plateau: epochs without improvement")
    min_lr: float = Field(
        default=0.0, ge=0.0, description="cosine, cosine_restarts, plateau: the lowest rate"
    )
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
    """The training loop (Lightning): length, hardware, checkpoints."""

    max_epochs: int = Field(default=10, ge=1)
    accelerator: str = Field(default="auto", description="Lightning: cpu, gpu, auto")
    devices: int | str = Field(default="auto", description="Lightning: e.g. 2 or auto (DDP)")
    num_nodes: int = Field(default=1, ge=1, description="Lightning: nodes for multi-node DDP")
    strategy: str = Field(default="auto", description="Lightning: e.g. ddp")
    precision: str = Field(default="32-true", description="Lightning: e.g. 16-mixed on a GPU")
    deterministic: bool = Field(
        default=False, description="deterministic kernels: reproducible, slower"
    )
    log_every_n_steps: int = Field(default=10, ge=1, description="metrics logging interval")
    label_smoothing: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="cross-entropy label smoothing"
    )
    monitor: Literal["val_acc", "val_loss"] = Field(
        default="val_acc", description="what ranks epochs for best.ckpt"
    )
    final_model: Literal["best_val", "last_epoch"] = Field(
        default="best_val",
        description=(
            "the run's model (checkpoints/best.ckpt): the epoch best on `monitor`, or the last "
            "epoch of the schedule; take last_epoch when the validation split is too small to "
            "rank epochs (a few hundred correlated tiles)"
        ),
    )
    progress_bar: bool = Field(default=True, description="also --no-progress on the CLI")
    channels_last: bool = Field(
        default=True, description="NHWC memory format: ~1.7x faster convolutions on CPU"
    )
    limit_train_batches: float | int | None = Field(
        default=None,
        description="Lightning: train on this many batches (int) or this share (float) per "
        "epoch; for smoke runs",
    )
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

    mode: Literal["vanilla", "multipart"] = Field(
        default="vanilla",
        description="vanilla: one teacher checkpoint; multipart: the teacher's scheduled "
        "checkpoints in turn",
    )
    temperature: float = Field(default=4.0, gt=0.0, description="softens both distributions")
    kd_weight: float = Field(default=0.5, ge=0.0, description="weight of the KL term (x T^2)")
    ce_weight: float = Field(default=1.0, ge=0.0, description="weight of the label term")
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

    seed: int = Field(
        default=42,
        description="seeds weights, augmentation and data order (and the split, unless "
        "data.split_seed is set)",
    )
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
        elif isinstance(err.get("input"), dict):  # a section's own check: the rule says it all
            lines.append(f"  {key}: {err['msg'].removeprefix('Value error, ')}")
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


def _type_name(annotation: Any) -> str:
    """A field's type as a reader of the YAML sees it (``int``, ``a | b``, ``section``)."""
    origin = get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(str(choice) for choice in get_args(annotation))
    if origin in (Union, UnionType):
        names = [_type_name(arg) for arg in get_args(annotation) if arg is not type(None)]
        optional = type(None) in get_args(annotation)
        return " \\| ".join(names) + (" \\| null" if optional else "")
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if origin is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))


def _sections(annotation: Any) -> list[type[BaseModel]]:
    members = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else ()
    return [
        member
        for member in (members or (annotation,))
        if isinstance(member, type) and issubclass(member, BaseModel)
    ]


def _first_line(section: type[BaseModel]) -> str:
    return (section.__doc__ or "").strip().split("\n")[0]


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _section_table(prefix: str, section: type[BaseModel]) -> list[str]:
    """One section's Markdown, then each of its subsections', depth first."""
    title = prefix.rstrip(".") or "top level"
    lines = ["", f"## `{title}`", ""]
    if prefix and _first_line(section):
        lines += [_first_line(section), ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, field in section.model_fields.items():
        sections = _sections(field.annotation)
        if field.is_required():
            default = "required"
        else:
            value = field.get_default(call_default_factory=True)
            default = (
                "(section)"
                if isinstance(value, BaseModel)
                else f"`{yaml.safe_dump(value, default_flow_style=True).strip()}`"
            )
            default = _cell(default.replace("\n...", ""))
        meaning = field.description or (_first_line(sections[0]) if sections else "")
        lines.append(
            f"| `{prefix}{name}` | {_type_name(field.annotation)} | {default} | {_cell(meaning)} |"
        )
        nested += [(f"{prefix}{name}.", sub) for sub in sections]
    for sub_prefix, sub in nested:
        lines += _section_table(sub_prefix, sub)
    return lines


def config_reference(model: type[BaseModel] = TrainConfig) -> str:
    """Every key of the experiment config as a Markdown table per section, from the models.

    Generated rather than written so the reference cannot drift from what the loader accepts;
    ``docs/config.md`` is this text, and a test keeps it so.
    """
    lines = [
        "# Config reference",
        "",
        "Every key `histolite train` and `histolite distill` read, generated from the typed "
        "config by `histolite config reference > docs/config.md` (do not edit by hand). "
        "Unknown keys are errors. `histolite config show RECIPE --set key=value` prints a "
        "recipe resolved with every default, without training.",
    ]
    return "\n".join(lines + _section_table("", model)) + "\n"
