"""Retrieval for offline replay, as serving does it: the user's history (items engaged with
before the bundle's test period) first, then the PROFILE source (the user's content profile
as of the request against the catalogue, ``contract.content.ProfileIndex``: at most
``ceil(profile_share x n)`` items not already placed), then requests -> user features as of
each request (the same Feast join as training) -> numpy user tower -> ScaNN to fill n.
``value_weight`` replaces the weight of the bundle's value column (``contract.tower``) in
every query, for the ablation and the sweep; the index is the bundle's either way.
Exploration, which serving adds, is left out: it is random by design."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from contract import bundle as B
from contract import columns as C
from contract import content
from contract.ann import load_index
from contract.history import History
from contract.paths import Paths
from contract.timeutil import to_ns
from contract.tower import UserTower, value_columns
from feature_repo import schema as S
from training.affinity import ProfileSnapshots
from training.retrieval.ann import search
from training.retrieval.features import AffinitySnapshots, user_features

if TYPE_CHECKING:
    from feast import FeatureStore


class Retriever:
    """Callable ``(requests, n) -> list of item-id arrays`` over a staged or loaded bundle."""

    def __init__(
        self,
        bundle_dir: Path,
        store: FeatureStore,
        paths: Paths,
        dataset: str,
        items: pd.DataFrame,
        profile_share: float = content.PROFILE_SHARE,
        value_weight: float | None = None,
    ):
        self.tower = UserTower.load(bundle_dir / B.USER_TOWER)
        settings = json.loads((bundle_dir / B.RETRIEVAL_CONFIG).read_text())
        self.value_columns = value_columns(settings)  # the bundle's: 0 or 1
        if value_weight is not None and not self.value_columns:
            raise ValueError(f"{bundle_dir}: the bundle's embeddings have no value column")
        self.value_weight = value_weight
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
        self.profile_share = profile_share
        profiles = paths.features(dataset) / f"{S.USER_CONTENT_PROFILE}.parquet"
        self.profiles = ProfileSnapshots.read(profiles) if profiles.exists() else None
        by_id = items.set_index(C.ITEM_ID)
        rows = by_id.index.get_indexer(pd.Index(self.item_ids))
        if (rows < 0).any():
            raise ValueError(f"{int((rows < 0).sum())} indexed items are not in the items table")
        self.profile_index = content.ProfileIndex(
            content.table_unit(items)[rows],
            by_id[C.PRICE].to_numpy()[rows],
            by_id[C.MARGIN].to_numpy()[rows],
        )

    def user_rows(self, requests: pd.DataFrame) -> pd.DataFrame:
        """User features of each request as of its time (one probe item per request)."""
        from training.request_features import features_for_pairs, pair_frame

        probe = [np.array([self._probe_item])] * len(requests)
        return features_for_pairs(self.store, pair_frame(requests, probe), self.items)

    def __call__(self, requests: pd.DataFrame, n: int) -> list[np.ndarray]:
        rows = self.user_rows(requests)
        spec = self.tower.spec
        queries = self.tower.embed(user_features(rows, spec, self.affinity))
        if self.value_weight is not None:
            queries[:, -1] = self.value_weight
        found = search(self.searcher, queries, n)
        out = [self.item_ids[r[r >= 0]] for r in found]
        users = requests[C.USER_ID].to_numpy(np.int64)
        profiles: list[np.ndarray | None] = [None] * len(users)
        if self.profiles is not None and self.profile_share > 0:
            profiles = self.profiles.profiles_at(users, to_ns(requests[C.TS]))
        merged = []
        for user, profile, ann_ids in zip(users, profiles, out, strict=True):
            past = self.history.items_of(int(user)) if self.history is not None else ann_ids[:0]
            placed = past[:n]
            quota = min(n - len(placed), math.ceil(self.profile_share * n))
            if profile is not None and quota > 0:
                blocked = np.isin(self.item_ids, placed)
                picked, _ = self.profile_index.top(profile, quota, blocked)
                placed = np.concatenate([placed, self.item_ids[picked]])
            ids = np.concatenate([placed, ann_ids])
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
