"""The simulator: determinism, the table contract, the logging policy's propensities, the
response model's shape, and the Oracle."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest

from contract import columns as C
from contract.timeutil import to_ns
from training.simulate import GroundTruth, Oracle, load_config, simulate
from training.simulate.engine import Simulation
from training.simulate.policy import plackett_luce_topk


def test_same_seed_same_tables_other_seed_other_tables(tiny_sim):
    again = simulate(load_config("tiny"))
    for name in C.ALL_TABLES:
        pd.testing.assert_frame_equal(tiny_sim.tables[name], again.tables[name])
    other = simulate(load_config("tiny", seed=8))
    assert not tiny_sim.tables[C.IMPRESSIONS][C.ITEM_ID].equals(
        other.tables[C.IMPRESSIONS][C.ITEM_ID]
    )


def test_tables_follow_the_contract(tiny_sim):
    kinds = {"id": "int64", "int": "int64", "float": "float64", "bool": "bool", "str": "object"}
    for name in C.ALL_TABLES:
        frame = tiny_sim.tables[name]
        for column, kind in C.TABLES[name].items():
            assert column in frame, f"{name}.{column} missing"
            if kind == "ts":
                assert str(frame[column].dtype) == "datetime64[ns, UTC]", f"{name}.{column}"
            elif kind == "vector":
                assert frame[column].map(len).nunique() == 1
            else:
                assert str(frame[column].dtype) == kinds[kind], f"{name}.{column}"
        assert len(frame) > 0, name


def test_referential_integrity_and_time_order(tiny_sim):
    t = tiny_sim.tables
    imp = t[C.IMPRESSIONS].set_index(C.IMPRESSION_ID)
    assert imp.index.is_unique
    assert t[C.IMPRESSIONS][C.USER_ID].isin(t[C.USERS][C.USER_ID]).all()
    assert t[C.ITEMS][C.SELLER_ID].isin(t[C.SELLERS][C.SELLER_ID]).all()
    for name in (C.CLICKS, C.ADD_TO_CARTS, C.PURCHASES):
        events = t[name]
        assert events[C.IMPRESSION_ID].isin(imp.index).all(), name
        shown = imp.loc[events[C.IMPRESSION_ID], C.TS].to_numpy()
        assert (events[C.TS].to_numpy() >= shown).all(), name
    # nobody is served before they sign up, no item before it is listed
    users = t[C.USERS].set_index(C.USER_ID)[C.SIGNUP_AT]
    assert (
        t[C.IMPRESSIONS][C.TS].to_numpy() >= users.loc[t[C.IMPRESSIONS][C.USER_ID]].to_numpy()
    ).all()
    created = t[C.ITEMS].set_index(C.ITEM_ID)[C.CREATED_AT]
    assert (
        t[C.IMPRESSIONS][C.TS].to_numpy() >= created.loc[t[C.IMPRESSIONS][C.ITEM_ID]].to_numpy()
    ).all()


def test_purchases_are_delayed_past_seven_days_and_censored_at_the_end(tiny_sim):
    t = tiny_sim.tables
    imp_ts = t[C.IMPRESSIONS].set_index(C.IMPRESSION_ID)[C.TS]
    buys = t[C.PURCHASES]
    delay = (buys[C.TS].to_numpy() - imp_ts.loc[buys[C.IMPRESSION_ID]].to_numpy()) / np.timedelta64(
        1, "D"
    )
    assert (delay > 7).any() and (delay < 1).mean() > 0.4
    assert buys[C.TS].max() < tiny_sim.config.end_ts
    assert tiny_sim.stats["purchases_censored"] > 0


def test_new_sellers_users_and_items_arrive_during_the_window(tiny_sim):
    cfg, t = tiny_sim.config, tiny_sim.tables
    for table, column in (
        (C.SELLERS, C.CREATED_AT),
        (C.USERS, C.SIGNUP_AT),
        (C.ITEMS, C.CREATED_AT),
    ):
        assert (t[table][column] >= cfg.start_ts).sum() > 0, table
    assert t[C.SELLERS][C.IS_NEW].sum() > 0


def test_randomized_requests_are_uniform_plackett_luce(tiny_sim):
    """For a uniform draw without replacement from N items, slot j has propensity
    1 / (N - j + 1): consecutive inverse propensities differ by exactly one."""
    imp = tiny_sim.tables[C.IMPRESSIONS]
    rand = imp[imp[C.POLICY] == C.POLICY_RANDOM].sort_values([C.REQUEST_ID, C.POSITION])
    assert 0.005 < len(rand) / len(imp) < 0.03
    inv = 1.0 / rand[C.PROPENSITY].to_numpy()
    same = rand[C.REQUEST_ID].to_numpy()[1:] == rand[C.REQUEST_ID].to_numpy()[:-1]
    np.testing.assert_allclose(np.diff(inv)[same], -1.0, atol=1e-6)
    served = imp[imp[C.POLICY] == C.POLICY_HEURISTIC][C.PROPENSITY]
    assert ((served > 0) & (served <= 1)).all()


def test_plackett_luce_propensities_match_the_sampling_frequencies():
    rng = np.random.default_rng(0)
    weights = np.array([1.0, 2.0, 3.0, 4.0])
    logits = np.tile(np.log(weights), (40_000, 1))
    cols, prop = plackett_luce_topk(logits, 2, rng)
    # P(first = 3) = 4/10; P(second = 2 | first = 3) = 3/6
    first_is_3 = cols[:, 0] == 3
    assert abs(first_is_3.mean() - 0.4) < 0.01
    np.testing.assert_allclose(prop[first_is_3, 0], 0.4)
    second_is_2 = first_is_3 & (cols[:, 1] == 2)
    np.testing.assert_allclose(prop[second_is_2, 1], 0.5)
    assert abs(second_is_2.sum() / first_is_3.sum() - 0.5) < 0.02


def test_plackett_luce_leaves_slots_empty_when_too_few_items_are_eligible():
    logits = np.array([[0.0, -np.inf, 1.0, -np.inf]])
    cols, prop = plackett_luce_topk(logits, 3, np.random.default_rng(1))
    assert sorted(cols[0, :2]) == [0, 2] and cols[0, 2] == -1 and prop[0, 2] == 0
    assert prop[0, 1] == pytest.approx(1.0)


def test_examination_curve_starts_at_one_and_falls(tiny_sim):
    curve = tiny_sim.oracle.position_curve(50)
    assert curve[0] == 1.0
    assert all(a > b for a, b in itertools.pairwise(curve))


def test_oracle_optimal_ranking_beats_its_reverse_and_the_logged_feeds(tiny_sim):
    oracle = tiny_sim.oracle
    imp = tiny_sim.tables[C.IMPRESSIONS]
    served = imp[imp[C.POLICY] == C.POLICY_HEURISTIC]
    wins = 0
    for _request_id, feed in list(served.groupby(C.REQUEST_ID))[:50]:
        user = int(feed[C.USER_ID].iloc[0])
        at = feed[C.TS].iloc[0]
        items = feed.sort_values(C.POSITION)[C.ITEM_ID].to_numpy()
        best = oracle.optimal(user, items, len(items), at=at)
        assert sorted(best) == sorted(items)
        v_best = oracle.score(user, best, at=at).margin
        assert v_best >= oracle.score(user, best[::-1], at=at).margin
        wins += v_best >= oracle.score(user, items, at=at).margin - 1e-12
    assert wins == 50


def test_oracle_scores_impression_logs_like_lists(tiny_sim):
    oracle = tiny_sim.oracle
    imp = tiny_sim.tables[C.IMPRESSIONS]
    feed = imp[imp[C.REQUEST_ID] == imp[C.REQUEST_ID].iloc[0]].sort_values(C.POSITION)
    per_row = oracle.score_impressions(feed).sum()
    listed = oracle.score(
        int(feed[C.USER_ID].iloc[0]), feed[C.ITEM_ID].to_numpy(), at=feed[C.TS].iloc[0]
    )
    assert per_row["gmv"] == pytest.approx(listed.gmv)
    assert per_row["clicks"] == pytest.approx(listed.clicks)


def test_simulated_click_rate_matches_the_oracles_expectation(tiny_sim):
    """The logged clicks are draws from the same model the Oracle evaluates."""
    t = tiny_sim.tables
    scored = tiny_sim.oracle.score_impressions(t[C.IMPRESSIONS], t["checkout_carts"])
    clicked = t[C.IMPRESSIONS][C.IMPRESSION_ID].isin(t[C.CLICKS][C.IMPRESSION_ID])
    for surface in C.SURFACES:  # checkout rows only match once the carts are accounted for
        rows = (t[C.IMPRESSIONS][C.SURFACE] == surface).to_numpy()
        expected = scored["clicks"][rows].sum()
        assert abs(clicked[rows].sum() - expected) < 4 * np.sqrt(expected), surface


def test_ground_truth_round_trips(tiny_sim, tmp_path):
    tiny_sim.truth.save(tmp_path)
    loaded = Oracle(GroundTruth.load(tmp_path))
    items = np.arange(30)
    assert loaded.score(3, items).gmv == tiny_sim.oracle.score(3, items).gmv
    with pytest.raises(FileNotFoundError, match="only simulated datasets"):
        GroundTruth.load(tmp_path / "nope")


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        load_config("huge")
    with pytest.raises(ValueError, match="unknown simulator setting 'userz'"):
        load_config("tiny", userz=3)
    with pytest.raises(ValueError, match="randomized_share must be in"):
        load_config("tiny", randomized_share=2)


def test_inventory_stays_non_negative_and_out_of_stock_happens(tiny_sim):
    inv = tiny_sim.tables[C.INVENTORY]
    assert (inv[C.STOCK] >= 0).all()
    assert (inv[C.STOCK] == 0).any()
    first = inv.groupby(C.ITEM_ID)[C.TS].min()
    created = tiny_sim.tables[C.ITEMS].set_index(C.ITEM_ID)[C.CREATED_AT]
    start = tiny_sim.config.start_ts
    expected_first = np.maximum(to_ns(created.loc[first.index]), start.value)
    assert (to_ns(first) == expected_first).all()


def test_organic_sessions_reach_the_long_tail_in_the_users_taste(tiny_sim):
    """Organic rows (search, browse): position 0, no propensity, HOME; up to organic_items
    distinct items per session; many more distinct items than the feed's pool shows; and
    items the users like more than the catalogue's average."""
    cfg, t = tiny_sim.config, tiny_sim.tables
    imp = t[C.IMPRESSIONS]
    organic = imp[imp[C.POLICY] == C.POLICY_ORGANIC]
    feed = imp[imp[C.POLICY] != C.POLICY_ORGANIC]
    assert len(organic) > 0 and len(feed) > 0
    assert (organic[C.POSITION] == 0).all() and organic[C.PROPENSITY].isna().all()
    assert (organic[C.SURFACE] == "HOME").all()
    per_session = organic.groupby(C.REQUEST_ID)[C.ITEM_ID].agg(["size", "nunique"])
    assert (per_session["size"] == per_session["nunique"]).all()
    assert per_session["size"].max() == cfg.organic_items
    assert not set(organic[C.REQUEST_ID]) & set(feed[C.REQUEST_ID])
    assert organic[C.ITEM_ID].nunique() > 1.5 * feed[C.ITEM_ID].nunique()
    # organic engagement is logged against organic impressions
    clicked = t[C.CLICKS][C.IMPRESSION_ID].isin(organic[C.IMPRESSION_ID])
    assert clicked.sum() > 0
    assert t[C.PURCHASES][C.IMPRESSION_ID].isin(organic[C.IMPRESSION_ID]).sum() > 0
    # looked-at items follow the user's interest: above a random pairing of the same users
    truth = tiny_sim.truth
    users = organic[C.USER_ID].to_numpy()
    looked = truth.interest(users, organic[C.ITEM_ID].to_numpy()[:, None])[:, 0]
    rng = np.random.default_rng(0)
    shuffled = truth.interest(users, rng.integers(0, len(t[C.ITEMS]), (len(users), 1)))[:, 0]
    assert looked.mean() > shuffled.mean() + 1.0


