"""The event tables in memory and on disk: one reader and one writer that every stage shares.

In memory a table is a ``pandas.DataFrame`` whose required columns (``columns.TABLES``) have
exactly these dtypes, listed first in contract order, followed by any extra columns:

======== ============================================================================
logical  pandas
======== ============================================================================
id       ``int64`` (non-negative)
ts       ``datetime64[ns, UTC]``
float    ``float64``
int      ``int64``
bool     ``bool``
str      ``object`` holding ``str`` (``None`` where missing)
vector   ``object`` holding equal-length 1-D ``float32`` numpy arrays
======== ============================================================================

On disk a table is ``<table>.parquet`` (zstd). Timestamps are stored as
``timestamp[ns, tz=UTC]`` and a vector column as ``fixed_size_list<float32>[dim]``, so
:func:`read_tables` returns what :func:`write_tables` was given, dtypes, time zone and
vector values included. :func:`conform` is the single place where loosely typed frames (the
simulator's, an ingest adapter's) are cast to the contract; it casts only where nothing is
lost and otherwise raises :class:`TableSchemaError` naming the table, the column and a few
offending rows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from contract import columns as C

log = logging.getLogger(__name__)

LOGICAL_DTYPES: dict[str, str] = {
    "id": "int64",
    "ts": "datetime64[ns, UTC]",
    "float": "float64",
    "int": "int64",
    "bool": "bool",
    "str": "object",
    "vector": "object",
}

# Tables a dataset may lack: an absent file reads back as an empty table. The others
# (entities, impressions, purchases) are what every later stage needs.
OPTIONAL_TABLES: tuple[str, ...] = (C.CLICKS, C.ADD_TO_CARTS, C.INVENTORY)

PARQUET_SUFFIX = ".parquet"
_COMPRESSION = "zstd"
_MAX_EXAMPLES = 5
_TRUE_WORDS = frozenset({"true", "t", "yes", "y", "1"})
_FALSE_WORDS = frozenset({"false", "f", "no", "n", "0"})
_INT64_MAX = np.iinfo(np.int64).max
_TS_DTYPE = pd.DatetimeTZDtype("ns", "UTC")
_TEXTUAL = frozenset({"string", "empty"})
# Text a float column reads as missing (besides an empty cell).
_BLANK_WORDS = frozenset({"", "nan", "null", "none"})


class TableSchemaError(ValueError):
    """A table lacks a required column or holds a value its logical type cannot take."""


class _BadValuesError(Exception):
    """Raised by a column caster with the positions of the values it could not convert."""

    def __init__(self, mask: np.ndarray, why: str) -> None:
        super().__init__(why)
        self.mask = mask
        self.why = why


# --- casting ------------------------------------------------------------------------------


class RowsById:
    """The row of each id in a table's id column, by binary search: a hash index of 55 M
    impression ids costs gigabytes, a sort order 8 bytes an id (none when they are already
    increasing, as a log in order is)."""

    def __init__(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        self._order: np.ndarray | None = None
        if len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1])):
            self._order = np.argsort(ids, kind="stable")
            ids = ids[self._order]
        self._ids = ids

    def __call__(self, wanted: np.ndarray) -> np.ndarray:
        """Each wanted id's row (-1: not in the table)."""
        wanted = np.asarray(wanted, dtype=np.int64)
        if len(self._ids) == 0:
            return np.full(len(wanted), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._ids, wanted), len(self._ids) - 1)
        found = self._ids[pos] == wanted
        rows = pos if self._order is None else self._order[pos]
        return np.where(found, rows, -1).astype(np.int64)


def empty_table(name: str) -> pd.DataFrame:
    """A zero-row table with the contract's columns and dtypes."""
    data: dict[str, pd.Series] = {}
    for column, logical in _layout(name).items():
        if logical == "ts":
            data[column] = pd.Series(pd.DatetimeIndex([], tz="UTC"), dtype=LOGICAL_DTYPES["ts"])
        else:
            data[column] = pd.Series([], dtype=LOGICAL_DTYPES[logical])
    return pd.DataFrame(data)


