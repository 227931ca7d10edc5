"""``make demo``: the whole pipeline on the built-in synthetic data, on a laptop CPU.

Synthetic slides -> slide-grouped split (no slide in two splits) -> teacher -> student alone,
vanilla KD and multi-part KD -> one comparison table on the held-out slides (accuracy, F1,
size, CPU speed).
"""

from __future__ import annotations

import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any

from histolite.config import DistillConfig
from histolite.data.folder import scan_image_folder
from histolite.data.splits import make_split, write_split_csv
from histolite.data.synthetic import SYNTHETIC_GROUP_REGEX, generate_synthetic_dataset
from histolite.export.compare import compare_runs, format_comparison
from histolite.fileio import write_json, write_text
from histolite.train import resolve_config, train_run
from histolite.train.distill import distill_run

# (name, recipe, distillation mode or None): teacher first, students distil from it.
DEMO_STEPS = (
    ("teacher", "demo_teacher.yaml", None),
    ("student", "demo_student.yaml", None),
    ("student_kd", "demo_student.yaml", "vanilla"),
    ("student_multipart_kd", "demo_student.yaml", "multipart"),
)


def recipe_path(name: str) -> Path:
    return Path(str(resources.files("histolite") / "recipes" / name))


def run_demo(
    out: str | Path, *, quick: bool = False, progress: bool = True
) -> list[dict[str, Any]]:
    """Run the demo into ``out``; returns the table rows. ``quick`` shrinks everything for tests."""
    out = Path(out)
    data_dir = out / "data"
    per_class, epochs = (12, 2) if quick else (150, 8)
    train_seconds: dict[str, float] = {}
    steps = len(DEMO_STEPS) + 3
    print(f"[1/{steps}] generating synthetic H&E tiles into {data_dir}")
    if not (data_dir / "dataset.json").is_file():
        generate_synthetic_dataset(
            data_dir, images_per_class=per_class, image_size=64, slides=8, seed=0, progress=progress
        )
    images = scan_image_folder(data_dir, group_regex=SYNTHETIC_GROUP_REGEX)
    split_csv = out / "split.csv"
    write_split_csv(
        split_csv, images, make_split(images, val=0.125, test=0.25, seed=0, grouped=True)
    )
    print(f"[2/{steps}] slide-grouped split written to {split_csv} (no slide in two splits)")
    runs = []
    for step, (name, recipe, mode) in enumerate(DEMO_STEPS, start=3):
        run_dir = out / "runs" / name
        what = f"distilling ({mode} KD) into" if mode else "training"
        print(f"[{step}/{steps}] {what} {name}: {run_dir}")
        if run_dir.exists():
            shutil.rmtree(run_dir)
        overrides = [f"data.split_csv={split_csv.resolve()}", f"trainer.max_epochs={epochs}"]
        started = time.perf_counter()
        if mode is None:
            cfg = resolve_config(recipe_path(recipe), overrides, run_dir, resume=False)
            train_run(cfg, run_dir, progress=progress)
        else:
            overrides.append(f"distill.mode={mode}")
            cfg = resolve_config(
                recipe_path(recipe), overrides, run_dir, resume=False, model=DistillConfig
            )
            distill_run(cfg, out / "runs" / "teacher", run_dir, progress=progress)
        train_seconds[name] = time.perf_counter() - started
        runs.append(run_dir)
    print(f"[{steps}/{steps}] comparing all runs on the held-out slides")
    rows = compare_runs(
        runs,
        split_csv,
        out / "compare",
        names=[n for n, _, _ in DEMO_STEPS],
        progress=progress,
        speed_seconds=0.2 if quick else 1.0,  # quick runs check the pipeline, not the speed
    )
    for row in rows:
        row["train_seconds"] = round(train_seconds[row["name"]], 1)
    table = format_comparison(rows)
    write_text(out / "summary.md", table)
    write_json(out / "summary.json", rows)
    print("\nResults on held-out synthetic slides (never seen in training):\n")
    print(table)
    print("training time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in train_seconds.items()))
    print(f"\nReports per run: {out / 'compare' / 'reports'}; table: {out / 'summary.md'}")
    return rows
