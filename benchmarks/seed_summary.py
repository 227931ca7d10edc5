"""Summarise a seeds CSV of benchmarks/kather_kd_seeds.sh: each arm, then seed-paired differences.

Runs of the same seed share the student's initialisation and batch order, so the paired
difference between two arms is less noisy than the difference of their means.

    python benchmarks/seed_summary.py runs/kd3/seeds_e12.csv
"""

from __future__ import annotations

import csv
import statistics
import sys


def _spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"(sd {sd:.4f}, n={len(values)})"


def summarise(path: str) -> list[str]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    accuracy = {(r["arm"], r["seed"]): float(r["accuracy"]) for r in rows}
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    lines = []
    for arm in arms:
        values = [a for (name, _), a in accuracy.items() if name == arm]
        per_seed = ", ".join(f"{a:.4f}" for a in values)
        lines.append(
            f"{arm:>22}: mean accuracy {statistics.mean(values):.4f} {_spread(values)}"
            f"  per seed: {per_seed}"
        )
    pairs = [(arm, "alone") for arm in arms if arm != "alone"]
    pairs += [(arm, arm.replace("multipart", "vanilla")) for arm in arms if "multipart" in arm]
    for arm, base in pairs:
        diffs = [
            accuracy[arm, seed] - accuracy[base, seed]
            for (name, seed) in accuracy
            if name == arm and (base, seed) in accuracy
        ]
        if diffs:
            per_seed = ", ".join(f"{d:+.4f}" for d in diffs)
            lines.append(
                f"{arm} - {base}: mean {statistics.mean(diffs):+.4f} {_spread(diffs)}"
                f"  per seed: {per_seed}"
            )
    return lines


if __name__ == "__main__":
    print("\n".join(summarise(sys.argv[1])))
