"""One buyer's online features: read once per feed, passed on as ``common.v1.UserFeatures``.

Retrieval needs the user views for the user tower, the features service for the ranker's
user and user x item columns. Retrieval reads them (``UserReader.read``) and returns them in
its response; the gateway passes them to the features service, which reads the store itself
only when a request comes without them (retrieval was down, or another caller).

The rows are kept as the store holds them (``ViewRows``: view -> feature -> value, None for
a value the store does not hold, and None for a view without a row); each consumer applies
the training-time defaults itself, as it did when it read the store directly.

A view's row past its TTL at the request's time (``feature_repo.schema.TTL_SECONDS``) is
read as no row: training's point-in-time join would not have found it, so the ranker learned
the defaults for it (Feast's online read itself returns the latest row whatever its age).

Two readers, the same answer (``open_user_reader`` checks it at start on a sample of users):

- :class:`ProviderUserReader`: Feast's provider ``online_read``, one call per view; every
  online store.
- :class:`SqliteUserReader`: one SQL query over Feast's SQLite tables for the five views,
  decoding only the values (Feast's own read also converts every row's timestamp).
"""

from __future__ import annotations

import logging
import math
import sqlite3
import struct
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from homefeed.common.v1 import common_pb2

from feature_repo import schema as S
from services.common.errors import InvalidArgument
from services.common.feast_values import decode_value
from services.common.online import event_seconds

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)

USER_VIEWS = (
    S.USER_PROFILE,
    S.USER_CATEGORY_AFFINITY,
    S.USER_SELLER_RECENCY,
    S.USER_CONTENT_PROFILE,
    S.USER_RECENT_ACTIVITY,
)
# every user feature and the view that holds it
VIEW_OF: dict[str, str] = {name: view for view in USER_VIEWS for name in S.FEATURES[view]}
KIND_OF: dict[str, str] = {name: S.FEATURES[VIEW_OF[name]][name] for name in VIEW_OF}
SCALARS = tuple(name for name, kind in KIND_OF.items() if not kind.endswith("[]"))
LISTS = (
    S.AFFINITY_CATEGORIES,
    S.AFFINITY_WEIGHTS,
    S.RECENT_SELLERS,
    S.RECENT_SELLER_DAYS,
    S.CONTENT_PROFILE,
)
if set(LISTS) != {name for name, kind in KIND_OF.items() if kind.endswith("[]")}:
    raise ImportError("the user views' list features changed: update services/common/users.py")
if VIEW_OF.get(S.AFFINITY_TOTAL) != S.USER_CATEGORY_AFFINITY or S.AFFINITY_TOTAL not in SCALARS:
    raise ImportError(f"{S.AFFINITY_TOTAL} moved: update services/common/users.py")
# the views whose scalars travel as number / string features
SCALAR_VIEWS = (
    S.USER_PROFILE,
    S.USER_CATEGORY_AFFINITY,
    S.USER_CONTENT_PROFILE,
    S.USER_RECENT_ACTIVITY,
)
if {VIEW_OF[name] for name in SCALARS} - set(SCALAR_VIEWS):
    raise ImportError("a user view gained a scalar feature: update services/common/users.py")
MAX_LIST = 100_000  # entries of a list feature a request may carry
_VERIFY_SAMPLE = 32

# view -> feature -> value (None: no value); a view without a row maps to None
ViewRows = Mapping[str, Mapping[str, Any] | None]


class UserReader(Protocol):
    name: str

    def read(self, user_id: int, at_s: float | None = None) -> ViewRows:
        """The user's rows; with ``at_s`` (the request's time, seconds since 1970), a row
        past its view's TTL at that time reads as no row."""
        ...


class ProviderUserReader:
    """The user views through the provider's ``online_read``, one call per view. A view
    counts as having no row when every value is null: SQLite answers a missing entity with
    no values, Redis with a null for every feature (and a 1970 timestamp)."""

    name = "provider"

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self._provider = store._get_provider()
        self._tables = [
            (view, store.get_feature_view(view, allow_registry_cache=True)) for view in USER_VIEWS
        ]

    def read(self, user_id: int, at_s: float | None = None) -> ViewRows:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        key = [EntityKey(join_keys=["user_id"], entity_values=[Value(int64_val=user_id)])]
        rows: dict[str, dict[str, Any] | None] = {}
        for view, table in self._tables:
            ((stamp, values),) = self._provider.online_read(
                config=self.store.config, table=table, entity_keys=key
            )
            decoded = {n: decode_value(v) for n, v in (values or {}).items()}
            live = any(v is not None for v in decoded.values())
            if live and at_s is not None and stamp is not None:
                live = not S.expired(view, event_seconds(stamp), at_s)
            rows[view] = decoded if live else None
        return rows


