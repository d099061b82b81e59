"""The examination curve from all logged traffic (intervention harvesting), checked against
synthetic logs with a known curve and a stochastic logging policy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from contract import columns as C
from training.propensity import (
    METHOD_HARVESTED,
    METHOD_NONE,
    METHOD_RANDOMIZED,
    estimate_position_curve,
    harvest_cells,
)

TRUTH = (1 + np.arange(12) / 3.0) ** -1.0  # the simulator's shape, kappa 3, theta 1
DAY_NS = 86_400 * 10**9


def _logs(
    requests: int,
    seed: int = 0,
    randomized_share: float = 0.0,
    temperature: float = 0.5,
    confounded: bool = False,
    pool: int = 150,
    days: int = 3,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pages of ``len(TRUTH)`` slots sampled Plackett-Luce (Gumbel-top-k) from a daily pool
    by popularity / ``temperature`` (0: a fixed order, no rank variation); popular items are
    also the relevant ones, so slot CTRs of the logging policy are not the curve. A share of
    pages is uniformly random (policy ``random``). ``confounded``: half the users click 9x
    as much as the others (1.8 vs 0.2) and the policy shows them their page in reverse
    order, so within an item-day the low slots get the keen users."""
    rng = np.random.default_rng(seed)
    k = len(TRUTH)
    popularity = rng.normal(0.0, 1.0, pool)
    relevance = 0.03 + 0.4 / (1 + np.exp(-3.0 * (popularity - 1.8)))
    keen = rng.random(requests) < 0.5
    randomized = rng.random(requests) < randomized_share
    logits = np.broadcast_to(popularity / max(temperature, 1e-9), (requests, pool)).copy()
    if temperature > 0:
        logits += rng.gumbel(size=logits.shape)
    logits[randomized] = rng.random((int(randomized.sum()), pool))
    items = np.argsort(-logits, axis=1)[:, :k]
    if confounded:
        flip = keen & ~randomized
        items[flip] = items[flip, ::-1]
    rows = np.repeat(np.arange(requests), k)
    item = items.ravel()
    position = np.tile(np.arange(1, k + 1), requests)
    boost = np.where(keen[rows], 1.8, 0.2) if confounded else np.ones(len(item))
    p_click = np.minimum(TRUTH[position - 1] * relevance[item] * boost, 1.0)
    clicked = rng.random(len(item)) < p_click * rng.uniform(0.6, 1.4, len(item))
    day = rows * days // requests
    imp = pd.DataFrame(
        {
            C.IMPRESSION_ID: np.arange(len(item)),
            C.ITEM_ID: item + 1000 * day,  # the pool turns over every day
            C.POSITION: position,
            C.SURFACE: "HOME",
            C.TS: pd.to_datetime(day * DAY_NS + rows, utc=True),
            C.POLICY: np.where(randomized[rows], C.POLICY_RANDOM, C.POLICY_HEURISTIC),
        }
    )
    return imp, imp.loc[clicked, [C.IMPRESSION_ID]]


def test_harvesting_recovers_the_curve_the_logging_policys_ctrs_do_not_show():
    imp, clicks = _logs(40_000, randomized_share=0.02)
    # the logging policy's own slot CTRs mix examination with the items it puts there
    logged = imp[imp[C.POLICY] == C.POLICY_HEURISTIC]
    hit = logged[C.IMPRESSION_ID].isin(clicks[C.IMPRESSION_ID])
    naive = hit.groupby(logged[C.POSITION]).mean().to_numpy()
    assert np.abs(naive / naive[0] / TRUTH - 1).max() > 0.2

    curve = estimate_position_curve(imp, clicks, max_position=20, all_traffic=True)
    assert curve.method == METHOD_HARVESTED and curve.applied
    assert curve.harvested is not None and curve.randomized is not None
    assert curve.agreement is not None and curve.agreement.agrees
    assert "agrees with the randomized curve" in curve.reason
    assert len(curve.positions) == len(TRUTH)
    np.testing.assert_allclose(curve.examination, TRUTH, rtol=0.1)
    np.testing.assert_allclose(curve.raw, TRUTH, rtol=0.1)
    inside = (curve.ci_low <= TRUTH) & (curve.ci_high >= TRUTH)
    assert inside.mean() >= 0.8  # 95 % intervals: most slots hold the truth
    # far narrower than the randomized curve's from 2 % of the pages
    width = curve.ci_high[1:] - curve.ci_low[1:]
    rand_width = curve.randomized.ci_high[1:] - curve.randomized.ci_low[1:]
    assert np.median(width / rand_width) < 0.5
    assert curve.propensity(np.array([1, 12, 40])).tolist() == [
        1.0,
        curve.examination[-1],
        curve.examination[-1],
    ]
    out = curve.to_dict()
    agreement = out["agreement"]
    assert out["method"] == METHOD_HARVESTED
    assert isinstance(agreement, dict) and agreement["agrees"] is True
    assert set(out) >= {"randomized", "harvested", "examination", "ci_low", "applied"}


