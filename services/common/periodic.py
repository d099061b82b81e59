"""A daemon thread that calls a function every few seconds until it is closed: the item
table's and the stock's refreshers."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Periodic:
    """``tick()`` every ``interval_s`` seconds, first after one interval; ``close`` stops it
    and waits for a tick in progress to end. ``tick`` handles its own errors."""

    def __init__(self, name: str, interval_s: float, tick: Callable[[], None]) -> None:
        self.name = name
        self.interval_s = interval_s
        self._tick = tick
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._tick()

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
