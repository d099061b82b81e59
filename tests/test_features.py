"""Batch feature tables: window arithmetic on hand-built logs, and point-in-time safety."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from contract import affinity, content
from contract import columns as C
from contract.timeutil import from_ns, to_ns
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
    assert (day0["impressions_total"], day1["impressions_total"]) == (0, 2)
    assert day1["ctr_7d"] > _row(stats, C.ITEM_ID, 1, _ts(1))["ctr_7d"]
    assert day2["purchase_rate_7d"] > day1["purchase_rate_7d"]  # the day-1 purchase lands at day 2
    assert day0["discount"] == pytest.approx(0.5)
    assert day0["age_days"] == pytest.approx(10.0)


def test_organic_engagement_counts_in_popularity_not_in_the_feed_rates(tables):
    """An organic click and purchase (search, browse) on item 1 on day 0: the item's clicks_7d
    and popularity count it; its CTR and purchase rate, per feed impression, do not."""
    base = FeatureBuilder({k: v.copy() for k, v in tables.items()}).item_stats()
    organic = pd.DataFrame(
        {
            C.IMPRESSION_ID: [4],
            C.REQUEST_ID: [3],
            C.USER_ID: [0],
            C.ITEM_ID: [1],
            C.POSITION: [0],
            C.SURFACE: ["HOME"],
            C.TS: [_ts(0.3)],
            C.POLICY: [C.POLICY_ORGANIC],
            C.PROPENSITY: [np.nan],
        }
    )
    tables[C.IMPRESSIONS] = pd.concat([tables[C.IMPRESSIONS], organic], ignore_index=True)
    tables[C.CLICKS] = pd.concat(
        [tables[C.CLICKS], pd.DataFrame({C.IMPRESSION_ID: [4], C.TS: [_ts(0.31)]})],
        ignore_index=True,
    )
    tables[C.PURCHASES] = pd.concat(
        [
            tables[C.PURCHASES],
            pd.DataFrame(
                {C.IMPRESSION_ID: [4], C.TS: [_ts(0.4)], C.PRICE: [50.0], C.QUANTITY: [1]}
            ),
        ],
        ignore_index=True,
    )
    stats = FeatureBuilder(tables).item_stats()
    before, after = _row(base, C.ITEM_ID, 1, _ts(1)), _row(stats, C.ITEM_ID, 1, _ts(1))
    assert (before["clicks_7d"], after["clicks_7d"]) == (0, 1)
    assert after["popularity_7d"] == pytest.approx(np.log1p(1.0))
    assert after["impressions_7d"] == before["impressions_7d"] == 1  # the feed's only
    # the evidence the served E[GMV] is shrunk by counts every impression, organic too
    assert (before["impressions_total"], after["impressions_total"]) == (1, 2)
    for rate in ("ctr_7d", "ctr_30d", "purchase_rate_7d", "purchase_rate_30d"):
        assert after[rate] == pytest.approx(before[rate]), rate


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


def test_category_affinity_lists_the_engaged_categories_heaviest_first(tables):
    b = FeatureBuilder(tables)
    aff = b.user_category_affinity()
    assert aff[S.AFFINITY_CATEGORIES].dtype == pd.ArrowDtype(pa.list_(pa.int64()))
    assert aff[S.AFFINITY_WEIGHTS].dtype == pd.ArrowDtype(pa.list_(pa.float32()))
    # user 0: clicks at days 0.11 and 0.51 and a purchase at 1.2 (weight 3), all category 0
    day2 = _row(aff, C.USER_ID, 0, _ts(2))
    assert list(day2[S.AFFINITY_CATEGORIES]) == [0]
    assert list(day2[S.AFFINITY_WEIGHTS]) == pytest.approx([2 + affinity.PURCHASE_WEIGHT])
    assert day2[S.AFFINITY_TOTAL] == pytest.approx(2 + affinity.PURCHASE_WEIGHT)
    day0 = _row(aff, C.USER_ID, 0, _ts(0))
    assert list(day0[S.AFFINITY_CATEGORIES]) == [] and day0[S.AFFINITY_TOTAL] == 0.0
    share = b.category_share()
    np.testing.assert_allclose(share.sum(axis=0), 1.0)
    stats = b.item_stats()
    assert stats["category_share"].dtype == np.float32
    row = _row(stats, C.ITEM_ID, 0, _ts(2))
    assert row["category_share"] == pytest.approx(share[row["category"], 2])


def _dense_affinity(b: FeatureBuilder) -> tuple[np.ndarray, np.ndarray]:
    """The dense (users, categories, snapshots) window sums the view used to hold, and the
    category shares, by the old arithmetic: the reference the sparse build must equal."""
    user, cat, day, weight = b._engagements()
    n_users, n_cat = len(b.user_ids), b.n_categories
    counts = np.zeros((n_users, n_cat, b.cal.days + 1))
    np.add.at(counts, (user, cat, day + 1), weight)
    prefix = np.cumsum(counts, axis=2)
    snaps = b.snaps
    per = prefix[:, :, snaps] - prefix[:, :, np.maximum(snaps - 30, 0)]
    prior = per.sum(axis=0) + 1.0
    return per, prior / prior.sum(axis=0, keepdims=True)


def _random_engagement(tables, rng, n_users=30, n_cat=50, n_clicks=3000, days=70):
    out = {k: v.copy() for k, v in tables.items()}
    users = _copies(out[C.USERS], n_users, {C.USER_ID: list(range(100, 100 + n_users))})
    users[C.SIGNUP_AT] = _ts(-5)
    out[C.USERS] = pd.concat([out[C.USERS], users], ignore_index=True)
    first_item = int(out[C.ITEMS][C.ITEM_ID].max()) + 1
    items = _copies(out[C.ITEMS], n_cat, {C.ITEM_ID: list(range(first_item, first_item + n_cat))})
    items[C.CATEGORY] = np.arange(n_cat)
    out[C.ITEMS] = pd.concat([out[C.ITEMS], items], ignore_index=True)
    first_imp = int(out[C.IMPRESSIONS][C.IMPRESSION_ID].max()) + 1
    imp_ids = np.arange(first_imp, first_imp + n_clicks)
    # a few heavy users spread over many categories (more than TOP_K), most over a few
    heavy = rng.random(n_clicks) < 0.3
    user = np.where(heavy, rng.integers(0, 3, n_clicks), rng.integers(3, n_users, n_clicks))
    cat = np.where(heavy, rng.integers(0, n_cat, n_clicks), rng.integers(0, 4, n_clicks))
    when = [_ts(d) for d in rng.uniform(0, days, n_clicks)]
    imps = _copies(
        out[C.IMPRESSIONS],
        n_clicks,
        {
            C.IMPRESSION_ID: imp_ids,
            C.REQUEST_ID: imp_ids,
            C.ITEM_ID: first_item + cat,
            C.USER_ID: 100 + user,
            C.TS: when,
        },
    )
    out[C.IMPRESSIONS] = pd.concat([out[C.IMPRESSIONS], imps], ignore_index=True)
    clicked = rng.random(n_clicks) < 0.9
    out[C.CLICKS] = pd.concat(
        [
            out[C.CLICKS],
            pd.DataFrame({C.IMPRESSION_ID: imp_ids[clicked], C.TS: np.array(when)[clicked]}),
        ],
        ignore_index=True,
    )
    return out


@pytest.mark.parametrize(("stride", "chunk"), [(1, 10**9), (1, 500), (7, 300)])
def test_sparse_affinity_equals_the_dense_windows(tables, stride, chunk):
    """Chunked or not, daily or weekly snapshots: the view's lists and totals are the dense
    window sums' nonzero entries (heaviest TOP_K), and the ranker's per-item value is the
    dense smoothed vector's entry for every user with at most TOP_K categories."""
    rng = np.random.default_rng(7)
    b = FeatureBuilder(_random_engagement(tables, rng), snapshot_days=stride)
    per, share = _dense_affinity(b)
    np.testing.assert_allclose(b.category_share(), share, rtol=1e-12)
    aff = b.user_category_affinity(max_entries=chunk)
    index = pd.Index(b.user_ids)
    snap_of = {t: k for k, t in enumerate(from_ns(b.snap_ns))}
    truncated = 0
    for row in aff.itertuples(index=False):
        u = index.get_loc(getattr(row, C.USER_ID))
        k = snap_of[getattr(row, S.EVENT_TIMESTAMP)]
        dense = per[u, :, k]
        cats = np.asarray(getattr(row, S.AFFINITY_CATEGORIES), np.int64)
        weights = np.asarray(getattr(row, S.AFFINITY_WEIGHTS), np.float64)
        assert getattr(row, S.AFFINITY_TOTAL) == pytest.approx(dense.sum(), rel=1e-5)
        nonzero = np.flatnonzero(dense > 1e-9)
        assert len(cats) == min(len(nonzero), affinity.TOP_K)
        np.testing.assert_allclose(weights, dense[cats], rtol=1e-5)
        assert (np.diff(weights) <= 0).all()
        if len(nonzero) > affinity.TOP_K:
            truncated += 1
            assert weights[-1] >= np.sort(dense)[-affinity.TOP_K] - 1e-6
            continue
        assert set(cats) == set(nonzero)
        smoothed = (dense + affinity.PRIOR_STRENGTH * share[:, k]) / (
            dense.sum() + affinity.PRIOR_STRENGTH
        )
        got = affinity.for_items(
            cats,
            weights,
            getattr(row, S.AFFINITY_TOTAL),
            np.arange(b.n_categories),
            share[:, k],
            b.n_categories,
        )
        np.testing.assert_allclose(got, smoothed, rtol=1e-5)
    assert truncated > 0  # the heavy users do pass TOP_K: the cut is exercised


