"""``histolite`` command line: one command per pipeline step."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import typer

from histolite.errors import HistoliteError

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Small, accurate, deployable classifiers for H&E histology images.",
)
data_app = typer.Typer(no_args_is_help=True, help="Datasets: download, check, split, synthetic.")
stain_app = typer.Typer(no_args_is_help=True, help="Stain normalisation.")
models_app = typer.Typer(no_args_is_help=True, help="Model registry.")
app.add_typer(data_app, name="data")
app.add_typer(stain_app, name="stain")
audit_app = typer.Typer(no_args_is_help=True, help="The service's prediction audit log.")
app.add_typer(models_app, name="models")
app.add_typer(audit_app, name="audit")

SET_HELP = (
    "Override a config value with a dotted key, e.g. --set trainer.max_epochs=3 (repeatable)."
)

# Options shared by `train` and `distill`.
RUN_OUT = typer.Option(..., "--out", help="Run directory to create (or resume).")
OVERRIDES = typer.Option([], "--set", help=SET_HELP)
RESUME = typer.Option(False, "--resume", help="Continue RUN from its last checkpoint.")
ACCELERATOR = typer.Option(None, help="Lightning accelerator: cpu, gpu, auto.")
DEVICES = typer.Option(None, help="Lightning devices, e.g. 2 or auto.")
NUM_NODES = typer.Option(None, "--num-nodes", help="Nodes for multi-node DDP.")
STRATEGY = typer.Option(None, help="Lightning strategy, e.g. ddp.")
PROGRESS = typer.Option(True, help="Show progress bars.")


# ---------------------------------------------------------------- data
@data_app.command("list")
def data_list() -> None:
    """List registered datasets."""
    from histolite.data.registry import list_datasets

    for spec in list_datasets():
        typer.echo(f"{spec.name:<16} {spec.description}")


@data_app.command("download")
def data_download(
    name: str = typer.Argument(..., help="Registered dataset name, e.g. kather2016."),
    to: Path = typer.Option(..., "--to", help="Destination folder."),
    source: Path | None = typer.Option(
        None, "--source", help="Use an archive you already downloaded (verified like a download)."
    ),
) -> None:
    """Download (or take a local copy of) a dataset archive, verify its checksum, extract it."""
    from histolite.data.registry import download_dataset, file_digests, get_dataset

    extracted = download_dataset(name, to, source=source)
    spec = get_dataset(name)
    if spec.filename and not (spec.md5 or spec.sha384):
        digests = file_digests(to / spec.filename)
        typer.echo(
            f"{spec.name} publishes no checksum; record this archive's md5 {digests['md5']} "
            f"(sha384 {digests['sha384']}) to detect changes later"
        )
    typer.echo(f"extracted to {extracted}")


DATASET = typer.Option(
    "folder", "--dataset", help="Registered dataset whose layout to read (see `data list`)."
)
LABELS = typer.Option(None, "--labels", help="Label scheme, e.g. BreakHis binary or subtype.")
MAGNIFICATION = typer.Option(None, "--magnification", help="BreakHis: 40, 100, 200 or 400.")


@data_app.command("check")
def data_check(
    root: Path = typer.Argument(..., help="Dataset folder (ROOT/<class>/<image> for 'folder')."),
    dataset: str = DATASET,
    labels: str | None = LABELS,
    magnification: int | None = MAGNIFICATION,
) -> None:
    """Read every image; print class counts and every unreadable, wrong-mode or odd-size file."""
    from histolite.data.check import check_images
    from histolite.data.layouts import scan_dataset

    images = scan_dataset(dataset, root, labels=labels, magnification=magnification)
    report = check_images(images.samples, images.classes)
    groups = len({s.group for s in images.samples})
    typer.echo(
        f"{root}: {len(images.samples)} images, {len(images.classes)} classes, {groups} groups"
    )
    for line in report.summary_lines():
        typer.echo(line)
    if report.problems:
        raise typer.Exit(1)


@data_app.command("split")
def data_split(
    root: Path = typer.Argument(..., help="Dataset folder (ROOT/<class>/<image> for 'folder')."),
    out: Path = typer.Option(..., "--out", help="CSV to write (path,label,group,split)."),
    dataset: str = DATASET,
    labels: str | None = LABELS,
    magnification: int | None = MAGNIFICATION,
    val: float = typer.Option(0.15, help="Validation fraction."),
    test: float = typer.Option(0.15, help="Test fraction."),
    seed: int = typer.Option(42, help="Random seed (same seed, same split, on every machine)."),
    split_by: str = typer.Option(
        "auto",
        "--split-by",
        help="group (whole patients/slides per split), stratified (image level), or auto: "
        "group where the dataset names patients or --group-regex is given.",
    ),
    group_regex: str | None = typer.Option(
        None,
        "--group-regex",
        help="Regex on file names; its first group is the slide/patient key. Whole groups stay "
        "in one split (no leakage).",
    ),
) -> None:
    """Write a reproducible train/val/test split CSV and its split report (JSON)."""
    from histolite.config import DataConfig
    from histolite.data.folder import LabelledImages
    from histolite.data.splits import write_split_csv
    from histolite.fileio import write_json
    from histolite.train.data import load_labelled_data, prepared_split_report

    if split_by == "auto" and group_regex is not None:
        split_by = "group"
    cfg = DataConfig(
        dataset=dataset,
        root=str(root),
        labels=labels,
        magnification=magnification,  # type: ignore[arg-type]
        val_fraction=val,
        test_fraction=test,
        split_by=split_by,  # type: ignore[arg-type]
        group_regex=group_regex,
        split_seed=seed,
    )
    classes, splits, given = load_labelled_data(cfg, seed)
    rows = [(s, name) for name in ("train", "val", "test") for s in splits[name]]
    write_split_csv(
        out, LabelledImages(classes, tuple(s for s, _ in rows)), [name for _, name in rows]
    )
    report = prepared_split_report(cfg, classes, splits, given)
    write_json(out.with_suffix(".report.json"), report)
    kind = str(report["group_kind"])
    typer.echo(
        f"wrote {out} ({report['split_by']} split): "
        + ", ".join(
            f"{name} {len(part)} images / {len({s.group for s in part})} {kind}s"
            for name, part in splits.items()
            if part
        )
    )


@data_app.command("bags")
def data_bags(
    root: Path = typer.Argument(..., help="Labelled tiles (any registered layout)."),
    out: Path = typer.Option(..., "--out", help="Folder for positive/ and negative/ bag images."),
    positive: str = typer.Option(..., "--positive", help="Class that makes a bag positive."),
    dataset: str = DATASET,
    grid: int = typer.Option(3, help="Tiles per side of each bag."),
    bags_per_class: int = typer.Option(
        100, "--bags-per-class", help="Positive and negative bags each."
    ),
    max_positive: int = typer.Option(2, "--max-positive", help="Most positive tiles in a bag."),
    tile_size: int = typer.Option(64, "--tile-size", help="Tiles are resized to this size."),
    within_group: bool = typer.Option(
        False, "--within-group", help="Draw each bag's tiles from one patient/slide."
    ),
    seed: int = typer.Option(0, help="Seed; the same arguments give the same bags."),
) -> None:
    """Build MIL bags as tile mosaics (positive iff a --positive tile is present) + bags.csv."""
    from histolite.data.layouts import scan_dataset
    from histolite.data.mosaic import MosaicSpec, build_mosaic_bags

    images = scan_dataset(dataset, root)
    spec = MosaicSpec(
        positive=positive,
        grid=grid,
        bags_per_class=bags_per_class,
        max_positive=max_positive,
        tile_size=tile_size,
        within_group=within_group,
    )
    build_mosaic_bags(images, out, spec, seed=seed)
    typer.echo(f"wrote {2 * bags_per_class} bags of {grid}x{grid} tiles to {out}")


@data_app.command("synthetic")
def data_synthetic(
    out: Path = typer.Option(..., "--out", help="Folder to write ROOT/<class>/<image>.png into."),
    images_per_class: int = typer.Option(60, help="Images per class."),
    size: int = typer.Option(64, help="Tile size in pixels."),
    slides: int = typer.Option(6, help="Simulated slides (stain variants)."),
    seed: int = typer.Option(0, help="Seed; same arguments give the same pixels."),
) -> None:
    """Generate the built-in synthetic H&E-like dataset."""
    from histolite.data.synthetic import generate_synthetic_dataset

    generate_synthetic_dataset(
        out, images_per_class=images_per_class, image_size=size, slides=slides, seed=seed
    )
    typer.echo(f"wrote synthetic dataset to {out}")


# ---------------------------------------------------------------- stain
@stain_app.command("normalize")
def stain_normalize(
    inputs: list[Path] = typer.Argument(..., help="Images to normalise."),
    target: Path = typer.Option(
        ..., "--target", help="Reference image, or saved statistics (.json)."
    ),
    out: Path = typer.Option(..., "--out", help="Output folder (same file names)."),
    save_target: Path | None = typer.Option(None, help="Also save the target statistics as JSON."),
    ignore_background: bool = typer.Option(
        False, help="Statistics from tissue only; leave bright background untouched."
    ),
) -> None:
    """Reinhard stain normalisation of images to a target."""
    import torch
    from tqdm import tqdm

    from histolite.data.images import load_rgb, save_rgb
    from histolite.fileio import atomic_path
    from histolite.stain import ReinhardNormalizer

    normalizer = ReinhardNormalizer.from_file(target, ignore_background=ignore_background)
    if save_target:
        normalizer.save(save_target)
    out.mkdir(parents=True, exist_ok=True)
    for path in tqdm(inputs, desc="normalising", disable=len(inputs) < 2):
        pixels = torch.from_numpy(load_rgb(path)).permute(2, 0, 1)
        result = normalizer(pixels).permute(1, 2, 0).numpy()
        destination = out / path.name
        with atomic_path(destination) as tmp:
            save_rgb(result, tmp.with_suffix(path.suffix))
            tmp.with_suffix(path.suffix).replace(tmp)
    typer.echo(f"normalised {len(inputs)} image(s) into {out}")


# ---------------------------------------------------------------- patches
@app.command("patches")
def patches(
    images: list[Path] = typer.Argument(..., help="Large images to cut."),
    size: int = typer.Option(..., "--size", help="Patch side in pixels."),
    stride: int | None = typer.Option(
        None, "--stride", help="Step between patches (default: size)."
    ),
    out: Path = typer.Option(..., "--out", help="Output folder."),
    min_tissue: float = typer.Option(0.0, help="Drop patches with less tissue than this fraction."),
) -> None:
    """Cut images into a grid of patches; writes PNGs and patches.csv (coordinates)."""
    from tqdm import tqdm

    from histolite.data.patches import extract_patches, write_patch_index

    step = stride or size
    rows = []
    for image in tqdm(images, desc="cutting", disable=len(images) < 2):
        for path in extract_patches(image, out, size, step, min_tissue):
            y, x = (int(part[1:]) for part in path.stem.rsplit("_", 2)[1:])
            rows.append((path, image, y, x, size))
    write_patch_index(out / "patches.csv", rows)
    typer.echo(f"wrote {len(rows)} patches from {len(images)} image(s) to {out}")


# ---------------------------------------------------------------- models
@models_app.command("list")
def models_list(
    all_names: bool = typer.Option(False, "--all", help="Every timm/torchvision name (no sizes)."),
    pattern: str | None = typer.Option(None, "--filter", help="Substring to filter names by."),
    num_classes: int = typer.Option(8, help="Classes used for the parameter count."),
) -> None:
    """Models with parameter counts and weight size in MB."""
    from histolite.models import FEATURED_BACKBONES, model_size, registered_models
    from histolite.models.registry import _timm_names, _torchvision_names

    if all_names:
        names = sorted(set(registered_models()) | _timm_names() | _torchvision_names())
        for name in names:
            if pattern is None or pattern in name:
                typer.echo(name)
        return
    typer.echo(f"{'name':<20} {'source':<12} {'parameters':>12} {'size MB':>9}")
    from histolite.models import model_source

    for name in [*registered_models(), *FEATURED_BACKBONES]:
        if pattern is not None and pattern not in name:
            continue
        size = model_size(name, num_classes)
        typer.echo(
            f"{name:<20} {model_source(name):<12} {size.parameters:>12,} {size.size_mb:>9.2f}"
        )
    typer.echo("(any other timm or torchvision name works too; --all lists them)")


# ---------------------------------------------------------------- train / evaluate / predict
def _trainer_overrides(
    accelerator: str | None, devices: str | None, num_nodes: int | None, strategy: str | None
) -> list[str]:
    pairs = {
        "accelerator": accelerator,
        "devices": devices,
        "num_nodes": num_nodes,
        "strategy": strategy,
    }
    return [f"trainer.{k}={v}" for k, v in pairs.items() if v is not None]


def _evaluate_test_split(run_dir: Path) -> None:
    """After training, report on the run's own held-out test split, if it has one."""
    from histolite.data.splits import read_split_csv
    from histolite.evaluate import evaluate_run
    from histolite.runspec import is_rank_zero

    split_csv = run_dir / "split.csv"
    if not is_rank_zero() or not split_csv.is_file():
        return
    if not read_split_csv(split_csv).subset("test").samples:
        return
    report = evaluate_run(run_dir, split_csv, run_dir / "reports" / "test", split="test")
    typer.echo(
        f"test split: accuracy {report['accuracy']:.4f}, macro F1 {report['macro_f1']:.4f} "
        f"(report in {run_dir / 'reports' / 'test'})"
    )


