"""Validation stage: check raw tables against the contract in `contract.columns`.

Every stage after ingest trusts its input, so this stage is where bad data stops. It runs
every rule, collects all violations and raises them together as one `ValidationError`,
so one run shows everything that is wrong with a delivery.

Three kinds of rule:

* per-column rules, declared as one pandera `DataFrameSchema` per table (`table_schema`):
  required columns present with the contract dtype, non-null, primary key unique, value
  ranges and enumerations, content vectors. pandera runs the value checks; presence,
  dtype, nulls and uniqueness are run from the same declaration in pandas, because
  pandera reports those row by row and slowly (see `_structure_violations`);
* per-row rules that relate two columns of one row (`list_price >= price`, position and
  propensity by policy), vectorised in pandas (see `_ROW_RULES` for why not pandera);
* cross-table rules, vectorised with hash lookups rather than merges: foreign keys, events
  after their impression, timestamps inside the data window, daily impression volume.

A rule whose input columns are missing or have the wrong dtype is skipped: the missing
column or dtype violation is already reported and the rule's answer would be noise.
Organic impressions (no feed policy served them) are held to position 0 and a null
propensity instead of the feed's position >= 1 and propensity in (0, 1].

Rule names (stable, used in messages and `Violation.rule`): table_present,
column_present, dtype, not_null, unique, non_negative, min_value, in_range, allowed_values,
country_code, vector_length, vector_finite, list_price_ge_price, position_by_policy,
propensity_by_policy, foreign_key, after_impression, in_window, volume_anomaly.
"""

from __future__ import annotations

import functools
import logging
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrors

from contract.columns import (
    ADD_TO_CARTS,
    ALL_TABLES,
    CLICKS,
    CONTENT,
    COUNTRY,
    DEVICE,
    DEVICE_UNKNOWN,
    DEVICES,
    EVENT_TABLES,
    IMPRESSION_ID,
    IMPRESSIONS,
    INVENTORY,
    ITEM_ID,
    ITEMS,
    LIST_PRICE,
    MARGIN,
    POLICIES,
    POLICY,
    POLICY_HEURISTIC,
    POLICY_ORGANIC,
    POLICY_RANDOM,
    POSITION,
    PRICE,
    PRIMARY_KEY,
    PROPENSITY,
    PURCHASES,
    QUANTITY,
    RATING,
    SELLER_ID,
    SELLERS,
    SHIPPING_DAYS,
    STOCK,
    SURFACE,
    SURFACES,
    TABLES,
    TIME_COLUMN,
    TS,
    USER_ID,
    USERS,
)

logger = logging.getLogger(__name__)

# Logical type (columns.TABLES) -> the pandas dtype a column must have.
PANDAS_DTYPES: dict[str, np.dtype | pd.DatetimeTZDtype] = {
    "id": np.dtype("int64"),
    "ts": pd.DatetimeTZDtype("ns", "UTC"),
    "float": np.dtype("float64"),
    "int": np.dtype("int64"),
    "bool": np.dtype("bool"),
    "str": np.dtype("O"),
    "vector": np.dtype("O"),  # each cell a 1-D float32 numpy array
}

# Purchases are attributed to an impression up to 7 days earlier and land late, so a data
# window [start, end) legitimately holds purchases up to this long after `end`.
LATE_ARRIVAL: dict[str, pd.Timedelta] = {PURCHASES: pd.Timedelta(days=14)}

# The daily volume check (`_volume_violations` says the rule): the tables whose rows per
# UTC day it counts, how much data it needs, and its references.
VOLUME_TABLES = (IMPRESSIONS,)
VOLUME_MIN_DAYS = 7
VOLUME_MIN_ROWS = 1000
DEFAULT_VOLUME_TOLERANCE = 3.0
VOLUME_WEEKS = 4  # same-weekday reference: that weekday up to 4 weeks either side
VOLUME_ROLLING_DAYS = 7  # rolling reference: the days up to 7 days either side
# A count this share of a typical open day away from its reference is never an anomaly, so
# a weekday with a handful of rows is not flagged for having 5 where its median is 1.
VOLUME_NOISE_SHARE = 0.02
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # pandas' weekday 0..6
_WEEKDAY_NAMES = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

# (child table, child column, parent table): every child value must be a parent key.
FOREIGN_KEYS: tuple[tuple[str, str, str], ...] = (
    (CLICKS, IMPRESSION_ID, IMPRESSIONS),
    (ADD_TO_CARTS, IMPRESSION_ID, IMPRESSIONS),
    (PURCHASES, IMPRESSION_ID, IMPRESSIONS),
    (IMPRESSIONS, USER_ID, USERS),
    (IMPRESSIONS, ITEM_ID, ITEMS),
    (ITEMS, SELLER_ID, SELLERS),
    (INVENTORY, ITEM_ID, ITEMS),
)

# Events that follow an impression and so cannot precede it.
AFTER_IMPRESSION_TABLES = (CLICKS, ADD_TO_CARTS, PURCHASES)

# Required columns that may hold nulls: an organic impression has no propensity.
NULLABLE: frozenset[tuple[str, str]] = frozenset({(IMPRESSIONS, PROPENSITY)})

FEED_POLICIES = (POLICY_HEURISTIC, POLICY_RANDOM)
N_EXAMPLES = 5
_NS_PER_DAY = 86_400 * 10**9


