"""A user's taste in content space: the rule training and serving share.

The ``user_content_profile`` view keeps, per user and snapshot, ``content_profile``: the
weighted sum of the items' *unit* rows in the catalogue's content space (below) of the items
the user clicked (weight 1), bought (weight ``contract.affinity.PURCHASE_WEIGHT``) or was
shown by their own search and browse (organic impressions, clicked or not, weight
:data:`ORGANIC_WEIGHT`) in the 30 days before it, normalised to unit length (empty without
any). An organic impression is the user's choice, not a feed's. Item content is what every
catalogue carries (the simulator's is a noisy linear image of the item's hidden taste
vector; real data's is built by ``training.ingest``), so the profile reaches items nobody
has shown yet: the long tail the logged pool never covered.

The content space (:class:`ContentSpace`, :func:`similarity_space`) is fitted on the
catalogue's content: centred, projected on the principal components above the noise floor,
each scaled to unit signal variance; the identity for content narrower than
:data:`WHITEN_MIN_DIM` or without a noise floor. Training (``table_unit`` of the items
table) and serving (``contract.catalog.Catalog.unit_content``) fit it on the same rows in
item-id order, so both get the same bits. On sim-small (``tools.bench_profile``, the mean
per-user rank correlation of the profile's cosine with the simulator's true affinity):
clicks and purchases alone 0.52, with organic impressions 0.58, in the content space 0.62
(docs/models.md).

Two things are derived from it, by the functions here and nowhere else:

- the ranker's ``content_affinity_for_item``: the cosine of the profile and the candidate's
  unit row in the content space (:func:`similarity`); 0 for a user without a profile or an
  item without content.
- retrieval's PROFILE source (``services.retrieval.index``, and the offline replay in
  ``training.retrieval.retriever``): the catalogue's items by
  ``PROFILE_SIMILARITY_WEIGHT x cosine + PROFILE_VALUE_WEIGHT x log(price x margin)``
  (:class:`ProfileIndex`), brute force over the unit rows in the content space. The value
  term makes the source look for what a purchase is worth, not only for what is liked: on
  sim-small the Oracle's best page over history + profile + ANN candidates rose from 40 % of
  the catalogue optimum (history + ANN) to 58.5 % (docs/ranking.md).

This module imports only numpy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from contract import columns as C

WINDOW_DAYS = 30  # engagements before the snapshot that make the profile
ORGANIC_WEIGHT = 1.0  # an organic impression (the user's search or browse) counts as a click
WHITEN_MIN_DIM = 8  # narrower content is compared as it is (no noise floor to estimate)
NOISE_FLOOR_FACTOR = 2.0  # a component is taste, not noise, above this x the noise floor
# The profile weight at which the ranker's content_affinity_expected counts the cosine at
# half: how far the cosine can be trusted grows with the evidence (evidence_shrink).
PROFILE_EVIDENCE_HALF = 8.0
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


@dataclass(frozen=True, eq=False)
class ContentSpace:
    """Where a profile and an item's content are compared: the catalogue's content centred
    and projected on its principal components above the noise floor, each scaled to unit
    signal variance (:func:`similarity_space`); the identity for narrow content.

    Raw content distorts the cosine: the simulator's is a random linear image of the taste
    space plus noise, so some taste directions weigh several times others, and every noise
    direction counts as much as a taste one. On sim-small the space raised the mean
    per-user rank correlation of a profile's cosine with the true affinity from 0.58 to
    0.62 (``tools.bench_profile``; docs/models.md).
    """

    mean: np.ndarray  # float64 (dim,)
    projection: np.ndarray  # float64 (dim, k); the identity: k = dim, mean 0

    @property
    def dim(self) -> int:
        """The width of the vectors compared: profiles in this space have it."""
        return int(self.projection.shape[1])

    def unit(self, content: np.ndarray) -> np.ndarray:
        """(items, k) float32 unit rows of ``content`` (items, dim) in this space; a zero row
        stays zero. Row by row (einsum): a row gets the same bits alone or in any batch."""
        x = np.asarray(content, np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.mean):
            raise ValueError(f"content must be (items, {len(self.mean)}), got shape {x.shape}")
        if x.shape[1] == 0:
            return np.zeros((len(x), 0), np.float32)
        zero = ~x.any(axis=1)
        projected = np.einsum("ij,jk->ik", x - self.mean, self.projection)
        projected[zero] = 0.0
        return unit_rows(projected.astype(np.float32))


def similarity_space(item_ids: np.ndarray, content: np.ndarray) -> ContentSpace:
    """The catalogue's :class:`ContentSpace`, fitted on its rows in item-id order (so every
    holder of the same catalogue gets the same bits, whatever its row order).

    Content narrower than :data:`WHITEN_MIN_DIM`, or whose components show no noise floor
    to stand above, gets the identity. The floor is the median variance of the smaller half
    of the components; a component is kept when its variance exceeds
    :data:`NOISE_FLOOR_FACTOR` x the floor, and scaled by 1 / sqrt(variance - floor).
    """
    x = np.asarray(content, np.float64)
    dim = x.shape[1] if x.ndim == 2 else 0
    identity = ContentSpace(np.zeros(dim), np.eye(dim))
    nonzero = np.asarray(x.any(axis=1) if dim else np.zeros(len(x), bool), dtype=bool)
    if dim < WHITEN_MIN_DIM or nonzero.sum() <= 2 * dim:
        return identity
    order = np.argsort(np.asarray(item_ids, np.int64), kind="stable")
    rows = x[order][nonzero[order]]
    mean = rows.mean(axis=0)
    centred = rows - mean
    values, vectors = np.linalg.eigh(centred.T @ centred / (len(rows) - 1))
    values, vectors = values[::-1], vectors[:, ::-1]
    floor = float(np.median(values[dim // 2 :]))
    keep = values > NOISE_FLOOR_FACTOR * floor
    if floor <= 0 or not keep.any() or keep.all():
        return identity
    return ContentSpace(mean, vectors[:, keep] / np.sqrt(values[keep] - floor))


def table_unit(items: Any) -> np.ndarray:
    """An items table's unit content rows in its :class:`ContentSpace`, in table order:
    what profiles are built from and compared with ((n, 0) without content)."""
    rows = table_content(items)
    return similarity_space(items[C.ITEM_ID].to_numpy(), rows).unit(rows)


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


def evidence_shrink(weight: np.ndarray | float) -> np.ndarray:
    """``w / (w + PROFILE_EVIDENCE_HALF)`` of a profile's ``content_profile_weight`` ``w``
    (float32; 0 for no or a negative weight): the share of the profile's cosine the ranker's
    ``content_affinity_expected`` keeps. On sim-small the per-user slope of the true
    affinity on the cosine rises from 0.38 for profiles of weight at most 10 to 0.81 above
    80, and this curve (scaled by 0.83) fits it with the half at 7.0 (``tools.bench_profile``,
    ``docs/models.md``)."""
    w = np.maximum(np.asarray(weight, dtype=np.float64), 0.0)
    return (w / (w + PROFILE_EVIDENCE_HALF)).astype(np.float32)


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
    """The PROFILE source over a catalogue: unit content rows and log(price x margin).

    ``content``: the items' rows in the catalogue's content space (``Catalog.unit_content``,
    ``table_unit``), scaled to unit length again here."""

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
