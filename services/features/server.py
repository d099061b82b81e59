"""The features server: opens the dataset's Feast store, loads the item table, starts its
refresher, then serves ``FeaturesService`` with health and reflection.
``python -m services.features`` runs ``main()``."""

from __future__ import annotations

import logging
import time

import grpc
from grpc_health.v1.health import HealthServicer
from homefeed.features.v1 import features_pb2, features_pb2_grpc

from services.common.server import Started, StartupError, build_server, run_service
from services.features.assembler import Assembler, FeastUserReader
from services.features.items import (
    ItemStore,
    catalog_loader,
    materialization_marker,
    open_reader,
)
from services.features.settings import SERVICE, FeaturesSettings
from training.feature_store import open_store
from training.simulate.config import SimConfig
from training.stages import read_meta

log = logging.getLogger(__name__)

SERVICE_NAME: str = features_pb2.DESCRIPTOR.services_by_name["FeaturesService"].full_name


def recency_days(settings: FeaturesSettings) -> float:
    """The logging policy's recency decay: the simulator config the dataset was made with,
    else the simulator's default (a real dataset has no logging policy of its own)."""
    config = read_meta(settings.paths, settings.dataset).get("config") or {}
    return float(config.get("recency_days", SimConfig.recency_days))


def load_item_store(settings: FeaturesSettings) -> tuple[ItemStore, FeastUserReader]:
    """The loaded item table (refresher not started) and the user reader; StartupError
    naming what is missing otherwise."""
    paths = settings.paths
    registry = paths.feast(settings.dataset) / "registry.db"
    if not registry.exists():
        raise StartupError(
            f"dataset {settings.dataset!r} has no Feast registry at {registry}: run "
            f"`homefeed features --dataset {settings.dataset}` (apply + materialize) first"
        )
    try:
        decay = recency_days(settings)
        load_catalog = catalog_loader(paths.raw(settings.dataset))
        catalog = load_catalog()
    except FileNotFoundError as err:
        raise StartupError(str(err)) from err
    store = open_store(
        settings.dataset, paths=paths, online=settings.online_store, redis=settings.redis
    )
    reader, fallback = open_reader(store, catalog.item_ids, fast_path=settings.sqlite_fast_path)
    items = ItemStore(
        reader,
        load_catalog,
        recency_days=decay,
        refresh_s=settings.refresh_s,
        batch_refresh_s=settings.batch_refresh_s,
        batch_marker=lambda: materialization_marker(store),
        fallback=fallback,
    )
    started = time.perf_counter()
    items.load()
    log.info(
        "features store ready",
        extra={
            "dataset": settings.dataset,
            "online_store": settings.online_store,
            "reader": reader.name,
            "items": items.snapshot().n_items,
            "load_ms": round((time.perf_counter() - started) * 1e3, 1),
            "recency_days": decay,
        },
    )
    return items, FeastUserReader(store)


def _build(
    settings: FeaturesSettings,
) -> tuple[grpc.Server, int, ItemStore, HealthServicer]:
    from services.features.servicer import FeaturesServicer

    items, users = load_item_store(settings)  # before build_server, which reports SERVING
    servicer = FeaturesServicer(Assembler(items, users))
    try:
        server, port, health = build_server(
            settings.server,
            [SERVICE_NAME],
            lambda s: features_pb2_grpc.add_FeaturesServiceServicer_to_server(servicer, s),
        )
    except OSError:
        items.close()
        raise
    items.start()
    return server, port, items, health


def create_server(settings: FeaturesSettings) -> tuple[grpc.Server, int, ItemStore]:
    """A bound, not yet started server, its port (a free one for port 0) and the item store
    whose refresher is running (``close()`` it after stopping the server)."""
    server, port, items, _ = _build(settings)
    return server, port, items


def _start(settings: FeaturesSettings) -> Started:
    server, _, items, health = _build(settings)
    return server, health, items.close


def main() -> int:
    """Serve until SIGTERM/SIGINT (``run_service``: exit 1 naming what could not load)."""
    return run_service(SERVICE, FeaturesSettings.from_env, _start)
