"""Batch feature tables: window arithmetic on hand-built logs, and point-in-time safety."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from contract import columns as C
from feature_repo import schema as S
from tests.handmade import ts as _ts
from training.dataset import seller_days_for_items
from training.features import FeatureBuilder


def _row(frame: pd.DataFrame, key: str, ident: int, at: pd.Timestamp) -> pd.Series:
    hit = frame[(frame[key] == ident) & (frame[S.EVENT_TIMESTAMP] == at)]
    assert len(hit) == 1, f"no single row for {key}={ident} at {at}"
    return hit.iloc[0]


def test_item_windows_count_only_events_before_the_snapshot(tables):
    stats = FeatureBuilder(tables).item_stats()
    day0, day1, day2 = (_row(stats, C.ITEM_ID, 0, _ts(d)) for d in (0, 1, 2))
    assert (day0["impressions_7d"], day0["clicks_7d"]) == (0, 0)  # stamped at 00:00 of day 0
    assert (day1["impressions_7d"], day1["clicks_7d"]) == (2, 2)
    assert day1["ctr_7d"] > _row(stats, C.ITEM_ID, 1, _ts(1))["ctr_7d"]
    assert day2["purchase_rate_7d"] > day1["purchase_rate_7d"]  # the day-1 purchase lands at day 2
    assert day0["discount"] == pytest.approx(0.5)
    assert day0["age_days"] == pytest.approx(10.0)


def test_items_and_users_have_no_snapshot_before_they_exist(tables):
    b = FeatureBuilder(tables)
    stats, profile = b.item_stats(), b.user_profile()
    assert stats[stats[C.ITEM_ID] == 1][S.EVENT_TIMESTAMP].min() >= _ts(-1)
    assert profile[profile[C.USER_ID] == 1][S.EVENT_TIMESTAMP].min() == _ts(3)


def test_user_profile_recency_frequency_spend(tables):
    profile = FeatureBuilder(tables).user_profile()
    day2 = _row(profile, C.USER_ID, 0, _ts(2))
    assert day2["clicks_30d"] == 2 and day2["purchases_30d"] == 1
    assert day2["spend_30d"] == pytest.approx(20.0) and day2["spend_band"] == 1
    assert day2["avg_price_paid_30d"] == pytest.approx(20.0)
    assert day2["recency_days"] == pytest.approx(0.8, abs=1e-3)  # last event: purchase at day 1.2
    day1 = _row(profile, C.USER_ID, 0, _ts(1))
    assert day1["purchases_30d"] == 0 and day1["recency_days"] == pytest.approx(0.49, abs=1e-3)


def test_category_affinity_is_a_smoothed_distribution(tables):
    aff = FeatureBuilder(tables).user_category_affinity()
    vec = _row(aff, C.USER_ID, 0, _ts(2))["category_affinity"]
    assert vec.dtype == np.float32 and len(vec) == 2
    assert vec.sum() == pytest.approx(1.0, abs=1e-6) and vec[0] > vec[1]


def test_recent_activity_counts_the_last_24_hours(tables):
    act = FeatureBuilder(tables).user_recent_activity()
    rows = act[act[C.USER_ID] == 0].reset_index(drop=True)
    assert list(rows["views_24h"]) == [1, 2, 2] and list(rows["carts_24h"]) == [0, 0, 1]


def test_inventory_rows_follow_the_log(tables):
    inv = FeatureBuilder(tables).item_inventory()
    assert list(inv["stock"]) == [5, 3] and list(inv["in_stock"]) == [1, 1]


def _copies(frame: pd.DataFrame, n: int, columns: dict[str, list[Any]]) -> pd.DataFrame:
    """``n`` copies of ``frame``'s first row with ``columns`` set."""
    out = frame.iloc[[0] * n].reset_index(drop=True)
    for name, values in columns.items():
        out[name] = values
    return out


def _clicked(tables: dict[str, pd.DataFrame], clicks: list[tuple[int, pd.Timestamp]]):
    """``tables`` plus, per (seller, ts), a new item of that (new) seller that user 0 is shown
    and clicks at ts, and an unclicked impression at day 35.5 so snapshots run to day 36."""
    out = {k: v.copy() for k, v in tables.items()}
    sellers = sorted({s for s, _ in clicks})
    first_item = int(out[C.ITEMS][C.ITEM_ID].max()) + 1
    item_ids = list(range(first_item, first_item + len(clicks)))
    first_imp = int(out[C.IMPRESSIONS][C.IMPRESSION_ID].max()) + 1
    imp_ids = list(range(first_imp, first_imp + len(clicks) + 1))
    shown = [t for _, t in clicks] + [_ts(35.5)]
    added = {
        C.SELLERS: _copies(out[C.SELLERS], len(sellers), {C.SELLER_ID: sellers}),
        C.ITEMS: _copies(
            out[C.ITEMS],
            len(clicks),
            {C.ITEM_ID: item_ids, C.SELLER_ID: [s for s, _ in clicks]},
        ),
        C.IMPRESSIONS: _copies(
            out[C.IMPRESSIONS],
            len(imp_ids),
            {
                C.IMPRESSION_ID: imp_ids,
                C.REQUEST_ID: imp_ids,
                C.ITEM_ID: [*item_ids, 0],
                C.TS: shown,
            },
        ),
        C.CLICKS: pd.DataFrame({C.IMPRESSION_ID: imp_ids[:-1], C.TS: shown[:-1]}),
    }
    for table, rows in added.items():
        out[table] = pd.concat([out[table], rows], ignore_index=True)
    return out


