import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histolite.errors import DataError
from histolite.stain import ReinhardNormalizer, ReinhardStats, lab_to_rgb, rgb_to_lab

skcolor = pytest.importorskip("skimage.color")


def reference_reinhard(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Plain scikit-image Reinhard: Lab mean/std matching, float64 throughout."""
    src = skcolor.rgb2lab(source / 255.0)
    tgt = skcolor.rgb2lab(target / 255.0)
    out = (src - src.mean((0, 1))) / src.std((0, 1)) * tgt.std((0, 1)) + tgt.mean((0, 1))
    return skcolor.lab2rgb(out)


def _pair(source: Path, target: Path) -> tuple[np.ndarray, np.ndarray]:
    return np.array(Image.open(source).convert("RGB")), np.array(Image.open(target).convert("RGB"))


def _tiles(synthetic_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic H&E-like pair (always present)."""
    return _pair(
        sorted((synthetic_dir / "stroma").iterdir())[0],
        sorted((synthetic_dir / "tumor").iterdir())[5],
    )


def _real_tiles(kather_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """A real tumour tile normalised to a real mucosa tile; fails if those files are missing."""
    return _pair(
        sorted((kather_dir / "01_TUMOR").iterdir())[0],
        sorted((kather_dir / "06_MUCOSA").iterdir())[0],
    )


def test_lab_conversion_matches_scikit_image(synthetic_dir: Path) -> None:
    source, _ = _tiles(synthetic_dir)
    ours = rgb_to_lab(torch.from_numpy(source).permute(2, 0, 1).double() / 255).permute(1, 2, 0)
    np.testing.assert_allclose(ours.numpy(), skcolor.rgb2lab(source / 255.0), atol=1e-6)
    back = lab_to_rgb(ours.permute(2, 0, 1)).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(back, source / 255.0, atol=1e-6)


@pytest.mark.parametrize("tiles", ["synthetic", "kather"])
def test_reinhard_matches_reference(tiles: str, request: pytest.FixtureRequest) -> None:
    """Against scikit-image in float64: float path within 2e-4, uint8 path within rounding."""
    if tiles == "kather":
        source, target = _real_tiles(request.getfixturevalue("kather_dir"))
    else:
        source, target = _tiles(request.getfixturevalue("synthetic_dir"))
    normalizer = ReinhardNormalizer.fit(target)
    ours = normalizer(torch.from_numpy(source).permute(2, 0, 1).float() / 255).permute(1, 2, 0)
    reference = np.clip(reference_reinhard(source, target), 0.0, 1.0)
    assert np.abs(ours.numpy() - reference).mean() <= 2e-4
    # uint8 in, uint8 out: rounding to 1/255 steps costs at most half a step on average
    as_uint8 = normalizer(torch.from_numpy(source).permute(2, 0, 1))
    assert as_uint8.dtype == torch.uint8
    assert np.abs(as_uint8.permute(1, 2, 0).numpy() / 255.0 - reference).mean() <= 0.5 / 255


def test_batched_equals_one_by_one(synthetic_dir: Path) -> None:
    source, target = _tiles(synthetic_dir)
    normalizer = ReinhardNormalizer.fit(target)
    batch = torch.stack(
        [torch.from_numpy(source).permute(2, 0, 1), torch.from_numpy(target).permute(2, 0, 1)]
    )
    together = normalizer(batch)
    for i in range(2):
        assert torch.equal(together[i], normalizer(batch[i]))


def test_normalised_image_takes_the_target_statistics(synthetic_dir: Path) -> None:
    source, target = _tiles(synthetic_dir)
    normalizer = ReinhardNormalizer.fit(target)
    out = normalizer(torch.from_numpy(source).permute(2, 0, 1).double() / 255)
    # Lab statistics are matched exactly only for colours inside the sRGB gamut; the output is
    # clipped to it, so the pair must map mostly into the gamut for this to hold.
    out_of_gamut = ((out <= 0) | (out >= 1)).any(dim=0).double().mean().item()
    assert out_of_gamut < 0.1
    lab = rgb_to_lab(out)
    np.testing.assert_allclose(lab.mean(dim=(1, 2)).numpy(), normalizer.target.mean, atol=1.0)


@pytest.mark.parametrize("value", [255, 0, 242])
def test_flat_tiles_give_no_nan(value: int) -> None:
    normalizer = ReinhardNormalizer(ReinhardStats((60.0, 30.0, -10.0), (15.0, 8.0, 6.0)))
    flat = torch.full((2, 3, 16, 16), value, dtype=torch.uint8)
    out = normalizer(flat)
    assert out.dtype == torch.uint8 and out.shape == flat.shape
    float_out = normalizer(flat.float() / 255)
    assert torch.isfinite(float_out).all()


def test_ignore_background_keeps_glass_white(synthetic_dir: Path) -> None:
    source, target = _tiles(synthetic_dir)
    normalizer = ReinhardNormalizer.fit(target, ignore_background=True)
    white = torch.full((3, 16, 16), 255, dtype=torch.uint8)
    assert torch.equal(normalizer(white), white)
    tile = torch.from_numpy(source.copy()).permute(2, 0, 1)
    tile[:, :4, :4] = 255
    out = normalizer(tile)
    assert (out[:, :4, :4] >= 254).all()
    assert not torch.equal(out[:, 8:, 8:], tile[:, 8:, 8:])


def test_target_statistics_roundtrip(tmp_path: Path, synthetic_dir: Path) -> None:
    _, target = _tiles(synthetic_dir)
    normalizer = ReinhardNormalizer.fit(target)
    path = normalizer.save(tmp_path / "target.json")
    loaded = ReinhardNormalizer.from_file(path)
    assert loaded.target == normalizer.target
    image_path = tmp_path / "target.png"
    Image.fromarray(target).save(image_path)
    assert ReinhardNormalizer.from_file(image_path).target == pytest.approx(normalizer.target)
    (tmp_path / "bad.json").write_text(json.dumps({"mean": [1, 2]}))
    with pytest.raises(DataError, match=r"bad\.json"):
        ReinhardNormalizer.from_file(tmp_path / "bad.json")


def test_rejects_wrong_shapes() -> None:
    normalizer = ReinhardNormalizer(ReinhardStats((60.0, 30.0, -10.0), (15.0, 8.0, 6.0)))
    with pytest.raises(DataError, match="RGB tensor"):
        normalizer(torch.zeros(1, 16, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(synthetic_dir: Path) -> None:
    source, target = _tiles(synthetic_dir)
    normalizer = ReinhardNormalizer.fit(target)
    x = torch.from_numpy(source).permute(2, 0, 1).float() / 255
    assert torch.allclose(normalizer(x.cuda()).cpu(), normalizer(x), atol=1e-4)
