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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from contract import columns as C
from contract.features import NEW_SELLER_DAYS, SPEND_BANDS
from contract.timeutil import NS_PER_DAY, NS_PER_S, from_ns, to_ns
from feature_repo import schema as S

log = logging.getLogger(__name__)

CTR_PRIOR_STRENGTH = 50.0  # pseudo-impressions pulling an item's CTR to the catalog's
PURCHASE_PRIOR_STRENGTH = 500.0
AFFINITY_PRIOR_STRENGTH = 2.0  # pseudo-engagements pulling affinities to the global mix
PURCHASE_ENGAGEMENT_WEIGHT = 3.0  # a purchase counts as this many clicks for affinity
NO_ACTIVITY_RECENCY_DAYS = 365.0
RECENT_SELLERS_DAYS = 30  # window of user_seller_recency
RECENT_SELLERS_MAX = 50  # sellers kept per user and snapshot, the most recent


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
    key: str, ids: np.ndarray, alive: np.ndarray, snap_ns: np.ndarray, cols: dict[str, np.ndarray]
) -> pd.DataFrame:
    """Long frame of the (entity, snapshot) cells where ``alive`` holds."""
    e, s = np.nonzero(alive)
    frame = pd.DataFrame({key: ids[e], S.EVENT_TIMESTAMP: from_ns(snap_ns[s])})
    for name, values in cols.items():
        frame[name] = values[e, s] if values.ndim == 2 else values[e]
    return frame


