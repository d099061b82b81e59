"""Off-policy estimators where the truth is known: a logged bandit with five actions."""

from __future__ import annotations

import numpy as np
import pytest

from training import ope

MEANS = np.array([0.1, 0.2, 0.3, 0.5, 0.05])  # expected reward of each action


def _log(n: int, seed: int, logging: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    actions = rng.choice(len(MEANS), size=n, p=logging)
    rewards = (rng.random(n) < MEANS[actions]).astype(float)
    return actions, rewards


def _estimates(seed: int, n: int = 4000) -> tuple[dict[str, ope.Estimate], float]:
    logging = np.array([0.4, 0.3, 0.15, 0.1, 0.05])  # favours the poor actions
    target = np.array([0.05, 0.05, 0.1, 0.75, 0.05])  # mostly the best one
    truth = float(target @ MEANS)
    actions, rewards = _log(n, seed, logging)
    q = MEANS + 0.03  # a slightly wrong reward model
    out = {
        "ips": ope.ips(rewards, target[actions], logging[actions]),
        "snips": ope.snips(rewards, target[actions], logging[actions]),
        "dr": ope.doubly_robust(
            rewards, target[actions], logging[actions], q[actions], np.full(n, target @ q)
        ),
    }
    return out, truth


def test_every_estimator_is_close_and_its_interval_covers_the_truth_about_95_percent():
    covered = {name: 0 for name in ("ips", "snips", "dr")}
    runs = 200
    for seed in range(runs):
        estimates, truth = _estimates(seed)
        for name, e in estimates.items():
            covered[name] += e.ci_low <= truth <= e.ci_high
    for name, hits in covered.items():
        assert 0.90 <= hits / runs <= 0.99, (name, hits / runs)
    estimates, truth = _estimates(0)
    for e in estimates.values():
        assert abs(e.estimate - truth) / truth < 0.1
    # the reward model takes most of the variance out
    assert estimates["dr"].stderr < 0.8 * estimates["ips"].stderr
    assert estimates["ips"].ess < estimates["ips"].n  # weighted rounds are worth fewer


def test_on_policy_logs_are_worth_every_round_and_clipping_is_biased_down():
    p = np.full(1000, 0.25)
    rewards = np.random.default_rng(1).random(1000)
    on = ope.ips(rewards, p, p)
    assert on.ess == pytest.approx(1000) and on.estimate == pytest.approx(rewards.mean())
    clipped = ope.ips(np.ones(4), np.array([1.0, 1, 1, 1]), np.array([0.1, 0.1, 1, 1]), clip=2)
    assert clipped.estimate == pytest.approx((2 + 2 + 1 + 1) / 4)


def test_a_page_sums_its_slots_and_the_comparison_reports_coverage():
    slot = ope.Estimate(0.2, 0.1, 0.3, 0.05, 100.0, 1000)
    page = ope.by_slot({1: slot, 2: slot})
    assert page.estimate == pytest.approx(0.4) and page.stderr == pytest.approx(0.05 * 2**0.5)
    assert page.ess == 100.0
    cmp = ope.compare(page, 0.42)
    assert cmp["covers"] and cmp["relative_error"] == pytest.approx(-0.02 / 0.42)


def test_bad_logs_are_refused_with_what_is_wrong():
    with pytest.raises(ValueError, match=r"in \(0, 1\]; 1 rounds"):
        ope.ips(np.ones(2), np.ones(2), np.array([0.5, 0.0]))
    with pytest.raises(ValueError, match="aligned"):
        ope.ips(np.ones(2), np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="never takes a logged action"):
        ope.snips(np.ones(2), np.zeros(2), np.ones(2))


# --- a ranked page, position-based: three slots filled from six items --------------------------
VALUES = np.array([0.9, 0.7, 0.5, 0.3, 0.2, 0.1])  # reward of an item once examined
EXAMINATION = np.array([1.0, 0.6, 0.4])
LOGGING_WEIGHTS = np.array([1.0, 2.0, 3.0, 2.0, 1.0, 1.0])  # Plackett-Luce, favours item 2
TARGET_PAGE = np.array([0, 1, 2])  # the evaluated ranker: the best three, in order


def _exact_slot_probabilities(weights: np.ndarray, slots: int) -> np.ndarray:
    """(items, slots) item-in-slot probabilities of Plackett-Luce, by enumeration."""
    from itertools import permutations

    out = np.zeros((len(weights), slots))
    for page in permutations(range(len(weights)), slots):
        p, left = 1.0, weights.sum()
        for item in page:
            p *= weights[item] / left
            left -= weights[item]
        for k, item in enumerate(page):
            out[item, k] += p
    return out


MARGINALS = _exact_slot_probabilities(LOGGING_WEIGHTS, 3)


def _slate_log(seed: int, n: int = 3000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    noisy = np.log(LOGGING_WEIGHTS) + rng.gumbel(size=(n, len(LOGGING_WEIGHTS)))
    pages = np.argsort(-noisy, axis=1)[:, :3]
    rewards = (rng.random((n, 3)) < EXAMINATION * VALUES[pages]).astype(float)
    match = pages == TARGET_PAGE
    weights = np.where(match, 1.0 / MARGINALS[TARGET_PAGE, np.arange(3)], 0.0)
    q_target = np.broadcast_to(EXAMINATION * (VALUES[TARGET_PAGE] + 0.05), (n, 3))
    return rewards, weights, np.array(q_target)


def test_a_page_estimated_slot_by_slot_covers_its_true_value_about_95_percent():
    truth = float(EXAMINATION @ VALUES[TARGET_PAGE])
    covered = {name: 0 for name in ("ips", "snips", "dr", "dr_os")}
    runs = 150
    for seed in range(runs):
        rewards, weights, q = _slate_log(seed)
        for name, e in ope.slate(rewards, weights, q, q).items():
            covered[name] += e.page.ci_low <= truth <= e.page.ci_high
    for name, hits in covered.items():
        assert 0.88 <= hits / runs <= 0.995, (name, hits / runs)
    rewards, weights, q = _slate_log(0)
    estimates = ope.slate(rewards, weights, q, q)
    for name, e in estimates.items():
        assert abs(e.page.estimate - truth) / truth < 0.1, name
        assert len(e.slots) == 3 and e.page.n == 3000
        assert e.page.ess == min(s.ess for s in e.slots if s is not None)
    # the page is the sum of its slots, and the reward model takes variance out
    ips = estimates["ips"]
    assert ips.page.estimate == pytest.approx(sum(s.estimate for s in ips.slots if s))
    assert estimates["dr"].page.stderr < 0.8 * ips.page.stderr


def test_a_page_interval_counts_a_request_once_not_each_slot_independently():
    rng = np.random.default_rng(3)
    column = rng.random(500)
    rewards = np.column_stack([column, column])  # two slots that move together
    page = ope.slate(rewards, np.ones((500, 2)))["ips"]
    slots = {k: e for k, e in enumerate(page.slots) if e is not None}
    assert page.page.stderr == pytest.approx(2 * slots[0].stderr)
    assert ope.by_slot(slots).stderr < page.page.stderr


def test_a_slot_the_policy_never_matched_has_no_snips_and_bad_grids_are_refused():
    weights = np.array([[2.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    out = ope.slate(np.ones((3, 2)), weights)
    assert out["snips"].undefined_slots == [2] and out["snips"].slots[1] is None
    empty = out["ips"].slots[1]
    assert empty is not None and empty.estimate == 0.0 and out["ips"].page.ess == 0.0
    assert out["ips"].page.scaled(10.0).estimate == pytest.approx(10 * out["ips"].page.estimate)
    with pytest.raises(ValueError, match="aligned"):
        ope.slate(np.ones((3, 2)), np.ones((3, 3)))
    with pytest.raises(ValueError, match=">= 0"):
        ope.slate(np.ones((1, 2)), np.array([[1.0, -1.0]]))


def test_shrinkage_tames_a_rare_huge_weight_and_its_interval_still_covers():
    """One action the logging policy almost never takes (π₀ = 0.002, w = 500) and the
    evaluated policy always takes: DR rests on ~4 matched rounds per log and swings; DRos,
    with λ chosen by SLOPE, leans on the (slightly wrong) reward model instead."""
    means = np.array([0.1, 0.2, 0.3, 0.5, 0.6])
    logging = np.array([0.45, 0.3, 0.2, 0.048, 0.002])
    errors: dict[str, list[float]] = {"dr": [], "dr_os": []}
    covered = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        actions = rng.choice(len(means), size=2000, p=logging)
        rewards = (rng.random(2000) < means[actions]).astype(float)
        weights = np.where(actions == 4, 1.0 / logging[actions], 0.0)[:, None]
        q = np.full((2000, 1), means[4] + 0.03)
        out = ope.slate(rewards[:, None], weights, q, q)
        for name in errors:
            errors[name].append(out[name].page.estimate - means[4])
        covered += out["dr_os"].page.ci_low <= means[4] <= out["dr_os"].page.ci_high
        assert out["dr_os"].shrinkage is not None and out["dr"].shrinkage is None
    rmse = {name: float(np.sqrt(np.mean(np.square(e)))) for name, e in errors.items()}
    assert rmse["dr_os"] < rmse["dr"] / 3, rmse
    assert covered >= 90  # its interval spans DR's: shrinkage cannot make it overconfident


def test_shrinkage_leaves_small_weights_and_slope_keeps_dr_when_shrinking_moves_it():
    w = np.array([0.0, 1.0, 2.0, 1000.0])
    assert np.array_equal(ope.shrink(w, float("inf")), w)
    shrunk = ope.shrink(w, 1e4)
    assert shrunk[:3] == pytest.approx(w[:3], rel=1e-3)
    assert shrunk[3] == pytest.approx(1e4 * 1000 / (1000**2 + 1e4))  # pulled to ~10
    with pytest.raises(ValueError, match="λ must be > 0"):
        ope.shrink(w, 0.0)
    rng = np.random.default_rng(0)
    precise = rng.normal(1.0, 0.1, 5000)  # a tight, unbiased candidate ...
    moved = rng.normal(1.5, 0.01, 5000)  # ... and a tighter one far outside its width
    assert ope.slope([precise, moved]) == 0
    assert ope.slope([precise, rng.normal(1.0, 0.01, 5000)]) == 1