# --- results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    """One broken rule on one column, aggregated over all the rows that break it.

    ``n_rows`` is None when the rule concerns the column or table as a whole (a missing
    column, a wrong dtype, a volume anomaly); ``examples`` are then values (days, dtypes)
    rather than row labels.
    """

    table: str
    column: str | None
    rule: str
    n_rows: int | None
    examples: tuple[object, ...]
    detail: str

    def __str__(self) -> str:
        where = self.table if self.column is None else f"{self.table}.{self.column}"
        if self.n_rows is None:
            return f"{where}: {self.rule} — {self.detail}"
        verb = "row violates" if self.n_rows == 1 else "rows violate"
        rows = ("row " if len(self.examples) == 1 else "rows ") + ", ".join(
            str(e) for e in self.examples
        )
        return f"{where}: {self.rule} — {self.n_rows} {verb} (e.g. {rows}): {self.detail}"


class ValidationError(ValueError):
    """The tables break the contract; ``violations`` lists every broken rule."""

    def __init__(self, violations: Sequence[Violation]) -> None:
        self.violations = list(violations)
        tables = _ordered_tables(v.table for v in self.violations)
        n = len(self.violations)
        head = (
            f"validation failed: {n} violation{'s' if n != 1 else ''} "
            f"in table{'s' if len(tables) != 1 else ''} {', '.join(tables)}"
        )
        super().__init__("\n".join([head, *(f"  {v}" for v in self.violations)]))


@dataclass(frozen=True)
class ValidationReport:
    """What a successful validation looked at.

    ``skipped`` says which checks could not apply and why (too little data for the volume
    check); ``daily_counts`` holds the rows per UTC day of each volume-checked table, to
    pass as the next delivery's ``previous_day_counts``.
    """

    row_counts: dict[str, int]
    checks_run: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    seconds: float = 0.0
    daily_counts: dict[str, pd.Series] = field(default_factory=dict)


# --- per-column rules: pandera -----------------------------------------------------------


def _vector_length_ok(s: pd.Series) -> pd.Series:
    """True where the cell is a 1-D array as long as most vectors of the column."""
    lengths = np.fromiter((_vector_len(v) for v in s.to_numpy()), np.int64, len(s))
    valid = lengths >= 0
    if not valid.any():
        return pd.Series(valid, index=s.index)
    values, counts = np.unique(lengths[valid], return_counts=True)
    return pd.Series(lengths == values[np.argmax(counts)], index=s.index)


def _vector_finite_ok(s: pd.Series, chunk: int = 65_536) -> pd.Series:
    """True where every element of the vector is finite. Cells that are not vectors pass
    (vector_length reports them); vectors are stacked per length, a chunk at a time."""
    cells = s.to_numpy()
    lengths = np.fromiter((_vector_len(v) for v in cells), np.int64, len(cells))
    ok = np.ones(len(cells), dtype=bool)
    for length in np.unique(lengths[lengths >= 0]):
        rows = np.flatnonzero(lengths == length)
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            stacked = np.stack([np.asarray(v, dtype=np.float64) for v in cells[part]])
            ok[part] = np.isfinite(stacked).all(axis=1)
    return pd.Series(ok, index=s.index)


def _vector_len(v: object) -> int:
    """Length of a 1-D numeric array or list, -1 for anything else."""
    if isinstance(v, np.ndarray):
        return len(v) if v.ndim == 1 and v.dtype.kind in "fiu" else -1
    if isinstance(v, list):
        return len(v)
    return -1


# Value checks keep only their first N_EXAMPLES failure cases: pandera turns every failing
# row into a report row and sorts them, which took 11 s for one column of 6M bad values;
# the exact count is taken afterwards by running the failed check once more (`_count`).
_NON_NEGATIVE = pa.Check.ge(
    0, name="non_negative", error="must be >= 0", n_failure_cases=N_EXAMPLES
)


def _in_range(lo: float, hi: float) -> pa.Check:
    return pa.Check.in_range(
        lo, hi, name="in_range", error=f"must be in [{lo}, {hi}]", n_failure_cases=N_EXAMPLES
    )


def _allowed(values: Sequence[str]) -> pa.Check:
    return pa.Check.isin(
        list(values),
        name="allowed_values",
        error=f"must be one of {', '.join(values)}",
        n_failure_cases=N_EXAMPLES,
    )


# Value rules beyond dtype and nullability; every `id` column also gets non_negative.
_VALUE_CHECKS: dict[str, dict[str, list[pa.Check]]] = {
    SELLERS: {RATING: [_in_range(1, 5)]},
    ITEMS: {
        PRICE: [_NON_NEGATIVE],
        LIST_PRICE: [_NON_NEGATIVE],
        MARGIN: [_in_range(0, 1)],
        SHIPPING_DAYS: [_NON_NEGATIVE],
        STOCK: [_NON_NEGATIVE],
        CONTENT: [
            pa.Check(
                _vector_length_ok,
                name="vector_length",
                error="must be a 1-D float vector as long as the column's other vectors",
                n_failure_cases=N_EXAMPLES,
            ),
            pa.Check(
                _vector_finite_ok,
                name="vector_finite",
                error="must be all finite",
                n_failure_cases=N_EXAMPLES,
            ),
        ],
    },
    USERS: {
        COUNTRY: [
            pa.Check.str_matches(
                r"^[A-Z]{2}$",
                name="country_code",
                error="must be a 2-letter uppercase code",
                n_failure_cases=N_EXAMPLES,
            )
        ],
        DEVICE: [_allowed((*DEVICES, DEVICE_UNKNOWN))],  # unknown: a log without devices
    },
    IMPRESSIONS: {SURFACE: [_allowed(SURFACES)], POLICY: [_allowed(POLICIES)]},
    PURCHASES: {
        PRICE: [_NON_NEGATIVE],
        QUANTITY: [
            pa.Check.ge(1, name="min_value", error="must be >= 1", n_failure_cases=N_EXAMPLES)
        ],
    },
    INVENTORY: {STOCK: [_NON_NEGATIVE]},
}


@functools.cache
def table_schema(table: str) -> pa.DataFrameSchema:
    """The pandera schema of one table's per-column rules (extra columns allowed)."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; expected one of {', '.join(ALL_TABLES)}")
    columns = {}
    for column, logical in TABLES[table].items():
        checks = list(_VALUE_CHECKS.get(table, {}).get(column, []))
        if logical == "id":
            checks.insert(0, _NON_NEGATIVE)
        columns[column] = pa.Column(
            PANDAS_DTYPES[logical],
            checks=checks,
            nullable=(table, column) in NULLABLE,
            unique=column == PRIMARY_KEY[table],
            required=True,
        )
    return pa.DataFrameSchema(columns, name=table, strict=False, coerce=False)


