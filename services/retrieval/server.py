"""The retrieval server: loads the bundle's index with its catalogue's exploration pool and
content (the PROFILE source), opens the dataset's Feast store, then serves
``RetrievalService`` with health and reflection. ``python -m services.retrieval`` runs
``main()``.

The bundle is loaded once, at start: the retrieval contract has no reload RPC, so a new
champion is picked up by restarting (a rolling restart under Kubernetes).
"""

from __future__ import annotations

import json
import logging
import time

import grpc
import numpy as np
import pandas as pd
from grpc_health.v1.health import HealthServicer
from homefeed.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from contract import bundle as B
from contract.bundle import BundleError
from contract.catalog import Catalog
from feature_repo import schema as S
from services.common import telemetry
from services.common.bundles import RegistryError, resolve_bundle
from services.common.errors import ServiceError
from services.common.online import open_reader
from services.common.server import Started, StartupError, build_server, run_service
from services.common.stock import StockWatcher
from services.common.users import UserReader, open_user_reader
from services.retrieval.index import CandidateIndex
from services.retrieval.servicer import RetrievalServicer
from services.retrieval.settings import SERVICE, RetrievalSettings
from services.retrieval.users import check_spec

log = logging.getLogger(__name__)

SERVICE_NAME: str = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name


def load_index(settings: RetrievalSettings) -> CandidateIndex:
    """The served index: the bundle (registry or directory) with its catalogue's exploration
    pool; StartupError when it cannot be loaded."""
    source = settings.source
    try:
        resolved = resolve_bundle(source)
        catalog = Catalog.load(resolved.path / B.CATALOG)
        pool = catalog.exploration_pool(new_item_days=settings.new_item_days)
        index = CandidateIndex.load(
            resolved.path,
            pool_ids=pool,
            version=resolved.version,
            verified=True,
            config=settings.config,
            catalog=catalog,
        )
        check_spec(index.tower.spec, catalog.n_categories)
    except (BundleError, RegistryError, ServiceError, ValueError, OSError) as err:
        raise StartupError(f"cannot load {source.describe()}: {err}") from err
    trained_on = json.loads((resolved.path / B.RETRIEVAL_CONFIG).read_text()).get("dataset")
    if trained_on != settings.dataset:
        log.warning(
            "the bundle was trained on another dataset than the one served",
            extra={"bundle_dataset": trained_on, "dataset": settings.dataset},
        )
    as_of = catalog.as_of_ns
    log.info(
        "retrieval index loaded",
        extra={
            "source": source.describe(),
            "model_version": index.version,
            "bundle_version": index.bundle_version,
            "items": index.size,
            "exploration_pool": index.exploration_pool_size,
            "profile_dim": index.profile.dim if index.profile is not None else 0,
            "catalog_as_of": str(pd.Timestamp(as_of, tz="UTC")) if as_of is not None else None,
        },
    )
    return index


def open_online(
    settings: RetrievalSettings, index: CandidateIndex
) -> tuple[UserReader, StockWatcher]:
    """The user-feature reader and the stock of the index's items, over the dataset's Feast
    store (imports feast: seconds); the fast paths are checked against Feast's reads."""
    from contract.feature_store import open_store

    registry = settings.paths.feast(settings.dataset) / "registry.db"
    if not registry.exists():
        raise StartupError(
            f"dataset {settings.dataset!r} has no Feast registry at {registry}: run "
            f"`homefeed features --dataset {settings.dataset}` (apply + materialize) first"
        )
    started = time.perf_counter()
    store = open_store(
        settings.dataset,
        paths=settings.paths,
        online=settings.online_store,
        redis=settings.redis,
        offline=False,
    )
    known = index.history.user_ids if index.history is not None else np.arange(64)
    users = open_user_reader(store, np.random.default_rng(0).permutation(known)[:32].tolist())
    reader, fallback = open_reader(store, index.item_ids, (S.ITEM_INVENTORY,))
    stock = StockWatcher(reader, index.item_ids, settings.stock_refresh_s, fallback)
    stock.refresh()
    log.info(
        "feast store open",
        extra={
            "dataset": settings.dataset,
            "online_store": settings.online_store,
            "user_reader": users.name,
            "stock_reader": reader.name,
            "in_stock": int(stock.in_stock().sum()),
            "seconds": round(time.perf_counter() - started, 2),
        },
    )
    return users, stock


def _build(
    settings: RetrievalSettings,
) -> tuple[grpc.Server, int, RetrievalServicer, HealthServicer, StockWatcher]:
    index = load_index(settings)  # before build_server, which reports SERVING
    users, stock = open_online(settings, index)
    index.stock = stock.in_stock
    servicer = RetrievalServicer(index, users, seed=settings.seed)
    try:
        servicer.warm_up()
        server, port, health = build_server(
            settings.server,
            [SERVICE_NAME],
            lambda s: retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(servicer, s),
        )
    except ServiceError as err:  # e.g. an online store that does not answer
        stock.close()
        raise StartupError(f"warm-up failed: {err}") from err
    except OSError:
        stock.close()
        raise
    stock.start()
    telemetry.current().model_info(lambda: index.version)
    log.info("retrieval ready", extra={"port": port, "model_version": index.version})
    return server, port, servicer, health, stock


def create_server(settings: RetrievalSettings) -> tuple[grpc.Server, int, RetrievalServicer]:
    """A bound, not yet started server, its port (a free one for port 0) and the servicer
    (``servicer.index`` is the served index; its stock refresher runs in the background as
    a daemon thread). Raises StartupError when the bundle, the catalog or the Feast store
    cannot be loaded."""
    server, port, servicer, _, _ = _build(settings)
    return server, port, servicer


def _start(settings: RetrievalSettings) -> Started:
    server, _, _, health, stock = _build(settings)
    return server, health, stock.close


def main() -> int:
    """Serve until SIGTERM/SIGINT (``run_service``: exit 1 naming what could not load)."""
    return run_service(SERVICE, RetrievalSettings.from_env, _start)
