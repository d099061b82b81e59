"""A circuit breaker per downstream, with resilience4j's count-based semantics.

- CLOSED: calls go through. Each outcome enters a sliding window of the last ``window``
  calls. Once the window holds at least ``min_calls`` outcomes, a failure rate
  (failed / calls in the window) or a slow-call rate (calls that took ``slow_call_s`` or
  longer, failed or not / calls in the window) at or above its threshold opens the breaker
  (resilience4j opens at "equal or greater than").
- OPEN: ``try_acquire`` refuses every call, so the caller serves its fallback at once. The
  first ``try_acquire`` at least ``open_wait_s`` after opening moves to HALF_OPEN (lazily,
  as resilience4j does without its automatic transition: no timer thread).
- HALF_OPEN: at most ``half_open_calls`` trial calls get a permit; the others are refused.
  A trial that fails or is slow reopens the breaker (the wait starts again); once every
  trial has succeeded the breaker closes with an empty window. When the trials have not all
  reported within ``half_open_max_wait_s`` (a permit taken by a call that never reported),
  the next ``try_acquire`` reopens it, so the breaker can never hang in HALF_OPEN.

Unlike resilience4j's half-open state, which waits for every trial and compares their
failure rate with the threshold, one bad trial reopens at once: the downstream has just
been failing, and three trials are too few for a rate to mean anything.

Every transition starts a new epoch. ``try_acquire`` hands out a ``Permit`` that carries the
epoch, and an outcome reported with the permit of an older epoch is dropped: a slow call
let through while CLOSED must not count as a half-open trial when it returns after the
breaker opened. The breaker is thread-safe (one lock, held for a few attribute updates) and
takes its clock as an argument, so tests drive every transition with a fake clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

log = logging.getLogger(__name__)


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerConfig:
    """Thresholds of one breaker; the defaults are the gateway's (resilience4j's window and
    minimum are 100; the gateway's downstreams are called ~1000 times a second, so 20 calls
    are a few milliseconds of traffic)."""

    window: int = 20  # calls in the sliding window
    min_calls: int = 10  # outcomes needed before a rate can open the breaker
    failure_rate: float = 0.5  # open at >= this share of failed calls
    slow_rate: float = 0.5  # open at >= this share of slow calls
    slow_call_s: float = 0.040  # a call this long or longer is slow
    open_wait_s: float = 5.0  # OPEN -> HALF_OPEN after this
    half_open_calls: int = 3  # trial calls let through in HALF_OPEN
    half_open_max_wait_s: float = 5.0  # HALF_OPEN -> OPEN when the trials take longer

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1 call, got {self.window}")
        if not 1 <= self.min_calls <= self.window:
            raise ValueError(f"min_calls must be 1..window ({self.window}), got {self.min_calls}")
        for name in ("failure_rate", "slow_rate"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        for name in ("slow_call_s", "open_wait_s", "half_open_max_wait_s"):
            value = getattr(self, name)
            if not value > 0.0:
                raise ValueError(f"{name} must be > 0 s, got {value}")
        if self.half_open_calls < 1:
            raise ValueError(f"half_open_calls must be >= 1, got {self.half_open_calls}")


class Permit(NamedTuple):
    """Leave to make one call; report its outcome with ``on_success``/``on_failure``."""

    epoch: int
    state: State


class CircuitBreaker:
    """One downstream's breaker (see the module docstring).

    Use::

        permit = breaker.try_acquire()
        if permit is None:
            ...  # OPEN (or HALF_OPEN with no trial left): serve the fallback
        else:
            started = clock()
            try:
                result = call()
            except Exception:
                breaker.on_failure(permit, clock() - started)
                ...  # serve the fallback
            else:
                breaker.on_success(permit, clock() - started)
    """

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.config = config if config is not None else BreakerConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._state = State.CLOSED
        self._epoch = 0
        self._since = clock()  # when the current state began
        self._failed = [False] * self.config.window
        self._slow = [False] * self.config.window
        self._next = 0
        self._calls = 0  # outcomes in the window, up to ``window``
        self._failures = 0
        self._slows = 0
        self._trials_left = 0  # HALF_OPEN permits not yet handed out
        self._trials_ok = 0  # HALF_OPEN trials that succeeded
        self._open_count = 0

    @property
    def state(self) -> State:
        """The state as of the last call; OPEN stays OPEN until a ``try_acquire`` after the
        wait."""
        return self._state

    def try_acquire(self) -> Permit | None:
        """A permit for one call, or None when the call must not be made."""
        with self._lock:
            state = self._state
            if state is State.CLOSED:
                return Permit(self._epoch, state)
            now = self._clock()
            if state is State.OPEN:
                if now - self._since < self.config.open_wait_s:
                    return None
                self._transition(State.HALF_OPEN, now, "open wait elapsed")
            elif now - self._since >= self.config.half_open_max_wait_s:
                self._transition(State.OPEN, now, "half-open trials did not report in time")
                return None
            if self._trials_left == 0:
                return None
            self._trials_left -= 1
            return Permit(self._epoch, State.HALF_OPEN)

    def on_success(self, permit: Permit, duration_s: float) -> None:
        self._record(permit, failed=False, duration_s=duration_s)

    def on_failure(self, permit: Permit, duration_s: float) -> None:
        self._record(permit, failed=True, duration_s=duration_s)

    def probe_now(self) -> None:
        """End an OPEN breaker's wait now (the downstream's health check says it is back):
        the next ``try_acquire`` starts the half-open trials instead of waiting out
        ``open_wait_s``. Trials still decide whether it closes."""
        with self._lock:
            if self._state is State.OPEN:
                self._since = self._clock() - self.config.open_wait_s

    def release(self, permit: Permit) -> None:
        """Give back a permit whose call says nothing about the downstream's health (it
        refused the caller's input, or the call never left this process): no outcome is
        recorded, and a half-open trial is handed out again."""
        with self._lock:
            if permit.epoch == self._epoch and self._state is State.HALF_OPEN:
                self._trials_left += 1

    def snapshot(self) -> dict[str, float | int | str]:
        """State, window contents and rates, and how often the breaker has opened."""
        with self._lock:
            calls = self._calls
            return {
                "name": self.name,
                "state": self._state.value,
                "calls": calls,
                "failure_rate": self._failures / calls if calls else 0.0,
                "slow_rate": self._slows / calls if calls else 0.0,
                "opened": self._open_count,
            }

    def _record(self, permit: Permit, *, failed: bool, duration_s: float) -> None:
        slow = duration_s >= self.config.slow_call_s
        with self._lock:
            if permit.epoch != self._epoch:
                return
            if self._state is State.HALF_OPEN:
                if failed or slow:
                    what = "failed" if failed else f"slow ({duration_s * 1e3:.1f} ms)"
                    self._transition(State.OPEN, self._clock(), f"half-open trial {what}")
                    return
                self._trials_ok += 1
                if self._trials_ok >= self.config.half_open_calls:
                    self._transition(State.CLOSED, self._clock(), "half-open trials succeeded")
                return
            self._add(failed, slow)
            cfg = self.config
            if self._calls < cfg.min_calls:
                return
            failure_rate = self._failures / self._calls
            slow_rate = self._slows / self._calls
            if failure_rate >= cfg.failure_rate or slow_rate >= cfg.slow_rate:
                self._transition(
                    State.OPEN,
                    self._clock(),
                    f"failure rate {failure_rate:.0%}, slow-call rate {slow_rate:.0%} over the "
                    f"last {self._calls} calls",
                )

    def _add(self, failed: bool, slow: bool) -> None:
        i = self._next
        if self._calls == self.config.window:  # the oldest outcome leaves the window
            self._failures -= self._failed[i]
            self._slows -= self._slow[i]
        else:
            self._calls += 1
        self._failed[i] = failed
        self._slow[i] = slow
        self._failures += failed
        self._slows += slow
        self._next = (i + 1) % self.config.window

    def _transition(self, state: State, now: float, why: str) -> None:
        previous = self._state
        self._state = state
        self._epoch += 1
        self._since = now
        self._calls = self._failures = self._slows = self._next = 0
        self._trials_ok = 0
        self._trials_left = self.config.half_open_calls if state is State.HALF_OPEN else 0
        if state is State.OPEN:
            self._open_count += 1
        level = logging.INFO if state is State.HALF_OPEN else logging.WARNING
        log.log(
            level,
            "circuit breaker %s: %s -> %s",
            self.name,
            previous.value,
            state.value,
            extra={"downstream": self.name, "state": state.value, "reason": why},
        )