def test_the_harvested_intervals_cover_the_truth_across_seeds():
    """Each 95 % interval, over 8 independent logs x 11 slots, holds the truth about 95 % of
    the time: 80 % is the floor a correct interval passes with room; a naive one (the model
    variance of a fit that ignored the item-day groups, say) fails it."""
    inside = []
    for seed in range(8):
        imp, clicks = _logs(6_000, seed=seed)
        curve = estimate_position_curve(
            imp, clicks, max_position=20, monotone=False, all_traffic=True
        )
        assert curve.method == METHOD_HARVESTED
        inside.append((curve.ci_low <= TRUTH) & (curve.ci_high >= TRUTH))
    assert np.mean(np.array(inside)[:, 1:]) >= 0.8


def test_no_rank_variation_means_nothing_to_harvest():
    """A deterministic policy puts each item in the same slot all day: no item-day is seen at
    two slots, nothing is identified. With randomized pages the curve comes from them; without,
    there is no curve and no correction."""
    imp, clicks = _logs(4_000, temperature=0.0, randomized_share=0.2)
    logged = imp[imp[C.POLICY] == C.POLICY_HEURISTIC]
    assert logged.groupby(C.ITEM_ID)[C.POSITION].nunique().max() == 1
    curve = estimate_position_curve(imp, clicks, max_position=20, all_traffic=True)
    assert curve.method == METHOD_RANDOMIZED and curve.harvested is None
    assert "nothing to harvest" in curve.reason and "no rank variation" in curve.reason
    assert curve.agreement is None and curve.applied

    only = imp[C.POLICY] == C.POLICY_HEURISTIC
    none = estimate_position_curve(imp, clicks, all_traffic=True, rows=only.to_numpy())
    assert none.method == METHOD_NONE and not none.applied
    assert "no randomized traffic" in none.reason and "nothing to harvest" in none.reason
    np.testing.assert_array_equal(none.propensity(np.array([1, 5, 12])), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="no rows with policy 'random'"):
        estimate_position_curve(imp[only], clicks)  # the randomized-only estimate


def test_a_harvest_the_randomized_curve_rejects_is_not_applied():
    """A policy that shows its keen users (9x the clicks) their page in reverse: within an
    item-day the low slots get the keen users and the harvested curve is far off. The
    randomized pages catch it, and theirs is the curve applied."""
    imp, clicks = _logs(30_000, randomized_share=0.3, confounded=True)
    curve = estimate_position_curve(imp, clicks, max_position=20, all_traffic=True)
    assert curve.harvested is not None and curve.agreement is not None
    assert np.abs(curve.harvested.examination / TRUTH - 1).max() > 0.15  # biased
    assert not curve.agreement.agrees and len(curve.agreement.disagreeing) > 0
    assert curve.method == METHOD_RANDOMIZED and "disagrees" in curve.reason
    assert curve.examination is curve.randomized.examination  # type: ignore[union-attr]
    np.testing.assert_allclose(curve.examination, TRUTH, rtol=0.2)
    agreement = curve.to_dict()["agreement"]
    assert isinstance(agreement, dict) and agreement["agrees"] is False


def test_a_harvest_without_randomized_traffic_is_applied_and_says_it_is_unvalidated():
    imp, clicks = _logs(6_000)
    curve = estimate_position_curve(imp, clicks, max_position=20, all_traffic=True)
    assert curve.method == METHOD_HARVESTED and curve.applied and curve.randomized is None
    assert "not validated: no randomized traffic" in curve.reason


def test_rows_and_chunks_select_and_sum_the_same_cells():
    """The dataset stage passes a mask instead of a copy, and the cells are summed chunk by
    chunk: both give what one pass over the selected rows gives."""
    imp, clicks = _logs(3_000, randomized_share=0.05)
    first_days = (imp[C.TS] < pd.Timestamp(2 * DAY_NS, tz="UTC")).to_numpy()
    whole = harvest_cells(imp[first_days].reset_index(drop=True), clicks)
    masked = harvest_cells(imp, clicks, rows=first_days, chunk_rows=977)
    key = ["group", "slot"]
    pd.testing.assert_frame_equal(
        whole.sort_values(key, ignore_index=True), masked.sort_values(key, ignore_index=True)
    )
    assert whole["n"].sum() == (first_days & (imp[C.POLICY] == C.POLICY_HEURISTIC)).sum()
    a = estimate_position_curve(imp[first_days], clicks, max_position=20, all_traffic=True)
    b = estimate_position_curve(imp, clicks, max_position=20, all_traffic=True, rows=first_days)
    np.testing.assert_array_equal(a.examination, b.examination)
    np.testing.assert_array_equal(a.ci_high, b.ci_high)