# --- per-row rules: pandas ----------------------------------------------------------------


@dataclass(frozen=True)
class _RowRule:
    """A rule over several columns of one row, reported on ``column``."""

    column: str
    rule: str
    requires: tuple[str, ...]
    expectation: str
    ok: Callable[[pd.DataFrame], np.ndarray]


def _position_ok(df: pd.DataFrame) -> np.ndarray:
    organic = (df[POLICY] == POLICY_ORGANIC).to_numpy()
    feed = df[POLICY].isin(FEED_POLICIES).to_numpy()
    position = df[POSITION].to_numpy()
    return ~((feed & (position < 1)) | (organic & (position != 0)))


def _propensity_ok(df: pd.DataFrame) -> np.ndarray:
    organic = (df[POLICY] == POLICY_ORGANIC).to_numpy()
    feed = df[POLICY].isin(FEED_POLICIES).to_numpy()
    p = df[PROPENSITY].to_numpy()
    with np.errstate(invalid="ignore"):
        in_range = (p > 0) & (p <= 1)
    return ~((feed & ~in_range) | (organic & ~np.isnan(p)))


# These could be pandera DataFrame-level checks, but pandera reports a failing row of a
# DataFrame-level check once per column of the frame and builds that report slowly:
# 500k failing impressions took 88 s (pandera 0.35, one core) against milliseconds here.
# An unknown policy breaks `allowed_values` only, not the policy-dependent rules.
_ROW_RULES: dict[str, tuple[_RowRule, ...]] = {
    ITEMS: (
        _RowRule(
            LIST_PRICE,
            "list_price_ge_price",
            (PRICE, LIST_PRICE),
            "list_price must be >= price",
            lambda df: ~(df[LIST_PRICE] < df[PRICE]).to_numpy(),
        ),
    ),
    IMPRESSIONS: (
        _RowRule(
            POSITION,
            "position_by_policy",
            (POLICY, POSITION),
            "position must be >= 1 for heuristic/random impressions and 0 for organic ones",
            _position_ok,
        ),
        _RowRule(
            PROPENSITY,
            "propensity_by_policy",
            (POLICY, PROPENSITY),
            "propensity must be in (0, 1] for heuristic/random impressions "
            "and null for organic ones",
            _propensity_ok,
        ),
    ),
}


# --- per-table entry points -----------------------------------------------------------------


def table_violations(table: str, df: pd.DataFrame) -> list[Violation]:
    """Every per-table rule broken by ``df`` (empty when the table is valid)."""
    violations, _, _ = _table_violations(table, df)
    return violations


def validate_table(table: str, df: pd.DataFrame) -> None:
    """Check one table's per-table rules; raise `ValidationError` listing every violation."""
    violations = table_violations(table, df)
    if violations:
        raise ValidationError(violations)


def _table_violations(table: str, df: pd.DataFrame) -> tuple[list[Violation], list[str], set[str]]:
    """Violations of one table, the checks that ran, and the usable columns: required
    columns present with the contract dtype, the only ones later rules read."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"table {table!r} must be a pandas DataFrame, got {type(df).__name__}")
    schema = table_schema(table)
    violations, usable = _structure_violations(table, df, schema)
    checks_run = [f"{table}: schema ({len(schema.columns)} columns)"]

    values = _value_schema(table, frozenset(usable))
    if values.columns:
        try:
            with warnings.catch_warnings():
                # pandera's failure-case report concatenates frames with all-NA columns.
                warnings.simplefilter("ignore", FutureWarning)
                values.validate(df, lazy=True, inplace=True)
        except SchemaErrors as err:
            violations.extend(_from_failure_cases(table, df, values, err.failure_cases))

    for rule in _ROW_RULES.get(table, ()):
        if not set(rule.requires) <= usable:
            continue
        checks_run.append(f"{table}.{rule.column}: {rule.rule}")
        bad = ~rule.ok(df)
        if bad.any():
            violations.append(
                _row_violation(
                    table, rule.column, rule.rule, df, bad, rule.expectation, rule.requires
                )
            )
    return violations, checks_run, usable


# pandera runs the value checks of `table_schema`; its presence, dtype, nullability and
# uniqueness declarations are run here instead. pandera reports those row by row and
# slowly: on 5M impressions a null column took 7 s, a float id column (its nulls) 12 s,
# duplicated ids 11 s and all three together 50 s, against well under a second here.
def _structure_violations(
    table: str, df: pd.DataFrame, schema: pa.DataFrameSchema
) -> tuple[list[Violation], set[str]]:
    """Required columns, dtypes, nulls and primary-key duplicates as `schema` declares
    them, and the columns that are present with the declared dtype."""
    violations: list[Violation] = []
    usable: set[str] = set()
    for name, column in schema.columns.items():
        if name not in df.columns:
            if column.required:
                violations.append(
                    Violation(
                        table,
                        name,
                        "column_present",
                        None,
                        (),
                        f"required column is missing (expected dtype {column.dtype})",
                    )
                )
            continue
        series = df[name]
        if column.dtype is None or series.dtype == column.dtype.type:
            usable.add(name)
        else:
            violations.append(_dtype_violation(table, name, df))
        nulls = None
        if not column.nullable:
            nulls = series.isna().to_numpy()
            if nulls.any():
                violations.append(
                    _row_violation(
                        table, name, "not_null", df, nulls, f"{name} must not be null", (name,)
                    )
                )
        if column.unique:
            duplicated = series.duplicated(keep=False).to_numpy()
            if nulls is not None:
                duplicated &= ~nulls  # already not_null
            if duplicated.any():
                violations.append(
                    _row_violation(
                        table,
                        name,
                        "unique",
                        df,
                        duplicated,
                        f"{name} is the primary key and must be unique",
                        (name,),
                    )
                )
    return violations, usable


@functools.cache
def _value_schema(table: str, usable: frozenset[str]) -> pa.DataFrameSchema:
    """The value checks of `table_schema` over the usable columns (see above)."""
    declared = table_schema(table)
    return pa.DataFrameSchema(
        {
            name: pa.Column(checks=column.checks, nullable=True, name=name)
            for name, column in declared.columns.items()
            if name in usable and column.checks
        },
        name=table,
    )


def _from_failure_cases(
    table: str, df: pd.DataFrame, schema: pa.DataFrameSchema, failure_cases: pd.DataFrame
) -> list[Violation]:
    """Aggregate pandera's one-row-per-failure report into one Violation per check."""
    number = pd.to_numeric(failure_cases["check_number"], errors="coerce").fillna(-1)
    fc = failure_cases.assign(check_number=number.astype(int))
    violations: list[Violation] = []
    for (column_label, check_label, _), group in fc.groupby(
        ["column", "check", "check_number"], sort=False
    ):
        column, check = str(column_label), str(check_label)
        check_number = int(group["check_number"].iloc[0])
        checks = schema.columns[column].checks if column in schema.columns else []
        if 0 <= check_number < len(checks):
            pa_check = checks[check_number]
            rule, expectation = str(pa_check.name), str(pa_check.error)
        else:  # not a value check; the schema declares none other, but do not lose it
            pa_check, rule, expectation = None, check, f"must pass {check}"
        rows = group["index"].dropna()
        if rows.empty:  # the check raised instead of answering
            violations.append(
                Violation(
                    table,
                    column,
                    rule,
                    None,
                    (),
                    f"check could not run: {_short(group['failure_case'].iloc[0], 200)}",
                )
            )
            continue
        n_rows = len(rows) if pa_check is None else _count(pa_check, df[column], len(rows))
        values = ", ".join(_short(v) for v in group["failure_case"].head(N_EXAMPLES))
        violations.append(
            Violation(
                table,
                column,
                rule,
                n_rows,
                tuple(_sorted(rows.head(N_EXAMPLES).tolist())),
                f"{column} {expectation}; got {values}",
            )
        )
    return violations


