"""Served speed of exported models: ONNX Runtime images/s at batch 64, as the service runs them.

Each model directory (``histolite export`` output) is opened the way the service opens it
(:class:`OnnxClassifier`, the stain step on the patch first: OpenCV where it is installed,
``stain.onnx`` otherwise) and timed on random input, at 1 and 2 ONNX Runtime threads, median
of ``--repeats`` runs of ``--seconds`` each. The accuracy of a model is not measured here; it
is in the report of the run the model came from.

    python benchmarks/served_speed.py --models models/student models/teacher --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from histolite.runtime.classifier import OnnxClassifier
from histolite.runtime.speed import onnx_images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="export folders")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum time per run")
    args = parser.parse_args()
    print(
        "| model | architecture | parameters | precision | stain step | input px | ORT threads "
        f"| img/s b{args.batch} (median) | runs |"
    )
    print("|---|---|---:|---|---|---:|---:|---:|---|")
    for folder in args.models:
        for threads in args.threads:
            model = OnnxClassifier(folder, threads=threads, max_batch=args.batch)
            rates = [
                onnx_images_per_second(
                    model, args.batch, min_seconds=args.seconds, max_iters=10_000
                )
                for _ in range(args.repeats)
            ]
            card = model.card
            stain = model.stain_kernel if model.stain is not None else "none"
            print(
                f"| {folder.name} | {card['model']} | {card['parameters']:,} | "
                f"{card['precision']} | {stain} | {model.input_size} | {threads} | "
                f"{statistics.median(rates):.0f} | {', '.join(f'{r:.0f}' for r in rates)} |"
            )


if __name__ == "__main__":
    main()
