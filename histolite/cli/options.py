"""Options and helpers shared by several commands (train and distill above all)."""

from __future__ import annotations

from pathlib import Path

import typer

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


def trainer_overrides(
    accelerator: str | None, devices: str | None, num_nodes: int | None, strategy: str | None
) -> list[str]:
    pairs = {
        "accelerator": accelerator,
        "devices": devices,
        "num_nodes": num_nodes,
        "strategy": strategy,
    }
    return [f"trainer.{k}={v}" for k, v in pairs.items() if v is not None]


def evaluate_test_split(run_dir: Path, progress: bool = True) -> None:
    """After training, report on the run's own held-out test split, if it has one."""
    from histolite.data.splits import read_split_csv
    from histolite.evaluate.report import evaluate_run
    from histolite.runspec import RunDir, is_rank_zero

    files = RunDir(run_dir)
    split_csv = files.split_csv
    if not is_rank_zero() or not split_csv.is_file():
        return
    if not read_split_csv(split_csv).subset("test").samples:
        return
    report = evaluate_run(
        run_dir, split_csv, files.test_report_dir, split="test", progress=progress
    )
    typer.echo(
        f"test split: accuracy {report['accuracy']:.4f}, macro F1 {report['macro_f1']:.4f} "
        f"(report in {files.test_report_dir})"
    )