def conform(name: str, frame: pd.DataFrame, partial: bool = False) -> pd.DataFrame:
    """``frame`` cast to the contract of table ``name``: required columns first, exact dtypes.

    Casts that keep every value are made (``int32`` -> ``int64``, ``"3"`` -> ``3``, ``3.0``
    -> ``3``, a naive timestamp -> UTC, ``"true"`` -> ``True``), vectors become ``float32``
    arrays as the contract says, and anything else raises :class:`TableSchemaError`. Nulls
    stay null where the dtype can hold them (``float``, ``ts``, ``str``) and are errors where
    it cannot (``id``, ``int``, ``bool``, ``vector``); whether a null is *allowed* is the
    validator's business. Columns that already have their dtype are not copied, so the
    result may share memory with ``frame``. ``partial``: the frame holds only some of the
    table's columns on purpose (``read_tables(columns=...)``); those are cast, none is
    required.
    """
    layout = _layout(name)
    if partial:
        layout = {c: t for c, t in layout.items() if c in frame.columns}
    missing = [c for c in layout if c not in frame.columns]
    if missing:
        raise TableSchemaError(
            f"table {name!r}: missing required column(s) {missing}; required: "
            f"{list(layout)}; found: {list(frame.columns)}"
        )
    if frame.columns.duplicated().any():
        dupes = sorted(set(frame.columns[frame.columns.duplicated()]))
        raise TableSchemaError(f"table {name!r}: duplicated column name(s) {dupes}")
    out: dict[str, pd.Series] = {}
    # a frame already on 0..n-1 lends its columns as they are: re-indexing copies each one,
    # which doubled the read of 55 M impressions (3.8 GB frame, 9.6 GB peak)
    index = frame.index
    renumber = not (isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1)

    def column_of(name: str) -> pd.Series:
        return frame[name].reset_index(drop=True) if renumber else frame[name]

    for column, logical in layout.items():
        series = column_of(column)
        try:
            out[column] = _CASTERS[logical](series)
        except _BadValuesError as bad:
            raise TableSchemaError(_describe(name, column, logical, series, bad)) from None
    for column in frame.columns:
        if column not in layout:
            extra = column_of(column)
            if extra.dtype == object and pd.api.types.infer_dtype(extra, skipna=True) in _TEXTUAL:
                extra = _cast_str(extra)  # a missing text is None, as Parquet reads it back
            out[column] = extra
    return pd.DataFrame(out, copy=False)


def check_table(name: str, frame: pd.DataFrame) -> None:
    """Raise :class:`TableSchemaError` unless the required columns have the exact dtypes.

    A dtype check only: cheap, no value is looked at.
    """
    layout = _layout(name)
    for column, logical in layout.items():
        if column not in frame.columns:
            raise TableSchemaError(f"table {name!r}: missing required column {column!r}")
        got = str(frame[column].dtype)
        if got != LOGICAL_DTYPES[logical]:
            raise TableSchemaError(
                f"table {name!r} column {column!r}: dtype must be {LOGICAL_DTYPES[logical]} "
                f"({logical}), got {got}"
            )


def _layout(name: str) -> dict[str, str]:
    try:
        return C.TABLES[name]
    except KeyError:
        raise TableSchemaError(f"unknown table {name!r}; known: {list(C.ALL_TABLES)}") from None


def _describe(
    table: str, column: str, logical: str, series: pd.Series, bad: _BadValuesError
) -> str:
    positions = np.flatnonzero(bad.mask)
    examples = ", ".join(
        f"row {i}: {_plain(series.iloc[i])!r}" for i in positions[:_MAX_EXAMPLES].tolist()
    )
    return (
        f"table {table!r} column {column!r}: {len(positions)} of {len(series)} value(s) are not "
        f"a valid {logical} ({bad.why}), e.g. {examples} "
        "(rows count from 0; in a file, from the line after the header)"
    )


def _plain(value: object) -> object:
    """A numpy scalar as the Python value it holds, so messages read ``4.5``, not
    ``np.float64(4.5)``."""
    return value.item() if isinstance(value, np.generic) else value


def _null_mask(series: pd.Series) -> np.ndarray:
    return np.asarray(series.isna(), dtype=bool)


