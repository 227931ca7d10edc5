"""Kather 2016 distillation benchmark: teachers (single, cross-fitted), student alone, KD arms.

Every row is trained through the CLI exactly as a user would, for several seeds, on two splits:
``grouped`` (whole source images per split, the recipes' default) and ``tile`` (the literature's
stratified tile split, where tiles of one source image sit in training and test). The teacher
of each split is trained once (seed 0) and teaches every student seed; students of one seed
share initialisation and batch order across arms, so the paired differences are meaningful.

    python benchmarks/kather_distillation.py --data ../shared/data/kather2016 --out runs/kd \\
        --seeds 1 2 3 --splits grouped tile
    # issue 27: cross-fitted teachers (out-of-fold and ensemble KD) and an early-stopped teacher
    python benchmarks/kather_distillation.py --data ../shared/data/kather2016 --out runs/kd \\
        --seeds 1 2 3 --splits grouped --arms student vanilla_kd early_kd oof_kd ensemble_kd

Every row is also evaluated on the grouped test split re-coloured by the two synthetic stain
shifts of ``benchmarks/stain_robustness.py`` (another lab's stain, simulated).

Finished runs are skipped and a run stopped part-way resumes from its last checkpoint (its
train time then counts the last session only), so an interrupted benchmark continues. Results go to
OUT/results.csv (one line per run) and OUT/table.md (the BENCHMARKS.md table: mean +- sd over
seeds, paired differences, parameters, MACs, size, ONNX images/s at batch 64 (INT8 where it
passes export's parity check), train time, and the command of each row).
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLITS = {
    "grouped": [],  # the recipes' default: source-image level, split_seed 0
    "tile": ["data.split_by=stratified"],
}


@dataclass(frozen=True)
class Arm:
    name: str
    command: str  # train | distill
    config: str
    extra: tuple[str, ...] = ()
    teacher: str = "teacher"  # the arm (seed 0) whose run teaches a distilling arm

    @property
    def distils(self) -> bool:
        return self.command == "distill"


ARMS = {
    "teacher": Arm("teacher", "train", "configs/kather2016_pretrained_teacher.yaml"),
    "student": Arm("student", "train", "configs/kather2016_student.yaml"),
    "vanilla_kd": Arm("vanilla_kd", "distill", "configs/kather2016_student_kd.yaml"),
    "multipart_kd": Arm("multipart_kd", "distill", "configs/kather2016_student_multipart.yaml"),
    # Lever: the teacher labels each view as the mean over its 8 flips/rotations (8x its cost).
    "tta_kd": Arm(
        "tta_kd", "distill", "configs/kather2016_student_kd.yaml", ("distill.teacher_tta=true",)
    ),
    # Issue 27: teachers that have not seen the images they label (K = 5 folds by source image)
    "teacher_crossfit": Arm(
        "teacher_crossfit", "train", "configs/kather2016_teacher_crossfit.yaml"
    ),
    "oof_kd": Arm(
        "oof_kd",
        "distill",
        "configs/kather2016_student_kd_crossfit.yaml",
        teacher="teacher_crossfit",
    ),
    "ensemble_kd": Arm(
        "ensemble_kd",
        "distill",
        "configs/kather2016_student_kd_crossfit.yaml",
        ("distill.crossfit_targets=ensemble",),
        teacher="teacher_crossfit",
    ),
    # an early-stopped teacher (Cho & Hariharan 2019): the single teacher's earliest checkpoint
    # within a point of its best validation accuracy
    "early_kd": Arm(
        "early_kd",
        "distill",
        "configs/kather2016_student_kd.yaml",
        ("distill.teacher_checkpoint=early",),
    ),
    # The old default student (15 epochs, as in its KD recipes), on the same split as the others.
    "resnet8": Arm(
        "resnet8",
        "train",
        "configs/kather2016_resnet8_kd.yaml",
        (
            "data.split_by=group",
            "data.val_split_by=group_if_possible",
            "data.val_fraction=0.1",
            "data.test_fraction=0.2",
            "data.split_seed=0",
        ),
    ),
}
TEACHERS = ("teacher", "teacher_crossfit")  # trained once (seed 0), teach every seed
SHIFTS = ("hed_amounts", "stain_colours")  # benchmarks/stain_robustness.py's two re-colourings
FIELDS = ("split", "arm", "seed", "accuracy", "balanced_accuracy", "macro_f1", "seconds", "run")


def run_dir(out: Path, split: str, arm: str, seed: int) -> Path:
    return out / split / f"{arm}_s{seed}"


def command(arm: Arm, data: Path, out: Path, split: str, seed: int) -> list[str]:
    args = ["histolite", arm.command, arm.config, "--out", str(run_dir(out, split, arm.name, seed))]
    if arm.distils:
        args += ["--teacher", str(run_dir(out, split, arm.teacher, 0))]
    sets = [f"data.root={data}", f"seed={seed}", *arm.extra, *SPLITS[split]]
    for item in sets:
        args += ["--set", item]
    return [*args, "--no-progress"]


def finished(run: Path) -> bool:
    return (run / "reports" / "test" / "report.json").is_file()


def recorded(results: Path, split: str, arm: str, seed: int) -> bool:
    if not results.is_file():
        return False
    rows = csv.DictReader(results.open())
    return any((r["split"], r["arm"], int(r["seed"])) == (split, arm, seed) for r in rows)


def train(arm: Arm, data: Path, out: Path, split: str, seed: int, results: Path) -> None:
    run = run_dir(out, split, arm.name, seed)
    if finished(run):
        if not recorded(results, split, arm.name, seed):  # finished after its driver was stopped
            record(results, split, arm.name, seed, run, _train_seconds(run))
        return
    args = command(arm, data, out, split, seed)
    # stopped part-way: continue it (cross-fitted teachers keep their finished folds)
    if (run / "checkpoints" / "last.ckpt").is_file() or (run / "crossfit.json").is_file():
        args = ["histolite", arm.command, "--out", str(run), "--resume", "--no-progress"]
    elif run.exists():  # stopped before its first epoch ended: nothing worth keeping
        shutil.rmtree(run)
    print("$", shlex.join(args), flush=True)
    log = run.with_suffix(".log")
    run.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with log.open("a") as fh:
        code = subprocess.call(
            [str(Path(sys.executable).with_name("histolite")), *args[1:]], stdout=fh, stderr=fh
        )
    seconds = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{arm.name} seed {seed} ({split}) failed; see {log}")
    record(results, split, arm.name, seed, run, seconds)


def _train_seconds(run: Path) -> float:
    """Training time as the run recorded it (a cross-fitted teacher: all K folds)."""
    crossfit = run / "crossfit.json"
    if crossfit.is_file():
        return float(json.loads(crossfit.read_text()).get("total_train_seconds", 0.0))
    return float(json.loads((run / "train_summary.json").read_text())["train_seconds_this_session"])


def record(results: Path, split: str, arm: str, seed: int, run: Path, seconds: float) -> None:
    report = json.loads((run / "reports" / "test" / "report.json").read_text())
    row = {
        "split": split,
        "arm": arm,
        "seed": seed,
        "accuracy": report["accuracy"],
        "balanced_accuracy": report["balanced_accuracy"],
        "macro_f1": report["macro_f1"],
        "seconds": round(seconds, 1),
        "run": str(run),
    }
    new = not results.is_file()
    with results.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)
    print(f"  {split} {arm} seed {seed}: accuracy {row['accuracy']:.4f} ({seconds:.0f} s)")


def cost(run: Path, out: Path) -> dict[str, object]:
    """Parameters, MACs, size and ONNX images/s of one run (exported once per arm).

    INT8 where the quantised model passes export's parity check (>= 99% top-1 agreement with
    PyTorch), else FP32: a model is never timed in a form that export would refuse to ship.
    """
    from histolite.export.onnx import ExportError, export_run
    from histolite.models import count_macs, count_parameters, weight_size_mb
    from histolite.models.loading import load_run
    from histolite.runtime.classifier import OnnxClassifier
    from histolite.runtime.speed import onnx_images_per_second
    from histolite.train.crossfit import Crossfit

    crossfit = Crossfit.load(run)
    if crossfit is not None:  # K teachers: K times one fold's size and compute
        one = cost(crossfit.fold_dir(0), out)
        k = crossfit.folds
        scaled = {key: one[key] * k for key in ("parameters", "macs", "size_mb")}  # type: ignore[operator]
        onnx_mb = one["onnx_mb"] * k if one["onnx_mb"] is not None else None  # type: ignore[operator]
        rate = one["images_per_s"] / k if one["images_per_s"] else None  # type: ignore[operator]
        return {**one, **scaled, "onnx_mb": onnx_mb, "images_per_s": rate}
    loaded = load_run(run, device="cpu")
    size = {
        "parameters": count_parameters(loaded.model),
        "macs": count_macs(loaded.model, loaded.spec.image_size),
        "size_mb": weight_size_mb(loaded.model),
        "input_size": loaded.spec.image_size,
    }
    base = out / "exports" / run.parent.name / run.name
    export, precision = base, "INT8"
    if not (base / "model.onnx").is_file() and not (base.with_name(base.name + "_fp32")).exists():
        try:
            export_run(run, base, int8=True, progress=False)
        except ExportError as exc:
            print(f"  {run.name}: INT8 refused ({exc}); timing FP32", flush=True)
    if not (base / "model.onnx").is_file():
        export, precision = base.with_name(base.name + "_fp32"), "FP32"
        if not (export / "model.onnx").is_file():
            try:
                export_run(run, export, int8=False, progress=False)
            except ExportError as exc:  # reported in the table, never timed unshippable
                print(f"  {run.name}: FP32 export refused too ({exc})", flush=True)
                refused = "export refused (parity)"
                return {**size, "onnx_mb": None, "precision": refused, "images_per_s": None}
    return {
        **size,
        "onnx_mb": (export / "model.onnx").stat().st_size / 1e6,
        "precision": precision,
        "images_per_s": onnx_images_per_second(OnnxClassifier(export), 64, min_seconds=3.0),
    }


def _item(path: str) -> str:
    """A test item by class folder and file name (runs write different relative paths)."""
    return "/".join(Path(path).parts[-2:])


def test_outcomes(run: Path) -> tuple[list[str], list[bool], list[str]]:
    """Items, right/wrong and group of each test item of a run, in item order."""
    group_of = {_item(r["path"]): r["group"] for r in csv.DictReader((run / "split.csv").open())}
    rows = sorted(
        csv.DictReader((run / "reports" / "test" / "predictions.csv").open()),
        key=lambda r: _item(r["path"]),
    )
    items = [_item(r["path"]) for r in rows]
    return items, [r["true"] == r["predicted"] for r in rows], [group_of[i] for i in items]


def paired_interval(arm_runs: list[Path], base_runs: list[Path]) -> dict[str, Any]:
    """95% interval of the mean paired difference, resampling test groups (source images).

    It covers which test images were drawn, not training-seed variation (shown per seed).
    """
    from histolite.evaluate.metrics import group_bootstrap_difference

    outcomes = [test_outcomes(run) for run in arm_runs + base_runs]
    items, _, groups = outcomes[0]
    if any(i != items for i, _, _ in outcomes):
        raise SystemExit(f"runs {arm_runs + base_runs} were not tested on the same items")
    correct = [c for _, c, _ in outcomes]
    n = len(arm_runs)
    return group_bootstrap_difference(correct[:n], correct[n:], groups)


def _number(value: object, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f} (n=1)"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def last_val_accuracy(run: Path) -> float | None:
    """Validation accuracy at the last epoch (the model each recipe keeps); what levers are
    chosen on, never the test split. A cross-fitted teacher's is its ensemble's, evaluated on
    the same validation split."""
    from histolite.evaluate.plots import read_epoch_metrics
    from histolite.train.crossfit import Crossfit

    if Crossfit.load(run) is not None:
        return float(_report(run, run / "split.csv", "val", run / "reports" / "val")["accuracy"])
    series = read_epoch_metrics(run).get("val_acc", {})
    return series[max(series)] if series else None


def _report(run: Path, data: Path, split: str, out: Path) -> dict[str, Any]:
    """``evaluate`` of a run on ``data`` (kept in ``out``: computed once)."""
    from histolite.evaluate.report import evaluate_run

    if not (out / "report.json").is_file():
        evaluate_run(run, data, out, split=split, progress=False)
    return json.loads((out / "report.json").read_text())


def shifted_accuracy(run: Path, out: Path, shift: str) -> float:
    """Accuracy on the grouped test split re-coloured by one of stain_robustness.py's shifts
    (another lab's stain, simulated; the same shifted images for every arm)."""
    from stain_robustness import recoloured_test_split

    shifted = recoloured_test_split(run / "split.csv", out / "shifted", shift)
    report = _report(run, shifted, "test", run / "reports" / f"test_{shift}")
    return float(report["accuracy"])


def train_minutes(rows: list[dict[str, str]], arm: str) -> float | None:
    """Mean wall time of the arm's grouped runs that trained in one go.

    A resumed run's time covers its last session only, and the tile runs shared the cores with
    other work, so neither is a training time.
    """
    seconds = [
        float(r["seconds"])
        for r in rows
        if r["arm"] == arm and r["split"] == "grouped" and _trained_in_one_go(Path(r["run"]))
    ]
    return statistics.mean(seconds) / 60 if seconds else None


def _trained_in_one_go(run: Path) -> bool:
    folds = sorted(run.glob("fold_*")) if (run / "crossfit.json").is_file() else [run]
    summaries = [folder / "train_summary.json" for folder in folds]
    return all(s.is_file() and not json.loads(s.read_text())["resumed"] for s in summaries)


def table(results: Path, out: Path, data: Path) -> str:
    rows = list(csv.DictReader(results.open()))
    splits = list(dict.fromkeys(r["split"] for r in rows))
    arms = [a for a in ARMS if any(r["arm"] == a for r in rows)]
    acc = {(r["split"], r["arm"], int(r["seed"])): float(r["accuracy"]) for r in rows}
    runs = {(r["split"], r["arm"], int(r["seed"])): Path(r["run"]) for r in rows}
    lines = [
        "| row | "
        + " | ".join(f"accuracy % ({s})" for s in splits)
        + " | val % (grouped) | HED amounts % (grouped) | stain colours % (grouped) "
        "| parameters | MMACs | size MB (PyTorch / ONNX) | ONNX img/s b64 | train min (grouped) |",
        "|---|" + "---:|" * len(splits) + "---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in arms:
        cells = []
        for split in splits:
            values = [v for (s, a, _), v in acc.items() if s == split and a == arm]
            cells.append(_mean_sd(values) if values else "n/a")
        val = [
            last_val_accuracy(run) for (s, a, _), run in runs.items() if (s, a) == ("grouped", arm)
        ]
        cells.append(_mean_sd([v for v in val if v is not None]) if any(val) else "n/a")
        grouped = [run for (s, a, _), run in runs.items() if (s, a) == ("grouped", arm)]
        for shift in SHIFTS:
            shifted = [shifted_accuracy(run, out, shift) for run in grouped]
            cells.append(_mean_sd(shifted) if shifted else "n/a")
        first = next(r for r in rows if r["arm"] == arm)
        c = cost(Path(first["run"]), out)
        minutes = train_minutes(rows, arm)
        lines.append(
            f"| {arm} | " + " | ".join(cells) + f" | {c['parameters']:,} | {c['macs'] / 1e6:.1f} | "  # type: ignore[operator]
            f"{c['size_mb']:.2f} / {_number(c['onnx_mb'], '.2f')} {c['precision']} | "
            f"{_number(c['images_per_s'], '.0f')} {c['precision']} | "
            f"{_number(minutes, '.1f')} |"
        )
    lines += ["", "Seed-paired differences (points of accuracy):", ""]
    for split in splits:
        for arm, base in (
            ("vanilla_kd", "student"),
            ("multipart_kd", "student"),
            ("multipart_kd", "vanilla_kd"),
            ("tta_kd", "student"),
            ("tta_kd", "vanilla_kd"),
            ("early_kd", "student"),
            ("oof_kd", "student"),
            ("ensemble_kd", "student"),
            ("oof_kd", "ensemble_kd"),
            ("oof_kd", "vanilla_kd"),
        ):
            seeds = sorted(
                seed
                for (s, a, seed) in acc
                if s == split and a == arm and (split, base, seed) in acc
            )
            if seeds:
                diffs = [100 * (acc[split, arm, n] - acc[split, base, n]) for n in seeds]
                ci = paired_interval(
                    [runs[split, arm, n] for n in seeds], [runs[split, base, n] for n in seeds]
                )
                lines.append(
                    f"- {split}: {arm} - {base}: mean {statistics.mean(diffs):+.2f} "
                    f"(per seed {', '.join(f'{d:+.2f}' for d in diffs)}; 95% interval "
                    f"[{100 * ci['low']:+.2f}, {100 * ci['high']:+.2f}] over {ci['groups']} "
                    "groups)"
                )
    lines += [
        "",
        "Commands (seed S, split grouped; the tile rows add --set data.split_by=stratified):",
    ]
    for arm in arms:
        teacher = arm in TEACHERS
        example = command(ARMS[arm], data, out, "grouped", 0 if teacher else 1)
        shown = shlex.join(example)
        if not teacher:
            shown = shown.replace("_s1", "_sS").replace("seed=1", "seed=S")
        lines.append(f"- {arm}: `{shown}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="Kather class folders")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--splits", nargs="+", default=["grouped", "tile"], choices=SPLITS)
    parser.add_argument(
        "--arms",
        nargs="+",
        default=["teacher", "student", "vanilla_kd", "multipart_kd", "resnet8"],
        choices=ARMS,
        help="default: the issue-11 table; tta_kd costs ~3x a vanilla KD run on CPU; the "
        "issue-27 arms are teacher_crossfit, oof_kd, ensemble_kd and early_kd",
    )
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table")
    args = parser.parse_args()
    results = args.out / "results.csv"
    if not args.table_only:
        teachers = [a for a in TEACHERS if a in args.arms]
        teachers += [ARMS[a].teacher for a in args.arms if ARMS[a].distils]
        for split in args.splits:
            for name in dict.fromkeys(teachers):  # each teacher once (seed 0), first
                train(ARMS[name], args.data, args.out, split, 0, results)
            for seed in args.seeds:
                for name in args.arms:
                    if name not in TEACHERS:
                        train(ARMS[name], args.data, args.out, split, seed, results)
    text = table(results, args.out, args.data)
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
