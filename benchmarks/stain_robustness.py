"""Does stain handling protect a model from another lab's colours? Measured on Kather.

The student recipe (source-image split, split_seed 0) is trained four ways, for several seeds:
(a) no stain handling, (b) Reinhard normalisation, (c) Macenko normalisation, (d) HED
augmentation. Each run is evaluated on its grouped test split *and* on a copy of that split
re-coloured by one fixed, realistic stain shift: haematoxylin x1.30, eosin x0.75 and DAB +0.03 in
HED optical density, as between a lab that stains nuclei darker and eosin lighter and this one.

    python benchmarks/stain_robustness.py --data ../shared/data/kather2016 --out runs/stain \\
        --seeds 1 2 3 --none-runs runs/kd/grouped

Finished runs are skipped. Results: OUT/results.csv and OUT/table.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

SHIFT = {"haematoxylin_scale": 1.30, "eosin_scale": 0.75, "dab_shift": 0.03}
RECIPE = "configs/kather2016_student.yaml"


def arms(target: Path) -> dict[str, list[str]]:
    return {
        "none": [],
        "reinhard": [f"data.stain={{method: reinhard, target: {target}}}"],
        "macenko": [f"data.stain={{method: macenko, target: {target}}}"],
        "hed_augment": ["augment.hed_jitter=0.05"],
    }


def recolour(pixels: np.ndarray) -> np.ndarray:
    """The fixed stain shift, in HED optical density (uint8 in and out)."""
    from histolite.stain.augment import hed_to_rgb, rgb_to_hed

    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    hed = rgb_to_hed(x)
    hed[:, 0] *= SHIFT["haematoxylin_scale"]
    hed[:, 1] *= SHIFT["eosin_scale"]
    hed[:, 2] += SHIFT["dab_shift"]
    out = hed_to_rgb(hed)[0].permute(1, 2, 0).numpy()
    return (out * 255 + 0.5).astype(np.uint8)


def recoloured_test_split(split_csv: Path, out: Path) -> Path:
    """A split CSV whose test rows are re-coloured copies of the run's test images."""
    from histolite.data.images import load_rgb, save_rgb
    from histolite.data.splits import read_split_csv

    target = out / "recoloured.csv"
    if target.is_file():
        return target
    table = read_split_csv(split_csv)
    rows = []
    for sample, split in table.rows:
        if split != "test":
            continue
        copy = out / "recoloured" / sample.class_name / (sample.path.stem + ".png")
        copy.parent.mkdir(parents=True, exist_ok=True)
        save_rgb(recolour(load_rgb(sample.path)), copy)
        rows.append((copy.relative_to(out).as_posix(), sample.class_name, sample.group, "test"))
    with target.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(("path", "label", "group", "split"))
        writer.writerows(rows)
    return target


def histolite(*args: str) -> None:
    subprocess.run([str(Path(sys.executable).with_name("histolite")), *args], check=True,
                   capture_output=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--none-runs",
        type=Path,
        help="reuse finished runs DIR/student_sSEED as the 'none' arm: the distillation "
        "benchmark's student arm is the same command (recipe, seed, split)",
    )
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.csv"
    target = out / "target_tile.png"
    if not target.is_file():  # one typical tumour tile of the training data as the target
        from shutil import copyfile

        copyfile(sorted((args.data / "01_TUMOR").iterdir())[3], target)
    done = set()
    if results.is_file():
        done = {(r["arm"], int(r["seed"])) for r in csv.DictReader(results.open())}
    for seed in args.seeds:
        for arm, sets in arms(target).items():
            if (arm, seed) in done:
                continue
            run = out / f"{arm}_s{seed}"
            if arm == "none" and args.none_runs is not None:
                reused = args.none_runs.resolve() / f"student_s{seed}"
                run = reused if (reused / "reports" / "test" / "report.json").is_file() else run
            command = ["train", RECIPE, "--out", str(run), "--no-progress",
                       "--set", f"data.root={args.data}", "--set", f"seed={seed}"]  # fmt: skip
            for item in sets:
                command += ["--set", item]
            print("$ histolite", shlex.join(command), flush=True)
            started = time.perf_counter()
            if not (run / "reports" / "test" / "report.json").is_file():
                histolite(*command)
            seconds = time.perf_counter() - started
            summary = run / "train_summary.json"
            if summary.is_file():  # training time, also for runs reused or finished earlier
                seconds = json.loads(summary.read_text())["train_seconds_this_session"]
            grouped = json.loads((run / "reports" / "test" / "report.json").read_text())
            shifted_csv = recoloured_test_split(run / "split.csv", out)
            histolite("evaluate", str(run), "--data", str(shifted_csv), "--out",
                      str(run / "reports" / "recoloured"), "--no-progress")  # fmt: skip
            shifted = json.loads((run / "reports" / "recoloured" / "report.json").read_text())
            new = not results.is_file()
            with results.open("a", newline="") as fh:
                writer = csv.writer(fh)
                if new:
                    writer.writerow(("arm", "seed", "test", "recoloured", "seconds"))
                writer.writerow(
                    (arm, seed, grouped["accuracy"], shifted["accuracy"], round(seconds))
                )
            print(f"  {arm} seed {seed}: test {grouped['accuracy']:.4f}, "
                  f"re-coloured {shifted['accuracy']:.4f}", flush=True)  # fmt: skip
    rows = list(csv.DictReader(results.open()))
    lines = [
        "| stain handling | accuracy % (grouped test) | accuracy % (re-coloured test) | drop "
        "| seeds |",
        "|---|---:|---:|---:|---:|",
    ]
    for arm in arms(target):
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        a = [100 * float(r["test"]) for r in mine]
        b = [100 * float(r["recoloured"]) for r in mine]

        def fmt(v: list[float]) -> str:
            return (
                f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}"
                if len(v) > 1
                else f"{v[0]:.2f}"
            )

        drop = statistics.mean(x - y for x, y in zip(a, b, strict=True))
        lines.append(f"| {arm} | {fmt(a)} | {fmt(b)} | {drop:.2f} | {len(mine)} |")
    lines += ["", f"Re-colouring: {SHIFT} (HED optical density).", "", "Commands (seed S):"]
    for arm, sets in arms(target).items():
        extra = "".join(f" --set {shlex.quote(item)}" for item in sets)
        lines.append(
            f"- {arm}: `histolite train {RECIPE} --out {out / arm}_sS --set data.root={args.data} "
            f"--set seed=S{extra}`"
        )
    if args.none_runs is not None:
        lines.append(f"- none: the runs {args.none_runs}/student_sS where present (same command)")
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
