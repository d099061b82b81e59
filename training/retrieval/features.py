"""The retrieval model's inputs: user features at request time and the item catalog.

User features come from the training rows (Feast's point-in-time join already put the
user_profile and user_recent_activity values on every impression), except the
category-affinity vector: the training set keeps only the candidate's entry of it, so the
whole vector is joined here from the feature view's offline source with the same rule
Feast applies (the latest snapshot stamped at or before the request, no older than the
view's TTL; none: the uniform vector, ``feature_repo.schema.DEFAULTS``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from contract import columns as C
from contract.timeutil import NS_PER_DAY, to_ns
from contract.tower import InputSpec
from feature_repo import schema as S
from training.tables import vectors_to_matrix

log = logging.getLogger(__name__)

# the batch views' TTL (feature_repo/views.py reads the same constant)
AFFINITY_TTL_NS = S.SNAPSHOT_TTL_DAYS * NS_PER_DAY
USER_VIEWS = (S.USER_PROFILE, S.USER_RECENT_ACTIVITY)
VOCABULARIES: dict[str, tuple[str, ...]] = {C.COUNTRY: C.COUNTRIES, C.DEVICE: C.DEVICES}
LABELS = (C.LABEL_CLICK, C.LABEL_ATC, C.LABEL_PURCHASE)
_ROW = "_row"
_SNAPSHOT = "_snapshot"


def user_input_spec(n_categories: int) -> InputSpec:
    """Every scalar of the user views (numeric: log1p; string: one-hot) + the affinity."""
    numeric: list[str] = []
    categorical: list[tuple[str, tuple[str, ...]]] = []
    for view in USER_VIEWS:
        for name, kind in S.FEATURES[view].items():
            if kind == "string":
                if name not in VOCABULARIES:
                    raise ValueError(f"no vocabulary for the string feature {name!r}")
                categorical.append((name, VOCABULARIES[name]))
            else:
                numeric.append(name)
    return InputSpec(tuple(numeric), tuple(categorical), S.AFFINITY_VECTOR, n_categories)


@dataclass(frozen=True)
class AffinitySnapshots:
    """The user_category_affinity offline source as arrays, sorted by time."""

    user_id: np.ndarray
    ts_ns: np.ndarray
    vectors: np.ndarray  # (snapshots, categories) float32

    @classmethod
    def read(cls, path: Path) -> AffinitySnapshots:
        table = pq.read_table(path, columns=[C.USER_ID, S.EVENT_TIMESTAMP, S.AFFINITY_VECTOR])
        lists = table.column(S.AFFINITY_VECTOR).combine_chunks()
        if lists.null_count:
            raise ValueError(f"{path}: {lists.null_count} null affinity vectors")
        flat = lists.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        n = table.num_rows
        vectors = flat.reshape(n, -1) if n else np.zeros((0, 0), np.float32)
        ts = to_ns(table.column(S.EVENT_TIMESTAMP).to_pandas())
        users = table.column(C.USER_ID).to_numpy()
        order = np.argsort(ts, kind="stable")
        return cls(users[order], ts[order], vectors[order])

    def at(self, user_id: np.ndarray, ts_ns: np.ndarray, n_categories: int) -> np.ndarray:
        """``(len(user_id), n_categories)``: each user's vector as of ``ts_ns``."""
        out = np.full((len(user_id), n_categories), 1.0 / n_categories, dtype=np.float32)
        if len(user_id) == 0 or len(self.user_id) == 0:
            return out
        if self.vectors.shape[1] != n_categories:
            raise ValueError(
                f"affinity vectors have {self.vectors.shape[1]} entries, the catalog has "
                f"{n_categories} categories"
            )
        snapshot = self.snapshot_of(user_id, ts_ns)
        found = snapshot >= 0
        out[found] = self.vectors[snapshot[found]]
        return out

    def at_categories(
        self, user_id: np.ndarray, ts_ns: np.ndarray, category: np.ndarray, n_categories: int
    ) -> np.ndarray:
        """Each row's entry of its user's vector as of ``ts_ns`` at ``category`` (the
        item's): ``at(...)[i, category[i]]`` without building the rows x categories matrix.
        No snapshot, or a category outside the vector: the uniform 1 / n_categories."""
        out = np.full(len(user_id), 1.0 / n_categories, dtype=np.float32)
        if len(user_id) == 0 or len(self.user_id) == 0:
            return out
        snapshot = self.snapshot_of(user_id, ts_ns)
        cat = np.asarray(category, dtype=np.int64)
        ok = (snapshot >= 0) & (cat >= 0) & (cat < self.vectors.shape[1])
        out[ok] = self.vectors[snapshot[ok], cat[ok]]
        return out

    def snapshot_of(self, user_id: np.ndarray, ts_ns: np.ndarray) -> np.ndarray:
        """Each row's snapshot index (``-1``: none) by Feast's rule for a batch view: the
        user's latest snapshot stamped at or before ``ts_ns``, no older than the view's TTL."""
        out = np.full(len(user_id), -1, dtype=np.int64)
        if len(user_id) == 0 or len(self.user_id) == 0:
            return out
        left = pd.DataFrame(
            {C.USER_ID: user_id, S.EVENT_TIMESTAMP: ts_ns, _ROW: np.arange(len(ts_ns))}
        )
        right = pd.DataFrame(
            {
                C.USER_ID: self.user_id,
                S.EVENT_TIMESTAMP: self.ts_ns,
                _SNAPSHOT: np.arange(len(self.ts_ns)),
            }
        )
        joined = pd.merge_asof(
            left.sort_values(S.EVENT_TIMESTAMP, kind="stable"),
            right,
            on=S.EVENT_TIMESTAMP,
            by=C.USER_ID,
            direction="backward",
            tolerance=AFFINITY_TTL_NS,
        )
        found = joined[_SNAPSHOT].notna().to_numpy()
        rows = joined[_ROW].to_numpy()[found]
        out[rows] = joined[_SNAPSHOT].to_numpy()[found].astype(np.int64)
        return out


