"""The ranking server: loads the model, then serves ``RankingService`` with health and
reflection. ``python -m services.ranking`` runs ``main()``."""

from __future__ import annotations

import logging
import sys

import grpc
from grpc_health.v1.health import HealthServicer
from homefeed.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from contract.features import FEATURE_SCHEMA
from services.common import telemetry
from services.common.errors import ServiceError
from services.common.interceptors import MethodFilter
from services.common.server import Started, StartupError, build_server, run_service
from services.ranking.scorer import ModelHolder
from services.ranking.servicer import RankingServicer
from services.ranking.settings import SERVICE, RankingSettings

log = logging.getLogger(__name__)

SERVICE_NAME: str = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name


def load_model(settings: RankingSettings) -> ModelHolder:
    """A holder serving the start-up model; StartupError naming the source otherwise."""
    holder = ModelHolder(
        default_target=settings.default_target,
        cache_dir=settings.source.model_cache,
        tracking_uri=settings.source.registry_uri,
        allow_directories=settings.source.bundle_dir is not None,
        served=settings.score,
        expected_schema_hash=FEATURE_SCHEMA.hash,
    )
    try:
        holder.reload()
    except ServiceError as err:
        raise StartupError(f"cannot load {settings.source.describe()}: {err}") from err
    return holder


RANK = f"/{SERVICE_NAME}/Rank"
RELOAD = f"/{SERVICE_NAME}/Reload"
ADMIN_LINE = "HOMEFEED_ADMIN port={port}"


def _build(
    settings: RankingSettings,
) -> tuple[grpc.Server, int, ModelHolder, HealthServicer, RankingServicer]:
    holder = load_model(settings)  # before build_server, which reports SERVING
    telemetry.current().model_info(lambda: holder.current().version)
    if settings.admin_token is None:
        log.warning("HOMEFEED_ADMIN_TOKEN is not set: admin RPCs (Reload) are refused")
    if settings.faults is not None:
        log.warning(
            "serving with injected faults (a rehearsal)", extra={"faults": str(settings.faults)}
        )
    servicer = RankingServicer(holder, settings.admin_token, settings.faults)
    server, port, health = build_server(
        settings.server,
        [SERVICE_NAME],
        lambda s: ranking_pb2_grpc.add_RankingServiceServicer_to_server(servicer, s),
        interceptors=[
            MethodFilter({RELOAD}, "Reload is an admin RPC: it is served on the admin port")
        ],
    )
    model = holder.current()
    log.info(
        "ranking ready",
        extra={
            "port": port,
            "source": settings.source.describe(),
            "model_version": model.version,
            "bundle_version": model.bundle_version,
            "score": settings.score.value,
            "label": model.outcome["kind"],
            "label_window_days": model.outcome["window_days"],
            "score_meaning": model.outcome["score"],
        },
    )
    return server, port, holder, health, servicer


def create_server(settings: RankingSettings) -> tuple[grpc.Server, int, ModelHolder]:
    """A bound, not yet started serving server (Rank; Reload refused there) with the model
    loaded, its port (settings' port, a free one for 0) and the model holder. Raises
    StartupError when the model cannot load."""
    server, port, holder, _, _ = _build(settings)
    return server, port, holder


def create_admin_server(settings: RankingSettings, holder: ModelHolder) -> tuple[grpc.Server, int]:
    """A bound, not yet started admin server over ``holder``: Reload (and health), on
    ``settings.admin_port``; Rank is refused there."""
    servicer = RankingServicer(holder, settings.admin_token)
    return _admin(settings, servicer)


def _admin(settings: RankingSettings, servicer: RankingServicer) -> tuple[grpc.Server, int]:
    server, port, _ = build_server(
        settings.admin_server,
        [SERVICE_NAME],
        lambda s: ranking_pb2_grpc.add_RankingServiceServicer_to_server(servicer, s),
        interceptors=[MethodFilter({RANK}, "the admin port serves admin RPCs only")],
    )
    return server, port


def _start(settings: RankingSettings) -> Started:
    server, _, _, health, servicer = _build(settings)
    admin, admin_port = _admin(settings, servicer)
    admin.start()
    sys.stdout.write(ADMIN_LINE.format(port=admin_port) + "\n")  # before the READY line
    sys.stdout.flush()
    log.info("admin listening", extra={"port": admin_port})
    return server, health, lambda: admin.stop(None).wait()


def main() -> int:
    """Serve until SIGTERM/SIGINT (``run_service``: exit 1 naming what could not load)."""
    return run_service(SERVICE, RankingSettings.from_env, _start)
