"""The features service: the core without gRPC (hand-made tables, a fake online store), then
a real server on port 0 over the ``tiny_dataset`` Feast store (SQLite, materialized).

The served matrix is checked against the training path run on the same online values:
``store.get_online_features`` for every view -> ``training.dataset.fill_defaults``,
``contract.affinity.for_items`` (the rule training's rows are made with) and
``seller_days_for_items`` -> context columns computed by hand -> ``build_matrix``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from homefeed.common.v1 import common_pb2
from homefeed.features.v1 import features_pb2, features_pb2_grpc

from contract import affinity, content
from contract import columns as C
from contract.catalog import Catalog
from contract.feature_store import open_store
from contract.features import DAY_OF_WEEK, FEATURE_SCHEMA, HOUR, build_matrix
from contract.heuristic import Heuristic, heuristic_score
from contract.paths import REPO_ROOT, Paths
from feature_repo import schema as S
from services.common.online import (
    FastPathError,
    ProviderReader,
    SqliteReader,
    ViewRows,
    empty_rows,
    verify_reader,
)
from services.common.settings import ServerSettings, SettingsError
from services.common.users import USER_VIEWS
from services.features.assembler import (
    Assembler,
    RequestContext,
    UserFeatures,
    first_duplicate,
    seller_days_for_items,
)
from services.features.items import ITEM_VIEWS, ItemIndex, ItemStore
from services.features.server import SERVICE_NAME, create_server
from services.features.settings import FeaturesSettings
from training.dataset import fill_defaults
from training.dataset import seller_days_for_items as training_seller_days
from training.stages import read_meta
from training.tables import read_tables

TIMEOUT_S = 10.0
REFRESH_S = 0.2
INVENTORY_PUSH = "item_inventory_push"
WHEN = datetime(2026, 1, 14, 21, 30, tzinfo=UTC)  # a Wednesday: day_of_week 2, hour 21
COL = {name: j for j, name in enumerate(FEATURE_SCHEMA.names)}


def f32(values: list[float]) -> np.ndarray:
    return np.array(values, dtype=np.float32)


# --- the core, without gRPC or Feast ---------------------------------------------------------


def test_item_index_maps_known_ids_to_rows_and_the_rest_to_the_default_row() -> None:
    dense = ItemIndex(np.array([0, 1, 2, 5, 9], dtype=np.int64))
    sparse = ItemIndex(np.array([10, 10_000_000, 10**15], dtype=np.int64))
    assert dense.dense and not sparse.dense
    query = np.array([9, 5, 0, 3, 10, 2**40], dtype=np.int64)
    np.testing.assert_array_equal(dense.rows(query), [4, 3, 0, 5, 5, 5])
    query = np.array([10**15, 11, 10, 10_000_000, 0], dtype=np.int64)
    np.testing.assert_array_equal(sparse.rows(query), [2, 3, 0, 1, 3])
    assert ItemIndex(np.empty(0, np.int64)).rows(np.array([1, 2])).tolist() == [0, 0]


def test_first_duplicate_names_the_earliest_repeat_in_request_order() -> None:
    assert first_duplicate(np.array([3, 1, 2])) is None
    assert first_duplicate(np.array([7])) is None
    assert first_duplicate(np.array([9, 4, 8, 4, 9])) == (4, 1, 3)
    assert first_duplicate(np.array([5, 5])) == (5, 0, 1)


def test_seller_days_for_items_is_the_users_entry_or_365() -> None:
    recent, days = np.array([9, 4, 6], dtype=np.int64), f32([0.5, 2.0, 29.0])
    sellers = np.array([4, 5, 9, -1, 6], dtype=np.int64)  # -1: the unknown item's seller
    got = seller_days_for_items(recent, days, sellers)
    np.testing.assert_array_equal(got, f32([2.0, 365, 0.5, 365, 29.0]))
    empty = seller_days_for_items(np.empty(0, np.int64), f32([]), sellers)
    np.testing.assert_array_equal(empty, np.full(5, 365, np.float32))
    assert len(seller_days_for_items(recent, days, np.empty(0, np.int64))) == 0


def test_unknown_user_gets_schema_defaults() -> None:
    user = UserFeatures.from_rows({S.USER_PROFILE: None, S.USER_RECENT_ACTIVITY: None})
    assert not user.known
    assert len(user.affinity_categories) == 0 and len(user.affinity_weights) == 0
    assert user.affinity_total == 0.0 and user.values[S.AFFINITY_TOTAL] == 0.0
    assert user.values["country"] == "unknown" and user.values["recency_days"] == 365.0
    assert user.values["clicks_30d"] == 0 and user.values["views_24h"] == 0
    assert len(user.recent_sellers) == 0 and len(user.recent_seller_days) == 0
    assert user.content_profile.dtype == np.float32 and len(user.content_profile) == 0
    for name in (S.RECENT_SELLERS, S.AFFINITY_CATEGORIES, S.AFFINITY_WEIGHTS, S.CONTENT_PROFILE):
        assert name not in user.values  # lists are reduced per item, not user scalars
    # Redis's answer for a user it does not hold: a row whose every value is null
    nulls = {name: None for name in S.FEATURES[S.USER_PROFILE]}
    assert not UserFeatures.from_rows({S.USER_PROFILE: nulls}).known
    known = UserFeatures.from_rows(
        {
            S.USER_PROFILE: {"country": "DE", "clicks_30d": 4, "recency_days": None},
            S.USER_CATEGORY_AFFINITY: {
                S.AFFINITY_CATEGORIES: [5, 2],
                S.AFFINITY_WEIGHTS: [4.0, 1.0],
                S.AFFINITY_TOTAL: 6.0,
            },
            S.USER_SELLER_RECENCY: {S.RECENT_SELLERS: [3, 1], S.RECENT_SELLER_DAYS: [0.5, 2.0]},
        }
    )
    assert known.known and known.values["country"] == "DE" and known.values["clicks_30d"] == 4
    assert known.values["recency_days"] == 365.0  # a null value takes the default too
    assert known.affinity_categories.dtype == np.int64
    assert known.affinity_categories.tolist() == [5, 2]
    np.testing.assert_array_equal(known.affinity_weights, f32([4.0, 1.0]))
    assert known.affinity_total == 6.0 and known.values[S.AFFINITY_TOTAL] == 6.0
    # a row of nulls (Redis) or a row without lists: no engagement, the total's default
    empty = UserFeatures.from_rows(
        {S.USER_CATEGORY_AFFINITY: dict.fromkeys(S.FEATURES[S.USER_CATEGORY_AFFINITY])}
    )
    assert len(empty.affinity_categories) == 0 and empty.affinity_total == 0.0
    with pytest.raises(ValueError, match="aligned"):
        UserFeatures.from_rows(
            {S.USER_CATEGORY_AFFINITY: {S.AFFINITY_CATEGORIES: [1, 2], S.AFFINITY_WEIGHTS: [1.0]}}
        )
    assert known.recent_sellers.dtype == np.int64 and known.recent_sellers.tolist() == [3, 1]
    np.testing.assert_array_equal(known.recent_seller_days, f32([0.5, 2.0]))
    with pytest.raises(ValueError, match="aligned"):
        UserFeatures.from_rows({S.USER_SELLER_RECENCY: {S.RECENT_SELLERS: [3]}})


def test_request_context_is_utc_hour_and_monday_based_weekday() -> None:
    ctx = RequestContext.at(WHEN, "CHECKOUT")
    assert (ctx.hour_of_day, ctx.day_of_week, ctx.surface) == (21, 2, "CHECKOUT")
    assert pd.Timestamp(WHEN).dayofweek == 2  # training's add_context
    with pytest.raises(ValueError, match="surface"):
        RequestContext.at(WHEN, "SEARCH")


FRESH_S = 2**62  # a row stamped far in the future never expires


class FakeReader:
    """An online store in memory: view -> entity id -> feature -> value."""

    name = "fake"

    def __init__(
        self,
        data: dict[str, dict[int, dict[str, Any]]],
        stamps: dict[str, dict[int, int]] | None = None,
    ) -> None:
        self.data = data
        self.stamps = stamps or {}  # view -> entity -> event second (absent: FRESH_S)
        self.version = 0
        self.reads: list[str] = []
        self.fail = False

    def read_view(self, view: str, ids: np.ndarray) -> ViewRows:
        if self.fail:
            raise ConnectionError("store down")
        self.reads.append(view)
        out = empty_rows(view, len(ids))
        for j, entity in enumerate(ids.tolist()):
            row = self.data.get(view, {}).get(entity)
            if row is not None:
                out.found[j] = True
                out.event_s[j] = self.stamps.get(view, {}).get(entity, FRESH_S)
                for name, value in row.items():
                    out.columns[name][j] = value
        return out

    def changes(self) -> Hashable:
        return self.version


class FakeUsers:
    name = "fake"

    def __init__(self, users: dict[int, UserFeatures]) -> None:
        self.users = users

    def read(self, user_id: int, at_s: float | None = None) -> Any:
        raise AssertionError("the assembler reads no user: the servicer gives it one")


def _fake_store(**kwargs: Any) -> tuple[ItemStore, FakeReader, list[int]]:
    catalog = Catalog.from_columns(
        item_ids=[30, 10, 20],
        seller_ids=[2, 1, 1],
        categories=[2, 0, 1],
        prices=[10.0, 20.0, 40.0],
        margins=[0.5, 0.1, 0.25],
    )
    reader = FakeReader(
        {
            S.ITEM_STATS: {
                10: {
                    "category": 0,
                    "price": 20.0,
                    "clicks_7d": 3,
                    "age_days": 6.0,
                    "category_share": 0.5,
                },
                30: {
                    "category": 2,
                    "price": 10.0,
                    "clicks_7d": 0,
                    "age_days": 60.0,
                    "category_share": 0.125,
                },
            },
            S.SELLER_STATS: {1: {"seller_rating": 4.5, "seller_is_new": 1}},
            S.ITEM_INVENTORY: {10: {"stock": 5, "in_stock": 1}, 20: {"stock": 0, "in_stock": 0}},
        }
    )
    marker = [0]
    store = ItemStore(reader, catalog, Heuristic(), batch_marker=lambda: marker[0], **kwargs)
    store.load()
    return store, reader, marker


def test_item_table_joins_sellers_fills_defaults_and_scores_the_heuristic() -> None:
    store, _, _ = _fake_store()
    snap = store.snapshot()
    rows = snap.index.rows(np.array([10, 20, 30, 99], dtype=np.int64))
    f = snap.features
    np.testing.assert_array_equal(f["seller_rating"][rows], f32([4.5, 4.5, 4.0, 4.0]))
    np.testing.assert_array_equal(f["seller_is_new"][rows], [1, 1, 0, 0])
    # no inventory row reads as in stock (DEFAULTS); the unknown id too, but it is not known
    np.testing.assert_array_equal(f["in_stock"][rows], [1, 0, 1, 1])
    np.testing.assert_array_equal(snap.known[rows], [True, True, True, False])
    np.testing.assert_array_equal(snap.affinity_category[rows], [0, -1, 2, -1])
    # an item feature like any other: no row reads the default, 0
    np.testing.assert_array_equal(f["category_share"][rows], f32([0.5, 0, 0.125, 0]))
    np.testing.assert_array_equal(snap.values[rows], f32([2.0, 10.0, 5.0, 0.0]))
    np.testing.assert_array_equal(snap.categories[rows], [0, 1, 2, -1])
    expected = heuristic_score(np.array([3.0, 0.0, 0.0]), np.array([6.0, 0.0, 60.0]), 60.0)
    np.testing.assert_allclose(snap.heuristic[rows], [*expected, 0.0], rtol=1e-6)


def test_item_rows_past_their_ttl_are_served_as_training_joined_them() -> None:
    """An item_stats row older than the view's TTL at the request's time is no row, as in
    training's point-in-time join: the item gets the view's defaults, the others keep
    theirs; a request without a time (and HOMEFEED_TTL_CLOCK=request) checks nothing."""
    store, reader, _ = _fake_store()
    at = int(WHEN.timestamp())
    ttl = S.TTL_SECONDS[S.ITEM_STATS]
    reader.stamps = {
        S.ITEM_STATS: {10: at - ttl - 60, 30: at - 3600},
        S.SELLER_STATS: {1: at - 3600},
    }
    store.load()
    assembler = Assembler(store, FakeUsers({}))
    ids = np.array([10, 20, 30], dtype=np.int64)  # 20 has no item_stats row at all
    user = UserFeatures.unknown()
    stale = assembler.assemble(user, ids, RequestContext.at(WHEN, "HOME")).matrix
    fresh = assembler.assemble(user, ids, RequestContext.at(None, "HOME")).matrix
    item_stats = [COL[n] for n in S.FEATURES[S.ITEM_STATS] if n in COL]
    assert item_stats, "item_stats features are ranker inputs"
    np.testing.assert_array_equal(stale[0, item_stats], stale[1, item_stats])  # = no row
    assert not np.array_equal(fresh[0, item_stats], fresh[1, item_stats])
    np.testing.assert_array_equal(
        stale[2, item_stats], fresh[2, item_stats]
    )  # item 30's row is within its TTL
    # one second inside the TTL: the row is read
    inside = datetime.fromtimestamp(at - 61 + 1, tz=UTC)
    kept = assembler.assemble(user, ids, RequestContext.at(inside, "HOME")).matrix
    np.testing.assert_array_equal(kept[0, item_stats], fresh[0, item_stats])


def test_assembler_matrix_is_build_matrix_of_the_same_columns() -> None:
    store, _, _ = _fake_store()
    user = UserFeatures.from_rows(
        {
            S.USER_PROFILE: {"country": "GB", "device": "web", "avg_price_paid_30d": 25.0},
            # category 2 (item 30's) is not in the user's lists: it reads its prior alone
            S.USER_CATEGORY_AFFINITY: {
                S.AFFINITY_CATEGORIES: [1, 0],
                S.AFFINITY_WEIGHTS: [5.0, 3.0],
                S.AFFINITY_TOTAL: 10.0,
            },
            S.USER_SELLER_RECENCY: {S.RECENT_SELLERS: [2, 1], S.RECENT_SELLER_DAYS: [1.5, 3.0]},
        }
    )
    assembler = Assembler(store, FakeUsers({7: user}))
    ids = np.array([20, 99, 10, 30], dtype=np.int64)
    out = assembler.assemble(user, ids, RequestContext.at(WHEN, "HOME"))
    assert out.known_user and out.matrix.shape == (4, len(FEATURE_SCHEMA))
    np.testing.assert_array_equal(out.available, [False, False, True, True])
    np.testing.assert_array_equal(out.new_seller, [True, False, True, False])
    X = out.matrix
    # item 20 has no item_stats row and 99 is unknown: the uniform 1 / 3 (categories 0..2);
    # item 10 (category 0): (3 + s x 0.5) / (10 + s); item 30 (category 2, not listed):
    # (0 + s x 0.125) / (10 + s), with s = PRIOR_STRENGTH
    s = affinity.PRIOR_STRENGTH
    want = [1 / 3, 1 / 3, (3 + s * 0.5) / (10 + s), s * 0.125 / (10 + s)]
    np.testing.assert_allclose(X[:, COL[S.AFFINITY_FOR_ITEM]], f32(want), rtol=1e-6)
    assert (X[:, COL[S.AFFINITY_TOTAL]] == 10).all()  # a user feature of every row
    np.testing.assert_array_equal(X[:, COL["category_share"]], f32([0, 0, 0.5, 0.125]))
    # items 20 and 10 are seller 1's; 99 is unknown (no seller); 30 is seller 2's
    np.testing.assert_array_equal(X[:, COL[S.SELLER_DAYS_SINCE_ENGAGED]], f32([3.0, 365, 3.0, 1.5]))
    np.testing.assert_array_equal(X[:, COL["price"]], f32([0, 0, 20, 10]))
    np.testing.assert_array_equal(X[:, COL["price_to_avg_paid"]], f32([0, 0, 0.8, 0.4]))
    assert (X[:, COL[HOUR]] == 21).all() and (X[:, COL[DAY_OF_WEEK]] == 2).all()
    assert (X[:, COL["country_code"]] == C.COUNTRIES.index("GB")).all()
    assert (X[:, COL["surface_code"]] == C.SURFACES.index("HOME")).all()
    stranger = assembler.assemble(UserFeatures.unknown(), ids, RequestContext.at(WHEN, "HOME"))
    assert not stranger.known_user
    assert (stranger.matrix[:, COL["country_code"]] == len(C.COUNTRIES)).all()
    assert (stranger.matrix[:, COL["recency_days"]] == 365).all()
    assert (stranger.matrix[:, COL[S.SELLER_DAYS_SINCE_ENGAGED]] == 365).all()
    assert (stranger.matrix[:, COL[S.AFFINITY_TOTAL]] == 0).all()
    # no engagement: each item's category share (item 30's is 0.125); no row: uniform
    want = [1 / 3, 1 / 3, 0.5, 0.125]
    np.testing.assert_allclose(stranger.matrix[:, COL[S.AFFINITY_FOR_ITEM]], want, rtol=1e-6)


def test_category_affinity_for_item_is_contract_for_items_of_the_users_lists() -> None:
    """500 candidates over many categories, a user with 32 of them: the assembler's column
    is ``contract.affinity.for_items`` of the user's lists and the items' category and share."""
    rng = np.random.default_rng(5)
    n, n_categories = 600, 90
    categories = rng.integers(0, n_categories, n)
    shares = rng.uniform(0.001, 0.05, n_categories).astype(np.float32)
    catalog = Catalog.from_columns(
        item_ids=np.arange(n),
        seller_ids=np.zeros(n, np.int64),
        categories=categories,
        prices=np.ones(n),
        margins=np.ones(n),
    )
    stats = {
        i: {"category": int(categories[i]), "category_share": float(shares[categories[i]])}
        for i in range(0, n, 2)  # odd items have no item_stats row
    }
    store = ItemStore(FakeReader({S.ITEM_STATS: stats}), catalog, Heuristic())
    store.load()
    listed = rng.choice(n_categories, affinity.TOP_K, replace=False)
    weights = np.sort(rng.integers(1, 20, affinity.TOP_K).astype(np.float32))[::-1]
    total = float(weights.sum() + 7)  # the lighter categories beyond the top 32
    user = UserFeatures.from_rows(
        {
            S.USER_PROFILE: {"country": "US"},
            S.USER_CATEGORY_AFFINITY: {
                S.AFFINITY_CATEGORIES: listed.tolist(),
                S.AFFINITY_WEIGHTS: weights.tolist(),
                S.AFFINITY_TOTAL: total,
            },
        }
    )
    ids = rng.choice(n + 10, 500, replace=False).astype(np.int64)  # some unknown ids
    X = Assembler(store, FakeUsers({})).assemble(user, ids, RequestContext.at(WHEN, "HOME")).matrix
    item_category = np.array(
        [categories[i] if i < n and i % 2 == 0 else -1 for i in ids], dtype=np.int64
    )
    share = np.where(item_category >= 0, shares[np.maximum(item_category, 0)], 0)
    want = affinity.for_items(listed, weights, total, item_category, share, n_categories)
    np.testing.assert_array_equal(X[:, COL[S.AFFINITY_FOR_ITEM]], want)
    # by hand for a few: a listed category, an unlisted one, an item without a row
    weight_of = dict(zip(listed.tolist(), weights.tolist(), strict=True))
    s = affinity.PRIOR_STRENGTH
    for j in range(40):
        c = item_category[j]
        by_hand = (
            1 / n_categories
            if c < 0
            else (weight_of.get(int(c), 0.0) + s * shares[c]) / (total + s)
        )
        assert X[j, COL[S.AFFINITY_FOR_ITEM]] == pytest.approx(by_hand, rel=1e-5)
    assert (item_category[:40] < 0).any() and np.isin(item_category[:40], listed).any()


def test_content_affinity_for_item_is_contract_similarity_of_the_users_profile() -> None:
    """500 candidates of a catalogue with 16-d content: the assembler's column is
    ``contract.content.similarity`` of the user's profile and the items' unit content; 0 for
    an item without content, an unknown item (the default row), a user without a profile
    (or one of another width) and a catalogue without content."""
    rng = np.random.default_rng(8)
    n, dim = 700, 16
    raw = (rng.normal(size=(n, dim)) * rng.uniform(0.1, 5, (n, 1))).astype(np.float32)
    raw[3] = 0  # an item whose content is zero
    columns: dict[str, Any] = {
        "item_ids": np.arange(n),
        "seller_ids": np.zeros(n, np.int64),
        "categories": np.zeros(n, np.int64),
        "prices": np.ones(n),
        "margins": np.ones(n),
    }
    store = ItemStore(FakeReader({}), Catalog.from_columns(**columns, content=raw), Heuristic())
    store.load()
    space = content.similarity_space(np.arange(n), raw)  # the catalogue's, as training's
    assert store.snapshot().unit_content.shape == (n + 1, space.dim)
    profile = content.unit_rows(rng.normal(size=(1, space.dim)))[0]
    user = UserFeatures.from_rows(
        {
            S.USER_PROFILE: {"country": "US"},
            S.USER_CONTENT_PROFILE: {S.CONTENT_PROFILE: profile.tolist()},
        }
    )
    ids = np.array([*rng.choice(n, 498, replace=False), 3, n + 5], dtype=np.int64)
    ctx = RequestContext.at(WHEN, "HOME")
    assembler = Assembler(store, FakeUsers({}))
    got = assembler.assemble(user, ids, ctx).matrix[:, COL[S.CONTENT_AFFINITY_FOR_ITEM]]
    unit = space.unit(raw)[ids[:-1]]
    np.testing.assert_allclose(got[:-1], content.similarity(profile, unit), rtol=1e-6, atol=1e-7)
    # to the bit as training's rows compute it, one (user, item) row at a time
    one = np.zeros(1, np.int64), np.full(1, space.dim)
    rowwise = [content.similarity_rows(*one, profile, unit[j : j + 1])[0] for j in range(len(unit))]
    np.testing.assert_array_equal(got[:-1], np.array(rowwise, np.float32))
    assert got[-2] == 0 and got[-1] == 0  # zero content; unknown item
    # by hand: the cosine of the vectors in the catalogue's content space
    for j in range(20):
        c = (raw[ids[j]] - space.mean) @ space.projection
        by_hand = float(c @ profile / np.linalg.norm(c) / np.linalg.norm(profile))
        assert got[j] == pytest.approx(by_hand, abs=1e-5)
    assert np.abs(got).max() > 0.4 and (got < 0).any()
    row: dict[str, Any] | None
    for row in (None, {S.CONTENT_PROFILE: []}, {S.CONTENT_PROFILE: [0.25] * (space.dim + 1)}):
        other = UserFeatures.from_rows(
            {S.USER_PROFILE: {"country": "US"}, S.USER_CONTENT_PROFILE: row}
        )
        X = assembler.assemble(other, ids, ctx).matrix
        assert (X[:, COL[S.CONTENT_AFFINITY_FOR_ITEM]] == 0).all(), row
    plain = ItemStore(FakeReader({}), Catalog.from_columns(**columns), Heuristic())
    plain.load()  # a catalog.npz from before content: (n, 0)
    assert plain.snapshot().unit_content.shape == (n + 1, 0)
    X = Assembler(plain, FakeUsers({})).assemble(user, ids, ctx).matrix
    assert (X[:, COL[S.CONTENT_AFFINITY_FOR_ITEM]] == 0).all()


def test_refresh_swaps_inventory_and_skips_when_the_store_did_not_change() -> None:
    store, reader, marker = _fake_store()
    before = store.snapshot()
    reader.data[S.ITEM_INVENTORY][10] = {"stock": 0, "in_stock": 0}
    assert not store.refresh_inventory()  # changes() still reports the old version
    reader.version += 1
    assert store.refresh_inventory()
    after = store.snapshot()
    row = after.index.rows(np.array([10]))
    assert after.features["in_stock"][row][0] == 0
    assert before.features["in_stock"][row][0] == 1  # a reader's snapshot never changes
    assert after.features["price"] is before.features["price"]  # batch columns are shared
    reads = len(reader.reads)
    store.refresh_once()
    assert reader.reads[reads:] == [] and store.stats.inventory_skipped == 2
    marker[0] += 1  # a new materialization: the whole table reloads
    store.refresh_once()
    assert set(reader.reads[reads:]) == set(ITEM_VIEWS) and store.stats.batch_reloads == 2


def test_a_failed_refresh_keeps_the_last_table_and_the_thread_keeps_running() -> None:
    store, reader, _ = _fake_store(refresh_s=0.02)
    snap = store.snapshot()
    reader.fail = True
    reader.version += 1
    store.start()
    try:
        deadline = time.monotonic() + 5
        while store.stats.failures < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.stats.failures >= 2 and "store down" in store.stats.last_error
        assert store.snapshot() is snap
        reader.fail = False
        while store.stats.inventory_refreshes < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.stats.inventory_refreshes >= 1 and store.snapshot() is not snap
    finally:
        store.close()
    refreshes = store.stats.inventory_refreshes + store.stats.inventory_skipped
    time.sleep(REFRESH_S * 3)  # closed: no more ticks
    assert store.stats.inventory_refreshes + store.stats.inventory_skipped == refreshes


def test_a_fast_path_error_switches_to_the_fallback_reader() -> None:
    store, reader, _ = _fake_store()

    class Broken(FakeReader):
        name = "broken"

        def read_view(self, view: str, ids: np.ndarray) -> ViewRows:
            raise FastPathError("value_text missing")

    broken = Broken({})
    broken.version = -1  # reports a change, so the tick reads
    store.reader, store.fallback = broken, reader
    reader.data[S.ITEM_INVENTORY][10] = {"stock": 0, "in_stock": 0}
    store.refresh_once()
    assert store.reader is reader and store.fallback is None and store.stats.failures == 0
    snap = store.snapshot()
    assert snap.features["in_stock"][snap.index.rows(np.array([10]))][0] == 0
    store.reader = broken
    store.refresh_once()  # no fallback left: a failure, the table stays
    assert store.stats.failures == 1 and store.snapshot() is snap


def test_verify_reader_reports_the_first_difference() -> None:
    _, reader, _ = _fake_store()
    other = FakeReader({**reader.data, S.SELLER_STATS: {1: {"seller_rating": 3.0}}})
    ids = np.array([1, 2], dtype=np.int64)
    assert verify_reader(reader, reader, ids, [S.SELLER_STATS]) is None
    assert verify_reader(reader, other, ids, [S.SELLER_STATS]) == (
        "seller_stats.seller_rating: values differ"
    )


def test_settings_name_the_variable_that_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("HOMEFEED_FEATURES_") or name in ("HOMEFEED_ONLINE_STORE",):
            monkeypatch.delenv(name)
    assert FeaturesSettings.from_env().refresh_s == 2.0
    monkeypatch.setenv("HOMEFEED_ONLINE_STORE", "redis")
    monkeypatch.delenv("HOMEFEED_REDIS", raising=False)
    with pytest.raises(SettingsError, match="HOMEFEED_REDIS is required"):
        FeaturesSettings.from_env()
    monkeypatch.setenv("HOMEFEED_ONLINE_STORE", "cassandra")
    with pytest.raises(SettingsError, match="HOMEFEED_ONLINE_STORE must be one of sqlite, redis"):
        FeaturesSettings.from_env()
    monkeypatch.setenv("HOMEFEED_ONLINE_STORE", "sqlite")
    monkeypatch.setenv("HOMEFEED_FEATURES_REFRESH_S", "0")
    with pytest.raises(SettingsError, match="HOMEFEED_FEATURES_REFRESH_S"):
        FeaturesSettings.from_env()


def test_main_exits_with_the_settings_error() -> None:
    env = {**os.environ, "HOMEFEED_ONLINE_STORE": "redis", "HOMEFEED_REDIS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "services.features"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "HOMEFEED_REDIS is required" in proc.stderr


# --- a real server over the tiny dataset's Feast store -----------------------------------------


@dataclass(frozen=True)
class Served:
    stub: features_pb2_grpc.FeaturesServiceStub
    channel: grpc.Channel
    items: ItemStore
    store: Any  # the test's own FeatureStore (reads for expectations, pushes)
    catalog: pd.DataFrame
    recency_days: float


@pytest.fixture(scope="module")
def served(tiny_dataset: dict, tiny_trained: dict, home: Paths) -> Iterator[Served]:
    dataset = tiny_dataset["dataset"]
    settings = FeaturesSettings(
        server=ServerSettings(port=0, max_workers=4),
        home=home.home,
        dataset=dataset,
        refresh_s=REFRESH_S,
    )
    server, port, items = create_server(settings)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    catalog = read_tables(home.raw(dataset), [C.ITEMS])[C.ITEMS]
    try:
        yield Served(
            stub=features_pb2_grpc.FeaturesServiceStub(channel),
            channel=channel,
            items=items,
            store=open_store(dataset, paths=home, online="sqlite"),
            catalog=catalog,
            recency_days=float(read_meta(home, dataset)["config"]["recency_days"]),
        )
    finally:
        channel.close()
        server.stop(0).wait()
        items.close()


def _request(
    item_ids: list[int], user_id: int = 0, surface: int = common_pb2.SURFACE_HOME, **fields: Any
) -> features_pb2.GetFeaturesRequest:
    stamp = Timestamp()
    stamp.FromDatetime(WHEN)
    request = features_pb2.GetFeaturesRequest(
        request_id="t", user_id=user_id, item_ids=item_ids, surface=surface
    )
    request.context.time.CopyFrom(stamp)
    for name, value in fields.items():
        if hasattr(value, "DESCRIPTOR"):  # a message field is copied into place
            getattr(request, name).CopyFrom(value)
        else:
            setattr(request, name, value)
    return request


def _get(served: Served, request: features_pb2.GetFeaturesRequest) -> Any:
    response = served.stub.GetFeatures(request, timeout=TIMEOUT_S)
    X = np.array(response.features.values, dtype=np.float32)
    return response, X.reshape(response.features.rows, response.features.cols)


def _expected(
    served: Served, user_id: int, item_ids: list[int], surface: str
) -> tuple[np.ndarray, pd.DataFrame]:
    """Training's path on the online values: the matrix, and the filled frame."""
    seller = dict(zip(served.catalog[C.ITEM_ID], served.catalog[C.SELLER_ID], strict=True))
    rows = [
        {C.USER_ID: user_id, C.ITEM_ID: i, C.SELLER_ID: int(seller.get(i, -1))} for i in item_ids
    ]
    got = served.store.get_online_features(features=S.feature_refs(), entity_rows=rows).to_dict(
        include_event_timestamps=True
    )
    # training's join finds a row only within its view's TTL of the request (WHEN)
    for view, features in S.FEATURES.items():
        for name in features:
            stamps = got.pop(name + "__ts")
            got[name] = [
                None if S.expired(view, stamp, WHEN.timestamp()) else value
                for value, stamp in zip(got[name], stamps, strict=True)
            ]
    # every row carries the same user's lists
    affinity_categories = got.pop(S.AFFINITY_CATEGORIES)[0]
    affinity_weights = got.pop(S.AFFINITY_WEIGHTS)[0]
    sellers = pa.array(got.pop(S.RECENT_SELLERS), type=pa.list_(pa.int64()))
    days = pa.array(got.pop(S.RECENT_SELLER_DAYS), type=pa.list_(pa.float32()))
    profile = got.pop(S.CONTENT_PROFILE)[0]
    frame = pd.DataFrame(got)
    category = frame["category"].fillna(-1).to_numpy(np.int64)
    share = frame["category_share"].fillna(0).to_numpy(np.float64)
    total = frame[S.AFFINITY_TOTAL].fillna(0).to_numpy(np.float64)
    n_categories = int(served.catalog[C.CATEGORY].max()) + 1
    frame[S.AFFINITY_FOR_ITEM] = affinity.for_items(
        affinity_categories, affinity_weights, total[0], category, share, n_categories
    )
    item_seller = np.array([row[C.SELLER_ID] for row in rows], dtype=np.int64)
    frame[S.SELLER_DAYS_SINCE_ENGAGED] = training_seller_days(sellers, days, item_seller)
    frame[S.CONTENT_AFFINITY_FOR_ITEM] = _content_affinity(served, profile, item_ids)
    frame = fill_defaults(frame)
    frame[HOUR] = 21  # WHEN, by hand
    frame[DAY_OF_WEEK] = 2
    frame[C.SURFACE] = surface
    return build_matrix(frame), frame


