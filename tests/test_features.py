"""Batch feature tables: window arithmetic on hand-built logs, and point-in-time safety."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from feature_repo import schema as S
from tests.handmade import ts as _ts
from training import columns as C
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
