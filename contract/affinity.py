"""A user's category affinity, held sparse: the rule training and serving share.

The ``user_category_affinity`` view keeps, per user and snapshot, the categories the user
engaged with in the 30 days before it (at most :data:`TOP_K`, heaviest first), their
engagement weights (a click counts 1, a purchase ``PURCHASE_WEIGHT``) and the window's total
weight over all categories. ``item_stats.category_share`` holds each category's smoothed
share of everyone's engagement over the same window. Nothing is ever users x categories.

Two things are derived from it, by the functions here and nowhere else:

- the ranker's ``category_affinity_for_item``: the user's smoothed share of engagement in
  the candidate's category, ``(w_c + s * share_c) / (total + s)`` with ``s`` =
  :data:`PRIOR_STRENGTH` (``w_c`` = 0 for a category not in the list). A user without a
  row reads ``share_c``; an item without an ``item_stats`` row (category ``-1``) reads the
  uniform ``1 / n_categories``. For a user with at most ``TOP_K`` categories this is the
  dense vector's entry exactly; beyond that, the lightest categories read as unengaged.
- the user tower's input vector: the weights summed into ``bucket_count(n_categories)``
  buckets (category ``c`` goes to bucket ``c % buckets``: the identity up to
  :data:`MAX_BUCKETS` categories), smoothed toward uniform the same way,
  ``(W_b + s / buckets) / (total + s)``. Its width is bounded whatever the taxonomy.

This module imports only numpy.
"""

from __future__ import annotations

import numpy as np

TOP_K = 32  # categories kept per user and snapshot, the heaviest
PRIOR_STRENGTH = 2.0  # pseudo-engagements pulling a user's shares toward the prior
PURCHASE_WEIGHT = 3.0  # a purchase counts as this many clicks
MAX_BUCKETS = 256  # the tower's affinity input is at most this wide
BUCKETS = "category_affinity_buckets"  # the tower's name for its input vector


def bucket_count(n_categories: int) -> int:
    """Width of the tower's affinity input for a catalog of ``n_categories``."""
    return max(1, min(int(n_categories), MAX_BUCKETS))


def for_items(
    categories: np.ndarray | None,
    weights: np.ndarray | None,
    total: float,
    item_category: np.ndarray,
    item_share: np.ndarray,
    n_categories: int,
) -> np.ndarray:
    """One user's ``category_affinity_for_item`` for each item (float32).

    ``categories`` / ``weights``: the user's lists (None or empty: no engagement, or no row);
    ``item_category`` -1 marks an item without an ``item_stats`` row.
    """
    cats = np.zeros(0, np.int64) if categories is None else np.asarray(categories, np.int64)
    w = np.zeros(0, np.float64) if weights is None else np.asarray(weights, np.float64)
    return for_rows(
        np.array([0, len(cats)], dtype=np.int64),
        cats,
        w,
        np.array([total], dtype=np.float64),
        np.zeros(len(item_category), dtype=np.int64),
        item_category,
        item_share,
        n_categories,
    )


def for_rows(
    offsets: np.ndarray,
    categories: np.ndarray,
    weights: np.ndarray,
    totals: np.ndarray,
    snapshot: np.ndarray,
    item_category: np.ndarray,
    item_share: np.ndarray,
    n_categories: int,
) -> np.ndarray:
    """:func:`for_items` of many (user snapshot, item) rows at once.

    The snapshots are CSR: snapshot ``j``'s lists are ``categories[offsets[j]:offsets[j+1]]``
    (and ``weights``), its total ``totals[j]``; ``snapshot[i]`` is row ``i``'s (-1: the user
    has no row, so ``w`` = 0 and total = 0).
    """
    snapshot = np.asarray(snapshot, dtype=np.int64)
    cat = np.asarray(item_category, dtype=np.int64)
    share = np.asarray(item_share, dtype=np.float64)
    w = np.zeros(len(cat), dtype=np.float64)
    total = np.zeros(len(cat), dtype=np.float64)
    has = snapshot >= 0
    total[has] = totals[snapshot[has]]
    if len(categories):
        width = np.int64(max(int(n_categories), int(np.max(categories)) + 1, 1) + 1)
        entry_snapshot = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))
        keys = entry_snapshot * width + np.asarray(categories, dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        ask = has & (cat >= 0)
        want = snapshot[ask] * width + cat[ask]
        pos = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
        hit = keys[pos] == want
        found = np.flatnonzero(ask)[hit]
        w[found] = np.asarray(weights, dtype=np.float64)[order][pos[hit]]
    out = (w + PRIOR_STRENGTH * share) / (np.maximum(total, 0.0) + PRIOR_STRENGTH)
    out[cat < 0] = 1.0 / max(int(n_categories), 1)
    return out.astype(np.float32)


def buckets(
    offsets: np.ndarray,
    categories: np.ndarray,
    weights: np.ndarray,
    totals: np.ndarray,
    n_buckets: int,
) -> np.ndarray:
    """``(len(totals), n_buckets)`` float32 tower inputs of CSR lists (see :func:`for_rows`);
    a user with no engagement (or no row: pass empty lists and total 0) reads uniform."""
    n = len(totals)
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
    flat = rows * n_buckets + np.asarray(categories, dtype=np.int64) % n_buckets
    summed = np.bincount(
        flat, weights=np.asarray(weights, dtype=np.float64), minlength=n * n_buckets
    ).reshape(n, n_buckets)
    denom = np.maximum(np.asarray(totals, dtype=np.float64), 0.0) + PRIOR_STRENGTH
    return ((summed + PRIOR_STRENGTH / n_buckets) / denom[:, None]).astype(np.float32)


def buckets_one(
    categories: np.ndarray | None, weights: np.ndarray | None, total: float, n_buckets: int
) -> np.ndarray:
    """``(n_buckets,)``: one user's tower input (:func:`buckets` of one row)."""
    cats = np.zeros(0, np.int64) if categories is None else np.asarray(categories, np.int64)
    w = np.zeros(0, np.float64) if weights is None else np.asarray(weights, np.float64)
    offsets = np.array([0, len(cats)], dtype=np.int64)
    return buckets(offsets, cats, w, np.array([total], dtype=np.float64), n_buckets)[0]
