"""Calibration, selective prediction and OOD scores: every expected number worked out by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from histolite.evaluate.metrics import (
    accuracy_at_coverage,
    accuracy_coverage,
    auroc,
    calibration_metrics,
    choose_abstention_threshold,
    group_bootstrap_calibration,
    selective_summary,
)
from histolite.evaluate.plots import plot_accuracy_coverage, plot_reliability
from histolite.uncertainty import ood_scores

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def two_class(confidences: list[float], correct: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Rows [c, 1 - c] (class 0 predicted, c >= 0.5) with label 0 where correct, else 1."""
    c = np.asarray(confidences, dtype=np.float64)
    return np.stack([c, 1 - c], axis=1), np.where(correct, 0, 1)


# ten tiles, most confident first: the 7th and the last two are wrong
TEN_CONF = [0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.90]
TEN_CORRECT = [True] * 6 + [False, True, False, False]


def shuffled_ten() -> tuple[np.ndarray, np.ndarray]:
    """The ten tiles in a scrambled order, so the functions have to sort."""
    probs, labels = two_class(TEN_CONF, TEN_CORRECT)
    order = np.random.default_rng(3).permutation(10)
    return probs[order], labels[order]


# --- calibration_metrics ---------------------------------------------------------------------


def test_ece_on_a_hand_example() -> None:
    # bins of width 0.2; conf 0.9 right -> bin 4; 0.7 wrong and 0.7 right -> bin 3;
    # 0.55 right -> bin 2
    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.3, 0.7], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 0])
    m = calibration_metrics(probs, labels, bins=5)
    # gaps: bin 2 |1 - 0.55| = 0.45 (1 tile), bin 3 |0.5 - 0.7| = 0.2 (2), bin 4 |1 - 0.9| = 0.1 (1)
    assert m["ece"] == pytest.approx((0.45 + 2 * 0.2 + 0.1) / 4)  # 0.2375
    assert m["mce"] == pytest.approx(0.45)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["mean_confidence"] == pytest.approx(2.85 / 4)
    assert m["n"] == 4
    assert [b["count"] for b in m["bins"]] == [0, 0, 1, 2, 1]
    assert m["bins"][3]["accuracy"] == pytest.approx(0.5)
    assert m["bins"][3]["confidence"] == pytest.approx(0.7)
    assert m["bins"][0]["accuracy"] is None and m["bins"][0]["confidence"] is None
    assert [(b["low"], b["high"]) for b in m["bins"]] == [
        (0.0, 0.2),
        (0.2, 0.4),
        (0.4, 0.6),
        (0.6, 0.8),
        (0.8, 1.0),
    ]
    # -> report.json as is: no NaN, empty bins are null
    assert json.loads(json.dumps(m, allow_nan=False))["bins"][0]["accuracy"] is None
    # brier per tile: 0.01 + 0.01, 0.49 + 0.49, 0.09 + 0.09, 0.2025 + 0.2025
    assert m["brier"] == pytest.approx((0.02 + 0.98 + 0.18 + 0.405) / 4)
    assert m["nll"] == pytest.approx(
        -(math.log(0.9) + math.log(0.3) + math.log(0.7) + math.log(0.55)) / 4
    )


def test_nll_and_brier_by_hand_with_a_zero_probability_and_a_full_confidence() -> None:
    probs = np.array([[0.5, 0.25, 0.25], [0.2, 0.7, 0.1], [1.0, 0.0, 0.0]])
    labels = np.array([0, 2, 1])
    m = calibration_metrics(probs, labels, bins=10)
    # -log p(true): ln 2, ln 10, and -ln(1e-12) = 12 ln 10 for the zero (finite, not inf)
    assert m["nll"] == pytest.approx((math.log(2) + 13 * math.log(10)) / 3)
    # (p - onehot)^2 summed: 0.25 + 0.0625 + 0.0625, 0.04 + 0.49 + 0.81, and for [1, 0, 0]
    # against class 1: (1 - 0)^2 + (0 - 1)^2 + 0 = 2
    assert m["brier"] == pytest.approx((0.375 + 1.34 + 2.0) / 3)
    # a confidence of exactly 1.0 is counted in the last bin, not dropped
    last = m["bins"][-1]
    assert (last["low"], last["high"], last["count"]) == (0.9, 1.0, 1)
    assert last["accuracy"] == 0.0 and last["confidence"] == 1.0
    assert [b["count"] for b in m["bins"]].count(1) == 3  # 0.5 -> bin 5, 0.7 -> bin 7
    assert m["bins"][5]["count"] == 1 and m["bins"][7]["count"] == 1


