"""Split the Kather tiles into a training folder and an unseen test folder (symlinks).

The issue's acceptance check trains on one folder and evaluates on another folder of Kather
tiles. This script makes such a pair from the developers' subset, stratified and seeded:

    python benchmarks/kather_holdout.py --data ../shared/data/kather2016 --out /tmp/kather
    histolite train configs/kather2016_resnet8.yaml --set data.root=/tmp/kather/train --out runs/r8
    histolite evaluate runs/r8 --data /tmp/kather/test --out runs/r8/holdout
"""

from __future__ import annotations

import argparse
from pathlib import Path

from histolite.data.folder import scan_image_folder
from histolite.data.splits import make_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="Kather folder (class folders).")
    parser.add_argument("--out", type=Path, required=True, help="Creates OUT/train and OUT/test.")
    parser.add_argument("--test-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images = scan_image_folder(args.data)
    splits = make_split(images, val=0.0, test=args.test_fraction, seed=args.seed, grouped=False)
    counts = {"train": 0, "test": 0}
    for sample, split in zip(images.samples, splits, strict=True):
        target = args.out / split / sample.class_name / sample.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(sample.path.resolve())
        counts[split] += 1
    print(
        f"{args.out}: train {counts['train']} tiles, test {counts['test']} tiles "
        f"({len(images.classes)} classes, seed {args.seed})"
    )


if __name__ == "__main__":
    main()
