"""The history candidate source: items the user engaged with before, most-engaged first
(built by ``training.retrieval.history``, served by retrieval).

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


@dataclass(frozen=True)
class History:
    user_ids: np.ndarray  # int64, sorted, unique
    indptr: np.ndarray  # int64, len(user_ids) + 1
    item_ids: np.ndarray  # int64

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