def _content_affinity(served: Served, profile: list[float] | None, item_ids: list[int]) -> Any:
    """Training's rule on the items table's content: ``similarity_rows`` of the profile and
    each item's unit content (an item the table does not list has none)."""
    items = served.catalog
    pos = pd.Index(items[C.ITEM_ID]).get_indexer(pd.Index(item_ids))
    unit = np.where((pos >= 0)[:, None], content.table_unit(items)[pos], np.float32(0))
    values = np.asarray(profile if profile is not None else [], np.float32)
    n = len(item_ids)
    return content.similarity_rows(np.zeros(n, np.int64), np.full(n, len(values)), values, unit)


def _assert_same_columns(served_X: np.ndarray, expected_X: np.ndarray) -> None:
    assert served_X.shape == expected_X.shape
    for name, j in COL.items():
        np.testing.assert_array_equal(served_X[:, j], expected_X[:, j], err_msg=name)


@pytest.fixture(scope="module")
def known_user(served: Served, tiny_dataset: dict, home: Paths) -> int:
    """A user with a profile, category affinity lists and recent activity online."""
    features = home.features(tiny_dataset["dataset"])
    active = pd.read_parquet(features / f"{S.USER_RECENT_ACTIVITY}.parquet")
    candidates = active.loc[active["views_24h"] > 0, C.USER_ID].unique()[:2000].tolist()
    got = served.store.get_online_features(
        features=["user_profile:clicks_30d", "user_recent_activity:views_24h"],
        entity_rows=[{C.USER_ID: int(u)} for u in candidates],
    ).to_dict(include_event_timestamps=True)
    at = WHEN.timestamp()
    for user, clicks, views, stamp in zip(
        candidates, got["clicks_30d"], got["views_24h"], got["views_24h__ts"], strict=True
    ):  # recent views still within the view's 24 h TTL at the requests' time
        if clicks and views and not S.expired(S.USER_RECENT_ACTIVITY, stamp, at):
            return int(user)
    raise AssertionError("no user of sim-tiny has clicks and recent views online at WHEN")


