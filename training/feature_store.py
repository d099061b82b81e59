"""Opening the Feast store of a dataset, applying the repo and materializing it.

``import feast`` costs seconds, so it happens inside these functions, never at import time
of a CLI or a hot path. The store's repo_path is the dataset's feature folder (where the
Parquet sources live); its configuration is ``feature_repo/feature_store.yaml`` (SQLite) or
``feature_repo/feature_store.redis.yaml`` (Redis), selected by ``online``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from training.paths import REPO_ROOT, Paths

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)

FEATURE_REPO = REPO_ROOT / "feature_repo"
ONLINE_STORES = ("sqlite", "redis")


def store_env(paths: Paths, dataset: str, online: str, redis: str | None) -> dict[str, str]:
    """The variables feature_store*.yaml reads, for one dataset."""
    env = {
        "HOMEFEED_FEAST_REGISTRY": str(paths.feast(dataset) / "registry.db"),
        "HOMEFEED_FEAST_ONLINE_PATH": str(paths.feast(dataset) / "online.db"),
    }
    if online == "redis":
        if not redis:
            raise ValueError("online store 'redis' needs a connection string (HOMEFEED_REDIS)")
        env["HOMEFEED_REDIS"] = redis
    return env


def open_store(
    dataset: str,
    *,
    paths: Paths | None = None,
    online: str | None = None,
    redis: str | None = None,
) -> FeatureStore:
    """A FeatureStore for ``dataset``; ``online`` defaults to $HOMEFEED_ONLINE_STORE or sqlite."""
    from feast import FeatureStore

    paths = paths or Paths.from_env()
    online = online or os.environ.get("HOMEFEED_ONLINE_STORE", "sqlite")
    if online not in ONLINE_STORES:
        raise ValueError(f"online store must be one of {ONLINE_STORES}, got {online!r}")
    redis = redis or os.environ.get("HOMEFEED_REDIS")
    paths.feast(dataset).mkdir(parents=True, exist_ok=True)
    yaml_name = "feature_store.yaml" if online == "sqlite" else "feature_store.redis.yaml"
    features_dir = paths.features(dataset)
    features_dir.mkdir(parents=True, exist_ok=True)
    # the yaml's ${VARS} are expanded once, while the config loads; nothing else reads them
    with _environ(store_env(paths, dataset, online, redis)):
        return FeatureStore(repo_path=str(features_dir), fs_yaml_file=FEATURE_REPO / yaml_name)


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def repo_objects(feature_data: Path) -> list[Any]:
    """Every entity, data source, feature view and feature service defined in feature_repo/.

    The sources read HOMEFEED_FEATURE_DATA when their module is imported (Feast's env-driven
    repo convention), so the modules are reloaded with it pointing at ``feature_data``; the
    registry then records absolute paths, which is what retrieval and materialization read.
    """
    import importlib

    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    from feature_repo import entities, services, sources, views

    with _environ({"HOMEFEED_FEATURE_DATA": str(feature_data)}):
        for module in (sources, views, services):
            importlib.reload(module)

    kinds = (Entity, DataSource, FeatureView, FeatureService)
    found: dict[int, Any] = {}
    for module in (entities, sources, views, services):
        for obj in vars(module).values():
            if isinstance(obj, kinds):
                found.setdefault(id(obj), obj)
    return list(found.values())


def apply(store: FeatureStore) -> list[str]:
    """Register the repo's objects (idempotent), like `feast apply`."""
    objects = repo_objects(Path(store.repo_path))
    store.apply(objects)
    return sorted(f"{type(o).__name__}:{o.name}" for o in objects)


def materialize(store: FeatureStore, end: pd.Timestamp, start: pd.Timestamp | None = None) -> float:
    """Load the latest values up to ``end`` into the online store; returns seconds taken."""
    started = time.perf_counter()
    start = start if start is not None else end - pd.Timedelta(days=30)
    store.materialize(start_date=start.to_pydatetime(), end_date=end.to_pydatetime())
    return time.perf_counter() - started
