"""The features core: one request's (user, item, context) columns, turned into the ranker's
matrix by ``contract.features.build_matrix``, the function training used.

Every column is defined as in a training row (``training.dataset``):

- user views (user_profile, user_category_affinity, user_seller_recency,
  user_content_profile, user_recent_activity): as retrieval read them for the feed and the
  request carries them (``services.common.users``), else read here once; a missing row or
  value takes ``feature_repo.schema.DEFAULTS`` (else 0 / "unknown"), as ``fill_defaults``
  does. The user is *known* when a user_profile row exists.
- ``category_affinity_for_item``: ``contract.affinity.for_items`` of the user's sparse
  affinity (``affinity_categories``, ``affinity_weights``, ``affinity_total``; empty lists and
  a total of 0 without a row) and each item's item_stats ``category`` and
  ``category_share``: the user's smoothed share of engagement in the item's category; the
  uniform 1 / n_categories for an item without an item_stats row (category -1). The same
  function makes the training rows' column. ``affinity_total`` is also an ordinary user
  feature and ``category_share`` an ordinary item feature.
- ``seller_days_since_engaged``: the user's ``recent_seller_days`` at the position of the
  item's catalog seller in ``recent_sellers`` (training's ``seller_days_for_items``, which
  joins the same items table's seller); 365 when the seller is not listed, the user has no
  row, or the item is unknown.
- ``content_affinity_for_item``: ``contract.content.similarity`` of the user's
  ``content_profile`` and the item's unit catalog content (einsum, the same bits as
  training's ``similarity_rows`` whatever the batch): the cosine; 0 for a user without a profile
  (or one of another width), an item without content, and an unknown item (the default
  row's content is zero).
- item views: gathered from the in-memory :class:`~services.features.items.ItemSnapshot`.
- context: ``hour_of_day`` and ``day_of_week`` (Monday = 0) of the request time in UTC
  (``add_context``), ``surface`` as the impression's "HOME" / "CHECKOUT".
- ``country`` and ``device`` are the user_profile values, as in training, where the
  impression carries neither and both come from the profile view; an unknown user gets
  "unknown" as a profile-less training row did. The request context's country and device
  are not features: a new user with a known country never occurred in training.

Feast's online read returns the latest row whatever its age, while training's point-in-time
join finds a row only within its view's TTL (``feature_repo.schema.TTL_SECONDS``). Training
is what the ranker learned from, so serving follows it: a user row (``UserReader``) or item
row (``ItemSnapshot``) past its TTL at the request's time is served as missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np

from contract import affinity, content
from contract import columns as C
from contract.features import DAY_OF_WEEK, FEATURE_SCHEMA, HOUR, INPUT_COLUMNS, build_matrix
from feature_repo import schema as S
from services.common.errors import FailedPrecondition, Unavailable
from services.common.online import default_value, ttl_time
from services.common.users import USER_VIEWS, UserReader
from services.features.items import (
    CATEGORY_SHARE,
    IN_STOCK,
    ITEM_BATCH_VIEWS,
    ITEM_FEATURES,
    ITEM_VIEWS,
    SELLER_IS_NEW,
    ItemSnapshot,
)

MAX_ITEMS = 2000
# the user's scalar features: every user-view feature but the lists reduced per item
USER_FEATURES: dict[str, str] = {
    name: kind
    for view in USER_VIEWS
    for name, kind in S.FEATURES[view].items()
    if name not in S.REDUCED_FOR_ITEM
}
USER_DEFAULTS: dict[str, Any] = {
    name: default_value(name, kind) for name, kind in USER_FEATURES.items()
}
if S.AFFINITY_TOTAL not in USER_FEATURES:
    raise ImportError(
        f"{S.AFFINITY_TOTAL} is no user scalar: update services/features/assembler.py"
    )
_CONTEXT = (HOUR, DAY_OF_WEEK, C.SURFACE)
# the per-item reductions of per-user lists that Assembler.columns computes
_REDUCED = {S.AFFINITY_FOR_ITEM, S.SELLER_DAYS_SINCE_ENGAGED, S.CONTENT_AFFINITY_FOR_ITEM}
if set(S.REDUCED_FOR_ITEM.values()) != _REDUCED:
    raise ImportError(
        f"the schema reduces lists to {sorted(set(S.REDUCED_FOR_ITEM.values()))}, the "
        f"features service computes {sorted(_REDUCED)}: update services/features/assembler.py"
    )
_COVERED = set(ITEM_FEATURES) | set(USER_FEATURES) | _REDUCED | set(_CONTEXT)
if set(INPUT_COLUMNS) - _COVERED:
    raise ImportError(
        f"build_matrix reads {sorted(set(INPUT_COLUMNS) - _COVERED)}, which the features "
        "service does not assemble: update services/features/assembler.py"
    )


@dataclass(frozen=True)
class UserFeatures:
    """One user's features, defaults filled in."""

    known: bool  # a user_profile row exists
    values: Mapping[str, Any]  # USER_FEATURES -> scalar (affinity_total among them)
    # int64 categories, heaviest first (empty: no engagement or no row), and the float32
    # weights aligned with them
    affinity_categories: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    affinity_weights: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))
    # int64, most recent first (empty: no row), and the float32 days aligned with it
    recent_sellers: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    recent_seller_days: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))
    # float32 unit vector of the catalogue's content width (empty: no row or no engagement)
    content_profile: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))

    def __post_init__(self) -> None:
        if len(self.affinity_categories) != len(self.affinity_weights):
            raise ValueError(
                f"{S.AFFINITY_CATEGORIES} and {S.AFFINITY_WEIGHTS} must be aligned, got "
                f"{len(self.affinity_categories)} categories and "
                f"{len(self.affinity_weights)} weights"
            )
        if len(self.recent_sellers) != len(self.recent_seller_days):
            raise ValueError(
                f"{S.RECENT_SELLERS} and {S.RECENT_SELLER_DAYS} must be aligned, got "
                f"{len(self.recent_sellers)} sellers and {len(self.recent_seller_days)} days"
            )

    @classmethod
    def unknown(cls) -> UserFeatures:
        return cls(False, dict(USER_DEFAULTS))

    @property
    def affinity_total(self) -> float:
        return float(self.values[S.AFFINITY_TOTAL])

    @classmethod
    def from_rows(cls, rows: Mapping[str, Mapping[str, Any] | None]) -> UserFeatures:
        """From each user view's decoded values (None: no row; a None value: default). A user
        is known when their user_profile row holds a value."""
        values = dict(USER_DEFAULTS)
        for view in USER_VIEWS:  # the lists are not in values: reduced per item
            for name, value in (rows.get(view) or {}).items():
                if name in values and value is not None:
                    values[name] = value
        affinity_row = rows.get(S.USER_CATEGORY_AFFINITY) or {}
        categories = affinity_row.get(S.AFFINITY_CATEGORIES)
        weights = affinity_row.get(S.AFFINITY_WEIGHTS)
        recency = rows.get(S.USER_SELLER_RECENCY) or {}
        sellers, days = recency.get(S.RECENT_SELLERS), recency.get(S.RECENT_SELLER_DAYS)
        profile_vector = (rows.get(S.USER_CONTENT_PROFILE) or {}).get(S.CONTENT_PROFILE)
        # Redis answers a user it does not hold with a row of nulls, SQLite with no row
        profile = rows.get(S.USER_PROFILE) or {}
        return cls(
            any(value is not None for value in profile.values()),
            values,
            np.asarray(categories if categories is not None else (), dtype=np.int64),
            np.asarray(weights if weights is not None else (), dtype=np.float32),
            np.asarray(sellers if sellers is not None else (), dtype=np.int64),
            np.asarray(days if days is not None else (), dtype=np.float32),
            np.asarray(profile_vector if profile_vector is not None else (), dtype=np.float32),
        )


