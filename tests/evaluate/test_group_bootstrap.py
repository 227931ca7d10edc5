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
    # images are mostly easy or mostly hard for both arms; A gets one more tile right per image
    rng = np.random.default_rng(1)
    groups = [f"img{i // 10}" for i in range(300)]
    easy = np.repeat(rng.random(30) < 0.6, 10)
    b = np.where(easy, rng.random((3, 300)) < 0.95, rng.random((3, 300)) < 0.3)
    a = b.copy()
    for run in range(3):
        for start in range(0, 300, 10):
            wrong = np.flatnonzero(~a[run, start : start + 10])
            if wrong.size:
                a[run, start + wrong[0]] = True
    paired = group_bootstrap_difference(a, b, groups)
    assert paired["runs"] == 3 and paired["groups"] == 30
    assert 0.0 < paired["low"] <= paired["difference"] <= paired["high"]
    # unpaired, the same gain is lost in the image-to-image spread
    alone_a = group_bootstrap_accuracy(a[0], groups)
    alone_b = group_bootstrap_accuracy(b[0], groups)
    assert alone_a["low"] < alone_b["high"]
    same = group_bootstrap_difference(b, b, groups)
    assert same["difference"] == same["low"] == same["high"] == 0.0
    with pytest.raises(ValueError, match="do not pair"):
        group_bootstrap_difference(a, b[:2], groups)
    with pytest.raises(ValueError, match="no paired results"):
        group_bootstrap_difference(np.zeros((0, 0)), np.zeros((0, 0)), [])
