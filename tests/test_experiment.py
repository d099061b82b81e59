"""A/B experiment statistics: hand-computed tests, CUPED on planted data, A/A false-positive
rates (and the inflated one of a page-level analysis that ignores the user), power, guardrails
and the report."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from training import experiment as E

Z = stats.norm.ppf(0.975)


def _users(arms: dict[str, list[tuple[int, int, float, int]]], pre: float = 0.0) -> pd.DataFrame:
    """Users from (sessions, orders, gmv, carts) per arm."""
    rows = [
        {"arm": arm, "sessions": s, "orders": o, "gmv": g, "carts": c, "pre_gmv": pre}
        for arm, us in arms.items()
        for s, o, g, c in us
    ]
    out = pd.DataFrame(rows)
    out.insert(0, "user_id", np.arange(len(out), dtype=np.int64))
    return out


def _market(n: int, seed: int, arms: tuple[str, ...] = ("control",), lift: float = 0.0):
    """Lognormal GMV with ~70 % zeros, correlated with the pre-period's through the user's
    taste and budget; ``lift`` scales the treatment arm's GMV."""
    rng = np.random.default_rng(seed)
    arm = rng.choice(arms, n)
    taste, spend = rng.beta(0.6, 1.4, n), rng.lognormal(3.5, 1.0, n)  # the user, both periods
    buys = rng.random(n) < taste
    gmv = np.where(buys, spend, 0.0) * np.where(arm == "treatment", 1 + lift, 1.0)
    sessions = 1 + rng.poisson(5, n)
    return pd.DataFrame(
        {
            "user_id": np.arange(n, dtype=np.int64),
            "arm": arm,
            "sessions": sessions,
            "orders": np.where(buys, 1 + rng.poisson(0.5, n), 0),
            "gmv": gmv,
            "carts": rng.binomial(sessions, 0.1),
            "pre_gmv": spend * rng.lognormal(0, 0.3, n) * (rng.random(n) < taste),
        }
    )


def _pages(n_users: int, seed: int, arms: tuple[str, ...] = ("control",), **treatment):
    """About ten pages per user; a user's pages share the user's taste for new sellers, so
    they are strongly correlated. ``treatment`` multiplies page columns of the treatment arm."""
    rng = np.random.default_rng(seed)
    per = 1 + rng.poisson(9, n_users)
    uid = np.repeat(np.arange(n_users, dtype=np.int64), per)
    arm = np.repeat(rng.choice(arms, n_users), per)
    taste = rng.beta(2, 8, n_users)[uid]
    out = pd.DataFrame(
        {
            "user_id": uid,
            "arm": arm,
            "latency_ms": rng.lognormal(4, 0.4, len(uid)) * (1 + taste),
            "error": rng.random(len(uid)) < 0.01,
            "new_seller_share": np.clip(taste + rng.normal(0, 0.05, len(uid)), 0, 1),
            "category_diversity": np.clip(0.6 + rng.normal(0, 0.05, len(uid)), 0, 1),
        }
    )
    for column, factor in treatment.items():
        out.loc[out["arm"] == "treatment", column] *= factor
    return out


# --- known values -----------------------------------------------------------------------------
def test_compare_of_a_per_user_mean_is_the_hand_computed_welch_test():
    users = _users(
        {
            "c": [(1, 0, 0.0, 0), (1, 1, 10.0, 0), (1, 1, 20.0, 0)],
            "t": [(1, 1, 10.0, 0), (1, 1, 20.0, 0), (1, 1, 30.0, 0), (1, 1, 40.0, 0)],
        }
    )
    r = E.compare(users, E.GMV_PER_USER, "c", "t")
    # means 10 and 25; variances 100 and 500/3; se = sqrt(100/3 + 500/12) = sqrt(75)
    s0, s1 = 100 / 3, 500 / 12
    df = 75**2 / (s0**2 / 2 + s1**2 / 3)
    half = stats.t.ppf(0.975, df) * math.sqrt(75)
    assert r["control_mean"] == pytest.approx(10.0)
    assert r["treatment_mean"] == pytest.approx(25.0)
    assert r["estimate"] == pytest.approx(15.0)
    assert r["relative"] == pytest.approx(1.5)
    assert r["se"] == pytest.approx(math.sqrt(75))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((15 - half, 15 + half))
    welch = stats.ttest_ind([10, 20, 30, 40], [0, 10, 20], equal_var=False)
    assert r["p_value"] == pytest.approx(welch.pvalue)
    assert r["test"] == "Welch t"


