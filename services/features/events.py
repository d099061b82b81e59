"""Event ingestion behind ``LogEvents``: validate each entry, append the good ones to the
durable log, then bring the streaming state up to date so the very next feed sees them.

Per batch (``EventIngestor.ingest``):

1. **Validate** every event and feed on its own (``Rejected`` names the field, index and
   reason); a bad entry never stops the good ones.
2. **Append** the good ones to the event log in one write and one fsync
   (``contract.eventlog``): the acknowledgement means durable. The log drops an event id it
   already holds (a retried batch), so what follows runs once per event.
3. **Apply** what the new events change:
   - inventory: the item table the features service serves (``ItemStore.apply_inventory``:
     the next GetFeatures marks an item pushed out of stock unavailable), and the Feast
     push source ``item_inventory_push`` (retrieval's stock mask, other replicas, training);
   - clicks and add-to-carts: the user's ``views_24h`` / ``carts_24h`` over the 24 h before
     the event, computed as training computes them (``training/features.py``), pushed to
     ``user_recent_activity_push``;
   - purchases: the user's recently bought items (``RecentPurchases``); GetFeatures marks
     them unavailable for that user, so an item just bought is not recommended again.

A push that fails is logged and counted; the events stay acknowledged (they are in the log,
from which ``homefeed features`` rebuilds every view).

The per-user windows and purchases live in this process, rebuilt from the log's tail at
start (``replay``): with several replicas each holds what it ingested itself until the next
materialization, which is why a deployment routes a user's events to one replica or uses
the Redis Streams log with one consumer.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from contract import events as E

log = logging.getLogger(__name__)

MAX_EVENTS = 1000
MAX_FEEDS = 100
MAX_ID_CHARS = 128
MAX_PAGE = 100
MAX_QUANTITY = 10_000
MAX_STOCK = 10**9
MAX_PRICE = 1e9
MIN_TS_NS = 946_684_800 * 10**9  # 2000-01-01
MAX_TS_NS = 4_102_444_800 * 10**9  # 2100-01-01
WINDOW_S = 86_400  # views_24h / carts_24h, counted in whole seconds as training counts
PURCHASE_MEMORY_DAYS = 30.0  # a bought item stays hidden from its buyer this long
MAX_USERS_TRACKED = 200_000  # least recently active users beyond this are forgotten
MAX_BOUGHT_PER_USER = 200
INVENTORY_PUSH = "item_inventory_push"
ACTIVITY_PUSH = "user_recent_activity_push"
SURFACES = ("HOME", "CHECKOUT")


class EventLog(Protocol):
    def append(self, records: Sequence[tuple[str, bytes]]) -> list[bool]: ...


@dataclass(frozen=True)
class Rejected:
    field: str  # "events" or "feeds"
    index: int
    reason: str


@dataclass
class IngestResult:
    accepted: int = 0
    duplicates: int = 0
    rejected: list[Rejected] = field(default_factory=list)


@dataclass
class IngestStats:
    batches: int = 0
    events: int = 0
    feeds: int = 0
    duplicates: int = 0
    rejected: int = 0
    push_failures: int = 0
    pushes: int = 0
    last_push_ms: float = 0.0


class EntryError(ValueError):
    """One entry of a batch is malformed; the message says how."""


def _check_id(name: str, value: str, required: bool = True) -> None:
    if not value:
        if required:
            raise EntryError(f"{name} is required")
        return
    if len(value) > MAX_ID_CHARS:
        raise EntryError(f"{name} must be at most {MAX_ID_CHARS} characters, got {len(value)}")
    if len(value.encode()) > 255:
        raise EntryError(f"{name} must be at most 255 bytes in UTF-8")
    if not value.isprintable():
        raise EntryError(f"{name} must be printable text")


def _check_ts(ts_ns: int) -> None:
    if not MIN_TS_NS <= ts_ns < MAX_TS_NS:
        raise EntryError("time is required and must be between 2000-01-01 and 2100-01-01")


def _check_nonneg(name: str, value: int) -> None:
    if value < 0:
        raise EntryError(f"{name} must be >= 0, got {value}")


def check_event(event: dict[str, Any]) -> dict[str, Any]:
    """The event record if it is well formed; EntryError naming the first problem."""
    kind = event["kind"]
    if kind not in E.KINDS:
        raise EntryError(f"kind must be one of {', '.join(E.KINDS)}")
    _check_id("event_id", event["event_id"])
    _check_ts(event["ts"])
    _check_id("request_id", event["request_id"], required=False)
    _check_nonneg("item_id", event["item_id"])
    if kind in E.BUYER_KINDS:
        _check_nonneg("user_id", event["user_id"])
        if event["position"] > MAX_PAGE:
            raise EntryError(f"position must be 0..{MAX_PAGE}, got {event['position']}")
        if event["position"] and not event["request_id"]:
            raise EntryError("position needs the request_id of the feed it was shown in")
    if kind == E.PURCHASE:
        price = event["price"]
        if not (math.isfinite(price) and 0.0 <= price <= MAX_PRICE):
            raise EntryError(f"price must be a finite number in [0, {MAX_PRICE:g}], got {price}")
        if not 1 <= event["quantity"] <= MAX_QUANTITY:
            raise EntryError(f"quantity must be 1..{MAX_QUANTITY}, got {event['quantity']}")
    if kind == E.INVENTORY and not 0 <= event["stock"] <= MAX_STOCK:
        raise EntryError(f"stock must be 0..{MAX_STOCK}, got {event['stock']}")
    return event


def check_feed(feed: dict[str, Any]) -> dict[str, Any]:
    """The feed record if it is well formed; EntryError naming the first problem."""
    _check_id("request_id", feed["request_id"])
    _check_nonneg("user_id", feed["user_id"])
    _check_ts(feed["ts"])
    n = len(feed["items"])
    if n > MAX_PAGE:
        raise EntryError(f"item_ids must hold at most {MAX_PAGE} items, got {n}")
    for name in ("positions", "scores", "egmv", "propensities", "reasons"):
        if len(feed[name]) != n:
            raise EntryError(f"{name} must have one entry per item ({n}), got {len(feed[name])}")
    for name in ("categories", "new_seller", "prices"):
        if len(feed[name]) not in (0, n):
            raise EntryError(f"{name} must be empty or have one entry per item ({n})")
    for name in ("scores", "egmv", "propensities", "prices"):
        if not all(math.isfinite(v) for v in feed[name]):
            raise EntryError(f"{name} must be finite numbers")
    if any(not 0.0 < p <= 1.0 for p in feed["propensities"]):
        raise EntryError("propensities must be in (0, 1]")
    if any(i < 0 for i in feed["items"]):
        raise EntryError("item_ids must be >= 0")
    for name in ("model_version", "arm", "experiment", "experiment_arm"):
        _check_id(name, feed[name], required=False)
    features = feed.get("features")
    if features is not None:
        cols, values = features["cols"], features["values"]
        if cols <= 0 or len(values) != n * cols:
            raise EntryError(f"features must hold {n} rows of cols values, got {len(values)}")
        if not all(math.isfinite(v) for v in values):
            raise EntryError("features must be finite numbers")
    return feed


class RecentActivity:
    """Per user, the click and add-to-cart times of the last 24 h, and the counts training's
    ``user_recent_activity`` view would hold at a given time."""

    def __init__(self, max_users: int = MAX_USERS_TRACKED) -> None:
        self._events: OrderedDict[int, deque[tuple[int, bool]]] = OrderedDict()
        self.max_users = max_users

    def add(self, user_id: int, ts_ns: int, is_cart: bool) -> None:
        events = self._events.get(user_id)
        if events is None:
            events = self._events[user_id] = deque()
            while len(self._events) > self.max_users:
                self._events.popitem(last=False)
        else:
            self._events.move_to_end(user_id)
        events.append((ts_ns, is_cart))
        if len(events) > 1 and events[-2][0] > ts_ns:  # out of order: keep it sorted
            events = self._events[user_id] = deque(sorted(events))
        floor = _second(events[-1][0]) - WINDOW_S
        while events and _second(events[0][0]) <= floor:
            events.popleft()

    def counts(self, user_id: int) -> tuple[int, int, int]:
        """(views_24h, carts_24h, as of ns) at the user's latest event: events in
        (latest - 24 h, latest] in whole seconds, as training counts them
        (``training.features.recent_activity_rows``)."""
        events = self._events.get(user_id)
        if not events:
            return 0, 0, 0
        latest = events[-1][0]
        floor = _second(latest) - WINDOW_S
        carts = sum(1 for ts, cart in events if cart and _second(ts) > floor)
        views = sum(1 for ts, cart in events if not cart and _second(ts) > floor)
        return views, carts, latest


def _second(ts_ns: int) -> int:
    return ts_ns // 1_000_000_000


class RecentPurchases:
    """Per user, the items bought in the last ``days`` (by event time), newest last."""

    def __init__(
        self,
        days: float = PURCHASE_MEMORY_DAYS,
        max_users: int = MAX_USERS_TRACKED,
        max_items: int = MAX_BOUGHT_PER_USER,
    ) -> None:
        self.window_ns = int(days * 86_400 * 10**9)
        self.max_users = max_users
        self.max_items = max_items
        self._bought: OrderedDict[int, OrderedDict[int, int]] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, user_id: int, item_id: int, ts_ns: int) -> None:
        with self._lock:
            items = self._bought.get(user_id)
            if items is None:
                items = self._bought[user_id] = OrderedDict()
                while len(self._bought) > self.max_users:
                    self._bought.popitem(last=False)
            else:
                self._bought.move_to_end(user_id)
            items[item_id] = max(ts_ns, items.pop(item_id, ts_ns))
            while len(items) > self.max_items:
                items.popitem(last=False)

    def items(self, user_id: int, now_ns: int | None = None) -> np.ndarray:
        """The user's recently bought items (int64), those older than the window dropped."""
        with self._lock:
            items = self._bought.get(user_id)
            if not items:
                return np.empty(0, dtype=np.int64)
            ids = np.fromiter(items.keys(), dtype=np.int64, count=len(items))
            if now_ns is None:
                return ids
            ts = np.fromiter(items.values(), dtype=np.int64, count=len(items))
            return ids[ts > now_ns - self.window_ns]


