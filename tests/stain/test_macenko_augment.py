"""Macenko on real and empty tiles against a plain NumPy reference; HED jitter; fast Reinhard."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histolite.errors import DataError
from histolite.stain import ReinhardNormalizer
from histolite.stain.augment import (
    BatchStainAugment,
    draw_macenko_target,
    hed_jitter,
    hed_to_rgb,
    lab_spread,
    macenko_spread,
    random_macenko,
    random_reinhard,
    rgb_to_hed,
)
from histolite.stain.macenko import MacenkoNormalizer, MacenkoStats

skcolor = pytest.importorskip("skimage.color")


def reference_macenko(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Macenko et al. 2009 written out plainly in NumPy float64 (Io = 255, beta 0.15, alpha 1)."""

    def stains(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        od = -np.log(np.maximum(image.reshape(-1, 3).astype(float), 1.0) / 255.0)
        tissue = od[(od > 0.15).all(axis=1)]
        _, vectors = np.linalg.eigh(np.cov(tissue.T))
        plane = vectors[:, 1:][:, ::-1]
        plane = plane * np.where(plane[0] < 0, -1.0, 1.0)
        angles = np.arctan2(tissue @ plane[:, 1], tissue @ plane[:, 0])
        low, high = np.percentile(angles, 1), np.percentile(angles, 99)
        a = plane @ [np.cos(low), np.sin(low)]
        b = plane @ [np.cos(high), np.sin(high)]
        pair = np.stack([a, b] if a[0] > b[0] else [b, a])
        pair /= np.linalg.norm(pair, axis=1, keepdims=True)
        concentrations = np.linalg.pinv(pair.T) @ od.T
        tissue_mask = (od > 0.15).all(axis=1)
        maxima = np.percentile(concentrations[:, tissue_mask], 99, axis=1)
        return pair, concentrations, maxima

    target_stains, _, target_max = stains(target)
    _, concentrations, maxima = stains(source)
    od = target_stains.T @ (concentrations * (target_max / maxima)[:, None])
    return np.clip(255 * np.exp(-od.T), 0, 255).reshape(source.shape)


def _tile(kather_dir: Path, cls: str, index: int) -> np.ndarray:
    return np.array(Image.open(sorted((kather_dir / cls).iterdir())[index]).convert("RGB"))


def test_macenko_matches_the_numpy_reference_on_real_tiles(kather_dir: Path) -> None:
    target = _tile(kather_dir, "01_TUMOR", 3)
    normaliser = MacenkoNormalizer.fit(target)
    sources = [
        _tile(kather_dir, c, i) for c in ("02_STROMA", "04_LYMPHO", "06_MUCOSA") for i in (0, 7)
    ]
    batch = torch.from_numpy(np.stack(sources)).permute(0, 3, 1, 2)
    ours = normaliser(batch).permute(0, 2, 3, 1).numpy().astype(float)
    for got, source in zip(ours, sources, strict=True):
        expected = reference_macenko(source, target)
        # float32 in the batched code against float64 here: within one intensity level
        assert np.abs(got - expected).mean() < 0.5, np.abs(got - expected).mean()
        assert np.abs(got - expected).max() <= 3
    assert not normaliser.counts  # all real tissue: nothing fell back


@pytest.mark.parametrize("fallback", ["unchanged", "target"])
def test_empty_and_fat_tiles_fall_back_without_nans(kather_dir: Path, fallback: str) -> None:
    normaliser = MacenkoNormalizer.fit(_tile(kather_dir, "01_TUMOR", 3), fallback=fallback)  # type: ignore[arg-type]
    empty = [_tile(kather_dir, "08_EMPTY", i) for i in range(8)]
    fat = [_tile(kather_dir, "07_ADIPOSE", i) for i in range(8)]
    for tiles in (empty, fat):
        batch = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)
        out = normaliser(batch)
        assert out.dtype == torch.uint8 and out.shape == batch.shape
        floats = normaliser(batch.float() / 255)
        assert torch.isfinite(floats).all() and floats.min() >= 0 and floats.max() <= 1
    assert normaliser.counts["too little tissue"] >= 8  # the empty tiles at least
    if fallback == "unchanged":
        batch = torch.from_numpy(np.stack(empty)).permute(0, 3, 1, 2)
        out = normaliser(batch)
        changed = (out != batch).flatten(1).any(1)
        assert changed.sum() <= 1  # an "empty" tile with a speck of tissue may be normalised


