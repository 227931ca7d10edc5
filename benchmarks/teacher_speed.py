"""How fast a distillation teacher labels a batch on the CPU: PyTorch eager vs ONNX Runtime.

The teacher's forward pass on every augmented batch is the largest cost of online ("consistent")
distillation; this measures it for the teacher architectures the Kather recipes use, at the
batch size of the recipes, as ``distill.teacher_runtime`` would run them.

    python benchmarks/teacher_speed.py --models tf_efficientnet_lite0 --sizes 112 150
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from histolite.models import NormalizedClassifier, create_model
from histolite.train.teacher import OnnxTeacher, TorchTeacher


def images_per_second(teacher: object, x: torch.Tensor, repeats: int) -> list[float]:
    teacher(x)  # type: ignore[operator]  # warm-up
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        teacher(x)  # type: ignore[operator]
        rates.append(len(x) / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tf_efficientnet_lite0"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 150])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print("| teacher | input | PyTorch img/s | ONNX Runtime img/s | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for name in args.models:
        for size in args.sizes:
            model = NormalizedClassifier(create_model(name, 8), (0.5,) * 3, (0.5,) * 3).eval()
            x = torch.rand(args.batch, 3, size, size)
            eager = statistics.median(
                images_per_second(TorchTeacher(model, channels_last=True), x, args.repeats)
            )
            onnx = statistics.median(images_per_second(OnnxTeacher(model, size), x, args.repeats))
            print(f"| {name} | {size} | {eager:.0f} | {onnx:.0f} | {onnx / eager:.2f}x |")


if __name__ == "__main__":
    main()
