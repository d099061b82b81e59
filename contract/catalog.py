"""The catalogue a bundle was built for (``catalog.npz``): what serving knows about every
item beside its features.

Training writes it from the dataset's items and sellers tables (``Catalog.from_tables``);
the features service takes prices, margins, sellers and categories from it, and retrieval
its exploration pool (recent items and items of new sellers). Serving never reads a
dataset's raw tables: a new item reaches serving with the next bundle, as it reaches the
ANN index.

Times are int64 nanoseconds since the epoch (UTC); ``seller_created_ns`` is the item's
seller's join time, ``MISSING_NS`` when the sellers table does not list the seller.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from contract import columns as C
from contract.content import similarity_space, table_content
from contract.features import NEW_SELLER_DAYS
from contract.timeutil import NS_PER_DAY, to_ns

MISSING_NS = np.iinfo(np.int64).min
NEW_ITEM_DAYS = 14.0  # an item listed this recently is in the exploration pool


@dataclass(frozen=True, eq=False)
class Catalog:
    """Parallel arrays sorted by item id."""

    item_ids: np.ndarray  # int64, unique, ascending
    seller_ids: np.ndarray  # int64
    categories: np.ndarray  # int64
    prices: np.ndarray  # float64
    margins: np.ndarray  # float64
    created_ns: np.ndarray  # int64: the item's listing time
    seller_created_ns: np.ndarray  # int64: its seller's join time (MISSING_NS: unknown)
    content: np.ndarray  # float32 (items, dim): the items table's content (dim 0: none)

    def __len__(self) -> int:
        return len(self.item_ids)

    @functools.cached_property
    def unit_content(self) -> np.ndarray:
        """(items, k) float32: the content's unit rows in the catalogue's
        ``contract.content.ContentSpace`` (what profiles are compared with); (items, 0)
        without content. The same bits as ``content.table_unit`` of the items table."""
        return similarity_space(self.item_ids, self.content).unit(self.content)

    @property
    def n_categories(self) -> int:
        """The category ids the affinity covers as training sets them: max category + 1."""
        return int(self.categories.max()) + 1 if len(self.categories) else 1

    @property
    def as_of_ns(self) -> int | None:
        """The newest listing or seller join: the moment the catalogue describes (a simulated
        or replayed catalogue lives in its own time, so the wall clock would not do)."""
        if not len(self):
            return None
        return int(max(self.created_ns.max(), self.seller_created_ns.max()))

    @classmethod
    def from_columns(
        cls,
        item_ids: Sequence[int] | np.ndarray,
        seller_ids: Sequence[int] | np.ndarray,
        categories: Sequence[int] | np.ndarray,
        prices: Sequence[float] | np.ndarray,
        margins: Sequence[float] | np.ndarray,
        created_ns: Sequence[int] | np.ndarray | None = None,
        seller_created_ns: Sequence[int] | np.ndarray | None = None,
        content: np.ndarray | None = None,
    ) -> Catalog:
        """Sorted by item id; ValueError on repeated ids or columns of different lengths.
        Missing times are ``MISSING_NS`` (never recent, never new); missing content is
        ``(n, 0)`` (no content profile can score the items)."""
        ids = np.asarray(item_ids, dtype=np.int64)
        n = len(ids)
        missing = np.full(n, MISSING_NS, dtype=np.int64)
        columns: dict[str, np.ndarray] = {
            "seller_ids": np.asarray(seller_ids, dtype=np.int64),
            "categories": np.asarray(categories, dtype=np.int64),
            "prices": np.asarray(prices, dtype=np.float64),
            "margins": np.asarray(margins, dtype=np.float64),
            "created_ns": missing if created_ns is None else np.asarray(created_ns, np.int64),
            "seller_created_ns": (
                missing if seller_created_ns is None else np.asarray(seller_created_ns, np.int64)
            ),
            "content": _content(content, n),
        }
        wrong = {k: len(v) for k, v in columns.items() if len(v) != n}
        if wrong:
            raise ValueError(f"catalog columns must all have {n} entries (the ids), got {wrong}")
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        if n > 1 and (np.diff(ids) == 0).any():
            repeated = ids[1:][np.diff(ids) == 0]
            raise ValueError(f"catalog item ids must be unique, got repeats {repeated[:5]}")
        return cls(item_ids=ids, **{k: v[order] for k, v in columns.items()})

    @classmethod
    def from_tables(cls, items: Any, sellers: Any) -> Catalog:
        """From the items and sellers tables (``contract.columns`` layout, pandas frames)."""
        seller_ids = sellers[C.SELLER_ID].to_numpy(np.int64)
        seller_created = to_ns(sellers[C.CREATED_AT]) if len(sellers) else seller_ids[:0]
        order = np.argsort(seller_ids, kind="stable")
        item_seller = items[C.SELLER_ID].to_numpy(np.int64)
        pos = np.minimum(np.searchsorted(seller_ids[order], item_seller), max(len(order) - 1, 0))
        found = seller_ids[order][pos] == item_seller if len(order) else np.zeros(len(items), bool)
        joined = np.full(len(items), MISSING_NS, dtype=np.int64)
        joined[found] = seller_created[order][pos[found]]
        return cls.from_columns(
            items[C.ITEM_ID].to_numpy(),
            item_seller,
            items[C.CATEGORY].to_numpy(),
            items[C.PRICE].to_numpy(),
            items[C.MARGIN].to_numpy(),
            to_ns(items[C.CREATED_AT]) if len(items) else np.empty(0, np.int64),
            joined,
            table_content(items),
        )

    def exploration_pool(
        self, new_item_days: float = NEW_ITEM_DAYS, new_seller_days: float = NEW_SELLER_DAYS
    ) -> np.ndarray:
        """Ids of the items listed within ``new_item_days`` of ``as_of_ns``, or whose seller
        joined within ``new_seller_days`` of it (the ``seller_is_new`` rule), ascending."""
        as_of = self.as_of_ns
        if as_of is None:
            return self.item_ids[:0]
        with np.errstate(over="ignore"):
            recent = (self.created_ns != MISSING_NS) & (
                as_of - self.created_ns < new_item_days * NS_PER_DAY
            )
            new_seller = (self.seller_created_ns != MISSING_NS) & (
                as_of - self.seller_created_ns < new_seller_days * NS_PER_DAY
            )
        return self.item_ids[recent | new_seller]

    def save(self, path: Path) -> None:
        np.savez(path, **{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, path: Path) -> Catalog:
        """ValueError naming the file when a column is missing or the ids repeat."""
        with np.load(path, allow_pickle=False) as z:
            missing = [f.name for f in fields(cls) if f.name not in z.files and f.name != "content"]
            if missing:
                raise ValueError(f"{path} lacks the catalog columns {missing}")
            arrays = {f.name: z[f.name] for f in fields(cls) if f.name in z.files}
        try:
            return cls.from_columns(**arrays)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None


def _content(content: np.ndarray | None, n: int) -> np.ndarray:
    """(n, dim) float32; (n, 0) without content. A flat array is one vector per item."""
    if content is None:
        return np.zeros((n, 0), np.float32)
    x = np.asarray(content, np.float32)
    if x.ndim == 1:
        x = x.reshape(n, -1) if n else np.zeros((0, 0), np.float32)
    return x
