"""The real Feast store: apply, point-in-time retrieval (no leakage), materialization and
push to the SQLite and Redis online stores."""

from __future__ import annotations

import pandas as pd
import pytest

from contract import columns as C
from contract.feature_store import open_store
from contract.paths import Paths
from feature_repo import schema as S
from tests.handmade import ts
from training import feature_store
from training.features import build_feature_tables


def _store(tmp_path, tables, dataset="hand", online="sqlite", redis=None):
    paths = Paths(tmp_path)
    build_feature_tables(tables, paths.features(dataset))
    store = open_store(dataset, paths=paths, online=online, redis=redis)
    applied = feature_store.apply(store)
    assert f"FeatureService:{S.RANKER_SERVICE}" in applied
    return store


def _historical(store, rows: list[tuple[int, int, pd.Timestamp]]) -> pd.DataFrame:
    entity = pd.DataFrame(rows, columns=[C.USER_ID, C.ITEM_ID, C.EVENT_TIMESTAMP])
    entity[C.SELLER_ID] = 0
    entity[C.EVENT_TIMESTAMP] = entity[C.EVENT_TIMESTAMP].dt.as_unit("us")
    service = store.get_feature_service(S.RANKER_SERVICE)
    out = store.get_historical_features(entity_df=entity, features=service).to_df()
    return out.sort_values(C.EVENT_TIMESTAMP).reset_index(drop=True)


def test_an_event_after_the_impression_never_leaks_into_its_features(tmp_path, tables):
    """Plant a click one second after impression 2 (user 0, day 0.5): the impression's
    features are the same with and without it, and a row two seconds later does see it."""
    shown_at = ts(0.5)
    before = _historical(_store(tmp_path / "a", tables), [(0, 0, shown_at)])

    planted = {k: v.copy() for k, v in tables.items()}
    planted[C.IMPRESSIONS] = pd.concat(
        [
            planted[C.IMPRESSIONS],
            pd.DataFrame(
                {
                    C.IMPRESSION_ID: [9],
                    C.REQUEST_ID: [9],
                    C.USER_ID: [0],
                    C.ITEM_ID: [0],
                    C.POSITION: [1],
                    C.SURFACE: ["HOME"],
                    C.TS: [shown_at + pd.Timedelta(seconds=1)],
                    C.POLICY: ["heuristic"],
                    C.PROPENSITY: [0.5],
                }
            ),
        ],
        ignore_index=True,
    )
    planted[C.CLICKS] = pd.concat(
        [
            planted[C.CLICKS],
            pd.DataFrame({C.IMPRESSION_ID: [9], C.TS: [shown_at + pd.Timedelta(seconds=1)]}),
        ],
        ignore_index=True,
    )
    store = _store(tmp_path / "b", planted)
    after = _historical(store, [(0, 0, shown_at), (0, 0, shown_at + pd.Timedelta(seconds=2))])

    lists = {name for feats in S.FEATURES.values() for name, kind in feats.items() if "[]" in kind}
    features = [f for feats in S.FEATURES.values() for f in feats if f not in lists]
    pd.testing.assert_frame_equal(before[features], after.loc[[0], features])
    assert before.loc[0, "views_24h"] == 1  # the click at day 0.11 only
    assert after.loc[1, "views_24h"] == 2  # the planted click, visible once it happened


def test_snapshot_features_come_from_the_last_snapshot_at_or_before_the_event(tmp_path, tables):
    store = _store(tmp_path, tables)
    out = _historical(store, [(0, 0, ts(0.9)), (0, 0, ts(1.0)), (0, 0, ts(4.5)), (0, 0, ts(12.5))])
    # day-0 snapshot, day-1 snapshot, day-4 snapshot (the last), then past the 8-day TTL
    assert out["clicks_7d"].tolist()[:3] == [0, 2, 2] and pd.isna(out["clicks_7d"].iloc[3])
    assert out["purchases_30d"].tolist()[:3] == [0, 0, 1]
    assert out["stock"].tolist() == [5, 5, 3, 3]  # inventory: ttl 0, the last change stays true
    # seller lists: empty at day 0, then seller 0 (last engaged day 1.2), then past the TTL
    assert [list(v) for v in out[S.RECENT_SELLERS].iloc[:3]] == [[], [0], [0]]
    assert out[S.RECENT_SELLER_DAYS].iloc[2][0] == pytest.approx(2.8, abs=1e-5)
    assert out[S.RECENT_SELLERS].iloc[3] is None


def test_unknown_entities_keep_their_rows(tmp_path, tables):
    store = _store(tmp_path, tables)
    out = _historical(store, [(77, 1, ts(2.0)), (0, 0, ts(2.0))])
    assert len(out) == 2 and out["days_since_signup"].isna().sum() == 1


def _online_roundtrip(store) -> None:
    feature_store.materialize(store, ts(5), start=ts(-30))
    row = store.get_online_features(
        features=store.get_feature_service(S.RANKER_SERVICE),
        entity_rows=[{C.USER_ID: 0, C.ITEM_ID: 0, C.SELLER_ID: 0}],
    ).to_dict()
    assert (
        row["purchases_30d"] == [1]
        and row["stock"] == [3]
        and row["seller_rating"][0] == pytest.approx(4.5)
        and row[S.RECENT_SELLERS] == [[0]]
        and row[S.RECENT_SELLER_DAYS][0] == pytest.approx([2.8], abs=1e-5)
    )
    store.push(
        "item_inventory_push",
        pd.DataFrame(
            {
                C.ITEM_ID: [0],
                S.EVENT_TIMESTAMP: [ts(5.5)],
                "stock": [0],
                "in_stock": [0],
                S.CREATED: [ts(5.5)],
            }
        ),
    )
    row = store.get_online_features(
        features=["item_inventory:stock", "item_inventory:in_stock"], entity_rows=[{C.ITEM_ID: 0}]
    ).to_dict()
    assert row["stock"] == [0] and row["in_stock"] == [0]


def test_sqlite_online_store_materializes_and_takes_pushes(tmp_path, tables):
    _online_roundtrip(_store(tmp_path, tables))
    assert (tmp_path / "data" / "hand" / "feast" / "online.db").exists()


@pytest.mark.redis
def test_redis_online_store_materializes_and_takes_pushes(tmp_path, tables, redis_server):
    import redis

    _online_roundtrip(_store(tmp_path, tables, online="redis", redis=redis_server))
    host, port = redis_server.split(":")
    keys: int = redis.Redis(host=host, port=int(port)).dbsize()  # type: ignore[assignment]
    assert keys > 0


def test_redis_needs_a_connection_string(tmp_path):
    with pytest.raises(ValueError, match="needs a connection string"):
        open_store("hand", paths=Paths(tmp_path), online="redis", redis=None)
