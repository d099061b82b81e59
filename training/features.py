"""Batch feature tables for Feast's offline store, computed from the event tables.

Batch views are snapshots every ``snapshot_days`` (1 for the simulator) at UTC midnight:
a snapshot at time s uses only events with ts < s, and is stamped s, so Feast's
point-in-time join (latest row with event_timestamp <= the impression's ts) never sees an
event from after the impression. Streaming views (recent activity, inventory) are
event-level rows stamped with the event that changed them.

All windows are computed with dense (entity x day) cumulative sums: one pass per table, no
loop over entities. Column names come from ``feature_repo.schema``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from contract import affinity, content
from contract import columns as C
from contract import events as E
from contract.features import NEW_SELLER_DAYS, SPEND_BANDS
from contract.timeutil import NS_PER_DAY, NS_PER_S, from_ns, to_ns
from feature_repo import schema as S
from training.memory import LIST_CHUNK_CELLS, features_build_bytes
from training.tables import RowsById

log = logging.getLogger(__name__)

CTR_PRIOR_STRENGTH = 50.0  # pseudo-impressions pulling an item's CTR to the catalog's
PURCHASE_PRIOR_STRENGTH = 500.0
NO_ACTIVITY_RECENCY_DAYS = 365.0
RECENT_SELLERS_DAYS = 30  # window of user_seller_recency
RECENT_SELLERS_MAX = 50  # sellers kept per user and snapshot, the most recent


# The columns of each event table the build reads (``read_tables(columns=...)``): the large
# preset's impressions hold 55 M rows, and the build needs 5 of their columns.
COLUMNS: dict[str, tuple[str, ...]] = {
    C.IMPRESSIONS: (C.IMPRESSION_ID, C.USER_ID, C.ITEM_ID, C.TS, C.POLICY),
    C.CLICKS: (C.IMPRESSION_ID, C.TS),
    C.ADD_TO_CARTS: (C.IMPRESSION_ID, C.TS),
    C.PURCHASES: (C.IMPRESSION_ID, C.TS, C.PRICE, C.QUANTITY),
    C.ITEMS: (
        C.ITEM_ID, C.SELLER_ID, C.CATEGORY, C.BRAND, C.PRICE, C.LIST_PRICE, C.SHIPPING_DAYS,
        C.CREATED_AT, C.CONTENT,
    ),
    C.USERS: (C.USER_ID, C.COUNTRY, C.DEVICE, C.SIGNUP_AT),
    C.SELLERS: (C.SELLER_ID, C.RATING, C.CREATED_AT),
    C.INVENTORY: (C.ITEM_ID, C.TS, C.STOCK),
}  # fmt: skip


@dataclass(frozen=True)
class Calendar:
    """Day grid of a dataset: day 0 starts at ``origin_ns``; snapshots every ``stride`` days."""

    origin_ns: int
    days: int
    stride: int = 1

    @classmethod
    def of(cls, tables: dict[str, pd.DataFrame], stride: int = 1) -> Calendar:
        imp = tables[C.IMPRESSIONS]
        ts = to_ns(imp[C.TS])
        if len(ts) == 0:
            raise ValueError("impressions: table is empty; nothing to build features from")
        origin = (ts.min() // NS_PER_DAY) * NS_PER_DAY
        days = int((ts.max() - origin) // NS_PER_DAY) + 1
        return cls(int(origin), days, stride)

    @property
    def snapshots(self) -> np.ndarray:
        """Snapshot day indices: 0 (the window's start) to ``days`` (its end), inclusive."""
        return np.unique(np.append(np.arange(0, self.days + 1, self.stride), self.days))

    def day_of(self, ns: np.ndarray) -> np.ndarray:
        return (ns - self.origin_ns) // NS_PER_DAY

    def time_of(self, day: np.ndarray) -> np.ndarray:
        return self.origin_ns + day.astype(np.int64) * NS_PER_DAY


def _daily(index: np.ndarray, day: np.ndarray, n: int, days: int, weights=None) -> np.ndarray:
    """Dense (n, days+1) prefix sums: out[e, d] = sum of events of e on days < d."""
    keep = (day >= 0) & (day < days) & (index >= 0)
    flat = index[keep] * days + day[keep]
    w = None if weights is None else np.asarray(weights, dtype=np.float64)[keep]
    counts = np.bincount(flat, weights=w, minlength=n * days).reshape(n, days)
    out = np.zeros((n, days + 1), dtype=np.float64)
    np.cumsum(counts, axis=1, out=out[:, 1:])
    return out


def _window(prefix: np.ndarray, snaps: np.ndarray, days: int) -> np.ndarray:
    """Sum over the ``days`` days before each snapshot: (n, len(snaps))."""
    return prefix[:, snaps] - prefix[:, np.maximum(snaps - days, 0)]


def _snapshot_frame(
    key: str,
    ids: np.ndarray,
    alive: np.ndarray,
    snap_ns: np.ndarray,
    cols: dict[str, np.ndarray],
    view: str,
) -> pd.DataFrame:
    """Long frame of the (entity, snapshot) cells where ``alive`` holds, snapshot by
    snapshot (the order ``_finish`` keeps). Each column is cast to the view's dtype as it is
    gathered and its (entities x snapshots) source dropped from ``cols`` once gathered, so
    the float64 grids and the frame do not all sit in memory at once."""
    s, e = np.nonzero(alive.T)
    frame = pd.DataFrame({key: ids[e], S.EVENT_TIMESTAMP: from_ns(snap_ns[s])})
    kinds = S.FEATURES[view]
    for name in list(cols):
        values = cols.pop(name)
        column = values[e, s] if values.ndim == 2 else values[e]
        del values
        if kinds.get(name) == "float32":
            column = column.astype(np.float32, copy=False)
        frame[name] = column
    return frame


def _arrow_lists(offsets: np.ndarray, values: np.ndarray) -> pd.arrays.ArrowExtensionArray:
    """``values[offsets[i]:offsets[i + 1]]`` for each i as one Arrow list column: two flat
    buffers, not an object per row (tens of millions of rows on a large catalog)."""
    if len(values) >= 2**31:
        raise ValueError(f"{len(values)} list entries: more than an Arrow list column holds")
    return pd.arrays.ArrowExtensionArray(
        pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values))
    )