@app.command("train")
def train(
    config: Path | None = typer.Argument(None, help="Experiment YAML (optional with --resume)."),
    out: Path = RUN_OUT,
    overrides: list[str] = OVERRIDES,
    resume: bool = RESUME,
    accelerator: str | None = ACCELERATOR,
    devices: str | None = DEVICES,
    num_nodes: int | None = NUM_NODES,
    strategy: str | None = STRATEGY,
    progress: bool = PROGRESS,
) -> None:
    """Train a classifier from a config into a run directory."""
    from histolite.train import resolve_config, train_run

    cfg = resolve_config(
        config,
        [*overrides, *_trainer_overrides(accelerator, devices, num_nodes, strategy)],
        out,
        resume,
    )
    if cfg.distill is not None:
        typer.echo(
            "note: the config has a distill section; `train` trains the student alone "
            "(the same-budget baseline). Use `histolite distill` to distil.",
            err=True,
        )
    if cfg.mil is not None:
        from histolite.train.mil import mil_run

        mil_run(cfg, out, resume=resume, progress=progress)
    else:
        train_run(cfg, out, resume=resume, progress=progress)
    _evaluate_test_split(out)
    typer.echo(f"run written to {out}")


@app.command("distill")
def distill(
    config: Path | None = typer.Argument(None, help="Student YAML with a distill section."),
    out: Path = RUN_OUT,
    teacher: Path | None = typer.Option(
        None, "--teacher", help="Teacher run directory (remembered for --resume)."
    ),
    overrides: list[str] = OVERRIDES,
    resume: bool = RESUME,
    accelerator: str | None = ACCELERATOR,
    devices: str | None = DEVICES,
    num_nodes: int | None = NUM_NODES,
    strategy: str | None = STRATEGY,
    progress: bool = PROGRESS,
) -> None:
    """Distil a teacher run into a student (vanilla or multi-part KD)."""
    from histolite.config import DistillConfig
    from histolite.train import resolve_config
    from histolite.train.distill import distill_run

    if teacher is None and not resume:
        raise HistoliteError("--teacher TEACHER_RUN is required (unless --resume)")
    cfg = resolve_config(
        config,
        [*overrides, *_trainer_overrides(accelerator, devices, num_nodes, strategy)],
        out,
        resume,
        model=DistillConfig,
    )
    distill_run(
        cfg,
        teacher,
        out,
        resume=resume,
        progress=progress,
        announce=lambda lines: typer.echo("teacher plan:\n  " + "\n  ".join(lines)),
    )
    _evaluate_test_split(out)
    typer.echo(f"run written to {out}")


