"""Training-serving skew: the feature rows serving logged (``HOMEFEED_GATEWAY_LOG_FEATURES_RATE``
of the feeds) recomputed offline by training's own path for the same user, item and time, so
``training.monitor.training_serving_skew`` can compare them column by column.

The recomputation is what a training row for that impression would hold:

- the batch views (user_profile, user_category_affinity, user_seller_recency, item_stats,
  seller_stats): Feast's point-in-time join of the dataset's offline store
  (``training.dataset.historical_features``), with the views' TTLs;
- the stream views, from the dataset's events *and the log's*, by the definitions
  ``homefeed features`` builds their tables with, joined as of the row's time within the
  view's TTL (``feature_repo.schema.TTL_SECONDS``), which is Feast's point-in-time rule:
  ``user_recent_activity`` = ``training.features.recent_activity_rows`` of the clicks and
  add-to-carts; ``item_inventory`` = the last stock count at or before the row;
- then ``fill_defaults``, the request's context (UTC hour and weekday of the row's time, the
  feed's surface) and ``contract.features.build_matrix``, as training and serving do.

Rows match by (request id, item id). What disagrees is skew: a feature computed differently
online, a view served past its TTL, a stream update serving missed or saw early.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from contract import columns as C
from contract import events as E
from contract.features import build_matrix, feature_schema
from contract.timeutil import NS_PER_S, to_ns
from feature_repo import schema as S
from training.dataset import (
    ItemContent,
    add_context,
    entity_frame,
    fill_defaults,
    historical_features,
)
from training.features import outcome_events, recent_activity_rows
from training.tables import RowsById

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)

KEYS = ["request_id", "item_id"]
RECENT = list(S.FEATURES[S.USER_RECENT_ACTIVITY])
INVENTORY = list(S.FEATURES[S.ITEM_INVENTORY])


def _base_engagements(tables: dict[str, pd.DataFrame], since_ns: int) -> pd.DataFrame:
    """(user_id, ts_ns, is_cart) of the dataset's clicks and add-to-carts at or after
    ``since_ns`` (earlier ones count in no row a logged row can be joined to)."""
    rows = RowsById(tables[C.IMPRESSIONS][C.IMPRESSION_ID].to_numpy(np.int64))
    parts = []
    for table, is_cart in ((C.CLICKS, False), (C.ADD_TO_CARTS, True)):
        frame = outcome_events(tables, table, since_ns - 1, rows)
        parts.append(
            pd.DataFrame({"user_id": frame["user_id"], "ts_ns": frame["ts"], "is_cart": is_cart})
        )
    return pd.concat(parts, ignore_index=True)


def _log_engagements(events: pd.DataFrame) -> pd.DataFrame:
    ev = events[events["kind"].isin([E.CLICK, E.ADD_TO_CART])]
    return pd.DataFrame(
        {
            "user_id": ev["user_id"].to_numpy(np.int64),
            "ts_ns": to_ns(ev["ts"]),
            "is_cart": (ev["kind"] == E.ADD_TO_CART).to_numpy(),
        }
    )


def _as_of(
    rows: pd.DataFrame, table: pd.DataFrame, key: str, columns: list[str], ttl_s: int
) -> pd.DataFrame:
    """``table``'s latest row per ``key`` at or before each of ``rows``' ``ts_ns`` (and within
    ``ttl_s`` seconds when > 0), as Feast's point-in-time join picks it; None where none."""
    left = rows[[key, "ts_ns"]].reset_index().sort_values("ts_ns", kind="stable")
    right = table[[key, "ts_ns", *columns]].sort_values("ts_ns", kind="stable")
    joined = pd.merge_asof(
        left,
        right,
        on="ts_ns",
        by=key,
        direction="backward",
        allow_exact_matches=True,
        tolerance=ttl_s * NS_PER_S if ttl_s > 0 else None,
    )
    return joined.set_index("index").reindex(rows.index)[columns]