class ItemSource(Protocol):
    """Where the current item table comes from (an ``items.ItemStore``)."""

    def snapshot(self) -> ItemSnapshot: ...


@dataclass(frozen=True)
class RequestContext:
    """The request's context features."""

    surface: str  # one of contract.columns.SURFACES
    hour_of_day: int  # UTC
    day_of_week: int  # Monday = 0
    at_s: float | None = None  # the TTLs' clock (services.common.online.ttl_time)

    @classmethod
    def at(cls, when: datetime | None, surface: str) -> RequestContext:
        """Context of a request at ``when`` (timezone-aware; None: now)."""
        if surface not in C.SURFACES:
            raise ValueError(f"surface must be one of {C.SURFACES}, got {surface!r}")
        at_s = ttl_time(when)
        when = datetime.now(UTC) if when is None else when.astimezone(UTC)
        return cls(surface, when.hour, when.weekday(), at_s)


@dataclass(frozen=True)
class Features:
    """One row per requested item, in request order."""

    matrix: np.ndarray  # float32 (items, FEATURE_SCHEMA)
    available: np.ndarray  # bool: in the catalog and in stock
    values: np.ndarray  # float32: price x margin
    prices: np.ndarray  # float32
    categories: np.ndarray  # int32, -1 for an unknown item
    new_seller: np.ndarray  # bool
    heuristic_scores: np.ndarray  # float32
    known_user: bool