@app.command("compare")
def compare(
    runs: list[Path] = typer.Argument(..., help="Run directories (teacher, students, ...)."),
    data: Path = typer.Option(..., "--data", help="Image folder, or a split CSV."),
    out: Path = typer.Option(..., "--out", help="Folder for compare.md, compare.json, reports."),
    split: str = typer.Option("test", help="Which split of a split CSV to use."),
    names: list[str] = typer.Option([], "--name", help="Row names, one per run, in order."),
    tta: bool = typer.Option(False, "--tta", help="Test-time augmentation (8 dihedral views)."),
) -> None:
    """One table of several runs on the same test data (Markdown + JSON)."""
    from histolite.evaluate.compare import compare_runs, format_comparison

    rows = compare_runs(runs, data, out, split=split, names=names or None, tta=tta)
    typer.echo(format_comparison(rows))
    typer.echo(f"written to {out / 'compare.md'} and {out / 'compare.json'}")


@app.command("evaluate")
def evaluate(
    run: Path = typer.Argument(..., help="Run directory from `histolite train`."),
    data: Path = typer.Option(..., "--data", help="Image folder, or a split CSV."),
    out: Path = typer.Option(..., "--out", help="Report folder."),
    split: str = typer.Option("test", help="Which split of a split CSV to evaluate."),
    checkpoint: str = typer.Option("best", help="best, last, or a checkpoint file name."),
    batch_size: int = typer.Option(64, help="Inference batch size."),
    tta: bool = typer.Option(
        False, "--tta", help="Average over the 8 flips/rotations of each image (8x slower)."
    ),
) -> None:
    """Write report.json, classification_report.csv, confusion matrices and training curves."""
    from histolite.evaluate import evaluate_run

    report = evaluate_run(
        run, data, out, split=split, checkpoint=checkpoint, batch_size=batch_size, tta=tta
    )
    typer.echo(
        f"{report['level']}-level: accuracy {report['accuracy']:.4f}, balanced accuracy "
        f"{report['balanced_accuracy']:.4f}, macro F1 {report['macro_f1']:.4f} "
        f"(n={report['n']})"
    )
    if "image_level" in report:
        for method, metrics in report["image_level"].items():
            typer.echo(f"image-level ({method}): accuracy {metrics['accuracy']:.4f}")
    typer.echo(f"report written to {out}")