def test_delta_method_se_of_a_ratio_metric_equals_the_direct_formula():
    c = [(2, 0, 0.0, 1), (3, 0, 0.0, 2), (1, 0, 0.0, 0), (4, 0, 0.0, 3)]
    t = [(1, 0, 0.0, 1), (5, 0, 0.0, 1), (2, 0, 0.0, 2)]
    r = E.compare(_users({"c": c, "t": t}), E.ADD_TO_CART_RATE, "c", "t")

    def ratio_and_var(us):  # carts / sessions; var(R) = var(Y - R N) / (n mean(N)^2)
        y = [u[3] for u in us]
        d = [u[0] for u in us]
        n, ratio = len(us), sum(y) / sum(d)
        resid = [yi - ratio * di for yi, di in zip(y, d, strict=True)]
        mean_resid = sum(resid) / n
        var_resid = sum((e - mean_resid) ** 2 for e in resid) / (n - 1)
        return ratio, var_resid / (n * (sum(d) / n) ** 2)

    r0, v0 = ratio_and_var(c)
    r1, v1 = ratio_and_var(t)
    assert (r0, r1) == (6 / 10, 4 / 8)  # sum over sum, not a mean of per-user ratios
    assert r["estimate"] == pytest.approx(r1 - r0)
    assert r["se"] == pytest.approx(math.sqrt(v0 + v1))
    assert r["ci_high"] - r["estimate"] == pytest.approx(Z * math.sqrt(v0 + v1))
    assert r["p_value"] == pytest.approx(2 * stats.norm.sf(abs(r1 - r0) / math.sqrt(v0 + v1)))


def test_metric_values_per_user_and_errors_name_what_would_be_right():
    users = _users({"c": [(4, 2, 30.0, 1), (2, 0, 0.0, 0)]})
    m = E.metric_values(users)
    assert m[E.GMV_PER_USER].tolist() == [30.0, 0.0]
    assert m[E.CONVERSION].tolist() == [1.0, 0.0]
    assert m[E.ADD_TO_CART_RATE].tolist() == [0.25, 0.0]
    assert m[E.AVERAGE_ORDER_VALUE].iloc[0] == 15.0
    assert math.isnan(m[E.AVERAGE_ORDER_VALUE].iloc[1])
    with pytest.raises(ValueError, match="metric must be one of"):
        E.compare(users, "revenue", "c", "c")
    with pytest.raises(ValueError, match="arm 'x' has no rows; arms present: \\['c'\\]"):
        E.compare(users, E.GMV_PER_USER, "c", "x")


def test_srm_p_value_is_large_for_a_balanced_split_and_tiny_for_5200_4800():
    half = {"a": 0.5, "b": 0.5}
    assert E.srm_p_value({"a": 5000, "b": 5000}, half) == pytest.approx(1.0)
    p = E.srm_p_value({"a": 5200, "b": 4800}, half)
    assert p == pytest.approx(stats.chi2.sf(16.0, 1))  # 2 * 200**2 / 5000
    assert p < E.SRM_ALPHA
    assert E.srm_p_value({"a": 9010, "b": 990}, {"a": 90, "b": 10}) > 0.3
    with pytest.raises(ValueError, match="same arms"):
        E.srm_p_value({"a": 1}, half)


# --- CUPED ------------------------------------------------------------------------------------
def test_cuped_narrows_the_interval_both_cover_the_planted_effect_and_theta_is_the_slope():
    rng = np.random.default_rng(7)
    n, slope, effect = 10_000, 0.7, 3.0
    pre = rng.normal(100, 30, n)
    # corr(pre, gmv) = 21 / sqrt(21**2 + 21.4**2) ~ 0.7
    arm = np.where(rng.random(n) < 0.5, "control", "treatment")
    gmv = 20 + slope * pre + rng.normal(0, 21.4, n) + effect * (arm == "treatment")
    users = pd.DataFrame(
        {"user_id": np.arange(n), "arm": arm, "sessions": 1, "orders": 1, "gmv": gmv}
    )
    users["carts"], users["pre_gmv"] = 0, pre
    raw = E.compare(users, E.GMV_PER_USER, "control", "treatment")
    adj = E.cuped(users, E.GMV_PER_USER, "control", "treatment", covariate="pre_gmv")
    assert adj["ci_high"] - adj["ci_low"] < 0.8 * (raw["ci_high"] - raw["ci_low"])
    assert raw["ci_low"] < effect < raw["ci_high"]
    assert adj["ci_low"] < effect < adj["ci_high"]
    assert adj["theta"] == pytest.approx(slope, abs=0.03)
    assert adj["variance_reduction"] == pytest.approx(0.49, abs=0.05)  # rho**2
    assert adj["control_mean"] - adj["treatment_mean"] == pytest.approx(-adj["estimate"])