def _count(check: pa.Check, column: pd.Series, reported: int) -> int:
    """Rows of ``column`` that fail ``check``, whose report pandera cut at
    ``n_failure_cases``. Nulls are not counted: the checks ignore them, as pandera does."""
    if check.n_failure_cases is None or reported < check.n_failure_cases:
        return reported
    output = check(column).check_output
    return int((~output.astype(bool)).sum())


def _dtype_violation(table: str, column: str, df: pd.DataFrame) -> Violation:
    expected = PANDAS_DTYPES[TABLES[table][column]]
    actual = df[column].dtype
    detail = f"expected {expected}, got {actual}"
    if expected == np.dtype("int64") and actual.kind == "f" and df[column].isna().any():
        detail += " (nulls turn an integer column into float)"
    return Violation(table, column, "dtype", None, (str(actual),), detail)


def _row_violation(
    table: str,
    column: str,
    rule: str,
    df: pd.DataFrame,
    bad: np.ndarray,
    expectation: str,
    shown: Sequence[str],
) -> Violation:
    """A Violation for the rows where ``bad`` (positional) is True, values of ``shown``."""
    positions = np.flatnonzero(bad)
    first = positions[:N_EXAMPLES]
    examples = df.iloc[first][list(shown)]
    if len(shown) == 1:
        got = ", ".join(_short(v) for v in examples.iloc[:, 0])
    else:
        got = "; ".join(
            " ".join(f"{c}={_short(v)}" for c, v in zip(shown, row, strict=True))
            for row in examples.itertuples(index=False)
        )
    return Violation(
        table,
        column,
        rule,
        len(positions),
        tuple(df.index[first]),
        f"{expectation}; got {got}",
    )


# --- all tables ---------------------------------------------------------------------------