def test_macenko_on_synthetic_glass_and_one_stain() -> None:
    target = MacenkoStats(((0.65, 0.70, 0.29), (0.07, 0.99, 0.11)), (2.0, 1.0))
    normaliser = MacenkoNormalizer(target)
    glass = torch.full((2, 3, 32, 32), 245, dtype=torch.uint8)
    one_stain = torch.zeros((1, 3, 32, 32), dtype=torch.uint8)
    one_stain[:, 0], one_stain[:, 1], one_stain[:, 2] = 120, 60, 160  # a flat purple
    out = normaliser(torch.cat([glass, one_stain]))
    assert torch.equal(out, torch.cat([glass, one_stain]))  # all fell back, unchanged
    assert sum(normaliser.counts.values()) == 3
    with pytest.raises(DataError, match="almost no tissue"):
        MacenkoNormalizer.fit(np.full((32, 32, 3), 250, np.uint8))
    with pytest.raises(DataError, match="fallback"):
        MacenkoNormalizer(target, fallback="guess")  # type: ignore[arg-type]


def test_macenko_target_round_trips_through_json(kather_dir: Path, tmp_path: Path) -> None:
    fitted = MacenkoNormalizer.fit(_tile(kather_dir, "01_TUMOR", 3))
    fitted.save(tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["method"] == "macenko"
    loaded = MacenkoNormalizer.from_file(tmp_path / "t.json")
    assert loaded.target == fitted.target


def test_hed_round_trip_and_jitter_statistics() -> None:
    torch.manual_seed(0)
    images = torch.rand(4, 3, 16, 16) * 0.8 + 0.1
    np.testing.assert_allclose(hed_to_rgb(rgb_to_hed(images)), images, atol=1e-5)
    # our HED is scikit-image's rgb2hed up to its log scale (it divides by log(1e-6)) and its
    # clipping of negative densities
    theirs = skcolor.rgb2hed(images[0].permute(1, 2, 0).numpy().astype(np.float64))
    ours = rgb_to_hed(images[:1].double())[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(np.maximum(ours / -np.log(1e-6), 0), theirs, atol=1e-6)
    assert torch.equal(hed_jitter(images, 0.0), images)
    generator = torch.Generator().manual_seed(1)
    jittered = hed_jitter(images, 0.05, generator)
    assert jittered.shape == images.shape and not torch.allclose(jittered, images)
    again = hed_jitter(images, 0.05, torch.Generator().manual_seed(1))
    assert torch.equal(jittered, again)  # seedable
    delta = (rgb_to_hed(jittered) - rgb_to_hed(images)).abs()
    # |scale - 1| <= 0.05 and |shift| <= 0.05 bound the change of every density
    bound = 0.05 * rgb_to_hed(images).abs() + 0.05
    clipped = (hed_to_rgb(rgb_to_hed(images) * 1.05 + 0.05) >= 1.0).any(1, keepdim=True)
    assert bool(((delta <= bound + 1e-4) | clipped).all())


def test_random_reinhard_draws_targets_around_the_data(kather_dir: Path) -> None:
    tiles = [
        torch.from_numpy(_tile(kather_dir, c, i)).permute(2, 0, 1)
        for c in ("01_TUMOR", "02_STROMA", "04_LYMPHO")
        for i in range(4)
    ]
    spread = lab_spread(tiles)
    assert 30 < spread.mean_of_means[0] < 90 and all(v > 0 for v in spread.std_of_means)
    batch = torch.stack(tiles).float() / 255
    torch.manual_seed(0)
    out = random_reinhard(batch, spread)
    assert out.shape == batch.shape and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])
    augment = BatchStainAugment(0.02, spread)
    assert bool(augment) and not bool(BatchStainAugment())
    assert augment(batch).shape == batch.shape


