"""The ranker's feature matrix: one schema and one function shared by training and serving.

:func:`build_matrix` turns columns named as in a training row (``schema.training_columns()``
plus the request context ``hour_of_day``, ``day_of_week`` and ``surface``) into a float32,
C-contiguous (rows x features) matrix whose columns follow :data:`FEATURE_SCHEMA`. It takes
either a training-set ``DataFrame`` or a mapping of numpy arrays (the features service's
500 candidates of one request); a column may also be a scalar, broadcast to every row,
which is how serving passes the user's and the request's features once.

The body is numpy only (no pandas in the loop): it is on the serving hot path, where 500
rows take tens of microseconds. Strings are encoded with fixed vocabularies from
``contract.columns`` so a code means the same in every bundle; an unknown value gets the
code ``len(vocabulary)`` instead of failing.

Derived features are those the simulator's purchase response depends on but no single
column carries: the log price, the price against what the user usually pays (their budget
shows through ``avg_price_paid_30d`` and ``spend_band``), the context codes, and the content
affinity shrunk by the evidence its profile rests on (``content_affinity_expected``).

``organic_context`` is the one training-only context: 1 on rows no feed chose (organic
search and browse impressions, and the negatives sampled for purchase-only data), read from
the optional ``policy`` column, and 0 wherever that column is absent, which is every
serving call: serving scores feed slots. A user who searched already wanted the item, so
such rows buy more often than a feed slot with the same features; the flag lets a model
learn from them without carrying that selection into the feed's scores (as a position
feature is trained on and held fixed at serving).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from contract import columns as C
from contract import content
from feature_repo import schema as S

# Definitions the batch feature jobs, the training sets and serving share.
HOUR = "hour_of_day"  # request context: UTC hour of the impression, 0..23
DAY_OF_WEEK = "day_of_week"  # request context: Monday = 0
NEW_SELLER_DAYS = 30  # seller_is_new: the seller joined within this many days
SPEND_BANDS = np.array([0.0, 25.0, 75.0, 200.0])  # spend_band = number of edges the spend exceeds

# feature-view columns the derived features read (names are the schema's)
AVG_PRICE_PAID = "avg_price_paid_30d"
SPEND_BAND = "spend_band"
if not {AVG_PRICE_PAID, SPEND_BAND} <= set(S.FEATURES[S.USER_PROFILE]):
    raise ImportError(f"{S.USER_PROFILE} lost {AVG_PRICE_PAID} or {SPEND_BAND}: update ranking")

# derived feature names
LOG_PRICE = "log_price"
PRICE_TO_AVG_PAID = "price_to_avg_paid"  # 0 when the user bought nothing in 30 days
PRICE_TO_SPEND_BAND = "price_to_spend_band"  # 0 for spend band 0 (no spend)
COUNTRY_CODE = "country_code"
DEVICE_CODE = "device_code"
SURFACE_CODE = "surface_code"
ORGANIC_CONTEXT = "organic_context"  # 1: no feed chose the row (training only; serving: 0)
# content_affinity_for_item x content.evidence_shrink(content_profile_weight)
CONTENT_AFFINITY_EXPECTED = "content_affinity_expected"
ORGANIC_POLICIES = (C.POLICY_ORGANIC, C.POLICY_SAMPLED)

# A spend band is an interval of 30-day spend (SPEND_BANDS edges); its
# reference amount is the band's lower edge, and half the first positive edge for band 1
# (spend in (0, 25]). Band 0 (no spend) has no reference.
BAND_REFERENCE = np.concatenate([[np.nan, SPEND_BANDS[1] / 2], SPEND_BANDS[1:]]).astype(np.float64)

VOCABULARIES: dict[str, tuple[str, ...]] = {
    COUNTRY_CODE: C.COUNTRIES,
    DEVICE_CODE: C.DEVICES,
    SURFACE_CODE: C.SURFACES,
}
CODE_SOURCE = {COUNTRY_CODE: C.COUNTRY, DEVICE_CODE: C.DEVICE, SURFACE_CODE: C.SURFACE}
_LOOKUP = {name: {v: i for i, v in enumerate(vocab)} for name, vocab in VOCABULARIES.items()}


def _code_dtype(vocabulary: Sequence[str]) -> str:
    """The vocabulary is part of a code's dtype, so the schema hash changes with it."""
    return "code(" + "|".join(vocabulary) + ")"