def test_confidences_on_an_edge_go_to_the_bin_above() -> None:
    # 0.6 * 5 and 15/22 are where floor(conf * bins) and linspace edges go wrong
    for bins, k in ((5, 3), (22, 15), (10, 7), (15, 8)):
        conf = k / bins
        m = calibration_metrics(np.array([[conf, 1 - conf]]), np.array([0]), bins=bins)
        assert m["bins"][k]["count"] == 1, (bins, k)


def test_a_calibrated_model_has_a_small_ece() -> None:
    # labels drawn from the predicted distribution itself: calibrated by construction
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(4, 0.5), size=20_000)
    cumulative = probs.cumsum(axis=1)
    labels = np.minimum((rng.random((20_000, 1)) > cumulative).sum(axis=1), 3)
    m = calibration_metrics(probs, labels)
    assert m["ece"] < 0.02
    assert abs(m["accuracy"] - m["mean_confidence"]) < 0.01


def test_an_over_confident_model_shows_the_gap() -> None:
    # says 0.9 every time, right 6 times in 10: one bin, gap 0.3
    probs, labels = two_class([0.9] * 10, [True] * 6 + [False] * 4)
    m = calibration_metrics(probs, labels)
    assert m["ece"] == pytest.approx(0.3)
    assert m["mce"] == pytest.approx(0.3)
    assert m["mean_confidence"] - m["accuracy"] == pytest.approx(0.3)
    assert sum(b["count"] for b in m["bins"]) == 10


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        (np.array([0.5, 0.5]), np.array([0]), "samples, classes"),
        (np.full((2, 2), 0.5), np.array([0, 1, 0]), r"labels must have shape \(2,\)"),
        (np.array([[0.6, 0.6]]), np.array([0]), "row 0 sums to 1.2"),
        (np.array([[2.0, -1.0]]), np.array([0]), "not logits"),
        (np.array([[0.5, 0.5]]), np.array([2]), r"class indices in \[0, 1\]"),
        (np.array([[0.5, 0.5]]), np.array([0.5]), "integer class indices"),
        (np.array([[np.nan, 0.5]]), np.array([0]), "NaN"),
        (np.zeros((0, 2)), np.zeros(0, dtype=int), "no predictions"),
    ],
)
def test_calibration_inputs_are_validated(
    probs: np.ndarray, labels: np.ndarray, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        calibration_metrics(probs, labels)


def test_bins_are_validated() -> None:
    with pytest.raises(ValueError, match="bins"):
        calibration_metrics(np.array([[0.5, 0.5]]), np.array([0]), bins=0)


# --- selective prediction ----------------------------------------------------------------------


def test_accuracy_at_coverage_by_hand() -> None:
    probs, labels = shuffled_ten()
    # top-k accuracy: 1 (k <= 6), 6/7, 7/8, 7/9, 7/10
    assert accuracy_at_coverage(probs, labels, 0.6) == 1.0
    assert accuracy_at_coverage(probs, labels, 0.7) == pytest.approx(6 / 7)
    assert accuracy_at_coverage(probs, labels, 0.75) == pytest.approx(7 / 8)  # ceil(7.5)
    assert accuracy_at_coverage(probs, labels, 1.0) == pytest.approx(0.7)
    assert accuracy_at_coverage(probs, labels, 0.01) == 1.0  # at least one tile
    # 0.07 * 100 is 7.000000000000001 in floating point: still 7 tiles (all right), not 8
    hundred, truth = two_class([0.999 - i / 1000 for i in range(100)], [True] * 7 + [False] * 93)
    assert accuracy_at_coverage(hundred, truth, 0.07) == 1.0
    assert accuracy_at_coverage(hundred, truth, 0.08) == pytest.approx(7 / 8)
    for bad in (0.0, 1.1, -0.5):
        with pytest.raises(ValueError, match="coverage"):
            accuracy_at_coverage(probs, labels, bad)


def test_selective_summary_by_hand() -> None:
    probs, labels = shuffled_ten()
    s = selective_summary(probs, labels)
    assert s["n"] == 10
    at = s["accuracy_at_coverage"]
    assert list(at) == ["1.0", "0.95", "0.9", "0.8"]
    assert at["1.0"] == pytest.approx(0.7)
    assert at["0.95"] == pytest.approx(0.7)  # ceil(9.5) = 10 tiles
    assert at["0.9"] == pytest.approx(7 / 9)
    assert at["0.8"] == pytest.approx(7 / 8)
    area = (6 + 6 / 7 + 7 / 8 + 7 / 9 + 7 / 10) / 10
    assert s["area_under_accuracy_coverage"] == pytest.approx(area)
    assert s["aurc"] == pytest.approx(1 - area)


def test_accuracy_coverage_curve_and_its_thinning() -> None:
    probs, labels = shuffled_ten()
    full = accuracy_coverage(probs, labels)
    assert full["n"] == 10
    assert full["coverage"] == pytest.approx([k / 10 for k in range(1, 11)])
    assert full["accuracy"] == pytest.approx([1] * 6 + [6 / 7, 7 / 8, 7 / 9, 7 / 10])
    # thinned to 4 points: k = 1, 4, 7, 10 (the ends always kept)
    thin = accuracy_coverage(probs, labels, max_points=4)
    assert thin["coverage"] == pytest.approx([0.1, 0.4, 0.7, 1.0])
    assert thin["accuracy"] == pytest.approx([1, 1, 6 / 7, 0.7])
    big = accuracy_coverage(*two_class([0.5 + i / 4000 for i in range(1000)], [True] * 1000))
    assert len(big["coverage"]) == 200 and big["coverage"][-1] == 1.0
    json.dumps(big, allow_nan=False)


def test_ties_in_confidence_keep_input_order() -> None:
    probs, labels = two_class([0.8, 0.8, 0.6], [False, True, True])
    assert accuracy_coverage(probs, labels)["accuracy"] == pytest.approx([0, 0.5, 2 / 3])


# --- choose_abstention_threshold ---------------------------------------------------------------


def test_threshold_is_the_lowest_that_reaches_the_target() -> None:
    probs, labels = shuffled_ten()
    # k = 7 (0.857) and k = 8 (0.875) both reach 0.8; the lower threshold answers more
    t = choose_abstention_threshold(probs, labels, 0.8)
    assert t["threshold"] == pytest.approx(0.92)
    assert t["coverage"] == pytest.approx(0.8)
    assert t["accuracy"] == pytest.approx(0.875)
    assert (t["answered"], t["n"], t["target"]) == (8, 10, 0.8)
    assert "reason" not in t
    # 6/7 < 0.86 <= 7/8: accuracy is not monotone in the threshold, k = 8 still qualifies
    assert choose_abstention_threshold(probs, labels, 0.86)["threshold"] == pytest.approx(0.92)
    strict = choose_abstention_threshold(probs, labels, 0.9)
    assert strict["threshold"] == pytest.approx(0.94)
    assert (strict["coverage"], strict["accuracy"]) == (pytest.approx(0.6), 1.0)
    # answering everything already reaches 0.7
    assert choose_abstention_threshold(probs, labels, 0.7)["coverage"] == 1.0
    # answered = conf >= threshold, so the threshold's own tile counts
    conf = probs.max(axis=1)
    assert np.sum(conf >= t["threshold"]) == t["answered"]


def test_a_target_reached_only_by_the_most_confident_tile() -> None:
    probs, labels = two_class([0.7, 0.9, 0.8], [True, True, False])
    t = choose_abstention_threshold(probs, labels, 1.0)
    assert t["threshold"] == 0.9 and t["answered"] == 1
    assert t["coverage"] == pytest.approx(1 / 3) and t["accuracy"] == 1.0


def test_an_unreachable_target_gives_none_and_a_reason() -> None:
    probs, labels = two_class([0.9, 0.8, 0.7], [False, True, True])
    # top-1: 0, top-2: 0.5, all three: 2/3
    t = choose_abstention_threshold(probs, labels, 0.9)
    assert t["threshold"] is None and t["coverage"] is None and t["accuracy"] is None
    assert t["best_accuracy"] == pytest.approx(2 / 3) and t["best_coverage"] == 1.0
    assert "0.6667" in t["reason"] and "3 of 3" in t["reason"] and "100.0%" in t["reason"]
    json.dumps(t, allow_nan=False)


def test_tied_top_confidences_cannot_be_split() -> None:
    # the right and the wrong tile share the top confidence: answering one answers both
    probs, labels = two_class([0.9, 0.9, 0.7], [True, False, True])
    t = choose_abstention_threshold(probs, labels, 1.0)
    assert t["threshold"] is None
    assert t["best_accuracy"] == pytest.approx(2 / 3)
    lower = choose_abstention_threshold(probs, labels, 0.6)
    assert lower["threshold"] == 0.7 and lower["coverage"] == 1.0


@pytest.mark.parametrize("target", [0.0, -0.1, 1.01, float("nan")])
def test_target_is_validated(target: float) -> None:
    probs, labels = two_class([0.9], [True])
    with pytest.raises(ValueError, match=r"target accuracy must be in \(0, 1\]"):
        choose_abstention_threshold(probs, labels, target)


# --- group bootstrap ---------------------------------------------------------------------------


def reference_bootstrap(
    probs: np.ndarray,
    labels: np.ndarray,
    draws: np.ndarray,
    members: list[np.ndarray],
    bins: int,
) -> dict[str, tuple[float, float]]:
    """The slow way: rebuild each replicate's tiles and score them with calibration_metrics."""
    values: dict[str, list[float]] = {"ece": [], "nll": [], "brier": []}
    for row in draws:
        take = np.concatenate([members[g] for g in row])
        m = calibration_metrics(probs[take], labels[take], bins=bins)
        for name in values:
            values[name].append(m[name])
    intervals = {}
    for name, replicate_values in values.items():
        low, high = np.percentile(replicate_values, [2.5, 97.5])
        intervals[name] = (float(low), float(high))
    return intervals


def grouped_data(seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """17 images of 1-8 tiles, 3 classes, a model right about 70% of the time."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 9, size=17)
    groups = [f"img{g:02d}" for g, size in enumerate(sizes) for _ in range(size)]
    probs = rng.dirichlet(np.full(3, 0.7), size=len(groups))
    labels = np.where(
        rng.random(len(groups)) < 0.7, probs.argmax(axis=1), rng.integers(0, 3, len(groups))
    )
    return probs, labels, groups


def test_group_bootstrap_matches_a_slow_reference_loop() -> None:
    probs, labels, groups = grouped_data(5)
    names = sorted(set(groups))  # the order np.unique gives the groups
    members = [np.flatnonzero(np.asarray(groups) == name) for name in names]
    draws = np.random.default_rng(11).integers(0, len(names), size=(300, len(names)))
    expected = reference_bootstrap(probs, labels, draws, members, bins=7)
    got = group_bootstrap_calibration(probs, labels, groups, replicates=300, seed=11, bins=7)
    assert (got["groups"], got["replicates"]) == (17, 300)
    assert got["method"] == "percentile bootstrap over groups"
    for name, (low, high) in expected.items():
        # identical draws; only the order of floating-point sums differs
        assert got[name]["low"] == pytest.approx(low, rel=1e-12, abs=1e-12)
        assert got[name]["high"] == pytest.approx(high, rel=1e-12, abs=1e-12)


def test_one_tile_per_group_is_a_plain_sample_bootstrap() -> None:
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(4), size=40)
    labels = rng.integers(0, 4, size=40)
    groups = [f"tile{i:03d}" for i in range(40)]  # sorted names = tile order
    draws = np.random.default_rng(0).integers(0, 40, size=(200, 40))  # tiles with replacement
    expected = reference_bootstrap(probs, labels, draws, [np.array([i]) for i in range(40)], 15)
    got = group_bootstrap_calibration(probs, labels, groups, replicates=200, seed=0)
    assert got["groups"] == 40
    for name, (low, high) in expected.items():
        assert got[name]["low"] == pytest.approx(low, rel=1e-12, abs=1e-12)
        assert got[name]["high"] == pytest.approx(high, rel=1e-12, abs=1e-12)


def test_bootstrap_intervals_hold_the_point_estimate_and_are_reproducible() -> None:
    # clearly over-confident (says ~0.9, right ~70%): ECE is far from the zero floor
    rng = np.random.default_rng(4)
    n = 400
    conf = rng.uniform(0.8, 1.0, size=n)
    probs, labels = two_class(list(conf), list(rng.random(n) < 0.7))
    groups = [f"img{i // 10}" for i in range(n)]
    point = calibration_metrics(probs, labels)
    ci = group_bootstrap_calibration(probs, labels, groups, replicates=500)
    for name in ("ece", "nll", "brier"):
        assert ci[name]["low"] < point[name] < ci[name]["high"], name
    assert ci == group_bootstrap_calibration(probs, labels, groups, replicates=500)
    assert ci != group_bootstrap_calibration(probs, labels, groups, replicates=500, seed=1)


def test_bootstrap_inputs_are_validated() -> None:
    probs, labels = two_class([0.9, 0.8], [True, False])
    with pytest.raises(ValueError, match="2 results but 1 groups"):
        group_bootstrap_calibration(probs, labels, ["a"])
    with pytest.raises(ValueError, match="group name"):
        group_bootstrap_calibration(probs, labels, ["a", ""])
    with pytest.raises(ValueError, match="replicates"):
        group_bootstrap_calibration(probs, labels, ["a", "b"], replicates=0)


# --- OOD scores and AUROC ------------------------------------------------------------------------


def test_ood_scores_by_hand_and_their_sign() -> None:
    s = ood_scores(np.array([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    e2 = math.exp(2)
    assert s["msp"] == pytest.approx([e2 / (e2 + 2), 1 / 3])
    assert s["max_logit"] == pytest.approx([2.0, 1.0])
    assert s["energy"] == pytest.approx([math.log(e2 + 2), 1 + math.log(3)])
    p0 = np.array([e2, 1, 1]) / (e2 + 2)
    assert s["neg_entropy"] == pytest.approx([float(np.sum(p0 * np.log(p0))), -math.log(3)])
    # higher = more confident for every score: the peaked row beats the uniform one
    for name, values in s.items():
        assert values[0] > values[1], name
    assert set(s) == {"msp", "max_logit", "energy", "neg_entropy"}


def test_ood_scores_are_stable_for_huge_logits() -> None:
    base = np.array([[0.0, -1.0, -2.0]])
    small, huge = ood_scores(base), ood_scores(base + 1e4)
    norm = 1 + math.exp(-1) + math.exp(-2)
    assert huge["energy"][0] == pytest.approx(1e4 + math.log(norm), rel=0, abs=1e-9)
    assert huge["msp"][0] == pytest.approx(1 / norm, rel=1e-12)
    assert huge["msp"] == pytest.approx(small["msp"], rel=1e-9)
    assert huge["neg_entropy"] == pytest.approx(small["neg_entropy"], rel=1e-9)
    split = ood_scores(np.array([[1e4, -1e4]]))
    assert split["msp"][0] == 1.0 and split["energy"][0] == 1e4
    assert split["neg_entropy"][0] == 0.0
    for values in (*huge.values(), *split.values()):
        assert np.all(np.isfinite(values))
    with pytest.raises(ValueError, match="samples, classes"):
        ood_scores(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        ood_scores(np.array([[np.inf, 0.0]]))


def test_auroc_by_hand_with_ties() -> None:
    # pairs (pos, neg): (3,1) 1, (3,2) 1, (2,1) 1, (2,2) 1/2 -> 3.5 / 4
    assert auroc([3.0, 2.0], [1.0, 2.0]) == pytest.approx(0.875)
    assert auroc([1.0, 2.0], [3.0, 2.0]) == pytest.approx(0.125)
    assert auroc([1.0], [2.0]) == 0.0
    assert auroc([5.0, 5.0], [5.0]) == 0.5
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        auroc([1.0], [])
    with pytest.raises(ValueError, match="1-D"):
        auroc([[1.0]], [0.0])


# --- figures -------------------------------------------------------------------------------------


def assert_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 10_000
    assert not list(path.parent.glob(f".{path.name}.*"))  # the atomic write left no temp file


def test_reliability_diagram_is_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(3, 0.3), size=300)
    labels = rng.integers(0, 3, size=300)
    before = calibration_metrics(probs, labels)
    after = json.loads(json.dumps(calibration_metrics(probs, labels, bins=10)))  # from report.json
    path = tmp_path / "figures" / "reliability.png"
    plot_reliability([("before", before), ("after", after)], path, title="calibration")
    assert_png(path)
    single = tmp_path / "single.png"
    plot_reliability([("", calibration_metrics(*two_class([0.9], [True])))], single)
    assert_png(single)
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_reliability([], tmp_path / "none.png")


def test_accuracy_coverage_plot_is_written(tmp_path: Path) -> None:
    probs, labels = shuffled_ten()
    rng = np.random.default_rng(1)
    other = rng.dirichlet(np.ones(2), size=500)
    curves = [
        ("ten tiles", accuracy_coverage(probs, labels)),
        ("random", accuracy_coverage(other, rng.integers(0, 2, size=500))),
    ]
    path = tmp_path / "accuracy_coverage.png"
    plot_accuracy_coverage(curves, path, title="selective prediction")
    assert_png(path)
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_accuracy_coverage([], tmp_path / "none.png")


def test_metrics_and_plots_import_without_torch() -> None:
    code = (
        "import sys, histolite.evaluate.metrics, histolite.evaluate.plots; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