def test_random_macenko_draws_stains_around_the_data(kather_dir: Path) -> None:
    tissue = [
        torch.from_numpy(_tile(kather_dir, c, i)).permute(2, 0, 1)
        for c in ("01_TUMOR", "02_STROMA", "04_LYMPHO")
        for i in range(4)
    ]
    glass = torch.full((3, 150, 150), 240, dtype=torch.uint8)
    spread = macenko_spread([*tissue, glass])  # glass has no stains: skipped, not an error
    fitted = MacenkoNormalizer.fit(tissue[0]).target.stain_matrix
    assert np.allclose(np.linalg.norm(spread.mean_matrix, axis=1), 1.0, atol=0.05)
    assert 0 < max(max(r) for r in spread.std_matrix) < 0.3
    # haematoxylin is the bluer vector: more OD in red than eosin has
    assert spread.mean_matrix[0][0] > spread.mean_matrix[1][0] and fitted[0][0] > fitted[1][0]
    targets = [draw_macenko_target(spread, torch.Generator().manual_seed(n)) for n in range(20)]
    for target in targets:
        assert np.allclose(np.linalg.norm(target.stain_matrix, axis=1), 1.0)
        assert min(min(r) for r in target.stain_matrix) > 0 and min(target.max_concentrations) > 0
    assert len({t.stain_matrix for t in targets}) == 20
    batch = torch.stack([*tissue[:3], glass]).float() / 255
    out = random_macenko(batch, spread, torch.Generator().manual_seed(0))
    again = random_macenko(batch, spread, torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and torch.isfinite(out).all()  # seedable, never NaN
    assert torch.equal(out[3], batch[3])  # glass passes unchanged
    assert (out[:3] - batch[:3]).abs().mean() > 0.01  # tissue is recoloured
    with pytest.raises(DataError, match="at least 2 training images"):
        macenko_spread([glass, glass])
    assert bool(BatchStainAugment(stain_spread=spread))


def test_fast_and_torch_reinhard_paths_agree(kather_dir: Path) -> None:
    tiles = np.stack([_tile(kather_dir, c, 0) for c in ("01_TUMOR", "05_DEBRIS", "08_EMPTY")])
    batch = torch.from_numpy(tiles).permute(0, 3, 1, 2)
    for background in (False, True):
        normaliser = ReinhardNormalizer.fit(
            _tile(kather_dir, "06_MUCOSA", 0), ignore_background=background
        )
        fast = normaliser(batch).float()  # uint8 on CPU: OpenCV
        exact = normaliser.torch_normalize(batch).float()
        assert (fast - exact).abs().mean() <= 0.5, (background, (fast - exact).abs().mean())


def test_cli_fit_then_normalize_folders_with_a_preview(
    kather_dir: Path, tmp_path: Path, run_cli: Callable[[list[str]], tuple[int, str, str]]
) -> None:
    reference = sorted((kather_dir / "01_TUMOR").iterdir())[3]
    target = tmp_path / "target.json"
    code, out, err = run_cli(
        ["stain", "fit", str(reference), "--out", str(target), "--method", "macenko"]
    )
    assert code == 0, err
    data = tmp_path / "data"
    for cls in ("02_STROMA", "08_EMPTY"):
        (data / cls).mkdir(parents=True)
        for path in sorted((kather_dir / cls).iterdir())[:3]:
            (data / cls / path.name).write_bytes(path.read_bytes())
    code, out, err = run_cli(
        ["stain", "normalize", str(data), "--target", str(target), "--method", "macenko",
         "--out", str(tmp_path / "out"), "--no-progress", "--preview", "4"]
    )  # fmt: skip
    assert code == 0, err
    written = sorted(
        p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")
    )
    assert len(written) == 7 and "preview.png" in written  # class folders kept
    assert any(w.startswith("data/08_EMPTY/") for w in written)
    assert "too little tissue" in out
    assert Image.open(tmp_path / "out" / "preview.png").size == (4 * 128, 256)


def test_training_config_turns_on_each_stain_augmentation(
    synthetic_dir: Path, tmp_path: Path
) -> None:
    from support import write_config

    from histolite.config import load_config
    from histolite.train.data import prepare_data
    from histolite.train.runner import batch_stain_augment

    config = write_config(
        tmp_path / "cfg.yaml",
        synthetic_dir,
        augment={"hed_jitter": 0.05, "random_reinhard": True, "random_macenko": True},
    )
    cfg = load_config(config)
    augment = batch_stain_augment(cfg, prepare_data(cfg.data, cfg.seed, progress=False))
    assert augment.hed_sigma == 0.05
    assert augment.spread is not None and augment.stain_spread is not None
    plain = batch_stain_augment(load_config(write_config(tmp_path / "p.yaml", synthetic_dir)), None)  # type: ignore[arg-type]
    assert not plain  # nothing asked for, no training images read


def _stained_tiles(n: int) -> list[torch.Tensor]:
    """Synthetic H&E-like tiles: random H and E amounts mixed by Ruifrok's vectors."""
    generator = torch.Generator().manual_seed(3)
    hed = torch.rand(n, 3, 32, 32, generator=generator) * torch.tensor([1.2, 0.8, 0.0]).view(
        1, 3, 1, 1
    )
    return [(hed_to_rgb(hed)[i] * 255).round().to(torch.uint8) for i in range(n)]


def test_batch_augment_has_its_own_seeded_generator_and_survives_autocast() -> None:
    tiles = _stained_tiles(6)
    batch = torch.stack(tiles).float() / 255
    augment = BatchStainAugment(0.05, lab_spread(tiles), macenko_spread(tiles), seed=7)
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as under precision: bf16-mixed
        out = augment(batch)
    # the global stream (batch order, flips, workers' seeds) is untouched by stain augmentation
    assert torch.equal(torch.rand(3), expected_next)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    again = BatchStainAugment(0.05, augment.spread, augment.stain_spread, seed=7)
    assert torch.equal(again(batch), out)  # same seed, same draws
    other_rank = BatchStainAugment(0.05, augment.spread, augment.stain_spread, seed=7)
    other_rank.start(1)
    assert not torch.allclose(other_rank(batch), out)  # each DDP rank draws its own values
    assert sum(augment.fallbacks.values()) == 0  # every synthetic tile has both stains
    glass = torch.full((1, 3, 32, 32), 0.95)
    assert torch.isfinite(augment(glass)).all()
    assert sum(augment.fallbacks.values()) == 1  # the glass tile passed unchanged, counted


def test_stain_augment_generator_state_is_saved_and_restored() -> None:
    from types import SimpleNamespace

    from histolite.train.rng import RngState

    augment = BatchStainAugment(0.05, seed=1)
    module = SimpleNamespace(batch_augment=augment)
    checkpoint: dict = {}
    callback = RngState()
    callback.on_save_checkpoint(None, module, checkpoint)  # type: ignore[arg-type]
    batch = torch.stack(_stained_tiles(2)).float() / 255
    first = augment(batch)
    augment(batch)  # the stream moves on
    callback.on_load_checkpoint(None, module, checkpoint)  # type: ignore[arg-type]
    assert torch.equal(augment(batch), first)  # resumed where the checkpoint was taken


def test_stain_augment_refuses_what_would_silently_break() -> None:
    tiles = _stained_tiles(2)
    with pytest.raises(DataError, match="float batch"):
        hed_jitter(torch.stack(tiles), 0.05)  # uint8 would come back as a 0/1 image
    with pytest.raises(DataError, match="at least 2 training images"):
        lab_spread(tiles[:1])  # one image has no spread: every target would be NaN