@app.command("explain")
def explain(
    run: Path = typer.Argument(..., help="Run directory."),
    image: Path = typer.Argument(..., help="Image to explain."),
    out: Path = typer.Option(..., "--out", help="Overlay PNG to write (the image's size)."),
    method: str = typer.Option(
        "auto", help="auto (attention for MIL runs, else gradcam), attention or gradcam."
    ),
    target: str | None = typer.Option(
        None, help="Grad-CAM: class to explain (default: the predicted one)."
    ),
    layer: str | None = typer.Option(
        None, help="Grad-CAM: module name (default: the last spatial feature map)."
    ),
    alpha: float = typer.Option(0.45, help="Heatmap opacity, 0 to 1."),
    checkpoint: str = typer.Option("best", help="best, last, or a checkpoint file name."),
) -> None:
    """Draw where the model looked: MIL attention per patch, or Grad-CAM, over the image."""
    from histolite.data.images import load_rgb
    from histolite.evaluate.explain import explain_image, render_overlay
    from histolite.models.loading import load_run

    loaded = load_run(run, checkpoint)
    classes = loaded.spec.classes
    if target is not None and target not in classes:
        raise HistoliteError(f"--target {target!r} is not one of the run's classes {list(classes)}")
    pixels = load_rgb(image)
    explanation = explain_image(
        loaded,
        pixels,
        method=method,
        target=classes.index(target) if target is not None else None,
        layer=layer,
    )
    render_overlay(pixels, explanation.heatmap, out, alpha=alpha)
    typer.echo(
        json.dumps(
            {
                "file": str(image),
                "overlay": str(out),
                "method": explanation.method,
                "explained_class": classes[explanation.target],
                "predicted_class": classes[int(explanation.probs.argmax())],
                "probabilities": {
                    c: round(float(p), 6) for c, p in zip(classes, explanation.probs, strict=True)
                },
            }
        )
    )


