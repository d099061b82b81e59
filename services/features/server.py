"""The features server: loads the bundle's catalogue, opens the dataset's Feast store, loads
the item table, starts its refresher, then serves ``FeaturesService`` with health and reflection.
``python -m services.features`` runs ``main()``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from grpc_health.v1.health import HealthServicer
from homefeed.events.v1 import events_pb2, events_pb2_grpc
from homefeed.features.v1 import features_pb2, features_pb2_grpc

from contract import bundle as B
from contract import events as E
from contract.bundle import BundleError
from contract.catalog import Catalog
from contract.eventlog import EventLogError, RedisStreamLog, SegmentLog, is_redis_url
from contract.feature_store import open_store
from contract.heuristic import Heuristic
from feature_repo import schema as S
from services.common import telemetry
from services.common.bundles import RegistryError, resolve_bundle
from services.common.online import open_reader
from services.common.server import Started, StartupError, build_server, run_service
from services.common.users import UserReader, open_user_reader
from services.features.assembler import Assembler
from services.features.events import EventIngestor
from services.features.items import ITEM_VIEWS, ItemStore, MaterializationWatch
from services.features.settings import SERVICE, FeaturesSettings

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)

SERVICE_NAME: str = features_pb2.DESCRIPTOR.services_by_name["FeaturesService"].full_name
EVENTS_SERVICE_NAME: str = events_pb2.DESCRIPTOR.services_by_name["EventsService"].full_name


def load_item_store(
    settings: FeaturesSettings,
) -> tuple[ItemStore, UserReader, str, FeatureStore]:
    """The loaded item table (refresher not started), the user reader, the version of the
    bundle whose catalogue it serves and the store; StartupError naming what is missing
    otherwise."""
    paths = settings.paths
    registry = paths.feast(settings.dataset) / "registry.db"
    if not registry.exists():
        raise StartupError(
            f"dataset {settings.dataset!r} has no Feast registry at {registry}: run "
            f"`homefeed features --dataset {settings.dataset}` (apply + materialize) first"
        )
    source = settings.source
    try:
        resolved = resolve_bundle(source)
        catalog = Catalog.load(resolved.path / B.CATALOG)
        heuristic = Heuristic.load(resolved.path / B.HEURISTIC)
    except (BundleError, RegistryError, ValueError, OSError) as err:
        raise StartupError(f"cannot load {source.describe()}: {err}") from err
    store = open_store(
        settings.dataset,
        paths=paths,
        online=settings.online_store,
        redis=settings.redis,
        offline=False,
    )
    reader, fallback = open_reader(
        store, catalog.item_ids, ITEM_VIEWS, fast_path=settings.sqlite_fast_path
    )
    items = ItemStore(
        reader,
        catalog,
        heuristic,
        refresh_s=settings.refresh_s,
        batch_refresh_s=settings.batch_refresh_s,
        batch_marker=MaterializationWatch(store),
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
            "model_version": resolved.version,
            "recency_days": heuristic.recency_days,
        },
    )
    return items, open_user_reader(store, np.arange(64)), resolved.version, store


def stream_state(features_dir: Path) -> Iterator[dict[str, Any]]:
    """The batch data's last engagement and purchase events (``feature_repo.schema.
    STREAM_STATE``, written by ``homefeed features``) as event records, oldest first: the
    per-user windows start from them, then the event log replays on top. A dataset built
    before the file existed has none: the windows start empty (and say so)."""
    import pyarrow.parquet as pq

    path = features_dir / S.STREAM_STATE
    if not path.exists():
        log.warning(
            "no stream state: recent-activity windows start empty", extra={"path": str(path)}
        )
        return
    table = pq.read_table(path, columns=["kind", "user_id", "item_id", "ts"])
    for kind, user, item, ts in zip(
        *(table.column(c).to_pylist() for c in ("kind", "user_id", "item_id", "ts")), strict=True
    ):
        yield {"type": E.EVENT, "kind": kind, "user_id": user, "item_id": item, "ts": ts}


def open_ingestor(
    settings: FeaturesSettings, items: ItemStore, store: FeatureStore
) -> tuple[EventIngestor, Callable[[], None]]:
    """The event log opened (a torn tail recovered), the ingestor that pushes to ``store``
    and updates ``items``, its windows replayed from the log; and how to close the log."""
    from feast.data_source import PushMode

    location = settings.event_log_location
    started = time.perf_counter()
    try:
        event_log: SegmentLog | RedisStreamLog = (
            RedisStreamLog.open(location)
            if is_redis_url(location)
            else SegmentLog.open(location, fsync=settings.event_log_fsync)
        )
    except (OSError, ValueError, EventLogError) as err:
        raise StartupError(f"cannot open the event log {location}: {err}") from err

    def push(source: str, frame: Any) -> None:
        store.push(source, frame, to=PushMode.ONLINE)

    ingestor = EventIngestor(event_log, push=push, apply_inventory=items.apply_inventory)
    seeded = ingestor.replay(stream_state(settings.paths.features(settings.dataset)))
    replayed = ingestor.replay(E.decode(payload) for _, _, payload in event_log.read())
    log.info(
        "event log open",
        extra={
            "event_log": location,
            "seeded_events": seeded,
            "replayed_events": replayed,
            **{k: v for k, v in event_log.stats().items() if isinstance(v, int | float)},
            "ms": round((time.perf_counter() - started) * 1e3, 1),
        },
    )
    return ingestor, event_log.close


def _build(
    settings: FeaturesSettings,
) -> tuple[grpc.Server, int, ItemStore, HealthServicer]:
    from services.features.servicer import EventsServicer, FeaturesServicer

    items, users, version, store = load_item_store(settings)  # before build_server: SERVING
    try:
        ingestor, close_log = open_ingestor(settings, items, store)
    except BaseException:
        items.close()
        raise
    servicer = FeaturesServicer(
        Assembler(items, users), model_version=version, purchases=ingestor.purchases
    )
    events = EventsServicer(ingestor)

    def register(server: grpc.Server) -> None:
        features_pb2_grpc.add_FeaturesServiceServicer_to_server(servicer, server)
        events_pb2_grpc.add_EventsServiceServicer_to_server(events, server)

    tel = telemetry.current()
    tel.model_info(lambda: version)
    tel.gauge(
        "homefeed_feature_age",
        lambda: [
            (time.time() - items.snapshot().batch_loaded_at, {"view": "item_batch"}),
            (time.time() - items.snapshot().inventory_loaded_at, {"view": "inventory"}),
        ],
        unit="s",
        description="since the item features were last loaded from the online store",
    )
    try:
        server, port, health = build_server(
            settings.server,
            [SERVICE_NAME, EVENTS_SERVICE_NAME],
            register,
        )
    except OSError:
        items.close()
        close_log()
        raise
    items.add_closer(close_log)
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