def test_cuped_with_a_covariate_unrelated_to_the_metric_changes_nothing_much():
    users = _market(4000, 3, ("control", "treatment"))
    users["pre_gmv"] = np.random.default_rng(3).normal(size=len(users))
    raw = E.compare(users, E.ADD_TO_CART_RATE, "control", "treatment")
    adj = E.cuped(users, E.ADD_TO_CART_RATE, "control", "treatment")
    assert adj["estimate"] == pytest.approx(raw["estimate"], abs=0.1 * raw["se"])
    assert adj["se"] == pytest.approx(raw["se"], rel=0.02)  # the linearised delta method
    assert adj["variance_reduction"] < 0.01


# --- A/A --------------------------------------------------------------------------------------
def test_aa_rejects_about_alpha_of_random_resplits_of_the_control_arm():
    # seeds 0..29 of this data put 29 of 30 rates in [3 %, 7 %] (the binomial spread of 400)
    users = _market(4000, 6)
    r = E.aa_false_positive_rate(users, E.GMV_PER_USER, splits=400, seed=6, arm="control")
    assert 0.03 <= r["false_positive_rate"] <= 0.07
    assert r["within_target"]
    assert (r["target_low"], r["target_high"]) == (0.03, 0.07)  # exactly: 6 / 200 is in
    assert r["splits"] == 400 and r["users"] == 4000
    assert r["ci_low"] < r["false_positive_rate"] < r["ci_high"]


def test_aa_on_pages_clustered_by_user_holds_alpha_and_ignoring_the_user_does_not():
    pages = _pages(2000, 1)
    clustered = E.page_aa_false_positive_rate(pages, "new_seller_share", splits=400, seed=1)
    naive = E.page_aa_false_positive_rate(
        pages, "new_seller_share", clustered=False, splits=400, seed=1
    )
    assert 0.03 <= clustered["false_positive_rate"] <= 0.07
    assert naive["false_positive_rate"] > 0.2
    assert not naive["within_target"]


# --- power ------------------------------------------------------------------------------------
def test_mde_shrinks_as_one_over_sqrt_n_and_required_users_inverts_it():
    mde = E.power_mde(1.0, 100)
    assert mde == pytest.approx((Z + stats.norm.ppf(0.8)) * math.sqrt(2 / 100))
    assert E.power_mde(1.0, 400) == pytest.approx(mde / 2)
    assert E.power_mde(3.0, 10_000) == pytest.approx(3 * mde / 10)
    for n in (100, 2_500, 40_000):
        assert E.required_users(2.0, E.power_mde(2.0, n)) in (n, n + 1)
    assert E.power_mde(1.0, 100, variance_reduction=0.5) == pytest.approx(mde * math.sqrt(0.5))
    assert E.required_users(1.0, mde, variance_reduction=0.5) in (50, 51)


# --- guardrails -------------------------------------------------------------------------------
def test_guardrails_flag_slower_pages_and_fewer_new_sellers_but_not_noise():
    quiet = E.guardrails(_pages(1500, 2, ("control", "treatment")), "control", "treatment")
    assert not quiet["breached"]
    change = quiet["changes"]["new_seller_share"]
    assert change["ci_low"] < 0 < change["ci_high"]
    assert change["ci_method"] == "delta method (clustered by user)"

    pages = _pages(1500, 2, ("control", "treatment"), latency_ms=1.5, new_seller_share=0.5)
    g = E.guardrails(pages, "control", "treatment")
    assert set(g["arms"]["control"]) >= {"latency_p50_ms", "latency_p99_ms", "error_rate"}
    p99 = g["changes"]["latency_p99_ms"]
    assert p99["relative"] == pytest.approx(0.5, abs=0.1)
    assert 0 < p99["ci_low"] < p99["estimate"] < p99["ci_high"]
    assert p99["breached"] and g["changes"]["new_seller_share"]["breached"]
    assert not g["changes"]["category_diversity"]["breached"]
    assert not g["changes"]["latency_p50_ms"]["breached"]  # no rule
    assert g["breached"]


