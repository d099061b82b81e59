"""Retrieval for offline replay, as serving does it: the user's history (items engaged with
before the bundle's test period) first, then requests -> user features as of each request
(the same Feast join as training) -> numpy user tower -> ScaNN top-n item ids."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from contract import bundle as B
from contract import columns as C
from contract.ann import load_index
from contract.history import History
from contract.paths import Paths
from contract.tower import UserTower
from feature_repo import schema as S
from training.retrieval.ann import search
from training.retrieval.features import AffinitySnapshots, user_features

if TYPE_CHECKING:
    from feast import FeatureStore


class Retriever:
    """Callable ``(requests, n) -> list of item-id arrays`` over a staged or loaded bundle."""

    def __init__(
        self, bundle_dir: Path, store: FeatureStore, paths: Paths, dataset: str, items: pd.DataFrame
    ):
        self.tower = UserTower.load(bundle_dir / B.USER_TOWER)
        self.item_ids = np.load(bundle_dir / B.ITEM_IDS)
        self.searcher = load_index(bundle_dir / B.SCANN_DIR)
        history = bundle_dir / B.HISTORY
        self.history = History.load(history) if history.exists() else None
        self.affinity = AffinitySnapshots.read(
            paths.features(dataset) / f"{S.USER_CATEGORY_AFFINITY}.parquet"
        )
        self.store = store
        self.items = items
        self._probe_item = int(items[C.ITEM_ID].iloc[0])

    def user_rows(self, requests: pd.DataFrame) -> pd.DataFrame:
        """User features of each request as of its time (one probe item per request)."""
        from training.request_features import features_for_pairs, pair_frame

        probe = [np.array([self._probe_item])] * len(requests)
        return features_for_pairs(self.store, pair_frame(requests, probe), self.items)

    def __call__(self, requests: pd.DataFrame, n: int) -> list[np.ndarray]:
        rows = self.user_rows(requests)
        spec = self.tower.spec
        queries = self.tower.embed(user_features(rows, spec, self.affinity))
        found = search(self.searcher, queries, n)
        out = [self.item_ids[r[r >= 0]] for r in found]
        if self.history is None:
            return out
        merged = []
        for user, ann_ids in zip(requests[C.USER_ID].to_numpy(), out, strict=True):
            ids = np.concatenate([self.history.items_of(int(user)), ann_ids])
            _, first = np.unique(ids, return_index=True)
            merged.append(ids[np.sort(first)][:n])
        return merged


def load_retriever(bundle_dir: Path, home: Path, dataset: str) -> Retriever:
    from contract.feature_store import open_store
    from training.tables import read_tables

    paths = Paths(Path(home))
    items = read_tables(paths.raw(dataset), [C.ITEMS])[C.ITEMS]
    store = open_store(dataset, paths=paths)
    return Retriever(bundle_dir, store, paths, dataset, items)
