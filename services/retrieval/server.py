"""The retrieval server: loads the bundle's index, the catalog's exploration pool and the
dataset's Feast store, then serves ``RetrievalService`` with health and reflection.
``python -m services.retrieval`` runs ``main()``.

The bundle is loaded once, at start: the retrieval contract has no reload RPC, so a new
champion is picked up by restarting (a rolling restart under Kubernetes).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import grpc
from grpc_health.v1.health import HealthServicer
from homefeed.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from services.common.errors import ServiceError
from services.common.server import Started, StartupError, build_server, run_service
from services.retrieval.index import CandidateIndex, exploration_pool
from services.retrieval.servicer import RetrievalServicer
from services.retrieval.settings import SERVICE, RetrievalSettings
from services.retrieval.users import FeastUserReader, check_spec
from training import columns as C
from training.bundle import RETRIEVAL_CONFIG
from training.registry import BundleError, verify_bundle
from training.tables import read_tables

log = logging.getLogger(__name__)

SERVICE_NAME: str = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name


def resolve_bundle(settings: RetrievalSettings) -> tuple[Path, str | None]:
    """The verified bundle directory and its registry version (None for a plain
    directory); StartupError naming the source otherwise."""
    what = settings.describe_source()
    if settings.bundle_dir is not None:
        try:
            verify_bundle(settings.bundle_dir)
        except BundleError as err:
            raise StartupError(f"cannot load {what}: {err}") from err
        return settings.bundle_dir, None
    from mlflow.exceptions import MlflowException

    from training.registry import Registry

    registry = Registry(settings.registry_uri)
    try:
        model = settings.model
        version = int(model) if model.isdigit() else registry.get_version(model)
        return registry.load(version, settings.model_cache), str(version)
    except (MlflowException, BundleError, OSError) as err:
        message = getattr(err, "message", str(err))
        raise StartupError(f"cannot load {what}: {message}") from err


def load_index(settings: RetrievalSettings) -> CandidateIndex:
    """The served index: the bundle (registry or directory) with the dataset's exploration
    pool; StartupError when either cannot be loaded."""
    bundle_dir, version = resolve_bundle(settings)
    raw = settings.paths.raw(settings.dataset)
    try:
        tables = read_tables(raw, [C.ITEMS, C.SELLERS])
    except FileNotFoundError as err:
        raise StartupError(
            f"dataset {settings.dataset!r} has no catalog: {err} (HOMEFEED_DATASET, HOMEFEED_HOME)"
        ) from err
    pool, as_of = exploration_pool(
        tables[C.ITEMS], tables[C.SELLERS], new_item_days=settings.new_item_days
    )
    try:
        index = CandidateIndex.load(
            bundle_dir, pool_ids=pool, version=version, verified=True, config=settings.config
        )
        check_spec(index.tower.spec)
    except (BundleError, ServiceError) as err:
        raise StartupError(f"cannot load {settings.describe_source()}: {err}") from err
    trained_on = json.loads((bundle_dir / RETRIEVAL_CONFIG).read_text()).get("dataset")
    if trained_on != settings.dataset:
        log.warning(
            "the bundle was trained on another dataset than the one served",
            extra={"bundle_dataset": trained_on, "dataset": settings.dataset},
        )
    log.info(
        "retrieval index loaded",
        extra={
            "source": settings.describe_source(),
            "model_version": index.version,
            "bundle_version": index.bundle_version,
            "items": index.size,
            "exploration_pool": index.exploration_pool_size,
            "catalog_as_of": as_of.isoformat() if as_of is not None else None,
        },
    )
    return index


def open_users(settings: RetrievalSettings) -> FeastUserReader:
    """The user-feature reader over the dataset's Feast store (imports feast: seconds)."""
    from training.feature_store import open_store

    registry = settings.paths.feast(settings.dataset) / "registry.db"
    if not registry.exists():
        raise StartupError(
            f"dataset {settings.dataset!r} has no Feast registry at {registry}: run "
            f"`homefeed features --dataset {settings.dataset}` (apply + materialize) first"
        )
    started = time.perf_counter()
    store = open_store(
        settings.dataset, paths=settings.paths, online=settings.online_store, redis=settings.redis
    )
    users = FeastUserReader(store)
    log.info(
        "feast store open",
        extra={
            "dataset": settings.dataset,
            "online_store": settings.online_store,
            "seconds": round(time.perf_counter() - started, 2),
        },
    )
    return users


def _build(
    settings: RetrievalSettings,
) -> tuple[grpc.Server, int, RetrievalServicer, HealthServicer]:
    index = load_index(settings)  # before build_server, which reports SERVING
    servicer = RetrievalServicer(index, open_users(settings), seed=settings.seed)
    try:
        servicer.warm_up()
    except ServiceError as err:  # e.g. an online store that does not answer
        raise StartupError(f"warm-up failed: {err}") from err
    server, port, health = build_server(
        settings.server,
        [SERVICE_NAME],
        lambda s: retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(servicer, s),
    )
    log.info("retrieval ready", extra={"port": port, "model_version": index.version})
    return server, port, servicer, health


def create_server(settings: RetrievalSettings) -> tuple[grpc.Server, int, RetrievalServicer]:
    """A bound, not yet started server, its port (a free one for port 0) and the servicer
    (``servicer.index`` is the served index). Raises StartupError when the bundle, the
    catalog or the Feast store cannot be loaded."""
    server, port, servicer, _ = _build(settings)
    return server, port, servicer


def _start(settings: RetrievalSettings) -> Started:
    server, _, _, health = _build(settings)
    return server, health, None


def main() -> int:
    """Serve until SIGTERM/SIGINT (``run_service``: exit 1 naming what could not load)."""
    return run_service(SERVICE, RetrievalSettings.from_env, _start)
