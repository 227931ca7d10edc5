"""Student ONNX FP32 / INT8 vs student PyTorch vs teacher PyTorch on CPU.

Patches per second at batch 1 and 64 (random input at each model's own size, single process),
weight size, and accuracy on a folder of unseen tiles through each model's own serving path
(PyTorch: histolite's evaluation path; ONNX: the ONNX Runtime path `histolite serve` uses).

    python benchmarks/deploy_speed.py --student runs/r8 --teacher runs/teacher \
        --fp32 models/r8_fp32 --int8 models/r8_int8 --data TEST_FOLDER
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from histolite.data.folder import scan_image_folder
from histolite.data.images import load_rgb
from histolite.evaluate.inference import predict
from histolite.evaluate.speed import images_per_second
from histolite.models import weight_size_mb
from histolite.models.loading import load_run
from histolite.runtime.classifier import OnnxClassifier


def onnx_per_second(model: OnnxClassifier, batch: int, min_seconds: float = 2.0) -> float:
    x = np.random.default_rng(0).random(
        (batch, 3, model.input_size, model.input_size), dtype=np.float32
    )
    model.predict_batch(x)
    iters, started = 0, time.perf_counter()
    while time.perf_counter() - started < min_seconds or iters < 3:
        model.predict_batch(x)
        iters += 1
    return iters * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--fp32", type=Path, required=True)
    parser.add_argument("--int8", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="folder of unseen tiles")
    args = parser.parse_args()
    rows = []
    for name, run_dir in (("teacher (PyTorch)", args.teacher), ("student (PyTorch)", args.student)):
        run = load_run(run_dir, device="cpu")
        samples = list(scan_image_folder(args.data, classes=run.spec.classes).samples)
        preds = predict(run, samples, progress=False)
        accuracy = float((preds.probs.argmax(1) == preds.labels).mean())
        size = run.spec.image_size
        rows.append(
            (
                name,
                run.spec.model_name,
                weight_size_mb(run.model),
                images_per_second(run.model, size, 1, min_seconds=2.0, max_iters=2000),
                images_per_second(run.model, size, 64, min_seconds=2.0),
                accuracy,
            )
        )
    for name, model_dir in (("student ONNX FP32", args.fp32), ("student ONNX INT8", args.int8)):
        model = OnnxClassifier(model_dir)
        samples = list(scan_image_folder(args.data, classes=model.classes).samples)
        correct = sum(int(model.predict(load_rgb(s.path)).top_class() == s.label) for s in samples)
        rows.append(
            (
                name,
                str(model.card["model"]),
                (model_dir / "model.onnx").stat().st_size / 1e6,
                onnx_per_second(model, 1),
                onnx_per_second(model, 64),
                correct / len(samples),
            )
        )
    print(f"CPU: {torch.get_num_threads()} threads; data: {args.data} ({len(samples)} tiles)\n")
    print("| model | network | size MB | patches/s b1 | patches/s b64 | accuracy |")
    print("|---|---|---:|---:|---:|---:|")
    for name, network, size_mb, b1, b64, accuracy in rows:
        print(f"| {name} | {network} | {size_mb:.2f} | {b1:.0f} | {b64:.0f} | {accuracy:.4f} |")
    teacher_b64 = rows[0][4]
    print(
        f"\nINT8 student / teacher throughput at batch 64: {rows[3][4] / teacher_b64:.1f}x; "
        f"at batch 1: {rows[3][3] / rows[0][3]:.1f}x"
    )
    print(f"accuracy FP32 - INT8: {100 * (rows[2][5] - rows[3][5]):+.2f} points")


if __name__ == "__main__":
    main()
