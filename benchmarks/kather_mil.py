"""Attention MIL on bags of real Kather tiles: bag accuracy and whether attention finds the
tumour tiles that decide each bag's label.

Bags come from the training tiles and, separately, from unseen test tiles (so no tile is in
both). Positive bags hold 1-2 01_TUMOR tiles among 9; the model sees bag labels only.

    python benchmarks/kather_mil.py --tiles runs/kd3/folders --out runs/kather_mil

``--tiles`` holds train/ and test/ class folders (benchmarks/kather_holdout.py makes them).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "kather2016_abmil_bags.yaml"


def histolite(*args: str) -> None:
    command = [sys.executable, "-m", "histolite.cli", *args]
    print("$ histolite", " ".join(args), flush=True)
    subprocess.run(command, check=True)


def score_attention(bags_csv: Path, attention_csv: Path) -> dict[str, float]:
    """Top-1 hit rate and attention mass on the decisive (tumour) tiles of positive bags."""
    decisive: dict[tuple[str, int, int], int] = {}
    with bags_csv.open() as fh:
        for row in csv.DictReader(fh):
            decisive[(Path(row["bag"]).name, int(row["y"]), int(row["x"]))] = int(row["decisive"])
    bags: dict[str, list[tuple[float, int]]] = defaultdict(list)
    truth: dict[str, str] = {}
    with attention_csv.open() as fh:
        for row in csv.DictReader(fh):
            name = Path(row["path"]).name
            key = (name, int(row["patch_y"]), int(row["patch_x"]))
            bags[name].append((float(row["attention"]), decisive[key]))
            truth[name] = row["true"]
    hits, mass, uniform, n = 0, 0.0, 0.0, 0
    for name, cells in bags.items():
        if truth[name] != "positive":
            continue
        n += 1
        top = max(cells)
        hits += top[1]
        mass += sum(w for w, d in cells if d)
        uniform += sum(d for _, d in cells) / len(cells)
    return {
        "positive_bags": n,
        "top_attention_on_tumour_tile": hits / n,
        "attention_mass_on_tumour_tiles": mass / n,
        "uniform_attention_mass": uniform / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=Path, required=True, help="Folder with train/ and test/.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-bags", type=int, default=300, help="Per class.")
    parser.add_argument("--test-bags", type=int, default=100, help="Per class.")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    out: Path = args.out
    timings: dict[str, float] = {}
    started = time.perf_counter()
    for split, count, seed in (("train", args.train_bags, 0), ("test", args.test_bags, 1)):
        if not (out / "bags" / split / "bags.csv").is_file():
            histolite(
                "data", "bags", str(args.tiles / split), "--out", str(out / "bags" / split),
                "--positive", "01_TUMOR", "--bags-per-class", str(count), "--grid", "3",
                "--tile-size", "64", "--max-positive", "2", "--seed", str(seed),
            )  # fmt: skip
    timings["bags_s"] = time.perf_counter() - started
    started = time.perf_counter()
    histolite(
        "train", str(CONFIG), "--out", str(out / "run"), "--no-progress",
        "--set", f"data.root={out / 'bags' / 'train'}", "--set", f"seed={args.seed}",
    )  # fmt: skip
    timings["train_s"] = time.perf_counter() - started
    histolite(
        "evaluate", str(out / "run"), "--data", str(out / "bags" / "test"),
        "--out", str(out / "test"),
    )  # fmt: skip
    report = json.loads((out / "test" / "report.json").read_text())
    attention = score_attention(out / "bags" / "test" / "bags.csv", out / "test" / "attention.csv")
    result = {
        "test_bags": report["n"],
        "bag_accuracy": report["accuracy"],
        "bag_balanced_accuracy": report["balanced_accuracy"],
        **attention,
        **{k: round(v, 1) for k, v in timings.items()},
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
