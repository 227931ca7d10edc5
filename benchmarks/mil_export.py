"""Bag models in ONNX: one graph (backbone + attention pooling) against two graphs.

Exports since card format 3 are two graphs (the instance graph on N patches, in bounded
chunks, then ``mil_head.onnx`` on N feature vectors), so a bag's memory no longer grows with
one graph's activations for all N patches at once. This measures what that costs in latency
against one graph for bags of several sizes, with an untrained model (speed does not depend
on the weights), and checks that both give the same output.

    python benchmarks/mil_export.py --backbone mobile_student_s --sizes 16 64 256
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from histolite.export.graph import MilServingGraph
from histolite.models.mil import build_attention_mil
from histolite.runspec import MilSpec, PatchSpec


class Pooling(nn.Module):
    """The second of two graphs: features (N, F) -> probabilities (1, C), attention (N,)."""

    def __init__(self, graph: MilServingGraph) -> None:
        super().__init__()
        self.model = graph.model

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.model.embed(features).unsqueeze(0)
        pooled, attention = self.model.pool(h, torch.ones_like(h[..., 0], dtype=torch.bool))
        return torch.softmax(self.model.classifier(pooled), dim=1), attention[0]


def export(module: nn.Module, example: torch.Tensor, path: Path, outputs: list[str]) -> None:
    with torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=outputs,
            opset_version=17,
            dynamic_axes={
                "x": {0: "n"},
                **{o: {0: "n"} for o in outputs if o not in ("probabilities", "logits")},
            },
        )


def median_ms(run: object, x: np.ndarray, repeats: int) -> float:
    run(x)  # type: ignore[operator]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(x)  # type: ignore[operator]
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="mobile_student_s")
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    spec = MilSpec("gated", 128, 64, 0.0, PatchSpec(args.input_size))
    model = build_attention_mil(args.backbone, 2, (0.5,) * 3, (0.25,) * 3, spec).eval()
    graph = MilServingGraph(model).eval()
    assert model.encoder is not None
    size = args.input_size
    with tempfile.TemporaryDirectory() as tmp:
        one, backbone, pooling = (Path(tmp) / n for n in ("one.onnx", "bb.onnx", "pool.onnx"))
        # the served graph also returns the bag's logits (calibration); only the first two compare
        outputs = ["probabilities", "attention", "logits"]
        export(graph, torch.rand(3, 3, size, size), one, outputs)
        export(model.encoder, torch.rand(3, 3, size, size), backbone, ["features"])
        features = model.encoder(torch.rand(3, 3, size, size))
        export(Pooling(graph), features, pooling, ["probabilities", "attention"])
        options = ort.SessionOptions()
        single = ort.InferenceSession(str(one), options, providers=["CPUExecutionProvider"])
        first = ort.InferenceSession(str(backbone), options, providers=["CPUExecutionProvider"])
        second = ort.InferenceSession(str(pooling), options, providers=["CPUExecutionProvider"])

        def one_call(x: np.ndarray) -> list[np.ndarray]:
            return single.run(None, {"x": x})

        def two_calls(x: np.ndarray) -> list[np.ndarray]:
            (feats,) = first.run(None, {"x": x})
            return second.run(None, {"x": feats})

        print(
            f"{args.backbone} at {size} px, {torch.get_num_threads()} threads, median of "
            f"{args.repeats}"
        )
        print("| patches per bag | one graph ms | two graphs ms | max output difference |")
        print("|---:|---:|---:|---:|")
        rng = np.random.default_rng(0)
        for n in args.sizes:
            x = rng.random((n, 3, size, size), dtype=np.float32)
            a, b = one_call(x), two_calls(x)
            diff = max(float(np.abs(p - q).max()) for p, q in zip(a[:2], b, strict=True))
            print(
                f"| {n} | {median_ms(one_call, x, args.repeats):.1f} | "
                f"{median_ms(two_calls, x, args.repeats):.1f} | {diff:.1e} |"
            )


if __name__ == "__main__":
    main()
