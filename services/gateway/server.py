"""The gateway server: loads the popularity fallback, connects to the three downstreams and
serves ``FeedService`` with health and reflection. ``python -m services.gateway`` runs
``main()``."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1.health import HealthServicer
from homefeed.events.v1 import events_pb2, events_pb2_grpc
from homefeed.feed.v1 import feed_pb2, feed_pb2_grpc

from contract.bundle import POPULAR, BundleError
from contract.popular import PopularityLists
from services.common import telemetry, tls
from services.common.bundles import RegistryError, resolve_bundle
from services.common.server import Started, StartupError, build_server, run_service
from services.gateway.admission import Admission
from services.gateway.canary import CanaryRouter
from services.gateway.clients import CHANNEL_OPTIONS, Downstreams
from services.gateway.experiment import ExperimentError
from services.gateway.feedlog import FeedLogger
from services.gateway.pipeline import DOWNSTREAMS, FeedPipeline, make_breakers
from services.gateway.readiness import HopWatcher
from services.gateway.servicer import FeedServicer
from services.gateway.settings import SERVICE, GatewaySettings

log = logging.getLogger(__name__)

SERVICE_NAME: str = feed_pb2.DESCRIPTOR.services_by_name["FeedService"].full_name


def load_popularity(settings: GatewaySettings) -> tuple[PopularityLists, str]:
    """The popularity lists of the configured bundle, verified (checksums) before use, and
    the bundle's version (the one the mesh serves)."""
    source = settings.source
    try:
        resolved = resolve_bundle(source)
        return PopularityLists.load(resolved.path / POPULAR), resolved.version
    except (BundleError, RegistryError, ValueError, OSError) as err:
        raise StartupError(
            f"cannot load the popularity fallback from {source.describe()}: {err}"
        ) from err


def build_pipeline(
    settings: GatewaySettings, downstreams: Downstreams | None = None
) -> FeedPipeline:
    """The pipeline over gRPC clients of the configured addresses (or ``downstreams``);
    ``close()`` closes their channels."""
    popularity, version = load_popularity(settings)
    if downstreams is None:
        downstreams = Downstreams.connect(
            settings.retrieval_addr, settings.features_addr, settings.ranking_addr
        )
    router = None
    if settings.rollout_addr:
        router = CanaryRouter(settings.rollout_addr, settings.breaker)
    experiment = settings.experiment
    if experiment is not None:
        try:
            experiment.check_versions(version)
        except ExperimentError as err:
            raise StartupError(str(err)) from None
    feed_logger = None
    if settings.log_feeds:
        feed_logger = connect_feed_logger(
            settings.events_addr or settings.features_addr, settings.log_features_rate
        )
    pipeline = FeedPipeline(
        downstreams.retrieval,
        downstreams.features,
        downstreams.ranking,
        popularity,
        settings.pipeline,
        settings.rerank,
        make_breakers(settings.breaker),
        on_close=downstreams.close,
        model_version=version,
        router=router,
        experiment=experiment,
        feed_logger=feed_logger,
    )
    if router is not None:
        router.start()
    if feed_logger is not None:
        feed_logger.start()
    if experiment is not None:
        log.info("experiment running", extra={"experiment": experiment.to_json()})
    return pipeline


def connect_feed_logger(address: str, features_rate: float) -> FeedLogger:
    """The impression logger over a channel of its own to the events service."""
    channel = tls.channel(address, CHANNEL_OPTIONS)
    stub = events_pb2_grpc.EventsServiceStub(channel)

    def send(request: events_pb2.LogEventsRequest, timeout: float) -> events_pb2.LogEventsResponse:
        response: events_pb2.LogEventsResponse = stub.LogEvents(request, timeout=timeout)
        return response

    return FeedLogger(send, features_rate=features_rate, on_close=channel.close)


