"""Applying the feature repo to a dataset's Feast store and materializing it (opening the
store, which serving does too: ``contract.feature_store``).

``import feast`` costs seconds, so it happens inside these functions, never at import time
of a CLI or a hot path.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from contract.feature_store import scoped_environ

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)


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

    with scoped_environ({"HOMEFEED_FEATURE_DATA": str(feature_data)}):
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
