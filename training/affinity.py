"""The user_category_affinity view's snapshots, joined by Feast's rule without Feast.

The training-set stage and retrieval training both need each row's affinity as of the row's
time: the latest snapshot stamped at or before it, no older than the view's TTL, else
missing (the uniform vector, ``feature_repo.schema.DEFAULTS``). Joining it here instead of
through Feast keeps rows x categories floats out of memory: the view's snapshots are read
once and each row gets its entry (``at_categories``) or its vector (``at``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from contract import columns as C
from contract.timeutil import NS_PER_DAY, to_ns
from feature_repo import schema as S

# the batch views' TTL (feature_repo/views.py reads the same constant)
AFFINITY_TTL_NS = S.SNAPSHOT_TTL_DAYS * NS_PER_DAY
_ROW = "_row"
_SNAPSHOT = "_snapshot"


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