class SqliteUserReader:
    """The user views of one user in one query over Feast's SQLite online tables
    (``<project>_<view>``: entity_key, feature_name, value = a serialized ``Value``)."""

    name = "sqlite"

    def __init__(self, db_path: str | Path, project: str, key_version: int) -> None:
        from feast.infra.key_encoding_utils import serialize_entity_key
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        self._value = Value
        probe = EntityKey(
            join_keys=["user_id"], entity_values=[Value(int64_val=0x0102030405060708)]
        )
        raw = serialize_entity_key(probe, entity_key_serialization_version=key_version)
        if raw[-8:] != struct.pack("<q", 0x0102030405060708):
            raise ValueError(f"entity key serialization v{key_version} does not end with the id")
        self._prefix = raw[:-8]
        self._con = sqlite3.connect(
            f"file:{Path(db_path).resolve()}?mode=ro", uri=True, check_same_thread=False
        )
        self._lock = threading.Lock()
        self._sql = " UNION ALL ".join(
            f"SELECT '{view}', feature_name, value, event_ts "
            f'FROM "{project}_{view}" WHERE entity_key = ?'
            for view in USER_VIEWS
        )

    def read(self, user_id: int, at_s: float | None = None) -> ViewRows:
        key = self._prefix + struct.pack("<q", user_id)
        with self._lock:
            found = self._con.execute(self._sql, (key,) * len(USER_VIEWS)).fetchall()
        rows: dict[str, dict[str, Any] | None] = dict.fromkeys(USER_VIEWS)
        stale: set[str] = set()
        parse = self._value.FromString
        for view, name, value, stamp in found:
            if at_s is not None and S.expired(view, event_seconds(stamp), at_s):
                stale.add(view)  # a view's row is written whole: one stamp for its values
                continue
            decoded = decode_value(parse(value))
            values = rows[view]
            if values is None:
                values = rows[view] = {}
            values[name] = decoded
        return {
            v: r if v not in stale and r and any(x is not None for x in r.values()) else None
            for v, r in rows.items()
        }

    def close(self) -> None:
        with self._lock:
            self._con.close()


def open_user_reader(store: FeatureStore, sample_ids: Iterable[int] = range(64)) -> UserReader:
    """The SQLite fast path when the store is SQLite and it reads what the provider reads
    for ``sample_ids`` (a sample of real user ids); else the provider."""
    provider = ProviderUserReader(store)
    online = store.config.online_store
    if getattr(online, "type", "") != "sqlite":
        return provider
    try:
        fast = SqliteUserReader(
            online.path, store.project, store.config.entity_key_serialization_version
        )
        sample = list(sample_ids)[:_VERIFY_SAMPLE]
        differ = [u for u in sample if _normalize(fast.read(u)) != _normalize(provider.read(u))]
    except (sqlite3.Error, ValueError) as err:
        log.warning("sqlite user reader unavailable", extra={"reason": str(err)})
        return provider
    if differ:
        log.warning("sqlite user reader disagrees with online_read", extra={"users": differ[:5]})
        fast.close()
        return provider
    return fast


def _normalize(rows: ViewRows) -> dict[str, Any]:
    return {
        view: None if values is None else {k: v for k, v in values.items() if v is not None}
        for view, values in rows.items()
    }


# --- the wire form ---------------------------------------------------------------------------


def to_proto(rows: ViewRows) -> common_pb2.UserFeatures:
    """``rows`` as ``UserFeatures``; absent values stay absent."""
    msg = common_pb2.UserFeatures(known=bool(rows.get(S.USER_PROFILE)))
    numbers: list[tuple[str, Any]] = []
    strings: list[tuple[str, Any]] = []
    for view in SCALAR_VIEWS:
        for name, value in (rows.get(view) or {}).items():
            if value is None or name not in SCALARS:
                continue
            (strings if KIND_OF[name] == "string" else numbers).append((name, value))
    if numbers:
        msg.number_names.extend(n for n, _ in numbers)
        msg.number_values.extend(float(v) for _, v in numbers)
    if strings:
        msg.string_names.extend(n for n, _ in strings)
        msg.string_values.extend(str(v) for _, v in strings)
    _extend_pair(
        rows.get(S.USER_CATEGORY_AFFINITY) or {},
        (S.AFFINITY_CATEGORIES, msg.affinity_categories),
        (S.AFFINITY_WEIGHTS, msg.affinity_weights),
    )
    _extend_pair(
        rows.get(S.USER_SELLER_RECENCY) or {},
        (S.RECENT_SELLERS, msg.recent_sellers),
        (S.RECENT_SELLER_DAYS, msg.recent_seller_days),
    )
    profile = (rows.get(S.USER_CONTENT_PROFILE) or {}).get(S.CONTENT_PROFILE)
    if profile is not None and len(profile):
        msg.content_profile.extend(np.asarray(profile, dtype=np.float32).tolist())
    return msg


def _extend_pair(row: Mapping[str, Any], keys: tuple[str, Any], values: tuple[str, Any]) -> None:
    """Copy a view's two aligned lists (ids: int64, then float32 values) into the message's
    repeated fields; nothing when the id list is absent or empty."""
    ids = row.get(keys[0])
    if ids is None or not len(ids):
        return
    keys[1].extend(np.asarray(ids, dtype=np.int64).tolist())
    aligned = row.get(values[0])
    if aligned is not None:
        values[1].extend(np.asarray(aligned, dtype=np.float32).tolist())


