"""Does stain handling protect a model from shifted stain colours? Measured on Kather.

The student recipe (source-image split, split_seed 0) is trained four ways, for several seeds:
(a) no stain handling, (b) Reinhard normalisation, (c) Macenko normalisation, (d) HED
augmentation. Each run is evaluated on its grouped test split *and* on two re-coloured copies
of that split, both synthetic (no second lab's tiles are available here):

- ``hed_amounts``: haematoxylin x1.30, eosin x0.75, DAB +0.03 in HED optical density: stain
  amounts change, stain colours do not (a lab staining nuclei darker and eosin lighter).
- ``stain_colours``: each pixel is unmixed with Ruifrok and Johnston's H, E, DAB vectors and
  mixed back with other ones (a bluer haematoxylin, a more orange eosin): the stain colours
  themselves change, as between two labs' reagents or scanners.

The Reinhard / Macenko target is one tumour tile from the *training* split, never a test image.

    python benchmarks/stain_robustness.py --data ../shared/data/kather2016 --out runs/stain \\
        --seeds 1 2 3 --none-runs runs/kd/grouped

Finished runs are skipped. Results: OUT/results.csv and OUT/table.md.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

SHIFT = {"haematoxylin_scale": 1.30, "eosin_scale": 0.75, "dab_shift": 0.03}
# Another lab's stain vectors (rows: H, E, DAB optical density per unit amount), normalised
# when used: haematoxylin bluer and eosin more orange than Ruifrok and Johnston's.
OTHER_RGB_FROM_HED = ((0.74, 0.64, 0.20), (0.05, 0.90, 0.43), (0.27, 0.57, 0.78))
SHIFTS = ("hed_amounts", "stain_colours")
RECIPE = "configs/kather2016_student.yaml"


def arms(target: Path) -> dict[str, list[str]]:
    # The recipe itself normalises with Reinhard: every arm says what it uses.
    return {
        "none": ["data.stain=null"],
        "reinhard": [f"data.stain={{method: reinhard, target: {target}}}"],
        "macenko": [f"data.stain={{method: macenko, target: {target}}}"],
        "hed_augment": ["data.stain=null", "augment.hed_jitter=0.05"],
    }


def recolour(pixels: np.ndarray, shift: str) -> np.ndarray:
    """One of the fixed stain shifts (uint8 in and out)."""
    from histolite.stain.augment import RGB_FROM_HED, hed_to_rgb, rgb_to_hed

    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    hed = rgb_to_hed(x)
    if shift == "hed_amounts":
        hed[:, 0] *= SHIFT["haematoxylin_scale"]
        hed[:, 1] *= SHIFT["eosin_scale"]
        hed[:, 2] += SHIFT["dab_shift"]
        out = hed_to_rgb(hed)
    else:
        other = torch.tensor(OTHER_RGB_FROM_HED, dtype=torch.float64)
        # keep each stain's optical-density norm, as Ruifrok's rows are (near) unit vectors
        other = other / other.norm(dim=1, keepdim=True) * RGB_FROM_HED.norm(dim=1, keepdim=True)
        od = torch.einsum("bdhw,dc->bchw", hed, other.to(hed))
        out = torch.exp(-od).clamp(0.0, 1.0)
    array = out[0].permute(1, 2, 0).numpy()
    return (array * 255 + 0.5).astype(np.uint8)


def test_rows(split_csv: Path) -> list[tuple[Path, str, str | None]]:
    from histolite.data.splits import read_split_csv

    table = read_split_csv(split_csv)
    return [(s.path.resolve(), s.class_name, s.group) for s, part in table.rows if part == "test"]


def recoloured_test_split(split_csv: Path, out: Path, shift: str) -> Path:
    """A split CSV whose test rows are re-coloured copies of the run's test images.

    Built once and reused for every run, so each run's test rows must be the ones it was built
    from (their hash names the copy); a run with another split gets its own copy.
    """
    from histolite.data.images import load_rgb, save_rgb

    rows = test_rows(split_csv)
    key = hashlib.sha256(repr([(str(p), c) for p, c, _ in rows]).encode()).hexdigest()[:12]
    folder = out / f"recoloured_{shift}_{key}"
    target = folder / "split.csv"
    if target.is_file():
        return target
    written = []
    for path, class_name, group in rows:
        copy = folder / class_name / (path.stem + ".png")
        copy.parent.mkdir(parents=True, exist_ok=True)
        save_rgb(recolour(load_rgb(path), shift), copy)
        written.append((copy.relative_to(folder).as_posix(), class_name, group, "test"))
    partial = target.with_suffix(".tmp")
    with partial.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(("path", "label", "group", "split"))
        writer.writerows(written)
    partial.replace(target)
    return target


def training_target(data: Path, seed: int, out: Path) -> Path:
    """A tumour tile of the recipe's training split (split_seed fixed by the recipe)."""
    from histolite.config import load_config
    from histolite.data.split_policy import load_split

    target = out / "target_tile.png"
    if target.is_file():
        return target
    cfg = load_config(RECIPE, [f"data.root={data}", f"seed={seed}"])
    train = load_split(cfg.data, cfg.seed).parts["train"]
    tumour = sorted(s.path for s in train if s.class_name == "01_TUMOR")
    shutil.copyfile(tumour[len(tumour) // 2], target)
    return target


def histolite(*args: str) -> None:
    done = subprocess.run([str(Path(sys.executable).with_name("histolite")), *args],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"histolite {shlex.join(args)} failed:\n{done.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--none-runs",
        type=Path,
        help="reuse finished runs DIR/student_sSEED without stain normalisation as the 'none' "
        "arm: the distillation benchmark's student arm before its recipes normalised stain "
        "(runs/kd) is the same command (recipe, seed, split)",
    )
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.csv"
    target = training_target(args.data, args.seeds[0], out)
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
                if (reused / "reports" / "test" / "report.json").is_file():
                    if yaml.safe_load((reused / "config.yaml").read_text())["data"]["stain"]:
                        raise SystemExit(f"{reused} normalised stain: it is no 'none' run")
                    run = reused
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
            shifted = {}
            for shift in SHIFTS:
                shifted_csv = recoloured_test_split(run / "split.csv", out, shift)
                report = run / "reports" / f"recoloured_{shift}"
                histolite("evaluate", str(run), "--data", str(shifted_csv), "--out",
                          str(report), "--no-progress")  # fmt: skip
                shifted[shift] = json.loads((report / "report.json").read_text())["accuracy"]
            new = not results.is_file()
            with results.open("a", newline="") as fh:
                writer = csv.writer(fh)
                if new:
                    writer.writerow(("arm", "seed", "test", *SHIFTS, "seconds", "run"))
                writer.writerow(
                    (arm, seed, grouped["accuracy"], *shifted.values(), round(seconds), run)
                )
            print(
                f"  {arm} seed {seed}: test {grouped['accuracy']:.4f}, "
                + ", ".join(f"{k} {v:.4f}" for k, v in shifted.items()),
                flush=True,
            )
    rows = list(csv.DictReader(results.open()))
    lines = [
        "| stain handling | accuracy % (grouped test) | "
        + " | ".join(f"re-coloured: {shift} | drop" for shift in SHIFTS)
        + " | seeds | train min |",
        "|---|---:|" + "---:|---:|" * len(SHIFTS) + "---:|---:|",
    ]

    def fmt(v: list[float]) -> str:
        if len(v) == 1:
            return f"{v[0]:.2f} (n=1)"
        return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}"

    for arm in arms(target):
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        test = [100 * float(r["test"]) for r in mine]
        cells = [fmt(test)]
        for shift in SHIFTS:
            moved = [100 * float(r[shift]) for r in mine]
            drop = statistics.mean(x - y for x, y in zip(test, moved, strict=True))
            cells += [fmt(moved), f"{drop:.2f}"]
        minutes = statistics.mean(float(r["seconds"]) for r in mine) / 60
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {len(mine)} | {minutes:.1f} |")
    lines += [
        "",
        f"hed_amounts: {SHIFT} (HED optical density); stain_colours: Ruifrok's vectors replaced "
        f"by {OTHER_RGB_FROM_HED} (rows H, E, DAB). Target: {target.name} from the training split.",
        "",
        "Commands (seed S):",
    ]
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
