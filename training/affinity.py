"""The user_category_affinity view's snapshots, joined by Feast's rule without Feast.

The training-set stage and retrieval training both need each row's affinity as of the row's
time: the latest snapshot stamped at or before it, no older than the view's TTL, else
missing (no engagement). Joining it here instead of through Feast keeps per-row copies of
the user's lists out of memory: the view's snapshots are read once, as flat arrays, and
each row gets its ranker value (``at_categories``), its total (``totals_at``) or its tower
input (``buckets_at``), by the rules of ``contract.affinity``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from contract import affinity
from contract import columns as C
from contract.timeutil import NS_PER_DAY, to_ns
from feature_repo import schema as S

# the batch views' TTL (feature_repo/views.py reads the same constant)
AFFINITY_TTL_NS = S.SNAPSHOT_TTL_DAYS * NS_PER_DAY
_ROW = "_row"
_SNAPSHOT = "_snapshot"


@dataclass(frozen=True)
class AffinitySnapshots:
    """The user_category_affinity offline source as flat arrays (file order).

    Snapshot ``j``'s lists are ``categories[offsets[j]:offsets[j + 1]]`` and ``weights``
    alike, its total ``totals[j]``: a few bytes per engaged category, never one float per
    category (``contract.affinity``).
    """

    user_id: np.ndarray
    ts_ns: np.ndarray
    offsets: np.ndarray  # int64, snapshots + 1
    categories: np.ndarray  # int64
    weights: np.ndarray  # float32
    totals: np.ndarray  # float64

    @classmethod
    def read(cls, path: Path) -> AffinitySnapshots:
        columns = [
            C.USER_ID, S.EVENT_TIMESTAMP, S.AFFINITY_CATEGORIES, S.AFFINITY_WEIGHTS,
            S.AFFINITY_TOTAL,
        ]  # fmt: skip
        table = pq.read_table(path, columns=columns)
        categories, offsets = _flat(table, S.AFFINITY_CATEGORIES, path)
        weights, weight_offsets = _flat(table, S.AFFINITY_WEIGHTS, path)
        if not np.array_equal(offsets, weight_offsets):
            raise ValueError(
                f"{path}: {S.AFFINITY_CATEGORIES} and {S.AFFINITY_WEIGHTS} are not aligned"
            )
        return cls(
            user_id=table.column(C.USER_ID).to_numpy(),
            ts_ns=to_ns(table.column(S.EVENT_TIMESTAMP).to_pandas()),
            offsets=offsets,
            categories=categories.astype(np.int64),
            weights=weights.astype(np.float32),
            totals=table.column(S.AFFINITY_TOTAL).to_numpy().astype(np.float64),
        )

    @property
    def nbytes(self) -> int:
        arrays = (self.user_id, self.ts_ns, self.offsets, self.categories, self.weights)
        return sum(a.nbytes for a in arrays) + self.totals.nbytes

    def at_categories(
        self,
        user_id: np.ndarray,
        ts_ns: np.ndarray,
        category: np.ndarray,
        category_share: np.ndarray,
        n_categories: int,
    ) -> np.ndarray:
        """Each row's ``category_affinity_for_item`` as of ``ts_ns`` for its item's
        ``category`` (-1: no item_stats row) and ``category_share`` (the item_stats value
        joined on the same row): ``contract.affinity.for_rows``."""
        return affinity.for_rows(
            self.offsets,
            self.categories,
            self.weights,
            self.totals,
            self.snapshot_of(user_id, ts_ns),
            category,
            np.nan_to_num(np.asarray(category_share, dtype=np.float64)),
            n_categories,
        )

    def totals_at(self, user_id: np.ndarray, ts_ns: np.ndarray) -> np.ndarray:
        """Each row's ``affinity_total`` as of ``ts_ns`` (0 without a snapshot), float32."""
        snapshot = self.snapshot_of(user_id, ts_ns)
        out = np.zeros(len(snapshot), dtype=np.float32)
        out[snapshot >= 0] = self.totals[snapshot[snapshot >= 0]]
        return out

    def buckets_at(self, user_id: np.ndarray, ts_ns: np.ndarray, n_buckets: int) -> np.ndarray:
        """``(rows, n_buckets)``: each row's user tower affinity input as of ``ts_ns``
        (``contract.affinity.buckets``; no snapshot reads as no engagement)."""
        snapshot = self.snapshot_of(user_id, ts_ns)
        found = snapshot >= 0
        lengths = np.zeros(len(snapshot), dtype=np.int64)
        lengths[found] = np.diff(self.offsets)[snapshot[found]]
        row_offsets = np.append(0, np.cumsum(lengths))
        parent = np.repeat(np.arange(len(snapshot)), lengths)
        within = np.arange(len(parent)) - row_offsets[parent]
        source = self.offsets[snapshot[parent]] + within
        totals = np.zeros(len(snapshot), dtype=np.float64)
        totals[found] = self.totals[snapshot[found]]
        return affinity.buckets(
            row_offsets, self.categories[source], self.weights[source], totals, n_buckets
        )

    def snapshot_of(self, user_id: np.ndarray, ts_ns: np.ndarray) -> np.ndarray:
        """Each row's snapshot index (``-1``: none) by Feast's rule (:func:`latest_snapshot`)."""
        return latest_snapshot(self.user_id, self.ts_ns, user_id, ts_ns)