def test_recent_activity_counts_the_last_24_hours(tables):
    act = FeatureBuilder(tables).user_recent_activity()
    rows = act[act[C.USER_ID] == 0].reset_index(drop=True)
    assert list(rows["views_24h"]) == [1, 2, 2] and list(rows["carts_24h"]) == [0, 0, 1]


def test_inventory_rows_follow_the_log(tables):
    inv = FeatureBuilder(tables).item_inventory()
    assert list(inv["stock"]) == [5, 3] and list(inv["in_stock"]) == [1, 1]


def _copies(frame: pd.DataFrame, n: int, columns: dict[str, Any]) -> pd.DataFrame:
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
    assert frame[S.RECENT_SELLER_DAYS].dtype == pd.ArrowDtype(pa.list_(pa.float32()))
    assert len(row[S.RECENT_SELLERS]) == len(row[S.RECENT_SELLER_DAYS])
    return list(row[S.RECENT_SELLERS]), np.asarray(row[S.RECENT_SELLER_DAYS], np.float32)


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
    assert frame[S.RECENT_SELLERS].dtype == pd.ArrowDtype(pa.list_(pa.int64()))


def test_seller_recency_keeps_the_50_most_recent_sellers_most_recent_first(tables):
    clicks = [(100 + j, _ts(2.0 + 0.01 * j)) for j in range(60)]  # seller 159 is the latest
    frame = FeatureBuilder(_clicked(tables, clicks)).user_seller_recency()
    sellers, days = _recency(frame, 0, 3)
    assert sellers == list(range(159, 109, -1))
    np.testing.assert_allclose(days, 1.0 - 0.01 * np.arange(59, 9, -1), atol=1e-5)
    assert (np.diff(days) > 0).all()
    sellers, _ = _recency(frame, 0, 2)
    assert sellers == [0]  # none of the 60 clicks is before the day-2 snapshot


