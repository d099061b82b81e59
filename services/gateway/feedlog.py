"""The impression log: every served page goes to the event log (``EventsService.LogEvents``)
off the request path.

``FeedLogger.offer(page)`` only appends to a bounded queue and never blocks; a background
thread turns the pages into ``ServedFeed`` messages (request id, user, items, positions,
scores, exact propensities, model version, rollout and experiment arms, degraded flags,
the served items' categories, sellers and prices) and sends them in batches. A share of
the feeds (``features_rate``, chosen by a hash of the request id, so it is reproducible)
also carries the feature rows the page was ranked with, for training-serving skew checks.

Logging never fails a feed: a full queue drops the page, a failed send is retried once
(the log is idempotent by request id, so a retry never doubles a feed) and then dropped;
every dropped feed is counted (``stats``, the ``homefeed_feed_log`` metric).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np
from homefeed.common.v1 import common_pb2
from homefeed.events.v1 import events_pb2

from services.common.errors import describe_error
from services.common.matrix import extend_packed

log = logging.getLogger(__name__)

LOG_EVENTS = "homefeed.events.v1.EventsService/LogEvents"
MAX_BATCH = 100  # LogEventsRequest.feeds allows 100


@dataclass(frozen=True)
class LogInfo:
    """What the impression log needs beyond the response (only built when logging)."""

    user_id: int
    surface: int
    ts_ns: int
    country: str
    device: str
    seen_filtered: int
    seen_items: int
    categories: np.ndarray | None = None  # served items' facts; None when features failed
    new_seller: np.ndarray | None = None
    prices: np.ndarray | None = None
    matrix: common_pb2.FloatMatrix | None = None  # sampled feeds: the features' answer
    matrix_rows: np.ndarray | None = None  # its rows of the served items, in slot order


class FeedPage(Protocol):
    """What the logger reads of ``pipeline.FeedPage`` (a protocol: the pipeline imports
    this module, not the other way round)."""

    @property
    def request_id(self) -> str: ...
    @property
    def item_ids(self) -> np.ndarray: ...
    @property
    def scores(self) -> np.ndarray: ...
    @property
    def egmv(self) -> np.ndarray: ...
    @property
    def reasons(self) -> np.ndarray: ...
    @property
    def propensities(self) -> np.ndarray: ...
    @property
    def model_version(self) -> str: ...
    @property
    def arm(self) -> str: ...
    @property
    def degraded(self) -> tuple[int, ...]: ...
    @property
    def experiment(self) -> str: ...
    @property
    def experiment_arm(self) -> str: ...
    @property
    def times(self) -> Any: ...  # StageTimes: ``total`` in milliseconds
    @property
    def log(self) -> LogInfo | None: ...


@dataclass
class FeedLogStats:
    offered: int = 0
    sent: int = 0
    dropped_full: int = 0  # the queue was full: the log is down or slow
    dropped_failed: int = 0  # the send failed twice
    rejected: int = 0  # the log refused an entry (a bug: logged)
    batches: int = 0

    @property
    def lost(self) -> int:
        return self.dropped_full + self.dropped_failed + self.rejected


def sampled(request_id: str, rate: float) -> bool:
    """Whether this feed's feature rows are logged: a hash of the request id under ``rate``."""
    if rate <= 0.0:
        return False
    if rate >= 1.0:
        return True
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < rate


