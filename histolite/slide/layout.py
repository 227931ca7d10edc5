"""The folders slide commands write: one owner for their file names, as ``RunDir`` owns a run.

``histolite slide infer --out OUT`` (and the service's slide jobs, with OUT = the job's folder)::

    OUT/<stem>/tissue_mask.png      the tissue mask the tiles were chosen on
    OUT/<stem>/tiles.csv            one row per classified tile: grid index, level-0 box,
                                    tissue fraction, label, confidence, entropy, probabilities
    OUT/<stem>/<stem>.geojson       the tiles as QuPath objects (File > Import objects)
    OUT/<stem>/heatmap.png          thumbnail, class map, one probability map per class
    OUT/<stem>/uncertainty.png      entropy and confidence per tile, tiles below the card's
                                    abstention threshold
    OUT/<stem>/summary.json         written last: settings, model, counts, timings, and the
                                    SHA-256 of tiles.csv and the mask (``HASHED_OUTPUTS``)
    OUT/<stem>/shards/I-of-N/       shard I of N of that slide, the same files
    OUT/batch_summary.json          slides classified and failed (``.I-of-N.json`` per shard)
    OUT/.shards/I-of-N.done         shard I of N has been through its whole batch

``histolite slide predict`` (slide-level MIL) writes ``OUT/<stem>/mil_prediction.json`` and
``mil_heatmap.png``; ``histolite slide tiles`` writes a tile dataset (:class:`TileDataset`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histolite.fileio import file_sha256

HASHED_OUTPUTS = ("tiles.csv", "tissue_mask.png")  # summary.json's outputs_sha256
SHARD_FOLDER = re.compile(r"^(\d+)-of-(\d+)$")


@dataclass(frozen=True)
class SlideOutputs:
    """The output folder of one slide (or of one shard of it)."""

    root: Path
    stem: str

    @property
    def tiles_csv(self) -> Path:
        return self.root / "tiles.csv"

    @property
    def mask(self) -> Path:
        return self.root / "tissue_mask.png"

    @property
    def geojson(self) -> Path:
        return self.root / f"{self.stem}.geojson"

    @property
    def heatmap(self) -> Path:
        return self.root / "heatmap.png"

    @property
    def uncertainty(self) -> Path:
        return self.root / "uncertainty.png"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def mil_prediction(self) -> Path:
        return self.root / "mil_prediction.json"

    @property
    def mil_heatmap(self) -> Path:
        return self.root / "mil_heatmap.png"

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    def shard(self, index: int, count: int) -> SlideOutputs:
        """Shard ``index`` of ``count``: ``<stem>/shards/I-of-N``, with the same file names."""
        return SlideOutputs(self.shards_dir / f"{index}-of-{count}", self.stem)

    def shards(self, count: int | None = None) -> list[SlideOutputs]:
        """The shard folders present, sorted; only those ``*-of-count`` when it is given."""
        if not self.shards_dir.is_dir():
            return []
        found = []
        for folder in sorted(self.shards_dir.iterdir()):
            match = SHARD_FOLDER.match(folder.name)
            if match and folder.is_dir() and (count is None or int(match[2]) == count):
                found.append(SlideOutputs(folder, self.stem))
        return found

    def hashed(self, name: str) -> Path:
        """One of ``HASHED_OUTPUTS`` by name (the key summary.json's ``outputs_sha256`` uses)."""
        if name not in HASHED_OUTPUTS:
            raise KeyError(name)
        return self.root / name

    def served_files(self) -> dict[str, Path]:
        """What the service hands out of a finished slide job, by the name clients ask for."""
        return {
            "summary.json": self.summary,
            "geojson": self.geojson,
            "heatmap.png": self.heatmap,
            "uncertainty.png": self.uncertainty,
            "tiles.csv": self.tiles_csv,
        }


@dataclass(frozen=True)
class BatchOutputs:
    """``OUT``: one folder per slide, plus the batch's own reports and shard markers."""

    root: Path

    def slide(self, slide: str | Path, shard: tuple[int, int] = (0, 1)) -> SlideOutputs:
        """The folder of ``slide`` (named by its file stem), or of shard ``(I, N)`` of it."""
        stem = Path(slide).stem
        outputs = SlideOutputs(self.root / stem, stem)
        index, count = shard
        return outputs if count == 1 else outputs.shard(index, count)

    def batch_summary(self, shard: tuple[int, int] = (0, 1)) -> Path:
        """``batch_summary.json``, or ``batch_summary.I-of-N.json`` for a shard.

        Shards share ``OUT``: one file each, so no shard's report overwrites another's.
        """
        index, count = shard
        name = "batch_summary.json" if count == 1 else f"batch_summary.{index}-of-{count}.json"
        return self.root / name

    def shard_marker(self, count: int, index: int) -> Path:
        """``.shards/I-of-N.done``: shard I of N has been through every slide of its batch.

        A slide's folder appears as soon as its mask is made, so folders cannot tell a merge
        that the shards are done; these markers, written at the very end of each shard's run,
        can.
        """
        return self.root / ".shards" / f"{index}-of-{count}.done"


@dataclass(frozen=True)
class TileDataset:
    """What ``histolite slide tiles`` writes: an image folder that ``train`` reads as it is.

    ::

        DATASET/<class>/<slide-stem>_x<X>_y<Y>.png   one tile, named by its level-0 corner
        DATASET/tiles.csv                            slide, x, y, width, height, class,
                                                     coverage, mpp (one row per tile)
        DATASET/summary.json                         tiles per class per slide, dropped by reason
        DATASET/.progress/<stem>[.I-of-N].json       a slide (shard) finished: resume skips it
    """

    root: Path

    def tile(self, class_name: str, stem: str, x: int, y: int) -> Path:
        return self.root / class_name / f"{stem}_x{x}_y{y}.png"

    @property
    def tiles_csv(self) -> Path:
        return self.root / "tiles.csv"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def progress(self, stem: str, shard: tuple[int, int] = (0, 1)) -> Path:
        index, count = shard
        suffix = "" if count == 1 else f".{index}-of-{count}"
        return self.root / ".progress" / f"{stem}{suffix}.json"


def outputs_match(outputs: SlideOutputs, summary: dict[str, Any]) -> bool:
    """Whether the folder's hashed outputs are the files ``summary`` recorded."""
    hashes = summary.get("outputs_sha256") or {}
    try:
        return all(file_sha256(outputs.hashed(n)) == hashes.get(n) for n in HASHED_OUTPUTS)
    except OSError:
        return False
