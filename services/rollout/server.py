"""The rollout controller's server: ``RolloutService`` (the gateways' ``Report``) on the
serving port, ``RolloutAdminService`` (the operators') on the admin port, and the
controller loop. ``python -m services.rollout`` runs ``main()``.

Readiness follows the lead: the ``RolloutService`` health status is SERVING only while this
replica leads, so a Kubernetes Service sends the gateways' reports to the leader; the
server itself (``""``) stays SERVING while the process is alive.
"""

# RPC methods carry the proto's names, as the generated base class does.
# ruff: noqa: N802

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from homefeed.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from homefeed.rollout.v1 import rollout_pb2, rollout_pb2_grpc

from contract.bundle import ALIAS_CHAMPION
from services.common import telemetry, tls
from services.common.admin import AUTHORIZATION_KEY, AdminToken
from services.common.errors import InvalidArgument, NotFound, Unavailable, quote
from services.common.server import Started, build_server, run_service
from services.rollout.controller import Controller, ControllerConfig
from services.rollout.settings import SERVICE, RolloutSettings
from services.rollout.state import Rollout, RolloutSpec
from services.rollout.store import FileLock, FileStore, LeaderElection, StateStore

log = logging.getLogger(__name__)

SERVICE_NAME: str = rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"].full_name
ADMIN_SERVICE_NAME: str = rollout_pb2.DESCRIPTOR.services_by_name["RolloutAdminService"].full_name
ADMIN_LINE = "HOMEFEED_ADMIN port={port}"
RELOAD_TIMEOUT_S = 180.0  # a reload downloads, verifies and warms a bundle
MAX_REASON = 500


class RegistryPromoter:
    """Promotion through the MLflow registry's alias and the stable deployment's Reload."""

    def __init__(self, tracking_uri: str, stable_admin_address: str, token: str | None) -> None:
        self.tracking_uri = tracking_uri
        self.stable_admin_address = stable_admin_address
        self._token = token

    def _registry(self):
        from contract.registry import Registry

        return Registry(self.tracking_uri)

    def check_version(self, version: str) -> None:
        from mlflow.exceptions import MlflowException

        registry = self._registry()
        try:
            registry.client.get_model_version(registry.name, version)
        except MlflowException as err:
            raise NotFound(
                f"version {quote(version)} of {registry.name} is not in the registry at "
                f"{self.tracking_uri}: {err.message}"
            ) from None

    def _current(self) -> str:
        from mlflow.exceptions import MlflowException

        try:
            return str(self._registry().get_version(ALIAS_CHAMPION))
        except MlflowException:
            return ""

    def _reload(self, version: str) -> None:
        """Reload ``version`` on every stable ranking pod: each address the admin host
        resolves to (a headless Service in Kubernetes names every pod; locally one)."""
        for address in stable_pods(self.stable_admin_address):
            with tls.channel(address) as channel:
                stub = ranking_pb2_grpc.RankingServiceStub(channel)
                stub.Reload(
                    ranking_pb2.ReloadRequest(target=version),
                    timeout=RELOAD_TIMEOUT_S,
                    metadata=((AUTHORIZATION_KEY, f"Bearer {self._token or ''}"),),
                )

    def promote(self, version: str) -> str:
        previous = self._current()
        registry = self._registry()
        registry.set_alias(int(version), ALIAS_CHAMPION)
        try:
            self._reload(version)
        except grpc.RpcError as err:
            if previous:
                registry.set_alias(int(previous), ALIAS_CHAMPION)
            raise Unavailable(
                f"stable ranking at {self.stable_admin_address} did not reload version "
                f"{version}: {err.code().name}: {err.details()}"
            ) from None
        return previous

    def restore(self, version: str) -> None:
        self._registry().set_alias(int(version), ALIAS_CHAMPION)
        try:
            self._reload(version)
        except grpc.RpcError as err:
            raise Unavailable(
                f"the alias is back on version {version}, but stable ranking at "
                f"{self.stable_admin_address} did not reload it: {err.code().name}: "
                f"{err.details()}; retry `homefeed rollout undo` or reload it by hand"
            ) from None