def _chunks(owner: np.ndarray, count: np.ndarray, budget: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges of rows whose ``count`` sums to at most ``budget`` (or one row),
    never splitting rows of the same ``owner`` (sorted) between two ranges."""
    if len(owner) == 0:
        return []
    starts = np.flatnonzero(np.append(True, owner[1:] != owner[:-1]))
    before = np.append(0, np.cumsum(count))[starts]  # entries before each owner's first row
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(starts):
        j = int(np.searchsorted(before, before[i] + budget, side="right"))
        j = max(j, i + 1)
        out.append((int(starts[i]), int(starts[j]) if j < len(starts) else len(owner)))
        i = j
    return out


def recent_activity_rows(
    user_ids: np.ndarray, ts_ns: np.ndarray, is_cart: np.ndarray
) -> pd.DataFrame:
    """The user_recent_activity view's rows: one per engagement event (click or add-to-cart
    of ``user_ids[k]`` at ``ts_ns[k]``), holding the user's ``views_24h`` / ``carts_24h`` over
    the window (t - 24 h, t] at whole-second resolution, as the features service's
    ``RecentActivity`` pushes them. Also what ``training.skew`` recomputes logged rows
    with."""
    codes, uniques = pd.factorize(pd.Series(np.asarray(user_ids, dtype=np.int64)), sort=False)
    user = codes.astype(np.int64)
    ts = np.asarray(ts_ns, dtype=np.int64)
    is_cart = np.asarray(is_cart, dtype=bool)
    order = np.lexsort((ts, user))
    user, ts, is_cart = user[order], ts[order], is_cart[order]
    secs = ts // NS_PER_S
    key = user * (1 << 33) + secs  # dense user codes < 2**30
    lo = np.searchsorted(key, key - 86_400, side="right")
    cum_cart = np.concatenate([[0], np.cumsum(is_cart)])
    cum_view = np.concatenate([[0], np.cumsum(~is_cart)])
    hi = np.arange(1, len(key) + 1)
    frame = pd.DataFrame(
        {
            C.USER_ID: np.asarray(uniques, dtype=np.int64)[user],
            S.EVENT_TIMESTAMP: from_ns(ts),
            "views_24h": (cum_view[hi] - cum_view[lo]).astype(np.int64),
            "carts_24h": (cum_cart[hi] - cum_cart[lo]).astype(np.int64),
        }
    )
    # several events in the same nanosecond: keep the last (the complete count)
    return frame.drop_duplicates([C.USER_ID, S.EVENT_TIMESTAMP], keep="last")


class FeatureBuilder:
    """Computes every view's table from validated event tables."""

    def __init__(self, tables: dict[str, pd.DataFrame], snapshot_days: int = 1):
        self.t = tables
        self.cal = Calendar.of(tables, snapshot_days)
        self.snaps = self.cal.snapshots
        self.snap_ns = self.cal.time_of(self.snaps)
        imp = tables[C.IMPRESSIONS]
        items = tables[C.ITEMS]
        self.item_ids = items[C.ITEM_ID].to_numpy()
        self.user_ids = tables[C.USERS][C.USER_ID].to_numpy()
        self.item_index = pd.Index(self.item_ids)
        self.user_index = pd.Index(self.user_ids)
        # impression attributes every outcome table joins to, found by binary search
        self._impression_rows = RowsById(imp[C.IMPRESSION_ID].to_numpy(np.int64))
        self._outcomes: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]] = {}
        self._outcome_fed: dict[str, np.ndarray] = {}  # per outcome row: its impression is a feed's
        self.imp_item = self.item_index.get_indexer(pd.Index(imp[C.ITEM_ID]))
        self.imp_user = self.user_index.get_indexer(pd.Index(imp[C.USER_ID]))
        self.imp_day = self.cal.day_of(to_ns(imp[C.TS]))
        self.organic = (imp[C.POLICY] == C.POLICY_ORGANIC).to_numpy()
        category = items[C.CATEGORY]
        self.n_categories = int(category.max()) + 1 if len(category) else 1
        self._category_window: np.ndarray | None = None

    def _outcome(self, table: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
        """(item index, user index, day) of an outcome table's rows, via their impression;
        worked out once per table (every view reads clicks and purchases)."""
        if table not in self._outcomes:
            df = self.t[table]
            row = self._impression_rows(df[C.IMPRESSION_ID].to_numpy(np.int64))
            ok = row >= 0
            df = df[ok]
            row = row[ok]
            self._outcome_fed[table] = ~self.organic[row]
            self._outcomes[table] = (
                self.imp_item[row],
                self.imp_user[row],
                self.cal.day_of(to_ns(df[C.TS])),
                df,
            )
        return self._outcomes[table]

    # --- items ---------------------------------------------------------------------------
    def item_stats(self) -> pd.DataFrame:
        cal, snaps = self.cal, self.snaps
        items = self.t[C.ITEMS]
        n = len(items)
        served = ~self.organic  # organic rows are not impressions of a feed
        imps = _daily(self.imp_item[served], self.imp_day[served], n, cal.days)
        c_item, _, c_day, _ = self._outcome(C.CLICKS)
        clicks = _daily(c_item, c_day, n, cal.days)  # every click: the item's popularity
        p_item, _, p_day, _ = self._outcome(C.PURCHASES)
        # The rates are per feed impression, so their numerators count the feed's outcomes;
        # organic clicks and purchases (search, browse) have no feed impression to be a rate
        # of. Purchase-only data (no feed at all) keeps every outcome.
        mixed = bool(self.organic.any() and served.any())
        if mixed:
            c_fed, p_fed = self._outcome_fed[C.CLICKS], self._outcome_fed[C.PURCHASES]
            fed_clicks = _daily(c_item[c_fed], c_day[c_fed], n, cal.days)
            buys = _daily(p_item[p_fed], p_day[p_fed], n, cal.days)
        else:
            fed_clicks = clicks
            buys = _daily(p_item, p_day, n, cal.days)
        cols: dict[str, np.ndarray] = {}
        # every impression, feed and organic, since the data began
        every = _daily(self.imp_item, self.imp_day, n, cal.days)
        cols["impressions_total"] = every[:, snaps].astype(np.int64)
        del every
        for w in (7, 30):
            i_w = _window(imps, snaps, w)
            c_w = _window(fed_clicks, snaps, w)
            b_w = _window(buys, snaps, w)
            total_i = np.maximum(i_w.sum(axis=0), 1.0)
            ctr0 = c_w.sum(axis=0) / total_i
            pr0 = b_w.sum(axis=0) / total_i
            ctr = (c_w + CTR_PRIOR_STRENGTH * ctr0) / (i_w + CTR_PRIOR_STRENGTH)
            rate = (b_w + PURCHASE_PRIOR_STRENGTH * pr0) / (i_w + PURCHASE_PRIOR_STRENGTH)
            # float32 now, not in _finish: items x snapshots grids are the view's bulk
            cols[f"ctr_{w}d"] = ctr.astype(np.float32)
            cols[f"purchase_rate_{w}d"] = rate.astype(np.float32)
            if w == 7:
                all_w = _window(clicks, snaps, w) if mixed else c_w
                cols["impressions_7d"] = i_w.astype(np.int64)
                cols["clicks_7d"] = all_w.astype(np.int64)
                cols["popularity_7d"] = np.log1p(all_w).astype(np.float32)
        created = to_ns(items[C.CREATED_AT])
        age = (self.snap_ns[None, :] - created[:, None]) / NS_PER_DAY
        cols["age_days"] = age.astype(np.float32)
        price = items[C.PRICE].to_numpy()
        cols["price"] = price
        cols["discount"] = 1.0 - price / np.maximum(items[C.LIST_PRICE].to_numpy(), 1e-9)
        cols["category"] = items[C.CATEGORY].to_numpy()
        share = self.category_share().astype(np.float32)
        cols["category_share"] = share[items[C.CATEGORY].to_numpy(np.int64)]
        cols["brand"] = items[C.BRAND].to_numpy()
        cols["shipping_days"] = items[C.SHIPPING_DAYS].to_numpy()
        return self._finish(
            S.ITEM_STATS,
            _snapshot_frame(C.ITEM_ID, self.item_ids, age >= 0, self.snap_ns, cols, S.ITEM_STATS),
        )

    def seller_stats(self) -> pd.DataFrame:
        sellers = self.t[C.SELLERS]
        created = to_ns(sellers[C.CREATED_AT])
        age = (self.snap_ns[None, :] - created[:, None]) / NS_PER_DAY
        cols = {
            "seller_rating": sellers[C.RATING].to_numpy(),
            "seller_age_days": age,
            "seller_is_new": (age < NEW_SELLER_DAYS).astype(np.int64),
        }
        ids = sellers[C.SELLER_ID].to_numpy()
        return self._finish(
            S.SELLER_STATS,
            _snapshot_frame(C.SELLER_ID, ids, age >= 0, self.snap_ns, cols, S.SELLER_STATS),
        )

    # --- users ---------------------------------------------------------------------------
    def user_profile(self) -> pd.DataFrame:
        _, c_user, c_day, c_df = self._outcome(C.CLICKS)
        _, p_user, p_day, p_df = self._outcome(C.PURCHASES)
        cal, snaps, n = self.cal, self.snaps, len(self.user_ids)
        users = self.t[C.USERS]
        clicks = _daily(c_user, c_day, n, cal.days)
        buys = _daily(p_user, p_day, n, cal.days)
        spend_w = p_df[C.PRICE].to_numpy() * p_df[C.QUANTITY].to_numpy()
        spend = _daily(p_user, p_day, n, cal.days, weights=spend_w)
        # last interaction (click or purchase) before each snapshot, by day-level max ts
        ev_user = np.concatenate([c_user, p_user])
        ev_day = np.concatenate([c_day, p_day])
        ev_ts = np.concatenate([to_ns(c_df[C.TS]), to_ns(p_df[C.TS])])
        last = np.full((n, cal.days + 1), -1, dtype=np.int64)
        ok = (ev_day >= 0) & (ev_day < cal.days) & (ev_user >= 0)
        np.maximum.at(last, (ev_user[ok], ev_day[ok] + 1), ev_ts[ok])
        last = np.maximum.accumulate(last, axis=1)[:, snaps]
        recency = np.where(
            last >= 0, (self.snap_ns[None, :] - last) / NS_PER_DAY, NO_ACTIVITY_RECENCY_DAYS
        )
        spend_30 = _window(spend, snaps, 30)
        buys_30 = _window(buys, snaps, 30)
        signup = to_ns(users[C.SIGNUP_AT])
        since = (self.snap_ns[None, :] - signup[:, None]) / NS_PER_DAY
        cols = {
            C.COUNTRY: users[C.COUNTRY].to_numpy(),
            C.DEVICE: users[C.DEVICE].to_numpy(),
            "days_since_signup": since,
            "recency_days": np.minimum(recency, NO_ACTIVITY_RECENCY_DAYS),
            "clicks_30d": _window(clicks, snaps, 30).astype(np.int64),
            "purchases_30d": buys_30.astype(np.int64),
            "spend_30d": spend_30,
            "spend_band": np.searchsorted(SPEND_BANDS, spend_30, side="left").astype(np.int64),
            "avg_price_paid_30d": np.divide(
                spend_30, buys_30, out=np.zeros_like(spend_30), where=buys_30 > 0
            ),
        }
        frame = _snapshot_frame(
            C.USER_ID, self.user_ids, since >= 0, self.snap_ns, cols, S.USER_PROFILE
        )
        return self._finish(S.USER_PROFILE, frame)

    def _engagements(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(user index, category, day, weight) of every click and purchase in the window."""
        item, user, day, weight = self._engaged_items()
        return user, self.t[C.ITEMS][C.CATEGORY].to_numpy(np.int64)[item], day, weight

    def _engaged_items(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(item index, user index, day, weight) of every click (weight 1) and purchase
        (``affinity.PURCHASE_WEIGHT``) in the window: what the affinity and the content
        profile both weigh."""
        c_item, c_user, c_day, _ = self._outcome(C.CLICKS)
        p_item, p_user, p_day, _ = self._outcome(C.PURCHASES)
        item = np.concatenate([c_item, p_item])
        user = np.concatenate([c_user, p_user]).astype(np.int64)
        day = np.concatenate([c_day, p_day]).astype(np.int64)
        weight = np.concatenate(
            [np.ones(len(c_user)), np.full(len(p_user), affinity.PURCHASE_WEIGHT)]
        )
        ok = (item >= 0) & (user >= 0) & (day >= 0) & (day < self.cal.days)
        return item[ok], user[ok], day[ok], weight[ok]

    def _profile_items(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(item index, user index, day, weight) the content profile sums: every engagement
        (:meth:`_engaged_items`) and every organic impression, clicked or not, with weight
        ``content.ORGANIC_WEIGHT``: the user's own search or browse chose the item."""
        item, user, day, weight = self._engaged_items()
        organic = self.organic & (self.imp_item >= 0) & (self.imp_user >= 0)
        organic &= (self.imp_day >= 0) & (self.imp_day < self.cal.days)
        if content.ORGANIC_WEIGHT <= 0 or not organic.any():
            return item, user, day, weight
        return (
            np.concatenate([item, self.imp_item[organic]]),
            np.concatenate([user, self.imp_user[organic].astype(np.int64)]),
            np.concatenate([day, self.imp_day[organic].astype(np.int64)]),
            np.concatenate([weight, np.full(int(organic.sum()), content.ORGANIC_WEIGHT)]),
        )

    def category_window(self) -> np.ndarray:
        """(categories, snapshots): everyone's engagement weight per category in the 30
        days before each snapshot (categories x days: small whatever the user count)."""
        if self._category_window is None:
            _, cat, day, weight = self._engagements()
            prefix = _daily(cat, day, self.n_categories, self.cal.days, weights=weight)
            self._category_window = _window(prefix, self.snaps, 30)
        return self._category_window

    def category_share(self) -> np.ndarray:
        """(categories, snapshots): each category's Laplace-smoothed share of engagement."""
        window = self.category_window() + 1.0
        return window / window.sum(axis=0, keepdims=True)

    def user_category_affinity(self, max_entries: int = LIST_CHUNK_CELLS) -> pd.DataFrame:
        """Per user and snapshot s: the categories engaged with in [s - 30 days, s), heaviest
        first (at most ``contract.affinity.TOP_K``), their weights and the window's total.

        Sparse throughout, never users x categories: engagements are summed per (user,
        category, day); each such group is the pair's latest before the snapshots from the
        next day until the pair's next engagement day or 30 days on; the pair's window sum
        at those snapshots is a difference of the groups' running sum. Users are taken in
        chunks of at most ``max_entries`` (pair, snapshot) cells, so the peak is bounded
        by the chunk, not the data.
        """
        snaps, n_snaps, n_users = self.snaps, len(self.snaps), len(self.user_ids)
        user, cat, day, weight = self._engagements()
        stride = np.int64(self.cal.days + 1)
        key = (user * np.int64(self.n_categories) + cat) * stride + day
        key, inverse = np.unique(key, return_inverse=True)
        group_weight = np.bincount(inverse, weights=weight, minlength=len(key))
        del user, cat, day, weight, inverse
        pair, day = key // stride, key % stride
        running = np.concatenate([[0.0], np.cumsum(group_weight)])
        pair_goes_on = np.zeros(len(pair), dtype=bool)
        pair_goes_on[:-1] = pair[1:] == pair[:-1]
        until = day + 30
        until = np.where(pair_goes_on, np.minimum(np.append(day[1:], 0), until), until)
        k_lo = np.searchsorted(snaps, day + 1, side="left")
        count = np.maximum(np.searchsorted(snaps, until, side="right") - k_lo, 0)
        group_user = pair // self.n_categories
        signup = to_ns(self.t[C.USERS][C.SIGNUP_AT])
        alive = self.snap_ns[None, :] >= signup[:, None]
        totals = np.zeros(n_users * n_snaps, dtype=np.float64)
        kept_cell: list[np.ndarray] = []
        kept_cat: list[np.ndarray] = []
        kept_weight: list[np.ndarray] = []
        for lo, hi in _chunks(group_user, count, max_entries):
            c = count[lo:hi]
            group = np.repeat(np.arange(lo, hi), c)
            k = k_lo[group] + np.arange(len(group)) - np.repeat(np.cumsum(c) - c, c)
            s = snaps[k]
            first = np.searchsorted(key, pair[group] * stride + np.maximum(s - 30, 0), "left")
            value = running[group + 1] - running[first]
            cell = group_user[group] * n_snaps + k
            live = alive.ravel()[cell]
            cell, value, group = cell[live], value[live], group[live]
            totals += np.bincount(cell, weights=value, minlength=len(totals))
            entry_cat = pair[group] % self.n_categories
            order = np.lexsort((entry_cat, -value, cell))
            cell, value, entry_cat = cell[order], value[order], entry_cat[order]
            rank = np.arange(len(cell)) - np.searchsorted(cell, cell, side="left")
            top = rank < affinity.TOP_K
            kept_cell.append(cell[top])
            kept_cat.append(entry_cat[top])
            kept_weight.append(value[top].astype(np.float32))
        cell = np.concatenate([np.zeros(0, np.int64), *kept_cell])
        e, s_idx = np.nonzero(alive)
        offsets = np.append(0, np.searchsorted(cell, e * n_snaps + s_idx, side="right"))
        frame = pd.DataFrame(
            {
                C.USER_ID: self.user_ids[e],
                S.EVENT_TIMESTAMP: from_ns(self.snap_ns[s_idx]),
                S.AFFINITY_CATEGORIES: _arrow_lists(
                    offsets, np.concatenate([np.zeros(0, np.int64), *kept_cat])
                ),
                S.AFFINITY_WEIGHTS: _arrow_lists(
                    offsets, np.concatenate([np.zeros(0, np.float32), *kept_weight])
                ),
                S.AFFINITY_TOTAL: totals.reshape(n_users, n_snaps)[e, s_idx],
            }
        )
        return self._finish(S.USER_CATEGORY_AFFINITY, frame)

    def user_seller_recency(self, max_entries: int = LIST_CHUNK_CELLS) -> pd.DataFrame:
        """Per user and snapshot s: the sellers of the items the user clicked or bought with
        ts in [s - 30 days, s), most recent first, at most 50, with (s - last ts) in days.

        No dense (user x seller x day) grid (sim-small: 20k x 2k x 30): each (user, seller,
        day) group's last event is the pair's latest for the snapshots from the next day
        until the pair's next engagement day or 30 days on, whichever comes first; the
        groups are expanded to those snapshots and ranked within each (user, snapshot), users
        taken in chunks of at most ``max_entries`` cells.
        """
        c_item, c_user, c_day, c_df = self._outcome(C.CLICKS)
        p_item, p_user, p_day, p_df = self._outcome(C.PURCHASES)
        snaps, n_snaps = self.snaps, len(self.snaps)
        seller_of_item = self.t[C.ITEMS][C.SELLER_ID].to_numpy(np.int64)
        item = np.concatenate([c_item, p_item])
        user = np.concatenate([c_user, p_user]).astype(np.int64)
        day = np.concatenate([c_day, p_day])
        ts = np.concatenate([to_ns(c_df[C.TS]), to_ns(p_df[C.TS])])
        ok = (item >= 0) & (user >= 0) & (day >= 0) & (day < self.cal.days)
        user, day, ts = user[ok], day[ok], ts[ok]
        seller = seller_of_item[item[ok]]
        # the last event of each (user, seller, day) ...
        order = np.lexsort((ts, day, seller, user))
        user, seller, day, ts = user[order], seller[order], day[order], ts[order]
        pair_goes_on = np.zeros(len(day), dtype=bool)  # the next row is the same pair
        pair_goes_on[:-1] = (user[1:] == user[:-1]) & (seller[1:] == seller[:-1])
        last = ~(pair_goes_on & (np.append(day[1:], -1) == day))
        user, seller, day, ts = user[last], seller[last], day[last], ts[last]
        pair_goes_on = pair_goes_on[last]
        # ... is the pair's latest at the snapshots in [day + 1, min(next day, day + 30)]
        until = day + RECENT_SELLERS_DAYS
        until = np.where(pair_goes_on, np.minimum(np.append(day[1:], 0), until), until)
        k_lo = np.searchsorted(snaps, day + 1, side="left")
        count = np.maximum(np.searchsorted(snaps, until, side="right") - k_lo, 0)
        # the cells of users signed up by the snapshot, in _snapshot_frame's order
        signup = to_ns(self.t[C.USERS][C.SIGNUP_AT])
        alive = self.snap_ns[None, :] >= signup[:, None]
        kept_cell: list[np.ndarray] = [np.zeros(0, np.int64)]
        kept_group: list[np.ndarray] = [np.zeros(0, np.int64)]
        for lo, hi in _chunks(user, count, max_entries):  # users whole, cells bounded
            c = count[lo:hi]
            group = np.repeat(np.arange(lo, hi), c)
            k = k_lo[group] + np.arange(len(group)) - np.repeat(np.cumsum(c) - c, c)
            cell = user[group] * n_snaps + k  # (user, snapshot), row-major
            keep = alive.ravel()[cell]
            cell, group = cell[keep], group[keep]
            order = np.lexsort((seller[group], -ts[group], cell))  # most recent first
            cell, group = cell[order], group[order]
            rank = np.arange(len(cell)) - np.searchsorted(cell, cell, side="left")
            kept_cell.append(cell[rank < RECENT_SELLERS_MAX])
            kept_group.append(group[rank < RECENT_SELLERS_MAX])
        cell, group = np.concatenate(kept_cell), np.concatenate(kept_group)
        days = ((self.snap_ns[cell % n_snaps] - ts[group]) / NS_PER_DAY).astype(np.float32)
        e, s = np.nonzero(alive)
        offsets = np.append(0, np.searchsorted(cell, e * n_snaps + s, side="right"))
        frame = pd.DataFrame(
            {
                C.USER_ID: self.user_ids[e],
                S.EVENT_TIMESTAMP: from_ns(self.snap_ns[s]),
                S.RECENT_SELLERS: _arrow_lists(offsets, seller[group].astype(np.int64)),
                S.RECENT_SELLER_DAYS: _arrow_lists(offsets, days),
            }
        )
        return self._finish(S.USER_SELLER_RECENCY, frame)

    def user_content_profile(self, max_entries: int = LIST_CHUNK_CELLS) -> pd.DataFrame:
        """Per user and snapshot s: the unit-length weighted sum of the unit content vectors of
        the items clicked (weight 1), bought (``affinity.PURCHASE_WEIGHT``) or shown by the
        user's organic search and browse (``content.ORGANIC_WEIGHT``, clicked or not) on the
        days in [s - 30, s), the window ``user_category_affinity`` uses
        (``contract.content``); an empty list without any, or when the catalogue has no
        content.

        Engagements are summed per (user, day) into one vector each; a cell's window sum is a
        difference of the groups' running sum. Users are taken in chunks of at most
        ``max_entries / dim`` cells, so the (cells x dim) sums hold at most ``max_entries``
        floats at a time.
        """
        snaps = self.snaps
        unit = content.table_unit(self.t[C.ITEMS])
        dim = unit.shape[1]
        item, user, day, weight = self._profile_items()
        stride = np.int64(self.cal.days + 1)
        key = user * stride + day
        key, inverse = np.unique(key, return_inverse=True)
        # row 0: nothing before; the last column sums the weights (content_profile_weight)
        sums = np.zeros((len(key) + 1, dim + 1), dtype=np.float64)
        np.add.at(sums, inverse + 1, np.hstack([unit[item] * weight[:, None], weight[:, None]]))
        running = np.cumsum(sums, axis=0)
        del item, user, day, weight, inverse, sums
        signup = to_ns(self.t[C.USERS][C.SIGNUP_AT])
        alive = self.snap_ns[None, :] >= signup[:, None]
        e, s_idx = np.nonzero(alive)
        lengths = np.zeros(len(e), dtype=np.int64)
        total = np.zeros(len(e), dtype=np.float64)
        values: list[np.ndarray] = [np.zeros(0, np.float32)]
        per_user = np.bincount(e, minlength=len(self.user_ids))
        before = np.append(0, np.cumsum(per_user))
        budget = max(max_entries // (dim + 1), 1)  # cells x (dim + 1) float64 sums per chunk
        for lo, hi in _chunks(np.arange(len(per_user)), per_user, budget):
            cells = slice(int(before[lo]), int(before[hi]))
            u, s = e[cells], snaps[s_idx[cells]]
            last = np.searchsorted(key, u * stride + s, side="left")  # groups before day s
            first = np.searchsorted(key, u * stride + np.maximum(s - content.WINDOW_DAYS, 0))
            window = running[last] - running[first]
            total[cells] = np.maximum(window[:, dim], 0.0)  # a difference of sums: no -0
            window = window[:, :dim]
            norm = np.linalg.norm(window, axis=1)
            has = norm > 0
            lengths[cells] = np.where(has, dim, 0)
            values.append((window[has] / norm[has, None]).astype(np.float32).ravel())
        offsets = np.append(0, np.cumsum(lengths))
        frame = pd.DataFrame(
            {
                C.USER_ID: self.user_ids[e],
                S.EVENT_TIMESTAMP: from_ns(self.snap_ns[s_idx]),
                S.CONTENT_PROFILE: _arrow_lists(offsets, np.concatenate(values)),
                S.CONTENT_PROFILE_WEIGHT: np.where(lengths > 0, total, 0.0).astype(np.float32),
            }
        )
        return self._finish(S.USER_CONTENT_PROFILE, frame)

    # --- streaming views (event-level rows) ----------------------------------------------
    def user_recent_activity(self) -> pd.DataFrame:
        _, c_user, _, c_df = self._outcome(C.CLICKS)
        _, a_user, _, a_df = self._outcome(C.ADD_TO_CARTS)
        frame = recent_activity_rows(
            np.concatenate([self.user_ids[c_user], self.user_ids[a_user]]),
            np.concatenate([to_ns(c_df[C.TS]), to_ns(a_df[C.TS])]),
            np.concatenate([np.zeros(len(c_user), bool), np.ones(len(a_user), bool)]),
        )
        return self._finish(S.USER_RECENT_ACTIVITY, frame)

    def item_inventory(self) -> pd.DataFrame:
        inv = self.t[C.INVENTORY]
        frame = pd.DataFrame(
            {
                C.ITEM_ID: inv[C.ITEM_ID].to_numpy(),
                S.EVENT_TIMESTAMP: from_ns(to_ns(inv[C.TS])),  # typed even when empty
                "stock": inv[C.STOCK].to_numpy(np.int64),
                "in_stock": (inv[C.STOCK].to_numpy() > 0).astype(np.int64),
            }
        )
        frame = frame.drop_duplicates([C.ITEM_ID, S.EVENT_TIMESTAMP], keep="last")
        return self._finish(S.ITEM_INVENTORY, frame)

    # -------------------------------------------------------------------------------------
    def _finish(self, view: str, frame: pd.DataFrame) -> pd.DataFrame:
        for name, kind in S.FEATURES[view].items():
            if kind == "float32":
                frame[name] = frame[name].astype(np.float32, copy=False)
            elif kind == "int64":
                frame[name] = frame[name].astype(np.int64, copy=False)
        # microseconds: DuckDB (the offline store's engine) cannot cast tz-aware ns stamps
        frame[S.EVENT_TIMESTAMP] = frame[S.EVENT_TIMESTAMP].dt.as_unit("us")
        frame[S.CREATED] = frame[S.EVENT_TIMESTAMP]
        key = S.ENTITY_OF_VIEW[view]
        frame[key] = frame[key].astype(np.int64, copy=False)
        ts = to_ns(frame[S.EVENT_TIMESTAMP])
        ids = frame[key].to_numpy()
        ordered = (ts[1:] > ts[:-1]) | ((ts[1:] == ts[:-1]) & (ids[1:] >= ids[:-1]))
        if ordered.all():  # built in order already: no sorted copy of a large table
            return frame.reset_index(drop=True)
        return frame.sort_values([S.EVENT_TIMESTAMP, key], kind="stable").reset_index(drop=True)

    def builders(self) -> dict[str, Callable[[], pd.DataFrame]]:
        """Each view's build, to run one at a time (``build_feature_tables`` writes and frees
        each table before the next is built)."""
        return {
            S.USER_PROFILE: self.user_profile,
            S.USER_CATEGORY_AFFINITY: self.user_category_affinity,
            S.USER_SELLER_RECENCY: self.user_seller_recency,
            S.USER_CONTENT_PROFILE: self.user_content_profile,
            S.ITEM_STATS: self.item_stats,
            S.SELLER_STATS: self.seller_stats,
            S.USER_RECENT_ACTIVITY: self.user_recent_activity,
            S.ITEM_INVENTORY: self.item_inventory,
        }


def build_estimate(tables: dict[str, pd.DataFrame], snapshot_days: int = 1) -> dict[str, float]:
    """Bytes ``build_feature_tables`` will hold at its peak, by part
    (``training.memory.features_build_bytes``), from the tables' sizes alone."""
    cal = Calendar.of(tables, snapshot_days)
    category = tables[C.ITEMS][C.CATEGORY]
    return features_build_bytes(
        users=len(tables[C.USERS]),
        items=len(tables[C.ITEMS]),
        sellers=len(tables[C.SELLERS]),
        categories=int(category.max()) + 1 if len(category) else 1,
        days=cal.days,
        snapshots=len(cal.snapshots),
        events=sum(len(tables[t]) for t in (C.IMPRESSIONS, C.CLICKS, C.ADD_TO_CARTS, C.PURCHASES)),
        engagements=len(tables[C.CLICKS]) + len(tables[C.PURCHASES]),
        impressions=len(tables[C.IMPRESSIONS]),
        content_dim=_content_width(tables[C.ITEMS]),
    )


def _content_width(items: pd.DataFrame) -> int:
    """The items' content width (0 without content), from the first row."""
    if C.CONTENT not in items.columns or not len(items):
        return 0
    return int(np.size(items[C.CONTENT].iloc[0]))


WRITE_SLICE_ROWS = 2_000_000


def _write_parquet(frame: pd.DataFrame, path: Path, slice_rows: int = WRITE_SLICE_ROWS) -> None:
    """``frame`` to Parquet a slice of rows at a time, so Arrow's copy of a 14 M-row table
    (the large preset's item_stats) is one slice, not the whole table."""
    import pyarrow.parquet as pq

    # without pandas' metadata: it would name Arrow list dtypes pandas cannot read back
    first = pa.Table.from_pandas(frame.iloc[:slice_rows], preserve_index=False)
    first = first.replace_schema_metadata(None)
    with pq.ParquetWriter(path, first.schema) as writer:
        writer.write_table(first)
        del first
        for lo in range(slice_rows, len(frame), slice_rows):
            part = frame.iloc[lo : lo + slice_rows]
            writer.write_table(
                pa.Table.from_pandas(part, schema=writer.schema, preserve_index=False)
            )


def outcome_events(
    tables: dict[str, pd.DataFrame],
    table: str,
    after_ns: int,
    rows: RowsById | None = None,
) -> pd.DataFrame:
    """user_id, item_id, ts (ns) of an outcome table's rows later than ``after_ns``, through
    their impression (``rows``: the impressions' id index, when the caller has one)."""
    imp = tables[C.IMPRESSIONS]
    if rows is None:
        rows = RowsById(imp[C.IMPRESSION_ID].to_numpy(np.int64))
    frame = tables[table]
    ts = to_ns(frame[C.TS])
    keep = ts > after_ns
    at = rows(frame[C.IMPRESSION_ID].to_numpy(np.int64)[keep])
    ok = at >= 0
    return pd.DataFrame(
        {
            "user_id": imp[C.USER_ID].to_numpy(np.int64)[at[ok]],
            "item_id": imp[C.ITEM_ID].to_numpy(np.int64)[at[ok]],
            "ts": ts[keep][ok],
        }
    )


def stream_state(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The events the features service seeds its stream windows with (``S.STREAM_STATE``):
    kind ("click" / "add_to_cart" / "purchase", ``contract.events``' kinds), user_id,
    item_id, ts (ns): clicks and add-to-carts of the last ``STREAM_STATE_ACTIVITY_S`` and
    purchases of the last ``STREAM_STATE_PURCHASE_S`` before the newest impression."""
    imp = tables[C.IMPRESSIONS]
    if not len(imp):
        return pd.DataFrame({"kind": [], "user_id": [], "item_id": [], "ts": []})
    end = int(to_ns(imp[C.TS]).max())
    rows = RowsById(imp[C.IMPRESSION_ID].to_numpy(np.int64))
    parts = []
    for table, kind, window_s in (
        (C.CLICKS, E.CLICK, S.STREAM_STATE_ACTIVITY_S),
        (C.ADD_TO_CARTS, E.ADD_TO_CART, S.STREAM_STATE_ACTIVITY_S),
        (C.PURCHASES, E.PURCHASE, S.STREAM_STATE_PURCHASE_S),
    ):
        frame = outcome_events(tables, table, end - window_s * NS_PER_S, rows)
        frame.insert(0, "kind", kind)
        parts.append(frame)
    return pd.concat(parts, ignore_index=True).sort_values("ts", kind="stable")


def build_feature_tables(
    tables: dict[str, pd.DataFrame], out_dir: Path, snapshot_days: int = 1
) -> dict[str, int]:
    """Compute every view's table and write ``<view>.parquet`` under ``out_dir``."""
    started = time.perf_counter()
    builder = FeatureBuilder(tables, snapshot_days)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = {}
    for view, build in builder.builders().items():
        frame = build()
        _write_parquet(frame, out_dir / f"{view}.parquet.partial")
        rows[view] = len(frame)
        del frame  # one view's table in memory at a time
    state = stream_state(tables)
    state.to_parquet(out_dir / f"{S.STREAM_STATE}.partial", index=False)
    rows[S.STREAM_STATE] = len(state)
    for view in rows:  # all or nothing: a failed build leaves the previous tables
        name = view if view == S.STREAM_STATE else f"{view}.parquet"
        (out_dir / f"{name}.partial").replace(out_dir / name)
    log.info("feature tables %s in %.1fs", rows, time.perf_counter() - started)
    return rows