@dataclass(frozen=True)
class FeatureSchema:
    """Ordered feature names and dtypes of a model's input matrix.

    ``hash`` identifies the layout: serving refuses a bundle whose schema hash differs from
    the one its feature code builds.
    """

    names: tuple[str, ...]
    dtypes: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.dtypes):
            raise ValueError(
                f"feature schema needs one dtype per name, got {len(self.names)} names and "
                f"{len(self.dtypes)} dtypes"
            )
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"feature names must be unique, got {list(self.names)}")

    @functools.cached_property
    def hash(self) -> str:
        """sha256 of the ``name:dtype`` lines, in order (computed once: serving checks it on
        every request)."""
        text = "\n".join(f"{n}:{d}" for n, d in zip(self.names, self.dtypes, strict=True))
        return hashlib.sha256(text.encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "dtypes": list(self.dtypes), "hash": self.hash}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSchema:
        schema = cls(tuple(data["names"]), tuple(data["dtypes"]))
        stored = data.get("hash")
        if stored is not None and stored != schema.hash:
            raise ValueError(
                f"feature schema hash {stored} does not match its names and dtypes "
                f"(computed {schema.hash}); the file was edited or corrupted"
            )
        return schema


def _schema_dtype(name: str) -> str:
    if name in S.REDUCED_FOR_ITEM.values():
        return "float32"
    for feats in S.FEATURES.values():
        if name in feats:
            return feats[name]
    raise KeyError(name)


# every numeric column of a training row, in the schema's order
NUMERIC_COLUMNS: tuple[str, ...] = tuple(
    c for c in S.training_columns() if _schema_dtype(c) in ("float32", "int64")
)
STRING_COLUMNS: tuple[str, ...] = tuple(
    c for c in S.training_columns() if _schema_dtype(c) == "string"
)
if set(STRING_COLUMNS) != {C.COUNTRY, C.DEVICE}:
    raise ImportError(f"string features {STRING_COLUMNS}: each needs a vocabulary here")

_DERIVED: tuple[tuple[str, str], ...] = (
    (LOG_PRICE, "float32"),
    (PRICE_TO_AVG_PAID, "float32"),
    (PRICE_TO_SPEND_BAND, "float32"),
    (HOUR, "int64"),
    (DAY_OF_WEEK, "int64"),
    (COUNTRY_CODE, _code_dtype(C.COUNTRIES)),
    (DEVICE_CODE, _code_dtype(C.DEVICES)),
    (SURFACE_CODE, _code_dtype(C.SURFACES)),
    (ORGANIC_CONTEXT, "float32"),
    (CONTENT_AFFINITY_EXPECTED, "float32"),
)

FEATURE_SCHEMA = FeatureSchema(
    names=NUMERIC_COLUMNS + tuple(n for n, _ in _DERIVED),
    dtypes=tuple(_schema_dtype(c) for c in NUMERIC_COLUMNS) + tuple(d for _, d in _DERIVED),
)

# the numeric columns content_affinity_expected is derived from
_COSINE = NUMERIC_COLUMNS.index(S.CONTENT_AFFINITY_FOR_ITEM)
_PROFILE_WEIGHT = NUMERIC_COLUMNS.index(S.CONTENT_PROFILE_WEIGHT)

# the columns build_matrix reads
INPUT_COLUMNS: tuple[str, ...] = NUMERIC_COLUMNS + STRING_COLUMNS + (HOUR, DAY_OF_WEEK, C.SURFACE)
# and the one it reads when present (training rows): absent, every row is a feed's
OPTIONAL_COLUMNS: tuple[str, ...] = (C.POLICY,)

Columns = Mapping[str, Any] | pd.DataFrame


