"""Reinhard stain normalisation throughput: histolite (batched) vs torchstain (per image).

Same 64 tiles of 224 x 224 (real Kather tiles when ../shared/data/kather2016 exists, otherwise
synthetic ones), same target, same process. Prints tiles/s, megapixels/s and the ratio, on CPU
and on CUDA when a GPU is present, and the mean absolute difference of histolite's uint8 output
from a float64 scikit-image Reinhard (Lab mean/std matching) over all tiles.

    python benchmarks/stain.py [--repeats 5] [--batch 64] [--size 224]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from histolite.stain import ReinhardNormalizer

KATHER = Path(__file__).resolve().parents[2] / "shared" / "data" / "kather2016"


def load_tiles(batch: int, size: int) -> tuple[torch.Tensor, str]:
    every = max(1, 4000 // batch)
    files = sorted(KATHER.glob("*/*.png"))[::every][:batch] if KATHER.is_dir() else []
    if len(files) == batch:
        tiles = [np.array(Image.open(f).convert("RGB").resize((size, size))) for f in files]
        source = f"{batch} real Kather tiles resized to {size} px"
    else:
        from histolite.data.synthetic import SYNTHETIC_CLASSES, _slide_stains, render_tile

        rng = np.random.default_rng(0)
        stains = _slide_stains(rng)
        tiles = [render_tile(SYNTHETIC_CLASSES[i % 5], size, rng, stains) for i in range(batch)]
        source = f"{batch} synthetic tiles of {size} px"
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous(), source


def timed(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_device(device: str, batch: torch.Tensor, repeats: int) -> None:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    images = batch.to(device)
    ours = ReinhardNormalizer.fit(images[0])
    n, _, h, w = images.shape
    megapixels = n * h * w / 1e6
    results = {"histolite (batched)": timed(lambda: ours(images), repeats, sync)}
    try:
        from torchstain.torch.normalizers import TorchReinhardNormalizer

        theirs = TorchReinhardNormalizer()
        theirs.fit(images[0])
        results["torchstain (per image)"] = timed(
            lambda: [theirs.normalize(img) for img in images], repeats, sync
        )
    except ImportError:
        print("  torchstain not installed (pip install torchstain); comparison skipped")
    print(f"\n{device.upper()}: {n} tiles of {h}x{w}, median of {repeats} runs")
    for name, seconds in results.items():
        print(
            f"  {name:<24} {n / seconds:9.1f} tiles/s {megapixels / seconds:9.2f} MP/s "
            f"({seconds * 1000:.1f} ms/batch)"
        )
    if len(results) == 2:
        ratio = results["torchstain (per image)"] / results["histolite (batched)"]
        print(f"  histolite is {ratio:.2f}x torchstain's throughput")


def accuracy_against_scikit_image(batch: torch.Tensor) -> None:
    """Mean |histolite uint8 - scikit-image float64| in 1/255 steps, every tile to one target."""
    try:
        from skimage.color import lab2rgb, rgb2lab
    except ImportError:
        print("\naccuracy: scikit-image not installed; skipped")
        return

    def lab_stats(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return lab.mean((0, 1)), lab.std((0, 1))

    images = batch.permute(0, 2, 3, 1).numpy()
    target_mean, target_std = lab_stats(rgb2lab(images[0] / 255.0))
    ours = ReinhardNormalizer.fit(batch[0])(batch).permute(0, 2, 3, 1).numpy() / 255.0
    errors = []
    for image, result in zip(images, ours, strict=True):
        lab = rgb2lab(image / 255.0)
        mean, std = lab_stats(lab)
        reference = np.clip(lab2rgb((lab - mean) / std * target_std + target_mean), 0.0, 1.0)
        errors.append(np.abs(result - reference).mean() * 255)
    print(
        f"\naccuracy (uint8 out vs scikit-image float64, {len(errors)} tiles): mean absolute "
        f"difference {statistics.mean(errors):.3f}/255 (worst tile {max(errors):.3f}/255)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    batch, source = load_tiles(args.batch, args.size)
    print(
        f"inputs: {source}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"{platform.processor() or platform.machine()}"
    )
    bench_device("cpu", batch, args.repeats)
    accuracy_against_scikit_image(batch)
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
        bench_device("cuda", batch, args.repeats)
    else:
        print("\nCUDA: no GPU on this machine; GPU figures not measured")


if __name__ == "__main__":
    main()
