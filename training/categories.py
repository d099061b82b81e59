"""Collapsing a long-tailed taxonomy: keep the commonest categories, merge the rest.

A real catalogue's leaf categories run to thousands, and the user's category affinity is
held per category (``training.features``), so ``homefeed ingest --max-categories N`` keeps
the ``N - 1`` categories with the most engagement (purchases, add-to-carts and clicks of
their items; items listed, to break ties and for categories nobody engaged with) and maps
every other one to a single "other" category. Categories are renumbered ``0 .. N - 1`` in
that order (``N - 1`` is "other"); the items table keeps the original id in
``category_source`` so nothing is lost.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from contract import columns as C

SOURCE_COLUMN = "category_source"


def collapse_categories(
    tables: dict[str, pd.DataFrame], max_categories: int
) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    """``tables`` with at most ``max_categories`` categories, and a summary (categories
    before and after, items moved to "other")."""
    if max_categories < 2:
        raise ValueError(f"--max-categories must be at least 2, got {max_categories}")
    items = tables[C.ITEMS]
    category = items[C.CATEGORY].to_numpy()
    before = int(pd.unique(category).size)
    if before <= max_categories:
        return tables, {"categories": before, "kept": before, "items_moved": 0}
    outcomes = pd.concat(
        [
            tables[t][C.IMPRESSION_ID]
            for t in (C.PURCHASES, C.ADD_TO_CARTS, C.CLICKS)
            if t in tables and len(tables[t])
        ]
        or [pd.Series([], dtype=np.int64)],
        ignore_index=True,
    )
    imp = tables[C.IMPRESSIONS]
    item_of = pd.Series(imp[C.ITEM_ID].to_numpy(), index=imp[C.IMPRESSION_ID].to_numpy())
    engaged = item_of.reindex(outcomes.to_numpy()).dropna().to_numpy()
    item_category = pd.Series(category, index=items[C.ITEM_ID].to_numpy())
    engagement = item_category.reindex(engaged).dropna().value_counts()
    listed = pd.Series(category).value_counts()
    rank = (
        pd.DataFrame({"engagement": engagement, "listed": listed})
        .fillna(0)
        .rename_axis("category")
        .reset_index()
        .sort_values(["engagement", "listed", "category"], ascending=[False, False, True])
    )
    kept = rank["category"].to_numpy()[: max_categories - 1]
    other = max_categories - 1
    mapping = pd.Series(np.arange(len(kept)), index=kept)
    new = mapping.reindex(category).fillna(other).to_numpy(np.int64)
    out = dict(tables)
    collapsed = items.copy()
    collapsed[SOURCE_COLUMN] = category
    collapsed[C.CATEGORY] = new  # int64, as the contract types categories
    out[C.ITEMS] = collapsed
    moved = int((new == other).sum())
    summary = {"categories": before, "kept": max_categories, "items_moved": moved}
    return out, summary