@app.command("predict")
def predict(
    run: Path = typer.Argument(..., help="Run directory."),
    images: list[Path] = typer.Argument(..., help="Images to classify."),
    checkpoint: str = typer.Option("best", help="best, last, or a checkpoint file name."),
) -> None:
    """Classify images; prints one JSON line per image (file, class, probabilities)."""
    from histolite.data.images import load_rgb
    from histolite.evaluate.inference import predict_image
    from histolite.models.loading import load_run

    loaded = load_run(run, checkpoint)
    for path in images:
        probs = predict_image(loaded, load_rgb(path))
        best = int(probs.argmax())
        typer.echo(
            json.dumps(
                {
                    "file": str(path),
                    "class": loaded.spec.classes[best],
                    "probabilities": {
                        c: round(float(p), 6)
                        for c, p in zip(loaded.spec.classes, probs, strict=True)
                    },
                }
            )
        )


@app.command("export")
def export(
    run: Path = typer.Argument(..., help="Run directory to export."),
    out: Path = typer.Option(
        ..., "--out", help="Model folder to create (model.onnx + model.json)."
    ),
    fmt: str = typer.Option("onnx", "--format", help="Export format (onnx)."),
    int8: bool = typer.Option(
        False, "--int8", help="INT8 quantisation calibrated on training images."
    ),
    checkpoint: str = typer.Option("best", help="best, last, or a checkpoint file name."),
    name: str | None = typer.Option(
        None, help="Model name in the card (default: run folder name)."
    ),
    version: str = typer.Option("1", help="Model version in the card."),
    parity_samples: int = typer.Option(200, help="Images for the PyTorch vs ONNX parity check."),
    min_agreement: float = typer.Option(0.99, help="Required top-1 agreement with PyTorch."),
) -> None:
    """Export a run to ONNX (optionally INT8) with a model card; fails if parity fails."""
    if fmt != "onnx":
        raise HistoliteError(f"unsupported --format {fmt!r}; supported: onnx")
    from histolite.export.onnx import export_run

    result = export_run(
        run,
        out,
        int8=int8,
        checkpoint=checkpoint,
        name=name,
        version=version,
        parity_samples=parity_samples,
        min_agreement=min_agreement,
    )
    typer.echo(
        f"exported {'INT8' if int8 else 'FP32'} ONNX to {result.model_dir} "
        f"({result.size_bytes / 1e6:.2f} MB); parity on {result.parity_samples} images: "
        f"top-1 agreement {result.top1_agreement:.2%}, largest probability difference "
        f"{result.max_abs_probability_diff:.4f}"
    )