def _each(values: pd.Series | np.ndarray, fn: Callable[[Any], Any]) -> np.ndarray:
    """``fn`` of every value as an object array. Unlike ``Series.map`` it never infers a
    dtype, which would turn ``[2**60 + 1, None]`` into lossy floats."""
    array = np.asarray(values, dtype=object)
    return np.frompyfunc(fn, 1, 1)(array).astype(object) if len(array) else array


def _as_text(series: pd.Series) -> np.ndarray:
    """A column as an object array: text stripped, ``None`` for every kind of null."""
    out = _each(series, lambda v: v.strip() if isinstance(v, str) else v)
    out[_null_mask(series)] = None
    return out


def _is_blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and value.lower() in _BLANK_WORDS)


def _to_int64(series: pd.Series, why: str) -> np.ndarray:
    """int64 values of an integer-valued column; ``_BadValuesError`` for nulls, fractions, text."""
    if pd.api.types.is_bool_dtype(series.dtype):
        return series.to_numpy(dtype=np.int64)
    if pd.api.types.is_integer_dtype(series.dtype):
        nulls = _null_mask(series)
        if nulls.any():
            raise _BadValuesError(nulls, why)
        if pd.api.types.is_unsigned_integer_dtype(series.dtype):
            values = series.to_numpy(dtype=np.uint64)
            big = values > _INT64_MAX
            if big.any():
                raise _BadValuesError(big, "larger than the int64 maximum")
        return series.to_numpy(dtype=np.int64)
    if pd.api.types.is_float_dtype(series.dtype):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(values) | (values != np.round(values)) | (np.abs(values) >= 2.0**63)
        if bad.any():
            raise _BadValuesError(bad, why)
        return values.astype(np.int64)
    # Text (or anything else): parse exactly, so ids above 2**53 keep every digit.
    text = _as_text(series)
    ok = np.asarray(_each(text, _is_integer_value), dtype=bool)
    if not ok.all():
        raise _BadValuesError(~ok, why)
    as_ints = _each(text, int)
    big = np.asarray(_each(as_ints, lambda v: not -_INT64_MAX - 1 <= v <= _INT64_MAX), dtype=bool)
    if big.any():
        raise _BadValuesError(big, "outside the int64 range")
    return as_ints.astype(np.int64)


def _is_integer_value(value: object) -> bool:
    if isinstance(value, str):
        return _is_int_text(value)
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _is_int_text(text: str) -> bool:
    body = text[1:] if text[:1] in "+-" else text
    return body.isascii() and body.isdigit()


def _cast_id(series: pd.Series) -> pd.Series:
    if series.dtype == np.int64:
        values = series.to_numpy()
    else:
        values = _to_int64(series, "an id must be a non-negative integer and never empty")
    negative = values < 0
    if negative.any():
        raise _BadValuesError(negative, "an id must be a non-negative integer")
    return pd.Series(values, dtype=np.int64, name=series.name)


def _cast_int(series: pd.Series) -> pd.Series:
    if series.dtype == np.int64:
        return series
    values = _to_int64(series, "an integer is required and may not be empty")
    return pd.Series(values, dtype=np.int64, name=series.name)


def _cast_float(series: pd.Series) -> pd.Series:
    if series.dtype == np.float64:
        return series
    if pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        return pd.Series(values, dtype=np.float64, name=series.name)
    text = _as_text(series)
    blank = np.asarray(_each(text, _is_blank), dtype=bool)
    text[blank] = None
    parsed = pd.to_numeric(pd.Series(text, dtype=object), errors="coerce")
    bad = np.asarray(parsed.isna(), dtype=bool) & ~blank
    if bad.any():
        raise _BadValuesError(bad, "not a number")
    return pd.Series(parsed.to_numpy(dtype=np.float64), dtype=np.float64, name=series.name)