def _build(
    settings: GatewaySettings, pipeline: FeedPipeline | None
) -> tuple[grpc.Server, int, FeedPipeline, HealthServicer]:
    downstreams = None
    if pipeline is None:
        downstreams = Downstreams.connect(
            settings.retrieval_addr, settings.features_addr, settings.ranking_addr
        )
        pipeline = build_pipeline(settings, downstreams)
    admission = Admission(settings.admission)
    servicer = FeedServicer(pipeline, admission)
    register_metrics(pipeline, admission)
    server, port, health = build_server(
        settings.serving,
        [SERVICE_NAME],
        lambda s: feed_pb2_grpc.add_FeedServiceServicer_to_server(servicer, s),
    )
    if downstreams is not None:  # readiness follows the real downstreams' health
        channels = dict(zip(DOWNSTREAMS, downstreams.channels, strict=True))
        breakers = pipeline.breakers
        watcher = HopWatcher(
            channels,
            health,
            SERVICE_NAME,
            settings.hop_check_s,
            on_recovered=lambda name: breakers[name].probe_now(),
        )
        watcher.start()
        pipeline.add_closer(watcher.close)
    log.info(
        "gateway ready",
        extra={
            "port": port,
            "retrieval": settings.retrieval_addr,
            "features": settings.features_addr,
            "ranking": settings.ranking_addr,
            "popularity": settings.source.describe(),
            "candidates": settings.pipeline.candidates,
            "epsilon": settings.rerank.epsilon,
            "rollout_controller": settings.rollout_addr,
        },
    )
    return server, port, pipeline, health


_BREAKER_STATES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}


def register_metrics(pipeline: FeedPipeline, admission: Admission) -> None:
    """The gateway's scrape-time metrics (``services.common.telemetry``)."""
    tel = telemetry.current()
    tel.counter(
        "homefeed_shed",
        lambda: [
            (float(admission.shed_full), {"reason": "at_capacity"}),
            (float(admission.shed_deadline), {"reason": "deadline"}),
        ],
        description="requests refused at the door (RESOURCE_EXHAUSTED)",
    )

    def breakers() -> list[tuple[float, dict[str, str]]]:
        out = list(pipeline.breakers.values())
        if pipeline.router is not None:
            out.append(pipeline.router.breaker)
        return [(_BREAKER_STATES.get(str(b.state), -1.0), {"downstream": b.name}) for b in out]

    tel.gauge("homefeed_breaker_state", breakers, description="0 closed, 1 half-open, 2 open")
    router = pipeline.router
    if router is not None:
        tel.gauge(
            "homefeed_canary_weight",
            lambda: [(float(router.assignment.weight), {"rollout": router.assignment.rollout_id})],
            description="percent of users in the canary arm",
        )
    tel.model_info(lambda: pipeline.model_version)
    logger = pipeline.feed_logger
    if logger is not None:
        tel.counter(
            "homefeed_feed_log",
            lambda: [
                (float(logger.stats.sent), {"outcome": "sent"}),
                (float(logger.stats.dropped_full), {"outcome": "dropped_queue_full"}),
                (float(logger.stats.dropped_failed), {"outcome": "dropped_send_failed"}),
                (float(logger.stats.rejected), {"outcome": "rejected"}),
            ],
            description="served feeds sent to the event log, and those lost",
        )


def create_server(
    settings: GatewaySettings, pipeline: FeedPipeline | None = None
) -> tuple[grpc.Server, int, FeedPipeline]:
    """A bound, not yet started server, its port (settings' port, a free one for 0) and
    the pipeline it serves: ``pipeline`` when given (tests pass one over fake clients),
    else one over gRPC clients of the settings' addresses (``pipeline.close()`` closes their
    channels once the server has stopped). Raises StartupError when the popularity fallback
    cannot be loaded."""
    server, port, pipeline, _ = _build(settings, pipeline)
    return server, port, pipeline


def _start(settings: GatewaySettings) -> Started:
    server, _, pipeline, health = _build(settings, None)
    return server, health, pipeline.close


def main() -> int:
    """Serve until SIGTERM/SIGINT (``run_service``: exit 1 naming what could not load)."""
    return run_service(SERVICE, GatewaySettings.from_env, _start)
