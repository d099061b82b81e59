"""Simulated buyers through the running gateway (``homefeed traffic``).

For each simulated day after the dataset's last one, every user of the simulated
marketplace opens the home feed a Poisson number of times (their rate in the dataset's
logs), at hours of the day drawn from the logs' own request curve. A session asks the
gateway for a page (``GetFeed``, the simulated time in the request's context); with
probability ``next_page`` the buyer scrolls on and the next page request carries the items
already shown (``seen_item_ids``). The simulator's ground truth (the Oracle, never a
feature) decides what happens to each served item, with position bias:

    examined ~ Bernoulli(e(position)); click | examined; add-to-cart | click;
    purchase | add-to-cart, only while the item is in stock

and the session's clicks, add-to-carts, purchases and stock changes go back through
``LogEvents``: before each next page, the events stamped before it (a frontend streams
them), the rest at the session's end; so the features service updates the streaming views
and the next feed sees what happened before it, and nothing after. Stock follows the
purchases (an item that sells out is pushed out of stock and restocked at the next day's
start, as the simulator restocks).
Purchases happen within the session (the simulator delays some by days; the traffic
driver does not, so an experiment's short window sees them).

It also records, per experiment arm, the Oracle's expected value of every served page
(expected clicks, purchases, GMV and margin under the true response model: the noise-free
figure only a simulator can give), to compare with the lift measured from the sampled
outcomes. Writes ``reports/traffic.json``.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
from homefeed.common.v1 import common_pb2
from homefeed.events.v1 import events_pb2, events_pb2_grpc
from homefeed.feed.v1 import feed_pb2, feed_pb2_grpc

from contract import columns as C
from contract.paths import Paths
from contract.timeutil import NS_PER_DAY, NS_PER_S, to_ns
from training.simulate.groundtruth import Oracle
from training.tables import read_tables

log = logging.getLogger(__name__)

MIN_SESSIONS_PER_DAY = 0.02  # a user the logs never saw still comes by now and then
SEND_BATCH = 500  # events per LogEvents call (the service takes up to 1,000)
_STOCK = events_pb2.EVENT_KIND_INVENTORY


@dataclass(frozen=True)
class TrafficConfig:
    days: float = 2.0
    page_size: int = 20
    next_page: float = 0.3  # chance a buyer asks for a next page (with seen ids)
    max_pages: int = 3
    threads: int = 4
    seed: int = 0
    users: int | None = None  # sample this many users (None: all)
    timeout_s: float = 2.0
    activity_scale: float = 1.0  # multiplies every user's sessions per day


@dataclass
class ArmTally:
    users: set[int] = field(default_factory=set)
    feeds: int = 0
    sessions: int = 0
    errors: int = 0
    degraded: int = 0
    clicks: int = 0
    carts: int = 0
    purchases: int = 0
    gmv: float = 0.0
    oracle_clicks: float = 0.0
    oracle_purchases: float = 0.0
    oracle_gmv: float = 0.0
    oracle_margin: float = 0.0
    latency_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        users = max(len(self.users), 1)
        lat = np.asarray(self.latency_ms) if self.latency_ms else np.zeros(1)
        return {
            "users": len(self.users),
            "sessions": self.sessions,
            "feeds": self.feeds,
            "errors": self.errors,
            "degraded": self.degraded,
            "clicks": self.clicks,
            "add_to_carts": self.carts,
            "purchases": self.purchases,
            "gmv": round(self.gmv, 2),
            "gmv_per_user": self.gmv / users,
            "oracle": {
                "expected_clicks": self.oracle_clicks,
                "expected_purchases": self.oracle_purchases,
                "expected_gmv": self.oracle_gmv,
                "expected_margin": self.oracle_margin,
                "expected_gmv_per_user": self.oracle_gmv / users,
                "expected_gmv_per_feed": self.oracle_gmv / max(self.feeds, 1),
            },
            "latency_ms": {
                "p50": float(np.percentile(lat, 50)),
                "p99": float(np.percentile(lat, 99)),
            },
        }


class Marketplace:
    """The simulated users and items the driver plays, and the stock it keeps."""

    def __init__(self, paths: Paths, dataset: str) -> None:
        tables = read_tables(
            paths.raw(dataset),
            names=(C.USERS, C.ITEMS, C.IMPRESSIONS, C.INVENTORY),
            columns={
                C.IMPRESSIONS: [C.USER_ID, C.REQUEST_ID, C.TS],
                C.ITEMS: [C.ITEM_ID, C.PRICE, C.STOCK],
            },
        )
        self.oracle = Oracle.load(paths.ground_truth(dataset))
        truth = self.oracle.truth
        users = tables[C.USERS]
        self.user_ids = users[C.USER_ID].to_numpy(np.int64)
        self.country = users[C.COUNTRY].astype(str).to_numpy()
        self.device = users[C.DEVICE].astype(str).to_numpy()
        imp = tables[C.IMPRESSIONS]
        ts = to_ns(imp[C.TS])
        self.end_ns = int(truth.params["end_ns"])
        days = max((self.end_ns - int(ts.min())) / NS_PER_DAY, 1.0) if len(ts) else 1.0
        requests = imp.drop_duplicates(C.REQUEST_ID)[C.USER_ID].to_numpy(np.int64)
        counts = np.bincount(requests, minlength=int(self.user_ids.max()) + 1)
        self.rate = np.maximum(counts[self.user_ids] / days, MIN_SESSIONS_PER_DAY)
        # when in the day (UTC) the logs' feed requests come: sessions follow the same curve
        first = imp.drop_duplicates(C.REQUEST_ID)[C.TS]
        hours = np.bincount(first.dt.hour.to_numpy(), minlength=24).astype(np.float64) + 1.0
        self.hour_share = hours / hours.sum()
        items = tables[C.ITEMS]
        self.n_items = len(truth.item_price)
        self.item_price = truth.item_price
        self.full_stock = np.zeros(self.n_items, dtype=np.int64)
        self.full_stock[items[C.ITEM_ID].to_numpy(np.int64)] = items[C.STOCK].to_numpy(np.int64)
        inv = tables[C.INVENTORY]
        self.stock = self.full_stock.copy()
        if len(inv):
            last = inv.sort_values(C.TS).drop_duplicates(C.ITEM_ID, keep="last")
            self.stock[last[C.ITEM_ID].to_numpy(np.int64)] = last[C.STOCK].to_numpy(np.int64)
        self.stock_lock = threading.Lock()

    def take(self, item: int, quantity: int) -> int | None:
        """Buy ``quantity`` of ``item``: its new stock, or None when it is out of stock."""
        with self.stock_lock:
            if self.stock[item] <= 0:
                return None
            self.stock[item] = max(self.stock[item] - quantity, 0)
            return int(self.stock[item])

    def restock(self) -> np.ndarray:
        """Items sold out, put back to their catalogue stock (the simulator restocks daily)."""
        with self.stock_lock:
            out = np.flatnonzero((self.stock <= 0) & (self.full_stock > 0))
            self.stock[out] = self.full_stock[out]
            return out


def _event(
    kind: int,
    event_id: str,
    ts_ns: int,
    user: int,
    item: int,
    request_id: str = "",
    position: int = 0,
) -> events_pb2.Event:
    event = events_pb2.Event(
        event_id=event_id,
        kind=kind,
        user_id=user,
        item_id=item,
        request_id=request_id,
        position=position,
        surface=common_pb2.SURFACE_HOME,
    )
    event.time.FromNanoseconds(ts_ns)
    return event


class Driver:
    """Plays the sessions of one simulated day after another against the gateway."""

    def __init__(
        self,
        market: Marketplace,
        gateway: str,
        events: str,
        cfg: TrafficConfig,
    ) -> None:
        self.market = market
        self.cfg = cfg
        self._channels = [grpc.insecure_channel(gateway), grpc.insecure_channel(events)]
        self.feed = feed_pb2_grpc.FeedServiceStub(self._channels[0])
        self.events = events_pb2_grpc.EventsServiceStub(self._channels[1])
        self.arms: dict[str, ArmTally] = defaultdict(ArmTally)
        self.lock = threading.Lock()
        self.events_sent = 0
        self.events_rejected = 0
        self.event_errors = 0
        self.feed_errors = 0
        self.seen_repeats = 0  # a page item the session had already seen (must stay 0)
        # events wait here, by time, until no request still to come is earlier than them
        # (``_release``): a page never sees another session's later event early
        self._pending: list[tuple[int, int, events_pb2.Event]] = []
        self._serial = itertools.count()
        self._send_lock = threading.Lock()
        self._clock: dict[int, int] = {}  # in-flight session -> the time of its next request
        self._dispatched = 0  # the latest start time handed out (sessions start in order)
        self.quantity_extra = float(market.oracle.truth.params["quantity_extra_mean"])
        self.rows = np.arange(len(market.user_ids))  # the users played (rows of user_ids)
        if cfg.users is not None and cfg.users < len(self.rows):
            chosen = np.random.default_rng(cfg.seed).choice(self.rows, cfg.users, replace=False)
            self.rows = np.sort(chosen)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def sessions(self, day: int, rng: np.random.Generator) -> pd.DataFrame:
        m = self.market
        n = rng.poisson(m.rate[self.rows] * self.cfg.activity_scale)
        rows = np.repeat(self.rows, n)
        start = m.end_ns + day * NS_PER_DAY
        hour = rng.choice(24, size=len(rows), p=m.hour_share)
        ts = start + ((hour + rng.random(len(rows))) * (NS_PER_DAY // 24)).astype(np.int64)
        order = np.argsort(ts, kind="stable")
        return pd.DataFrame({"row": rows[order], "ts": ts[order]})

    def play(self, session: tuple[int, int, int]) -> None:
        """``run_session`` of (row, start, seed), called in start order by the pool."""
        row, ts_ns, seed = session
        self.start(seed, ts_ns)
        try:
            self.run_session(row, ts_ns, seed)
        finally:  # a session that failed holds no event back
            self._release(seed, None, [])

    def run_session(self, row: int, ts_ns: int, seed: int) -> None:
        m, cfg = self.market, self.cfg
        rng = np.random.default_rng(seed)
        user = int(m.user_ids[row])
        seen: list[int] = []
        events: list[events_pb2.Event] = []
        tally_rows: list[tuple[str, dict[str, Any]]] = []
        for page_no in range(cfg.max_pages):
            # what happened before this page is delivered before it is asked for, as
            # frontends stream their events, and nothing later: the buyer's own clicks,
            # carts and purchases (they change only this buyer's features) at once; stock
            # changes (every buyer's) once no request still to come is earlier
            own = [e for e in events if e.kind != _STOCK and e.time.ToNanoseconds() <= ts_ns]
            if own:
                self._send(sorted(own, key=lambda e: e.time.ToNanoseconds()))
            self._release(seed, ts_ns, [e for e in events if e.kind == _STOCK])
            events = [e for e in events if e.kind != _STOCK and e.time.ToNanoseconds() > ts_ns]
            request_id = f"t{seed:x}p{page_no}"
            request = feed_pb2.GetFeedRequest(
                request_id=request_id,
                user_id=user,
                surface=common_pb2.SURFACE_HOME,
                page_size=cfg.page_size,
                context=common_pb2.RequestContext(country=m.country[row], device=m.device[row]),
                seen_item_ids=seen,
            )
            request.context.time.FromNanoseconds(ts_ns)
            started = time.perf_counter()
            try:
                response = self.feed.GetFeed(request, timeout=cfg.timeout_s)
            except grpc.RpcError as err:
                with self.lock:
                    self.feed_errors += 1
                    log.debug("GetFeed failed: %s", err)
                break
            latency = (time.perf_counter() - started) * 1e3
            items = np.asarray(response.item_ids, dtype=np.int64)
            outcome = self._respond(user, items, ts_ns, request_id, rng, events)
            outcome["latency_ms"] = latency
            outcome["degraded"] = bool(len(response.degraded))
            outcome["repeats"] = len(set(items.tolist()) & set(seen))
            tally_rows.append((response.experiment_arm or response.arm or "none", outcome))
            seen.extend(items.tolist())
            ts_ns += 60 * NS_PER_S
            if rng.random() >= cfg.next_page or not len(items):
                break
        self._release(seed, None, events)
        with self.lock:
            for i, (arm, outcome) in enumerate(tally_rows):
                t = self.arms[arm]
                t.users.add(user)
                t.sessions += i == 0
                t.feeds += 1
                t.degraded += outcome["degraded"]
                t.clicks += outcome["clicks"]
                t.carts += outcome["carts"]
                t.purchases += outcome["purchases"]
                t.gmv += outcome["gmv"]
                t.oracle_clicks += outcome["oracle_clicks"]
                t.oracle_purchases += outcome["oracle_purchases"]
                t.oracle_gmv += outcome["oracle_gmv"]
                t.oracle_margin += outcome["oracle_margin"]
                t.latency_ms.append(outcome["latency_ms"])
                self.seen_repeats += outcome["repeats"]

    def _respond(
        self,
        user: int,
        items: np.ndarray,
        ts_ns: int,
        request_id: str,
        rng: np.random.Generator,
        events: list[events_pb2.Event],
    ) -> dict[str, Any]:
        m = self.market
        out = {"clicks": 0, "carts": 0, "purchases": 0, "gmv": 0.0}
        if not len(items):
            out.update(oracle_clicks=0.0, oracle_purchases=0.0, oracle_gmv=0.0, oracle_margin=0.0)
            return out
        known = items < m.n_items
        values = m.oracle.item_values(user, np.where(known, items, 0), pd.Timestamp(ts_ns))
        exam = m.oracle.truth.examination(np.arange(1, len(items) + 1))
        pc = np.where(known, values["click"], 0.0)
        buy = np.where(known, values["purchase"], 0.0)
        out["oracle_clicks"] = float(exam @ pc)
        out["oracle_purchases"] = float(exam @ buy)
        out["oracle_gmv"] = float(exam @ np.where(known, values["gmv"], 0.0))
        out["oracle_margin"] = float(exam @ np.where(known, values["margin"], 0.0))
        examined = rng.random(len(items)) < exam
        clicked = known & examined & (rng.random(len(items)) < pc)
        carted = clicked & (rng.random(len(items)) < values["cart"])
        bought = carted & (rng.random(len(items)) < values["buy"])
        for k in np.flatnonzero(clicked).tolist():
            item, pos = int(items[k]), k + 1
            t_click = ts_ns + int((2.0 * pos + rng.exponential(20.0)) * NS_PER_S)
            events.append(_event(events_pb2.EVENT_KIND_CLICK, f"{request_id}:{item}:c",
                                 t_click, user, item, request_id, pos))  # fmt: skip
            out["clicks"] += 1
            if not carted[k]:
                continue
            t_cart = t_click + int(rng.exponential(90.0) * NS_PER_S)
            events.append(_event(events_pb2.EVENT_KIND_ADD_TO_CART, f"{request_id}:{item}:a",
                                 t_cart, user, item, request_id, pos))  # fmt: skip
            out["carts"] += 1
            if not bought[k]:
                continue
            quantity = 1 + int(rng.poisson(self.quantity_extra))
            left = m.take(item, quantity)
            if left is None:  # sold out meanwhile
                continue
            t_buy = t_cart + int(rng.exponential(300.0) * NS_PER_S)
            purchase = _event(events_pb2.EVENT_KIND_PURCHASE, f"{request_id}:{item}:p",
                              t_buy, user, item, request_id, pos)  # fmt: skip
            price = float(m.item_price[item])
            purchase.price, purchase.quantity = price, quantity
            events.append(purchase)
            stock = _event(events_pb2.EVENT_KIND_INVENTORY, f"{request_id}:{item}:s",
                           t_buy, 0, item)  # fmt: skip
            stock.stock = left
            events.append(stock)
            out["purchases"] += 1
            out["gmv"] += price * quantity
        return out

    def start(self, session: int, ts_ns: int) -> None:
        """Session ``session`` starts at ``ts_ns`` (sessions start in time order)."""
        with self.lock:
            self._dispatched = max(self._dispatched, ts_ns)
            self._clock[session] = ts_ns

    def _release(self, session: int, next_ns: int | None, new: list[events_pb2.Event]) -> None:
        """Queue ``new`` events; record the session's next request time (None: it is over);
        then send every queued event no request still to come can precede: those at or
        before the earliest next request of the sessions in flight and the latest session
        start handed out (sessions are handed out in time order)."""
        with self._send_lock:  # released batches reach the server in time order
            with self.lock:
                for ev in new:
                    heapq.heappush(self._pending, (ev.time.ToNanoseconds(), next(self._serial), ev))
                if next_ns is None:
                    self._clock.pop(session, None)
                else:
                    self._clock[session] = next_ns
                horizon = min([*self._clock.values(), self._dispatched])
                due = []
                while self._pending and self._pending[0][0] <= horizon:
                    due.append(heapq.heappop(self._pending)[2])
            for lo in range(0, len(due), SEND_BATCH):
                self._send(due[lo : lo + SEND_BATCH])

    def flush(self) -> None:
        """Send every event still queued (the traffic is over)."""
        with self._send_lock:
            with self.lock:
                due = [heapq.heappop(self._pending)[2] for _ in range(len(self._pending))]
            for lo in range(0, len(due), SEND_BATCH):
                self._send(due[lo : lo + SEND_BATCH])

    def _send(self, events: list[events_pb2.Event]) -> None:
        request = events_pb2.LogEventsRequest(events=events)
        for attempt in (1, 2):
            try:
                response = self.events.LogEvents(request, timeout=5.0)
            except grpc.RpcError as err:
                if attempt == 2:
                    with self.lock:
                        self.event_errors += len(events)
                    log.warning("LogEvents failed: %s", err)
                continue
            with self.lock:
                self.events_sent += response.accepted + response.duplicates
                self.events_rejected += len(response.rejected)
            if response.rejected:
                log.warning("events rejected: %s", response.rejected[0].reason)
            return

    def restock(self, day: int) -> None:
        items = self.market.restock()
        if not len(items):
            return
        ts = self.market.end_ns + day * NS_PER_DAY
        for chunk in np.array_split(items, max(1, len(items) // 500 + 1)):
            events = []
            for item in chunk.tolist():
                ev = _event(events_pb2.EVENT_KIND_INVENTORY, f"restock:{day}:{item}", ts, 0, item)
                ev.stock = int(self.market.full_stock[item])
                events.append(ev)
            with self.lock:  # in time order with the purchases still queued before it
                for ev in events:
                    heapq.heappush(self._pending, (ts, next(self._serial), ev))


def _progress(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="session", leave=False, mininterval=1.0)


def run_traffic(
    paths: Paths,
    dataset: str,
    gateway: str,
    events: str,
    cfg: TrafficConfig,
    out: Path | None = None,
) -> dict[str, Any]:
    """Drive ``cfg.days`` simulated days through ``gateway``; the summary (also written to
    ``out``, default ``reports/traffic.json``)."""
    market = Marketplace(paths, dataset)
    driver = Driver(market, gateway, events, cfg)
    rng = np.random.default_rng(cfg.seed)
    started = time.perf_counter()
    sessions_done = 0
    whole_days = int(np.ceil(cfg.days))
    try:
        with ThreadPoolExecutor(cfg.threads, thread_name_prefix="traffic") as pool:
            for day in range(whole_days):
                driver.restock(day)
                plan = driver.sessions(day, rng)
                if day + 1 > cfg.days:  # a fractional last day
                    plan = plan.iloc[: int(len(plan) * (cfg.days - day))]
                seeds = rng.integers(0, 2**62, len(plan))
                bar = _progress(len(plan), f"traffic day {day + 1}/{whole_days}")
                for done in pool.map(
                    driver.play,
                    zip(plan["row"].tolist(), plan["ts"].tolist(), seeds.tolist(), strict=True),
                ):
                    del done
                    bar.update(1)
                bar.close()
                sessions_done += len(plan)
        driver.flush()
    finally:
        driver.close()
    seconds = time.perf_counter() - started
    feeds = sum(t.feeds for t in driver.arms.values())
    summary = {
        "dataset": dataset,
        "config": asdict(cfg),
        "seconds": round(seconds, 2),
        "sessions": sessions_done,
        "feeds": feeds,
        "feeds_per_s": feeds / seconds if seconds else 0.0,
        "simulated_days_per_minute": cfg.days / (seconds / 60.0) if seconds else 0.0,
        "events_sent": driver.events_sent,
        "events_rejected": driver.events_rejected,
        "event_errors": driver.event_errors,
        "feed_errors": driver.feed_errors,
        "seen_items_served_again": driver.seen_repeats,
        "start_ns": market.end_ns,
        "end_ns": market.end_ns + int(cfg.days * NS_PER_DAY),
        "arms": {arm: t.summary() for arm, t in sorted(driver.arms.items())},
    }
    out = out if out is not None else paths.reports / "traffic.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    return summary


def iter_rows(summary: dict[str, Any]) -> Iterator[tuple[str, ...]]:
    """The printed table: one row per arm."""
    yield ("arm", "users", "feeds", "purchases", "GMV/user", "oracle GMV/feed", "p99 ms")
    for arm, s in summary["arms"].items():
        yield (
            arm,
            str(s["users"]),
            str(s["feeds"]),
            str(s["purchases"]),
            f"{s['gmv_per_user']:.2f}",
            f"{s['oracle']['expected_gmv_per_feed']:.3f}",
            f"{s['latency_ms']['p99']:.1f}",
        )
