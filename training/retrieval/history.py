"""The history candidate source: items the user engaged with before, most-engaged first.

Real shoppers come back for what they bought or looked at (groceries above all: in Complete
Journey four in ten of a household's test-period purchases are items it bought in training).
A two-tower model with a category-affinity user input cannot say "this exact item again", so
retrieval serves the user's history first and fills the rest of the ``k`` candidates with the
tower's nearest neighbours.

Layout of ``retrieval/history.npz`` (CSR over users sorted by id): ``user_ids``, ``indptr``,
``item_ids``; user ``user_ids[u]``'s items are ``item_ids[indptr[u]:indptr[u + 1]]``, at most
``max_items`` of them, ordered by engagement count, then by the latest engagement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

MAX_ITEMS = 200  # history candidates per user; the tower fills the rest of the k


@dataclass(frozen=True)
class History:
    user_ids: np.ndarray  # int64, sorted, unique
    indptr: np.ndarray  # int64, len(user_ids) + 1
    item_ids: np.ndarray  # int64

    @classmethod
    def from_engagements(
        cls, user_id: np.ndarray, item_id: np.ndarray, ts_ns: np.ndarray, max_items: int = MAX_ITEMS
    ) -> History:
        """From engagement events (one row per click or purchase); only events before the
        point the history is meant for may be passed in."""
        frame = pd.DataFrame({"user": user_id, "item": item_id, "ts": ts_ns})
        per_item = frame.groupby(["user", "item"], sort=False).agg(
            n=("ts", "size"), last=("ts", "max")
        )
        per_item = per_item.reset_index().sort_values(
            ["user", "n", "last", "item"], ascending=[True, False, False, True], kind="stable"
        )
        per_item = per_item[per_item.groupby("user").cumcount() < max_items]
        users, counts = np.unique(per_item["user"].to_numpy(np.int64), return_counts=True)
        return cls(
            user_ids=users,
            indptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            item_ids=per_item["item"].to_numpy(np.int64),
        )

    def items_of(self, user_id: int) -> np.ndarray:
        """The user's history (empty for a user without one)."""
        u = int(np.searchsorted(self.user_ids, user_id))
        if u == len(self.user_ids) or self.user_ids[u] != user_id:
            return self.item_ids[:0]
        return self.item_ids[self.indptr[u] : self.indptr[u + 1]]

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, user_ids=self.user_ids, indptr=self.indptr, item_ids=self.item_ids)

    @classmethod
    def load(cls, path: Path) -> History:
        with np.load(path) as z:
            return cls(z["user_ids"], z["indptr"], z["item_ids"])


def history_first(history: np.ndarray, model: np.ndarray, k: int) -> np.ndarray:
    """``(groups, k)`` catalog rows: each group's history rows, then its model rows not
    already there; -1 padding in the inputs is ignored and pads the output."""
    out = np.full((model.shape[0], k), -1, dtype=np.int64)
    for g in range(model.shape[0]):
        row = np.concatenate([history[g], model[g]])
        row = row[row >= 0]
        _, first_seen = np.unique(row, return_index=True)
        keep = row[np.sort(first_seen)][:k]
        out[g, : len(keep)] = keep
    return out
