"""A user's taste in content space: the rule training and serving share.

The ``user_content_profile`` view keeps, per user and snapshot, ``content_profile``: the
weighted sum of the *unit* content vectors of the items the user clicked (weight 1), bought
(weight ``contract.affinity.PURCHASE_WEIGHT``) or was shown by their own search and browse
(organic impressions, clicked or not, weight :data:`ORGANIC_WEIGHT`) in the 30 days before
it, normalised to unit length (empty without any). An organic impression is the user's
choice, not a feed's: on sim-small, counting them raised the mean per-user rank correlation
of the profile's cosine with the simulator's true affinity from 0.53 to 0.60 (docs/models.md).
Item content is what every catalogue carries (the simulator's is a noisy linear image of the
item's hidden taste vector; real data's is built by ``training.ingest``), so the profile
reaches items nobody has shown yet: the long tail the logged pool never covered.

Two things are derived from it, by the functions here and nowhere else:

- the ranker's ``content_affinity_for_item``: the cosine of the profile and the candidate's
  content (:func:`similarity`); 0 for a user without a profile or an item without content.
- retrieval's PROFILE source (``services.retrieval.index``, and the offline replay in
  ``training.retrieval.retriever``): the catalogue's items by
  ``PROFILE_SIMILARITY_WEIGHT x cosine + PROFILE_VALUE_WEIGHT x log(price x margin)``
  (:class:`ProfileIndex`), brute force over the unit content rows. The value term makes the
  source look for what a purchase is worth, not only for what is liked: on sim-small the
  Oracle's best page over history + profile + ANN candidates rose from 40 % of the
  catalogue optimum (history + ANN) to 58.5 % (docs/ranking.md).

This module imports only numpy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from contract import columns as C

WINDOW_DAYS = 30  # engagements before the snapshot that make the profile
ORGANIC_WEIGHT = 1.0  # an organic impression (the user's search or browse) counts as a click
PROFILE_SIMILARITY_WEIGHT = 4.0  # the cosine's weight in the PROFILE source's score
PROFILE_VALUE_WEIGHT = 1.0  # log(price x margin)'s weight in it
VALUE_FLOOR = 1e-3
# Share of the candidates the PROFILE source may take, by default none: on sim-small its
# candidates lift the Oracle's best page over them from 40 % to 55 % of the catalogue
# optimum, but the served GBDT cannot rank them (they lie outside the logged pool's price
# range, where its p(purchase) stays flat and p x price favours the dearest): the served
# page fell from 281 to 203 E[GMV]/1k with a share of 0.2. ``reports/eval.json``
# ``ablation.profile_candidates`` measures it every run; set the retrieval service's
# HOMEFEED_RETRIEVAL_PROFILE_SHARE to serve it.
PROFILE_SHARE = 0.0  # price x margin below this counts as this (log of 0 is not a score)


def content_matrix(vectors: Iterable[Any], n: int) -> np.ndarray:
    """An items table's ``content`` column (one vector per item) as (n, dim) float32; (n, 0)
    when there is none (``vectors`` empty for a table without the column) or the rows'
    widths differ: no profile can then score the items."""
    rows = [np.asarray(v, np.float32) for v in vectors]
    if not rows or len(rows) != n or len({r.shape for r in rows}) != 1 or rows[0].ndim != 1:
        return np.zeros((n, 0), np.float32)
    return np.stack(rows)


def table_content(items: Any) -> np.ndarray:
    """An items table's content (a frame with ``columns``, in table order) as
    :func:`content_matrix` gives it: (n, 0) for a table without the column."""
    return content_matrix(items[C.CONTENT] if C.CONTENT in items.columns else (), len(items))


def unit_rows(content: np.ndarray) -> np.ndarray:
    """(items, dim) float32 rows scaled to unit length; a zero row stays zero."""
    x = np.asarray(content, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"content must be (items, dim), got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def profile_of(unit_content: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The unit-length weighted sum of ``unit_content`` rows (empty when it is zero)."""
    total = np.asarray(weights, np.float64) @ np.asarray(unit_content, np.float64)
    norm = float(np.linalg.norm(total))
    return (total / norm).astype(np.float32) if norm > 0 else np.zeros(0, np.float32)