def _recent_sellers(served: Served, user_id: int) -> tuple[list[int], list[float]]:
    got = served.store.get_online_features(
        features=[f"{S.USER_SELLER_RECENCY}:{n}" for n in S.FEATURES[S.USER_SELLER_RECENCY]],
        entity_rows=[{C.USER_ID: user_id}],
    ).to_dict()
    return got[S.RECENT_SELLERS][0] or [], got[S.RECENT_SELLER_DAYS][0] or []


def _some_items(served: Served, n: int, seed: int) -> list[int]:
    ids = served.catalog[C.ITEM_ID].to_numpy()
    return np.random.default_rng(seed).choice(ids, n, replace=False).tolist()


def test_health_reports_serving(served: Served) -> None:
    stub = health_pb2_grpc.HealthStub(served.channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_user_features_in_the_request_replace_the_stores_read(
    served: Served, known_user: int
) -> None:
    from services.common.users import ProviderUserReader, to_proto

    items = _some_items(served, 30, seed=4)
    read_here, X = _get(served, _request(items, user_id=known_user))
    # the rows as of the request's time: a view row past its TTL then reads as no row
    rows = ProviderUserReader(served.store).read(known_user, WHEN.timestamp())
    # another user id: the features come from the request, not from a read of that id
    passed, Y = _get(served, _request(items, user_id=10**15, user=to_proto(rows)))
    assert read_here.known_user and passed.known_user
    np.testing.assert_array_equal(X, Y)
    bad = common_pb2.UserFeatures(known=True, number_names=["shoe_size"], number_values=[42])
    with pytest.raises(grpc.RpcError) as caught:
        _get(served, _request(items, user_id=known_user, user=bad))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "number user features, got 'shoe_size'" in caught.value.details()


def test_known_user_matrix_equals_training_path_on_online_values(
    served: Served, known_user: int
) -> None:
    unknown_items = [int(served.catalog[C.ITEM_ID].max()) + 1, 10**12]
    recent, recent_days = _recent_sellers(served, known_user)
    assert recent, "the known user clicked in 30 days: their seller list is not empty"
    # an item of each of the user's first 5 sellers, then random ones (their sellers mostly not)
    of_recent = served.catalog.drop_duplicates(C.SELLER_ID).set_index(C.SELLER_ID)
    listed = of_recent.loc[recent[:5], C.ITEM_ID].tolist()
    others = [i for i in _some_items(served, 60, seed=1) if i not in listed]
    item_ids = listed + others + unknown_items
    request = _request(item_ids, user_id=known_user, surface=common_pb2.SURFACE_CHECKOUT)
    request.context.country = "DE"  # not a feature: the profile's country is (as in training)
    request.context.device = "ios"
    response, X = _get(served, request)
    expected_X, frame = _expected(served, known_user, item_ids, "CHECKOUT")
    _assert_same_columns(X, expected_X)

    assert response.known_user
    assert list(response.feature_names) == []  # only on request
    request.include_feature_names = True
    assert list(_get(served, request)[0].feature_names) == list(FEATURE_SCHEMA.names)
    assert response.features.schema_hash == FEATURE_SCHEMA.hash
    assert frame["views_24h"].iloc[0] > 0 and (frame["clicks_30d"] > 0).all()
    assert X[0, COL["country_code"]] == C.COUNTRIES.index(frame["country"].iloc[0])
    assert (X[:, COL["surface_code"]] == C.SURFACES.index("CHECKOUT")).all()
    for_item = X[:, COL[S.AFFINITY_FOR_ITEM]]
    assert len(np.unique(for_item[:-2])) > 1  # the user's own shares, not the uniform prior
    assert frame[S.AFFINITY_TOTAL].iloc[0] > 0  # the known user engaged in 30 days
    # ... so they have a content profile: real cosines, 0 for the unknown items
    by_content = X[:, COL[S.CONTENT_AFFINITY_FOR_ITEM]]
    assert (by_content[:-2] != 0).all() and (by_content[-2:] == 0).all()
    listed = served.store.get_online_features(
        features=[f"{S.USER_CATEGORY_AFFINITY}:{S.AFFINITY_CATEGORIES}"],
        entity_rows=[{C.USER_ID: known_user}],
    ).to_dict()[S.AFFINITY_CATEGORIES][0]
    assert listed, "the known user has affinity lists online"
    in_listed = np.isin(frame["category"].fillna(-1).to_numpy(np.int64), listed)
    # a listed category's share is above its prior alone: the user's weight counts
    prior = (
        affinity.PRIOR_STRENGTH
        * frame["category_share"].to_numpy()
        / (frame[S.AFFINITY_TOTAL].to_numpy() + affinity.PRIOR_STRENGTH)
    )
    assert in_listed.any() and (for_item[in_listed] > prior[in_listed]).all()
    seller_days = X[:, COL[S.SELLER_DAYS_SINCE_ENGAGED]]
    np.testing.assert_allclose(seller_days[: len(listed)], recent_days[: len(listed)], rtol=1e-6)
    assert (seller_days[len(listed) :] == 365).any()  # sellers the user did not engage

    catalog = served.catalog.set_index(C.ITEM_ID).reindex(item_ids)
    known = catalog[C.PRICE].notna().to_numpy()
    price = catalog[C.PRICE].fillna(0).to_numpy()
    margin = catalog[C.MARGIN].fillna(0).to_numpy()
    np.testing.assert_array_equal(response.prices, price.astype(np.float32))
    np.testing.assert_array_equal(response.values, (price * margin).astype(np.float32))
    np.testing.assert_array_equal(
        response.categories, catalog[C.CATEGORY].fillna(-1).to_numpy(np.int64)
    )
    np.testing.assert_array_equal(response.available, known & (frame["in_stock"] == 1))
    np.testing.assert_array_equal(response.new_seller, frame["seller_is_new"] == 1)
    score = heuristic_score(
        frame["clicks_7d"].to_numpy(np.float64),
        frame["age_days"].to_numpy(np.float64),
        served.recency_days,
    )
    np.testing.assert_allclose(response.heuristic_scores, np.where(known, score, 0), rtol=1e-6)


def test_unknown_user_gets_defaults_and_unknown_items_are_unavailable(served: Served) -> None:
    stranger = 10**15
    item_ids = [int(served.catalog[C.ITEM_ID].max()) + 7, *_some_items(served, 5, seed=2)]
    response, X = _get(served, _request(item_ids, user_id=stranger))
    expected_X, _ = _expected(served, stranger, item_ids, "HOME")
    _assert_same_columns(X, expected_X)
    assert not response.known_user and len(response.available) == len(item_ids)
    assert not response.available[0] and response.categories[0] == -1
    assert response.values[0] == 0 and response.heuristic_scores[0] == 0
    # no affinity row: each item reads its category's share of everyone's engagement, the
    # unknown item (no item_stats row) the uniform 1 / n_categories
    n_categories = int(served.catalog[C.CATEGORY].max()) + 1
    for_item = X[:, COL[S.AFFINITY_FOR_ITEM]]
    assert for_item[0] == np.float32(1 / n_categories)
    np.testing.assert_allclose(for_item[1:], X[1:, COL["category_share"]], rtol=1e-6)
    assert (X[:, COL[S.AFFINITY_TOTAL]] == 0).all()
    assert (X[:, COL[S.CONTENT_AFFINITY_FOR_ITEM]] == 0).all()  # no profile
    assert (X[:, COL["country_code"]] == len(C.COUNTRIES)).all()
    assert (X[:, COL["recency_days"]] == 365).all()


def _push_inventory(store: Any, item_id: int, stock: int, in_stock: int) -> None:
    now = pd.Timestamp.now(tz="UTC").as_unit("us")
    frame = pd.DataFrame(
        {
            C.ITEM_ID: [item_id],
            S.EVENT_TIMESTAMP: [now],
            "stock": [stock],
            "in_stock": [in_stock],
            S.CREATED: [now],
        }
    )
    store.push(INVENTORY_PUSH, frame)


def _wait_for(check: Callable[[], bool], seconds: float) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"condition not met within {seconds} s")
        time.sleep(REFRESH_S / 10)
    return time.monotonic() - started