def test_the_organic_channel_leaves_the_world_and_the_first_feeds_alone(tiny_sim):
    """The organic sessions draw from their own stream: without them the world and the first
    day's feed (before any organic click moves the pool) are exactly the same."""
    off = simulate(load_config("tiny", organic_share=0))
    t_on, t_off = tiny_sim.tables, off.tables
    assert (t_off[C.IMPRESSIONS][C.POLICY] != C.POLICY_ORGANIC).all()
    for name in (C.ITEMS, C.USERS, C.SELLERS):
        pd.testing.assert_frame_equal(t_on[name], t_off[name])
    day1 = tiny_sim.config.start_ts + pd.Timedelta(days=1)

    def first_feeds(imp):
        rows = (imp[C.TS] < day1) & (imp[C.POLICY] != C.POLICY_ORGANIC)
        return imp[rows].reset_index(drop=True)  # ids included: organic ids come after

    pd.testing.assert_frame_equal(
        first_feeds(t_on[C.IMPRESSIONS]), first_feeds(t_off[C.IMPRESSIONS])
    )


def test_organic_settings_are_checked():
    with pytest.raises(ValueError, match="organic_share and organic_items must be >= 0"):
        load_config("tiny", organic_share=-1)
    with pytest.raises(ValueError, match="organic_focus must be >= 0"):
        load_config("tiny", organic_focus=-0.5)