def as_profile(profile: np.ndarray | list[float] | None, dim: int) -> np.ndarray | None:
    """The profile as float32, or None when there is none (missing, empty) or it does not
    match the catalogue's content width (a bundle of another catalogue)."""
    if profile is None:
        return None
    p = np.asarray(profile, dtype=np.float32)
    if p.ndim != 1 or len(p) != dim or not np.isfinite(p).all() or not p.any():
        return None
    return p


def similarity(profile: np.ndarray | list[float] | None, unit_content: np.ndarray) -> np.ndarray:
    """``content_affinity_for_item`` of one user for each row of ``unit_content`` (float32):
    the cosine with the profile, 0 without a profile."""
    rows = np.asarray(unit_content, dtype=np.float32)
    p = as_profile(profile, rows.shape[1])
    if p is None:
        return np.zeros(len(rows), dtype=np.float32)
    # einsum, not BLAS: the same bits for a row alone or in any batch, and as similarity_rows
    return np.einsum("ij,j->i", rows, p).astype(np.float32, copy=False)


def similarity_rows(
    starts: np.ndarray, lengths: np.ndarray, values: np.ndarray, unit_content: np.ndarray
) -> np.ndarray:
    """``content_affinity_for_item`` of many (user, item) rows at once: row ``i``'s profile is
    ``values[starts[i]:starts[i] + lengths[i]]`` (the Arrow list layout, read in place), its
    item's unit content ``unit_content[i]``. A list of the wrong width (empty included)
    reads as no profile, as in :func:`similarity`."""
    rows = np.asarray(unit_content, dtype=np.float32)
    dim = rows.shape[1]
    out = np.zeros(len(rows), dtype=np.float32)
    has = np.asarray(lengths) == dim
    if dim == 0 or not has.any():
        return out
    at = np.asarray(starts, np.int64)[has]
    profiles = np.asarray(values, dtype=np.float32)[at[:, None] + np.arange(dim)]
    ok = np.isfinite(profiles).all(axis=1) & profiles.any(axis=1)
    sims = np.einsum("ij,ij->i", profiles, rows[has])
    out[has] = np.where(ok, sims, 0.0)
    return out


class ProfileIndex:
    """The PROFILE source over a catalogue: unit content rows and log(price x margin)."""

    def __init__(self, content: np.ndarray, prices: np.ndarray, margins: np.ndarray) -> None:
        self.unit = unit_rows(content)
        value = np.maximum(np.asarray(prices, np.float64) * np.asarray(margins, np.float64), 0)
        self.log_value = (PROFILE_VALUE_WEIGHT * np.log(np.maximum(value, VALUE_FLOOR))).astype(
            np.float32
        )
        if len(self.unit) != len(self.log_value):
            raise ValueError(
                f"content has {len(self.unit)} rows, prices and margins {len(self.log_value)}"
            )

    @property
    def dim(self) -> int:
        return int(self.unit.shape[1])

    def scores(self, profile: np.ndarray | list[float] | None) -> np.ndarray | None:
        """Every row's score for this profile (None: no usable profile)."""
        p = as_profile(profile, self.dim)
        if p is None:
            return None
        # einsum, not BLAS: no thread pool on the request path, and the same order offline
        return PROFILE_SIMILARITY_WEIGHT * np.einsum("ij,j->i", self.unit, p) + self.log_value

    def top(
        self, profile: np.ndarray | list[float] | None, k: int, blocked: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores) of the best ``k`` rows not ``blocked``, best first (ties by row)."""
        s = self.scores(profile)
        if s is None or k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        if blocked is not None:
            s = np.where(blocked, -np.inf, s)
        k = min(k, int(np.isfinite(s).sum()))
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        part = np.argpartition(-s, k - 1)[:k] if k < len(s) else np.arange(len(s))
        order = part[np.lexsort((part, -s[part]))]
        return order.astype(np.int64), s[order].astype(np.float32)
