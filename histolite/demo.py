"""``make demo``: the whole pipeline on the built-in synthetic data, on a laptop CPU.

Synthetic slides -> slide-grouped split (no slide in two splits) -> teacher and student ->
reports on the held-out slides -> a table of accuracy, size and CPU speed.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Any

from histolite.data.folder import scan_image_folder
from histolite.data.splits import make_split, write_split_csv
from histolite.data.synthetic import SYNTHETIC_GROUP_REGEX, generate_synthetic_dataset
from histolite.evaluate import evaluate_run, load_run
from histolite.evaluate.speed import images_per_second
from histolite.fileio import write_json, write_text
from histolite.models import count_parameters, weight_size_mb
from histolite.train import resolve_config, train_run

DEMO_STEPS = (("teacher", "demo_teacher.yaml"), ("student", "demo_student.yaml"))


def recipe_path(name: str) -> Path:
    return Path(str(resources.files("histolite") / "recipes" / name))


def _row(name: str, run_dir: Path, report: dict[str, Any], train_seconds: float) -> dict[str, Any]:
    loaded = load_run(run_dir, device="cpu")
    return {
        "model": f"{name} ({loaded.spec.model_name})",
        "accuracy": report["accuracy"],
        "balanced_accuracy": report["balanced_accuracy"],
        "macro_f1": report["macro_f1"],
        "parameters": count_parameters(loaded.model),
        "size_mb": weight_size_mb(loaded.model),
        "cpu_images_per_s": images_per_second(loaded.model, loaded.spec.image_size, 64),
        "train_seconds": train_seconds,
        "report": str(run_dir / "reports" / "test"),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| model | accuracy | balanced acc. | macro F1 | parameters | size MB | "
        "CPU img/s (b64) | train s |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['accuracy']:.3f} | {r['balanced_accuracy']:.3f} | "
            f"{r['macro_f1']:.3f} | {r['parameters']:,} | {r['size_mb']:.2f} | "
            f"{r['cpu_images_per_s']:.0f} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def run_demo(
    out: str | Path, *, quick: bool = False, progress: bool = True
) -> list[dict[str, Any]]:
    """Run the demo into ``out``; returns the table rows. ``quick`` shrinks everything for tests."""
    out = Path(out)
    data_dir = out / "data"
    per_class, epochs = (12, 1) if quick else (150, 8)
    print(f"[1/4] generating synthetic H&E tiles into {data_dir}")
    if not (data_dir / "dataset.json").is_file():
        generate_synthetic_dataset(
            data_dir, images_per_class=per_class, image_size=64, slides=8, seed=0, progress=progress
        )
    images = scan_image_folder(data_dir, group_regex=SYNTHETIC_GROUP_REGEX)
    split_csv = out / "split.csv"
    write_split_csv(
        split_csv, images, make_split(images, val=0.125, test=0.25, seed=0, grouped=True)
    )
    print(f"[2/4] slide-grouped split written to {split_csv} (no slide in two splits)")
    rows = []
    for step, (name, recipe) in enumerate(DEMO_STEPS, start=3):
        run_dir = out / "runs" / name
        print(f"[{step}/4] training the {name} into {run_dir}")
        overrides = [f"data.split_csv={split_csv.resolve()}", f"trainer.max_epochs={epochs}"]
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        cfg = resolve_config(recipe_path(recipe), overrides, run_dir, resume=False)
        started = time.perf_counter()
        train_run(cfg, run_dir, progress=progress)
        seconds = time.perf_counter() - started
        report = evaluate_run(
            run_dir, run_dir / "split.csv", run_dir / "reports" / "test", progress=progress
        )
        rows.append(_row(name, run_dir, report, seconds))
    table = format_table(rows)
    write_text(out / "summary.md", table + "\n")
    write_json(out / "summary.json", rows)
    print("\nResults on held-out synthetic slides:\n")
    print(table)
    print(
        f"\nReports: {out / 'runs' / '<model>' / 'reports' / 'test'}; table: {out / 'summary.md'}"
    )
    return rows
