"""The in-memory item table: every catalog item's features as columnar numpy arrays, read
from the Feast online store at start and refreshed by a background thread.

A request gathers its 500 rows with one fancy index per column instead of reading 500
entities from the online store (measured: ``get_online_features`` takes 120-340 ms for 500
items x 20 features). The table is an immutable :class:`ItemSnapshot`; a refresh builds a
new one and swaps the reference, so a reader that took ``ItemStore.snapshot()`` sees one
consistent table to the end of its request and takes no lock.

Row ``n`` (one past the catalog) is the default row: an id the catalog does not know maps
to it and gets ``feature_repo.schema.DEFAULTS`` (else 0), as training's ``fill_defaults``
gives an entity Feast had no row for.

The store is read in bulk by ``services.common.online`` (a SQLite fast path checked
against Feast's provider); the item store switches to the provider when the fast path meets
a value it cannot decode.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from contract.catalog import Catalog
from contract.heuristic import Heuristic
from feature_repo import schema as S
from services.common.online import (
    NO_ROW_S,
    FastPathError,
    OnlineReader,
    ViewRows,
    close_reader,
    default_value,
    switch_to_fallback,
)
from services.common.periodic import Periodic

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)

ITEM_BATCH_VIEWS = (S.ITEM_STATS, S.SELLER_STATS)
ITEM_VIEWS = (*ITEM_BATCH_VIEWS, S.ITEM_INVENTORY)
# every item-side column of the ranker's matrix (seller_stats joined through the seller)
ITEM_FEATURES: tuple[str, ...] = tuple(name for view in ITEM_VIEWS for name in S.FEATURES[view])
CATEGORY = "category"
CATEGORY_SHARE = "category_share"  # the prior of category_affinity_for_item
CLICKS_7D = "clicks_7d"
AGE_DAYS = "age_days"
IN_STOCK = "in_stock"
SELLER_IS_NEW = "seller_is_new"
for _name, _view in (
    (CATEGORY, S.ITEM_STATS),
    (CATEGORY_SHARE, S.ITEM_STATS),
    (CLICKS_7D, S.ITEM_STATS),
    (AGE_DAYS, S.ITEM_STATS),
    (SELLER_IS_NEW, S.SELLER_STATS),
    (IN_STOCK, S.ITEM_INVENTORY),
):
    if _name not in S.FEATURES[_view]:
        raise ImportError(f"{_view} lost {_name}: update services/features/items.py")

_DENSE_SLACK = 4  # a dense id -> row table may be this many times the catalog size


class ItemIndex:
    """Item id -> table row; ids outside the catalog map to ``len(catalog)`` (the default row).

    Small non-negative ids (the simulator's 0..n-1, most warehouses' surrogate keys) use a
    dense lookup table: 500 ids in ~3 us. Sparse ids fall back to a binary search over the
    sorted ids (~15 us for 500 among 50k).
    """

    def __init__(self, sorted_ids: np.ndarray) -> None:
        self.ids = sorted_ids
        self.n = len(sorted_ids)
        self._dense: np.ndarray | None = None
        if self.n and sorted_ids[0] >= 0 and sorted_ids[-1] < _DENSE_SLACK * self.n + 1024:
            dense = np.full(int(sorted_ids[-1]) + 1, self.n, dtype=np.intp)
            dense[sorted_ids] = np.arange(self.n, dtype=np.intp)
            self._dense = dense

    @property
    def dense(self) -> bool:
        return self._dense is not None

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id (intp); ``n`` for an id the catalog does not hold."""
        if self._dense is not None:
            inside = (ids >= 0) & (ids < len(self._dense))
            if inside.all():
                return self._dense[ids]
            return np.where(inside, self._dense[np.where(inside, ids, 0)], self.n)
        if self.n == 0:
            return np.zeros(len(ids), dtype=np.intp)
        pos = np.minimum(np.searchsorted(self.ids, ids), self.n - 1)
        return np.where(self.ids[pos] == ids, pos, self.n).astype(np.intp, copy=False)