def user_features(
    rows: pd.DataFrame, spec: InputSpec, affinity: AffinitySnapshots
) -> dict[str, np.ndarray]:
    """The feature dict :meth:`InputSpec.encode` takes, one entry per row of ``rows``."""
    out: dict[str, np.ndarray] = {name: rows[name].to_numpy() for name in spec.numeric}
    for name, _ in spec.categorical:
        out[name] = rows[name].to_numpy()
    out[spec.vector] = affinity.at(
        rows[C.USER_ID].to_numpy(), to_ns(rows[C.EVENT_TIMESTAMP]), spec.vector_dim
    )
    return out


def read_split(training_dir: Path, split: str, spec: InputSpec) -> pd.DataFrame:
    """The columns of one training-set split that retrieval reads."""
    keep = [C.REQUEST_ID, C.USER_ID, C.ITEM_ID, C.EVENT_TIMESTAMP, C.POLICY, *LABELS]
    keep += [name for name in spec.feature_names if name != spec.vector]
    return pd.read_parquet(training_dir / f"{split}.parquet", columns=keep)


def positive(rows: pd.DataFrame) -> np.ndarray:
    """Rows with any engagement: a click, an add-to-cart or a purchase."""
    return np.asarray((rows[list(LABELS)].to_numpy() > 0).any(axis=1), dtype=bool)


@dataclass(frozen=True)
class Catalog:
    """Every listed item, in the order of the items table (the order of the ANN rows)."""

    item_ids: np.ndarray  # int64
    content: np.ndarray  # (items, content_dim) float32
    category: np.ndarray  # int64
    price: np.ndarray  # float64
    n_categories: int

    @classmethod
    def from_items(cls, items: pd.DataFrame) -> Catalog:
        category = items[C.CATEGORY].to_numpy(np.int64)
        ids = items[C.ITEM_ID].to_numpy(np.int64)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("the items table has duplicate item ids")
        return cls(
            item_ids=ids,
            content=vectors_to_matrix(items[C.CONTENT]),
            category=category,
            price=items[C.PRICE].to_numpy(np.float64),
            n_categories=int(category.max()) + 1 if len(category) else 1,
        )

    def __len__(self) -> int:
        return len(self.item_ids)

    def rows_of(self, item_ids: np.ndarray) -> np.ndarray:
        """Catalog row of each id; -1 for an id the catalog does not list."""
        return np.asarray(pd.Index(self.item_ids).get_indexer(pd.Index(item_ids)), dtype=np.int64)
