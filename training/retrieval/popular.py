"""The popularity fallback: what retrieval returns for a user the tower cannot serve.

``retrieval/popular.json`` (layout and lookup in ``contract.popular``) holds ``k`` items per
list, scored by the engagement the dataset has: each row weighs as its deepest engagement,
:data:`WEIGHTS` (click 1, add-to-cart 2, purchase 4: the ranker serves E[GMV], so a purchase
says more than a click, and a click-only or purchase-only log still ranks on what it has).
A list ranks the items engaged with in the window ``[start, end)`` (the last days before the
bundle's test period: the train and validation days) by their weighted count (ties: the
higher weighted count over the whole period before ``end``, then the lower item id).

- The **global** list (``overall``) continues past the window's items with the rest of the
  period's, by weighted count, so it has ``k`` items whenever the period saw that many.
- A **country** and a **(country, device) segment**, taken from the dataset's own users
  table, get a list when their window has at least :data:`MIN_USERS` distinct engaged users
  and :data:`MIN_EVENTS` engaged rows (fewer: a head ranked by a handful of people is noise);
  their own items come first, padded with the country's list (a segment) or the global one.
  A population below support gets no list and is served by the next level
  (segment -> country -> global); ``support`` records every population's counts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from contract import columns as C
from contract.popular import COUNTRY, FORMAT, SEGMENT, resolve, segment_key

# weight of a row by its deepest engagement (the largest weight among its labels)
WEIGHTS = {C.LABEL_CLICK: 1.0, C.LABEL_ATC: 2.0, C.LABEL_PURCHASE: 4.0}
MIN_USERS = 20  # distinct engaged users in the window for a country or segment of its own
MIN_EVENTS = 100  # engaged rows in the window for a country or segment of its own


def engagement_weight(rows: pd.DataFrame, weights: Mapping[str, float] = WEIGHTS) -> np.ndarray:
    """Each row's weight: the largest weight among the label columns it has > 0 (0 for none).

    A label column the frame lacks counts as never engaged; ValueError when it has none.
    """
    present = [col for col in weights if col in rows.columns]
    if not present:
        raise ValueError(
            f"popularity needs at least one engagement label column of {list(weights)}, "
            f"got columns {list(rows.columns)}"
        )
    weight = np.zeros(len(rows))
    for col in present:
        weight = np.maximum(weight, np.where(rows[col].to_numpy() > 0, weights[col], 0.0))
    return weight


def _ranked(
    ids: np.ndarray, first: np.ndarray, then: np.ndarray, k: int, every: bool = False
) -> list[int]:
    """At most ``k`` of ``ids`` by ``first`` then ``then`` (descending), then the lower id;
    only those with ``first > 0``, or ``then > 0`` too when ``every``."""
    keep = np.flatnonzero((first > 0) | (every & (then > 0)))
    order = np.lexsort((ids[keep], -then[keep], -first[keep]))
    return [int(i) for i in ids[keep[order[:k]]]]


def _pad(head: list[int], tail: list[int], k: int) -> list[int]:
    seen = set(head)
    return head + [i for i in tail if i not in seen][: k - len(head)]


def _support(keys: pd.Series, users: np.ndarray) -> dict[str, dict[str, int]]:
    """Distinct users and rows per key (NA keys left out)."""
    frame = pd.DataFrame({"key": keys.to_numpy(), "user": users}).dropna(subset=["key"])
    counts = frame.groupby("key", sort=True)["user"].agg(["nunique", "size"])
    return {
        str(key): {"users": int(row["nunique"]), "events": int(row["size"])}
        for key, row in counts.iterrows()
    }


def popular_items(
    events: pd.DataFrame,
    users: pd.DataFrame,
    start: pd.Timestamp,
    end: pd.Timestamp,
    k: int = 500,
    weights: Mapping[str, float] = WEIGHTS,
    min_users: int = MIN_USERS,
    min_events: int = MIN_EVENTS,
) -> dict[str, Any]:
    """The ``popular.json`` of ``events`` (rows with user_id, item_id, event_timestamp and
    any of the label columns of ``weights``) before ``end``, with the window ``[start, end)``;
    a user's segment is their country and device in ``users`` (module docstring)."""
    weight = engagement_weight(events, weights)
    keep = (weight > 0) & (events[C.EVENT_TIMESTAMP] < end).to_numpy()
    engaged, weight = events[keep], weight[keep]
    in_window = (engaged[C.EVENT_TIMESTAMP] >= start).to_numpy()
    ids, item = np.unique(engaged[C.ITEM_ID].to_numpy(np.int64), return_inverse=True)
    profile = users.drop_duplicates(C.USER_ID).set_index(C.USER_ID)[[C.COUNTRY, C.DEVICE]]
    who = profile.reindex(engaged[C.USER_ID].to_numpy())
    country = who[C.COUNTRY].astype("string").reset_index(drop=True)
    segment = country + "/" + who[C.DEVICE].astype("string").reset_index(drop=True)

    def scores(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weighted counts per item of the rows in ``mask``: in the window, before ``end``."""
        window = np.bincount(item[mask & in_window], weight[mask & in_window], len(ids))
        return window, np.bincount(item[mask], weight[mask], len(ids))

    overall = _ranked(ids, *scores(np.ones(len(item), bool)), k, every=True)
    user_ids = engaged[C.USER_ID].to_numpy(np.int64)[in_window]
    support = {
        "countries": _support(country[in_window], user_ids),
        "segments": _support(segment[in_window], user_ids),
    }

    def own(level: str, keys: pd.Series, key: str) -> list[int] | None:
        """The population's own ranked items; None below the support threshold."""
        found = support[level][key]
        if found["users"] < min_users or found["events"] < min_events:
            return None
        return _ranked(ids, *scores((keys == key).fillna(False).to_numpy(bool)), k)

    countries: dict[str, list[int]] = {}
    for c in support["countries"]:
        if (head := own("countries", country, c)) is not None:
            countries[c] = _pad(head, overall, k)
    segments: dict[str, list[int]] = {}
    for key in support["segments"]:
        if (head := own("segments", segment, key)) is not None:
            segments[key] = _pad(head, countries.get(key.split("/", 1)[0], overall), k)
    return {
        "format": FORMAT,
        "k": k,
        "window": {"start": start.isoformat(), "end": end.isoformat()},
        "segment_key": segment_key("<country>", "<device>"),
        "weights": dict(weights),
        "min_support": {"users": min_users, "events": min_events},
        "overall": overall,
        "countries": countries,
        "segments": segments,
        "support": support,
    }


def save_popular(popular: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(popular))


def lookup(popular: dict[str, Any], country: str, device: str) -> list[int]:
    """The list a request from ``country``/``device`` falls back to: its segment, else its
    country, else the global list (``contract.popular.resolve``, as serving reads it)."""
    segments, countries = popular["segments"], popular.get("countries", {})
    level, key = resolve(segments, countries, country, device)
    found: list[int] = (
        segments[key]
        if level == SEGMENT
        else countries[key]
        if level == COUNTRY
        else popular["overall"]
    )
    return found
