"""Split the Kather tiles into a training folder and an unseen test folder (symlinks).

For checks that train on one folder and evaluate on another. By default whole source images go
to one side (the Kather dataset's grouping, as in the recipes); ``--tile-level`` gives the
literature's stratified tile split, where tiles of one source image sit on both sides.

    python benchmarks/kather_holdout.py --data ../shared/data/kather2016 --out /tmp/kather
    histolite train configs/kather2016_resnet8.yaml --set data.root=/tmp/kather/train --out runs/r8
    histolite evaluate runs/r8 --data /tmp/kather/test --out runs/r8/holdout
"""

from __future__ import annotations

import argparse
from pathlib import Path

from histolite.data.folder import scan_image_folder
from histolite.data.registry import get_dataset
from histolite.data.splits import make_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="Kather folder (class folders).")
    parser.add_argument("--out", type=Path, required=True, help="Creates OUT/train and OUT/test.")
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tile-level", action="store_true", help="stratified tile split (leaks source images)"
    )
    args = parser.parse_args()
    source_image = dict(get_dataset("kather2016").groupings)["source_image"]
    images = scan_image_folder(args.data, group_regex=None if args.tile_level else source_image)
    splits = make_split(
        images, val=0.0, test=args.test_fraction, seed=args.seed, grouped=not args.tile_level
    )
    counts = {"train": 0, "test": 0}
    for sample, split in zip(images.samples, splits, strict=True):
        target = args.out / split / sample.class_name / sample.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(sample.path.resolve())
        counts[split] += 1
    print(
        f"{args.out}: train {counts['train']} tiles, test {counts['test']} tiles "
        f"({len(images.classes)} classes, seed {args.seed}, "
        f"{'tile-level' if args.tile_level else 'source-image-level'} split)"
    )


if __name__ == "__main__":
    main()