def test_an_out_of_stock_push_makes_the_item_unavailable_within_refreshes(
    served: Served,
) -> None:
    item_ids = _some_items(served, 20, seed=3)
    response, _ = _get(served, _request(item_ids))
    rows = [{C.ITEM_ID: i} for i in item_ids]
    inventory = served.store.get_online_features(
        features=["item_inventory:stock", "item_inventory:in_stock"], entity_rows=rows
    ).to_dict()
    k = next(
        k
        for k, ok in enumerate(response.available)
        if ok and inventory["in_stock"][k] == 1 and inventory["stock"][k]
    )
    item, stock = item_ids[k], int(inventory["stock"][k])

    def available() -> bool:
        return bool(_get(served, _request([item]))[0].available[0])

    _push_inventory(served.store, item, 0, 0)
    try:
        waited = _wait_for(lambda: not available(), seconds=10 * REFRESH_S)
        assert waited <= 10 * REFRESH_S
        response, X = _get(served, _request([item]))
        assert X[0, COL["stock"]] == 0 and X[0, COL["in_stock"]] == 0
    finally:
        _push_inventory(served.store, item, stock, 1)  # other tests share the store
    _wait_for(available, seconds=10 * REFRESH_S)


def test_sqlite_fast_path_reads_what_feast_online_read_reads(served: Served) -> None:
    assert served.items.reader.name == "sqlite"
    reader = served.items.reader
    assert isinstance(reader, SqliteReader)
    ids = served.catalog[C.ITEM_ID].to_numpy(np.int64)
    everything = np.concatenate([ids[::-1], [ids.max() + 1]])  # a table scan
    a_few = np.concatenate([ids[::97], [ids.max() + 1]])  # primary-key lookups
    assert len(a_few) < 100 < 1000 < len(everything)
    provider = ProviderReader(served.store)
    assert verify_reader(reader, provider, everything, ITEM_VIEWS) is None
    assert verify_reader(reader, provider, a_few, ITEM_VIEWS) is None
    assert reader.read_view(S.ITEM_STATS, a_few).found[:-1].any()


