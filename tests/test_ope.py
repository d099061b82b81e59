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
