"""``histolite train``, ``distill``, ``compare`` and ``demo``."""

from __future__ import annotations

from pathlib import Path

import typer

from histolite.cli.app import app
from histolite.cli.options import (
    ACCELERATOR,
    DEVICES,
    NUM_NODES,
    OVERRIDES,
    PROGRESS,
    RESUME,
    RUN_OUT,
    STRATEGY,
    evaluate_test_split,
    trainer_overrides,
)
from histolite.errors import HistoliteError


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
        [*overrides, *trainer_overrides(accelerator, devices, num_nodes, strategy)],
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
    elif cfg.crossfit is not None:
        from histolite.train.crossfit import crossfit_run

        crossfit_run(cfg, out, resume=resume, progress=progress)
    else:
        train_run(cfg, out, resume=resume, progress=progress)
    evaluate_test_split(out, progress)
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
        [*overrides, *trainer_overrides(accelerator, devices, num_nodes, strategy)],
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
    evaluate_test_split(out, progress)
    typer.echo(f"run written to {out}")


@app.command("compare")
def compare(
    runs: list[Path] = typer.Argument(..., help="Run directories (teacher, students, ...)."),
    data: Path = typer.Option(..., "--data", help="Image folder, or a split CSV."),
    out: Path = typer.Option(..., "--out", help="Folder for compare.md, compare.json, reports."),
    split: str = typer.Option("test", help="Which split of a split CSV to use."),
    names: list[str] = typer.Option([], "--name", help="Row names, one per run, in order."),
    tta: bool = typer.Option(False, "--tta", help="Test-time augmentation (8 dihedral views)."),
    int8: bool = typer.Option(
        True, "--int8/--no-int8", help="Export each run to ONNX INT8 and measure its images/s."
    ),
) -> None:
    """One table of several runs on the same test data (Markdown + JSON)."""
    from histolite.export.compare import compare_runs, format_comparison

    rows = compare_runs(runs, data, out, split=split, names=names or None, tta=tta, int8=int8)
    typer.echo(format_comparison(rows))
    typer.echo(f"written to {out / 'compare.md'} and {out / 'compare.json'}")


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("demo_output"), "--out", help="Folder for data, runs, reports."),
    quick: bool = typer.Option(False, help="Tiny sizes, for smoke tests."),
) -> None:
    """Synthetic data -> teacher and student -> evaluation -> comparison table."""
    from histolite.demo import run_demo

    run_demo(out, quick=quick)
