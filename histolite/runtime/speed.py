"""Throughput of an exported model's graphs, as served (benchmarks, ``compare``)."""

from __future__ import annotations

import time

import numpy as np

from histolite.runtime.classifier import OnnxClassifier


def onnx_images_per_second(
    model: OnnxClassifier, batch_size: int = 64, *, min_seconds: float = 1.0, max_iters: int = 50
) -> float:
    """Forward passes of the exported graphs on random input until ``min_seconds`` elapse.

    The stain step, when the model has one, runs on patch-size input first, as served (OpenCV
    or ``stain.onnx``, whichever this install serves with); the resize between the stain step
    and the model (PIL) is not timed.
    """
    rng = np.random.default_rng(0)
    size = model.input_size
    x = rng.random((batch_size, 3, size, size), dtype=np.float32)
    side = model.patch_size
    patches = list(rng.integers(0, 256, (batch_size, side, side, 3), dtype=np.uint8))

    def step() -> None:
        if model.stain is not None:
            model.stain(patches)
        model.session.run(None, {model.input_name: x})

    step()
    iters, started = 0, time.perf_counter()
    while iters < max_iters:
        step()
        iters += 1
        if time.perf_counter() - started >= min_seconds:
            break
    return iters * batch_size / (time.perf_counter() - started)
