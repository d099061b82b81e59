"""Recall@K of held-out engagements, for the two-tower model and the popularity baselines.

A *group* is one (user, UTC day) of a split with at least one engagement of the label
being measured. Its relevant items are the distinct items engaged with that day; its
query is the user's features at their first request of that day (what a retrieval call
at the start of the visit would have seen, so no engagement of the day leaks into it).
Recall@K of a group is the share of its relevant items in the K retrieved; the reported
figure is the mean over groups. A figure that cannot be computed (a group the split has
none of, an empty fallback list, an untimed tower) is reported as None with its reason
(:func:`explain_uncomputable`), never as a 0.0 that reads like a measurement.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from contract import columns as C
from contract.timeutil import NS_PER_DAY, to_ns


@dataclass(frozen=True)
class EvalGroups:
    """Groups in CSR form: group g's relevant catalog rows are
    ``items[indptr[g]:indptr[g + 1]]``; ``query_row[g]`` is the row of ``rows`` whose user
    features form its query."""

    user_id: np.ndarray
    query_row: np.ndarray
    indptr: np.ndarray
    items: np.ndarray

    def __len__(self) -> int:
        return len(self.query_row)

    def subsample(self, n: int, seed: int) -> EvalGroups:
        """At most ``n`` groups, drawn without replacement (all of them when fewer)."""
        if len(self) <= n:
            return self
        keep = np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False))
        sizes = np.diff(self.indptr)[keep]
        items = np.concatenate([self.items[self.indptr[g] : self.indptr[g + 1]] for g in keep])
        indptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return EvalGroups(self.user_id[keep], self.query_row[keep], indptr, items)


def eval_groups(rows: pd.DataFrame, engaged: np.ndarray, catalog_rows: np.ndarray) -> EvalGroups:
    """The (user, day) groups of ``rows`` with at least one ``engaged`` row.

    ``catalog_rows`` is the catalog row of each row's item (-1: not in the catalog; such
    an engagement cannot be retrieved and is dropped).
    """
    user = rows[C.USER_ID].to_numpy(np.int64)
    ts = to_ns(rows[C.EVENT_TIMESTAMP])
    day = ts // NS_PER_DAY
    frame = pd.DataFrame({"user": user, "day": day, "ts": ts, "row": np.arange(len(rows))})
    first = frame.sort_values(["ts", "row"], kind="stable").drop_duplicates(["user", "day"])
    first_row = first.set_index(["user", "day"])["row"]

    hits = frame[np.asarray(engaged, dtype=bool) & (catalog_rows >= 0)].copy()
    hits["item"] = catalog_rows[hits["row"].to_numpy()]
    hits = hits.drop_duplicates(["user", "day", "item"]).sort_values(["user", "day", "item"])
    keys = hits[["user", "day"]].drop_duplicates()
    sizes = hits.groupby(["user", "day"], sort=True).size().to_numpy()
    index = pd.MultiIndex.from_frame(keys)
    return EvalGroups(
        user_id=keys["user"].to_numpy(np.int64),
        query_row=first_row.reindex(index).to_numpy(np.int64),
        indptr=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        items=hits["item"].to_numpy(np.int64),
    )


def recall_at_k(
    retrieved: np.ndarray, groups: EvalGroups, item_weight: np.ndarray | None = None
) -> float:
    """Mean over groups of the share of relevant items among the retrieved.

    ``retrieved`` is ``(groups, K)`` catalog rows (-1: padding), or ``(K,)`` for one list
    shared by every group (a popularity baseline). 0.0 when there is no group.
    ``item_weight`` (per catalog row, >= 0) makes it the share of the relevant items'
    weight, e.g. their price x margin: the *value recall*. A group whose items weigh 0 in
    all counts as retrieved nothing.
    """
    if len(groups) == 0:
        return 0.0
    sizes = np.diff(groups.indptr)
    owner = np.repeat(np.arange(len(groups)), sizes)
    if retrieved.ndim == 1:
        hit = np.isin(groups.items, retrieved)
    else:
        if retrieved.shape[0] != len(groups):
            raise ValueError(f"retrieved has {retrieved.shape[0]} rows for {len(groups)} groups")
        width = np.int64(max(int(retrieved.max(initial=0)), int(groups.items.max())) + 1)
        keys = np.arange(len(groups), dtype=np.int64)[:, None] * width + retrieved
        hit = np.isin(owner * width + groups.items, keys[retrieved >= 0])
    if item_weight is None:
        per_group = np.bincount(owner, weights=hit, minlength=len(groups)) / sizes
        return float(per_group.mean())
    w = np.asarray(item_weight, dtype=np.float64)[groups.items]
    total = np.bincount(owner, weights=w, minlength=len(groups))
    got = np.bincount(owner, weights=w * hit, minlength=len(groups))
    per_group = np.divide(got, total, out=np.zeros_like(got), where=total > 0)
    return float(per_group.mean())


def top_items(item_rows: np.ndarray, k: int, n_items: int) -> np.ndarray:
    """The ``k`` most frequent catalog rows (ties: the lower row first)."""
    counts = np.bincount(item_rows, minlength=n_items)
    order = np.lexsort((np.arange(n_items), -counts))
    return order[: min(k, int((counts > 0).sum()))].astype(np.int64)


def interleave(first: np.ndarray, second: np.ndarray, k: int) -> np.ndarray:
    """``(groups, k)``: each group's two ranked lists merged by alternation, duplicates
    dropped, -1 padding (in either input or the output) ignored."""
    out = np.full((first.shape[0], k), -1, dtype=np.int64)
    width = max(first.shape[1], second.shape[1])
    merged = np.full((first.shape[0], 2 * width), -1, dtype=np.int64)
    merged[:, 0 : 2 * first.shape[1] : 2] = first
    merged[:, 1 : 2 * second.shape[1] : 2] = second
    for g, row in enumerate(merged):
        row = row[row >= 0]
        _, first_seen = np.unique(row, return_index=True)
        keep = row[np.sort(first_seen)][:k]
        out[g, : len(keep)] = keep
    return out


def explain_uncomputable(
    report: Mapping[str, Any], popular: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The retrieval stage's ``report`` with each figure that could not be computed set to
    None and its reason in ``skipped`` (field -> why), beside any ``skipped`` it had:

    - a recall (``*recall_at_*`` by group, ``recall_curve``) of a group that has no
      (user, day) in the test split, e.g. clicks of a purchase-only log;
    - ``fallback_recall_at_*`` when ``popular`` (the bundle's ``popular.json``) has no items;
    - ``user_tower_p50_ms`` when no request was timed (None, or 0: a timed call takes > 0 ms).
    """
    out = dict(report)
    groups: Mapping[str, int] = report.get("groups", {})
    skipped: dict[str, str] = dict(report.get("skipped", {}))
    missing = {  # group -> why it has no figures
        name: f"the test split has no '{name}' group (a user-day with such an engagement)"
        for name, n in groups.items()
        if n == 0
    }
    no_list = (
        "the bundle's popularity lists (popular.json) are empty: the rows they were built "
        "from hold no engagement before the end of training"
        if popular is not None and not popular.get("overall")
        else None
    )
    for key, value in report.items():
        if (
            "recall_at_" not in key
            or not isinstance(value, Mapping)
            or not set(value) <= set(groups)
        ):
            continue
        out[key] = dict(value)
        for name in value:
            why = missing.get(name) or (no_list if key.startswith("fallback_") else None)
            if why:
                out[key][name], skipped[f"{key}.{name}"] = None, why
    curve = report.get("recall_curve")
    if isinstance(curve, Mapping):
        out["recall_curve"] = {name: dict(by_retriever) for name, by_retriever in curve.items()}
        for name in curve:
            if name in missing:
                out["recall_curve"][name], skipped[f"recall_curve.{name}"] = None, missing[name]
            elif no_list and "fallback" in curve[name]:
                out["recall_curve"][name]["fallback"] = None
                skipped[f"recall_curve.{name}.fallback"] = no_list
    if "user_tower_p50_ms" in report and not report["user_tower_p50_ms"]:
        out["user_tower_p50_ms"] = None
        skipped["user_tower_p50_ms"] = "no test-split request was timed" + (
            " (the tower is timed on the click groups' first requests, and there are none)"
            if "click" in missing
            else ""
        )
    if skipped:
        out["skipped"] = skipped
    return out
