"""Whole-slide inference speed and memory: tiles/s on a slide, and peak memory vs slide size.

Runs ``histolite slide infer`` on the given slide (default: the CMU-1 SVS excerpt) a few times
in fresh processes and reports the median tiles/s. With ``--memory`` it also writes synthetic
pyramidal TIFFs of growing size (tiled mosaics of the excerpt) and reports each run's peak
resident memory: streaming tiles keeps it flat in slide size.

    python benchmarks/slide_infer.py --model models/kather_student_int8 [--memory]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SVS = Path(__file__).resolve().parents[2] / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"


# A fresh wrapper per run, so RUSAGE_CHILDREN is that one run's peak memory.
WRAPPER = (
    "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
    "capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def run_once(slide: Path, model: Path, out: Path, threads: int | None) -> tuple[dict, float]:
    """One CLI run in a child process; returns its summary and its peak RSS in MB."""
    args = [
        str(Path(sys.executable).with_name("histolite")),
        "slide",
        "infer",
        str(slide),
        "--model",
        str(model),
        "--out",
        str(out),
        "--no-progress",
        *(["--threads", str(threads)] if threads else []),
    ]
    result = subprocess.run(
        [sys.executable, "-c", WRAPPER, *args], check=True, capture_output=True, text=True
    )
    summary = json.loads((out / slide.stem / "summary.json").read_text())
    return summary, int(result.stdout.split()[-1]) / 1024


def tiled_copy(source: Path, path: Path, repeat: int) -> Path:
    """A pyramidal TIFF of the excerpt tiled ``repeat`` x ``repeat`` (same mpp)."""
    from histolite.slide.pyramid import write_pyramidal_tiff
    from histolite.slide.reader import open_slide

    slide = open_slide(source)
    info = slide.info
    base = slide.read_level(0, 0, 0, info.width, info.height)
    slide.close()
    level = np.tile(base, (repeat, repeat, 1))
    return write_pyramidal_tiff(path, level, info.mpp, compression="jpeg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--slide", type=Path, default=SVS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory", action="store_true", help="also peak RSS vs slide size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rates, summary = [], {}
        for i in range(args.repeats):
            summary, _ = run_once(args.slide, args.model, Path(tmp) / f"run{i}", args.threads)
            rates.append(summary["timings_s"]["tiles_per_s"])
        print(
            f"{args.slide.name}: {summary['width']}x{summary['height']} px at "
            f"{summary['mpp']} um/px, {summary['tiles']} tiles of {summary['tile_um']:.1f} um "
            f"({summary['reader']}); tiles/s median of {args.repeats}: "
            f"{statistics.median(rates):.1f} (runs: {', '.join(f'{r:.1f}' for r in rates)}); "
            f"total {summary['timings_s']['total']:.1f} s"
        )
        if args.memory:
            print("| slide | pixels | tiles | peak RSS MB |")
            print("|---|---:|---:|---:|")
            for repeat in (1, 3, 6):
                path = tiled_copy(args.slide, Path(tmp) / f"tiled_{repeat}.tif", repeat)
                result, peak = run_once(path, args.model, Path(tmp) / f"mem{repeat}", args.threads)
                pixels = result["width"] * result["height"]
                print(f"| {path.name} | {pixels / 1e6:.0f} M | {result['tiles']} | {peak:.0f} |")


if __name__ == "__main__":
    main()
