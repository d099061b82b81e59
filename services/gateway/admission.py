"""Load shedding at the gateway's door: a bounded number of feeds in flight, never a queue.

Past its capacity a server that queues makes every request late: each waits behind the
others, the downstream calls run out of budget, the breakers open on slowness that is only
contention, and every caller gets a fallback page. Shedding keeps the admitted requests as
fast as at normal load and refuses the rest at once, so a caller (or its load balancer) can
retry elsewhere or later.

- At most ``max_in_flight`` feeds are computed at a time; one more is refused with
  RESOURCE_EXHAUSTED at once (no waiting), with ``retry-after-ms`` in the trailing metadata.
- A request whose remaining deadline is shorter than ``min_budget_s`` is refused the same
  way before any work starts: it could only time out, after using capacity an admissible
  request needed.

The gRPC server's own thread pool has a few more threads than ``max_in_flight`` (health
checks, the refusals themselves) and refuses beyond that (``maximum_concurrent_rpcs``), so no
request waits in grpc's queue either.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from services.common.errors import ResourceExhausted

RETRY_AFTER_KEY = "retry-after-ms"


@dataclass(frozen=True)
class AdmissionConfig:
    # feeds computed at once: on 2 cores a feed costs ~16 ms of CPU across the four
    # processes, so 4 in flight already keep both cores busy; more only queue (docs/serving.md)
    max_in_flight: int = 4
    min_budget_s: float = 0.010  # a request with less time left is refused at the door
    retry_after_s: float = 0.050  # the hint sent with a refusal

    def __post_init__(self) -> None:
        if not 1 <= self.max_in_flight <= 1024:
            raise ValueError(f"max_in_flight must be 1..1024, got {self.max_in_flight}")
        if self.min_budget_s < 0:
            raise ValueError(f"min_budget_s must be >= 0 s, got {self.min_budget_s}")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be >= 0 s, got {self.retry_after_s}")


class Shed(ResourceExhausted):
    """A refusal at the door; ``retry_after_ms`` goes to the caller as trailing metadata.
    Logged at DEBUG: an overload brings them by the thousand (``Admission`` counts them)."""

    log_level = logging.DEBUG

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


def retry_after_s(err: object) -> float:
    """The ``retry-after-ms`` hint a refusal carried, in seconds (0: none or malformed), from
    a client-side ``grpc.RpcError`` (sync or aio): what a well-behaved caller waits."""
    trailing = getattr(err, "trailing_metadata", None)
    for key, value in (trailing() if callable(trailing) else None) or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(float(value) / 1e3, 0.0)
            except ValueError:
                return 0.0
    return 0.0


class Admission:
    """``admit(remaining_s)`` / ``release()`` around each feed; thread-safe."""

    def __init__(self, config: AdmissionConfig | None = None) -> None:
        self.config = config if config is not None else AdmissionConfig()
        self._lock = threading.Lock()
        self._in_flight = 0
        self.admitted = 0
        self.shed_full = 0
        self.shed_deadline = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def admit(self, remaining_s: float | None) -> None:
        """Take a slot or raise ``Shed``; every admitted call must ``release()``."""
        cfg = self.config
        retry_ms = round(cfg.retry_after_s * 1e3)
        if remaining_s is not None and remaining_s < cfg.min_budget_s:
            with self._lock:
                self.shed_deadline += 1
            raise Shed(
                f"the request's remaining deadline ({remaining_s * 1e3:.1f} ms) cannot cover a "
                f"feed (at least {cfg.min_budget_s * 1e3:.0f} ms): refused before starting",
                retry_ms,
            )
        with self._lock:
            if self._in_flight >= cfg.max_in_flight:
                self.shed_full += 1
                raise Shed(
                    f"the gateway is at capacity ({cfg.max_in_flight} feeds in flight): "
                    f"retry after {retry_ms} ms",
                    retry_ms,
                )
            self._in_flight += 1
            self.admitted += 1

    def release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {
                "in_flight": self._in_flight,
                "admitted": self.admitted,
                "shed_full": self.shed_full,
                "shed_deadline": self.shed_deadline,
            }