def validate_tables(
    tables: Mapping[str, pd.DataFrame],
    *,
    window: tuple[pd.Timestamp, pd.Timestamp] | None = None,
    volume_tolerance: float = DEFAULT_VOLUME_TOLERANCE,
    previous_day_counts: Mapping[str, pd.Series] | None = None,
    quiet_days: Iterable[str | pd.Timestamp] = (),
    closed_weekdays: Iterable[str] = (),
) -> ValidationReport:
    """Check every table of `columns.ALL_TABLES` and the rules between them.

    Args:
        tables: table name -> DataFrame; all of `ALL_TABLES` are required, others ignored.
        window: ``[start, end)`` the data covers (tz-aware). Event timestamps must fall
            inside it; purchases may land up to `LATE_ARRIVAL` after ``end``. Days cut by
            either bound are left out of the volume check.
        volume_tolerance: the volume check's factor (CLI ``--volume-tolerance``): a day is
            a volume anomaly when its row count is above ``tolerance`` times or below
            ``1/tolerance`` of its references (see `_volume_violations`); > 1.
        previous_day_counts: table -> rows per UTC day (index: midnight UTC timestamps)
            from earlier deliveries, e.g. the last report's ``daily_counts``; lets a
            delivery of a few days be compared with the days before it.
        quiet_days: UTC days known to be unusual (a store closed on Christmas Day, an
            outage already explained), as dates or inclusive ranges ``"2011-12-23..2012-01-03"``
            (CLI ``--quiet-day``); the volume check neither flags them nor uses them as a
            reference for other days.
        closed_weekdays: weekdays the shop is closed every week, ``"mon"`` .. ``"sun"``
            (CLI ``--closed-weekday``), UTC like every day here; the volume check skips
            them as it skips quiet days, and reports a declared weekday whose typical
            count is that of an open day.

    Returns:
        What was checked, when nothing is wrong.

    Raises:
        ValidationError: listing every violation found.
    """
    started = time.perf_counter()
    quiet = quiet_day_set(quiet_days)
    closed = frozenset(WEEKDAYS.index(parse_weekday(name)) for name in closed_weekdays)
    volume_tolerance = check_volume_tolerance(volume_tolerance)
    if window is not None:
        window = _utc_window(window)
    for extra in sorted(set(tables) - set(ALL_TABLES)):
        logger.debug("table %r is not part of the contract; not validated", extra)

    violations: list[Violation] = []
    checks_run: list[str] = []
    present: dict[str, pd.DataFrame] = {}
    usable: dict[str, set[str]] = {}
    for table in ALL_TABLES:
        if table not in tables:
            violations.append(
                Violation(table, None, "table_present", None, (), "required table is missing")
            )
            continue
        present[table] = tables[table]
        table_started = time.perf_counter()
        found, ran, usable[table] = _table_violations(table, tables[table])
        violations.extend(found)
        checks_run.extend(ran)
        logger.debug("%s: per-table rules in %.2f s", table, time.perf_counter() - table_started)

    cross = _CrossTable(present, usable)
    violations.extend(cross.foreign_keys())
    violations.extend(cross.after_impression())
    if window is not None:
        violations.extend(cross.in_window(window))
    checks_run.extend(cross.checks_run)
    skipped: list[str] = []
    daily_counts: dict[str, pd.Series] = {}
    for table in VOLUME_TABLES:
        counts = cross.daily_counts(table)
        if counts is None:
            continue
        daily_counts[table] = counts
        previous = (previous_day_counts or {}).get(table)
        found_volume, skip = _volume_violations(
            table, counts, window, volume_tolerance, previous, quiet, closed
        )
        violations.extend(found_volume)
        if skip:
            skipped.append(skip)
            logger.info("volume check skipped: %s", skip)
        else:
            checks_run.append(f"{table}.{TIME_COLUMN[table]}: volume_anomaly")

    seconds = time.perf_counter() - started
    if violations:
        order = {table: i for i, table in enumerate(ALL_TABLES)}
        violations.sort(key=lambda v: order.get(v.table, len(order)))
        logger.debug("validation found %d violations in %.2f s", len(violations), seconds)
        raise ValidationError(violations)
    row_counts = {table: len(df) for table, df in present.items()}
    logger.info(
        "validated %d tables (%s rows) in %.2f s",
        len(present),
        f"{sum(row_counts.values()):,}",
        seconds,
    )
    return ValidationReport(row_counts, tuple(checks_run), tuple(skipped), seconds, daily_counts)


def _utc_window(window: tuple[pd.Timestamp, pd.Timestamp]) -> tuple[pd.Timestamp, pd.Timestamp]:
    start, end = (pd.Timestamp(t) for t in window)
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError(f"window bounds must be tz-aware timestamps, got {start} and {end}")
    if not start < end:
        raise ValueError(f"window start must be before its end, got [{start}, {end})")
    return start.tz_convert("UTC"), end.tz_convert("UTC")


