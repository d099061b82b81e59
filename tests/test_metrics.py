"""Ranking and probability metrics: known values at the limits and hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training import metrics as M


def test_ndcg_of_the_perfect_order_is_one_and_of_no_hit_in_the_top_k_is_zero():
    labels = np.array([3, 2, 0, 1, 0, 0])
    groups = np.array([1, 1, 1, 2, 2, 2])
    perfect = np.array([3.0, 2.0, 1.0, 9.0, 1.0, 0.0])
    assert M.ndcg_at_k(labels, perfect, groups, k=2) == 1.0
    assert M.ndcg_at_k(labels, perfect, groups, k=2, weights=np.full(6, 4.0)) == 1.0
    worst = -perfect
    assert M.ndcg_at_k(np.array([0, 0, 1]), np.array([3.0, 2.0, 1.0]), np.zeros(3), k=2) == 0.0
    assert M.ndcg_at_k(labels, worst, groups, k=1) == 0.0


def test_ndcg_hand_computed_value_and_groups_without_relevance_are_left_out():
    # one group: the gain-3 item (2**2-1) ranked second, the gain-1 item first
    labels = np.array([1, 2, 0, 0, 0])
    scores = np.array([0.9, 0.5, 0.1, 0.8, 0.7])
    groups = np.array([7, 7, 7, 8, 8])  # group 8 has no relevant row
    dcg = 1 / math.log2(2) + 3 / math.log2(3)
    ideal = 3 / math.log2(2) + 1 / math.log2(3)
    assert M.ndcg_at_k(labels, scores, groups, k=3) == pytest.approx(dcg / ideal)
    assert math.isnan(M.ndcg_at_k(np.zeros(3), np.ones(3), np.zeros(3), k=3))


def test_ips_weights_multiply_gains_and_the_total_form_sums_before_dividing():
    labels = np.array([1, 1, 1, 0])
    scores = np.array([2.0, 1.0, 2.0, 1.0])
    groups = np.array([0, 0, 1, 1])
    weights = np.array([1.0, 4.0, 2.0, 2.0])
    d = 1 / math.log2(3)
    # group 0: DCG 1 + 4d, ideal 4 + d; group 1: DCG = ideal = 2
    query = ((1 + 4 * d) / (4 + d) + 1.0) / 2
    total = (1 + 4 * d + 2) / (4 + d + 2)
    assert M.ndcg_at_k(labels, scores, groups, 2, weights) == pytest.approx(query)
    assert M.ndcg_at_k(labels, scores, groups, 2, weights, average="total") == pytest.approx(total)


def test_tied_scores_do_not_inherit_the_input_order():
    groups = np.repeat(np.arange(300), 10)
    labels = np.tile(np.r_[1, np.zeros(9)], 300)  # the relevant row listed first
    assert M.ndcg_at_k(labels, np.ones(len(groups)), groups, 10) < 0.6
    assert M.ndcg_at_k(labels, np.ones(len(groups)), groups, 10) == M.ndcg_at_k(
        labels, np.ones(len(groups)), groups, 10
    )


def test_ndcg_does_not_depend_on_row_order():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(50), 20)
    labels = rng.integers(0, 4, len(groups)) * (rng.random(len(groups)) < 0.3)
    scores = rng.random(len(groups))
    perm = rng.permutation(len(groups))
    assert M.ndcg_at_k(labels, scores, groups, 10) == pytest.approx(
        M.ndcg_at_k(labels[perm], scores[perm], groups[perm], 10)
    )


def test_recall_at_k():
    labels = np.array([1, 0, 1, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.1, 0.5, 0.4, 0.3])
    groups = np.array([0, 0, 0, 1, 1, 1])
    # group 0: 1 of 2 relevant in the top 1; group 1: 0 of 1
    assert M.recall_at_k(labels, scores, groups, 1) == pytest.approx(0.25)
    assert M.recall_at_k(labels, scores, groups, 3) == 1.0


def test_auc_limits_ties_and_weights():
    y = np.array([0, 0, 1, 1])
    assert M.auc(y, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert M.auc(y, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert M.auc(y, np.ones(4)) == 0.5
    # weight 3 on the negative scored above the positive: P = (3 * 0 + 1 * 1) / 4 per positive
    y2, s2 = np.array([0, 0, 1]), np.array([0.9, 0.1, 0.5])
    assert M.auc(y2, s2, np.array([3.0, 1.0, 1.0])) == pytest.approx(0.25)
    assert math.isnan(M.auc(np.ones(3), np.arange(3.0)))


def test_log_loss_known_value_and_weights():
    y = np.array([1, 0])
    p = np.array([0.8, 0.4])
    expected = -(math.log(0.8) + math.log(0.6)) / 2
    assert M.log_loss(y, p) == pytest.approx(expected)
    weighted = -(3 * math.log(0.8) + math.log(0.6)) / 4
    assert M.log_loss(y, p, np.array([3.0, 1.0])) == pytest.approx(weighted)


def test_average_precision_known_values():
    y = np.array([1, 0, 1, 0])
    assert M.pr_auc(y, np.array([0.9, 0.1, 0.8, 0.2])) == 1.0
    # ranked: pos, neg, pos -> precision 1 at recall .5, 2/3 at recall 1
    assert M.pr_auc(y, np.array([0.9, 0.8, 0.7, 0.1])) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_calibration_error_is_near_zero_for_calibrated_and_large_for_miscalibrated():
    rng = np.random.default_rng(3)
    p = rng.beta(0.6, 30, 400_000)
    y = (rng.random(len(p)) < p).astype(np.int8)
    for strategy in ("equal_mass", "equal_width"):
        assert M.expected_calibration_error(y, p, strategy=strategy) < 0.001
    assert M.expected_calibration_error(y, np.minimum(3 * p, 1.0)) > 0.02


def test_reliability_curve_bins_and_weights():
    y = np.array([0, 1, 0, 1, 1, 1])
    p = np.array([0.1, 0.1, 0.2, 0.2, 0.9, 0.9])
    curve = M.reliability_curve(y, p, n_bins=3)
    assert curve.weight.tolist() == [2.0, 2.0, 2.0]
    assert curve.mean_predicted == pytest.approx([0.1, 0.2, 0.9])
    assert curve.observed_rate == pytest.approx([0.5, 0.5, 1.0])
    wide = M.reliability_curve(
        y, p, np.array([1, 1, 1, 1, 2, 2.0]), n_bins=2, strategy="equal_width"
    )
    assert wide.weight.tolist() == [4.0, 4.0]
    assert M.expected_calibration_error(y, p, n_bins=3) == pytest.approx((0.4 + 0.3 + 0.1) / 3)


def test_bad_inputs_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="same length"):
        M.auc(np.array([0, 1]), np.array([0.1]))
    with pytest.raises(ValueError, match="0/1"):
        M.log_loss(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="non-negative"):
        M.auc(np.array([0, 1]), np.array([0.1, 0.2]), np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="strategy"):
        M.reliability_curve(np.array([0, 1]), np.array([0.1, 0.2]), strategy="quantile")  # type: ignore[arg-type]


def test_auc_interval_covers_the_auc_and_widens_when_requests_are_clustered():
    rng = np.random.default_rng(0)
    n = 4000
    y = (rng.random(n) < 0.2).astype(float)
    scores = y * 0.5 + rng.random(n)
    point = M.auc(y, scores)
    low, high = M.auc_interval(y, scores, np.arange(n), seed=1)
    assert low < point < high and high - low < 0.1
    # the same rows as 40 requests of 100 identical copies: far fewer independent draws
    clustered = np.repeat(np.arange(40), 100)
    same = np.repeat(y[:40], 100), np.repeat(scores[:40], 100)
    c_low, c_high = M.auc_interval(same[0], same[1], clustered, seed=1)
    r_low, r_high = M.auc_interval(same[0], same[1], np.arange(n), seed=1)
    assert c_high - c_low > 3 * (r_high - r_low)