def _recency(frame: pd.DataFrame, user: int, day: float) -> tuple[list[int], np.ndarray]:
    row = _row(frame, C.USER_ID, user, _ts(day))
    assert len(row[S.RECENT_SELLERS]) == len(row[S.RECENT_SELLER_DAYS])
    assert row[S.RECENT_SELLER_DAYS].dtype == np.float32
    return list(row[S.RECENT_SELLERS]), row[S.RECENT_SELLER_DAYS]


def test_seller_recency_uses_only_events_before_the_snapshot_within_30_days(tables):
    """User 0 engaged seller 0 at days 0.11 and 0.51 (clicks) and 1.2 (purchase), and clicks
    seller 7 exactly at the day-2 snapshot instant: that day's snapshot does not see it."""
    frame = FeatureBuilder(_clicked(tables, [(7, _ts(2.0))])).user_seller_recency()
    assert _recency(frame, 0, 0) == ([], pytest.approx([]))
    assert _recency(frame, 0, 1) == ([0], pytest.approx([0.49], abs=1e-5))
    assert _recency(frame, 0, 2) == ([0], pytest.approx([0.8], abs=1e-5))
    assert _recency(frame, 0, 3) == ([7, 0], pytest.approx([1.0, 1.8], abs=1e-5))
    assert _recency(frame, 0, 31) == ([7, 0], pytest.approx([29.0, 29.8], abs=1e-5))
    # day 1 left the window [day 2, day 32); day 2 is its first day, 30 days back exactly
    assert _recency(frame, 0, 32) == ([7], pytest.approx([30.0], abs=1e-5))
    assert _recency(frame, 0, 33) == ([], pytest.approx([]))
    # no row before signup (day 2.5), then empty lists: a row, so Feast never reuses an older
    assert frame[frame[C.USER_ID] == 1][S.EVENT_TIMESTAMP].min() == _ts(3)
    assert _recency(frame, 1, 3) == ([], pytest.approx([]))
    assert frame[S.RECENT_SELLERS].map(lambda a: a.dtype == np.int64).all()


def test_seller_recency_keeps_the_50_most_recent_sellers_most_recent_first(tables):
    clicks = [(100 + j, _ts(2.0 + 0.01 * j)) for j in range(60)]  # seller 159 is the latest
    frame = FeatureBuilder(_clicked(tables, clicks)).user_seller_recency()
    sellers, days = _recency(frame, 0, 3)
    assert sellers == list(range(159, 109, -1))
    np.testing.assert_allclose(days, 1.0 - 0.01 * np.arange(59, 9, -1), atol=1e-5)
    assert (np.diff(days) > 0).all()
    sellers, _ = _recency(frame, 0, 2)
    assert sellers == [0]  # none of the 60 clicks is before the day-2 snapshot


def test_seller_days_for_items_at_the_limits():
    sellers = pa.array([[5, 3], [5], [], None, [9, 5]], pa.list_(pa.int64()))
    days = pa.array([[0.5, 2.0], [1.0], [], None, [0.25, 4.0]], pa.list_(pa.float32()))
    # present at position 1 / absent / empty list / null (no row) / present at the end
    got = seller_days_for_items(sellers, days, np.array([3, 7, 3, 3, 5]))
    np.testing.assert_array_equal(got, np.array([2.0, 365, 365, 365, 4.0], np.float32))
    assert got.dtype == np.float32
    assert len(seller_days_for_items(sellers[:0], days[:0], np.empty(0, np.int64))) == 0
    # chunks, slices and a null list backed by values do not shift rows
    backed = pa.ListArray.from_arrays(
        pa.array([0, 2, 4, 5], pa.int32()),
        pa.array([1, 2, 3, 4, 5], pa.int64()),
        mask=pa.array([False, True, False]),
    )
    backed_days = pa.array([[0.5, 1.5], None, [2.0]], pa.list_(pa.float32()))
    got = seller_days_for_items(
        pa.chunked_array([backed.slice(1), sellers]),
        pa.chunked_array([backed_days.slice(1), days]),
        np.array([3, 5, 3, 7, 3, 3, 9]),
    )
    np.testing.assert_array_equal(got, np.array([365, 2.0, 2.0, 365, 365, 365, 0.25], np.float32))
    with pytest.raises(ValueError, match="aligned lists"):
        seller_days_for_items(sellers, days[::-1], np.zeros(5, np.int64))