def stable_pods(address: str) -> list[str]:
    """``host:port`` of every pod behind ``address``: an IP literal as it is, a name as each
    of its IPv4 addresses (else IPv6), deduplicated in resolver order."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        return [address]
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError):
        return [address]  # let the call itself say what is wrong
    v4 = [info[4][0] for info in found if info[0] == socket.AF_INET]
    v6 = [f"[{info[4][0]}]" for info in found if info[0] == socket.AF_INET6]
    ips = list(dict.fromkeys(v4 or v6))
    return [f"{ip}:{port}" for ip in ips] or [address]


class CanaryProbe:
    """Whether the canary deployment answers SERVING (one channel, kept)."""

    def __init__(self, address: str) -> None:
        self._channel = tls.channel(address)
        self._stub = health_pb2_grpc.HealthStub(self._channel)

    def __call__(self) -> bool:
        try:
            reply = self._stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self._channel.close()


def to_status(rollout: Rollout | None) -> rollout_pb2.RolloutStatus:
    if rollout is None:
        return rollout_pb2.RolloutStatus(message="no rollout has been started")
    status = rollout_pb2.RolloutStatus(
        rollout_id=rollout.id,
        version=rollout.spec.version,
        phase=rollout.phase,
        weight=rollout.weight,
        step=rollout.step,
        failed_checks=rollout.failed_checks,
        threshold=rollout.spec.threshold,
        reason=rollout.reason,
        message=rollout.message,
        detail_json=json.dumps(rollout.to_json()),
    )
    status.steps.extend(rollout.spec.steps)
    return status


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, controller: Controller) -> None:
        self.controller = controller

    def Report(
        self, request: rollout_pb2.ReportRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.ReportResponse:
        if not request.replica or len(request.replica) > 253:
            raise InvalidArgument("replica must name the gateway replica (1..253 characters)")
        return self.controller.report(request)


class RolloutAdminServicer(rollout_pb2_grpc.RolloutAdminServiceServicer):
    """The operators' RPCs; each needs the admin token (``services.common.admin``)."""

    def __init__(self, controller: Controller, token: str | None, defaults: RolloutSpec) -> None:
        self.controller = controller
        self._admin = AdminToken(token)
        self.defaults = defaults

    def StartRollout(
        self, request: rollout_pb2.StartRolloutRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.RolloutStatus:
        self._admin.authorize(context, "StartRollout")
        d = self.defaults
        try:
            spec = RolloutSpec(
                version=request.version,
                steps=tuple(request.steps) or d.steps,
                interval_s=request.interval_s or d.interval_s,
                threshold=request.threshold or d.threshold,
                mirror_share=d.mirror_share if request.mirror_share < 0 else request.mirror_share,
                min_feeds=request.min_feeds or d.min_feeds,
            )
        except ValueError as err:
            raise InvalidArgument(str(err)[:MAX_REASON]) from None
        return to_status(self.controller.start_rollout(spec))

    def GetRolloutStatus(
        self, request: rollout_pb2.GetRolloutStatusRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.RolloutStatus:
        self._admin.authorize(context, "GetRolloutStatus")
        return to_status(self.controller.status())

    def AbortRollout(
        self, request: rollout_pb2.AbortRolloutRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.RolloutStatus:
        self._admin.authorize(context, "AbortRollout")
        return to_status(self.controller.abort(_reason(request.reason)))

    def UndoRollout(
        self, request: rollout_pb2.UndoRolloutRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.RolloutStatus:
        self._admin.authorize(context, "UndoRollout")
        return to_status(self.controller.undo(_reason(request.reason)))

    def ListRollouts(
        self, request: rollout_pb2.ListRolloutsRequest, context: grpc.ServicerContext
    ) -> rollout_pb2.ListRolloutsResponse:
        self._admin.authorize(context, "ListRollouts")
        rollouts = self.controller.history()
        if request.limit:
            rollouts = rollouts[: request.limit]
        return rollout_pb2.ListRolloutsResponse(rollouts=[to_status(r) for r in rollouts])


def _reason(text: str) -> str:
    if len(text) > MAX_REASON or not text.isprintable():
        raise InvalidArgument(f"reason must be printable text of at most {MAX_REASON} characters")
    return text


def _state(settings: RolloutSettings) -> tuple[StateStore, LeaderElection]:
    kube = settings.kubernetes
    if kube is not None:
        from services.rollout.kube import from_cluster

        return from_cluster(kube.namespace, kube.configmap, kube.lease, kube.identity)
    lock = settings.state_file.with_name(settings.state_file.name + ".lock")
    return FileStore(settings.state_file), FileLock(lock)


def build(
    settings: RolloutSettings,
) -> tuple[grpc.Server, grpc.Server, int, int, Controller, Started]:
    """The serving and admin servers (bound, not started), their ports, the controller (not
    started) and what ``run_service`` needs."""
    store, election = _state(settings)
    probe = CanaryProbe(settings.canary_address)
    config = ControllerConfig(
        canary_address=settings.canary_address,
        defaults=settings.defaults,
        analysis=settings.analysis,
        start_timeout_s=settings.start_timeout_s,
    )
    controller = Controller(
        store,
        election,
        RegistryPromoter(
            settings.tracking_uri, settings.stable_admin_address, settings.admin_token
        ),
        probe,
        config,
    )

    def weight() -> list[tuple[float, dict[str, str]]]:
        rollout = controller.status()
        if rollout is None:
            return [(0.0, {"rollout": ""})]
        return [(float(rollout.weight), {"rollout": rollout.id, "phase": rollout.phase})]

    telemetry.current().gauge(
        "homefeed_canary_weight", weight, description="percent of users in the canary arm"
    )
    if settings.admin_token is None:
        log.warning("HOMEFEED_ADMIN_TOKEN is not set: the rollout admin RPCs are refused")
    server, port, health = build_server(
        settings.server,
        [SERVICE_NAME],
        lambda s: rollout_pb2_grpc.add_RolloutServiceServicer_to_server(
            RolloutServicer(controller), s
        ),
    )
    serving = health_pb2.HealthCheckResponse

    def on_leading(leading: bool) -> None:  # readiness is the lead
        health.set(SERVICE_NAME, serving.SERVING if leading else serving.NOT_SERVING)

    on_leading(controller.leading)  # not yet: the first tick runs at start
    controller.on_leading = on_leading
    admin, admin_port, _ = build_server(
        settings.admin_server,
        [ADMIN_SERVICE_NAME],
        lambda s: rollout_pb2_grpc.add_RolloutAdminServiceServicer_to_server(
            RolloutAdminServicer(controller, settings.admin_token, settings.defaults), s
        ),
    )

    def on_stop() -> None:
        controller.close()
        admin.stop(None).wait()
        probe.close()

    return server, admin, port, admin_port, controller, (server, health, on_stop)


def create_server(settings: RolloutSettings) -> tuple[grpc.Server, int, Controller]:
    """The bound, not yet started serving server (Report), its port and the controller
    (not started; the admin server is left unstarted too)."""
    server, _, port, _, controller, _ = build(settings)
    return server, port, controller


def _start(settings: RolloutSettings) -> Started:
    _server, admin, port, admin_port, controller, started = build(settings)
    controller.tick()  # take the lead (or not) and load the state before the first report
    controller.start()
    admin.start()
    sys.stdout.write(ADMIN_LINE.format(port=admin_port) + "\n")  # before the READY line
    sys.stdout.flush()
    log.info(
        "rollout controller ready",
        extra={
            "port": port,
            "admin_port": admin_port,
            "canary": settings.canary_address,
            "stable_admin": settings.stable_admin_address,
            "state": settings.state_file if settings.kubernetes is None else settings.kubernetes,
            "leading": controller.leading,
        },
    )
    return started


def main() -> int:
    """Serve until SIGTERM/SIGINT (``run_service``: exit 1 naming what could not load)."""
    return run_service(SERVICE, RolloutSettings.from_env, _start)