@dataclass(frozen=True)
class ProfileSnapshots:
    """The user_content_profile offline source as flat arrays (file order): snapshot ``j``'s
    profile is ``values[offsets[j]:offsets[j + 1]]`` (empty: no engagement)."""

    user_id: np.ndarray
    ts_ns: np.ndarray
    offsets: np.ndarray  # int64, snapshots + 1
    values: np.ndarray  # float32

    @classmethod
    def read(cls, path: Path) -> ProfileSnapshots:
        table = pq.read_table(path, columns=[C.USER_ID, S.EVENT_TIMESTAMP, S.CONTENT_PROFILE])
        values, offsets = _flat(table, S.CONTENT_PROFILE, path)
        return cls(
            user_id=table.column(C.USER_ID).to_numpy(),
            ts_ns=to_ns(table.column(S.EVENT_TIMESTAMP).to_pandas()),
            offsets=offsets,
            values=values.astype(np.float32),
        )

    def profiles_at(self, user_id: np.ndarray, ts_ns: np.ndarray) -> list[np.ndarray | None]:
        """Each row's profile as of ``ts_ns`` by Feast's rule (None: no snapshot, or an
        empty one)."""
        out: list[np.ndarray | None] = []
        for j in latest_snapshot(self.user_id, self.ts_ns, user_id, ts_ns):
            lo, hi = (self.offsets[j], self.offsets[j + 1]) if j >= 0 else (0, 0)
            out.append(self.values[lo:hi] if hi > lo else None)
        return out


def latest_snapshot(
    snapshot_user: np.ndarray, snapshot_ts: np.ndarray, user_id: np.ndarray, ts_ns: np.ndarray
) -> np.ndarray:
    """Each row's snapshot index (``-1``: none) by Feast's rule for a batch view: the user's
    latest snapshot stamped at or before ``ts_ns``, no older than the view's TTL."""
    out = np.full(len(user_id), -1, dtype=np.int64)
    if len(user_id) == 0 or len(snapshot_user) == 0:
        return out
    left = pd.DataFrame({C.USER_ID: user_id, S.EVENT_TIMESTAMP: ts_ns, _ROW: np.arange(len(ts_ns))})
    right = pd.DataFrame(
        {
            C.USER_ID: snapshot_user,
            S.EVENT_TIMESTAMP: snapshot_ts,
            _SNAPSHOT: np.arange(len(snapshot_ts)),
        }
    ).sort_values(S.EVENT_TIMESTAMP, kind="stable")
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


def _flat(table: pa.Table, name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(values, int64 offsets from 0) of a list column; a null list is refused."""
    lists = table.column(name).combine_chunks()
    if lists.null_count:
        raise ValueError(f"{path}: {lists.null_count} null lists in column {name}")
    offsets = lists.offsets.to_numpy().astype(np.int64)
    values = lists.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return values, offsets - offsets[0]
