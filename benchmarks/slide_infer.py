"""Whole-slide inference speed and memory, and the mask + grid against TIAToolbox's.

Runs ``histolite slide infer`` on the given slide (default: the CMU-1 SVS excerpt) a few times
in fresh processes and reports the median classification tiles/s next to the whole command's
tiles/s. With ``--memory`` it also writes synthetic pyramidal TIFFs of growing size (tiled
mosaics of the excerpt) and reports each run's peak resident memory: streaming tiles keeps it
flat in slide size.

With ``--tiatoolbox-python PY`` (the python of a virtualenv where ``pip install tiatoolbox``
was run; it is not a histolite dependency) the tissue mask and tile grid of both are timed in
the same run on the same slide, 224 px tiles at level 0, kept when at least half tissue:
histolite's ``plan_tissue_tiles`` (open, overview, mask at ~8 um/px, grid) against
TIAToolbox's ``WSIReader.open`` + ``tissue_mask(resolution=1.25, units="power")`` + its
sliding-window extractor's coordinates, with the IoU of the two sets of tiles kept.

    python benchmarks/slide_infer.py --model models/kather_student_int8 [--memory]
    python benchmarks/slide_infer.py --tiatoolbox-python /tmp/tia/bin/python
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
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


TIATOOLBOX = """
import json, sys, time
from tiatoolbox.tools.patchextraction import get_patch_extractor
from tiatoolbox.wsicore.wsireader import WSIReader

path, size = sys.argv[1], int(sys.argv[2])
for _ in sys.stdin:  # one timed run per request line, so the two tools' runs interleave
    started = time.perf_counter()
    reader = WSIReader.open(path)
    mask = reader.tissue_mask(method="otsu", resolution=1.25, units="power")
    extractor = get_patch_extractor(
        "slidingwindow", input_img=reader, input_mask=mask, patch_size=(size, size),
        stride=(size, size), resolution=0, units="level", min_mask_ratio=0.5, within_bound=True,
    )
    tiles = [[int(c[0]), int(c[1])] for c in extractor.coordinate_list]
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "tiles": tiles}), flush=True)
"""


def compare_tiatoolbox(slide: Path, python: Path, repeats: int, size: int = 224) -> None:
    """Mask + grid of histolite and TIAToolbox on one slide, timed in this run.

    The two tools' runs alternate (histolite, TIAToolbox, histolite, ...), so a change in the
    machine's speed during the benchmark lands on both; the ratio is the median of the
    per-pair ratios. The first pair warms the file cache and imports and is not counted.
    """
    from histolite.slide.reader import open_slide
    from histolite.slide.tiles import plan_tissue_tiles

    tia = subprocess.Popen(
        [str(python), "-c", TIATOOLBOX, str(slide), str(size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert tia.stdin is not None and tia.stdout is not None
    ours, theirs, kept, tia_kept = [], [], set(), set()
    try:
        for _ in range(repeats + 1):
            started = time.perf_counter()
            opened = open_slide(slide)
            plan = plan_tissue_tiles(opened, size * opened.info.mpp, min_tissue=0.5)
            opened.close()
            ours.append(time.perf_counter() - started)
            kept = {(t.x, t.y) for t in plan.tiles}
            tia.stdin.write("run\n")
            tia.stdin.flush()
            answer = json.loads(tia.stdout.readline())
            theirs.append(answer["seconds"])
            tia_kept = {tuple(t) for t in answer["tiles"]}
    finally:
        tia.stdin.close()
        tia.wait(timeout=60)
    iou = len(kept & tia_kept) / max(1, len(kept | tia_kept))
    mine, their = statistics.median(ours[1:]), statistics.median(theirs[1:])
    ratio = statistics.median(a / b for a, b in zip(ours[1:], theirs[1:], strict=True))
    print(
        f"mask + grid on {slide.name}, {size} px tiles at level 0, >= 50% tissue (median of "
        f"{repeats}, runs alternating): histolite {mine:.3f} s "
        f"({', '.join(f'{s:.3f}' for s in ours[1:])}), TIAToolbox {their:.3f} s "
        f"({', '.join(f'{s:.3f}' for s in theirs[1:])}); median per-pair ratio {ratio:.2f} "
        f"(histolite / TIAToolbox; below 1 = faster); tiles kept: histolite {len(kept)}, "
        f"TIAToolbox {len(tia_kept)}, IoU {iou:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="exported model: infer speed")
    parser.add_argument("--tiatoolbox-python", type=Path, default=None)
    parser.add_argument("--slide", type=Path, default=SVS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory", action="store_true", help="also peak RSS vs slide size")
    args = parser.parse_args()
    if args.tiatoolbox_python is not None:
        compare_tiatoolbox(args.slide, args.tiatoolbox_python, args.repeats)
    if args.model is None:
        return
    with tempfile.TemporaryDirectory() as tmp:
        rates, totals, overall, summary = [], [], [], {}
        for i in range(args.repeats):
            summary, _ = run_once(args.slide, args.model, Path(tmp) / f"run{i}", args.threads)
            rates.append(summary["timings_s"]["tiles_per_s"])
            totals.append(summary["timings_s"]["total"])
            overall.append(summary["timings_s"]["tiles_per_s_overall"])
        print(
            f"{args.slide.name}: {summary['width']}x{summary['height']} px at "
            f"{summary['mpp']} um/px, {summary['tiles']} tiles of {summary['tile_um']:.1f} um "
            f"({summary['reader']}); classification tiles/s median of {args.repeats}: "
            f"{statistics.median(rates):.1f} (runs: {', '.join(f'{r:.1f}' for r in rates)}); "
            f"whole command (median) {statistics.median(totals):.2f} s, "
            f"{statistics.median(overall):.1f} tiles/s"
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