def from_proto(msg: common_pb2.UserFeatures, field: str = "user") -> ViewRows:
    """The rows ``msg`` carries; InvalidArgument naming the field for a feature name the user
    views do not have, a repeated or non-finite value, lists that do not line up or are too
    long, a negative category, a negative affinity weight or total, or a non-finite
    content profile entry."""
    numbers = _named(msg.number_names, msg.number_values, field, "number")
    strings = _named(msg.string_names, msg.string_values, field, "string")
    bad = [v for v in numbers.values() if not math.isfinite(v)]
    if bad:
        raise InvalidArgument(f"{field}.number_values must be finite, got {bad[0]}")
    for name in (S.AFFINITY_TOTAL, S.CONTENT_PROFILE_WEIGHT):  # sums of weights
        value = numbers.get(name)
        if value is not None and value < 0:
            raise InvalidArgument(f"{field}.number_values: {name} must be >= 0, got {value}")
    rows: dict[str, dict[str, Any] | None] = {}
    for view in SCALAR_VIEWS:
        values = {
            name: (int(numbers[name]) if KIND_OF[name] == "int64" else numbers[name])
            for name in S.FEATURES[view]
            if name in numbers
        }
        values.update({name: strings[name] for name in S.FEATURES[view] if name in strings})
        rows[view] = values or None
    if not msg.known:  # the store has no profile row: the user is unknown
        rows[S.USER_PROFILE] = None
    categories, weights = _aligned(
        msg.affinity_categories,
        msg.affinity_weights,
        field,
        "affinity_categories",
        "affinity_weights",
    )
    if len(categories):
        _check_values(categories >= 0, categories, field, "affinity_categories", "non-negative")
        ok = np.isfinite(weights) & (weights >= 0)
        _check_values(ok, weights, field, "affinity_weights", "finite and non-negative")
        rows[S.USER_CATEGORY_AFFINITY] = {
            **(rows[S.USER_CATEGORY_AFFINITY] or {}),
            S.AFFINITY_CATEGORIES: categories,
            S.AFFINITY_WEIGHTS: weights,
        }
    sellers, days = _aligned(
        msg.recent_sellers, msg.recent_seller_days, field, "recent_sellers", "recent_seller_days"
    )
    if len(sellers):
        _check_values(np.isfinite(days), days, field, "recent_seller_days", "finite")
    rows[S.USER_SELLER_RECENCY] = (
        {S.RECENT_SELLERS: sellers, S.RECENT_SELLER_DAYS: days} if len(sellers) else None
    )
    if len(msg.content_profile) > MAX_LIST:
        raise InvalidArgument(
            f"{field}.content_profile must have at most {MAX_LIST} entries, "
            f"got {len(msg.content_profile)}"
        )
    profile = np.array(msg.content_profile, dtype=np.float32)
    _check_values(np.isfinite(profile), profile, field, "content_profile", "finite")
    scalars = rows[S.USER_CONTENT_PROFILE] or {}  # content_profile_weight, when sent
    rows[S.USER_CONTENT_PROFILE] = (
        {**scalars, S.CONTENT_PROFILE: profile} if len(profile) else (scalars or None)
    )
    return rows


def _aligned(
    ids: Any, values: Any, field: str, ids_name: str, values_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Two repeated fields that must be aligned, as int64 ids and float32 values; their
    lengths are checked before anything is copied."""
    for name, got in ((ids_name, ids), (values_name, values)):
        if len(got) > MAX_LIST:
            raise InvalidArgument(
                f"{field}.{name} must have at most {MAX_LIST} entries, got {len(got)}"
            )
    if len(ids) != len(values):
        raise InvalidArgument(
            f"{field}.{values_name} must align with {field}.{ids_name}, got {len(values)} "
            f"entries for {len(ids)}"
        )
    return np.array(ids, dtype=np.int64), np.array(values, dtype=np.float32)


def _check_values(ok: np.ndarray, values: np.ndarray, field: str, name: str, must: str) -> None:
    if not ok.all():
        at = int(np.flatnonzero(~ok)[0])
        raise InvalidArgument(f"{field}.{name} must be {must}, got {values[at]} at position {at}")


def _named(names: Any, values: Any, field: str, kind: str) -> dict[str, Any]:
    if len(names) != len(values):
        raise InvalidArgument(
            f"{field}.{kind}_names and {field}.{kind}_values must be parallel, got "
            f"{len(names)} names and {len(values)} values"
        )
    out = dict(zip(names, values, strict=True))
    if len(out) != len(names):
        raise InvalidArgument(f"{field}.{kind}_names must not repeat a name")
    unknown = [n for n in out if n not in SCALARS or (KIND_OF[n] == "string") != (kind == "string")]
    if unknown:
        shown = ", ".join(repr(n[:40]) for n in unknown[:3])
        raise InvalidArgument(f"{field}.{kind}_names must be {kind} user features, got {shown}")
    return out