class _CrossTable:
    """Rules between tables, over the tables present and their usable columns.

    A rule runs only when every column it reads has the contract dtype, so ids here are
    int64 without nulls and timestamps datetime64[ns, UTC].
    """

    def __init__(self, tables: Mapping[str, pd.DataFrame], usable: Mapping[str, set[str]]) -> None:
        self.tables = tables
        self.usable = usable
        self.checks_run: list[str] = []
        self._keys: dict[str, tuple[pd.Index, np.ndarray]] = {}

    def _has(self, table: str, *columns: str) -> bool:
        return table in self.tables and set(columns) <= self.usable[table]

    def _key_index(self, table: str) -> tuple[pd.Index, np.ndarray]:
        """The unique primary keys of ``table`` as a hashed Index, and the position of each
        key's (first) row; built once and shared by every rule that looks keys up."""
        if table not in self._keys:
            keys = self.tables[table][PRIMARY_KEY[table]]
            index = pd.Index(keys.to_numpy())
            rows = np.arange(len(keys))
            if not index.is_unique:  # duplicates are reported as `unique`; keep the first
                first = ~index.duplicated()
                index, rows = index[first], rows[first]
            self._keys[table] = (index, rows)
        return self._keys[table]

    def foreign_keys(self) -> list[Violation]:
        out = []
        for child, column, parent in FOREIGN_KEYS:
            parent_key = PRIMARY_KEY[parent]
            assert parent_key is not None
            if not (self._has(child, column) and self._has(parent, parent_key)):
                continue
            self.checks_run.append(f"{child}.{column}: foreign_key -> {parent}")
            df = self.tables[child]
            index, _ = self._key_index(parent)
            bad = index.get_indexer(pd.Index(df[column])) < 0
            if bad.any():
                out.append(
                    _row_violation(
                        child,
                        column,
                        "foreign_key",
                        df,
                        bad,
                        f"{column} must exist in {parent}.{parent_key}",
                        (column,),
                    )
                )
        return out

    def after_impression(self) -> list[Violation]:
        out: list[Violation] = []
        if not self._has(IMPRESSIONS, IMPRESSION_ID, TS):
            return out
        for child in AFTER_IMPRESSION_TABLES:
            if not self._has(child, IMPRESSION_ID, TS):
                continue
            self.checks_run.append(f"{child}.{TS}: after_impression")
            df = self.tables[child]
            index, rows = self._key_index(IMPRESSIONS)
            at = index.get_indexer(pd.Index(df[IMPRESSION_ID]))
            found = at >= 0
            impression_ts = _ns(self.tables[IMPRESSIONS][TS])[rows[at[found]]]
            event_ts = _ns(df[TS])[found]
            late = (event_ts < impression_ts) & (event_ts != _NAT) & (impression_ts != _NAT)
            bad = np.zeros(len(df), dtype=bool)
            bad[np.flatnonzero(found)[late]] = True
            if bad.any():
                out.append(
                    _row_violation(
                        child,
                        TS,
                        "after_impression",
                        df,
                        bad,
                        f"{child} must not precede its impression",
                        (IMPRESSION_ID, TS),
                    )
                )
        return out

    def in_window(self, window: tuple[pd.Timestamp, pd.Timestamp]) -> list[Violation]:
        start, end = window
        out = []
        for table in EVENT_TABLES:
            column = TIME_COLUMN[table]
            assert column is not None
            if not self._has(table, column):
                continue
            self.checks_run.append(f"{table}.{column}: in_window")
            df = self.tables[table]
            allowed_end = end + LATE_ARRIVAL.get(table, pd.Timedelta(0))
            ts = df[column]
            bad = ((ts < start) | (ts >= allowed_end)).to_numpy()
            if bad.any():
                late = LATE_ARRIVAL.get(table)
                allowance = f" (+{late.days} days for late arrivals)" if late else ""
                out.append(
                    _row_violation(
                        table,
                        column,
                        "in_window",
                        df,
                        bad,
                        f"{column} must be in [{start}, {end}){allowance}",
                        (column,),
                    )
                )
        return out

    def daily_counts(self, table: str) -> pd.Series | None:
        """Rows per UTC day (index: midnight UTC), or None when the column is unusable."""
        column = TIME_COLUMN[table]
        assert column is not None
        if not self._has(table, column):
            return None
        ts = _ns(self.tables[table][column])
        days, counts = np.unique(ts[ts != _NAT] // _NS_PER_DAY, return_counts=True)
        index = pd.to_datetime(days * _NS_PER_DAY, utc=True)
        return pd.Series(counts, index=index, name=table)


_NAT = np.iinfo(np.int64).min


def _ns(ts: pd.Series) -> np.ndarray:
    """Nanoseconds since the epoch (NaT: int64 min) of a datetime64[ns, UTC] column."""
    return ts.to_numpy(dtype="datetime64[ns]").view(np.int64)


# --- daily volume ----------------------------------------------------------------------------


def volume_options(
    quiet_days: Iterable[str | pd.Timestamp] = (),
    closed_weekdays: Iterable[str] = (),
    volume_tolerance: float | None = None,
) -> dict[str, Any]:
    """The volume check's options in canonical form: keyword arguments of `validate_tables`,
    and what a dataset's ``dataset.json`` stores. Quiet days and ranges sorted without
    repeats, weekdays in week order, the tolerance (None: the default); a ValueError names
    the first bad one."""
    tolerance = DEFAULT_VOLUME_TOLERANCE if volume_tolerance is None else volume_tolerance
    return {
        "quiet_days": sorted({parse_quiet_day(d) for d in quiet_days}),
        "closed_weekdays": sorted({parse_weekday(w) for w in closed_weekdays}, key=WEEKDAYS.index),
        "volume_tolerance": check_volume_tolerance(tolerance),
    }


def parse_weekday(name: str) -> str:
    """``"Sat"`` or ``"saturday"`` -> ``"sat"``; a ValueError lists the accepted names."""
    key = name.strip().lower() if isinstance(name, str) else ""
    for short, full in zip(WEEKDAYS, _WEEKDAY_NAMES, strict=True):
        if key in (short, full.lower()):
            return short
    raise ValueError(
        f"a closed weekday must be one of {', '.join(WEEKDAYS)} (or its full name), got {name!r}"
    )


def parse_quiet_day(spec: str | pd.Timestamp) -> str:
    """A quiet day, ``"2011-12-25"``, or an inclusive range of them,
    ``"2011-12-23..2012-01-03"``, in that canonical form; a ValueError says what is wrong."""
    first, last = _quiet_bounds(spec)
    return f"{first:%Y-%m-%d}" if first == last else f"{first:%Y-%m-%d}..{last:%Y-%m-%d}"


def quiet_day_set(specs: Iterable[str | pd.Timestamp]) -> frozenset[pd.Timestamp]:
    """The UTC midnights of every day the quiet days and ranges ``specs`` cover."""
    days: set[pd.Timestamp] = set()
    for spec in specs:
        first, last = _quiet_bounds(spec)
        days.update(pd.date_range(first, last, freq="D"))
    return frozenset(days)


def check_volume_tolerance(value: float) -> float:
    """``value`` as the volume check's factor, or a ValueError when it is not > 1."""
    try:
        factor = float(value)
    except (TypeError, ValueError):
        factor = np.nan
    if not (factor > 1 and np.isfinite(factor)):
        raise ValueError(
            "volume tolerance must be a finite factor > 1 (3 flags a day at under a third "
            f"or over three times its references), got {value!r}"
        )
    return factor


_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_QUIET_DAY_FORMAT = (
    "a quiet day must be a date YYYY-MM-DD or an inclusive range YYYY-MM-DD..YYYY-MM-DD"
)


def _quiet_bounds(spec: str | pd.Timestamp) -> tuple[pd.Timestamp, pd.Timestamp]:
    """First and last UTC midnight of a quiet day or range."""
    parts = [p.strip() for p in spec.split("..")] if isinstance(spec, str) else [spec]
    if len(parts) > 2:
        raise ValueError(f"{_QUIET_DAY_FORMAT}, got {spec!r}")
    first, last = (_utc_day(part, spec) for part in (parts[0], parts[-1]))
    if last < first:
        raise ValueError(
            f"quiet-day range {spec!r} ends before it starts; "
            f"write the earlier day first: {last:%Y-%m-%d}..{first:%Y-%m-%d}"
        )
    return first, last


def _utc_day(value: str | pd.Timestamp, spec: str | pd.Timestamp) -> pd.Timestamp:
    if isinstance(value, str) and not _DATE.fullmatch(value):
        raise ValueError(f"{_QUIET_DAY_FORMAT}, got {spec!r}")
    try:
        ts = pd.Timestamp(value)
    except (ValueError, TypeError):
        raise ValueError(f"{_QUIET_DAY_FORMAT}, got {spec!r}") from None
    if pd.isna(ts):
        raise ValueError(f"{_QUIET_DAY_FORMAT}, got {spec!r}")
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.floor("D")


_SAME_WEEKDAY = np.array([7 * k for k in range(-VOLUME_WEEKS, VOLUME_WEEKS + 1) if k])
_AROUND = np.array([k for k in range(-VOLUME_ROLLING_DAYS, VOLUME_ROLLING_DAYS + 1) if k])


@dataclass(frozen=True)
class _Reference:
    """One reference of a day: the median ``expected`` count of ``n`` other days."""

    kind: str  # "weekday" or "rolling"
    expected: float
    n: int

    def agrees(self, count: float, tolerance: float, slack: float) -> bool:
        return self.expected / tolerance - slack <= count <= self.expected * tolerance + slack

    def tolerance_needed(self, count: float, slack: float) -> float:
        """The smallest factor with which this reference would agree with ``count``."""
        if count > self.expected:
            return (count - slack) / self.expected if self.expected > 0 else np.inf
        return self.expected / (count + slack) if count + slack > 0 else np.inf


def _volume_violations(
    table: str,
    counts: pd.Series,
    window: tuple[pd.Timestamp, pd.Timestamp] | None,
    tolerance: float,
    previous: pd.Series | None,
    quiet: frozenset[pd.Timestamp] = frozenset(),
    closed: frozenset[int] = frozenset(),
) -> tuple[list[Violation], str | None]:
    """Compare each UTC day's row count with its same weekday and with the days around it.

    A day has two references, each the median count of other days: its *same weekday*
    (that weekday up to `VOLUME_WEEKS` weeks before and after) and its *rolling* median
    (the days up to `VOLUME_ROLLING_DAYS` before and after). A reference agrees with the
    day when the count is within ``[expected / tolerance - slack, expected * tolerance +
    slack]``; ``slack`` is `VOLUME_NOISE_SHARE` of a typical open day (the median of the
    non-empty reference days). The day is an anomaly when *no* reference agrees: the weekly
    rhythm is not flagged (a weekday that is always near-empty agrees with its own weekday),
    nor a change of level within a few weeks (the rolling median follows it), while a
    one-day outage or spike disagrees with both. One exception: an *empty* day (count <=
    slack) on a weekday that is open is flagged whatever the rolling median says, so an
    undeclared break or a log that stopped for a fortnight is reported on every day, not
    only on the first few. A day with no reference at all is not checked. Medians on both
    sides make a day's verdict independent of the order the days are looked at.
    Left out: days cut by the window; quiet days and closed weekdays (neither checked nor
    references); the first and last day holding rows, which may be partial whatever the
    window says, are checked only for too *many* rows and are no reference. Days without
    rows count as 0; ``previous`` days (earlier deliveries) are references only. A declared
    closed weekday whose median count is that of an open day is reported too.

    Returns the violations and, when the check could not apply, why.
    """
    if not len(counts):
        return [], f"{table}: no rows"
    edges = [counts.index[0], counts.index[-1]]
    if window is not None:
        first, last = window[0].ceil("D"), window[1].floor("D") - pd.Timedelta(days=1)
    else:
        first, last = counts.index[0], counts.index[-1]
    series = counts.reindex(pd.date_range(first, last, freq="D"), fill_value=0)
    if previous is not None and len(previous) and len(series):
        earlier = pd.Series(
            previous.to_numpy(np.int64),
            index=pd.to_datetime(previous.index, utc=True).floor("D"),
        )
        earlier = earlier[earlier.index < first]
        if len(earlier):
            series = pd.concat([earlier, series])
            series = series.reindex(pd.date_range(series.index[0], last, freq="D"), fill_value=0)
    if len(series) < VOLUME_MIN_DAYS or series.sum() < VOLUME_MIN_ROWS:
        return [], (
            f"{table}: volume check needs >= {VOLUME_MIN_DAYS} days and "
            f">= {VOLUME_MIN_ROWS} rows, got {len(series)} days and {int(series.sum())} rows"
        )
    days = pd.DatetimeIndex(series.index)
    values = series.to_numpy(np.float64)
    weekday = days.weekday.to_numpy()
    edge = days.isin(edges)
    is_quiet = days.isin(list(quiet))
    excluded = is_quiet | np.isin(weekday, list(closed))
    is_reference = ~excluded & ~edge
    open_days = values[is_reference & (values > 0)]
    typical = float(np.median(open_days)) if len(open_days) else 0.0
    slack = VOLUME_NOISE_SHARE * typical

    flagged: list[tuple[int, list[_Reference], bool]] = []
    # One iteration per day, not per row.
    for i in np.flatnonzero((days >= first) & ~excluded):
        refs = []
        for kind, offsets in (("weekday", _SAME_WEEKDAY), ("rolling", _AROUND)):
            others = i + offsets
            others = others[(others >= 0) & (others < len(values))]
            others = others[is_reference[others]]
            if len(others):
                refs.append(_Reference(kind, float(np.median(values[others])), len(others)))
        count = values[i]
        # An empty day is excused by its own weekday only, never by empty days around it.
        empty = count <= slack and any(r.kind == "weekday" for r in refs)
        if not refs or any(r.agrees(count, tolerance, slack) for r in _excusing(refs, empty)):
            continue
        if edge[i] and any(count < r.expected for r in refs):
            continue  # perhaps only part of the day was delivered
        flagged.append((int(i), refs, empty))

    violations = []
    runs = _runs([at for at, *_ in flagged], values <= slack)
    for at, day_refs, empty in flagged:
        day, (run_first, run_last) = days[at], runs[at]
        detail = _volume_detail(
            day,
            int(values[at]),
            day_refs,
            empty,
            tolerance,
            slack,
            (days[run_first], days[run_last]),
        )
        examples = (f"{day:%Y-%m-%d}",)
        violations.append(
            Violation(table, TIME_COLUMN[table], "volume_anomaly", None, examples, detail)
        )
    for wd in sorted(closed):
        on = values[(days >= first) & (weekday == wd) & ~edge & ~is_quiet]
        if len(on) >= 2 and typical > 0 and np.median(on) > typical / tolerance + slack:
            name = _WEEKDAY_NAMES[wd]
            detail = (
                f"{WEEKDAYS[wd]} is declared closed (--closed-weekday {WEEKDAYS[wd]}) but the "
                f"median {name} has {np.median(on):,.0f} rows, like an open day "
                f"({typical:,.0f}), so the check would hide an outage on any {name}; "
                f"drop --closed-weekday {WEEKDAYS[wd]} or name the day the shop closes"
            )
            violations.append(
                Violation(
                    table, TIME_COLUMN[table], "volume_anomaly", None, (WEEKDAYS[wd],), detail
                )
            )
    return violations, None


def _excusing(refs: list[_Reference], empty: bool) -> list[_Reference]:
    """The references whose agreement clears a day: all of them, or for an empty day only
    its weekday (a shop does not drift to nothing; it closes, or its log breaks)."""
    return [r for r in refs if r.kind == "weekday"] if empty else refs


def _runs(positions: list[int], empty: np.ndarray) -> dict[int, tuple[int, int]]:
    """Each flagged position -> the first and last position of its run: flagged positions
    with nothing but empty days between them (a closed Saturday inside a break)."""
    out: dict[int, tuple[int, int]] = {}
    start = 0
    for k in range(1, len(positions) + 1):
        if k == len(positions) or not empty[positions[k - 1] + 1 : positions[k]].all():
            for p in positions[start:k]:
                out[p] = (positions[start], positions[k - 1])
            start = k
    return out


def _volume_detail(
    day: pd.Timestamp,
    count: int,
    refs: list[_Reference],
    empty: bool,
    tolerance: float,
    slack: float,
    run: tuple[pd.Timestamp, pd.Timestamp],
) -> str:
    """Which day, its count, what was expected, which references disagree, and the option
    that would silence it."""
    weekday = _WEEKDAY_NAMES[day.weekday()]
    disagree = [r for r in refs if not r.agrees(count, tolerance, slack)]
    described = []
    for r in disagree:
        ratio = f"{_ratio(count / r.expected)}x" if r.expected > 0 else "above"
        described.append(f"{ratio} the {_describe(r, weekday)}")
    verdict = f"{'both ' if len(disagree) > 1 else ''}outside 1/{tolerance:g}x..{tolerance:g}x"
    for r in refs:
        if r not in disagree:  # only an empty day is flagged with a reference that agrees
            verdict += (
                f"; the {_describe(r, weekday)} agrees, but an empty day on a weekday that "
                "is open is always reported"
            )
    no_weekday = all(r.kind != "weekday" for r in refs)
    if no_weekday:
        verdict += f" (no other {weekday} within ±{VOLUME_WEEKS} weeks to compare with)"
    quiet = f"{day:%Y-%m-%d}" if run[0] == run[1] else f"{run[0]:%Y-%m-%d}..{run[1]:%Y-%m-%d}"
    options = [f"--quiet-day {quiet} if it is explained (a holiday, a known outage)"]
    if count <= slack and no_weekday:
        short = WEEKDAYS[day.weekday()]
        options.append(f"--closed-weekday {short} if the shop closes every {weekday}")
    needed = min(r.tolerance_needed(count, slack) for r in _excusing(refs, empty))
    if needed <= 2 * tolerance:
        options.append(f"--volume-tolerance {np.ceil(needed * 10 + 1e-9) / 10:g}")
    return (
        f"{day:%Y-%m-%d} ({weekday[:3]}) has {count:,} rows, expected about "
        f"{refs[0].expected:,.0f}: {' and '.join(described)}, {verdict}; silence with "
        + ", or ".join(options)
    )


def _describe(r: _Reference, weekday: str) -> str:
    if r.kind == "weekday":
        plural = "s" if r.n != 1 else ""
        return (
            f"same-weekday median ({r.expected:,.0f}, {r.n} other {weekday}{plural} "
            f"within ±{VOLUME_WEEKS} weeks)"
        )
    return f"rolling median ({r.expected:,.0f}, {r.n} days within ±{VOLUME_ROLLING_DAYS})"


def _ratio(x: float) -> str:
    return f"{x:.2g}" if x < 10 else f"{x:.0f}"


# --- helpers ---------------------------------------------------------------------------------


def _ordered_tables(tables: Iterable[str]) -> list[str]:
    """Distinct table names, contract order first."""
    seen = list(dict.fromkeys(tables))
    return [t for t in ALL_TABLES if t in seen] + [t for t in seen if t not in ALL_TABLES]


def _sorted(labels: list[object]) -> list[object]:
    try:
        return sorted(labels)  # type: ignore[type-var]
    except TypeError:  # labels of mixed types
        return labels


def _short(value: object, width: int = 40) -> str:
    """A value as shown in a message: strings quoted, numpy scalars as plain numbers."""
    if isinstance(value, np.ndarray):
        text = f"{np.array2string(value, threshold=6)} (length {value.size})"
    elif isinstance(value, np.generic):
        text = repr(value.item())
    elif isinstance(value, str):
        text = repr(value)
    else:
        text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"