# --- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemSnapshot:
    """Every column has ``len(catalog) + 1`` entries; the last is the default row."""

    index: ItemIndex
    known: np.ndarray  # bool: in the catalog (False on the default row)
    prices: np.ndarray  # float32, catalog price (0 on the default row)
    values: np.ndarray  # float32, catalog price x margin
    categories: np.ndarray  # int32, catalog category (-1 on the default row)
    sellers: np.ndarray  # int64, catalog seller (-1 on the default row: in no user's list)
    # int64: item_stats category, -1 without a row (category_affinity_for_item reads the
    # uniform 1 / n_categories); the item's share of engagement is features[CATEGORY_SHARE]
    affinity_category: np.ndarray
    heuristic: np.ndarray  # float32, the logging policy's score (0 on the default row)
    # float32 (items + 1, k): the catalog's unit content rows in its content space
    # (Catalog.unit_content; a zero row on the default row; k 0 without content)
    unit_content: np.ndarray
    features: Mapping[str, np.ndarray]  # ITEM_FEATURES, the schema's dtypes
    n_categories: int
    batch_loaded_at: float  # time.time() of the batch views' read
    inventory_loaded_at: float
    # view with a TTL -> int64 event second of each row (NO_ROW_S where none, and on the
    # default row), for the assembler to serve a row past its TTL as missing
    event_s: Mapping[str, np.ndarray] = field(default_factory=dict)
    # view -> the oldest row's event second: nothing can expire before oldest + TTL
    oldest_s: Mapping[str, int] = field(default_factory=dict)

    def expired_rows(self, view: str, rows: np.ndarray, at_s: float | None) -> np.ndarray | None:
        """Which of ``rows`` hold a ``view`` row past its TTL at ``at_s`` (None: none can,
        or no check)."""
        ttl = S.TTL_SECONDS[view]
        if at_s is None or not ttl or view not in self.event_s or self.oldest_s[view] >= at_s - ttl:
            return None
        return self.event_s[view][rows] < at_s - ttl

    @property
    def n_items(self) -> int:
        return self.index.n


def _with_default_row(values: np.ndarray, default: Any) -> np.ndarray:
    return np.concatenate([values, np.asarray([default], dtype=values.dtype)])


def _inventory_columns(rows: ViewRows) -> dict[str, np.ndarray]:
    return {
        name: _with_default_row(rows.columns[name], default_value(name, kind))
        for name, kind in S.FEATURES[S.ITEM_INVENTORY].items()
    }


def _unit_content(catalog: Catalog) -> np.ndarray:
    """The catalog's unit content rows and a zero default row (no profile can score it)."""
    unit = catalog.unit_content
    return np.concatenate([unit, np.zeros((1, unit.shape[1]), np.float32)])


def build_snapshot(
    catalog: Catalog,
    item_stats: ViewRows,
    seller_stats: ViewRows,
    seller_of_item: np.ndarray,
    inventory: ViewRows,
    heuristic: Heuristic,
) -> ItemSnapshot:
    """The table from the three item views' rows (in catalog order; seller rows indexed by
    ``seller_of_item``).

    ``heuristic`` is the bundle's production heuristic (``contract.heuristic``), the logging
    policy, with the inputs the simulator gives it (``engine._pool``): popularity = the
    item's clicks over the last 7 days (``clicks_7d``; ``popularity_7d`` is its log1p, which
    the policy does not use) and age = ``age_days`` as of the item_stats snapshot.
    """
    now = time.time()
    event_s = {
        S.ITEM_STATS: _with_default_row(item_stats.event_s, NO_ROW_S),
        S.SELLER_STATS: _with_default_row(seller_stats.event_s[seller_of_item], NO_ROW_S),
    }
    features: dict[str, np.ndarray] = {}
    for name, kind in S.FEATURES[S.ITEM_STATS].items():
        features[name] = _with_default_row(item_stats.columns[name], default_value(name, kind))
    for name, kind in S.FEATURES[S.SELLER_STATS].items():
        per_item = seller_stats.columns[name][seller_of_item]
        features[name] = _with_default_row(per_item, default_value(name, kind))
    features.update(_inventory_columns(inventory))
    affinity_category = np.where(item_stats.found, item_stats.columns[CATEGORY], -1)
    score = heuristic.score(
        features[CLICKS_7D][:-1].astype(np.float64), features[AGE_DAYS][:-1].astype(np.float64)
    )
    return ItemSnapshot(
        index=ItemIndex(catalog.item_ids),
        known=_with_default_row(np.ones(len(catalog), dtype=bool), False),
        prices=_with_default_row(catalog.prices.astype(np.float32), 0.0),
        values=_with_default_row((catalog.prices * catalog.margins).astype(np.float32), 0.0),
        categories=_with_default_row(catalog.categories.astype(np.int32), -1),
        sellers=_with_default_row(catalog.seller_ids, -1),
        affinity_category=_with_default_row(affinity_category.astype(np.int64), -1),
        heuristic=_with_default_row(score.astype(np.float32), 0.0),
        unit_content=_unit_content(catalog),
        features=features,
        n_categories=catalog.n_categories,
        batch_loaded_at=now,
        inventory_loaded_at=now,
        event_s=event_s,
        oldest_s={view: int(stamps.min()) for view, stamps in event_s.items()},
    )


