"""The gateway's readiness: alive is not the same as ready.

The gateway is *alive* as long as its server answers (health service ``""``, what a liveness
probe asks: restarting it would not help when its backends are down). It is *ready* (health
service ``homefeed.feed.v1.FeedService``, what a readiness probe and a load balancer ask)
only while at least one of its downstreams answers its own health check: with all three
gone it can serve nothing but popularity lists, and traffic belongs on a replica that can
do better.

``HopWatcher`` asks each downstream's health service over the gateway's own channels
(the same connections the feeds use, so a check also keeps them warm and reconnecting)
every ``interval_s``, and sets the readiness status when it changes. A downstream whose
check turns from failing to SERVING is reported to ``on_recovered`` (the gateway ends its
breaker's open wait, so full feeds return within a check interval of the downstream's
readiness rather than after the breaker's whole wait).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import HealthServicer

from services.common.periodic import Periodic

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HopWatcher:
    """Health-checks the downstreams and keeps ``service`` SERVING while any one answers."""

    def __init__(
        self,
        channels: Mapping[str, grpc.Channel],
        health: HealthServicer,
        service: str,
        interval_s: float = 1.0,
        timeout_s: float = 0.5,
        on_recovered: Callable[[str], None] | None = None,
    ) -> None:
        self._stubs = {name: health_pb2_grpc.HealthStub(ch) for name, ch in channels.items()}
        self._health = health
        self._service = service
        self._timeout_s = timeout_s
        self._on_recovered = on_recovered
        self.hops: dict[str, bool] = {}
        self.ready: bool | None = None
        self._periodic = Periodic("hop-watcher", interval_s, self._tick)

    def start(self) -> None:
        """Check once now (so readiness is right from the first probe), then every
        interval."""
        self.check()
        self._periodic.start()

    def close(self) -> None:
        self._periodic.close()

    def _tick(self) -> None:
        self.check()

    def check(self) -> bool:
        """Ask every downstream once; returns (and publishes) whether the gateway is ready."""
        hops = {name: self._serving(stub) for name, stub in self._stubs.items()}
        for name, up in hops.items():
            was = self.hops.get(name)
            if up and was is False and self._on_recovered is not None:
                self._on_recovered(name)
            if was != up:
                log.log(
                    logging.INFO if up else logging.WARNING,
                    "downstream %s is %s",
                    name,
                    "serving" if up else "not serving",
                    extra={"downstream": name, "serving": up},
                )
        self.hops = hops
        ready = any(hops.values())
        if ready != self.ready:
            self.ready = ready
            self._health.set(self._service, _SERVING if ready else _NOT_SERVING)
            if not ready:
                log.warning("not ready: no downstream is serving, only fallbacks are possible")
        return ready

    def _serving(self, stub: health_pb2_grpc.HealthStub) -> bool:
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=self._timeout_s)
        except grpc.RpcError:
            return False
        return bool(reply.status == _SERVING)
