"""The statistics of an online A/B experiment: lifts with confidence intervals, CUPED, sample
ratio mismatch, an A/A false-positive check, power, and guardrails; pure functions over two
DataFrames, with ``write_report`` turning ``analyze``'s dict into JSON, Markdown and a plot.

The unit of randomisation, and so of analysis, is the user. A user's sessions and pages are
correlated (the same person, tastes and budget), so treating pages as independent draws
understates the variance and inflates false positives; ``page_aa_false_positive_rate`` with
``clustered=False`` shows by how much. Every metric is therefore sum(Y) / sum(N) over users:
N = 1 for a per-user mean (a Welch test), a count for a ratio metric such as carts per session
(the delta method, which is the standard error clustered by user).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from contract import columns as C

# --- inputs -----------------------------------------------------------------------------------
# users: one row per user in the experiment
USER_ID = C.USER_ID  # int64
ARM = "arm"  # str, the arm the user was assigned to
SESSIONS = "sessions"  # int, feeds served in the experiment period
ORDERS = "orders"  # int, orders placed
GMV = "gmv"  # float, money spent in the experiment period
CARTS = "carts"  # int, add-to-carts
PRE_GMV = "pre_gmv"  # float, the user's GMV in a pre-period: the CUPED covariate (0 if none)
PRE_SESSIONS = "pre_sessions"  # int, optional: feeds served in the pre-period
USER_COLUMNS = (USER_ID, ARM, SESSIONS, ORDERS, GMV, CARTS)

# pages: one row per served feed
LATENCY_MS = "latency_ms"  # float
ERROR = "error"  # bool, the feed failed or fell back
NEW_SELLER_SHARE = "new_seller_share"  # float 0..1, share of the page's items from new sellers
CATEGORY_DIVERSITY = "category_diversity"  # float 0..1, distinct categories / items on the page
PAGE_COLUMNS = (USER_ID, ARM, LATENCY_MS, ERROR, NEW_SELLER_SHARE, CATEGORY_DIVERSITY)

# --- metrics ----------------------------------------------------------------------------------
GMV_PER_USER = "gmv_per_user"
CONVERSION = "conversion"
ADD_TO_CART_RATE = "add_to_cart_rate"
AVERAGE_ORDER_VALUE = "average_order_value"
PRE_GMV_PER_USER = "pre_gmv_per_user"  # cannot move with the treatment: an A/A metric


@dataclass(frozen=True)
class Metric:
    """sum(numerator) / sum(denominator) over users; without a denominator, a per-user mean."""

    numerator: Callable[[pd.DataFrame], pd.Series]
    denominator: str | None = None

    @property
    def is_ratio(self) -> bool:
        return self.denominator is not None


METRICS: dict[str, Metric] = {
    GMV_PER_USER: Metric(lambda u: u[GMV]),
    CONVERSION: Metric(lambda u: (u[ORDERS] > 0).astype(float)),
    ADD_TO_CART_RATE: Metric(lambda u: u[CARTS], SESSIONS),
    # over users with orders: users without contribute 0 / 0, i.e. nothing to either sum
    AVERAGE_ORDER_VALUE: Metric(lambda u: u[GMV], ORDERS),
    PRE_GMV_PER_USER: Metric(lambda u: u[PRE_GMV]),
}
REPORTED_METRICS = (GMV_PER_USER, CONVERSION, ADD_TO_CART_RATE, AVERAGE_ORDER_VALUE)

SRM_ALPHA = 0.001  # a sample ratio mismatch this unlikely means the split itself is broken
AA_TARGET_HALF_WIDTH = 0.02  # an A/A false-positive rate within alpha +- this is healthy


# --- the test ---------------------------------------------------------------------------------
class _Arm(NamedTuple):
    """Per group (arrays, one entry per group): users, sum(Y)/sum(N), and the per-user
    variance of the linearised value (Y - R N) / mean(N), so var(R) ~ var / n."""

    n: np.ndarray
    mean: np.ndarray
    var: np.ndarray


def _moments(y: np.ndarray, d: np.ndarray, w: np.ndarray) -> _Arm:
    """The delta-method moments of the users selected by each row of the 0/1 matrix ``w``."""
    n = w.sum(axis=1)
    sy, sd = w @ y, w @ d
    syy, sdd, syd = w @ (y * y), w @ (d * d), w @ (y * d)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = sy / sd
        var_y = (syy - sy * sy / n) / (n - 1)
        var_d = (sdd - sd * sd / n) / (n - 1)
        cov = (syd - sy * sd / n) / (n - 1)
        dbar = sd / n
        var = np.maximum(var_y - 2 * r * cov + r * r * var_d, 0.0) / (dbar * dbar)
    return _Arm(n, r, var)


def _test(a0: _Arm, a1: _Arm, alpha: float, welch: bool) -> dict[str, np.ndarray]:
    """Treatment - control with a t (Welch-Satterthwaite df) or normal reference."""
    with np.errstate(divide="ignore", invalid="ignore"):
        s0, s1 = a0.var / a0.n, a1.var / a1.n
        se = np.sqrt(s0 + s1)
        df = (
            (s0 + s1) ** 2 / (s0**2 / (a0.n - 1) + s1**2 / (a1.n - 1))
            if welch
            else np.full_like(se, np.inf)
        )
        est = a1.mean - a0.mean
        half = stats.t.ppf(1 - alpha / 2, df) * se
        p = 2 * stats.t.sf(np.abs(est) / se, df)
    return {"estimate": est, "se": se, "ci_low": est - half, "ci_high": est + half, "p": p}


def _require(frame: pd.DataFrame, columns: tuple[str, ...], name: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} is missing columns {missing}; expected at least {list(columns)}")


def _metric(metric: str) -> Metric:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    return METRICS[metric]


def _arm_mask(frame: pd.DataFrame, arm: str) -> np.ndarray:
    mask = (frame[ARM] == arm).to_numpy()
    if not mask.any():
        raise ValueError(f"arm {arm!r} has no rows; arms present: {sorted(frame[ARM].unique())}")
    return mask


def _yd(users: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray, bool]:
    m = _metric(metric)
    y = m.numerator(users).to_numpy(dtype=float)
    d = np.ones_like(y) if m.denominator is None else users[m.denominator].to_numpy(dtype=float)
    return y, d, m.is_ratio


def _compare_yd(
    y: np.ndarray, d: np.ndarray, m0: np.ndarray, m1: np.ndarray, alpha: float, ratio: bool
) -> dict[str, Any]:
    a0 = _moments(y, d, m0[None, :].astype(float))
    a1 = _moments(y, d, m1[None, :].astype(float))
    t = _test(a0, a1, alpha, welch=not ratio)
    c, tr = float(a0.mean[0]), float(a1.mean[0])
    est = float(t["estimate"][0])
    return {
        "control_mean": c,
        "treatment_mean": tr,
        "estimate": est,
        "relative": est / c if c else math.nan,
        "se": float(t["se"][0]),
        "ci_low": float(t["ci_low"][0]),
        "ci_high": float(t["ci_high"][0]),
        "p_value": float(t["p"][0]),
        "n_control": int(a0.n[0]),
        "n_treatment": int(a1.n[0]),
        "test": "delta method (clustered by user)" if ratio else "Welch t",
    }


def metric_values(users: pd.DataFrame) -> pd.DataFrame:
    """Per user: gmv_per_user, conversion (0/1), add_to_cart_rate = carts / sessions and
    average_order_value = gmv / orders (NaN without sessions or orders). An arm's value of a
    ratio metric is sum / sum over its users, not the mean of these per-user ratios."""
    _require(users, USER_COLUMNS, "users")
    out = users[[USER_ID, ARM]].copy()
    for name in REPORTED_METRICS:
        y, d, _ = _yd(users, name)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[name] = np.where(d > 0, y / np.where(d > 0, d, 1.0), np.nan)
    return out


def compare(
    users: pd.DataFrame, metric: str, control: str, treatment: str, *, alpha: float = 0.05
) -> dict[str, Any]:
    """Treatment - control on a metric of ``METRICS``: control_mean, treatment_mean, estimate
    (absolute), relative (estimate / control_mean), se, ci_low, ci_high, p_value, n_control,
    n_treatment, test. A per-user mean is a Welch t-test; a ratio metric uses the delta method
    over users (normal reference)."""
    y, d, ratio = _yd(users, metric)
    m0, m1 = _arm_mask(users, control), _arm_mask(users, treatment)
    return {"metric": metric, **_compare_yd(y, d, m0, m1, alpha, ratio)}


def cuped(
    users: pd.DataFrame,
    metric: str,
    control: str,
    treatment: str,
    *,
    covariate: str = PRE_GMV,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """``compare`` on Y_adj = Y - theta (X - mean X), theta = cov(Y, X) / var(X) pooled over
    both arms, X a pre-period covariate the treatment cannot move. A ratio metric is first
    linearised per arm (Y - R N) / mean(N) + R, whose mean is R and whose variance is the
    delta method's. Adds theta and variance_reduction = 1 - var(Y_adj) / var(Y)."""
    _require(users, (covariate,), "users")
    y, d, ratio = _yd(users, metric)
    x = users[covariate].to_numpy(dtype=float)
    if not np.isfinite(x).all():
        raise ValueError(f"covariate {covariate!r} must be finite for every user (0 if none)")
    m0, m1 = _arm_mask(users, control), _arm_mask(users, treatment)
    both = m0 | m1
    lin = np.full_like(y, np.nan)
    for m in (m0, m1):
        r, dbar = y[m].sum() / d[m].sum(), d[m].mean()
        lin[m] = r + (y[m] - r * d[m]) / dbar
    xs, ls = x[both], lin[both]
    var_x = xs.var(ddof=1)
    theta = float(np.cov(ls, xs)[0, 1] / var_x) if var_x > 0 else 0.0
    adj = lin - theta * (x - xs.mean())
    out = _compare_yd(np.nan_to_num(adj), np.ones_like(adj), m0, m1, alpha, ratio)
    var_y = ls.var(ddof=1)
    out["test"] = f"CUPED on {covariate}, " + out["test"]
    return {
        "metric": metric,
        **out,
        "covariate": covariate,
        "theta": theta,
        "variance_reduction": float(1 - adj[both].var(ddof=1) / var_y) if var_y > 0 else 0.0,
    }