@dataclass
class RefreshStats:
    """What the refresher has done, for logs and tests."""

    inventory_refreshes: int = 0
    inventory_skipped: int = 0  # the store reported no change
    batch_reloads: int = 0
    failures: int = 0
    last_inventory_ms: float = 0.0
    last_batch_ms: float = 0.0
    last_error: str = ""


class ItemStore:
    """The current :class:`ItemSnapshot` and the thread that refreshes it.

    Every ``refresh_s`` the thread re-reads the inventory view (skipped when the reader says
    nothing changed) and, every ``batch_refresh_s`` or when ``batch_marker`` changes (a new
    materialization), rebuilds the whole table. A failed refresh is logged and the last good
    table keeps serving.
    """

    def __init__(
        self,
        reader: OnlineReader,
        catalog: Catalog,
        heuristic: Heuristic,
        refresh_s: float = 2.0,
        batch_refresh_s: float = 60.0,
        batch_marker: Callable[[], Hashable] | None = None,
        fallback: OnlineReader | None = None,
    ) -> None:
        """``fallback``: the reader to switch to when ``reader`` raises FastPathError."""
        self.reader = reader
        self.fallback = fallback
        self.catalog = catalog
        self.heuristic = heuristic
        self.refresh_s = refresh_s
        self.batch_refresh_s = batch_refresh_s
        self._batch_marker = batch_marker
        self.stats = RefreshStats()
        self._write = threading.Lock()
        self._refresher = Periodic("item-refresh", refresh_s, self.refresh_once)
        self._marker: Hashable = None
        self._changes: Hashable = None
        self._snapshot: ItemSnapshot | None = None
        self._closers: list[Callable[[], None]] = []

    def snapshot(self) -> ItemSnapshot:
        snap = self._snapshot
        if snap is None:
            raise RuntimeError("ItemStore.load() has not run")
        return snap

    def load(self) -> ItemSnapshot:
        """Read the catalog and every item view; the table served from now on."""
        with self._write:
            started = time.perf_counter()
            marker = self._batch_marker() if self._batch_marker else None
            changes = self.reader.changes()
            catalog = self.catalog
            sellers, seller_of_item = np.unique(catalog.seller_ids, return_inverse=True)
            snap = build_snapshot(
                catalog,
                self.reader.read_view(S.ITEM_STATS, catalog.item_ids),
                self.reader.read_view(S.SELLER_STATS, sellers),
                seller_of_item,
                self.reader.read_view(S.ITEM_INVENTORY, catalog.item_ids),
                self.heuristic,
            )
            self._marker, self._changes = marker, changes
            self._snapshot = snap
            self.stats.batch_reloads += 1
            self.stats.last_batch_ms = (time.perf_counter() - started) * 1e3
        log.info(
            "item table loaded",
            extra={
                "items": len(catalog),
                "reader": self.reader.name,
                "ms": round(self.stats.last_batch_ms, 1),
            },
        )
        return snap

    def refresh_inventory(self, force: bool = False) -> bool:
        """Re-read stock and in_stock; False when the store reported no change (skipped)."""
        with self._write:
            snap, catalog = self.snapshot(), self.catalog
            changes = self.reader.changes()
            if not force and changes == self._changes:
                self.stats.inventory_skipped += 1
                return False
            started = time.perf_counter()
            rows = self.reader.read_view(S.ITEM_INVENTORY, catalog.item_ids)
            features = {**snap.features, **_inventory_columns(rows)}
            self._snapshot = dataclasses.replace(
                snap, features=features, inventory_loaded_at=time.time()
            )
            self._changes = changes
            self.stats.inventory_refreshes += 1
            self.stats.last_inventory_ms = (time.perf_counter() - started) * 1e3
            return True

    def apply_inventory(self, item_ids: np.ndarray, stock: np.ndarray) -> int:
        """Set the stock of ``item_ids`` now (an inventory event just ingested), ahead of the
        online store's next refresh; items outside the catalogue are ignored. Returns the
        items changed. The table is copied, never edited in place: a request being served
        keeps the snapshot it took."""
        with self._write:
            snap = self.snapshot()
            rows = snap.index.rows(np.asarray(item_ids, dtype=np.int64))
            known = rows < snap.n_items
            if not known.any():
                return 0
            rows = rows[known]
            stock = np.asarray(stock, dtype=np.int64)[known]
            features = dict(snap.features)
            for name, values in (("stock", stock), (IN_STOCK, (stock > 0).astype(np.int64))):
                column = features[name].copy()
                column[rows] = values
                features[name] = column
            self._snapshot = dataclasses.replace(snap, features=features)
            return int(known.sum())

    def batch_due(self) -> bool:
        if time.time() - self.snapshot().batch_loaded_at >= self.batch_refresh_s:
            return True
        return self._batch_marker is not None and self._batch_marker() != self._marker

    def refresh_once(self) -> None:
        """One tick of the refresher: the whole table when due, else the inventory."""
        try:
            try:
                if self.batch_due():
                    self.load()
                else:
                    self.refresh_inventory()
            except FastPathError as err:
                switch_to_fallback(self, err, "item table")
                self.load()
        except Exception as err:  # keep serving the last good table
            self.stats.failures += 1
            self.stats.last_error = f"{type(err).__name__}: {err}"
            log.exception("item table refresh failed; serving the previous table")

    def start(self) -> None:
        """Start the refresher thread (after ``load``)."""
        self.snapshot()
        self._refresher.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the refresher and wait for a refresh in progress to end."""
        self._refresher.close(timeout)
        close_reader(self.reader)
        for close in self._closers:
            close()

    def add_closer(self, close: Callable[[], None]) -> None:
        """Run ``close`` after the refresher stops (the event log the service appends to)."""
        self._closers.append(close)


class MaterializationWatch:
    """``materialization_marker`` re-read only when the registry file changed: a ``stat``
    per refresher tick instead of parsing the whole registry every 2 s, which would take the
    GIL from the requests for milliseconds each time."""

    def __init__(self, store: FeatureStore, views: Sequence[str] = ITEM_BATCH_VIEWS) -> None:
        self.store = store
        self.views = views
        path = getattr(store.config.registry, "path", None)
        self._path = Path(path) if path and "://" not in str(path) else None
        self._stamp: tuple[int, int] | None = None
        self._marker: Hashable = None

    def __call__(self) -> Hashable:
        stamp = None
        if self._path is not None:
            try:
                stat = self._path.stat()
                stamp = (stat.st_mtime_ns, stat.st_size)
            except OSError:
                stamp = None
        if stamp is not None and stamp == self._stamp:
            return self._marker
        self._marker = materialization_marker(self.store, self.views)
        self._stamp = stamp
        return self._marker


def materialization_marker(
    store: FeatureStore, views: Sequence[str] = ITEM_BATCH_VIEWS
) -> Hashable:
    """The registry's materialization record of ``views``: it changes when a job
    materializes new rows into the online store."""
    store.refresh_registry()
    marker = []
    for view in views:
        table = store.get_feature_view(view, allow_registry_cache=True)
        intervals = table.materialization_intervals
        marker.append((view, len(intervals), intervals[-1][1] if intervals else None))
    return tuple(marker)
