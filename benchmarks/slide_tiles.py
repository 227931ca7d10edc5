"""Training from annotated slides: `slide tiles` speed, and annotations -> model -> Dice.

1. **Speed**: tiles/s of ``histolite slide tiles`` on the CMU-1 SVS excerpt, one polygon over
   the tissue (median of ``--repeats`` runs into fresh folders; prepare = open + annotations +
   checks, then mask + grid + coverage + read + PNG per tile).
2. **End to end** (``--kather``): three mosaic slides built from the Kather tiles, each a grid
   of 3 x 3-tile blocks of one class, with a QuPath GeoJSON of one jittered polygon per block
   (its truth, drawn a little off the tile grid as a person would). Source images are split
   first (the recipes' grouped split, seed 0): two slides hold the training part's source
   images, one the test part's, so no source image is on both sides. Then ``slide tiles`` on the
   two training slides, ``train configs/slide_tiles_student.yaml`` (split by slide, validation
   from the training slides' tiles), ``export --int8``, ``slide infer`` on the test slide and
   ``slide evaluate`` against its annotations: accuracy and Dice, with the student's
   parameters, MACs and ONNX images/s.

    python benchmarks/slide_tiles.py [--kather ../shared/data/kather2016 --work /tmp/slide_e2e]

Steps already done in ``--work`` (slides, tiles, the trained run, the export) are kept, so an
interrupted run continues; delete the folder to start again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SVS = ROOT.parent / "shared" / "data" / "wsi" / "CMU-1-Small-Region.svs"
BLOCK = 3  # tiles per block side
KATHER_MPP = 0.495


def _feature(ring: list[list[float]], name: str) -> dict:
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"objectType": "annotation", "classification": {"name": name}},
    }


def speed(repeats: int) -> None:
    from histolite.slide.dataset import TileCutSettings, cut_tiles

    polygon = [[100, 150], [2100, 150], [2100, 2850], [100, 2850], [100, 150]]
    with tempfile.TemporaryDirectory() as tmp:
        notes = Path(tmp) / "CMU-1-Small-Region.geojson"
        notes.write_text(json.dumps([_feature(polygon, "tissue")]))
        settings = TileCutSettings(tile_um=112.0, tile_px=224)
        rates, totals, tiles = [], [], 0
        for i in range(repeats):
            started = time.perf_counter()
            summary = cut_tiles([SVS], notes, Path(tmp) / f"run{i}", settings, progress=False)
            elapsed = time.perf_counter() - started
            tiles = summary["tiles"]
            rates.append(tiles / elapsed)
            totals.append(elapsed)
    print(
        f"slide tiles on {SVS.name} (112 um tiles saved at 224 px; the annotation decides, no "
        f"tissue filter): {tiles} tiles; "
        f"whole command {statistics.median(totals):.2f} s, {statistics.median(rates):.1f} tiles/s "
        f"(median of {repeats}: {', '.join(f'{r:.1f}' for r in rates)})"
    )


def _mosaic(
    samples: list, path: Path, notes: Path, rng: np.random.Generator, blocks_per_row: int
) -> dict[str, int]:
    """A slide of BLOCK x BLOCK-tile blocks, one class each, and its annotations."""
    from histolite.data.images import load_rgb
    from histolite.slide.pyramid import write_pyramidal_tiff

    by_class: dict[str, list] = {}
    for sample in samples:
        by_class.setdefault(sample.class_name, []).append(sample)
    blocks = []
    for name, members in sorted(by_class.items()):
        order = rng.permutation(len(members))
        for start in range(0, len(order) - BLOCK * BLOCK + 1, BLOCK * BLOCK):
            blocks.append((name, [members[i] for i in order[start : start + BLOCK * BLOCK]]))
    blocks = [blocks[i] for i in rng.permutation(len(blocks))]
    side = 150 * BLOCK
    rows = (len(blocks) + blocks_per_row - 1) // blocks_per_row
    canvas = np.full((rows * side, blocks_per_row * side, 3), 245, np.uint8)
    features, counts = [], {}
    for k, (name, members) in enumerate(blocks):
        top, left = (k // blocks_per_row) * side, (k % blocks_per_row) * side
        for j, sample in enumerate(members):
            r, c = divmod(j, BLOCK)
            canvas[top + r * 150 : top + (r + 1) * 150, left + c * 150 : left + (c + 1) * 150] = (
                load_rgb(sample.path)[:150, :150]
            )
        jitter = rng.uniform(-12, 12, size=(4, 2))
        corners = np.array(
            [[left, top], [left + side, top], [left + side, top + side], [left, top + side]]
        )
        ring = (corners + jitter).clip(0, None).round(1).tolist()
        features.append(_feature([*ring, ring[0]], name))
        counts[name] = counts.get(name, 0) + 1
    write_pyramidal_tiff(path, canvas, KATHER_MPP, levels=3, compression="jpeg")
    notes.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return counts


def _histolite(*args: str) -> str:
    command = [str(Path(sys.executable).with_name("histolite")), *args]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    print(f"  {' '.join(args[:2])}: {time.perf_counter() - started:.0f} s")
    return result.stdout


def end_to_end(kather: Path, work: Path, epochs: int) -> None:
    from histolite.data.folder import scan_image_folder
    from histolite.data.registry import get_dataset
    from histolite.data.splits import make_split

    (work / "slides").mkdir(parents=True, exist_ok=True)
    (work / "notes").mkdir(exist_ok=True)
    source_image = dict(get_dataset("kather2016").groupings)["source_image"]
    images = scan_image_folder(kather, group_regex=source_image)
    names = make_split(images, val=0.0, test=0.3, seed=0, grouped=True)
    train = [s for s, n in zip(images.samples, names, strict=True) if n == "train"]
    test = [s for s, n in zip(images.samples, names, strict=True) if n == "test"]
    groups = sorted({s.group for s in train})
    rng = np.random.default_rng(0)
    half = set(rng.permutation(groups)[: len(groups) // 2].tolist())
    parts = {
        "train_a": [s for s in train if s.group in half],
        "train_b": [s for s in train if s.group not in half],
        "test_c": test,
    }
    for stem, members in parts.items():
        # one annotation folder per side: `slide tiles` refuses files that match no given slide
        notes = work / "notes" / stem.split("_")[0] / f"{stem}.geojson"
        notes.parent.mkdir(exist_ok=True)
        if (work / "slides" / f"{stem}.tif").is_file() and notes.is_file():
            print(f"{stem}: kept from an earlier run in {work}")
            continue
        counts = _mosaic(members, work / "slides" / f"{stem}.tif", notes, rng, 12)
        sources = len({s.group for s in members})
        print(f"{stem}: {sum(counts.values())} blocks from {sources} source images: {counts}")
    slides = work / "slides"
    _histolite(
        "slide", "tiles", str(slides / "train_a.tif"), str(slides / "train_b.tif"),
        "--annotations", str(work / "notes" / "train"), "--tile-um", f"{150 * KATHER_MPP:.2f}",
        "--tile-px", "150", "--out", str(work / "tiles"), "--no-progress",
    )  # fmt: skip
    summary = json.loads((work / "tiles" / "summary.json").read_text())
    print(f"tiles: {summary['tiles']} {summary['per_class']}; dropped {summary['dropped']}")
    if not (work / "run" / "train_summary.json").is_file():
        shutil.rmtree(work / "run", ignore_errors=True)
        _train(work, epochs)
    if not (work / "model" / "model.json").is_file():
        shutil.rmtree(work / "model", ignore_errors=True)
        _histolite("export", str(work / "run"), "--int8", "--out", str(work / "model"))
    # slide infer's default keeps tiles at least half tissue by the saturation mask, which
    # drops pale fat and glass-like tiles; 0.01 classifies (almost) every annotated tile
    for min_tissue in ("0.5", "0.01"):
        shutil.rmtree(work / "infer", ignore_errors=True)
        _histolite(
            "slide", "infer", str(work / "slides" / "test_c.tif"), "--model", str(work / "model"),
            "--out", str(work / "infer"), "--no-progress", "--threads", "2",
            "--min-tissue", min_tissue,
        )  # fmt: skip
        print(f"slide infer --min-tissue {min_tissue}:")
        _report(work)


def _train(work: Path, epochs: int) -> None:
    _histolite(
        "train", str(ROOT / "configs" / "slide_tiles_student.yaml"),
        "--set", f"data.root={work / 'tiles'}", "--set", "data.val_split_by=stratified",
        "--set", "data.test_fraction=0", "--set", "data.val_fraction=0.1",
        "--set", f"trainer.max_epochs={epochs}", "--out", str(work / "run"),
    )  # fmt: skip


def _report(work: Path) -> None:
    out = _histolite(
        "slide", "evaluate", str(work / "infer" / "test_c"),
        "--annotations", str(work / "notes" / "test"),
        "--out", str(work / "report"),
    )  # fmt: skip
    print(out.strip())
    report = json.loads((work / "report" / "report.json").read_text())
    card = json.loads((work / "model" / "model.json").read_text())
    infer = json.loads((work / "infer" / "test_c" / "summary.json").read_text())
    _print_costs(work, card, infer)
    print(
        f"test slide (source-image-disjoint from training): {report['n']} tiles, accuracy "
        f"{report['accuracy']:.4f} (balanced {report['balanced_accuracy']:.4f}, macro F1 "
        f"{report['macro_f1']:.4f}); excluded {report['excluded_tiles']}"
    )
    print("Dice: " + ", ".join(f"{c} {v:.3f}" for c, v in report["dice"].items() if v is not None))


def _print_costs(work: Path, card: dict, infer: dict) -> None:
    from histolite.models import count_macs, count_parameters
    from histolite.models.loading import load_run
    from histolite.runtime.classifier import OnnxClassifier
    from histolite.runtime.speed import onnx_images_per_second

    loaded = load_run(work / "run", "last", device="cpu")
    size = loaded.spec.image_size
    rate = onnx_images_per_second(OnnxClassifier(work / "model", threads=2), 64)
    print(
        f"student {loaded.spec.model_name}: {count_parameters(loaded.model):,} parameters, "
        f"{count_macs(loaded.model, size) / 1e6:.1f} M MACs at {size} px; ONNX INT8 "
        f"{rate:.0f} images/s (batch 64, 2 threads); slide infer {infer['timings_s']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kather", type=Path, default=None, help="Kather folder: run the e2e")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "slide_e2e")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    if SVS.is_file():
        speed(args.repeats)
    else:
        print(f"{SVS} not present: speed skipped")
    if args.kather is not None:
        end_to_end(args.kather, args.work, args.epochs)


if __name__ == "__main__":
    main()