@app.command("serve")
def serve(
    model_dir: Path = typer.Argument(..., help="Exported model folder (histolite export)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 in a container)."),
    port: int = typer.Option(8000, help="Port."),
    workers: int = typer.Option(1, help="Worker processes (each loads one ONNX session)."),
    api_key: str | None = typer.Option(
        None, envvar="HISTOLITE_API_KEY", help="Require this key (X-API-Key) for /v1/predict."
    ),
    audit_db: Path = typer.Option(Path("histolite_audit.sqlite"), help="SQLite audit log."),
    threads: int | None = typer.Option(None, help="ONNX Runtime threads per worker."),
) -> None:
    """Serve an exported model: prediction API, upload page, metrics (ONNX Runtime, no torch)."""
    import os

    import uvicorn

    from histolite.export.runtime import load_card

    load_card(model_dir)  # fail fast with a clear message
    os.environ["HISTOLITE_MODEL_DIR"] = str(model_dir.resolve())
    os.environ["HISTOLITE_AUDIT_DB"] = str(audit_db.resolve())
    if api_key:
        os.environ["HISTOLITE_API_KEY"] = api_key
    if threads:
        os.environ["HISTOLITE_THREADS"] = str(threads)
    uvicorn.run(
        "histolite.serve.app:create_app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        proxy_headers=True,
    )


@audit_app.command("export")
def audit_export(
    out: Path = typer.Option(..., "--out", help="CSV file to write."),
    db: Path = typer.Option(Path("histolite_audit.sqlite"), help="Audit database of `serve`."),
) -> None:
    """Export the prediction audit log to CSV."""
    from histolite.serve.audit import export_audit_csv

    rows = export_audit_csv(db, out)
    typer.echo(f"wrote {rows} audit rows to {out}")


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("demo_output"), "--out", help="Folder for data, runs, reports."),
    quick: bool = typer.Option(False, help="Tiny sizes, for smoke tests."),
) -> None:
    """Synthetic data -> teacher and student -> evaluation -> comparison table."""
    from histolite.demo import run_demo

    run_demo(out, quick=quick)


_EXTRA_FOR_MODULE = {
    **dict.fromkeys(
        (
            "torch",
            "torchvision",
            "timm",
            "lightning",
            "sklearn",
            "matplotlib",
            "onnx",
            "tensorboard",
        ),
        "train",
    ),
    **dict.fromkeys(("fastapi", "uvicorn", "multipart", "onnxruntime", "starlette"), "serve"),
}


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    """Leakage warnings are for people, not developers: no source line, hard to miss."""
    from histolite.data.splits import LeakageWarning

    if issubclass(category, LeakageWarning):
        typer.secho(f"WARNING: {message}", fg="yellow", bold=True, err=True)
        return
    _default_show_warning(message, category, filename, lineno, file, line)  # type: ignore[arg-type]


_default_show_warning = warnings.showwarning


def main() -> None:
    """Entry point: user errors print one clear line, not a traceback."""
    warnings.showwarning = _show_warning
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    # Lightning's banner lines (GPU available, tips) are noise in a CLI; warnings still show.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    try:
        app()
    except HistoliteError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except ModuleNotFoundError as exc:
        extra = _EXTRA_FOR_MODULE.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        typer.echo(
            f"error: this command needs {exc.name!r}; install it with "
            f"pip install 'histolite[{extra}]'",
            err=True,
        )
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
