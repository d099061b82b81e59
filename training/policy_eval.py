"""Policies scored by the simulator's Oracle on the test period's requests.

Each policy fills the top ``k`` slots of a sample of real test-period requests (same user,
time, surface and cart as logged). The Oracle then gives the expected clicks, purchases,
GMV and E[GMV] (p x price x margin, the served objective) of each list, with the true
examination curve. Policies:

- ``heuristic``: the production heuristic (the simulator's logging policy) at its mode:
  popularity x recency over listed, in-stock items under the user's price cap.
- ``popularity``: the most-clicked items of the last 7 days.
- model policies (``logreg``, ``ranker``): re-rank retrieval's candidates by their E[GMV].
- ``optimal``: the Oracle's best ``k`` over every eligible item: the ceiling no policy with
  the same catalogue can pass.

The state each request sees (popularity, stock, price caps) is rebuilt from the logs as of
the start of the request's day, which is what the heuristic itself used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd

from contract import columns as C
from contract.features import NEW_SELLER_DAYS
from contract.heuristic import RECENCY_DAYS, heuristic_score
from contract.timeutil import NS_PER_DAY, to_ns
from training.simulate.groundtruth import Oracle
from training.simulate.world import COUNTRY_PRICE_CAP
from training.tables import RowsById

log = logging.getLogger(__name__)

CHECKOUT_CATEGORY_BOOST = 8.0  # the heuristic's cart-category boost (engine.py)


class Request(NamedTuple):
    request_id: int
    user_id: int
    ts: pd.Timestamp
    surface: str


def request_rows(requests: pd.DataFrame) -> list[Request]:
    """Typed rows of a requests frame (request_id, user_id, ts, surface)."""
    return [
        Request(int(r), int(u), pd.Timestamp(t), str(s))
        for r, u, t, s in zip(
            requests[C.REQUEST_ID],
            requests[C.USER_ID],
            requests[C.TS],
            requests[C.SURFACE],
            strict=True,
        )
    ]


# A model policy: (requests, day state) -> for each request, item ids in rank order.
ModelPolicy = Callable[[pd.DataFrame, "DayState"], list[np.ndarray]]


@dataclass
class DayState:
    """What the marketplace looked like at 00:00 UTC of one day, from the logs."""

    day_start: pd.Timestamp
    listed: np.ndarray  # bool per item index
    stock: np.ndarray  # units per item index
    clicks_7d: np.ndarray  # per item index
    mean_paid: np.ndarray  # per user index; 0 when the user bought nothing yet

    @property
    def eligible(self) -> np.ndarray:
        return self.listed & (self.stock > 0)


class Marketplace:
    """Log-derived state for replaying policies; items and users are indexed by position."""

    def __init__(self, tables: dict[str, pd.DataFrame], checkout_carts: pd.DataFrame | None):
        self.t = tables
        items, users = tables[C.ITEMS], tables[C.USERS]
        self.item_ids = items[C.ITEM_ID].to_numpy()
        self.item_index = pd.Index(self.item_ids)
        self.user_index = pd.Index(users[C.USER_ID].to_numpy())
        self.price = items[C.PRICE].to_numpy()
        self.margin = items[C.MARGIN].to_numpy()
        self.category = items[C.CATEGORY].to_numpy()
        self.created = to_ns(items[C.CREATED_AT])
        sellers = tables[C.SELLERS].set_index(C.SELLER_ID)
        self.seller_created = to_ns(sellers.loc[items[C.SELLER_ID], C.CREATED_AT])
        country = pd.Index(C.COUNTRIES).get_indexer(pd.Index(users[C.COUNTRY]))
        self.user_cap = np.where(country >= 0, COUNTRY_PRICE_CAP[np.maximum(country, 0)], 150.0)
        imp = tables[C.IMPRESSIONS]
        impression_rows = RowsById(imp[C.IMPRESSION_ID].to_numpy(np.int64))
        clicks = tables[C.CLICKS]
        self._click_ts = to_ns(clicks[C.TS])
        self._click_item = self.item_index.get_indexer(
            pd.Index(_via(impression_rows, clicks[C.IMPRESSION_ID], imp[C.ITEM_ID]))
        )
        buys = tables[C.PURCHASES]
        self._buy_ts = to_ns(buys[C.TS])
        self._buy_user = self.user_index.get_indexer(
            pd.Index(_via(impression_rows, buys[C.IMPRESSION_ID], imp[C.USER_ID]))
        )
        self._buy_price = buys[C.PRICE].to_numpy()
        inv = tables[C.INVENTORY].sort_values(C.TS, kind="stable")
        self._inv_ts = to_ns(inv[C.TS])
        self._inv_item = self.item_index.get_indexer(pd.Index(inv[C.ITEM_ID]))
        self._inv_stock = inv[C.STOCK].to_numpy()
        self.carts: dict[int, np.ndarray] = {}
        if checkout_carts is not None and len(checkout_carts):
            for request_id, group in checkout_carts.groupby(C.REQUEST_ID):
                self.carts[int(str(request_id))] = group[C.ITEM_ID].to_numpy()

    def day_state(self, day_start: pd.Timestamp) -> DayState:
        t0 = day_start.value
        recent = (self._click_ts >= t0 - 7 * NS_PER_DAY) & (self._click_ts < t0)
        clicks = np.bincount(self._click_item[recent], minlength=len(self.item_ids))
        before = self._inv_ts < t0
        last = pd.Series(self._inv_stock[before]).groupby(self._inv_item[before]).last()
        stock = np.zeros(len(self.item_ids), dtype=np.int64)
        stock[last.index.to_numpy()] = last.to_numpy()
        paid = self._buy_ts < t0
        n_users = len(self.user_index)
        spend = np.bincount(self._buy_user[paid], weights=self._buy_price[paid], minlength=n_users)
        count = np.bincount(self._buy_user[paid], minlength=n_users)
        mean_paid = np.divide(spend, count, out=np.zeros(n_users), where=count > 0)
        return DayState(day_start, self.created <= t0, stock, clicks.astype(float), mean_paid)

    def cart_of(self, request_id: int) -> np.ndarray:
        return self.carts.get(int(request_id), np.zeros(0, dtype=np.int64))

    # --- baseline policies -----------------------------------------------------------------
    def heuristic(self, requests: pd.DataFrame, state: DayState, k: int) -> list[np.ndarray]:
        age = (state.day_start.value - self.created) / NS_PER_DAY
        base = heuristic_score(state.clicks_7d, age, RECENCY_DAYS)
        out = []
        for row in request_rows(requests):
            u = self.user_index.get_loc(row.user_id)
            paid = state.mean_paid[u]
            cap = max(self.user_cap[u], 2.5 * paid) if paid > 0 else self.user_cap[u]
            score = np.where(state.eligible & (self.price <= cap), base, -np.inf)
            score = self._checkout(score, row, boost=True)
            out.append(self._top(score, k))
        return out

    def popularity(self, requests: pd.DataFrame, state: DayState, k: int) -> list[np.ndarray]:
        base = np.where(state.eligible, state.clicks_7d, -np.inf)
        return [
            self._top(self._checkout(base, row, boost=False), k) for row in request_rows(requests)
        ]

    def optimal(
        self, oracle: Oracle, requests: pd.DataFrame, state: DayState, k: int
    ) -> list[np.ndarray]:
        eligible = np.flatnonzero(state.eligible)
        out = []
        for row in request_rows(requests):
            cart = self.cart_of(row.request_id)
            cands = eligible[~np.isin(self.item_ids[eligible], cart)]
            best = oracle.optimal(
                row.user_id,
                self.item_ids[cands],
                k,
                objective="margin",
                at=row.ts,
                cart_item_ids=cart if len(cart) else None,
            )
            out.append(best)
        return out

    def _checkout(self, score: np.ndarray, row: Request, boost: bool) -> np.ndarray:
        if row.surface != "CHECKOUT":
            return score
        cart = self.cart_of(row.request_id)
        if not len(cart):
            return score
        cart_idx = self.item_index.get_indexer(pd.Index(cart))
        score = score.copy()
        if boost:
            match = np.isin(self.category, self.category[cart_idx[cart_idx >= 0]])
            score = np.where(match, score * CHECKOUT_CATEGORY_BOOST, score)
        score[cart_idx[cart_idx >= 0]] = -np.inf
        return score

    def _top(self, score: np.ndarray, k: int) -> np.ndarray:
        finite = int(np.isfinite(score).sum())
        k = min(k, finite)
        top = np.argpartition(-score, k - 1)[:k] if k else np.zeros(0, dtype=np.int64)
        return self.item_ids[top[np.argsort(-score[top], kind="stable")]]


def _via(rows_of: RowsById, impression_ids: pd.Series, column: pd.Series) -> np.ndarray:
    """``column``'s value at each impression id's row (-1 where the id is not logged)."""
    rows = rows_of(impression_ids.to_numpy(np.int64))
    return np.where(rows >= 0, column.to_numpy(np.int64)[np.maximum(rows, 0)], -1)


def sample_requests(
    impressions: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp, n: int, seed: int = 0
) -> pd.DataFrame:
    """Up to ``n`` logged feed requests (user, time, surface) served in ``[start, end)``;
    organic sessions (search, browse) are not requests of a feed, unless nothing else was
    logged (purchase-only data)."""
    imp = impressions[(impressions[C.TS] >= start) & (impressions[C.TS] < end)]
    fed = (imp[C.POLICY] != C.POLICY_ORGANIC).to_numpy()
    if fed.any():
        imp = imp[fed]
    requests = imp.drop_duplicates(C.REQUEST_ID)[[C.REQUEST_ID, C.USER_ID, C.TS, C.SURFACE]]
    if len(requests) > n:
        requests = requests.sample(n, random_state=seed)
    return requests.sort_values(C.TS, kind="stable").reset_index(drop=True)


@dataclass
class PolicyValue:
    egmv: np.ndarray  # per request: Oracle E[GMV] (p x price x margin) of the top k
    gmv: np.ndarray
    purchases: np.ndarray
    clicks: np.ndarray
    new_seller_share: float  # of the k slots, items whose seller joined < 30 days before
    categories_in_top: float  # mean distinct categories in the top k

    def summary(self, k: int) -> dict[str, float]:
        per_1k = 1000.0 / k
        return {
            "oracle_egmv_per_1k": float(self.egmv.mean() * per_1k),
            "oracle_gmv_per_1k": float(self.gmv.mean() * per_1k),
            "oracle_purchases_per_1k": float(self.purchases.mean() * per_1k),
            "oracle_clicks_per_1k": float(self.clicks.mean() * per_1k),
            "new_seller_share": self.new_seller_share,
            "categories_in_top": self.categories_in_top,
            "requests": len(self.egmv),
        }


def value_lists(
    market: Marketplace, oracle: Oracle, requests: pd.DataFrame, lists: list[np.ndarray]
) -> PolicyValue:
    """The Oracle's value of each request's list (slot 1 first)."""
    n = len(lists)
    egmv, gmv, buys, clicks = (np.zeros(n) for _ in range(4))
    new_slots, slots, cats = 0, 0, []
    for i, (row, items) in enumerate(zip(request_rows(requests), lists, strict=True)):
        if not len(items):
            continue
        cart = market.cart_of(row.request_id)
        value = oracle.score(
            row.user_id, items, at=row.ts, cart_item_ids=cart if len(cart) else None
        )
        egmv[i], gmv[i], buys[i], clicks[i] = value.margin, value.gmv, value.purchases, value.clicks
        idx = market.item_index.get_indexer(pd.Index(items))
        joined = market.seller_created[idx]
        new_slots += int(((row.ts.value - joined) < NEW_SELLER_DAYS * NS_PER_DAY).sum())
        slots += len(items)
        cats.append(len(np.unique(market.category[idx])))
    return PolicyValue(
        egmv, gmv, buys, clicks, new_slots / max(slots, 1), float(np.mean(cats)) if cats else 0.0
    )


def personalisation(pages: list[np.ndarray], users: np.ndarray) -> dict[str, float]:
    """How much the top-k pages differ across users: ``personalisation`` = 1 - the mean
    pairwise Jaccard overlap of the users' pages (one page per user, the first; 0 = every
    user sees the same page, 1 = no two share an item), and ``top_item_page_share`` = the
    share of those pages holding the most common item."""
    first: dict[int, np.ndarray] = {}
    for user, items in zip(users.tolist(), pages, strict=True):
        if len(items) and user not in first:
            first[user] = np.unique(items)
    n = len(first)
    if n < 2:
        return {
            "personalisation": float("nan"),
            "top_item_page_share": float("nan"),
            "personalisation_users": n,
        }
    from scipy import sparse

    rows = np.concatenate([np.full(len(v), i) for i, v in enumerate(first.values())])
    cols_raw = np.concatenate(list(first.values()))
    _, cols = np.unique(cols_raw, return_inverse=True)
    incidence = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)))
    inter = (incidence @ incidence.T).toarray()
    sizes = np.diag(inter)
    union = sizes[:, None] + sizes[None, :] - inter
    upper = np.triu_indices(n, k=1)
    jaccard = inter[upper] / union[upper]
    per_item = np.asarray(incidence.sum(axis=0)).ravel()
    return {
        "personalisation": float(1.0 - jaccard.mean()),
        "top_item_page_share": float(per_item.max() / n),
        "personalisation_users": n,
    }


def evaluate_policies(
    tables: dict[str, pd.DataFrame],
    oracle: Oracle,
    checkout_carts: pd.DataFrame | None,
    start: pd.Timestamp,
    end: pd.Timestamp,
    models: dict[str, ModelPolicy],
    k: int = 20,
    n_requests: int = 1000,
    seed: int = 0,
    market: Marketplace | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, PolicyValue], pd.DataFrame]:
    """Score every policy on the same sampled requests; returns summaries, raw values, requests.
    ``market``: the log's state already built from ``tables`` and ``checkout_carts``."""
    market = market if market is not None else Marketplace(tables, checkout_carts)
    requests = sample_requests(tables[C.IMPRESSIONS], start, end, n_requests, seed)
    lists: dict[str, list[np.ndarray]] = {
        name: [] for name in ("heuristic", "popularity", "optimal", *models)
    }
    order: list[int] = []
    for day, group in requests.groupby(requests[C.TS].dt.floor("D"), sort=True):
        state = market.day_state(pd.Timestamp(day))
        lists["heuristic"] += market.heuristic(group, state, k)
        lists["popularity"] += market.popularity(group, state, k)
        lists["optimal"] += market.optimal(oracle, group, state, k)
        for name, policy in models.items():  # the cart is never recommended back
            ranked = policy(group, state)
            lists[name] += [
                items[~np.isin(items, market.cart_of(rid))][:k]
                for rid, items in zip(group[C.REQUEST_ID], ranked, strict=True)
            ]
        order += list(group.index)
    requests = requests.loc[order].reset_index(drop=True)
    values = {name: value_lists(market, oracle, requests, ls) for name, ls in lists.items()}
    users = requests[C.USER_ID].to_numpy(np.int64)
    summary = {
        name: {**v.summary(k), **personalisation(lists[name], users)} for name, v in values.items()
    }
    return summary, values, requests