def _column(columns: Columns, name: str) -> np.ndarray:
    try:
        value = columns[name]
    except KeyError:
        raise KeyError(
            f"build_matrix needs column {name!r}; it reads {list(INPUT_COLUMNS)}"
        ) from None
    if isinstance(value, pd.Series):
        return value.to_numpy()
    return np.asarray(value)


def _n_rows(columns: Columns) -> int:
    if isinstance(columns, pd.DataFrame):
        return len(columns)
    for name in INPUT_COLUMNS:
        if name in columns:
            arr = np.asarray(columns[name])
            if arr.ndim:
                return int(arr.shape[0])
    return 1


def encode(values: np.ndarray, feature: str) -> np.ndarray:
    """Vocabulary codes of ``values`` (``len(vocabulary)`` for anything unknown or missing)."""
    lookup = _LOOKUP[feature]
    unknown = len(lookup)
    if values.ndim == 0:
        return np.asarray(lookup.get(values.item(), unknown), dtype=np.float32)
    if values.dtype.kind in "US":  # fixed-width numpy strings: compare per vocabulary entry
        out = np.full(values.shape, unknown, dtype=np.float32)
        for word, code in lookup.items():
            out[values == word] = code
        return out
    # object arrays (pandas strings, None): a dict lookup per row is the fastest for <1e6
    return np.fromiter((lookup.get(v, unknown) for v in values), np.float32, len(values))


def feature_schema() -> FeatureSchema:
    """The schema :func:`build_matrix` produces with this code."""
    return FEATURE_SCHEMA


def build_matrix(columns: Columns, schema: FeatureSchema | None = None) -> np.ndarray:
    """(rows x features) float32, C-contiguous, columns in :data:`FEATURE_SCHEMA` order.

    ``columns``: a training-set frame, or a mapping of column name -> numpy array (or a
    scalar, broadcast to all rows). ``schema``: the schema a model was trained with; a
    mismatch with this code's schema raises ``ValueError`` rather than scoring shifted
    columns.
    """
    if schema is not None and schema != FEATURE_SCHEMA:
        raise ValueError(
            f"model feature schema {schema.hash[:12]} does not match the feature code's "
            f"{FEATURE_SCHEMA.hash[:12]}: rebuild the bundle or deploy the matching code "
            f"(model features {list(schema.names)}, code features {list(FEATURE_SCHEMA.names)})"
        )
    n = _n_rows(columns)
    out = np.empty((n, len(FEATURE_SCHEMA)), dtype=np.float32)
    j = 0
    for name in NUMERIC_COLUMNS:
        out[:, j] = _column(columns, name)
        j += 1

    price = np.asarray(_column(columns, C.PRICE), dtype=np.float64)
    avg_paid = np.asarray(_column(columns, AVG_PRICE_PAID), dtype=np.float64)
    band = np.clip(_column(columns, SPEND_BAND).astype(np.int64), 0, len(BAND_REFERENCE) - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[:, j] = np.log(np.maximum(price, 1e-3))
        out[:, j + 1] = np.where(avg_paid > 0, price / avg_paid, 0.0)
        out[:, j + 2] = np.where(band > 0, price / BAND_REFERENCE[band], 0.0)
    out[:, j + 3] = _column(columns, HOUR)
    out[:, j + 4] = _column(columns, DAY_OF_WEEK)
    j += 5
    for name in (COUNTRY_CODE, DEVICE_CODE, SURFACE_CODE):
        out[:, j] = encode(_column(columns, CODE_SOURCE[name]), name)
        j += 1
    out[:, j] = organic_context(columns)
    # from the two columns already in the matrix: the same float32 values the model sees
    out[:, j + 1] = out[:, _COSINE] * content.evidence_shrink(out[:, _PROFILE_WEIGHT])
    return out


def organic_context(columns: Columns) -> np.ndarray | float:
    """1.0 per row whose ``policy`` is organic or a sampled negative; 0.0 without the column."""
    if C.POLICY not in columns:
        return 0.0
    return np.isin(_column(columns, C.POLICY), ORGANIC_POLICIES).astype(np.float32)
