"""The traffic driver's event release: a page sees every event stamped before it, from any
session, and none stamped after (the skew check would otherwise find stream features that
training's point-in-time join cannot reproduce)."""

from __future__ import annotations

import heapq
import itertools
import threading

from homefeed.events.v1 import events_pb2

from tools.traffic import Driver, _event

S = 10**9


def _driver() -> tuple[Driver, list[list[int]]]:
    driver = object.__new__(Driver)  # the release logic only: no market, no channels
    driver.lock = threading.Lock()
    driver._send_lock = threading.Lock()
    driver._pending = []
    driver._serial = itertools.count()
    driver._clock = {}
    driver._dispatched = 0
    sent: list[list[int]] = []
    driver._send = lambda events: sent.append([e.time.ToNanoseconds() for e in events])  # type: ignore[method-assign]
    return driver, sent


def _click(ts: int) -> events_pb2.Event:
    return _event(events_pb2.EVENT_KIND_CLICK, f"e{ts}", ts, 1, 2, "r", 1)


def test_events_wait_until_no_request_to_come_is_earlier() -> None:
    driver, sent = _driver()
    driver.start(1, 100 * S)  # sessions start in time order: 100 s, then 110 s
    driver.start(2, 110 * S)
    driver._release(1, 100 * S, [])
    assert sent == []
    # session 1's first page led to a click at 105 s and a late purchase at 400 s; its next
    # page is at 160 s, session 2 still asks at 110 s: only 105 s can go
    driver._release(1, 160 * S, [_click(105 * S), _click(400 * S)])
    assert sent == [[105 * S]]
    driver._release(2, None, [_click(150 * S)])  # session 2 ends; a session may yet start
    assert sent == [[105 * S]]  # at 110 s or later, so 150 s waits
    driver.start(3, 170 * S)  # now every request to come is at 160 s (session 1) or later
    driver._release(3, 170 * S, [])
    assert sent == [[105 * S], [150 * S]]
    driver._release(1, None, [])
    driver._release(3, None, [])
    assert sent == [[105 * S], [150 * S]]  # 400 s is after the latest start
    driver.start(4, 500 * S)
    driver._release(4, 500 * S, [])
    assert sent == [[105 * S], [150 * S], [400 * S]]


def test_flush_sends_what_is_left_in_time_order_and_restock_queues_in_order() -> None:
    driver, sent = _driver()
    driver.start(1, 10 * S)
    driver._release(1, 10 * S, [_click(30 * S), _click(20 * S)])
    with driver.lock:  # what restock() does: queued with the others, by time
        heapq.heappush(driver._pending, (25 * S, next(driver._serial), _click(25 * S)))
    driver.flush()
    assert sent == [[20 * S, 25 * S, 30 * S]]
    assert driver._pending == []
