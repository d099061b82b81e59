"""The event log (``LogEvents``: served feeds and the buyers' events) as DataFrames: what the
experiment analysis, monitoring and the training sets read.

- ``feeds``: one row per served feed (``contract.events`` feed records), list columns kept
  as Python lists;
- ``events``: one row per click, add-to-cart, purchase, impression or inventory event;
- per served item (``served_items``), the logged feature rows of the sampled feeds
  (``served_feature_rows``) and per-user outcomes (``user_outcomes``).

The log becomes the event tables of ``docs/data-schema.md`` (a dataset built from a served
model's own traffic) through ``homefeed ingest --source eventlog`` (``training.ingest``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

from contract import eventlog
from contract import events as E

FEED_COLUMNS = (
    "request_id", "user_id", "ts", "surface", "model_version", "arm", "experiment",
    "experiment_arm", "latency_ms", "country", "device", "seen_filtered", "seen_items", "items",
    "positions", "scores", "egmv", "propensities", "reasons", "degraded", "categories",
    "new_seller", "prices", "features",
)  # fmt: skip
EVENT_COLUMNS = (
    "event_id", "kind", "ts", "user_id", "item_id", "request_id", "position", "surface",
    "price", "quantity", "stock",
)  # fmt: skip


def records(location: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Every record of the log at ``location`` (a segment directory or a ``redis://`` URL),
    in log order; a directory a writer is appending to is read up to its last complete
    record."""
    target = str(location)
    if eventlog.is_redis_url(target):
        with eventlog.RedisStreamLog.open(target) as stream:
            for _, _, payload in stream.read():
                yield E.decode(payload)
        return
    for _, _, payload in eventlog.read(target):
        yield E.decode(payload)


def read_log(location: str | os.PathLike[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(feeds, events) of the log at ``location``."""
    feeds: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for record in records(location):
        (feeds if record["type"] == E.FEED else events).append(record)
    feed_frame = pd.DataFrame(feeds, columns=list(FEED_COLUMNS))
    event_frame = pd.DataFrame(events, columns=list(EVENT_COLUMNS))
    for frame in (feed_frame, event_frame):
        frame["ts"] = pd.to_datetime(frame["ts"].astype("int64"), unit="ns", utc=True)
        frame["user_id"] = frame["user_id"].astype("int64")
    event_frame["price"] = event_frame["price"].astype("float64")
    event_frame["quantity"] = event_frame["quantity"].fillna(0).astype("int64")
    return feed_frame, event_frame


def served_items(feeds: pd.DataFrame) -> pd.DataFrame:
    """One row per served item: request_id, user_id, ts, arm, experiment_arm, item_id,
    position, score, egmv, propensity, reason, and category / new_seller / price when the
    features were up."""
    if feeds.empty:
        return pd.DataFrame(
            columns=["request_id", "user_id", "ts", "arm", "experiment_arm", "model_version",
                     "item_id", "position", "score", "egmv", "propensity", "reason"]
        )  # fmt: skip
    n = feeds["items"].map(len).to_numpy()
    out = pd.DataFrame(
        {
            "request_id": np.repeat(feeds["request_id"].to_numpy(), n),
            "user_id": np.repeat(feeds["user_id"].to_numpy(), n),
            "ts": np.repeat(feeds["ts"].to_numpy(), n),
            "arm": np.repeat(feeds["arm"].to_numpy(), n),
            "experiment_arm": np.repeat(feeds["experiment_arm"].to_numpy(), n),
            "model_version": np.repeat(feeds["model_version"].to_numpy(), n),
            "item_id": _flat(feeds["items"], np.int64),
            "position": _flat(feeds["positions"], np.int64),
            "score": _flat(feeds["scores"], np.float64),
            "egmv": _flat(feeds["egmv"], np.float64),
            "propensity": _flat(feeds["propensities"], np.float64),
            "reason": _flat(feeds["reasons"], np.int64),
        }
    )
    has_facts = feeds["categories"].map(len).to_numpy() == n
    if has_facts.all():
        out["category"] = _flat(feeds["categories"], np.int64)
        out["new_seller"] = _flat(feeds["new_seller"], bool)
        out["price"] = _flat(feeds["prices"], np.float64)
    return out


def _flat(column: pd.Series, dtype: Any) -> np.ndarray:
    if column.empty:
        return np.empty(0, dtype=dtype)
    return np.concatenate([np.asarray(v, dtype=dtype) for v in column])


def served_feature_rows(feeds: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """The logged feature rows of the sampled feeds (one row per served item, ``names`` as
    columns, plus request_id, user_id, ts, surface, item_id): the serving side of the skew
    check."""
    parts = []
    for feed in feeds.to_dict("records"):
        features: dict[str, Any] | None = feed["features"]
        if not features:
            continue
        values = np.asarray(features["values"], dtype=np.float32).reshape(-1, features["cols"])
        if values.shape[1] != len(names):
            raise ValueError(
                f"feed {feed['request_id']}: {values.shape[1]} logged feature columns, the schema "
                f"has {len(names)} (another bundle's schema {features['schema_hash'][:12]})"
            )
        part = pd.DataFrame(values, columns=names)
        part.insert(0, "item_id", np.asarray(feed["items"], dtype=np.int64))
        part.insert(0, "surface", feed["surface"])
        part.insert(0, "ts", feed["ts"])
        part.insert(0, "user_id", feed["user_id"])
        part.insert(0, "request_id", feed["request_id"])
        parts.append(part)
    if not parts:
        return pd.DataFrame(columns=["request_id", "user_id", "ts", "surface", "item_id", *names])
    return pd.concat(parts, ignore_index=True)


def user_outcomes(
    feeds: pd.DataFrame, events: pd.DataFrame, arm_column: str = "experiment_arm"
) -> pd.DataFrame:
    """One row per user with a served feed: arm (the user's logged ``arm_column``; a user
    logged in two arms keeps the first and is counted in ``arm_changes``), sessions (feeds
    that carried no seen ids: a session's first page), feeds, orders, gmv, carts, clicks,
    from the events whose request belongs to a feed of that user."""
    if feeds.empty:
        return pd.DataFrame(
            columns=["user_id", "arm", "sessions", "feeds", "orders", "gmv", "carts", "clicks"]
        )
    first = feeds.sort_values("ts").drop_duplicates("user_id")[["user_id", arm_column]]
    arms_per_user = feeds.groupby("user_id")[arm_column].nunique()
    users = first.rename(columns={arm_column: "arm"}).set_index("user_id")
    users["arm_changes"] = arms_per_user.reindex(users.index).fillna(1).astype(int) - 1
    users["feeds"] = feeds.groupby("user_id").size()
    users["sessions"] = (feeds["seen_items"] == 0).groupby(feeds["user_id"]).sum()
    ev = events[events["user_id"] >= 0]
    buys = ev[ev["kind"] == E.PURCHASE]
    users["orders"] = buys.groupby("user_id").size()
    users["gmv"] = (buys["price"] * buys["quantity"]).groupby(buys["user_id"]).sum()
    users["carts"] = ev[ev["kind"] == E.ADD_TO_CART].groupby("user_id").size()
    users["clicks"] = ev[ev["kind"] == E.CLICK].groupby("user_id").size()
    users = users.fillna({"orders": 0, "gmv": 0.0, "carts": 0, "clicks": 0})
    for col in ("orders", "carts", "clicks", "feeds", "sessions"):
        users[col] = users[col].astype("int64")
    return users.reset_index()