def srm_p_value(counts: Mapping[str, int], expected_shares: Mapping[str, float]) -> float:
    """Chi-square goodness of fit of users per arm to the planned shares (normalised to sum to
    one). Below ``SRM_ALPHA`` the assignment or logging is broken and no lift can be trusted."""
    if set(counts) != set(expected_shares):
        raise ValueError(
            f"counts and expected_shares must name the same arms, got {sorted(counts)} "
            f"and {sorted(expected_shares)}"
        )
    arms = sorted(counts)
    observed = np.array([counts[a] for a in arms], dtype=float)
    shares = np.array([expected_shares[a] for a in arms], dtype=float)
    if (shares <= 0).any():
        raise ValueError(f"expected_shares must all be > 0, got {dict(expected_shares)}")
    expected = observed.sum() * shares / shares.sum()
    return float(stats.chisquare(observed, expected).pvalue)


# --- A/A --------------------------------------------------------------------------------------
def _half_splits(n: int, splits: int, rng: np.random.Generator) -> np.ndarray:
    """``splits`` x ``n`` 0/1 rows, each a random half of the n units."""
    ranks = rng.random((splits, n)).argsort(axis=1).argsort(axis=1)
    return (ranks < n // 2).astype(float)


def _fpr_summary(p: np.ndarray, alpha: float, **about: Any) -> dict[str, Any]:
    k, n = int((p < alpha).sum()), len(p)
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95)
    fpr = k / n
    # rounded: 0.05 - 0.02 is 0.030000000000000002 in floating point, and 6 / 200 is 0.03
    low = round(alpha - AA_TARGET_HALF_WIDTH, 12)
    high = round(alpha + AA_TARGET_HALF_WIDTH, 12)
    return {
        **about,
        "false_positive_rate": fpr,
        "rejections": k,
        "splits": n,
        "alpha": alpha,
        "ci_low": float(ci.low),
        "ci_high": float(ci.high),
        "target_low": low,
        "target_high": high,
        "within_target": bool(low <= fpr <= high),
    }


