"""Tests of the monitoring checks: PSI's known values, then each check on synthetic frames —
nothing planted raises no flag, and one planted fault (a drifted feature, a skewed feature, a
stale view, miscalibrated predictions, a rescaled score) raises exactly its flag."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from contract.columns import ITEM_ID, REQUEST_ID
from feature_repo import schema as S
from training.monitor import (
    COVERAGE,
    SCORE,
    MonitorThresholds,
    calibration_drift,
    feature_drift,
    freshness,
    monitor_report,
    psi,
    score_drift,
    training_serving_skew,
    write_report,
)

pytestmark = pytest.mark.timeout(60)

N = 20_000
KEYS = [REQUEST_ID, ITEM_ID]
FEATURES = [
    "price",  # continuous, skewed
    "ctr_7d",  # continuous in (0, 1)
    "days_since_signup",  # continuous, non-negative
    "spend_30d",  # continuous, large: float32 rounding exceeds the absolute tolerance
    "clicks_30d",  # small counts: more distinct values than bins, heavy ties
    "impressions_7d",  # larger counts
    "shipping_days",  # integer codes, fewer distinct values than bins
    "seller_is_new",  # binary
    "in_stock",  # constant
]
T = MonitorThresholds()


def features_frame(seed: int, n: int = N) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            REQUEST_ID: np.arange(n) // 20,
            ITEM_ID: np.arange(n) % 20 + 1000,
            "price": rng.lognormal(3.0, 0.8, n).astype(np.float32),
            "ctr_7d": rng.beta(2.0, 60.0, n).astype(np.float32),
            "days_since_signup": rng.gamma(2.0, 200.0, n).astype(np.float32),
            "spend_30d": rng.lognormal(7.0, 1.0, n).astype(np.float32),
            "clicks_30d": rng.poisson(3.0, n),
            "impressions_7d": rng.poisson(80.0, n),
            "shipping_days": rng.integers(1, 8, n),
            "seller_is_new": (rng.random(n) < 0.1).astype(np.int64),
            "in_stock": np.ones(n, dtype=np.int64),
        }
    )


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return features_frame(seed=1)


@pytest.fixture(scope="module")
def serving() -> pd.DataFrame:
    return features_frame(seed=2)


def kinds_and_names(flags: list) -> list[tuple[str, str]]:
    return [(f["kind"], f["name"]) for f in flags]


# --- PSI known values --------------------------------------------------------------------


def test_psi_is_zero_for_identical_samples(reference: pd.DataFrame) -> None:
    for name in FEATURES:
        assert psi(reference[name].to_numpy(), reference[name].to_numpy()) == 0.0, name
    with_nan = np.array([1.0, np.nan, 2.0, 3.0, np.nan])
    assert psi(with_nan, with_nan) == 0.0
    words = np.array(["ios", "web", None, "ios"], dtype=object)
    assert psi(words, words) == 0.0


def test_psi_of_two_categories_by_hand() -> None:
    # 50/50 -> 75/25: 0.25 ln(0.75/0.5) + 0.25 ln(0.5/0.25) = 0.25 ln 3
    assert psi(np.array([1, 1, 2, 2]), np.array([1, 1, 1, 2])) == pytest.approx(
        0.25 * math.log(3.0), rel=1e-9
    )


def test_psi_of_quantile_buckets_by_hand() -> None:
    expected = np.arange(1.0, 101.0)  # quartile edges 25.75, 50.5, 75.25: 25 values each
    actual = np.repeat([10.0, 30.0, 60.0, 90.0], [10, 20, 30, 40])  # shares .1 .2 .3 .4
    by_hand = sum((a - 0.25) * math.log(a / 0.25) for a in (0.1, 0.2, 0.3, 0.4))
    assert by_hand == pytest.approx(0.228218, abs=1e-6)
    assert psi(expected, actual, bins=4) == pytest.approx(by_hand, rel=1e-9)


def test_psi_gives_missing_values_a_bucket_of_their_own() -> None:
    eps = 1e-4
    expected = np.array([1.0, 1.0, 2.0, 2.0])  # halves, no NaN (share eps)
    actual = np.array([1.0, 2.0, np.nan, np.nan])  # quarters, half NaN
    by_hand = 2 * (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.5 - eps) * math.log(0.5 / eps)
    assert psi(expected, actual, eps=eps) == pytest.approx(by_hand, rel=1e-9)


def test_psi_of_a_shifted_normal_matches_the_integral_over_its_deciles() -> None:
    rng = np.random.default_rng(0)
    shift = 0.5
    edges = stats.norm.ppf(np.linspace(0.0, 1.0, 11))
    shifted = np.diff(stats.norm.cdf(edges - shift))
    textbook = float(np.sum((shifted - 0.1) * np.log(shifted / 0.1)))
    assert 0.2 < textbook < shift**2  # binning loses some of the continuous J-divergence
    sample = psi(rng.normal(0.0, 1.0, 200_000), rng.normal(shift, 1.0, 200_000))
    assert sample == pytest.approx(textbook, abs=0.01)


def test_psi_on_a_constant_feature_flags_any_new_value() -> None:
    ones = np.ones(1000)
    assert psi(ones, ones) == 0.0
    assert psi(ones, np.full(1000, 2.0)) > 1.0


def test_psi_rejects_empty_samples() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        psi(np.array([]), np.ones(3))


# --- drift --------------------------------------------------------------------------------


def test_no_plant_no_drift(reference: pd.DataFrame, serving: pd.DataFrame) -> None:
    table, flags = feature_drift(reference, serving, FEATURES, T)
    assert flags == []
    assert list(table["feature"]) == FEATURES
    assert table["psi"].max() < 0.05
    assert not table["flagged"].any()


@pytest.mark.parametrize("planted", ["price", "clicks_30d", "days_since_signup"])
def test_one_drifted_feature_is_the_only_flag(
    reference: pd.DataFrame, serving: pd.DataFrame, planted: str
) -> None:
    drifted = serving.copy()
    drifted[planted] = drifted[planted] + reference[planted].std()
    table, flags = feature_drift(reference, drifted, FEATURES, T)
    assert kinds_and_names(flags) == [("drift", planted)]
    value = flags[0]["value"]
    assert value is not None and value > T.psi and flags[0]["threshold"] == T.psi
    row = table.set_index("feature").loc[planted]
    assert row["serving_mean"] - row["reference_mean"] == pytest.approx(
        reference[planted].std(), rel=0.1
    )


def test_drift_rejects_a_missing_feature(reference: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="lacks columns"):
        feature_drift(reference, reference.drop(columns="price"), FEATURES, T)


# --- score drift --------------------------------------------------------------------------


def test_score_drift_flags_doubled_scores() -> None:
    rng = np.random.default_rng(3)
    ref, srv = rng.beta(2.0, 30.0, N), rng.beta(2.0, 30.0, N)
    summary, flags = score_drift(ref, srv, T)
    assert flags == [] and summary["psi"] < 0.05 and not summary["flagged"]
    summary, flags = score_drift(ref, 2.0 * srv, T)
    assert kinds_and_names(flags) == [("score_drift", SCORE)]
    assert summary["serving_mean"] == pytest.approx(2.0 * summary["reference_mean"], rel=0.05)


# --- training-serving skew -----------------------------------------------------------------


def float32_roundtrip(frame: pd.DataFrame) -> pd.DataFrame:
    """The recomputation as the offline store holds it: every feature through float32, from
    float64 values, so served and recomputed differ by rounding only."""
    out = frame.copy()
    for name in FEATURES:
        out[name] = out[name].astype(np.float64).astype(np.float32).astype(np.float64)
    return out


@pytest.fixture(scope="module")
def served(serving: pd.DataFrame) -> pd.DataFrame:
    out = serving.copy()
    rng = np.random.default_rng(4)
    for name in ("price", "ctr_7d", "days_since_signup", "spend_30d"):  # off float32's grid
        out[name] = out[name].astype(np.float64) * (1 + rng.uniform(-1e-7, 1e-7, len(out)))
    return out


def test_float32_rounding_is_not_skew(served: pd.DataFrame) -> None:
    recomputed = float32_roundtrip(served)
    assert (recomputed["price"] != served["price"]).mean() > 0.5  # the rounding is there
    table, coverage, flags = training_serving_skew(served, recomputed, KEYS, FEATURES, T)
    assert flags == []
    assert (table["mismatch_share"] == 0).all() and (table["rows_compared"] == N).all()
    # the relative part of the tolerance is what keeps large values equal
    max_abs_diff = dict(zip(table["feature"], table["max_abs_diff"], strict=True))
    assert max_abs_diff["spend_30d"] > T.skew_atol
    assert table["example"].isna().all()
    assert coverage["coverage"] == 1.0 and coverage["unmatched_served_rows"] == 0


@pytest.mark.parametrize(
    ("planted", "recompute"),
    [
        ("price", lambda v: v * 1.01),  # a unit or currency-rate change
        ("days_since_signup", lambda v: v + 1),  # an off-by-one day
    ],
)
def test_one_skewed_feature_is_the_only_flag(served: pd.DataFrame, planted, recompute) -> None:
    recomputed = float32_roundtrip(served)
    recomputed[planted] = recompute(recomputed[planted])
    recomputed = recomputed.sample(frac=1.0, random_state=0)  # the join, not the order, pairs
    table, _, flags = training_serving_skew(served, recomputed, KEYS, FEATURES, T)
    assert kinds_and_names(flags) == [("skew", planted)]
    row = table.set_index("feature").loc[planted]
    assert row["mismatch_share"] > 0.9  # not 1: past 1,000 days a day is within 1e-3
    key = row["example"]
    assert set(key) == set(KEYS) and all(type(v) is int for v in key.values())
    at = served[(served[REQUEST_ID] == key[REQUEST_ID]) & (served[ITEM_ID] == key[ITEM_ID])]
    assert len(at) == 1


def test_skew_share_threshold_and_coverage(served: pd.DataFrame) -> None:
    recomputed = float32_roundtrip(served)
    few = recomputed.index[: int(0.005 * N)]  # 0.5 % of rows: below the 1 % share
    recomputed.loc[few, "clicks_30d"] += 1
    many = recomputed.index[: int(0.02 * N)]  # 2 %: above
    recomputed.loc[many, "impressions_7d"] += 1
    recomputed = recomputed.iloc[: int(0.9 * N)]  # 10 % of served rows never recomputed
    table, coverage, flags = training_serving_skew(served, recomputed, KEYS, FEATURES, T)
    assert sorted(kinds_and_names(flags)) == [("skew", COVERAGE), ("skew", "impressions_7d")]
    assert coverage["unmatched_served_rows"] == N - int(0.9 * N)
    assert coverage["coverage"] == pytest.approx(0.9)
    share = table.set_index("feature")["mismatch_share"]
    assert share["clicks_30d"] == pytest.approx(int(0.005 * N) / int(0.9 * N))


def test_skew_rejects_repeated_keys(served: pd.DataFrame) -> None:
    doubled = pd.concat([served, served.iloc[:3]])
    with pytest.raises(ValueError, match="repeated key"):
        training_serving_skew(served, doubled, KEYS, FEATURES, T)


# --- freshness ------------------------------------------------------------------------------

NOW = pd.Timestamp("2024-05-01 12:00", tz="UTC")


def test_one_stale_stream_view_is_the_only_flag() -> None:
    latest = {view: NOW - pd.Timedelta(days=3) for view in S.BATCH_VIEWS}  # within the TTL
    latest |= {view: NOW - pd.Timedelta(hours=1) for view in S.STREAM_VIEWS}
    table, flags = freshness(latest, NOW, T)
    assert flags == []
    assert table.set_index("view").loc[S.USER_PROFILE, "age_hours"] == pytest.approx(72.0)

    latest[S.ITEM_INVENTORY] = NOW - pd.Timedelta(days=3)
    table, flags = freshness(latest, NOW, T)
    assert flags == [
        {"kind": "freshness", "name": S.ITEM_INVENTORY, "value": 72.0, "threshold": 24.0}
    ]


def test_freshness_limits_are_configurable_and_a_missing_view_is_stale() -> None:
    latest = {S.ITEM_STATS: NOW - pd.Timedelta(days=2), S.USER_RECENT_ACTIVITY: None}
    thresholds = MonitorThresholds(max_age_days={S.ITEM_STATS: 1.0})
    _, flags = freshness(latest, NOW, thresholds)
    assert kinds_and_names(flags) == [
        ("freshness", S.ITEM_STATS),
        ("freshness", S.USER_RECENT_ACTIVITY),
    ]
    assert flags[1]["value"] is None
    with pytest.raises(ValueError, match="no max age"):
        freshness({"no_such_view": NOW}, NOW, T)


# --- calibration -----------------------------------------------------------------------------


def test_calibration_flags_overconfident_predictions() -> None:
    rng = np.random.default_rng(5)
    p = rng.beta(2.0, 8.0, 50_000)
    realised = (rng.random(len(p)) < p).astype(np.int64)
    table, ece, flags = calibration_drift(p, realised, T)
    assert flags == []
    assert len(table) == 10 and table["n"].sum() == len(p)
    assert ece < 0.01

    table, ece, flags = calibration_drift(np.minimum(1.5 * p, 1.0), realised, T)
    assert flags and {f["kind"] for f in flags} == {"calibration"}
    assert ece > 0.05
    top = table.iloc[-1]
    assert top["flagged"] and top["predicted_mean"] > top["realised_rate"]


def test_calibration_rejects_non_binary_outcomes() -> None:
    with pytest.raises(ValueError, match="0/1"):
        calibration_drift(np.array([0.1, 0.2]), np.array([0.0, 0.5]), T)


# --- report -----------------------------------------------------------------------------------


def test_report_is_strict_json_and_marks_flags(
    reference: pd.DataFrame, serving: pd.DataFrame, served: pd.DataFrame, tmp_path: Path
) -> None:
    drifted = serving.copy()
    drifted["price"] = drifted["price"] + reference["price"].std()
    drifted["ctr_7d"] = np.nan  # no serving mean: NaN must become null
    recomputed = float32_roundtrip(served)
    recomputed["price"] *= 1.01
    rng = np.random.default_rng(6)
    p = rng.beta(2.0, 8.0, 5_000)
    result = monitor_report(
        drift=feature_drift(reference, drifted, FEATURES, T),
        score=score_drift(p, 2.0 * p, T),
        skew=training_serving_skew(served, recomputed, KEYS, FEATURES, T),
        fresh=freshness({S.ITEM_INVENTORY: NOW - pd.Timedelta(days=3), S.ITEM_STATS: None}, NOW, T),
        calibration=calibration_drift(p, (rng.random(len(p)) < p).astype(int), T),
        thresholds=T,
    )
    text = json.dumps(result, allow_nan=False)
    assert json.loads(text) == result
    assert sorted(kinds_and_names(result["flags"])) == [
        ("drift", "ctr_7d"),
        ("drift", "price"),
        ("freshness", S.ITEM_INVENTORY),
        ("freshness", S.ITEM_STATS),
        ("score_drift", SCORE),
        ("skew", "price"),
    ]
    ctr = next(r for r in result["drift"]["features"] if r["feature"] == "ctr_7d")
    assert ctr["serving_mean"] is None

    paths = write_report(result, tmp_path)
    assert sorted(paths) == ["json", "md", "png"]
    assert json.loads(paths["json"].read_text()) == result
    markdown = paths["md"].read_text()
    price_rows = [line for line in markdown.splitlines() if line.startswith("| **FLAG** | price")]
    assert len(price_rows) == 2  # drift and skew
    assert "|  | clicks_30d" in markdown
    assert paths["png"].stat().st_size > 0
