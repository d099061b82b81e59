"""Bulk reads of scalar feature views for many entities (every catalogue item) from the
Feast online store: the features service's item table and retrieval's stock.

Reading every catalogue item through ``get_online_features`` converts every value in Python;
two readers do better (their costs on sim-small are in docs/serving.md):

- :class:`ProviderReader`, the provider's ``online_read`` (raw ``Value`` protos): works with
  every online store, Python-speed decoding (seconds for 50k items).
- :class:`SqliteReader`, SQL over Feast's SQLite online tables: one query per feature whose
  per-row work (entity id from the key's last 8 bytes, value as fixed-width hex) runs inside
  SQLite with the GIL released, leaving Python one ``bytes.fromhex`` per column, so requests
  served meanwhile keep their latency (a Python loop over the rows would stall them). It
  depends on Feast's table layout, so :func:`open_reader` checks it against
  ``ProviderReader`` on a sample of entities, and a reader that meets a value it cannot
  decode raises ``FastPathError`` so its owner can switch to the provider.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from feature_repo import schema as S
from services.common.feast_values import decode_value

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)

_BATCH = 10_000  # entity keys per online_read call (SQLite allows 32766 parameters)
_VERIFY_SAMPLE = 64
# How SQL turns one value into fixed-width hex (SQLite does the per-row work with the GIL
# released; Python decodes one string per column): (expression, well-formed test, dtype).
# int64: the text Feast writes beside the proto; float32: the proto's 4 payload bytes
# (``float_val`` is field 6, fixed32: tag 0x35), exact where text would round.
_HEX_COLUMN: dict[str, tuple[str, str, str]] = {
    "int64": ("printf('%016x', CAST(value_text AS INTEGER))", "value_text IS NOT NULL", ">i8"),
    "float32": (
        "hex(substr(value, 2, 4))",
        "length(value) = 5 AND substr(value, 1, 1) = x'35'",
        "<f4",
    ),
}
_KEYED_MAX = 900  # ids read by key rather than by scanning (SQLite's parameter limit: 999+)


TTL_CLOCK_ENV = "HOMEFEED_TTL_CLOCK"
TTL_CLOCKS = ("request", "wall")


def ttl_time(when: datetime | None) -> float | None:
    """The time a request's feature rows must be fresh at (seconds since 1970), or None for
    no TTL check: the request's own time when it carries one; else the wall clock when
    ``HOMEFEED_TTL_CLOCK=wall`` (the chart's setting: live traffic), and no check under the
    default ``request`` (a local mesh serving a past dataset, whose rows the wall clock
    would expire all at once)."""
    if when is not None:
        return when.timestamp()
    clock = os.environ.get(TTL_CLOCK_ENV, "request")
    if clock not in TTL_CLOCKS:
        raise ValueError(f"{TTL_CLOCK_ENV} must be one of {', '.join(TTL_CLOCKS)}, got {clock!r}")
    return time.time() if clock == "wall" else None


def event_seconds(stamp: Any) -> int:
    """A row's event time in whole seconds since 1970: SQLite's online tables hold an
    integer, Feast's ``online_read`` a datetime (naive = UTC)."""
    if isinstance(stamp, int | float | np.integer):
        return int(stamp)
    if isinstance(stamp, datetime):
        return int((stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp())
    if isinstance(stamp, str):
        return event_seconds(datetime.fromisoformat(stamp))
    raise ValueError(f"cannot read an event time from {stamp!r}")


def default_value(name: str, kind: str) -> float | int | str:
    """What a feature is when Feast has no row (training's ``fill_defaults``)."""
    default = S.DEFAULTS.get(name)
    if default is not None:
        return default
    return "unknown" if kind == "string" else 0


def numpy_dtype(kind: str) -> np.dtype[Any]:
    return np.dtype({"int64": np.int64, "float32": np.float32}.get(kind, object))


@dataclass(frozen=True)
class ViewRows:
    """One view's features for a list of entities, defaults where Feast had no value."""

    found: np.ndarray  # bool: the entity has a row in the view
    columns: dict[str, np.ndarray]  # feature -> values (the schema's dtype)
    # int64: the row's event time in whole seconds since 1970 (the TTL's clock); NO_ROW_S
    # where the entity has no row
    event_s: np.ndarray


NO_ROW_S = np.iinfo(np.int64).max  # a missing row never expires (it is the default already)


def empty_rows(view: str, n: int) -> ViewRows:
    columns = {
        name: np.full(n, default_value(name, kind), dtype=numpy_dtype(kind))
        for name, kind in S.FEATURES[view].items()
    }
    return ViewRows(np.zeros(n, dtype=bool), columns, np.full(n, NO_ROW_S, dtype=np.int64))


class OnlineReader(Protocol):
    """Bulk reads of scalar feature views for many entities."""

    name: str

    def read_view(self, view: str, ids: np.ndarray) -> ViewRows: ...

    def changes(self) -> Hashable:
        """A value that changes when the store may have new data (anything, when unknown)."""
        ...


class ProviderReader:
    """``provider.online_read`` in batches: every online store, Python-speed decoding."""

    name = "provider"

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self._provider = store._get_provider()
        self._counter = 0

    def read_view(self, view: str, ids: np.ndarray) -> ViewRows:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        table = self.store.get_feature_view(view, allow_registry_cache=True)
        key = S.ENTITY_OF_VIEW[view]
        names = list(S.FEATURES[view])
        out = empty_rows(view, len(ids))
        for lo in range(0, len(ids), _BATCH):
            keys = [
                EntityKey(join_keys=[key], entity_values=[Value(int64_val=int(i))])
                for i in ids[lo : lo + _BATCH]
            ]
            rows = self._provider.online_read(
                config=self.store.config, table=table, entity_keys=keys, requested_features=names
            )
            for j, (stamp, values) in enumerate(rows, start=lo):
                if not values:
                    continue
                out.found[j] = True
                if stamp is not None:
                    out.event_s[j] = event_seconds(stamp)
                for name in names:
                    proto = values.get(name)
                    decoded = None if proto is None else decode_value(proto)
                    if decoded is not None:
                        out.columns[name][j] = decoded
        return out

    def changes(self) -> Hashable:
        self._counter += 1
        return self._counter


class FastPathError(RuntimeError):
    """The SQLite table does not have the layout the fast path reads."""


class FallsBack(Protocol):
    """Something that reads through ``reader`` and keeps ``fallback`` for when it fails."""

    reader: OnlineReader
    fallback: OnlineReader | None


def switch_to_fallback(owner: FallsBack, err: FastPathError, what: str) -> None:
    """The fast path failed: read through ``owner.fallback`` from now on (for good: a
    layout that does not match will not start matching), or re-raise ``err`` when there is
    none. The caller then reads again."""
    if owner.fallback is None:
        raise err
    log.warning(
        f"{what}: fast path failed; reading through the fallback from now on",
        extra={"reason": str(err), "fallback": owner.fallback.name},
    )
    owner.reader, owner.fallback = owner.fallback, None


def close_reader(reader: OnlineReader) -> None:
    """Close ``reader`` when it holds something to close (the SQLite fast path does)."""
    close = getattr(reader, "close", None)
    if close is not None:
        close()


class SqliteReader:
    """SQL over Feast's SQLite online tables, on a read-only connection of its own.

    ``changes()`` is SQLite's ``PRAGMA data_version``, which moves when another connection
    commits to the file (a push, a materialization): an idle store costs nothing to poll.
    """

    name = "sqlite"

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        project: str,
        key_version: int,
        views: Sequence[str],
    ) -> None:
        from feast.infra.key_encoding_utils import serialize_entity_key
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        self.project = project
        self._con = sqlite3.connect(
            f"file:{Path(db_path).resolve()}?mode=ro", uri=True, check_same_thread=False
        )
        self._lock = threading.Lock()
        self._prefix: dict[str, bytes] = {}
        for key in {S.ENTITY_OF_VIEW[v] for v in views}:
            probe = EntityKey(join_keys=[key], entity_values=[Value(int64_val=0x0102030405060708)])
            raw = serialize_entity_key(probe, entity_key_serialization_version=key_version)
            if raw[-8:] != struct.pack("<q", 0x0102030405060708):
                raise FastPathError(
                    f"entity key serialization v{key_version} does not end with the int64 id"
                )
            self._prefix[key] = raw[:-8]

    def table(self, view: str) -> str:
        return f"{self.project}_{view}"

    def read_view(self, view: str, ids: np.ndarray) -> ViewRows:
        prefix = self._prefix[S.ENTITY_OF_VIEW[view]]
        out = empty_rows(view, len(ids))
        if not len(ids):
            return out
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        where = "feature_name = ? AND length(entity_key) = ? AND substr(entity_key, 1, ?) = ?"
        keys: list[bytes] = []
        if len(ids) <= _KEYED_MAX:  # a few ids: primary-key lookups instead of a table scan
            keys = [prefix + struct.pack("<q", int(i)) for i in ids]
            where += f" AND entity_key IN ({','.join('?' * len(keys))})"
        with self._lock:
            for name, kind in S.FEATURES[view].items():
                if kind not in _HEX_COLUMN:
                    raise FastPathError(f"{view}.{name} is {kind}; the fast path reads numbers")
                encode, well_formed, dtype = _HEX_COLUMN[kind]
                got = self._column(view, name, encode, well_formed, where, prefix, keys)
                if got is None:
                    continue
                found, value_hex = got
                values = np.frombuffer(bytes.fromhex(value_hex), dtype=dtype)
                pos = np.minimum(np.searchsorted(sorted_ids, found), len(sorted_ids) - 1)
                hit = sorted_ids[pos] == found
                target = order[pos[hit]]
                out.columns[name][target] = values[hit]
                out.found[target] = True
            # each row's event_ts (integer seconds in Feast's SQLite tables), read with the
            # view's first feature: a view's row is written whole, with one stamp
            got = self._column(
                view,
                next(iter(S.FEATURES[view])),
                "printf('%016x', event_ts)",  # big-endian hex
                "typeof(event_ts) = 'integer'",
                where,
                prefix,
                keys,
            )
            if got is not None:
                found, ts_hex = got
                stamps = np.frombuffer(bytes.fromhex(ts_hex), dtype=">i8").astype(np.int64)
                pos = np.minimum(np.searchsorted(sorted_ids, found), len(sorted_ids) - 1)
                hit = sorted_ids[pos] == found
                out.event_s[order[pos[hit]]] = stamps[hit]
        return out

    def _column(
        self,
        view: str,
        name: str,
        encode: str,
        well_formed: str,
        where: str,
        prefix: bytes,
        keys: list[bytes],
    ) -> tuple[np.ndarray, str] | None:
        """(entity ids, their values as one hex string of fixed-width cells) of one feature
        of ``view``'s rows matching ``where``; None when there are none. FastPathError when
        the table cannot be read or a value is not in the layout ``well_formed`` tests."""
        query = (
            f"SELECT group_concat(hex(substr(entity_key, -8)), ''), "
            f"group_concat({encode}, ''), count(*), total({well_formed}) "
            f'FROM "{self.table(view)}" WHERE {where}'
        )
        try:
            id_hex, value_hex, n, good = self._con.execute(
                query, (name, len(prefix) + 8, len(prefix), prefix, *keys)
            ).fetchone()
        except sqlite3.OperationalError as err:
            raise FastPathError(f"cannot read {self.table(view)}: {err}") from err
        if not n:
            return None
        if good != n:
            raise FastPathError(
                f"{self.table(view)}.{name}: {n - int(good)} of {n} values are not "
                f"in the layout the fast path decodes"
            )
        return np.frombuffer(bytes.fromhex(id_hex), dtype="<i8"), value_hex

    def changes(self) -> Hashable:
        with self._lock:
            return self._con.execute("PRAGMA data_version").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._con.close()


def verify_reader(
    fast: OnlineReader, reference: OnlineReader, ids: np.ndarray, views: Iterable[str]
) -> str | None:
    """None when ``fast`` reads exactly what ``reference`` reads for ``ids``, else why not."""
    for view in views:
        a, b = fast.read_view(view, ids), reference.read_view(view, ids)
        if not np.array_equal(a.found, b.found):
            return f"{view}: rows found differ"
        if not np.array_equal(a.event_s, b.event_s):
            return f"{view}: event times differ"
        for name in S.FEATURES[view]:
            if not np.array_equal(a.columns[name], b.columns[name]):
                return f"{view}.{name}: values differ"
    return None


def open_reader(
    store: FeatureStore,
    sample_ids: np.ndarray,
    views: Sequence[str],
    fast_path: bool = True,
) -> tuple[OnlineReader, OnlineReader | None]:
    """``(reader, fallback)`` for ``views``: the SQLite fast path, with the provider's
    ``online_read`` as its fallback, when the store is SQLite and the fast path reads what
    the provider reads on a sample of ids; else ``(provider reader, None)``."""
    reference = ProviderReader(store)
    online = store.config.online_store
    if not fast_path or getattr(online, "type", "") != "sqlite":
        return reference, None
    try:
        fast = SqliteReader(
            online.path, store.project, store.config.entity_key_serialization_version, views
        )
    except (FastPathError, sqlite3.Error) as err:
        log.warning("sqlite fast path unavailable", extra={"reason": str(err)})
        return reference, None
    rng = np.random.default_rng(0)
    sample = rng.choice(sample_ids, size=min(_VERIFY_SAMPLE, len(sample_ids)), replace=False)
    try:
        problem = verify_reader(fast, reference, np.sort(sample), views)
    except (FastPathError, sqlite3.Error) as err:
        problem = str(err)
    if problem is not None:
        log.warning("sqlite fast path disagrees with online_read", extra={"reason": problem})
        fast.close()
        return reference, None
    return fast, reference