def _lists(offsets: np.ndarray, values: np.ndarray) -> list[np.ndarray]:
    """``values[offsets[i]:offsets[i + 1]]`` for each i: numpy views, typed even when empty."""
    return np.split(values, offsets[1:-1]) if len(offsets) > 1 else []


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
        # impression attributes every outcome table joins to
        self.imp_index = pd.Index(imp[C.IMPRESSION_ID].to_numpy())
        self.imp_item = self.item_index.get_indexer(pd.Index(imp[C.ITEM_ID]))
        self.imp_user = self.user_index.get_indexer(pd.Index(imp[C.USER_ID]))
        self.imp_day = self.cal.day_of(to_ns(imp[C.TS]))
        self.organic = (imp[C.POLICY] == C.POLICY_ORGANIC).to_numpy()

    def _outcome(self, table: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, pd.DataFrame]:
        """(item index, user index, day) of an outcome table's rows, via their impression."""
        df = self.t[table]
        row = self.imp_index.get_indexer(pd.Index(df[C.IMPRESSION_ID]))
        ok = row >= 0
        df = df[ok]
        row = row[ok]
        return self.imp_item[row], self.imp_user[row], self.cal.day_of(to_ns(df[C.TS])), df

    # --- items ---------------------------------------------------------------------------
    def item_stats(self) -> pd.DataFrame:
        cal, snaps = self.cal, self.snaps
        items = self.t[C.ITEMS]
        n = len(items)
        served = ~self.organic  # organic rows are not impressions of a feed
        imps = _daily(self.imp_item[served], self.imp_day[served], n, cal.days)
        c_item, _, c_day, _ = self._outcome(C.CLICKS)
        clicks = _daily(c_item, c_day, n, cal.days)
        p_item, _, p_day, _ = self._outcome(C.PURCHASES)
        buys = _daily(p_item, p_day, n, cal.days)
        cols: dict[str, np.ndarray] = {}
        for w in (7, 30):
            i_w = _window(imps, snaps, w)
            c_w = _window(clicks, snaps, w)
            b_w = _window(buys, snaps, w)
            total_i = np.maximum(i_w.sum(axis=0), 1.0)
            ctr0 = c_w.sum(axis=0) / total_i
            pr0 = b_w.sum(axis=0) / total_i
            cols[f"ctr_{w}d"] = (c_w + CTR_PRIOR_STRENGTH * ctr0) / (i_w + CTR_PRIOR_STRENGTH)
            cols[f"purchase_rate_{w}d"] = (b_w + PURCHASE_PRIOR_STRENGTH * pr0) / (
                i_w + PURCHASE_PRIOR_STRENGTH
            )
            if w == 7:
                cols["impressions_7d"] = i_w.astype(np.int64)
                cols["clicks_7d"] = c_w.astype(np.int64)
                cols["popularity_7d"] = np.log1p(c_w)
        created = to_ns(items[C.CREATED_AT])
        age = (self.snap_ns[None, :] - created[:, None]) / NS_PER_DAY
        cols["age_days"] = age
        price = items[C.PRICE].to_numpy()
        cols["price"] = price
        cols["discount"] = 1.0 - price / np.maximum(items[C.LIST_PRICE].to_numpy(), 1e-9)
        cols["category"] = items[C.CATEGORY].to_numpy()
        cols["brand"] = items[C.BRAND].to_numpy()
        cols["shipping_days"] = items[C.SHIPPING_DAYS].to_numpy()
        return self._finish(
            S.ITEM_STATS, _snapshot_frame(C.ITEM_ID, self.item_ids, age >= 0, self.snap_ns, cols)
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
            S.SELLER_STATS, _snapshot_frame(C.SELLER_ID, ids, age >= 0, self.snap_ns, cols)
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
        frame = _snapshot_frame(C.USER_ID, self.user_ids, since >= 0, self.snap_ns, cols)
        return self._finish(S.USER_PROFILE, frame)

    def user_category_affinity(self) -> pd.DataFrame:
        c_item, c_user, c_day, _ = self._outcome(C.CLICKS)
        p_item, p_user, p_day, _ = self._outcome(C.PURCHASES)
        cal, snaps, n_users = self.cal, self.snaps, len(self.user_ids)
        category = self.t[C.ITEMS][C.CATEGORY].to_numpy()
        n_cat = int(category.max()) + 1 if len(category) else 1
        users = np.concatenate([c_user, p_user])
        cats = category[np.concatenate([c_item, p_item])]
        days = np.concatenate([c_day, p_day])
        weight = np.concatenate(
            [np.ones(len(c_user)), np.full(len(p_user), PURCHASE_ENGAGEMENT_WEIGHT)]
        )
        prefix = _daily(users * n_cat + cats, days, n_users * n_cat, cal.days, weights=weight)
        per = _window(prefix, snaps, 30).reshape(n_users, n_cat, len(snaps))
        total = per.sum(axis=1)  # (users, snaps)
        prior = per.sum(axis=0)  # (cats, snaps)
        prior = (prior + 1.0) / (prior + 1.0).sum(axis=0, keepdims=True)
        aff = (per + AFFINITY_PRIOR_STRENGTH * prior[None]) / (
            total[:, None, :] + AFFINITY_PRIOR_STRENGTH
        )
        signup = to_ns(self.t[C.USERS][C.SIGNUP_AT])
        alive = self.snap_ns[None, :] >= signup[:, None]
        e, s = np.nonzero(alive)
        vectors = aff[e, :, s].astype(np.float32)
        frame = pd.DataFrame(
            {
                C.USER_ID: self.user_ids[e],
                S.EVENT_TIMESTAMP: from_ns(self.snap_ns[s]),
                "category_affinity": list(vectors),
            }
        )
        return self._finish(S.USER_CATEGORY_AFFINITY, frame)

    def user_seller_recency(self) -> pd.DataFrame:
        """Per user and snapshot s: the sellers of the items the user clicked or bought with
        ts in [s - 30 days, s), most recent first, at most 50, with (s - last ts) in days.

        No dense (user x seller x day) grid (sim-small: 20k x 2k x 30): each (user, seller,
        day) group's last event is the pair's latest for the snapshots from the next day
        until the pair's next engagement day or 30 days on, whichever comes first; the
        groups are expanded to those snapshots and ranked within each (user, snapshot).
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
        count = np.searchsorted(snaps, until, side="right") - k_lo
        group = np.repeat(np.arange(len(day)), count)
        k = k_lo[group] + np.arange(len(group)) - np.repeat(np.cumsum(count) - count, count)
        cell = user[group] * n_snaps + k  # (user, snapshot), row-major
        # the cells of users signed up by the snapshot, in _snapshot_frame's order
        signup = to_ns(self.t[C.USERS][C.SIGNUP_AT])
        alive = self.snap_ns[None, :] >= signup[:, None]
        keep = alive.ravel()[cell]
        cell, group = cell[keep], group[keep]
        order = np.lexsort((seller[group], -ts[group], cell))  # most recent first
        cell, group = cell[order], group[order]
        rank = np.arange(len(cell)) - np.searchsorted(cell, cell, side="left")
        cell, group = cell[rank < RECENT_SELLERS_MAX], group[rank < RECENT_SELLERS_MAX]
        days = ((self.snap_ns[cell % n_snaps] - ts[group]) / NS_PER_DAY).astype(np.float32)
        e, s = np.nonzero(alive)
        offsets = np.append(0, np.searchsorted(cell, e * n_snaps + s, side="right"))
        frame = pd.DataFrame(
            {
                C.USER_ID: self.user_ids[e],
                S.EVENT_TIMESTAMP: from_ns(self.snap_ns[s]),
                S.RECENT_SELLERS: _lists(offsets, seller[group]),
                S.RECENT_SELLER_DAYS: _lists(offsets, days),
            }
        )
        return self._finish(S.USER_SELLER_RECENCY, frame)

    # --- streaming views (event-level rows) ----------------------------------------------
    def user_recent_activity(self) -> pd.DataFrame:
        _, c_user, _, c_df = self._outcome(C.CLICKS)
        _, a_user, _, a_df = self._outcome(C.ADD_TO_CARTS)
        user = np.concatenate([c_user, a_user])
        ts = np.concatenate([to_ns(c_df[C.TS]), to_ns(a_df[C.TS])])
        is_cart = np.concatenate([np.zeros(len(c_user), bool), np.ones(len(a_user), bool)])
        order = np.lexsort((ts, user))
        user, ts, is_cart = user[order], ts[order], is_cart[order]
        secs = ts // NS_PER_S
        key = user.astype(np.int64) * (1 << 33) + secs  # users are dense indices < 2**30
        lo = np.searchsorted(key, key - 86_400, side="right")
        cum_cart = np.concatenate([[0], np.cumsum(is_cart)])
        cum_view = np.concatenate([[0], np.cumsum(~is_cart)])
        hi = np.arange(1, len(key) + 1)
        frame = pd.DataFrame(
            {
                C.USER_ID: self.user_ids[user],
                S.EVENT_TIMESTAMP: from_ns(ts),
                "views_24h": (cum_view[hi] - cum_view[lo]).astype(np.int64),
                "carts_24h": (cum_cart[hi] - cum_cart[lo]).astype(np.int64),
            }
        )
        # several events in the same nanosecond: keep the last (the complete count)
        frame = frame.drop_duplicates([C.USER_ID, S.EVENT_TIMESTAMP], keep="last")
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
                frame[name] = frame[name].astype(np.float32)
            elif kind == "int64":
                frame[name] = frame[name].astype(np.int64)
        # microseconds: DuckDB (the offline store's engine) cannot cast tz-aware ns stamps
        frame[S.EVENT_TIMESTAMP] = frame[S.EVENT_TIMESTAMP].dt.as_unit("us")
        frame[S.CREATED] = frame[S.EVENT_TIMESTAMP]
        key = S.ENTITY_OF_VIEW[view]
        frame[key] = frame[key].astype(np.int64)
        return frame.sort_values([S.EVENT_TIMESTAMP, key], kind="stable").reset_index(drop=True)

    def build_all(self) -> dict[str, pd.DataFrame]:
        return {
            S.USER_PROFILE: self.user_profile(),
            S.USER_CATEGORY_AFFINITY: self.user_category_affinity(),
            S.USER_SELLER_RECENCY: self.user_seller_recency(),
            S.ITEM_STATS: self.item_stats(),
            S.SELLER_STATS: self.seller_stats(),
            S.USER_RECENT_ACTIVITY: self.user_recent_activity(),
            S.ITEM_INVENTORY: self.item_inventory(),
        }


def build_estimate(tables: dict[str, pd.DataFrame], snapshot_days: int = 1) -> dict[str, float]:
    """Bytes ``build_feature_tables`` will hold at its peak, by part
    (``training.memory.features_build_bytes``), from the tables' sizes alone."""
    from training.memory import features_build_bytes

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
    )


def build_feature_tables(
    tables: dict[str, pd.DataFrame], out_dir: Path, snapshot_days: int = 1
) -> dict[str, int]:
    """Compute every view's table and write ``<view>.parquet`` under ``out_dir``."""
    started = time.perf_counter()
    views = FeatureBuilder(tables, snapshot_days).build_all()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = {}
    for view, frame in views.items():
        frame.to_parquet(out_dir / f"{view}.parquet", index=False)
        rows[view] = len(frame)
    log.info("feature tables %s in %.1fs", rows, time.perf_counter() - started)
    return rows
