"""The ranking server: loads the model, then serves ``RankingService`` with health and
reflection. ``python -m services.ranking`` runs ``main()``."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1.health import HealthServicer
from homefeed.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from contract.features import FEATURE_SCHEMA
from services.common.errors import ServiceError
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


def _build(settings: RankingSettings) -> tuple[grpc.Server, int, ModelHolder, HealthServicer]:
    holder = load_model(settings)  # before build_server, which reports SERVING
    if settings.admin_token is None:
        log.warning("HOMEFEED_ADMIN_TOKEN is not set: admin RPCs (Reload) are refused")
    servicer = RankingServicer(holder, settings.admin_token)
    server, port, health = build_server(
        settings.server,
        [SERVICE_NAME],
        lambda s: ranking_pb2_grpc.add_RankingServiceServicer_to_server(servicer, s),
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
        },
    )
    return server, port, holder, health


def create_server(settings: RankingSettings) -> tuple[grpc.Server, int, ModelHolder]:
    """A bound, not yet started server with the model loaded, its port (settings' port, a
    free one for 0) and the model holder. Raises StartupError when the model cannot load."""
    server, port, holder, _ = _build(settings)
    return server, port, holder


def _start(settings: RankingSettings) -> Started:
    server, _, _, health = _build(settings)
    return server, health, None


def main() -> int:
    """Serve until SIGTERM/SIGINT (``run_service``: exit 1 naming what could not load)."""
    return run_service(SERVICE, RankingSettings.from_env, _start)
