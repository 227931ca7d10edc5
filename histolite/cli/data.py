"""``histolite data ...`` and ``histolite patches``: datasets, splits, bags, patches."""

from __future__ import annotations

from pathlib import Path

import typer

from histolite.cli.app import app, data_app


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
        help="group (whole source images/slides/patients per split), stratified (image level), "
        "or auto: group wherever the dataset or --group-regex says what a group is.",
    ),
    group_by: str | None = typer.Option(
        None, "--group-by", help="A grouping the dataset names, e.g. kather2016: patient."
    ),
    val_split_by: str = typer.Option(
        "same",
        "--val-split-by",
        help="same: validation by whole groups like test; group_if_possible: the same, except "
        "for classes with too few groups, whose validation comes from training groups; "
        "stratified: validation from training groups.",
    ),
    group_regex: str | None = typer.Option(
        None,
        "--group-regex",
        help="Regex on file names; its first group is the slide/patient key. Whole groups stay "
        "in one split (no leakage).",
    ),
    patients: Path | None = typer.Option(
        None,
        "--patients",
        help="CSV of slide,patient: a patient's slides (groups) stay in one split.",
    ),
) -> None:
    """Write a reproducible train/val/test split CSV and its split report (JSON)."""
    from pydantic import ValidationError

    from histolite.config import DataConfig, format_validation_error
    from histolite.data.split_policy import load_split
    from histolite.data.splits import write_split_csv
    from histolite.errors import ConfigError
    from histolite.fileio import write_json

    try:
        cfg = DataConfig(
            dataset=dataset,
            root=str(root),
            labels=labels,
            magnification=magnification,  # type: ignore[arg-type]
            val_fraction=val,
            test_fraction=test,
            split_by=split_by,  # type: ignore[arg-type]
            group_by=group_by,
            group_regex=group_regex,
            patients=str(patients) if patients else None,
            val_split_by=val_split_by,  # type: ignore[arg-type]
            split_seed=seed,
        )
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "histolite data split options")) from exc
    split = load_split(cfg, seed)
    write_split_csv(out, split.as_images(), split.split_names())
    report = split.report
    write_json(out.with_suffix(".report.json"), report)
    kind = str(report["group_kind"])
    typer.echo(
        f"wrote {out} ({report['policy']} split): "
        + ", ".join(
            f"{name} {len(part)} images / {len({s.group for s in part})} {kind}s"
            for name, part in split.parts.items()
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