def served_feed(page: FeedPage) -> events_pb2.ServedFeed:
    """The page as the log's ``ServedFeed`` (built on the logger's thread)."""
    info = page.log
    assert info is not None
    feed = events_pb2.ServedFeed(
        request_id=page.request_id,
        user_id=info.user_id,
        surface=info.surface,
        model_version=page.model_version,
        arm=page.arm,
        experiment=page.experiment,
        experiment_arm=page.experiment_arm,
        seen_filtered=info.seen_filtered,
        seen_items=info.seen_items,
        latency_ms=page.times.total,
        country=info.country,
        device=info.device,
    )
    feed.time.FromNanoseconds(info.ts_ns)
    n = len(page.item_ids)
    feed.item_ids.extend(page.item_ids.tolist())
    extend_packed(feed, "positions", np.arange(1, n + 1))
    extend_packed(feed, "scores", page.scores)
    extend_packed(feed, "egmv", page.egmv)
    extend_packed(feed, "propensities", page.propensities)
    feed.reasons.extend(page.reasons.tolist())
    feed.degraded.extend(page.degraded)
    if info.categories is not None and info.new_seller is not None and info.prices is not None:
        feed.categories.extend(info.categories.tolist())
        extend_packed(feed, "new_seller", info.new_seller)
        extend_packed(feed, "prices", info.prices)
    if info.matrix is not None and info.matrix_rows is not None:
        cols = int(info.matrix.cols)
        values = np.asarray(info.matrix.values, dtype=np.float32).reshape(-1, cols)
        rows = values[info.matrix_rows]
        feed.features.rows = len(rows)
        feed.features.cols = cols
        feed.features.schema_hash = info.matrix.schema_hash
        extend_packed(feed.features, "values", rows.ravel())
    return feed


class FeedLogger:
    """Queue + sender thread (module docstring). ``send(request, timeout)`` is the RPC."""

    def __init__(
        self,
        send: Callable[[events_pb2.LogEventsRequest, float], events_pb2.LogEventsResponse],
        features_rate: float = 0.05,
        max_queue: int = 20_000,
        flush_s: float = 0.2,
        timeout_s: float = 2.0,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._send = send
        self._on_close = on_close
        self.features_rate = features_rate
        self.flush_s = flush_s
        self.timeout_s = timeout_s
        self.stats = FeedLogStats()
        self._queue: queue.Queue[FeedPage | None] = queue.Queue(max_queue)
        self._thread = threading.Thread(target=self._run, name="feed-log", daemon=True)
        self._started = False
        self._idle = threading.Event()
        self._idle.set()

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def wants_features(self, request_id: str) -> bool:
        return sampled(request_id, self.features_rate)

    def offer(self, page: FeedPage) -> bool:
        """Queue ``page`` for the log; False (and counted) when the queue is full."""
        self.stats.offered += 1
        try:
            self._queue.put_nowait(page)
        except queue.Full:
            self.stats.dropped_full += 1
            return False
        self._idle.clear()
        return True

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued page was sent or dropped; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.empty() and self._idle.wait(0.05):
                return True
        return False

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued (up to ``timeout``), then stop the thread."""
        if self._started:
            self.flush(timeout)
            self._queue.put(None)
            self._thread.join(timeout)
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.flush_s
            stop = False
            while len(batch) < MAX_BATCH:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    item = self._queue.get(timeout=left)
                except queue.Empty:
                    break
                if item is None:  # the stop signal: send what we have, then end
                    stop = True
                    break
                batch.append(item)
            self._deliver(batch)
            if self._queue.empty():
                self._idle.set()
            if stop:
                return

    def _deliver(self, pages: list[FeedPage]) -> None:
        request = events_pb2.LogEventsRequest()
        for page in pages:
            try:
                request.feeds.append(served_feed(page))
            except Exception:  # a page the logger cannot describe: a bug, never a crash
                self.stats.rejected += 1
                log.exception("cannot log a served feed", extra={"request_id": page.request_id})
        if not request.feeds:
            return
        for attempt in (1, 2):
            try:
                response = self._send(request, self.timeout_s)
            except grpc.RpcError as err:
                if attempt == 2:
                    self.stats.dropped_failed += len(request.feeds)
                    log.warning(
                        "event log unavailable, served feeds lost",
                        extra={"feeds": len(request.feeds), "error": describe_error(err)},
                    )
                continue
            self.stats.batches += 1
            self.stats.sent += len(request.feeds) - len(response.rejected)
            if response.rejected:
                self.stats.rejected += len(response.rejected)
                log.error(
                    "the event log refused served feeds (a gateway bug)",
                    extra={"first": response.rejected[0].reason, "count": len(response.rejected)},
                )
            return