def _cast_bool(series: pd.Series) -> pd.Series:
    if series.dtype == np.bool_:
        return series
    nulls = _null_mask(series)
    if nulls.any():
        raise _BadValuesError(nulls, "a boolean may not be empty")
    if pd.api.types.is_bool_dtype(series.dtype):
        return pd.Series(series.to_numpy(dtype=bool), dtype=bool, name=series.name)
    if pd.api.types.is_numeric_dtype(series.dtype):
        values = series.to_numpy(dtype=np.float64)
        bad = (values != 0) & (values != 1)
        if bad.any():
            raise _BadValuesError(bad, "a numeric boolean must be 0 or 1")
        return pd.Series(values == 1, dtype=bool, name=series.name)

    def word(value: object) -> bool | None:
        if isinstance(value, bool | np.bool_):
            return bool(value)
        if isinstance(value, int | np.integer) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            low = value.strip().lower()
            if low in _TRUE_WORDS:
                return True
            if low in _FALSE_WORDS:
                return False
        return None

    parsed = series.map(word)
    bad = np.asarray(parsed.isna(), dtype=bool)
    if bad.any():
        raise _BadValuesError(bad, "use true/false, 1/0 or yes/no")
    return pd.Series(parsed.to_numpy(dtype=bool), dtype=bool, name=series.name)


def _cast_str(series: pd.Series) -> pd.Series:
    if (
        series.dtype == object
        and pd.api.types.infer_dtype(series, skipna=True) in _TEXTUAL
        and all(v is None for v in series[series.isna()])
    ):
        return series
    values = _each(series, lambda v: v if isinstance(v, str) else str(v))
    values[_null_mask(series)] = None
    return pd.Series(values, dtype=object, name=series.name)


def _cast_ts(series: pd.Series) -> pd.Series:
    dtype = series.dtype
    if isinstance(dtype, pd.DatetimeTZDtype):
        return series.dt.tz_convert("UTC").astype(_TS_DTYPE)
    if pd.api.types.is_datetime64_dtype(dtype):
        return series.dt.tz_localize("UTC").astype(_TS_DTYPE)
    if pd.api.types.is_numeric_dtype(dtype) and not _null_mask(series).all():
        raise _BadValuesError(
            np.asarray(series.notna(), dtype=bool),
            "a timestamp must be ISO 8601 text or a datetime, not a number (unit unknown)",
        )
    text = _as_text(series)
    blank = np.asarray(_each(text, lambda v: v is None or v == ""), dtype=bool)
    text[blank] = None
    values = pd.Series(text, dtype=object)
    try:
        parsed = pd.to_datetime(values, utc=True, format="ISO8601")
        bad = np.zeros(len(series), dtype=bool)
    except (ValueError, TypeError, OverflowError):
        parsed = pd.to_datetime(values, utc=True, format="ISO8601", errors="coerce")
        bad = np.asarray(parsed.isna(), dtype=bool) & ~blank
    if bad.any():
        raise _BadValuesError(bad, "use ISO 8601, e.g. 2024-03-01T12:30:00Z")
    return pd.Series(parsed, name=series.name).astype(_TS_DTYPE)


def _cast_vector(series: pd.Series) -> pd.Series:
    if len(series) == 0:
        return pd.Series([], dtype=object, name=series.name)
    nulls = np.asarray(series.map(_is_missing_vector), dtype=bool)
    if nulls.any():
        raise _BadValuesError(nulls, "a vector may not be empty")
    first = series.iloc[0]
    if isinstance(first, str):
        return _parse_vector_text(series)
    if _is_float32_vector(first):
        dim = first.shape[0]
        if all(_is_float32_vector(v) and v.shape[0] == dim for v in series):
            return series
    try:
        rows = [np.asarray(v, dtype=np.float32) for v in series]
    except (TypeError, ValueError):
        bad = np.asarray(series.map(lambda v: not _is_number_list(v)), dtype=bool)
        raise _BadValuesError(bad, "a vector must be a list of numbers") from None
    return _stack(rows, series.name)


def _is_float32_vector(value: object) -> bool:
    return type(value) is np.ndarray and value.dtype == np.float32 and value.ndim == 1


