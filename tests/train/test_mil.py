"""Attention MIL: padding, learning a one-special-instance task, training runs and overlays."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import write_config
from typer.testing import CliRunner

from histolite.cli import app
from histolite.data.bags import FeatureBagDataset, ImageBagDataset, collate_bags
from histolite.data.folder import scan_image_folder
from histolite.data.transforms import build_eval_transform
from histolite.errors import HistoliteError
from histolite.evaluate.explain import explain_image, last_spatial_layer, render_overlay
from histolite.models.loading import load_run
from histolite.models.mil import AttentionMIL
from histolite.models.registry import create_feature_extractor
from histolite.train.mil import load_or_compute_features

FEATURES = 16


def _bags(n: int, rng: np.random.Generator) -> tuple[list[torch.Tensor], list[int], list[int]]:
    """Gaussian instances; a positive bag holds exactly one special instance (shifted mean).

    Returns bags, labels and the special instance's position (-1 for negative bags).
    """
    direction = torch.zeros(FEATURES)
    direction[:4] = 3.0  # clearly special: 6 standard deviations from the other instances
    bags, labels, where = [], [], []
    for i in range(n):
        size = int(rng.integers(4, 13))
        bag = torch.from_numpy(rng.standard_normal((size, FEATURES)).astype(np.float32))
        positive = i % 2 == 0
        position = int(rng.integers(size)) if positive else -1
        if positive:
            bag[position] += direction
        bags.append(bag)
        labels.append(int(positive))
        where.append(position)
    return bags, labels, where


@pytest.mark.parametrize("gated", [False, True])
def test_mil_learns_the_single_special_instance_and_attends_to_it(gated: bool) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    train_bags, train_labels, _ = _bags(512, rng)
    model = AttentionMIL(None, FEATURES, 2, embed_dim=32, attention_dim=16, gated=gated, dropout=0)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(
        FeatureBagDataset(train_bags, train_labels),
        batch_size=16,
        shuffle=True,
        collate_fn=collate_bags,
    )
    for _ in range(15):
        for x, mask, y in loader:
            logits, _ = model(x, mask)
            loss = torch.nn.functional.cross_entropy(logits, y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    test_bags, test_labels, where = _bags(200, np.random.default_rng(1))
    x, mask, y = collate_bags(list(zip(test_bags, test_labels, strict=True)))
    with torch.no_grad():
        logits, attention = model(x, mask)
    accuracy = float((logits.argmax(1) == y).float().mean())
    assert accuracy > 0.9  # chance is 0.5
    positives = [i for i, w in enumerate(where) if w >= 0]
    on_special = attention[positives, [where[i] for i in positives]]
    hits = sum(int(attention[i].argmax()) == where[i] for i in positives)
    assert float(on_special.mean()) > 0.5  # uniform attention would give ~0.13
    assert hits / len(positives) > 0.9


def test_padded_batch_equals_one_bag_at_a_time() -> None:
    torch.manual_seed(0)
    encoder, dim = create_feature_extractor("resnet8")
    model = AttentionMIL(encoder, dim, 3, embed_dim=8, attention_dim=4, gated=True).eval()
    bags = [torch.rand(n, 3, 16, 16) for n in (2, 5, 3)]
    x, mask, _ = collate_bags([(b, 0) for b in bags])
    assert x.shape == (3, 5, 3, 16, 16) and mask.sum().item() == 10
    with torch.no_grad():
        logits, attention = model(x, mask)
        for i, bag in enumerate(bags):
            single_logits, single_attention = model(bag.unsqueeze(0))
            torch.testing.assert_close(logits[i], single_logits[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                attention[i, : len(bag)], single_attention[0], atol=1e-6, rtol=1e-5
            )
            assert float(attention[i, len(bag) :].abs().sum()) == 0.0  # padding gets nothing
            assert float(attention[i].sum()) == pytest.approx(1.0, abs=1e-6)


def test_feature_extractors_for_each_backbone_family() -> None:
    for name, expected in (("resnet8", 64), ("resnet18", 512), ("mixnet_s", 1536)):
        model, dim = create_feature_extractor(name)
        assert dim == expected
        with torch.no_grad():
            assert model.eval()(torch.rand(1, 3, 32, 32)).shape == (1, expected)


def test_feature_cache_is_reused(tmp_path: Path, synthetic_dir: Path) -> None:
    samples = list(scan_image_folder(synthetic_dir).samples[:3])
    bags = ImageBagDataset(samples, 16, 16, build_eval_transform(16))
    encoder, _ = create_feature_extractor("resnet8")
    path = tmp_path / "train-key.npz"
    first = load_or_compute_features(path, encoder, bags, progress=False, desc="x")
    assert [f.shape for f in first] == [(4, 64)] * 3  # 32 px images, 16 px patches

    class Refuse(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise AssertionError("features should come from the cache")

    again = load_or_compute_features(path, Refuse(), bags, progress=False, desc="x")
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b)


def test_mosaic_bags_record_their_decisive_tiles(mosaic_bags: Path) -> None:
    with (mosaic_bags / "bags.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 48 * 4
    per_bag: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        per_bag.setdefault(row["bag"], []).append(row)
    for bag, cells in per_bag.items():
        decisive = sum(int(c["decisive"]) for c in cells)
        assert (decisive == 1) == bag.startswith("positive/"), bag
        assert Image.open(mosaic_bags / bag).size == (64, 64)


@pytest.mark.parametrize("frozen", [True, False])
def test_mil_training_run_reports_and_explains(
    tmp_path: Path, mosaic_bags: Path, frozen: bool
) -> None:
    config = write_config(
        tmp_path / "mil.yaml",
        mosaic_bags,
        data={"image_size": 32, "batch_size": 8, "val_fraction": 0.2, "test_fraction": 0.2},
        trainer={"max_epochs": 2},
        mil={"patch": {"size": 32}, "freeze_backbone": frozen, "cache_features": frozen},
    )
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(config), "--out", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (list((run / "features").glob("train-*.npz")) != []) == frozen
    spec = json.loads((run / "run.json").read_text())
    assert spec["mil"]["patch"]["size"] == 32 and spec["mil"]["pooling"] == "gated"
    report = json.loads((run / "reports" / "test" / "report.json").read_text())
    assert report["level"] == "bag" and report["n"] > 0
    with (run / "reports" / "test" / "attention.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 * report["n"]  # a 2x2 mosaic is a bag of 4 patches
    for path in {r["path"] for r in rows}:
        weights = [float(r["attention"]) for r in rows if r["path"] == path]
        assert sum(weights) == pytest.approx(1.0, abs=1e-4)

    image = next((mosaic_bags / "positive").glob("*.png"))
    overlay = tmp_path / "overlay.png"
    result = CliRunner().invoke(app, ["explain", str(run), str(image), "--out", str(overlay)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["method"] == "attention"
    assert Image.open(overlay).size == Image.open(image).size


def test_gradcam_overlay_has_the_image_size(tmp_path: Path, synthetic_dir: Path) -> None:
    config = write_config(tmp_path / "cnn.yaml", synthetic_dir)
    run = tmp_path / "cnn"
    result = CliRunner().invoke(app, ["train", str(config), "--out", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    image = next(synthetic_dir.rglob("*.png"))
    overlay = tmp_path / "cam.png"
    result = CliRunner().invoke(
        app, ["explain", str(run), str(image), "--out", str(overlay), "--target", "stroma"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["method"] == "gradcam" and payload["explained_class"] == "stroma"
    assert Image.open(overlay).size == Image.open(image).size
    loaded = load_run(run)
    pixels = np.asarray(Image.open(image).convert("RGB"))
    explanation = explain_image(loaded, pixels)
    assert explanation.heatmap.shape == pixels.shape[:2]
    assert explanation.heatmap.min() >= 0.0 and explanation.heatmap.max() <= 1.0
    with pytest.raises(HistoliteError, match="not an attention-MIL run"):
        explain_image(loaded, pixels, method="attention")


def test_gradcam_on_a_patch_level_run(tmp_path: Path, synthetic_dir: Path) -> None:
    """A run trained on patches gets one CAM per patch, pasted at the patch's place."""
    config = write_config(
        tmp_path / "patches.yaml", synthetic_dir, data={"image_size": 16, "patches": {"size": 16}}
    )
    run = tmp_path / "patch_run"
    result = CliRunner().invoke(app, ["train", str(config), "--out", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    pixels = np.asarray(Image.open(next(synthetic_dir.rglob("*.png"))).convert("RGB"))
    explanation = explain_image(load_run(run), pixels, method="gradcam")
    assert explanation.heatmap.shape == (32, 32)
    assert explanation.probs.shape == (4,) and explanation.probs.sum() == pytest.approx(1.0)


def test_default_gradcam_layer_and_overlay_checks(tmp_path: Path) -> None:
    model, _ = create_feature_extractor("resnet18")
    assert last_spatial_layer(model.eval(), torch.rand(1, 3, 64, 64)) == "layer4"
    pixels = np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    overlay = render_overlay(pixels, np.linspace(0, 1, 40 * 56).reshape(40, 56), tmp_path / "o.png")
    assert Image.open(overlay).size == (56, 40)
    with pytest.raises(HistoliteError, match="does not match the image"):
        render_overlay(pixels, np.zeros((4, 4)), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