def seller_days_for_items(
    recent_sellers: np.ndarray, recent_seller_days: np.ndarray, sellers: np.ndarray
) -> np.ndarray:
    """Each item's days since the user last engaged with its seller (training's
    ``seller_days_for_items``): 365 for a seller not in the user's list."""
    out = np.full(len(sellers), S.DEFAULTS[S.SELLER_DAYS_SINCE_ENGAGED], dtype=np.float32)
    if len(recent_sellers):
        order = np.argsort(recent_sellers, kind="stable")
        listed = recent_sellers[order]
        pos = np.minimum(np.searchsorted(listed, sellers), len(listed) - 1)
        hit = listed[pos] == sellers
        out[hit] = recent_seller_days[order[pos[hit]]]
    return out


def first_duplicate(ids: np.ndarray) -> tuple[int, int, int] | None:
    """``(id, first position, repeat position)`` of the earliest repeat in ``ids``, or None."""
    if len(ids) < 2:
        return None
    _, first = np.unique(ids, return_index=True)
    if len(first) == len(ids):
        return None
    repeated = np.ones(len(ids), dtype=bool)
    repeated[first] = False
    k = int(np.flatnonzero(repeated)[0])
    return int(ids[k]), int(np.flatnonzero(ids == ids[k])[0]), k


class Assembler:
    """Builds the ranker's features for (user, items, context)."""

    schema = FEATURE_SCHEMA

    def __init__(self, items: ItemSource, users: UserReader) -> None:
        self.items = items
        self.users = users

    def read_user(self, user_id: int, when: datetime | None = None) -> UserFeatures:
        """The user's features from the online store (when the request did not carry them)
        as of ``when`` (the request's time): rows past their TTL read as missing (``ttl_time``).
        Unavailable when the store cannot be read."""
        try:
            return UserFeatures.from_rows(self.users.read(user_id, ttl_time(when)))
        except Exception as err:
            raise Unavailable(
                f"the online store failed to read user {user_id}: {type(err).__name__}: {err}"
            ) from err

    @property
    def schema_hash(self) -> str:
        return self.schema.hash

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.schema.names

    def check_schema_hash(self, expected: str) -> None:
        """FailedPrecondition when the caller expects another schema (empty accepts ours)."""
        if expected and expected != self.schema.hash:
            raise FailedPrecondition(
                f"schema_hash {expected} does not match the features service's feature "
                f"schema {self.schema.hash}: deploy a ranker bundle and features service "
                "built from the same feature code"
            )

    def columns(
        self, snap: ItemSnapshot, rows: np.ndarray, user: UserFeatures, context: RequestContext
    ) -> dict[str, Any]:
        """The named columns ``build_matrix`` reads: item arrays, user and context scalars.
        An item whose item_stats or seller_stats row is past the view's TTL at the request's
        time gets that view's defaults (the default row), as training's join gave it."""
        view_rows = {view: rows for view in ITEM_VIEWS}
        for view in ITEM_BATCH_VIEWS:
            stale = snap.expired_rows(view, rows, context.at_s)
            if stale is not None and stale.any():
                view_rows[view] = np.where(stale, snap.index.n, rows)
        columns: dict[str, Any] = {
            name: snap.features[name][view_rows[view]]
            for view in ITEM_VIEWS
            for name in S.FEATURES[view]
        }
        columns.update(user.values)
        stats_rows = view_rows[S.ITEM_STATS]
        columns[S.AFFINITY_FOR_ITEM] = affinity.for_items(
            user.affinity_categories,
            user.affinity_weights,
            user.affinity_total,
            snap.affinity_category[stats_rows],
            snap.features[CATEGORY_SHARE][stats_rows],
            snap.n_categories,
        )
        columns[S.SELLER_DAYS_SINCE_ENGAGED] = seller_days_for_items(
            user.recent_sellers, user.recent_seller_days, snap.sellers[rows]
        )
        columns[S.CONTENT_AFFINITY_FOR_ITEM] = content.similarity(
            user.content_profile, snap.unit_content[rows]
        )
        columns[HOUR] = context.hour_of_day
        columns[DAY_OF_WEEK] = context.day_of_week
        columns[C.SURFACE] = context.surface
        return columns

    def assemble(
        self, user: UserFeatures, item_ids: np.ndarray, context: RequestContext
    ) -> Features:
        """The features of ``item_ids`` (int64, validated) for ``user``."""
        snap = self.items.snapshot()
        rows = snap.index.rows(item_ids)
        matrix = build_matrix(self.columns(snap, rows, user, context))
        features = snap.features
        return Features(
            matrix=matrix,
            available=snap.known[rows] & (features[IN_STOCK][rows] == 1),
            values=snap.values[rows],
            prices=snap.prices[rows],
            categories=snap.categories[rows],
            new_seller=features[SELLER_IS_NEW][rows] == 1,
            heuristic_scores=snap.heuristic[rows],
            known_user=user.known,
        )