def test_seller_recency_in_chunks_is_the_whole_build(tables):
    clicks = [(100 + j, _ts(2.0 + 0.37 * j)) for j in range(60)]
    b = FeatureBuilder(_clicked(tables, clicks))
    whole = b.user_seller_recency()
    for budget in (1, 40):
        pd.testing.assert_frame_equal(b.user_seller_recency(max_entries=budget), whole)


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


def test_tables_written_in_slices_read_back_whole(tables, tmp_path):
    from training.features import _write_parquet

    frame = FeatureBuilder(tables).user_seller_recency()
    _write_parquet(frame, tmp_path / "t.parquet", slice_rows=3)
    back = pq.read_table(tmp_path / "t.parquet")
    assert len(frame) > 6 and back.num_rows == len(frame)
    whole = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    assert back.equals(whole)
    assert len(pd.read_parquet(tmp_path / "t.parquet")) == len(frame)  # pandas reads it


@pytest.mark.parametrize(("stride", "chunk"), [(1, 10**9), (1, 400), (7, 300)])
def test_content_profile_is_the_weighted_window_of_unit_contents(tables, stride, chunk):
    """Chunked or not, daily or weekly snapshots: each (user, snapshot) row's profile is the
    unit-length sum of the unit contents of the items clicked (1) and bought (3) on the days
    in [s - 30, s), and of the items shown by an organic session
    (``content.ORGANIC_WEIGHT``, clicked or not), recomputed here event by event; empty
    without any. Its ``content_profile_weight`` is the weights' sum (0 without any)."""
    rng = np.random.default_rng(11)
    t = _random_engagement(tables, rng)
    imps = t[C.IMPRESSIONS]
    organic = rng.random(len(imps)) < 0.3
    imps[C.POLICY] = np.where(organic, C.POLICY_ORGANIC, imps[C.POLICY].to_numpy())
    t[C.ITEMS][C.CONTENT] = list(rng.normal(size=(len(t[C.ITEMS]), 6)).astype(np.float32))
    bought = t[C.CLICKS].sample(frac=0.2, random_state=3)
    t[C.PURCHASES] = pd.concat(
        [
            t[C.PURCHASES],
            pd.DataFrame(
                {
                    C.IMPRESSION_ID: bought[C.IMPRESSION_ID].to_numpy(),
                    C.TS: bought[C.TS].to_numpy(),
                    C.PRICE: 1.0,
                    C.QUANTITY: 1,
                }
            ),
        ],
        ignore_index=True,
    )
    b = FeatureBuilder(t, snapshot_days=stride)
    frame = b.user_content_profile(max_entries=chunk)
    unit = content.table_unit(t[C.ITEMS])
    item_row = pd.Index(t[C.ITEMS][C.ITEM_ID])
    imp = t[C.IMPRESSIONS].set_index(C.IMPRESSION_ID)
    events = pd.concat(
        [
            t[table][[C.IMPRESSION_ID, C.TS]].assign(w=w)
            for table, w in ((C.CLICKS, 1.0), (C.PURCHASES, affinity.PURCHASE_WEIGHT))
        ]
    ).join(imp[[C.USER_ID, C.ITEM_ID]], on=C.IMPRESSION_ID)
    searched = imps.loc[organic, [C.IMPRESSION_ID, C.TS, C.USER_ID, C.ITEM_ID]]
    assert len(searched) > 100
    events = pd.concat([events, searched.assign(w=content.ORGANIC_WEIGHT)], ignore_index=True)
    events["day"] = b.cal.day_of(to_ns(events[C.TS]))
    snap_of = {ts: k for k, ts in enumerate(from_ns(b.snap_ns))}
    engaged = 0
    for row in frame.itertuples(index=False):
        s = int(b.snaps[snap_of[getattr(row, S.EVENT_TIMESTAMP)]])
        mine = events[
            (events[C.USER_ID] == getattr(row, C.USER_ID))
            & (events["day"] >= s - content.WINDOW_DAYS)
            & (events["day"] < s)
        ]
        got = np.asarray(getattr(row, S.CONTENT_PROFILE), np.float32)
        weight = getattr(row, S.CONTENT_PROFILE_WEIGHT)
        if mine.empty:
            assert len(got) == 0 and weight == 0
            continue
        engaged += 1
        want = content.profile_of(unit[item_row.get_indexer(mine[C.ITEM_ID])], mine["w"].to_numpy())
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert weight == pytest.approx(mine["w"].sum(), rel=1e-6)
    assert engaged > 50
