"""LogEvents: per-entry validation, the durable log, the streaming state the next feed sees,
and recovery after the ingesting process is killed with SIGKILL mid-stream."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest
from homefeed.common.v1 import common_pb2
from homefeed.events.v1 import events_pb2, events_pb2_grpc
from homefeed.features.v1 import features_pb2, features_pb2_grpc

from contract import columns as C
from contract import eventlog
from contract import events as E
from contract.feature_store import open_store
from contract.paths import REPO_ROOT, Paths
from services.common.settings import ServerSettings
from services.features.events import (
    WINDOW_S,
    EventIngestor,
    RecentActivity,
    RecentPurchases,
)
from services.features.server import create_server
from services.features.settings import FeaturesSettings
from training.tables import read_tables

TIMEOUT_S = 10.0
T0 = pd.Timestamp("2026-01-14 21:30", tz="UTC").value
HOUR = 3600 * 10**9
STRANGER = 10**12  # user ids no dataset has: pushing their activity disturbs no other test


def _event(kind: str, event_id: str, ts: int = T0, **fields: Any) -> dict[str, Any]:
    record = {
        "type": E.EVENT,
        "kind": kind,
        "event_id": event_id,
        "ts": ts,
        "user_id": fields.pop("user_id", STRANGER),
        "item_id": fields.pop("item_id", 1),
        "request_id": fields.pop("request_id", ""),
        "position": fields.pop("position", 0),
        "surface": "HOME",
    }
    record.update(fields)
    return record


class Pushes:
    def __init__(self) -> None:
        self.calls: list[tuple[str, pd.DataFrame]] = []

    def __call__(self, source: str, frame: pd.DataFrame) -> None:
        self.calls.append((source, frame))


# --- the ingestor, over a real segment log --------------------------------------------------


def test_a_bad_event_is_rejected_with_its_index_and_the_good_ones_are_kept(tmp_path: Path) -> None:
    pushes = Pushes()
    with eventlog.SegmentLog.open(tmp_path / "log") as log:
        ingestor = EventIngestor(log, push=pushes)
        batch = [
            _event(E.CLICK, "a"),
            _event(E.PURCHASE, "b", price=float("nan"), quantity=1),
            _event(E.CLICK, "c", ts=0),
            _event("teleport", "d"),
            _event(E.INVENTORY, "e", user_id=-1, stock=-3),
            _event(E.CLICK, "f", position=3),  # a slot without the feed it was in
            _event(E.ADD_TO_CART, "g", ts=T0 + 1),
        ]
        result = ingestor.ingest(batch, [])
        assert result.accepted == 2 and result.duplicates == 0
        reasons = {r.index: r.reason for r in result.rejected}
        assert sorted(reasons) == [1, 2, 3, 4, 5]
        assert "price" in reasons[1] and "time" in reasons[2] and "kind" in reasons[3]
        assert "stock" in reasons[4] and "request_id" in reasons[5]
        assert all(r.field == "events" and len(r.reason) <= 200 for r in result.rejected)
        again = ingestor.ingest(batch, [])  # a retried batch: stored once, applied once
        assert again.accepted == 0 and again.duplicates == 2
    stored = [E.decode(p)["event_id"] for _, _, p in eventlog.read(tmp_path / "log")]
    assert stored == ["a", "g"]
    activity = [frame for source, frame in pushes.calls if source == "user_recent_activity_push"]
    assert len(activity) == 1
    assert activity[0][["views_24h", "carts_24h"]].values.tolist() == [[1, 1]]


def test_recent_activity_counts_the_24_hours_before_the_latest_event_as_training_does() -> None:
    activity = RecentActivity()
    for ts, cart in ((T0, False), (T0 + HOUR, True), (T0 + 2 * HOUR, False)):
        activity.add(7, ts, cart)
    assert activity.counts(7)[:2] == (2, 1)
    activity.add(7, T0 + HOUR + WINDOW_S * 10**9, False)  # T0 and T0 + 1 h fall out: (t - 24 h, t]
    assert activity.counts(7)[:2] == (2, 0)
    activity.add(7, T0 + 30 * 60 * 10**9, True)  # late and before the window: not counted
    assert activity.counts(7)[:2] == (2, 0)
    activity.add(7, T0 + 3 * HOUR, True)  # late but inside the window: counted
    assert activity.counts(7)[:2] == (2, 1)
    assert activity.counts(8) == (0, 0, 0)


def test_recent_activity_is_training_recent_activity_rows_event_by_event() -> None:
    """The service's windows and the builder's table agree on every event, including events
    24 h apart to the second and within one second of that boundary."""
    from training.features import recent_activity_rows

    rng = np.random.default_rng(3)
    n = 400
    users = rng.integers(0, 3, n)
    ts = T0 + np.sort(rng.integers(0, 3 * 86_400 * 10**9, n))
    ts[50:60] = ts[40:50] + WINDOW_S * 10**9 + rng.integers(-(10**9), 10**9, 10)
    order = np.argsort(ts, kind="stable")
    users, ts = users[order], ts[order]
    carts = rng.random(n) < 0.3
    activity = RecentActivity()
    served = []
    for user, t, cart in zip(users.tolist(), ts.tolist(), carts.tolist(), strict=True):
        activity.add(user, t, cart)
        views, n_carts, at = activity.counts(user)
        served.append((user, at, views, n_carts))
    table = recent_activity_rows(users, ts, carts)
    expected = {
        (int(u), int(t)): (int(v), int(c))
        for u, t, v, c in zip(
            table["user_id"],
            table["event_timestamp"].astype("int64"),
            table["views_24h"],
            table["carts_24h"],
            strict=True,
        )
    }
    assert len(expected) == len(served)  # no two events of a user in one nanosecond
    assert [expected[(user, at)] for user, at, _, _ in served] == [
        (views, n_carts) for _, _, views, n_carts in served
    ]
    assert max(views for _, _, views, _ in served) > 5  # windows that hold something


def test_recent_purchases_expire_and_replay_rebuilds_them(tmp_path: Path) -> None:
    bought = RecentPurchases(days=1.0)
    bought.add(1, 10, T0)
    bought.add(1, 11, T0 + 20 * HOUR)
    assert sorted(bought.items(1, T0 + HOUR).tolist()) == [10, 11]
    assert bought.items(1, T0 + 25 * HOUR).tolist() == [11]
    assert bought.items(2, T0).tolist() == []
    with eventlog.SegmentLog.open(tmp_path / "log") as log:
        EventIngestor(log).ingest([_event(E.PURCHASE, "p", item_id=42, price=3.0, quantity=2)], [])
    records = (E.decode(p) for _, _, p in eventlog.read(tmp_path / "log"))
    with eventlog.SegmentLog.open(tmp_path / "log") as log:
        fresh = EventIngestor(log)
        assert fresh.replay(records) == 1
        assert fresh.purchases.items(STRANGER).tolist() == [42]


# --- the service: LogEvents next to GetFeatures ---------------------------------------------


@dataclass(frozen=True)
class Served:
    events: events_pb2_grpc.EventsServiceStub
    features: features_pb2_grpc.FeaturesServiceStub
    store: Any
    log_dir: Path
    items: list[int]
    stock: dict[int, int]


@pytest.fixture(scope="module")
def served(
    tiny_dataset: dict, tiny_trained: dict, home: Paths, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    dataset = tiny_dataset["dataset"]
    log_dir = tmp_path_factory.mktemp("events") / "log"
    settings = FeaturesSettings(
        server=ServerSettings(port=0, max_workers=4),
        home=home.home,
        dataset=dataset,
        event_log=str(log_dir),
    )
    server, port, items = create_server(settings)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    catalog = read_tables(home.raw(dataset), [C.ITEMS])[C.ITEMS]
    chosen = catalog[C.ITEM_ID].to_numpy(np.int64)[:3].tolist()
    snap = items.snapshot()
    rows = snap.index.rows(np.asarray(chosen))
    stock = dict(zip(chosen, snap.features["stock"][rows].tolist(), strict=True))
    store = open_store(dataset, paths=home, online="sqlite")
    try:
        yield Served(
            events=events_pb2_grpc.EventsServiceStub(channel),
            features=features_pb2_grpc.FeaturesServiceStub(channel),
            store=store,
            log_dir=log_dir,
            items=chosen,
            stock=stock,
        )
        restock = [
            _proto(events_pb2.EVENT_KIND_INVENTORY, f"restore:{i}", item_id=i, stock=max(s, 1))
            for i, s in stock.items()
        ]
        events_pb2_grpc.EventsServiceStub(channel).LogEvents(
            events_pb2.LogEventsRequest(events=restock), timeout=TIMEOUT_S
        )
    finally:
        channel.close()
        server.stop(0).wait()
        items.close()


def _proto(kind: int, event_id: str, ts: int = T0, **fields: Any) -> events_pb2.Event:
    event = events_pb2.Event(event_id=event_id, kind=kind, **fields)
    event.time.FromNanoseconds(ts)
    return event


def _available(served: Served, user_id: int, items: list[int]) -> list[bool]:
    request = features_pb2.GetFeaturesRequest(
        request_id="t", user_id=user_id, item_ids=items, surface=common_pb2.SURFACE_HOME
    )
    request.context.time.FromNanoseconds(T0 + HOUR)
    return list(served.features.GetFeatures(request, timeout=TIMEOUT_S).available)


def test_an_item_logged_out_of_stock_is_unavailable_on_the_very_next_request(
    served: Served,
) -> None:
    item = served.items[0]
    assert _available(served, 1, [item]) == [True]
    reply = served.events.LogEvents(
        events_pb2.LogEventsRequest(
            events=[_proto(events_pb2.EVENT_KIND_INVENTORY, "oos", item_id=item, stock=0)]
        ),
        timeout=TIMEOUT_S,
    )
    assert reply.accepted == 1 and not reply.rejected
    assert _available(served, 1, [item]) == [False]  # no refresh waited for
    online = served.store.get_online_features(
        features=["item_inventory:in_stock", "item_inventory:stock"],
        entity_rows=[{C.ITEM_ID: item}],
    ).to_dict()
    assert online["in_stock"] == [0] and online["stock"] == [0]


def test_an_item_just_bought_is_unavailable_to_its_buyer_only(served: Served) -> None:
    item = served.items[1]
    buyer, other = STRANGER + 1, STRANGER + 2
    purchase = _proto(
        events_pb2.EVENT_KIND_PURCHASE, "buy", user_id=buyer, item_id=item, price=9.5, quantity=1
    )
    reply = served.events.LogEvents(
        events_pb2.LogEventsRequest(events=[purchase]), timeout=TIMEOUT_S
    )
    assert reply.accepted == 1
    assert _available(served, buyer, [item, served.items[2]]) == [False, True]
    assert _available(served, other, [item]) == [True]


def test_clicks_update_the_users_recent_activity_in_the_online_store(served: Served) -> None:
    user = STRANGER + 3
    clicks = [
        _proto(events_pb2.EVENT_KIND_CLICK, f"v{k}", T0 + k, user_id=user, item_id=served.items[2])
        for k in range(3)
    ]
    cart = _proto(events_pb2.EVENT_KIND_ADD_TO_CART, "c0", T0 + 5, user_id=user, item_id=1)
    served.events.LogEvents(events_pb2.LogEventsRequest(events=[*clicks, cart]), timeout=TIMEOUT_S)
    online = served.store.get_online_features(
        features=["user_recent_activity:views_24h", "user_recent_activity:carts_24h"],
        entity_rows=[{C.USER_ID: user}],
    ).to_dict()
    assert online["views_24h"] == [3] and online["carts_24h"] == [1]


def test_malformed_batches_are_refused_and_bad_entries_named(served: Served) -> None:
    too_many = events_pb2.LogEventsRequest(
        events=[_proto(events_pb2.EVENT_KIND_CLICK, f"x{i}") for i in range(1001)]
    )
    with pytest.raises(grpc.RpcError) as err:
        served.events.LogEvents(too_many, timeout=TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events" in (err.value.details() or "")
    mixed = events_pb2.LogEventsRequest(
        events=[
            _proto(events_pb2.EVENT_KIND_CLICK, "ok", user_id=STRANGER + 4, item_id=5),
            _proto(events_pb2.EVENT_KIND_UNSPECIFIED, "kindless"),
            _proto(events_pb2.EVENT_KIND_CLICK, "x" * 500),
        ],
        feeds=[events_pb2.ServedFeed(request_id="r", user_id=1, item_ids=[1, 2])],
    )
    mixed.feeds[0].time.FromNanoseconds(T0)
    reply = served.events.LogEvents(mixed, timeout=TIMEOUT_S)
    assert reply.accepted == 1
    where = {(r.field, r.index): r.reason for r in reply.rejected}
    assert set(where) == {("events", 1), ("events", 2), ("feeds", 0)}
    assert "kind" in where[("events", 1)] and "128" in where[("events", 2)]
    assert "positions" in where[("feeds", 0)]


# --- kill -9 in the middle of a stream ------------------------------------------------------


def _start_features(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[str], int]:
    with log_path.open("a") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.features"],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
    assert proc.stdout is not None
    ready = proc.stdout.readline()
    assert ready.startswith("HOMEFEED_READY port="), log_path.read_text()[-3000:]
    return proc, int(ready.strip().split("=", 1)[1])


def test_after_kill_9_every_acknowledged_event_is_in_the_log_exactly_once(
    tiny_bundle: Path, tiny_dataset: dict, home: Paths, tmp_path: Path
) -> None:
    log_dir = tmp_path / "eventlog"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "HOMEFEED_HOME": str(home.home),
        "HOMEFEED_DATASET": tiny_dataset["dataset"],
        "HOMEFEED_FEATURES_BUNDLE_DIR": str(tiny_bundle),
        "HOMEFEED_FEATURES_PORT": "0",
        "HOMEFEED_EVENT_LOG": str(log_dir),
    }
    batches = [
        [
            _proto(events_pb2.EVENT_KIND_CLICK, f"b{b}e{i}", T0 + b, user_id=STRANGER + 10 + i)
            for i in range(25)
        ]
        for b in range(400)
    ]
    acked: list[int] = []
    stop = threading.Event()
    proc, port = _start_features(env, tmp_path / "features.log")
    try:

        def stream() -> None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = events_pb2_grpc.EventsServiceStub(channel)
                for b, batch in enumerate(batches):
                    if stop.is_set():
                        return
                    try:
                        stub.LogEvents(events_pb2.LogEventsRequest(events=batch), timeout=5)
                    except grpc.RpcError:
                        return  # the process died mid-call: this batch is unacknowledged
                    acked.append(b)

        sender = threading.Thread(target=stream)
        sender.start()
        deadline = time.monotonic() + 60
        while len(acked) < 30 and time.monotonic() < deadline and sender.is_alive():
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        stop.set()
        sender.join(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(acked) >= 30, (tmp_path / "features.log").read_text()[-3000:]
    ids = [event_id for _, event_id, _ in eventlog.read(log_dir)]
    assert len(ids) == len(set(ids))
    for b in acked:
        assert {e.event_id for e in batches[b]} <= set(ids)

    # restarted on the same log, the client retries everything: each event exactly once
    proc, port = _start_features(env, tmp_path / "features.log")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = events_pb2_grpc.EventsServiceStub(channel)
            stored = dupes = 0
            for batch in batches[: max(acked) + 5]:
                reply = stub.LogEvents(events_pb2.LogEventsRequest(events=batch), timeout=5)
                assert not reply.rejected
                stored, dupes = stored + reply.accepted, dupes + reply.duplicates
        assert dupes >= 25 * len(acked)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    ids = [event_id for _, event_id, _ in eventlog.read(log_dir)]
    expected = {e.event_id for batch in batches[: max(acked) + 5] for e in batch}
    assert len(ids) == len(set(ids)) and set(ids) == expected