def test_a_guardrail_rule_compares_relative_or_absolute_changes_the_worse_way():
    latency = E.Guardrail("latency_p99_ms", "up", 0.20, relative=True)
    assert latency.breached(100.0, 121.0) and not latency.breached(100.0, 119.0)
    assert not latency.breached(100.0, 50.0)
    errors = E.Guardrail("error_rate", "up", 0.005, relative=False)
    assert errors.breached(0.010, 0.016) and not errors.breached(0.010, 0.014)
    share = E.Guardrail("new_seller_share", "down", 0.20, relative=True)
    assert share.breached(0.10, 0.07) and not share.breached(0.10, 0.09)


# --- analyze and report -----------------------------------------------------------------------
def test_analyze_and_write_report_produce_every_key_and_file(tmp_path: Path):
    users = _market(4000, 5, ("control", "treatment"), lift=0.10)
    pages = _pages(4000, 5, ("control", "treatment"))
    shares = {"control": 0.5, "treatment": 0.5}
    result = E.analyze(
        users,
        pages,
        control="control",
        treatment="treatment",
        expected_shares=shares,
        aa_splits=50,
        planned_mde={E.GMV_PER_USER: 2.0},
        extra={"offline": {"ndcg": 0.4}},
    )
    for arm in shares:
        assert set(result["arms"][arm]) == {"users", "sessions", *E.REPORTED_METRICS}
    assert sum(result["arms"][a]["users"] for a in shares) == 4000
    lift = result["lift"]
    for metric in E.REPORTED_METRICS:
        assert {"estimate", "relative", "ci_low", "ci_high", "p_value"} <= set(lift[metric])
        assert {"cuped_estimate", "cuped_ci_low", "cuped_ci_high", "variance_reduction"} <= set(
            lift[metric]
        )
    gmv = lift[E.GMV_PER_USER]
    assert gmv["variance_reduction"] > 0.1
    assert gmv["cuped_ci_high"] - gmv["cuped_ci_low"] < gmv["ci_high"] - gmv["ci_low"]
    assert not result["srm_flag"] and result["srm_p_value"] > E.SRM_ALPHA
    assert set(result["aa"]) >= {"false_positive_rate", "splits", "ci_low", "ci_high"}
    assert result["aa"]["splits"] == 50 and isinstance(result["aa"]["within_target"], bool)
    power = result["power"][E.GMV_PER_USER]
    assert power["mde_cuped"] < power["mde"]
    assert power["required_users_cuped"] < power["required_users"]
    assert not result["guardrails"]["breached"]
    assert result["offline"] == {"ndcg": 0.4}
    json.dumps(result, allow_nan=False)

    paths = E.write_report(result, tmp_path / "out")
    assert {p.name for p in paths.values()} == {
        "experiment.json",
        "experiment.md",
        "experiment.png",
    }
    assert json.loads(paths["json"].read_text())["lift"] == result["lift"]
    md = paths["md"].read_text()
    for heading in ("## Arms", "## Lift", "## Sample ratio", "## A/A", "## Power", "## Guardrails"):
        assert heading in md
    assert "latency_p99_ms" in md and "CUPED CI" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_flags_a_sample_ratio_mismatch_and_refuses_to_overwrite_its_keys():
    users = _market(3000, 6, ("control", "treatment"))
    users = users[~((users["arm"] == "treatment") & (users.index % 5 == 0))]  # lost 20 %
    analyze = functools.partial(
        E.analyze,
        control="control",
        treatment="treatment",
        expected_shares={"control": 0.5, "treatment": 0.5},
        aa_splits=20,
    )
    result = analyze(users, None)
    assert result["srm_flag"] and result["guardrails"] is None
    with pytest.raises(ValueError, match=r"overwrite .* \['lift'\]"):
        analyze(users, None, extra={"lift": 1})
    with pytest.raises(ValueError, match=r"arms \['holdout'\] missing from expected_shares"):
        analyze(users.assign(arm="holdout"), None)
