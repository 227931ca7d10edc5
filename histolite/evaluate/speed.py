"""CPU throughput of a model: images per second at a batch size (benchmarks and tables)."""

from __future__ import annotations

import time

import torch
from torch import nn


def images_per_second(
    model: nn.Module,
    image_size: int,
    batch_size: int = 64,
    *,
    warmup: int = 2,
    min_seconds: float = 1.0,
    max_iters: int = 50,
    device: str = "cpu",
    channels_last: bool = True,
) -> float:
    """Forward passes on random input until ``min_seconds`` (or ``max_iters``) have elapsed."""
    model = model.eval().to(device)
    x = torch.rand(batch_size, 3, image_size, image_size, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        iters, started = 0, time.perf_counter()
        while iters < max_iters:
            model(x)
            iters += 1
            if time.perf_counter() - started >= min_seconds:
                break
        elapsed = time.perf_counter() - started
    return iters * batch_size / elapsed
