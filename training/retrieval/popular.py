"""The popularity fallback: what retrieval returns for a user the tower cannot serve.

``retrieval/popular.json`` holds, for every (country, device) segment and overall, the
``k`` items with the most clicks in the last ``window_days`` days of the training period
(ties: the lower item id first). A segment with fewer than ``k`` clicked items is padded
with the overall list, so every list has ``k`` items when the window saw that many. A
request whose country or device is not a known segment reads ``overall``.

Layout::

    {"k": 500, "window": {"start": ..., "end": ...}, "segment_key": "<country>/<device>",
     "overall": [item_id, ...], "segments": {"US/ios": [item_id, ...], ...}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from contract import columns as C
from contract.popular import segment_key


def _top(item_ids: np.ndarray, k: int) -> list[int]:
    if len(item_ids) == 0:
        return []
    ids, counts = np.unique(item_ids, return_counts=True)
    order = np.lexsort((ids, -counts))
    return [int(i) for i in ids[order[:k]]]


def _pad(head: list[int], tail: list[int], k: int) -> list[int]:
    seen = set(head)
    return head + [i for i in tail if i not in seen][: k - len(head)]


def popular_items(
    clicks: pd.DataFrame,
    users: pd.DataFrame,
    start: pd.Timestamp,
    end: pd.Timestamp,
    k: int = 500,
) -> dict[str, Any]:
    """Top-``k`` lists from ``clicks`` (rows with user_id, item_id, event_timestamp) in
    ``[start, end)``; a user's segment is their country and device in ``users``."""
    ts = clicks[C.EVENT_TIMESTAMP]
    window = clicks[(ts >= start) & (ts < end)]
    segment = users.set_index(C.USER_ID)[[C.COUNTRY, C.DEVICE]]
    joined = segment.reindex(window[C.USER_ID].to_numpy())
    country = joined[C.COUNTRY].to_numpy()
    device = joined[C.DEVICE].to_numpy()
    items = window[C.ITEM_ID].to_numpy(np.int64)
    overall = _top(items, k)
    segments = {}
    for c in C.COUNTRIES:
        for d in C.DEVICES:
            own = _top(items[(country == c) & (device == d)], k)
            segments[segment_key(c, d)] = _pad(own, overall, k)
    return {
        "k": k,
        "window": {"start": start.isoformat(), "end": end.isoformat()},
        "segment_key": segment_key("<country>", "<device>"),
        "overall": overall,
        "segments": segments,
    }


def save_popular(popular: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(popular))


def lookup(popular: dict[str, Any], country: str, device: str) -> list[int]:
    """The list a request from ``country``/``device`` falls back to."""
    lists: dict[str, list[int]] = popular["segments"]
    return lists.get(segment_key(country, device), popular["overall"])