def _is_missing_vector(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return isinstance(value, str) and not value.strip(" []")


def _is_number_list(value: object) -> bool:
    try:
        np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        return False
    return True


def _parse_vector_text(series: pd.Series) -> pd.Series:
    """``"0.1 0.2"``, ``"0.1,0.2"`` or ``"[0.1, 0.2]"`` -> float32 arrays."""
    parts = series.astype(str).str.strip(" []").str.split(r"[\s,]+", regex=True)
    lengths = parts.str.len().to_numpy()
    flat = pd.to_numeric(parts.explode(), errors="coerce")
    if flat.isna().any():
        bad_rows = np.unique(flat.index[flat.isna().to_numpy()])
        mask = np.zeros(len(series), dtype=bool)
        mask[series.index.get_indexer(pd.Index(bad_rows))] = True
        raise _BadValuesError(mask, "a vector holds numbers separated by spaces or commas")
    values = flat.to_numpy(dtype=np.float32)
    if len(np.unique(lengths)) > 1:
        raise _BadValuesError(
            lengths != _mode(lengths), "vectors of one column must be equally long"
        )
    return matrix_to_vectors(values.reshape(len(series), int(lengths[0])), series.name)


def _stack(rows: list[np.ndarray], name: object) -> pd.Series:
    lengths = np.fromiter((r.size for r in rows), dtype=np.int64, count=len(rows))
    bad = np.fromiter((r.ndim != 1 for r in rows), dtype=bool, count=len(rows))
    if bad.any():
        raise _BadValuesError(bad, "a vector must be one-dimensional")
    if len(np.unique(lengths)) > 1:
        raise _BadValuesError(
            lengths != _mode(lengths), "vectors of one column must be equally long"
        )
    return matrix_to_vectors(np.stack(rows), name)


def _mode(values: np.ndarray) -> int:
    uniq, counts = np.unique(values, return_counts=True)
    return int(uniq[np.argmax(counts)])


_CASTERS = {
    "id": _cast_id,
    "int": _cast_int,
    "float": _cast_float,
    "bool": _cast_bool,
    "str": _cast_str,
    "ts": _cast_ts,
    "vector": _cast_vector,
}


# --- vectors ------------------------------------------------------------------------------


def matrix_to_vectors(matrix: np.ndarray, name: object = None) -> pd.Series:
    """A vector column whose rows are views of one contiguous float32 matrix."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"a vector matrix must be 2-D, got shape {matrix.shape}")
    if matrix.shape[0] == 0:
        return pd.Series([], dtype=object, name=name)
    return pd.Series(list(matrix), dtype=object, name=name)


def vectors_to_matrix(series: pd.Series) -> np.ndarray:
    """The ``(rows, dim)`` float32 matrix of a vector column (``(0, 0)`` when empty)."""
    if len(series) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([np.asarray(v, dtype=np.float32) for v in series])


# --- parquet ------------------------------------------------------------------------------


def table_path(directory: str | os.PathLike[str], name: str) -> Path:
    return Path(directory) / f"{name}{PARQUET_SUFFIX}"


def write_tables(
    tables: Mapping[str, pd.DataFrame], out_dir: str | os.PathLike[str]
) -> dict[str, Path]:
    """Write each table to ``out_dir/<table>.parquet``; returns the paths written.

    Every frame goes through :func:`conform` first, so a file on disk always meets the
    contract. A file is written under a temporary name and renamed, so a reader never sees
    half a table.
    """
    conformed = {name: conform(name, frame) for name, frame in tables.items()}  # all or none
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, frame in conformed.items():
        table = _to_arrow(name, frame)
        path = table_path(out, name)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp, compression=_COMPRESSION)
        os.replace(tmp, path)
        written[name] = path
        log.debug("wrote %s (%d rows)", path, table.num_rows)
    return written


def read_tables(
    directory: str | os.PathLike[str],
    names: Iterable[str] | None = None,
    columns: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, pd.DataFrame]:
    """Read ``<table>.parquet`` for each of ``names`` (default: every table) from ``directory``.

    An absent optional table (:data:`OPTIONAL_TABLES`) reads as an empty table; an absent
    required one raises ``FileNotFoundError``. ``columns``: for the tables it names, only
    those columns are read (a stage that needs five of an event table's columns does not
    hold the other seven); a name the table does not have raises ``TableSchemaError``.
    """
    wanted = list(C.ALL_TABLES if names is None else names)
    result: dict[str, pd.DataFrame] = {}
    for name in wanted:
        _layout(name)
        path = table_path(directory, name)
        subset = None if columns is None or name not in columns else list(columns[name])
        if subset is not None:
            unknown = [c for c in subset if c not in C.TABLES[name]]
            if unknown:
                raise TableSchemaError(f"table {name!r} has no column(s) {unknown}")
        if not path.exists():
            if name in OPTIONAL_TABLES:
                empty = empty_table(name)
                result[name] = empty if subset is None else empty[subset]
                continue
            raise FileNotFoundError(f"table {name!r} not found: {path} does not exist")
        result[name] = _read_by_column(name, path, subset)
    return result


def _read_by_column(name: str, path: Path, subset: list[str] | None = None) -> pd.DataFrame:
    """One column at a time, so Arrow's copy of a column is freed once pandas holds it: a
    55 M-row impressions table never sits in memory twice over (the large preset's load
    peaked at 13.2 GB reading whole tables)."""
    text_columns = [c for c, t in C.TABLES[name].items() if t == "str"]
    source = pq.ParquetFile(path, read_dictionary=text_columns)
    names = source.schema_arrow.names
    if subset is not None:
        missing = [c for c in subset if c not in names]
        if missing:
            raise TableSchemaError(f"table {name!r}: {path} has no column(s) {missing}")
        names = subset
    data: dict[str, pd.Series] = {}
    for column in names:
        data[column] = _series_from_arrow(name, column, source.read(columns=[column]).column(0))
    frame = conform(name, pd.DataFrame(data, copy=False), partial=subset is not None)
    del data  # columns Arrow lent to pandas without a copy, now copied into the frame
    # Arrow's pool (mimalloc) keeps the buffers it freed: sim-small's impressions left
    # ~370 MB resident beside a 383 MB frame until released
    pa.default_memory_pool().release_unused()
    return frame


def _to_arrow(name: str, frame: pd.DataFrame) -> pa.Table:
    layout = C.TABLES[name]
    arrays: list[pa.Array] = []
    fields: list[pa.Field] = []
    for column in frame.columns:
        logical = layout.get(column)
        if logical == "vector":
            array = _vector_to_arrow(frame[column])
        elif logical == "str":
            array = pa.array(frame[column].to_numpy(), type=pa.string())
        elif logical == "ts":
            array = pa.array(frame[column], type=pa.timestamp("ns", tz="UTC"))
        elif logical is not None:
            array = pa.array(frame[column].to_numpy())
        else:
            array = pa.Array.from_pandas(frame[column])
        arrays.append(array)
        fields.append(pa.field(str(column), array.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata={"homefeed.table": name}))


def _vector_to_arrow(series: pd.Series) -> pa.Array:
    if len(series) == 0:
        return pa.array([], type=pa.list_(pa.float32()))
    matrix = vectors_to_matrix(series)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])


def _series_from_arrow(name: str, column: str, chunked: pa.ChunkedArray) -> pd.Series:
    logical = C.TABLES[name].get(column)
    if logical == "vector":
        return _vector_from_arrow(chunked, column)
    if logical == "str":
        return pd.Series(_strings_from_arrow(chunked), dtype=object)
    return chunked.to_pandas()


def _strings_from_arrow(chunked: pa.ChunkedArray) -> np.ndarray:
    """An object array of ``str``/``None`` holding one ``str`` per distinct value: the column
    is dictionary-encoded first (in Arrow), so 55 M impressions' ``surface`` costs 8 bytes a
    row, not a ~60-byte Python string each."""
    parts: list[np.ndarray] = []
    for chunk in chunked.chunks:
        if not pa.types.is_dictionary(chunk.type):
            chunk = pc.dictionary_encode(chunk)
        words = chunk.dictionary.to_numpy(zero_copy_only=False)
        lookup = np.empty(len(words) + 1, dtype=object)  # the last entry serves nulls
        lookup[:-1] = words
        codes = pc.fill_null(chunk.indices, len(lookup) - 1).to_numpy(zero_copy_only=False)
        parts.append(lookup[codes])
    return np.concatenate(parts) if parts else np.empty(0, dtype=object)


def _vector_from_arrow(chunked: pa.ChunkedArray, column: str) -> pd.Series:
    array = chunked.combine_chunks() if chunked.num_chunks != 1 else chunked.chunk(0)
    if len(array) == 0:
        return pd.Series([], dtype=object, name=column)
    if pa.types.is_fixed_size_list(array.type):
        dim = array.type.list_size
        flat = array.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        return matrix_to_vectors(flat.reshape(len(array), dim), column)
    return _cast_vector(pd.Series(array.to_pylist(), dtype=object, name=column))
