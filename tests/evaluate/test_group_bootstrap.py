"""The accuracy interval resamples whole groups, because tiles of one image fail together."""

import numpy as np
import pytest

from histolite.evaluate.metrics import group_bootstrap_accuracy, group_bootstrap_difference


def test_correlated_tiles_widen_the_interval() -> None:
    # 20 images of 30 tiles: each image is all right or all wrong (70% of images right)
    correct = np.repeat(np.arange(20) < 14, 30)
    by_image = group_bootstrap_accuracy(correct, [f"img{i // 30}" for i in range(600)])
    by_tile = group_bootstrap_accuracy(correct, [f"tile{i}" for i in range(600)])
    assert by_image["groups"] == 20 and by_tile["groups"] == 600
    assert by_image["low"] < 0.7 < by_image["high"]
    assert by_tile["low"] < 0.7 < by_tile["high"]
    # the binomial sd over 20 images is ~0.10, over 600 tiles ~0.019
    assert by_image["high"] - by_image["low"] > 0.25
    assert by_tile["high"] - by_tile["low"] < 0.1


def test_interval_is_reproducible_and_validated() -> None:
    correct, groups = [True, False, True, True], ["a", "a", "b", "c"]
    assert group_bootstrap_accuracy(correct, groups) == group_bootstrap_accuracy(correct, groups)
    with pytest.raises(ValueError, match="4 results but 3 groups"):
        group_bootstrap_accuracy(correct, groups[:3])
    with pytest.raises(ValueError, match="no predictions"):
        group_bootstrap_accuracy([], [])


def test_paired_difference_keeps_the_pairing() -> None:
    groups = [f"img{i // 10}" for i in range(200)]
    base = np.random.default_rng(1).random((3, 200)) < 0.8
    better = base.copy()
    better[:, :20] = True  # B fixes the same two images in every run
    same = group_bootstrap_difference(base, base, groups)
    assert same["difference"] == 0.0 and same["low"] == same["high"] == 0.0
    gain = group_bootstrap_difference(better, base, groups)
    assert gain["runs"] == 3 and gain["groups"] == 20
    assert 0.0 <= gain["low"] <= gain["difference"] <= gain["high"]
    with pytest.raises(ValueError, match="do not pair"):
        group_bootstrap_difference(better, base[:2], groups)