def test_schema_hash_mismatch_is_failed_precondition(served: Served) -> None:
    other = "0" * 64
    with pytest.raises(grpc.RpcError) as err:
        _get(served, _request([1, 2], schema_hash=other))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert other in str(err.value.details()) and FEATURE_SCHEMA.hash in str(err.value.details())
    response, _ = _get(served, _request([1, 2], schema_hash=FEATURE_SCHEMA.hash))
    assert response.features.rows == 2


def _with_context(**fields: Any) -> features_pb2.GetFeaturesRequest:
    request = _request([1, 2])
    for name, value in fields.items():
        setattr(request.context, name, value)
    return request


def _bad_time() -> features_pb2.GetFeaturesRequest:
    request = _request([1, 2])
    request.context.time.nanos = -1
    return request


@pytest.mark.parametrize(
    ("request_factory", "message"),
    [
        (lambda: _request([]), "item_ids must have at least 1"),
        (lambda: _request(list(range(2001))), "item_ids must have at most 2000"),
        (lambda: _request([4, -3]), "item_ids must be non-negative"),
        (lambda: _request([1, 8, 2, 8, 1]), "must be unique, got item 8 at positions 1 and 3"),
        (lambda: _request([1], user_id=-5), "user_id must be 0..9223372036854775807, got -5"),
        (lambda: _request([1], surface=common_pb2.SURFACE_UNSPECIFIED), "surface must be one of"),
        (lambda: _request([1], surface=7), "surface must be one of"),
        (lambda: _with_context(country="de"), "context.country must be empty or an ISO"),
        (lambda: _with_context(device="tv"), "context.device must be empty or one of"),
        (_bad_time, "context.time.nanos must be 0..999999999, got -1"),
        (lambda: _request([1], request_id="x" * 129), "request_id must be at most 128"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(
    served: Served, request_factory: Callable[[], features_pb2.GetFeaturesRequest], message: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        served.stub.GetFeatures(request_factory(), timeout=TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in str(err.value.details())


def test_unset_time_means_now(served: Served) -> None:
    request = _request([1])
    request.ClearField("context")
    before = datetime.now(UTC)
    _, X = _get(served, request)
    after = datetime.now(UTC)
    assert X[0, COL[HOUR]] in {before.hour, after.hour}
    assert X[0, COL[DAY_OF_WEEK]] in {before.weekday(), after.weekday()}


# --- training-serving skew: the served rows against training's recomputation ----------------


def _untouched(served: Served, view: str, key: str, ids: np.ndarray, offline: pd.DataFrame) -> list:
    """Of ``ids``, those whose online row is the one materialized from ``offline`` (other
    tests push to the shared store; a pushed row is not the offline table's)."""
    last = offline.sort_values(S.EVENT_TIMESTAMP).drop_duplicates(key, keep="last")
    seconds = [int(t.timestamp()) for t in last[S.EVENT_TIMESTAMP]]
    stamp = dict(zip(last[key], seconds, strict=True))
    first = next(iter(S.FEATURES[view]))
    got = served.store.get_online_features(
        features=[f"{view}:{first}"], entity_rows=[{key: int(i)} for i in ids]
    ).to_dict(include_event_timestamps=True)
    return [
        int(i)
        for i, ts in zip(ids, got[first + "__ts"], strict=True)
        if int(i) in stamp and ts == stamp[int(i)]
    ]


def _served_rows(
    served: Served, users: list[int], items: list[int], when: datetime, rows_of: Any = None
) -> pd.DataFrame:
    """GetFeatures for each user at ``when``, logged as the gateway logs a sampled feed:
    request id, user, time, surface, item and the matrix's columns. ``rows_of(user)``: user
    rows to pass in the request instead of the service's own read."""
    frames = []
    for user in users:
        request = _request(items, user_id=user)
        request.context.time.FromDatetime(when)
        if rows_of is not None:
            from services.common.users import to_proto

            request.user.CopyFrom(to_proto(rows_of(user)))
        _, X = _get(served, request)
        frame = pd.DataFrame(X, columns=list(FEATURE_SCHEMA.names))
        frame.insert(0, "item_id", items)
        frame.insert(0, "surface", "HOME")
        frame.insert(0, "ts", pd.Timestamp(when))
        frame.insert(0, "user_id", user)
        frame.insert(0, "request_id", f"r{user}")
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def test_the_skew_check_proves_serving_matches_training_and_flags_what_does_not(
    served: Served, tiny_dataset: dict, home: Paths
) -> None:
    """Rows the service serves at the data's "now", recomputed by training's path
    (``training.skew``: Feast's point-in-time join, the stream views from the events): every
    feature agrees. 9 days later the batch views are past their TTL: serving reads them as
    missing, as the join does, and they still agree; served as Feast's online read returns
    them (no TTL), the user views are flagged. A feature computed differently online is
    flagged alone."""
    from services.common.users import ProviderUserReader
    from training.monitor import MonitorThresholds, training_serving_skew
    from training.skew import KEYS, recompute_rows

    dataset = tiny_dataset["dataset"]
    tables = read_tables(home.raw(dataset))
    features = home.features(dataset)
    profile = pd.read_parquet(features / f"{S.USER_PROFILE}.parquet", columns=[S.EVENT_TIMESTAMP])
    now = (profile[S.EVENT_TIMESTAMP].max() + pd.Timedelta(hours=1)).to_pydatetime()
    activity = pd.read_parquet(features / f"{S.USER_RECENT_ACTIVITY}.parquet")
    fresh = activity[activity[S.EVENT_TIMESTAMP] > pd.Timestamp(now) - pd.Timedelta(hours=20)]
    active = _untouched(
        served, S.USER_RECENT_ACTIVITY, C.USER_ID, fresh[C.USER_ID].unique(), activity
    )[:3]
    assert active, "sim-tiny has users with clicks in the last 20 h of its data"
    rng = np.random.default_rng(11)
    others = rng.choice(tables[C.USERS][C.USER_ID].to_numpy(), 3, replace=False).tolist()
    inventory = pd.read_parquet(features / f"{S.ITEM_INVENTORY}.parquet")
    items = _untouched(
        served,
        S.ITEM_INVENTORY,
        C.ITEM_ID,
        rng.choice(served.catalog[C.ITEM_ID].to_numpy(), 60, replace=False),
        inventory,
    )[:40]
    users = [*active, *[u for u in others if u not in active], 10**12]  # and an unknown user
    no_events = pd.DataFrame(
        {"kind": [], "user_id": [], "item_id": [], "ts": pd.to_datetime([], utc=True), "stock": []}
    )
    names = list(FEATURE_SCHEMA.names)
    thresholds = MonitorThresholds()

    def skew(rows: pd.DataFrame) -> tuple[list[str], dict[str, Any]]:
        recomputed = recompute_rows(served.store, tables, rows, no_events)
        _, coverage, flags = training_serving_skew(rows, recomputed, KEYS, names, thresholds)
        return sorted(f["name"] for f in flags), coverage

    rows = _served_rows(served, users, items, now)
    assert (rows["views_24h"] > 0).any() and (rows[S.AFFINITY_FOR_ITEM] > 0).any()
    flagged, coverage = skew(rows)
    assert flagged == [] and coverage["coverage"] == 1.0

    planted = rows.copy()
    planted["price"] = planted["price"] * 1.1  # one feature computed differently online
    assert skew(planted)[0] == ["price"]

    later = now + pd.Timedelta(days=S.SNAPSHOT_TTL_DAYS + 1)
    expired = _served_rows(served, users, items, later)
    assert (expired["clicks_30d"] == 0).all()  # the profile is past its TTL: no row
    assert skew(expired)[0] == []
    reader = ProviderUserReader(served.store)
    stale = _served_rows(served, users, items, later, rows_of=reader.read)  # no TTL applied
    flagged = skew(stale)[0]
    assert "clicks_30d" in flagged
    user_features = {n for v in USER_VIEWS for n in S.FEATURES[v]} | {
        S.AFFINITY_FOR_ITEM,
        S.SELLER_DAYS_SINCE_ENGAGED,
        S.CONTENT_AFFINITY_FOR_ITEM,
        "content_affinity_expected",
        "country_code",
        "device_code",
        "price_to_avg_paid",
        "price_to_spend_band",
        "spend_band_code",
    }
    assert set(flagged) <= user_features, set(flagged) - user_features