def stream_features(
    rows: pd.DataFrame, tables: dict[str, pd.DataFrame], events: pd.DataFrame
) -> pd.DataFrame:
    """The stream views' columns of ``rows`` (user_id, item_id, ts_ns) from the dataset's
    events followed by the log's, as of each row's time within the view's TTL."""
    ttl = S.TTL_SECONDS[S.USER_RECENT_ACTIVITY]
    # a row joined to the earliest logged row is at most one TTL older, and counts the
    # events of the window (24 h) before itself
    since = int(rows["ts_ns"].min()) - 2 * (ttl + 1) * NS_PER_S if len(rows) else 0
    engaged = pd.concat(
        [_base_engagements(tables, since), _log_engagements(events)], ignore_index=True
    )
    recent = recent_activity_rows(
        engaged["user_id"].to_numpy(), engaged["ts_ns"].to_numpy(), engaged["is_cart"].to_numpy()
    )
    recent["ts_ns"] = to_ns(recent[S.EVENT_TIMESTAMP])
    out = _as_of(rows, recent, C.USER_ID, RECENT, ttl)

    inv = tables[C.INVENTORY]
    logged = events[events["kind"] == E.INVENTORY]
    stock = pd.concat(
        [
            pd.DataFrame(
                {
                    C.ITEM_ID: inv[C.ITEM_ID].to_numpy(np.int64),
                    "ts_ns": to_ns(inv[C.TS]),
                    "stock": inv[C.STOCK].to_numpy(np.int64),
                }
            ),
            pd.DataFrame(
                {
                    C.ITEM_ID: logged["item_id"].to_numpy(np.int64),
                    "ts_ns": to_ns(logged["ts"]),
                    "stock": logged["stock"].to_numpy(np.int64),
                }
            ),
        ],
        ignore_index=True,
    )
    stock = stock[stock[C.ITEM_ID].isin(rows[C.ITEM_ID].unique())]
    # several counts at one time: the last one logged wins, as the builder keeps it
    stock = stock.drop_duplicates([C.ITEM_ID, "ts_ns"], keep="last")
    stock["in_stock"] = (stock["stock"] > 0).astype(np.int64)
    inventory = _as_of(rows, stock, C.ITEM_ID, INVENTORY, S.TTL_SECONDS[S.ITEM_INVENTORY])
    return pd.concat([out, inventory], axis=1)


def recompute_rows(
    store: FeatureStore,
    tables: dict[str, pd.DataFrame],
    served: pd.DataFrame,
    events: pd.DataFrame,
) -> pd.DataFrame:
    """Training's feature rows for ``served`` (request_id, user_id, item_id, ts, surface: the
    logged rows' keys): request_id, item_id and one column per feature of the schema."""
    names = list(feature_schema().names)
    if served.empty:
        return pd.DataFrame(columns=[*KEYS, *names])
    rows = pd.DataFrame(
        {
            "request_id": served["request_id"].to_numpy(),
            C.USER_ID: served["user_id"].to_numpy(np.int64),
            C.ITEM_ID: served["item_id"].to_numpy(np.int64),
            C.TS: pd.to_datetime(served["ts"], utc=True).to_numpy(),
            C.SURFACE: served["surface"].to_numpy(),
        }
    )
    rows[C.TS] = pd.to_datetime(rows[C.TS], utc=True)
    rows["ts_ns"] = to_ns(rows[C.TS])
    items = tables[C.ITEMS]
    n_categories = int(items[C.CATEGORY].max()) + 1 if len(items) else 1
    add_context(rows)
    entity = entity_frame(rows.drop(columns=["ts_ns"]).copy(), items)
    joined = historical_features(store, entity, n_categories, ItemContent(items))
    joined = joined.set_index(["request_id", C.ITEM_ID])
    joined = joined.reindex(pd.MultiIndex.from_frame(rows[["request_id", C.ITEM_ID]]))
    joined = joined.reset_index()
    stream = stream_features(rows, tables, events)
    for name in (*RECENT, *INVENTORY):
        joined[name] = stream[name].to_numpy()
    joined = fill_defaults(joined)
    matrix = build_matrix(joined)
    out = pd.DataFrame(matrix, columns=names)
    out.insert(0, "item_id", rows[C.ITEM_ID].to_numpy())
    out.insert(0, "request_id", rows["request_id"].to_numpy())
    return out
