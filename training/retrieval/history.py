"""Building the history candidate source (the layout and the reader: ``contract.history``),
and the offline evaluation's merge of history and model candidates."""

from __future__ import annotations

import numpy as np
import pandas as pd

from contract.history import History

MAX_ITEMS = 200  # history candidates per user; the tower fills the rest of the k


def build_history(
    user_id: np.ndarray, item_id: np.ndarray, ts_ns: np.ndarray, max_items: int = MAX_ITEMS
) -> History:
    """From engagement events (one row per click or purchase); only events before the
    point the history is meant for may be passed in."""
    frame = pd.DataFrame({"user": user_id, "item": item_id, "ts": ts_ns})
    per_item = frame.groupby(["user", "item"], sort=False).agg(n=("ts", "size"), last=("ts", "max"))
    per_item = per_item.reset_index().sort_values(
        ["user", "n", "last", "item"], ascending=[True, False, False, True], kind="stable"
    )
    per_item = per_item[per_item.groupby("user").cumcount() < max_items]
    users, counts = np.unique(per_item["user"].to_numpy(np.int64), return_counts=True)
    return History(
        user_ids=users,
        indptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        item_ids=per_item["item"].to_numpy(np.int64),
    )


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
