"""Policy replay and Oracle scoring on the tiny preset."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from contract import columns as C
from training.policy_eval import Marketplace, evaluate_policies, sample_requests


@pytest.fixture(scope="module")
def setup(tiny_sim):
    t = tiny_sim.tables
    tables = {k: v for k, v in t.items() if k in C.ALL_TABLES}
    end = tiny_sim.config.end_ts
    return tables, t["checkout_carts"], tiny_sim.oracle, end - pd.Timedelta(days=4), end


def test_optimal_bounds_every_policy_request_by_request(setup):
    tables, carts, oracle, start, end = setup
    summary, values, requests = evaluate_policies(
        tables, oracle, carts, start, end, models={}, k=20, n_requests=150
    )
    assert set(summary) == {"heuristic", "popularity", "optimal"}
    for name in ("heuristic", "popularity"):
        assert (values["optimal"].egmv >= values[name].egmv - 1e-9).all(), name
    assert summary["optimal"]["oracle_egmv_per_1k"] > summary["heuristic"]["oracle_egmv_per_1k"]
    assert len(requests) == 150 and requests[C.TS].min() >= start


def test_heuristic_serves_listed_in_stock_items_under_the_price_cap(setup):
    tables, carts, _, start, end = setup
    market = Marketplace(tables, carts)
    requests = sample_requests(tables[C.IMPRESSIONS], start, end, 60)
    day = requests[C.TS].dt.floor("D").iloc[0]
    today = requests[requests[C.TS].dt.floor("D") == day]
    state = market.day_state(day)
    lists = market.heuristic(today, state, 20)
    for row, items in zip(today.itertuples(index=False), lists, strict=True):
        idx = market.item_index.get_indexer(pd.Index(items))
        assert state.eligible[idx].all()
        u = market.user_index.get_loc(row.user_id)
        cap = max(market.user_cap[u], 2.5 * state.mean_paid[u])
        assert (market.price[idx] <= cap).all()
        assert not np.isin(items, market.cart_of(row.request_id)).any()


def test_checkout_lists_never_contain_the_cart(setup):
    tables, carts, oracle, _, _ = setup
    market = Marketplace(tables, carts)
    imp = tables[C.IMPRESSIONS]
    checkout = imp[(imp[C.SURFACE] == "CHECKOUT") & imp[C.REQUEST_ID].isin(carts[C.REQUEST_ID])]
    requests = (
        checkout.drop_duplicates(C.REQUEST_ID)
        .head(30)[[C.REQUEST_ID, C.USER_ID, C.TS, C.SURFACE]]
        .reset_index(drop=True)
    )
    assert len(requests) > 0
    state = market.day_state(requests[C.TS].iloc[0].floor("D"))
    for lists in (
        market.heuristic(requests, state, 20),
        market.popularity(requests, state, 20),
        market.optimal(oracle, requests, state, 20),
    ):
        for row, items in zip(requests.itertuples(index=False), lists, strict=True):
            assert not np.isin(items, market.cart_of(row.request_id)).any()


def test_personalisation_is_one_minus_the_mean_pairwise_jaccard_of_users_pages():
    from training.policy_eval import personalisation

    same = [np.array([1, 2, 3])] * 4
    assert personalisation(same, np.arange(4))["personalisation"] == 0.0
    assert personalisation(same, np.arange(4))["top_item_page_share"] == 1.0
    apart = [np.array([1, 2]), np.array([3, 4]), np.array([5, 6])]
    assert personalisation(apart, np.arange(3))["personalisation"] == 1.0
    # {1,2,3} vs {2,3,4}: 2 / 4; {1,2,3} vs {7}: 0; {2,3,4} vs {7}: 0 -> mean 1/6
    mixed = [np.array([1, 2, 3]), np.array([2, 3, 4]), np.array([7]), np.array([9, 9])]
    users = np.array([0, 1, 2, 0])  # user 0's second page is not counted
    got = personalisation(mixed, users)
    assert got["personalisation"] == pytest.approx(1 - 1 / 6)
    assert got["top_item_page_share"] == pytest.approx(2 / 3)
    assert got["personalisation_users"] == 3
