"""Opening the Feast store of a dataset: the materialization jobs write it, the services read it.

``import feast`` costs seconds, so it happens inside ``open_store``, never at import time of a
CLI or a hot path. The store's repo_path is the dataset's feature folder (where the Parquet
sources live); its configuration is ``feature_repo/feature_store.yaml`` (SQLite) or
``feature_repo/feature_store.redis.yaml`` (Redis), selected by ``online``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import yaml

from contract.paths import REPO_ROOT, Paths

if TYPE_CHECKING:
    from feast import FeatureStore

FEATURE_REPO = REPO_ROOT / "feature_repo"
ONLINE_STORES = ("sqlite", "redis")
ONLINE_DB_ENV = "HOMEFEED_ONLINE_DB"


def store_env(paths: Paths, dataset: str, online: str, redis: str | None) -> dict[str, str]:
    """The variables feature_store*.yaml reads, for one dataset."""
    env = {
        "HOMEFEED_FEAST_REGISTRY": str(paths.feast(dataset) / "registry.db"),
        # HOMEFEED_ONLINE_DB: another SQLite online store to serve and push to (the online
        # loop runs on a copy, so simulated traffic never changes the dataset's own store)
        "HOMEFEED_FEAST_ONLINE_PATH": os.environ.get(ONLINE_DB_ENV)
        or str(paths.feast(dataset) / "online.db"),
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
    offline: bool = True,
) -> FeatureStore:
    """A FeatureStore for ``dataset``; ``online`` defaults to $HOMEFEED_ONLINE_STORE or sqlite.

    ``offline=False`` is how the services open it: online reads only. The yaml's offline
    store (DuckDB, for the training sets' point-in-time joins) is then replaced by Feast's
    default file store, whose configuration imports nothing outside Feast's own
    dependencies: a serving image has no DuckDB.
    """
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    paths = paths or Paths.from_env()
    online = online or os.environ.get("HOMEFEED_ONLINE_STORE", "sqlite")
    if online not in ONLINE_STORES:
        raise ValueError(f"online store must be one of {ONLINE_STORES}, got {online!r}")
    redis = redis or os.environ.get("HOMEFEED_REDIS")
    paths.feast(dataset).mkdir(parents=True, exist_ok=True)
    yaml_name = "feature_store.yaml" if online == "sqlite" else "feature_store.redis.yaml"
    features_dir = paths.features(dataset)
    features_dir.mkdir(parents=True, exist_ok=True)
    # the yaml's ${VARS} are expanded once, here, as Feast's own loader does; nothing else
    # reads them
    with scoped_environ(store_env(paths, dataset, online, redis)):
        raw = yaml.safe_load(os.path.expandvars((FEATURE_REPO / yaml_name).read_text()))
    if not offline:
        raw["offline_store"] = {"type": "dask"}
    config = RepoConfig(**raw)
    config.repo_path = features_dir
    return FeatureStore(repo_path=str(features_dir), config=config)


@contextmanager
def scoped_environ(values: dict[str, str]) -> Iterator[None]:
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