def aa_false_positive_rate(
    users: pd.DataFrame,
    metric: str,
    *,
    splits: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
    arm: str | None = None,
) -> dict[str, Any]:
    """Re-split the users of ``arm`` (all users when None: then use a pre-period metric such
    as ``pre_gmv_per_user``, which no arm can move) 50/50 at random ``splits`` times and run
    ``compare``'s test on each split. A sound test rejects about ``alpha`` of the time; the
    result has the rate, a Clopper-Pearson 95 % interval and ``within_target`` (the rate in
    alpha +- 2 pp; at alpha 0.05 the binomial sd is 1.5 pp over 200 splits and 1.1 pp over 400,
    so a sound test misses the band about one time in five at 200 and one in fifteen at 400)."""
    frame = users if arm is None else users[_arm_mask(users, arm)]
    y, d, ratio = _yd(frame, metric)
    w = _half_splits(len(y), splits, np.random.default_rng(seed))
    t = _test(_moments(y, d, 1 - w), _moments(y, d, w), alpha, welch=not ratio)
    return _fpr_summary(t["p"], alpha, metric=metric, arm=arm, users=len(y))


# --- pages ------------------------------------------------------------------------------------
def page_sums(pages: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per user: the sum and sum of squares of a page column and the number of pages."""
    _require(pages, (USER_ID, ARM, column), "pages")
    v = pages[column].astype(float)
    g = pd.DataFrame({USER_ID: pages[USER_ID], ARM: pages[ARM], "sum": v, "sumsq": v * v})
    out = g.groupby([USER_ID, ARM], sort=False).agg(
        sum=("sum", "sum"), sumsq=("sumsq", "sum"), pages=("sum", "size")
    )
    return out.reset_index()


def _naive_moments(s: pd.DataFrame, w: np.ndarray) -> _Arm:
    """Every page an independent draw: the (wrong) analysis that ignores the user."""
    n, sy = w @ s["pages"].to_numpy(float), w @ s["sum"].to_numpy(float)
    sq = w @ s["sumsq"].to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = sy / n
        var = np.maximum(sq - n * mean * mean, 0.0) / (n - 1)
    return _Arm(n, mean, var)


def _page_arms(s: pd.DataFrame, w0: np.ndarray, w1: np.ndarray, clustered: bool) -> list[_Arm]:
    if not clustered:
        return [_naive_moments(s, w0), _naive_moments(s, w1)]
    y, d = s["sum"].to_numpy(float), s["pages"].to_numpy(float)
    return [_moments(y, d, w0), _moments(y, d, w1)]


def compare_pages(
    pages: pd.DataFrame,
    column: str,
    control: str,
    treatment: str,
    *,
    alpha: float = 0.05,
    clustered: bool = True,
) -> dict[str, Any]:
    """Treatment - control on the per-page mean of ``column``: a ratio metric, sum over a
    user's pages / their number, with the delta method over users. ``clustered=False`` treats
    pages as independent (Welch over pages): too-narrow intervals, kept to show why."""
    s = page_sums(pages, column)
    m0 = _arm_mask(s, control)[None, :].astype(float)
    m1 = _arm_mask(s, treatment)[None, :].astype(float)
    a0, a1 = _page_arms(s, m0, m1, clustered)
    t = _test(a0, a1, alpha, welch=not clustered)
    c, est = float(a0.mean[0]), float(t["estimate"][0])
    return {
        "metric": column,
        "control_mean": c,
        "treatment_mean": float(a1.mean[0]),
        "estimate": est,
        "relative": est / c if c else math.nan,
        "se": float(t["se"][0]),
        "ci_low": float(t["ci_low"][0]),
        "ci_high": float(t["ci_high"][0]),
        "p_value": float(t["p"][0]),
        "test": "delta method (clustered by user)" if clustered else "Welch over pages (naive)",
    }


def page_aa_false_positive_rate(
    pages: pd.DataFrame,
    column: str,
    *,
    clustered: bool = True,
    splits: int = 200,
    alpha: float = 0.05,
    seed: int = 0,
    arm: str | None = None,
) -> dict[str, Any]:
    """``aa_false_positive_rate`` for a page column: users (the randomisation unit) are
    re-split, and each split analysed clustered by user or, with ``clustered=False``, as if
    pages were independent, which over-rejects as much as the pages of a user are alike."""
    frame = pages if arm is None else pages[_arm_mask(pages, arm)]
    s = page_sums(frame, column)
    w = _half_splits(len(s), splits, np.random.default_rng(seed))
    a0, a1 = _page_arms(s, 1 - w, w, clustered)
    t = _test(a0, a1, alpha, welch=not clustered)
    return _fpr_summary(t["p"], alpha, metric=column, arm=arm, users=len(s), clustered=clustered)


# --- power ------------------------------------------------------------------------------------
def _z_sum(alpha: float, power: float) -> float:
    return float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power))


def power_mde(
    sd: float,
    n_per_arm: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    variance_reduction: float = 0.0,
) -> float:
    """The smallest absolute effect a two-sided two-sample test of ``n_per_arm`` users per
    arm detects with probability ``power``; CUPED's variance reduction shrinks sd by
    sqrt(1 - variance_reduction). A ratio metric's sd is that of its linearised value."""
    if n_per_arm <= 0:
        raise ValueError(f"n_per_arm must be > 0, got {n_per_arm}")
    return _z_sum(alpha, power) * sd * math.sqrt(2 * (1 - variance_reduction) / n_per_arm)


def required_users(
    sd: float,
    mde: float,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    variance_reduction: float = 0.0,
) -> int:
    """Users per arm for ``power_mde(sd, n) <= mde``."""
    if mde <= 0:
        raise ValueError(f"mde must be > 0, got {mde}")
    return math.ceil(2 * (1 - variance_reduction) * (_z_sum(alpha, power) * sd / mde) ** 2)


# --- guardrails -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Guardrail:
    """Breached when the treatment moves ``metric`` the ``worse`` way by more than ``limit``
    (relative to control, or absolute) on the point estimate."""

    metric: str
    worse: Literal["up", "down"]
    limit: float
    relative: bool

    def breached(self, control: float, treatment: float) -> bool:
        change = treatment - control
        if self.relative:
            if control == 0:
                return False
            change /= abs(control)
        return change > self.limit if self.worse == "up" else change < -self.limit

    def describe(self) -> str:
        sign = "+" if self.worse == "up" else "-"
        if self.relative:
            return f"{sign}{self.limit:.0%} relative"
        return f"{sign}{self.limit:g} absolute"


GUARDRAILS: tuple[Guardrail, ...] = (
    Guardrail("latency_p99_ms", "up", 0.20, relative=True),
    Guardrail("error_rate", "up", 0.005, relative=False),  # +0.5 percentage points
    Guardrail(NEW_SELLER_SHARE, "down", 0.20, relative=True),  # the marketplace's supply side
    Guardrail(CATEGORY_DIVERSITY, "down", 0.10, relative=True),
)
LATENCY_QUANTILES = {"latency_p50_ms": 0.50, "latency_p95_ms": 0.95, "latency_p99_ms": 0.99}
# guardrail -> page column whose per-page mean it is
_MEAN_GUARDRAILS = {
    "error_rate": ERROR,
    NEW_SELLER_SHARE: NEW_SELLER_SHARE,
    CATEGORY_DIVERSITY: CATEGORY_DIVERSITY,
}


def _boot_quantiles(
    pages: pd.DataFrame, qs: list[float], boot: int, rng: np.random.Generator
) -> np.ndarray:
    """Poisson bootstrap over users (a user's pages share one weight): boot x len(qs)."""
    values = pages[LATENCY_MS].to_numpy(float)
    order = np.argsort(values, kind="stable")
    codes, uniques = pd.factorize(pages[USER_ID].to_numpy()[order])
    values = values[order]
    out = np.empty((boot, len(qs)))
    chunk = max(1, 4_000_000 // max(len(values), 1))
    for start in range(0, boot, chunk):
        b = min(chunk, boot - start)
        cw = np.cumsum(rng.poisson(1.0, size=(b, len(uniques)))[:, codes], axis=1)
        for j, q in enumerate(qs):
            idx = (cw < q * cw[:, -1:]).sum(axis=1)
            out[start : start + b, j] = values[np.minimum(idx, len(values) - 1)]
    return out


def guardrails(
    pages: pd.DataFrame,
    control: str,
    treatment: str,
    *,
    alpha: float = 0.05,
    rules: tuple[Guardrail, ...] = GUARDRAILS,
    boot: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Per arm: pages, users, latency p50/p95/p99, error rate, mean new-seller share and
    category diversity; per guardrail the treatment - control change with a user-clustered CI
    (delta method for the means, a Poisson bootstrap over users for the quantiles) and
    ``breached`` by ``rules`` (no rule: never breached). ``breached`` at the top: any."""
    _require(pages, PAGE_COLUMNS, "pages")
    qs = list(LATENCY_QUANTILES.values())
    rng = np.random.default_rng(seed)
    arms: dict[str, dict[str, Any]] = {}
    boots = {}
    for arm in (control, treatment):
        p = pages[_arm_mask(pages, arm)]
        lat = np.quantile(p[LATENCY_MS].to_numpy(float), qs, method="inverted_cdf")
        arms[arm] = {"pages": len(p), "users": int(p[USER_ID].nunique())}
        arms[arm].update({k: float(v) for k, v in zip(LATENCY_QUANTILES, lat, strict=True)})
        arms[arm].update({k: float(p[c].astype(float).mean()) for k, c in _MEAN_GUARDRAILS.items()})
        boots[arm] = _boot_quantiles(p, qs, boot, rng)
    by_rule = {r.metric: r for r in rules}
    intervals: dict[str, dict[str, Any]] = {}
    diffs = boots[treatment] - boots[control]
    for j, name in enumerate(LATENCY_QUANTILES):
        lo, hi = np.quantile(diffs[:, j], [alpha / 2, 1 - alpha / 2])
        intervals[name] = {"ci_low": float(lo), "ci_high": float(hi), "p_value": None}
        intervals[name]["ci_method"] = "Poisson bootstrap over users"
    for name, column in _MEAN_GUARDRAILS.items():
        r = compare_pages(pages, column, control, treatment, alpha=alpha)
        intervals[name] = {k: r[k] for k in ("ci_low", "ci_high", "p_value")}
        intervals[name]["ci_method"] = r["test"]
    changes: dict[str, dict[str, Any]] = {}
    for name, interval in intervals.items():
        c, t = arms[control][name], arms[treatment][name]
        rule = by_rule.get(name)
        changes[name] = {
            "control": c,
            "treatment": t,
            "estimate": t - c,
            "relative": (t - c) / c if c else math.nan,
            **interval,
            "threshold": rule.describe() if rule else None,
            "breached": bool(rule and rule.breached(c, t)),
        }
    return {
        "arms": arms,
        "changes": changes,
        "breached": any(c["breached"] for c in changes.values()),
    }


# --- the whole analysis -----------------------------------------------------------------------
def _arm_summary(users: pd.DataFrame, arm: str) -> dict[str, Any]:
    u = users[users[ARM] == arm]
    out: dict[str, Any] = {"users": len(u), "sessions": int(u[SESSIONS].sum())}
    for name in REPORTED_METRICS:
        y, d, _ = _yd(u, name)
        out[name] = float(y.sum() / d.sum()) if d.sum() else math.nan
    return out


def _linearised_sd(users: pd.DataFrame, metric: str, control: str, treatment: str) -> float:
    """The per-user sd the delta method uses, pooled over the two arms."""
    y, d, _ = _yd(users, metric)
    arms = [
        _moments(y, d, _arm_mask(users, a)[None, :].astype(float)) for a in (control, treatment)
    ]
    n = sum(float(a.n[0]) for a in arms)
    return math.sqrt(sum(float(a.var[0] * (a.n[0] - 1)) for a in arms) / (n - 2))


def _jsonable(value: Any) -> Any:
    """numpy scalars to Python, NaN and infinities to None, tuples to lists."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def analyze(
    users: pd.DataFrame,
    pages: pd.DataFrame | None,
    *,
    control: str,
    treatment: str,
    expected_shares: Mapping[str, float],
    alpha: float = 0.05,
    aa_splits: int = 200,
    planned_mde: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything about one experiment as a JSON-ready dict (NaN as None): ``arms``, ``lift``
    per metric (raw and CUPED on pre_gmv when the column is there), ``srm_p_value`` and
    ``srm_flag``, ``aa`` (the control arm re-split on gmv_per_user), ``power`` per metric at
    the current n with and without CUPED (and users per arm for ``planned_mde``, absolute
    effects by metric), ``guardrails`` (None without pages), then ``extra``'s keys."""
    _require(users, USER_COLUMNS, "users")
    unplanned = sorted(set(users[ARM].unique()) - set(expected_shares))
    if unplanned:
        raise ValueError(f"users has arms {unplanned} missing from expected_shares")
    counts = {a: int((users[ARM] == a).sum()) for a in expected_shares}
    srm_p = srm_p_value(counts, expected_shares)
    with_cuped = PRE_GMV in users.columns
    lift: dict[str, dict[str, Any]] = {}
    power: dict[str, dict[str, Any]] = {}
    n0, n1 = counts[control], counts[treatment]
    n_eff = 2 * n0 * n1 / (n0 + n1) if n0 and n1 else 0.0
    for name in REPORTED_METRICS:
        raw = compare(users, name, control, treatment, alpha=alpha)
        entry = {k: raw[k] for k in ("control_mean", "treatment_mean", "estimate", "relative")}
        entry.update({k: raw[k] for k in ("se", "ci_low", "ci_high", "p_value", "test")})
        vr = 0.0
        if with_cuped:
            adj = cuped(users, name, control, treatment, alpha=alpha)
            vr = max(adj["variance_reduction"], 0.0)
            for k in ("estimate", "se", "ci_low", "ci_high", "p_value"):
                entry[f"cuped_{k}"] = adj[k]
            entry.update(theta=adj["theta"], variance_reduction=adj["variance_reduction"])
        lift[name] = entry
        sd = _linearised_sd(users, name, control, treatment)
        mde = power_mde(sd, n_eff, alpha=alpha)
        mde_cuped = power_mde(sd, n_eff, alpha=alpha, variance_reduction=vr)
        c = raw["control_mean"]
        power[name] = {
            "sd": sd,
            "n_per_arm": n_eff,
            "mde": mde,
            "mde_relative": mde / c if c else math.nan,
            "mde_cuped": mde_cuped if with_cuped else None,
            "mde_cuped_relative": mde_cuped / c if with_cuped and c else None,
        }
        if planned_mde and name in planned_mde:
            power[name]["planned_mde"] = planned_mde[name]
            power[name]["required_users"] = required_users(sd, planned_mde[name], alpha=alpha)
            power[name]["required_users_cuped"] = required_users(
                sd, planned_mde[name], alpha=alpha, variance_reduction=vr
            )
    result: dict[str, Any] = {
        "control": control,
        "treatment": treatment,
        "alpha": alpha,
        "arms": {a: _arm_summary(users, a) for a in expected_shares},
        "lift": lift,
        "srm_p_value": srm_p,
        "srm_flag": srm_p < SRM_ALPHA,
        "srm": {"counts": counts, "expected_shares": dict(expected_shares), "alpha": SRM_ALPHA},
        "aa": aa_false_positive_rate(
            users, GMV_PER_USER, splits=aa_splits, alpha=alpha, arm=control
        ),
        "power": power,
        "guardrails": None if pages is None else guardrails(pages, control, treatment, alpha=alpha),
    }
    clash = sorted(set(result) & set(extra or {}))
    if clash:
        raise ValueError(f"extra must not overwrite the analysis's own keys, got {clash}")
    result.update(extra or {})
    return _jsonable(result)


# --- report -----------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "**yes**" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:+.2%}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def _markdown(r: dict[str, Any]) -> str:
    out = [f"# Experiment: {r['treatment']} vs {r['control']}", ""]
    metrics = list(REPORTED_METRICS)
    out += ["## Arms", ""]
    out += _table(
        ["arm", "users", "sessions", *metrics],
        [
            [a, _fmt(s["users"]), _fmt(s["sessions"]), *[_fmt(s[m]) for m in metrics]]
            for a, s in r["arms"].items()
        ],
    )
    level = 1 - r["alpha"]
    out += [f"## Lift (treatment - control, {level:.0%} intervals)", ""]
    rows = []
    for m, lift in r["lift"].items():
        ci = f"[{_fmt(lift['ci_low'])}, {_fmt(lift['ci_high'])}]"
        cuped_ci = (
            f"[{_fmt(lift['cuped_ci_low'])}, {_fmt(lift['cuped_ci_high'])}]"
            if "cuped_ci_low" in lift
            else "–"
        )
        rows.append(
            [
                m,
                _fmt(lift["estimate"]),
                _pct(lift["relative"]),
                ci,
                _fmt(lift["p_value"]),
                _fmt(lift.get("cuped_estimate")),
                cuped_ci,
                _fmt(lift.get("cuped_p_value")),
                _pct(lift.get("variance_reduction")),
            ]
        )
    out += _table(
        [
            "metric",
            "estimate",
            "relative",
            "CI",
            "p",
            "CUPED est.",
            "CUPED CI",
            "CUPED p",
            "var. red.",
        ],
        rows,
    )
    srm = r["srm"]
    out += ["## Sample ratio", ""]
    out += _table(
        ["arm", "users", "expected share"],
        [[a, _fmt(n), _fmt(srm["expected_shares"][a])] for a, n in srm["counts"].items()],
    )
    out += [
        f"SRM p-value {_fmt(r['srm_p_value'])}; flagged below {srm['alpha']}: "
        f"{_fmt(r['srm_flag'])}",
        "",
    ]
    aa = r["aa"]
    out += ["## A/A", ""]
    out += [
        f"{aa['splits']} random 50/50 re-splits of arm {aa['arm']} on {aa['metric']}: "
        f"false-positive rate {aa['false_positive_rate']:.1%} "
        f"(95 % CI {aa['ci_low']:.1%}–{aa['ci_high']:.1%}); target "
        f"{aa['target_low']:.0%}–{aa['target_high']:.0%}: within {_fmt(aa['within_target'])}",
        "",
    ]
    out += ["## Power (80 %, two-sided)", ""]
    out += _table(
        ["metric", "sd", "n per arm", "MDE", "MDE rel.", "MDE CUPED", "MDE CUPED rel."],
        [
            [
                m,
                _fmt(p["sd"]),
                f"{p['n_per_arm']:.0f}",
                _fmt(p["mde"]),
                _pct(p["mde_relative"]),
                _fmt(p["mde_cuped"]),
                _pct(p["mde_cuped_relative"]),
            ]
            for m, p in r["power"].items()
        ],
    )
    g = r.get("guardrails")
    if g:
        out += ["## Guardrails", ""]
        out += _table(
            [
                "guardrail",
                "control",
                "treatment",
                "change",
                "CI",
                "relative",
                "threshold",
                "breached",
            ],
            [
                [
                    name,
                    _fmt(c["control"]),
                    _fmt(c["treatment"]),
                    _fmt(c["estimate"]),
                    f"[{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}]",
                    _pct(c["relative"]),
                    _fmt(c["threshold"]),
                    _fmt(c["breached"]),
                ]
                for name, c in g["changes"].items()
            ],
        )
    return "\n".join(out)


def _plot(r: dict[str, Any], path: Path) -> None:
    """Relative lift with its CI (scaled by the control mean), raw and CUPED, per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, est, lo, hi, colors = [], [], [], [], []
    for m, lift in r["lift"].items():
        c = lift["control_mean"]
        for prefix, tag, color in (("", "raw", "tab:grey"), ("cuped_", "CUPED", "tab:blue")):
            if not c or lift.get(prefix + "estimate") is None:
                continue
            labels.append(f"{m} ({tag})")
            est.append(100 * lift[prefix + "estimate"] / c)
            lo.append(100 * (lift[prefix + "estimate"] - lift[prefix + "ci_low"]) / c)
            hi.append(100 * (lift[prefix + "ci_high"] - lift[prefix + "estimate"]) / c)
            colors.append(color)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(labels) + 1.5))
    ys = np.arange(len(labels))[::-1]
    for y, e, a, b, col in zip(ys, est, lo, hi, colors, strict=True):
        ax.errorbar(e, y, xerr=[[a], [b]], fmt="o", color=col, capsize=4)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(ys, labels)
    ax.set_xlabel(f"lift vs control, % ({1 - r['alpha']:.0%} CI)")
    ax.set_title(f"{r['treatment']} vs {r['control']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: Mapping[str, Any], out_dir: Path | str) -> dict[str, Path]:
    """``experiment.json`` (the record), ``experiment.md`` and ``experiment.png`` in
    ``out_dir``; returns their paths by kind ("json", "md", "png")."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    r = _jsonable(result)
    paths = {
        "json": out / "experiment.json",
        "md": out / "experiment.md",
        "png": out / "experiment.png",
    }
    paths["json"].write_text(json.dumps(r, indent=2, allow_nan=False) + "\n")
    paths["md"].write_text(_markdown(r))
    _plot(r, paths["png"])
    return paths