Pusher = Callable[[str, Any], None]


class EventIngestor:
    """``ingest(events, feeds)``: validate, append, apply (module docstring). Thread-safe:
    one batch at a time is appended and applied, so the pushed windows follow log order."""

    def __init__(
        self,
        log: EventLog,
        push: Pusher | None = None,
        apply_inventory: Callable[[np.ndarray, np.ndarray], object] | None = None,
        purchases: RecentPurchases | None = None,
        activity: RecentActivity | None = None,
    ) -> None:
        self.log = log
        self.push = push
        self.apply_inventory = apply_inventory
        self.purchases = purchases if purchases is not None else RecentPurchases()
        self.activity = activity if activity is not None else RecentActivity()
        self.stats = IngestStats()
        self._lock = threading.Lock()

    def ingest(
        self, events: Sequence[dict[str, Any]], feeds: Sequence[dict[str, Any]]
    ) -> IngestResult:
        result = IngestResult()
        records: list[tuple[str, bytes]] = []
        kept: list[dict[str, Any]] = []
        for name, entries, check, key in (
            ("events", events, check_event, lambda r: r["event_id"]),
            ("feeds", feeds, check_feed, lambda r: E.feed_key(r["request_id"])),
        ):
            for index, entry in enumerate(entries):
                try:
                    record = check(entry)
                    payload = E.encode(record)
                except (EntryError, ValueError) as err:
                    result.rejected.append(Rejected(name, index, str(err)[:200]))
                    continue
                records.append((key(record), payload))
                kept.append(record)
        with self._lock:
            written = self.log.append(records) if records else []
            new = [record for record, fresh in zip(kept, written, strict=True) if fresh]
            result.accepted = len(new)
            result.duplicates = len(kept) - len(new)
            self.stats.batches += 1
            self.stats.events += sum(1 for r in new if r["type"] == E.EVENT)
            self.stats.feeds += sum(1 for r in new if r["type"] == E.FEED)
            self.stats.duplicates += result.duplicates
            self.stats.rejected += len(result.rejected)
            self._apply([r for r in new if r["type"] == E.EVENT], push=True)
        return result

    def replay(self, records: Iterable[dict[str, Any]]) -> int:
        """Rebuild the in-memory windows from logged events (at start); nothing is pushed:
        the online store already holds what was pushed before. Returns the events seen."""
        n = 0
        with self._lock:
            batch: list[dict[str, Any]] = []
            for record in records:
                if record.get("type") != E.EVENT:
                    continue
                batch.append(record)
                n += 1
                if len(batch) >= 10_000:
                    self._apply(batch, push=False)
                    batch = []
            self._apply(batch, push=False)
        return n

    def _apply(self, events: list[dict[str, Any]], push: bool) -> None:
        if not events:
            return
        stock_items: dict[int, tuple[int, int]] = {}  # item -> (ts, stock), latest wins
        touched: set[int] = set()
        for ev in events:
            kind = ev["kind"]
            if kind == E.INVENTORY:
                if not push:  # replay: the online store already holds the stock
                    continue
                seen = stock_items.get(ev["item_id"])
                if seen is None or ev["ts"] >= seen[0]:
                    stock_items[ev["item_id"]] = (ev["ts"], ev["stock"])
            elif kind in (E.CLICK, E.ADD_TO_CART):
                self.activity.add(ev["user_id"], ev["ts"], kind == E.ADD_TO_CART)
                touched.add(ev["user_id"])
            elif kind == E.PURCHASE:
                self.purchases.add(ev["user_id"], ev["item_id"], ev["ts"])
        if stock_items:
            items = np.fromiter(stock_items.keys(), dtype=np.int64, count=len(stock_items))
            stock = np.array([s for _, s in stock_items.values()], dtype=np.int64)
            if push:  # before the table: a refresh reading the store meanwhile agrees
                ts = np.array([t for t, _ in stock_items.values()], dtype=np.int64)
                self._push(INVENTORY_PUSH, _inventory_frame(items, stock, ts))
            if self.apply_inventory is not None:
                self.apply_inventory(items, stock)
        if touched and push:
            rows = [(u, *self.activity.counts(u)) for u in sorted(touched)]
            self._push(ACTIVITY_PUSH, _activity_frame(rows))

    def _push(self, source: str, frame: Any) -> None:
        if self.push is None:
            return
        started = time.perf_counter()
        try:
            self.push(source, frame)
            self.stats.pushes += 1
        except Exception:  # the events are durable; the views catch up at materialization
            self.stats.push_failures += 1
            log.exception("push to the online store failed", extra={"source": source})
        self.stats.last_push_ms = (time.perf_counter() - started) * 1e3


def _timestamps(ns: np.ndarray) -> Any:
    import pandas as pd

    return pd.to_datetime(ns, unit="ns", utc=True).as_unit("us")


def _inventory_frame(items: np.ndarray, stock: np.ndarray, ts: np.ndarray) -> Any:
    import pandas as pd

    from feature_repo import schema as S

    when = _timestamps(ts)
    return pd.DataFrame(
        {
            "item_id": items,
            S.EVENT_TIMESTAMP: when,
            "stock": stock,
            "in_stock": (stock > 0).astype(np.int64),
            S.CREATED: when,
        }
    )


def _activity_frame(rows: list[tuple[int, int, int, int]]) -> Any:
    import pandas as pd

    from feature_repo import schema as S

    users, views, carts, ts = (np.array(col, dtype=np.int64) for col in zip(*rows, strict=True))
    when = _timestamps(ts)
    return pd.DataFrame(
        {
            "user_id": users,
            S.EVENT_TIMESTAMP: when,
            "views_24h": views,
            "carts_24h": carts,
            S.CREATED: when,
        }
    )
