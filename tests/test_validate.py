"""Tests of the validation stage: a small valid data set passes, each kind of corruption is
reported with its table, column, rule and row count, and several are reported together."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from contract.columns import (
    ADD_TO_CARTS,
    ALL_TABLES,
    BRAND,
    CATEGORY,
    CLICKS,
    COHORT,
    CONTENT,
    COUNTRY,
    CREATED_AT,
    DEVICE,
    IMPRESSION_ID,
    IMPRESSIONS,
    INVENTORY,
    IS_NEW,
    ITEM_ID,
    ITEMS,
    LIST_PRICE,
    MARGIN,
    POLICY,
    POLICY_HEURISTIC,
    POLICY_ORGANIC,
    POLICY_RANDOM,
    POSITION,
    PRICE,
    PROPENSITY,
    PURCHASES,
    QUANTITY,
    RATING,
    REQUEST_ID,
    SELLER_ID,
    SELLERS,
    SHIPPING_DAYS,
    SIGNUP_AT,
    STOCK,
    SURFACE,
    SURFACES,
    TS,
    USER_ID,
    USERS,
)
from contract.paths import Paths
from training.validate import (
    ValidationError,
    ValidationReport,
    Violation,
    parse_quiet_day,
    parse_weekday,
    quiet_day_set,
    table_violations,
    validate_table,
    validate_tables,
    volume_options,
)

START = pd.Timestamp("2024-03-01", tz="UTC")
DAYS = 10
WINDOW = (START, START + pd.Timedelta(days=DAYS))
HOUR = pd.Timedelta(hours=1)
MINUTE = pd.Timedelta(minutes=1)
DIM = 4  # content vector length

Tables = dict[str, pd.DataFrame]


def _ts(values: list[pd.Timestamp]) -> pd.Series:
    return pd.Series(pd.DatetimeIndex(values).as_unit("ns"))


def _valid_tables() -> Tables:
    """3 sellers, 6 items, 5 users, 40 impressions (one every 6 h over 10 days, two of them
    organic), 5 clicks, 2 add-to-carts, 3 purchases, 6 inventory snapshots."""
    sellers = pd.DataFrame(
        {
            SELLER_ID: [1, 2, 3],
            CREATED_AT: _ts([START - pd.Timedelta(days=d) for d in (300, 200, 5)]),
            RATING: [4.5, 3.0, 5.0],
            IS_NEW: [False, False, True],
        }
    )
    items = pd.DataFrame(
        {
            ITEM_ID: [10, 11, 12, 13, 14, 15],
            SELLER_ID: [1, 1, 2, 2, 3, 3],
            CATEGORY: [0, 0, 1, 1, 2, 2],
            BRAND: [5, 6, 5, 7, 8, 8],
            PRICE: [10.0, 20.0, 5.5, 0.0, 99.0, 12.0],
            LIST_PRICE: [12.0, 20.0, 6.0, 0.0, 120.0, 15.0],
            MARGIN: [0.2, 0.1, 0.0, 1.0, 0.35, 0.5],
            CREATED_AT: _ts([START - pd.Timedelta(days=d) for d in (90, 80, 70, 60, 50, 40)]),
            SHIPPING_DAYS: [1, 2, 0, 3, 5, 2],
            STOCK: [5, 0, 100, 7, 1, 30],
            CONTENT: [np.full(DIM, i / 10, dtype=np.float32) for i in range(6)],
        }
    )
    users = pd.DataFrame(
        {
            USER_ID: [1, 2, 3, 4, 5],
            SIGNUP_AT: _ts([START - pd.Timedelta(days=d) for d in (400, 30, 20, 10, 1)]),
            COUNTRY: ["US", "GB", "DE", "FR", "CA"],
            DEVICE: ["ios", "android", "web", "ios", "web"],
            COHORT: ["2023-01", "2024-01", "2024-02", "2024-02", "2024-02"],
        }
    )
    n = 40
    organic = {38, 39}
    policy = [
        POLICY_ORGANIC if i in organic else POLICY_RANDOM if i % 5 == 0 else POLICY_HEURISTIC
        for i in range(n)
    ]
    impressions = pd.DataFrame(
        {
            IMPRESSION_ID: np.arange(100, 100 + n),
            REQUEST_ID: np.arange(n) // 4,
            USER_ID: [1 + i % 5 for i in range(n)],
            ITEM_ID: [10 + i % 6 for i in range(n)],
            POSITION: [0 if i in organic else 1 + i % 4 for i in range(n)],
            SURFACE: [SURFACES[i % 2] for i in range(n)],
            TS: _ts([START + i * 6 * HOUR for i in range(n)]),
            POLICY: policy,
            PROPENSITY: [
                np.nan if p == POLICY_ORGANIC else 0.25 if p == POLICY_RANDOM else 0.8
                for p in policy
            ],
        }
    )
    impression_ts = dict(zip(impressions[IMPRESSION_ID], impressions[TS], strict=True))

    def after(ids: list[int], delay: pd.Timedelta) -> pd.Series:
        return _ts([impression_ts[i] + delay for i in ids])

    clicked, carted, bought = [101, 105, 110, 120, 130], [105, 120], [105, 120, 138]
    clicks = pd.DataFrame({IMPRESSION_ID: clicked, TS: after(clicked, MINUTE)})
    add_to_carts = pd.DataFrame({IMPRESSION_ID: carted, TS: after(carted, 5 * MINUTE)})
    purchases = pd.DataFrame(
        {
            IMPRESSION_ID: bought,
            # The organic impression carries its purchase's own time.
            TS: _ts([impression_ts[105] + HOUR, impression_ts[120] + HOUR, impression_ts[138]]),
            PRICE: [10.0, 99.0, 6.0],
            QUANTITY: [1, 2, 1],
        }
    )
    inventory = pd.DataFrame(
        {
            ITEM_ID: [10, 11, 12, 13, 14, 15],
            TS: _ts([START + d * 24 * HOUR for d in range(6)]),
            STOCK: [5, 0, 100, 7, 1, 30],
        }
    )
    return {
        SELLERS: sellers,
        ITEMS: items,
        USERS: users,
        IMPRESSIONS: impressions,
        CLICKS: clicks,
        ADD_TO_CARTS: add_to_carts,
        PURCHASES: purchases,
        INVENTORY: inventory,
    }


@pytest.fixture
def tables() -> Tables:
    return _valid_tables()


def _bulk_impressions(per_day: list[int], start: pd.Timestamp = START) -> pd.DataFrame:
    """Heuristic impressions spread evenly over each day, ``per_day[d]`` on day ``d``."""
    offsets = np.concatenate(
        [d * 86_400 + np.arange(k) * (86_400 // k) for d, k in enumerate(per_day) if k]
    )
    n = len(offsets)
    return pd.DataFrame(
        {
            IMPRESSION_ID: np.arange(n, dtype=np.int64) + 1_000,
            REQUEST_ID: np.arange(n, dtype=np.int64) // 10,
            USER_ID: 1 + np.arange(n) % 5,
            ITEM_ID: 10 + np.arange(n) % 6,
            POSITION: 1 + np.arange(n) % 10,
            SURFACE: np.array(SURFACES, dtype=object)[np.arange(n) % 2],
            TS: start + pd.to_timedelta(offsets, unit="s"),
            POLICY: np.full(n, POLICY_HEURISTIC, dtype=object),
            PROPENSITY: np.full(n, 0.5),
        }
    )


def _with_impressions(tables: Tables, impressions: pd.DataFrame) -> Tables:
    """``tables`` with the given impressions and no events that point at the old ones."""
    empty = {t: tables[t].iloc[:0] for t in (CLICKS, ADD_TO_CARTS, PURCHASES)}
    return {**tables, **empty, IMPRESSIONS: impressions}


def _found(
    err: pytest.ExceptionInfo[ValidationError],
) -> set[tuple[str, str | None, str, int | None]]:
    return {(v.table, v.column, v.rule, v.n_rows) for v in err.value.violations}


def _fragment(table: str, column: str | None, rule: str, n_rows: int | None) -> str:
    where = table if column is None else f"{table}.{column}"
    if n_rows is None:
        return f"{where}: {rule} — "
    return f"{where}: {rule} — {n_rows} {'row violates' if n_rows == 1 else 'rows violate'}"


# --- the valid set ---------------------------------------------------------------------------


def test_valid_tables_pass(tables: Tables) -> None:
    report = validate_tables(tables, window=WINDOW)

    assert isinstance(report, ValidationReport)
    assert report.row_counts == {t: len(tables[t]) for t in ALL_TABLES}
    assert f"{PURCHASES}.{IMPRESSION_ID}: foreign_key -> {IMPRESSIONS}" in report.checks_run
    assert f"{CLICKS}.{TS}: after_impression" in report.checks_run
    assert f"{PURCHASES}.{TS}: in_window" in report.checks_run
    assert report.skipped  # 40 impressions are too few for the volume check
    assert report.seconds > 0


def test_valid_tables_pass_without_window(tables: Tables) -> None:
    validate_tables(tables)


def test_each_table_passes_on_its_own(tables: Tables) -> None:
    for name, df in tables.items():
        validate_table(name, df)
        assert table_violations(name, df) == []


def test_purchase_within_late_arrival_allowance_passes(tables: Tables) -> None:
    tables[PURCHASES].loc[0, TS] = WINDOW[1] + pd.Timedelta(days=13)
    validate_tables(tables, window=WINDOW)


def test_extra_columns_are_allowed(tables: Tables) -> None:
    tables[IMPRESSIONS]["debug_note"] = "x"
    validate_tables(tables, window=WINDOW)


# --- one corruption at a time --------------------------------------------------------------


def _null_user_id(t: Tables) -> None:
    t[IMPRESSIONS].loc[3, USER_ID] = np.nan


def _negative_price(t: Tables) -> None:
    t[ITEMS].loc[2, PRICE] = -1.0


def _list_price_below_price(t: Tables) -> None:
    t[ITEMS].loc[0, LIST_PRICE] = 9.0


def _margin_above_one(t: Tables) -> None:
    t[ITEMS].loc[4, MARGIN] = 1.5


def _duplicate_impression_ids(t: Tables) -> None:
    t[IMPRESSIONS].loc[[7, 8], IMPRESSION_ID] = 106  # 106 is row 6's id


def _purchase_without_impression(t: Tables) -> None:
    t[PURCHASES].loc[[0, 2], IMPRESSION_ID] = [9_998, 9_999]


def _click_before_impression(t: Tables) -> None:
    clicks = t[CLICKS]
    clicks[TS] = clicks[TS].mask(clicks.index == 2, clicks[TS] - 2 * HOUR)


def _event_after_window(t: Tables) -> None:
    t[ADD_TO_CARTS].loc[1, TS] = WINDOW[1] + HOUR


def _purchase_after_allowance(t: Tables) -> None:
    t[PURCHASES].loc[1, TS] = WINDOW[1] + pd.Timedelta(days=15)


def _inventory_before_window(t: Tables) -> None:
    t[INVENTORY].loc[0, TS] = WINDOW[0] - MINUTE


def _unknown_surface(t: Tables) -> None:
    t[IMPRESSIONS].loc[5, SURFACE] = "SEARCH"


def _position_zero_on_heuristic(t: Tables) -> None:
    t[IMPRESSIONS].loc[1, POSITION] = 0


def _position_on_organic(t: Tables) -> None:
    t[IMPRESSIONS].loc[38, POSITION] = 3


def _propensity_zero(t: Tables) -> None:
    t[IMPRESSIONS].loc[10, PROPENSITY] = 0.0


def _propensity_on_organic(t: Tables) -> None:
    t[IMPRESSIONS].loc[39, PROPENSITY] = 0.5


def _set_content(t: Tables, row: int, vector: np.ndarray) -> None:
    content = [vector if i == row else v for i, v in enumerate(t[ITEMS][CONTENT])]
    t[ITEMS][CONTENT] = pd.Series(content, index=t[ITEMS].index, dtype=object)


def _content_wrong_length(t: Tables) -> None:
    _set_content(t, 3, np.zeros(DIM + 1, dtype=np.float32))


def _content_not_finite(t: Tables) -> None:
    _set_content(t, 1, np.array([0.0, np.nan, 1.0, np.inf], dtype=np.float32))


def _missing_column(t: Tables) -> None:
    t[USERS] = t[USERS].drop(columns=[DEVICE])


def _wrong_dtype(t: Tables) -> None:
    t[IMPRESSIONS][POSITION] = t[IMPRESSIONS][POSITION].astype(np.float64)


def _naive_timestamps(t: Tables) -> None:
    t[CLICKS][TS] = t[CLICKS][TS].dt.tz_localize(None)


def _unknown_seller(t: Tables) -> None:
    t[ITEMS].loc[5, SELLER_ID] = 42


def _unknown_user(t: Tables) -> None:
    t[IMPRESSIONS].loc[[0, 1, 2], USER_ID] = 77


def _bad_country(t: Tables) -> None:
    t[USERS].loc[[1, 2], COUNTRY] = ["uk", "USA"]


def _zero_quantity(t: Tables) -> None:
    t[PURCHASES].loc[0, QUANTITY] = 0


def _negative_stock(t: Tables) -> None:
    t[INVENTORY].loc[4, STOCK] = -3


def _many_unknown_surfaces(t: Tables) -> None:
    # More rows than a violation's examples: the count must still be exact.
    t[IMPRESSIONS].loc[10:18, SURFACE] = "home"


def _null_timestamp(t: Tables) -> None:
    t[CLICKS].loc[4, TS] = pd.NaT


def _duplicate_click(t: Tables) -> None:
    t[CLICKS].loc[1, IMPRESSION_ID] = 101


def _missing_table(t: Tables) -> None:
    del t[INVENTORY]


Expected = list[tuple[str, str | None, str, int | None]]

CORRUPTIONS: list[tuple[Callable[[Tables], None], Expected]] = [
    (_null_user_id, [(IMPRESSIONS, USER_ID, "not_null", 1), (IMPRESSIONS, USER_ID, "dtype", None)]),
    (_negative_price, [(ITEMS, PRICE, "non_negative", 1)]),
    (_list_price_below_price, [(ITEMS, LIST_PRICE, "list_price_ge_price", 1)]),
    (_margin_above_one, [(ITEMS, MARGIN, "in_range", 1)]),
    (_duplicate_impression_ids, [(IMPRESSIONS, IMPRESSION_ID, "unique", 3)]),
    (_purchase_without_impression, [(PURCHASES, IMPRESSION_ID, "foreign_key", 2)]),
    (_click_before_impression, [(CLICKS, TS, "after_impression", 1)]),
    (_event_after_window, [(ADD_TO_CARTS, TS, "in_window", 1)]),
    (_purchase_after_allowance, [(PURCHASES, TS, "in_window", 1)]),
    (_inventory_before_window, [(INVENTORY, TS, "in_window", 1)]),
    (_unknown_surface, [(IMPRESSIONS, SURFACE, "allowed_values", 1)]),
    (_position_zero_on_heuristic, [(IMPRESSIONS, POSITION, "position_by_policy", 1)]),
    (_position_on_organic, [(IMPRESSIONS, POSITION, "position_by_policy", 1)]),
    (_propensity_zero, [(IMPRESSIONS, PROPENSITY, "propensity_by_policy", 1)]),
    (_propensity_on_organic, [(IMPRESSIONS, PROPENSITY, "propensity_by_policy", 1)]),
    (_content_wrong_length, [(ITEMS, CONTENT, "vector_length", 1)]),
    (_content_not_finite, [(ITEMS, CONTENT, "vector_finite", 1)]),
    (_missing_column, [(USERS, DEVICE, "column_present", None)]),
    (_wrong_dtype, [(IMPRESSIONS, POSITION, "dtype", None)]),
    (_naive_timestamps, [(CLICKS, TS, "dtype", None)]),
    (_unknown_seller, [(ITEMS, SELLER_ID, "foreign_key", 1)]),
    (_unknown_user, [(IMPRESSIONS, USER_ID, "foreign_key", 3)]),
    (_bad_country, [(USERS, COUNTRY, "country_code", 2)]),
    (_zero_quantity, [(PURCHASES, QUANTITY, "min_value", 1)]),
    (_negative_stock, [(INVENTORY, STOCK, "non_negative", 1)]),
    (_many_unknown_surfaces, [(IMPRESSIONS, SURFACE, "allowed_values", 9)]),
    (_null_timestamp, [(CLICKS, TS, "not_null", 1)]),
    (_duplicate_click, [(CLICKS, IMPRESSION_ID, "unique", 2)]),
    (_missing_table, [(INVENTORY, None, "table_present", None)]),
]


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [pytest.param(fn, exp, id=fn.__name__.lstrip("_")) for fn, exp in CORRUPTIONS],
)
def test_corruption_is_reported(
    tables: Tables, corrupt: Callable[[Tables], None], expected: Expected
) -> None:
    corrupt(tables)

    with pytest.raises(ValidationError) as err:
        validate_tables(tables, window=WINDOW)

    assert _found(err) == set(expected)
    msg = str(err.value)
    for violation in expected:
        assert _fragment(*violation) in msg


def test_message_names_rows_and_values(tables: Tables) -> None:
    _purchase_without_impression(tables)

    with pytest.raises(ValidationError) as err:
        validate_tables(tables, window=WINDOW)

    lines = str(err.value).splitlines()
    assert lines[0] == f"validation failed: 1 violation in table {PURCHASES}"
    assert (
        lines[1]
        .strip()
        .startswith(f"{PURCHASES}.{IMPRESSION_ID}: foreign_key — 2 rows violate (e.g. rows 0, 2): ")
    )
    assert "9998" in lines[1] and "9999" in lines[1]


def test_several_corruptions_are_all_reported(tables: Tables) -> None:
    for corrupt in (
        _negative_price,
        _duplicate_impression_ids,
        _purchase_without_impression,
        _missing_column,
        _click_before_impression,
    ):
        corrupt(tables)

    with pytest.raises(ValidationError) as err:
        validate_tables(tables, window=WINDOW)

    assert _found(err) == {
        (ITEMS, PRICE, "non_negative", 1),
        (USERS, DEVICE, "column_present", None),
        (IMPRESSIONS, IMPRESSION_ID, "unique", 3),
        (CLICKS, TS, "after_impression", 1),
        (PURCHASES, IMPRESSION_ID, "foreign_key", 2),
    }
    lines = str(err.value).splitlines()
    assert lines[0] == (
        f"validation failed: 5 violations in tables {ITEMS}, {USERS}, {IMPRESSIONS}, "
        f"{CLICKS}, {PURCHASES}"
    )
    assert len(lines) == 6


def test_validate_table_raises_for_its_own_rules_only(tables: Tables) -> None:
    _unknown_seller(tables)  # a cross-table rule: not checked table by table
    validate_table(ITEMS, tables[ITEMS])

    _margin_above_one(tables)
    with pytest.raises(ValidationError) as err:
        validate_table(ITEMS, tables[ITEMS])
    assert _found(err) == {(ITEMS, MARGIN, "in_range", 1)}


def test_unknown_table_is_refused(tables: Tables) -> None:
    with pytest.raises(ValueError, match="unknown table 'orders'"):
        validate_table("orders", tables[ITEMS])


@pytest.mark.parametrize(
    "window",
    [
        (pd.Timestamp("2024-03-01"), pd.Timestamp("2024-03-11")),
        (WINDOW[1], WINDOW[0]),
    ],
    ids=["naive", "reversed"],
)
def test_bad_window_is_refused(tables: Tables, window: tuple[pd.Timestamp, pd.Timestamp]) -> None:
    with pytest.raises(ValueError, match="window"):
        validate_tables(tables, window=window)


def test_violation_str() -> None:
    v = Violation(IMPRESSIONS, IMPRESSION_ID, "unique", 3, (10, 11, 57), "must be unique")
    assert str(v) == (
        f"{IMPRESSIONS}.{IMPRESSION_ID}: unique — 3 rows violate (e.g. rows 10, 11, 57): "
        "must be unique"
    )
    assert isinstance(ValidationError([v]), ValueError)


# --- daily volume -------------------------------------------------------------------------------


def test_steady_volume_passes(tables: Tables) -> None:
    bulk = _with_impressions(tables, _bulk_impressions([200] * DAYS))

    report = validate_tables(bulk, window=WINDOW)

    assert f"{IMPRESSIONS}.{TS}: volume_anomaly" in report.checks_run
    assert not report.skipped
    assert report.daily_counts[IMPRESSIONS].tolist() == [200] * DAYS


def test_day_with_ten_times_the_previous_is_reported(tables: Tables) -> None:
    per_day = [200] * DAYS
    per_day[5] = 2_000  # 2024-03-06
    bulk = _with_impressions(tables, _bulk_impressions(per_day))

    with pytest.raises(ValidationError) as err:
        validate_tables(bulk, window=WINDOW)

    assert _found(err) == {(IMPRESSIONS, TS, "volume_anomaly", None)}
    (violation,) = err.value.violations
    assert violation.examples == ("2024-03-06",)  # the day after is back to normal
    assert "2024-03-06 (Wed) has 2,000 rows, expected about 200: 10x the rolling median" in str(
        err.value
    )


def test_missing_day_is_reported_and_tolerance_is_configurable(tables: Tables) -> None:
    per_day = [300] * DAYS
    per_day[3] = 120  # 2.5x fewer: within the default factor 3, not within 2
    bulk = _with_impressions(tables, _bulk_impressions(per_day))
    validate_tables(bulk, window=WINDOW)

    with pytest.raises(ValidationError) as err:
        validate_tables(bulk, window=WINDOW, volume_tolerance=2)
    assert err.value.violations[0].examples == ("2024-03-04",)

    per_day[3] = 0
    with pytest.raises(ValidationError) as err:
        validate_tables(_with_impressions(tables, _bulk_impressions(per_day)), window=WINDOW)
    assert err.value.violations[0].examples == ("2024-03-04",)


def test_declared_quiet_day_is_not_an_anomaly(tables: Tables) -> None:
    per_day = [300] * DAYS
    per_day[3] = 0  # 2024-03-04: the store was closed
    bulk = _with_impressions(tables, _bulk_impressions(per_day))
    with pytest.raises(ValidationError):
        validate_tables(bulk, window=WINDOW)

    validate_tables(bulk, window=WINDOW, quiet_days=["2024-03-04"])

    per_day[6] = 3_000  # another, undeclared anomaly is still caught
    with pytest.raises(ValidationError) as err:
        validate_tables(
            _with_impressions(tables, _bulk_impressions(per_day)),
            window=WINDOW,
            quiet_days=["2024-03-04"],
        )
    assert err.value.violations[0].examples == ("2024-03-07",)


def test_partial_first_day_of_window_is_ignored(tables: Tables) -> None:
    noon = START + 12 * HOUR
    impressions = _bulk_impressions([200] * DAYS)
    impressions = impressions[impressions[TS] >= noon].reset_index(drop=True)
    # ...and only 10 rows on the first half day: a "drop" that is only the cut.
    impressions = impressions.iloc[90:].reset_index(drop=True)

    bulk = _with_impressions(tables, impressions)
    bulk[INVENTORY] = bulk[INVENTORY].iloc[1:]  # the first snapshot is before noon

    validate_tables(bulk, window=(noon, WINDOW[1]))


def test_small_table_skips_volume_check(tables: Tables) -> None:
    per_day = [50] * DAYS
    per_day[5] = 500
    report = validate_tables(
        _with_impressions(tables, _bulk_impressions(per_day)), window=WINDOW
    )  # 950 rows < 1000
    assert any(IMPRESSIONS in reason for reason in report.skipped)


def test_previous_day_counts_extend_a_short_delivery(tables: Tables) -> None:
    start = START + pd.Timedelta(days=7)
    window = (start, start + pd.Timedelta(days=3))
    previous = pd.Series([200] * 7, index=pd.date_range(START, periods=7, freq="D"))
    bulk = _with_impressions(tables, _bulk_impressions([2_000, 200, 200], start=start))
    bulk[INVENTORY] = bulk[INVENTORY].iloc[:0]  # snapshots before the window

    report = validate_tables(bulk, window=window)
    assert report.skipped  # 3 days alone are too few

    with pytest.raises(ValidationError) as err:
        validate_tables(bulk, window=window, previous_day_counts={IMPRESSIONS: previous})
    assert err.value.violations[0].examples == (f"{start:%Y-%m-%d}",)


# --- daily volume on a shop calendar -------------------------------------------------------------

CAL_START = pd.Timestamp("2011-11-07", tz="UTC")  # a Monday; 10 weeks run to 2012-01-15
CAL_WEEKS = 10
# Rows per weekday, Monday first: the shop is closed on Saturdays.
CAL_WEEKDAY_ROWS = (500, 480, 460, 450, 420, 0, 250)
CHRISTMAS = "2011-12-23..2012-01-03"
OUTAGE_TUESDAY = "2011-11-29"


def _calendar_days(
    partial_last_day: int | None = 30, changed: Mapping[str, int] | None = None
) -> pd.Series:
    """Rows per day of a shop's 10-week log: a weekly rhythm with ±15 % noise, every
    Saturday and the Christmas break empty, ``changed`` days ("YYYY-MM-DD" -> rows) as
    given, and a last day cut short (``partial_last_day`` rows on the Monday after the 10
    weeks; None: no such day)."""
    rng = np.random.default_rng(7)
    days = pd.date_range(CAL_START, periods=7 * CAL_WEEKS + 1, freq="D")
    weekly = np.array([CAL_WEEKDAY_ROWS[d.weekday()] for d in days])
    rows = (weekly * rng.uniform(0.85, 1.15, len(days))).round().astype(int)
    first, last = (pd.Timestamp(d, tz="UTC") for d in CHRISTMAS.split(".."))
    rows[(days >= first) & (days <= last)] = 0
    for day, n in (changed or {}).items():
        rows[days.get_loc(pd.Timestamp(day, tz="UTC"))] = n
    if partial_last_day is None:
        return pd.Series(rows[:-1], index=days[:-1])
    rows[-1] = partial_last_day
    return pd.Series(rows, index=days)


def _calendar_tables(tables: Tables, per_day: pd.Series) -> Tables:
    """The valid set with ``per_day`` impressions and its inventory moved into that log."""
    out = _with_impressions(tables, _bulk_impressions(per_day.tolist(), start=CAL_START))
    inventory = out[INVENTORY].copy()
    inventory[TS] = CAL_START + pd.to_timedelta(np.arange(len(inventory)), unit="D")
    return {**out, INVENTORY: inventory}


def _data_window(tables: Tables) -> tuple[pd.Timestamp, pd.Timestamp]:
    """The window `homefeed ingest` takes from the data."""
    from training.stages import window_of

    return window_of(tables)


def test_shop_calendar_with_declared_closing_days_passes(tables: Tables) -> None:
    log = _calendar_tables(tables, _calendar_days())

    report = validate_tables(
        log, window=_data_window(log), quiet_days=[CHRISTMAS], closed_weekdays=["sat"]
    )

    assert f"{IMPRESSIONS}.{TS}: volume_anomaly" in report.checks_run
    assert not report.skipped


def test_an_always_empty_weekday_is_not_flagged_even_undeclared(tables: Tables) -> None:
    log = _calendar_tables(tables, _calendar_days())

    validate_tables(log, window=_data_window(log), quiet_days=[CHRISTMAS])


def test_undeclared_break_is_flagged_with_a_range_to_declare(tables: Tables) -> None:
    log = _calendar_tables(tables, _calendar_days())

    with pytest.raises(ValidationError) as err:
        validate_tables(log, window=_data_window(log), closed_weekdays=["sat"])

    # Every open day of the break, the middle ones too (their days around are empty as well);
    # the closed Saturdays are not flagged, and do not split the range to declare.
    break_days = pd.date_range("2011-12-23", "2012-01-03", tz="UTC")
    open_days = [f"{d:%Y-%m-%d}" for d in break_days if d.weekday() != 5]
    assert [v.examples[0] for v in err.value.violations] == open_days
    assert all(f"--quiet-day {CHRISTMAS} if" in v.detail for v in err.value.violations)
    assert "the rolling median (0, " in str(err.value)  # no excuse for an empty day


def test_one_day_outage_on_a_tuesday_is_flagged_with_what_was_expected(tables: Tables) -> None:
    per_day = _calendar_days(changed={OUTAGE_TUESDAY: 24})  # 5 % of a Tuesday
    log = _calendar_tables(tables, per_day)

    with pytest.raises(ValidationError) as err:
        validate_tables(
            log, window=_data_window(log), quiet_days=[CHRISTMAS], closed_weekdays=["sat"]
        )

    (violation,) = err.value.violations
    assert (violation.table, violation.rule, violation.examples) == (
        IMPRESSIONS,
        "volume_anomaly",
        ("2011-11-29",),
    )
    # The Tuesdays within 4 weeks, the one inside the declared break left out.
    tuesdays = ["2011-11-08", "2011-11-15", "2011-11-22", "2011-12-06", "2011-12-13", "2011-12-20"]
    expected = per_day[pd.DatetimeIndex(tuesdays, tz="UTC")].median()
    message = str(violation)
    assert (
        f"2011-11-29 (Tue) has 24 rows, expected about {expected:,.0f}: "
        f"{24 / expected:.2g}x the same-weekday median ({expected:,.0f}, 6 other Tuesdays "
        "within ±4 weeks) and "
    ) in message
    assert "the rolling median (" in message and "both outside 1/3x..3x" in message
    assert "silence with --quiet-day 2011-11-29 if it is explained" in message


def test_partial_last_day_is_not_flagged_when_the_window_comes_from_the_data(
    tables: Tables,
) -> None:
    options = volume_options([CHRISTMAS], ["sat"])
    log = _calendar_tables(tables, _calendar_days(partial_last_day=30))
    validate_tables(log, window=_data_window(log), **options)
    validate_tables(log, **options)  # no window at all

    # The same 30 rows one day before the end are an outage...
    log = _calendar_tables(tables, _calendar_days(480, changed={"2012-01-15": 30}))
    with pytest.raises(ValidationError) as err:
        validate_tables(log, window=_data_window(log), **options)
    assert [v.examples for v in err.value.violations] == [("2012-01-15",)]

    # ...and a last day with far too many rows is still reported.
    log = _calendar_tables(tables, _calendar_days(partial_last_day=5_000))
    with pytest.raises(ValidationError) as err:
        validate_tables(log, window=_data_window(log), **options)
    assert [v.examples for v in err.value.violations] == [("2012-01-16",)]


def test_volume_tolerance_changes_the_verdict(tables: Tables) -> None:
    per_day = _calendar_days(changed={OUTAGE_TUESDAY: 192})  # 40 % of a Tuesday
    log = _calendar_tables(tables, per_day)
    validate_tables(log, window=_data_window(log), **volume_options([CHRISTMAS], ["sat"]))

    with pytest.raises(ValidationError) as err:
        validate_tables(log, window=_data_window(log), **volume_options([CHRISTMAS], ["sat"], 2))
    (violation,) = err.value.violations
    assert violation.examples == ("2011-11-29",)
    assert "outside 1/2x..2x" in violation.detail
    assert "or --volume-tolerance 2." in violation.detail

    with pytest.raises(ValueError, match="volume tolerance must be a finite factor > 1"):
        validate_tables(log, volume_tolerance=1)


def test_closed_weekday_that_is_open_is_reported(tables: Tables) -> None:
    log = _calendar_tables(tables, _calendar_days())

    with pytest.raises(ValidationError) as err:
        validate_tables(
            log, window=_data_window(log), quiet_days=[CHRISTMAS], closed_weekdays=["sat", "wed"]
        )

    (violation,) = err.value.violations
    assert violation.examples == ("wed",)
    assert "wed is declared closed (--closed-weekday wed) but the median Wednesday has" in (
        violation.detail
    )


# --- the volume check's options -----------------------------------------------------------------


def test_quiet_days_and_ranges_parse_to_utc_days() -> None:
    assert parse_quiet_day("2011-12-25") == "2011-12-25"
    assert parse_quiet_day(" 2011-12-23 .. 2012-01-03 ") == CHRISTMAS
    assert parse_quiet_day("2011-12-25..2011-12-25") == "2011-12-25"
    assert parse_quiet_day(pd.Timestamp("2011-12-25 23:00", tz="America/New_York")) == (
        "2011-12-26"
    )
    days = quiet_day_set([CHRISTMAS, "2011-12-25", "2012-02-01"])
    assert len(days) == 12 + 1
    assert min(days) == pd.Timestamp("2011-12-23", tz="UTC")
    assert max(days) == pd.Timestamp("2012-02-01", tz="UTC")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "2012-01-03..2011-12-23",
            "quiet-day range '2012-01-03..2011-12-23' ends before it starts; "
            "write the earlier day first: 2011-12-23..2012-01-03",
        ),
        ("12/25/2011", "a quiet day must be a date YYYY-MM-DD or an inclusive range"),
        ("2011-12-23..", "got '2011-12-23..'"),
        ("2011-02-30", "got '2011-02-30'"),
        ("2011-12-01..2011-12-05..2011-12-09", "inclusive range YYYY-MM-DD..YYYY-MM-DD"),
    ],
    ids=["reversed", "us-date", "open-end", "no-such-day", "three-parts"],
)
def test_bad_quiet_day_is_refused_with_what_would_be_right(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_quiet_day(spec)


def test_weekday_names() -> None:
    assert [parse_weekday(n) for n in ("sat", "Sat", "SATURDAY", " sun ")] == [
        "sat",
        "sat",
        "sat",
        "sun",
    ]
    with pytest.raises(ValueError, match=re.escape("one of mon, tue, wed, thu, fri, sat, sun")):
        parse_weekday("satu")


def test_volume_options_are_canonical() -> None:
    assert volume_options(["2012-01-05", CHRISTMAS, "2012-01-05"], ["sun", "Sat", "mon"]) == {
        "quiet_days": [CHRISTMAS, "2012-01-05"],
        "closed_weekdays": ["mon", "sat", "sun"],
        "volume_tolerance": 3.0,
    }
    assert volume_options(volume_tolerance=4)["volume_tolerance"] == 4.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["validate", "--closed-weekday", "satu"],
            "argument --closed-weekday: a closed weekday must be one of mon, tue, wed, thu, "
            "fri, sat, sun (or its full name), got 'satu'",
        ),
        (
            [
                "ingest",
                "--source",
                "generic",
                "--dataset",
                "x",
                "--quiet-day",
                "2012-01-03..2011-12-23",
            ],
            "argument --quiet-day: quiet-day range '2012-01-03..2011-12-23' ends before it starts",
        ),
        (
            ["validate", "--volume-tolerance", "0.5"],
            "argument --volume-tolerance: volume tolerance must be a finite factor > 1",
        ),
        (
            ["ingest", "--source", "generic", "--dataset", "x", "--volume-tolerance", "three"],
            "argument --volume-tolerance: expects a factor > 1 such as 3, got 'three'",
        ),
    ],
    ids=["weekday", "reversed-range", "tolerance", "tolerance-not-a-number"],
)
def test_cli_refuses_bad_volume_options_before_reading_data(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from tools.cli import main

    with pytest.raises(SystemExit) as exited:
        main(argv)

    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_volume_options_given_at_ingest_are_stored_for_later_validate_runs(
    tables: Tables, home: Paths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tools.cli import main
    from training.stages import read_meta
    from training.tables import write_tables

    write_tables(_calendar_tables(tables, _calendar_days()), tmp_path / "logs")
    ingest = ["ingest", "--source", "generic", "--path", str(tmp_path / "logs")]

    assert main([*ingest, "--dataset", "shop-undeclared"]) == 2
    assert "volume_anomaly — 2011-12-23 (Fri)" in capsys.readouterr().err

    declared = ["--quiet-day", CHRISTMAS, "--closed-weekday", "Saturday"]
    assert main([*ingest, "--dataset", "shop", *declared, "--volume-tolerance", "2.5"]) == 0
    meta = read_meta(home, "shop")
    assert (meta["quiet_days"], meta["closed_weekdays"], meta["volume_tolerance"]) == (
        [CHRISTMAS],
        ["sat"],
        2.5,
    )

    capsys.readouterr()
    assert main(["validate", "--dataset", "shop"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["volume"] == {
        "quiet_days": [CHRISTMAS],
        "closed_weekdays": ["sat"],
        "volume_tolerance": 2.5,
    }
    assert main(["validate", "--dataset", "shop", "--volume-tolerance", "1.05"]) == 2
    assert "outside 1/1.05x..1.05x" in capsys.readouterr().err
    assert read_meta(home, "shop")["volume_tolerance"] == 2.5  # validate stores nothing


@pytest.mark.parametrize("shuffled", [False, True])
def test_rows_by_id_finds_every_logged_id_and_only_those(shuffled: bool) -> None:
    """The impressions lookup every stage joins its events through: a binary search, over a
    sort order when the log is not in id order, never a hash table of every impression."""
    from training.tables import RowsById

    rng = np.random.default_rng(3)
    ids = np.unique(rng.integers(0, 10**12, size=5000))
    if shuffled:
        ids = rng.permutation(ids)
    wanted = np.concatenate([rng.choice(ids, 300), [-1, 10**12 + 5], ids[:1]])
    rows = RowsById(ids)(wanted)
    found = rows >= 0
    assert found.tolist() == [True] * 300 + [False, False, True]
    assert np.array_equal(ids[rows[found]], wanted[found])
    assert RowsById(np.array([], dtype=np.int64))(wanted).tolist() == [-1] * len(wanted)