def _explorer(eps: float, seed: int = 0) -> Any:
    """Just what ``Simulation._explore`` reads: the config's epsilon and the stream."""
    return SimpleNamespace(
        cfg=SimpleNamespace(explore_epsilon=eps), explore_rng=np.random.default_rng(seed)
    )


def test_exploration_propensities_match_the_sampling_frequencies():
    """Each slot's logged propensity is P(item in slot | slots above): (1 - eps) x the
    heuristic's factor for its own items, eps / (|E| - t) for the t-th explored one."""
    rows, eps = 60_000, 0.3
    chosen = np.tile(np.array([0, 1, 2]), (rows, 1))
    prop = np.tile(np.array([0.5, 0.6, 1.0]), (rows, 1))
    active = np.ones(rows, dtype=bool)
    active[:1000] = False  # the randomized requests: never explored
    explore = np.array([10, 11, 12, 13])
    out, out_prop, coins = Simulation._explore(_explorer(eps), chosen, prop, active, explore)
    assert not coins[:1000].any() and (out[:1000] == chosen[:1000]).all()
    assert (out_prop[:1000] == prop[:1000]).all()
    on = out[1000:], out_prop[1000:], coins[1000:]
    first_10 = on[0][:, 0] == 10
    assert abs(first_10.mean() - eps / 4) < 0.005
    np.testing.assert_allclose(on[1][first_10, 0], eps / 4)
    # after an explored first slot the heuristic's first item comes next with P = 1 - eps
    then_0 = first_10 & (on[0][:, 1] == 0)
    assert abs(then_0.sum() / first_10.sum() - (1 - eps)) < 0.03
    np.testing.assert_allclose(on[1][then_0, 1], (1 - eps) * 0.5)
    # two explored slots: the second is uniform over the 3 left
    then_11 = first_10 & (on[0][:, 1] == 11)
    assert abs(then_11.sum() / first_10.sum() - eps / 3) < 0.03
    np.testing.assert_allclose(on[1][then_11, 1], eps / 3)
    # the heuristic's order is kept and nothing repeats on a page
    for row in on[0][:2000]:
        own = row[row < 10]
        assert (np.diff(own) > 0).all() and len(set(row)) == len(row)
    assert on[2].mean() == pytest.approx(eps, abs=0.01)


def test_feed_exploration_reaches_new_items_and_says_so():
    on = simulate(load_config("tiny", explore_epsilon=0.1, organic_share=0))
    off = simulate(load_config("tiny", organic_share=0))
    assert on.stats["explored_impressions"] > 0 == off.stats["explored_impressions"]
    imp_on, imp_off = on.tables[C.IMPRESSIONS], off.tables[C.IMPRESSIONS]
    assert imp_on[C.ITEM_ID].nunique() > imp_off[C.ITEM_ID].nunique()
    assert ((imp_on[C.PROPENSITY] > 0) & (imp_on[C.PROPENSITY] <= 1)).all()
    # the world is the same
    pd.testing.assert_frame_equal(on.tables[C.ITEMS], off.tables[C.ITEMS])
    with pytest.raises(ValueError, match="explore_epsilon must be in"):
        load_config("tiny", explore_epsilon=1.0)
