"""Features of (request, candidate) pairs as of the request time, through the same Feast
point-in-time join the training sets use, so offline evaluation scores candidates with
exactly the features a model was trained on."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from contract import columns as C
from training.dataset import (
    ItemContent,
    add_context,
    entity_frame,
    fill_defaults,
    historical_features,
)

_ITEM_CONTENT: dict[int, tuple[pd.DataFrame, ItemContent]] = {}


def item_content(items: pd.DataFrame) -> ItemContent:
    """The items table's :class:`ItemContent`, built once per table (a replay asks for the
    features of every request's candidates with the same table)."""
    held = _ITEM_CONTENT.get(id(items))
    if held is None or held[0] is not items:
        _ITEM_CONTENT.clear()
        held = _ITEM_CONTENT[id(items)] = (items, ItemContent(items))
    return held[1]


if TYPE_CHECKING:
    from feast import FeatureStore

PAIR_ID = "pair_id"


def pair_frame(requests: pd.DataFrame, candidates: list[np.ndarray]) -> pd.DataFrame:
    """One row per (request, candidate item): request_id, user_id, ts, surface, item_id."""
    counts = np.array([len(c) for c in candidates], dtype=np.int64)
    rows = requests.loc[requests.index.repeat(counts), [C.REQUEST_ID, C.USER_ID, C.TS, C.SURFACE]]
    rows = rows.reset_index(drop=True)
    rows[C.ITEM_ID] = (
        np.concatenate(candidates).astype(np.int64) if len(counts) else np.zeros(0, np.int64)
    )
    rows[PAIR_ID] = np.arange(len(rows), dtype=np.int64)
    return rows


def features_for_pairs(
    store: FeatureStore, pairs: pd.DataFrame, items: pd.DataFrame
) -> pd.DataFrame:
    """Training-row-shaped features for ``pairs``, in the order of ``pairs``."""
    n_cat = int(items[C.CATEGORY].max()) + 1
    entity = entity_frame(add_context(pairs.copy()), items)
    joined = fill_defaults(historical_features(store, entity, n_cat, item_content(items)))
    return joined.sort_values(PAIR_ID, kind="stable").reset_index(drop=True)
