"""What a distillation teacher's soft targets say beyond the labels, split by split.

Knowledge distillation can only teach what the labels do not already say. A teacher that was
fine-tuned on the student's training images tends to answer those images almost exactly as its
(label-smoothed) training target did, so its "dark knowledge" there is thin, while on images it
never saw (validation, test) it is less sure and less often right. This prints, per split and
temperature, the teacher's accuracy, mean top-1 probability, mean probability of the true class
and mean entropy (nats), optionally with 8-view test-time augmentation as ``distill.teacher_tta``
uses it.

    python benchmarks/teacher_targets.py runs/kd_reinhard/grouped/teacher_s0 [--tta]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from histolite.data.splits import read_split_csv
from histolite.evaluate.inference import predict
from histolite.models.loading import load_run


def soften(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) from softmax(logits): the log-probabilities differ by a constant."""
    scaled = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    out = np.exp(scaled)
    return out / out.sum(axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="the teacher run folder (with split.csv)")
    parser.add_argument("--checkpoint", default="last")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--tta", action="store_true", help="mean over the 8 flips/rotations")
    args = parser.parse_args()
    run = load_run(args.run, args.checkpoint, device="cpu")
    table = read_split_csv(args.run / "split.csv")
    print("| split | images | accuracy % | T | top-1 prob | true-class prob | entropy (nats) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for part in ("train", "val", "test"):
        samples = [sample for sample, name in table.rows if name == part]
        if not samples:
            continue
        predictions = predict(run, samples, progress=True, tta=args.tta)
        probs, labels = predictions.probs, predictions.labels
        accuracy = float(np.mean(probs.argmax(axis=1) == labels))
        for temperature in args.temperatures:
            q = soften(probs, temperature)
            entropy = float(-(q * np.log(np.clip(q, 1e-12, 1.0))).sum(axis=1).mean())
            print(
                f"| {part} | {len(samples)} | {100 * accuracy:.2f} | {temperature:g} | "
                f"{q.max(axis=1).mean():.3f} | {q[np.arange(len(labels)), labels].mean():.3f} | "
                f"{entropy:.3f} |"
            )


if __name__ == "__main__":
    main()
