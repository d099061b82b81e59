"""Monitoring checks: feature and score drift, training-serving skew, view freshness and
calibration, as pure functions over DataFrames and arrays.

Every check returns its figures (a table or a dict) and a list of flags. A flag is
``{"kind", "name", "value", "threshold"}``: ``kind`` one of :data:`FLAG_KINDS`, ``name`` the
feature, view or decile it is about, ``value`` the measured figure and ``threshold`` the one it
was compared with. All thresholds live in :class:`MonitorThresholds`. :func:`monitor_report`
assembles the sections into one JSON-ready dict (plain Python values, ``None`` for NaN) and
:func:`write_report` writes ``monitor.json``, ``monitor.md`` and a PSI bar chart.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pandas as pd

from feature_repo import schema as S
from training.metrics import reliability_curve

FLAG_KINDS = ("drift", "score_drift", "skew", "freshness", "calibration")
SCORE = "score"  # the name of the score-drift flag
COVERAGE = "coverage"  # the name of the skew flag raised when recomputation misses rows


class Flag(TypedDict):
    kind: str
    name: str
    value: float | None
    threshold: float


def _flag(kind: str, name: str, value: float | None, threshold: float) -> Flag:
    return Flag(kind=kind, name=name, value=value, threshold=float(threshold))


@dataclass(frozen=True)
class MonitorThresholds:
    """What each check compares its figure with; a figure strictly beyond it raises a flag.

    - ``psi``, ``score_psi``: population stability index of a feature / of the model score
      between reference (training) and serving. The usual reading: < 0.1 stable, 0.1-0.2 a
      moderate shift worth a look, > 0.2 a significant shift.
    - ``skew_atol`` + ``skew_rtol`` * |recomputed|: how far a served value may sit from its
      offline recomputation and still count as equal (float32 storage rounds at ~6e-8
      relative); ``skew_share``: the share of mismatching rows above which a feature is
      skewed; ``skew_min_coverage``: the share of served rows the recomputation must find.
    - ``batch_max_age_days`` (the snapshots' TTL: an older row already reads as missing),
      ``stream_max_age_days``: the age of a view's newest row beyond which it is stale;
      ``max_age_days`` overrides either per view.
    - ``calibration_min_gap``, ``calibration_z``: a decile of predicted probability is
      miscalibrated when |mean predicted - realised rate| exceeds both the minimum gap and
      ``calibration_z`` binomial standard errors of its realised rate (so a gap that sampling
      noise explains is not flagged on small deciles, nor a negligible one on large deciles).
    """

    psi: float = 0.2
    score_psi: float = 0.2
    skew_atol: float = 1e-4
    skew_rtol: float = 1e-3
    skew_share: float = 0.01
    skew_min_coverage: float = 0.99
    batch_max_age_days: float = float(S.SNAPSHOT_TTL_DAYS)
    stream_max_age_days: float = 1.0
    max_age_days: Mapping[str, float] = field(default_factory=dict)
    calibration_min_gap: float = 0.02
    calibration_z: float = 3.0

    def __post_init__(self) -> None:
        for name in ("skew_share", "skew_min_coverage"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a share in [0, 1], got {value}")
        for name in ("psi", "score_psi", "skew_atol", "skew_rtol", "calibration_min_gap"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")

    def skew_tolerance(self, recomputed: np.ndarray) -> np.ndarray:
        """The largest |served - recomputed| that still counts as equal, per row."""
        return self.skew_atol + self.skew_rtol * np.abs(recomputed)

    def max_age_hours(self, view: str) -> float:
        if view in self.max_age_days:
            days = self.max_age_days[view]
        elif view in S.BATCH_VIEWS:
            days = self.batch_max_age_days
        elif view in S.STREAM_VIEWS:
            days = self.stream_max_age_days
        else:
            raise ValueError(
                f"no max age for view {view!r}: expected one of {S.BATCH_VIEWS + S.STREAM_VIEWS} "
                "or an entry in max_age_days"
            )
        return float(days) * 24.0


# --- PSI ---------------------------------------------------------------------------------


def _as_values(x: np.ndarray | pd.Series | Sequence[Any]) -> np.ndarray:
    """float64 for numbers and booleans (NaN for missing), object otherwise."""
    if isinstance(x, pd.Series):
        if pd.api.types.is_numeric_dtype(x) or pd.api.types.is_bool_dtype(x):
            return x.to_numpy(dtype=np.float64, na_value=np.nan)
        return x.to_numpy(dtype=object)
    arr = np.asarray(x)
    if arr.dtype.kind in "biuf":
        return arr.astype(np.float64)
    return arr.astype(object)


def _bucket_shares(
    expected: np.ndarray, actual: np.ndarray, bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shares of each bucket, built from ``expected`` alone, in both arrays.

    Buckets: the reference's distinct values when there are at most ``bins`` of them (or the
    values are not numbers) plus an "other" bucket for values the reference never took;
    otherwise the intervals between the reference's interior quantiles (ties merged). Then a
    bucket of missing values.
    """
    e_na, a_na = pd.isna(expected), pd.isna(actual)
    e_valid, a_valid = expected[~e_na], actual[~a_na]
    numeric = expected.dtype.kind == "f" and actual.dtype.kind == "f"
    if numeric:
        categories = np.unique(e_valid)
        if len(categories) > bins:
            quantiles = np.quantile(e_valid, np.linspace(0.0, 1.0, bins + 1)[1:-1])
            edges = np.unique(quantiles)
            n_buckets = len(edges) + 1
            e_codes = np.searchsorted(edges, e_valid, side="right")
            a_codes = np.searchsorted(edges, a_valid, side="right")
        else:
            n_buckets = len(categories) + 1
            e_codes = _category_codes(categories, e_valid)
            a_codes = _category_codes(categories, a_valid)
    else:
        categories_obj = pd.unique(pd.Series(e_valid, dtype=object))
        n_buckets = len(categories_obj) + 1
        other = len(categories_obj)
        e_codes = pd.Categorical(e_valid, categories=categories_obj).codes.astype(np.int64)
        a_codes = pd.Categorical(a_valid, categories=categories_obj).codes.astype(np.int64)
        e_codes[e_codes < 0] = other
        a_codes[a_codes < 0] = other

    def shares(codes: np.ndarray, n_missing: int, n: int) -> np.ndarray:
        counts = np.bincount(codes, minlength=n_buckets).astype(np.float64)
        return np.append(counts, n_missing) / n

    return (
        shares(e_codes, int(e_na.sum()), len(expected)),
        shares(a_codes, int(a_na.sum()), len(actual)),
    )


def _category_codes(categories: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of each value in the sorted ``categories``; ``len(categories)`` when absent."""
    other = len(categories)
    if other == 0:
        return np.zeros(len(values), dtype=np.int64)
    idx = np.searchsorted(categories, values)
    clipped = np.minimum(idx, other - 1)
    return np.where(categories[clipped] == values, clipped, other).astype(np.int64)


def psi(
    expected: np.ndarray | pd.Series,
    actual: np.ndarray | pd.Series,
    *,
    bins: int = 10,
    eps: float = 1e-4,
) -> float:
    """Population stability index sum((a - e) * ln(a / e)) over buckets of ``expected``.

    ``expected`` is the reference (training) sample and defines the buckets: its deciles (for
    ``bins=10``) for a continuous feature, its distinct values for a discrete one with at most
    ``bins`` of them (binary flags, small counts, codes; a constant feature is one value), plus
    an "other" bucket for values outside those and a bucket of its own for missing values.
    Shares below ``eps`` are raised to it, so an empty bucket counts as a large, finite shift.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    e, a = _as_values(expected), _as_values(actual)
    if len(e) == 0 or len(a) == 0:
        raise ValueError(f"psi needs non-empty samples, got {len(e)} expected, {len(a)} actual")
    e_share, a_share = _bucket_shares(e, a, bins)
    e_share, a_share = np.maximum(e_share, eps), np.maximum(a_share, eps)
    return float(np.sum((a_share - e_share) * np.log(a_share / e_share)))


def _mean(values: np.ndarray) -> float:
    if values.dtype.kind != "f" or np.isnan(values).all():
        return math.nan
    return float(np.nanmean(values))


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks columns {missing}; it has {list(frame.columns)}")


def feature_drift(
    reference: pd.DataFrame,
    serving: pd.DataFrame,
    features: Sequence[str],
    thresholds: MonitorThresholds,
) -> tuple[pd.DataFrame, list[Flag]]:
    """PSI of each feature from the reference (training) rows to the serving rows.

    Table columns: feature, psi, reference_mean, serving_mean (NaN for non-numeric), flagged.
    """
    _require_columns(reference, features, "reference")
    _require_columns(serving, features, "serving")
    rows, flags = [], []
    for name in features:
        ref, srv = _as_values(reference[name]), _as_values(serving[name])
        value = psi(ref, srv)
        flagged = value > thresholds.psi
        if flagged:
            flags.append(_flag("drift", name, value, thresholds.psi))
        rows.append(
            {
                "feature": name,
                "psi": value,
                "reference_mean": _mean(ref),
                "serving_mean": _mean(srv),
                "flagged": flagged,
            }
        )
    columns = ["feature", "psi", "reference_mean", "serving_mean", "flagged"]
    return pd.DataFrame(rows, columns=columns), flags


def score_drift(
    reference_scores: np.ndarray,
    serving_scores: np.ndarray,
    thresholds: MonitorThresholds,
) -> tuple[dict[str, Any], list[Flag]]:
    """PSI of the model's score from reference to serving, with the means and quantiles."""
    ref, srv = _as_values(reference_scores), _as_values(serving_scores)
    value = psi(ref, srv)
    flagged = value > thresholds.score_psi
    summary: dict[str, Any] = {
        "psi": value,
        "n_reference": len(ref),
        "n_serving": len(srv),
        "flagged": flagged,
    }
    for side, values in (("reference", ref), ("serving", srv)):
        valid = values[~np.isnan(values)]
        summary[f"{side}_mean"] = float(valid.mean()) if len(valid) else None
        for q in (50, 90):
            summary[f"{side}_p{q}"] = float(np.quantile(valid, q / 100)) if len(valid) else None
    flags = [_flag("score_drift", SCORE, value, thresholds.score_psi)] if flagged else []
    return summary, flags


# --- training-serving skew -----------------------------------------------------------------


def _mismatch(
    served: pd.Series, recomputed: pd.Series, thresholds: MonitorThresholds
) -> tuple[np.ndarray, np.ndarray]:
    """Per row: whether the two values differ beyond tolerance, and |difference| (NaN when
    either side is missing or the values are not numbers). Both missing counts as equal."""
    s_na, r_na = served.isna().to_numpy(), recomputed.isna().to_numpy()
    numeric = all(
        pd.api.types.is_numeric_dtype(x) or pd.api.types.is_bool_dtype(x)
        for x in (served, recomputed)
    )
    if numeric:
        s = served.to_numpy(dtype=np.float64, na_value=np.nan)
        r = recomputed.to_numpy(dtype=np.float64, na_value=np.nan)
        diff = np.abs(s - r)
        with np.errstate(invalid="ignore"):
            differs = diff > thresholds.skew_tolerance(r)
    else:
        diff = np.full(len(served), np.nan)
        differs = served.to_numpy(dtype=object) != recomputed.to_numpy(dtype=object)
    return (differs & ~s_na & ~r_na) | (s_na ^ r_na), diff


def training_serving_skew(
    served: pd.DataFrame,
    recomputed: pd.DataFrame,
    keys: Sequence[str],
    features: Sequence[str],
    thresholds: MonitorThresholds,
) -> tuple[pd.DataFrame, dict[str, Any], list[Flag]]:
    """Compare the feature values serving used with the offline pipeline's recomputation of
    the same rows (inner join on ``keys``, e.g. request and item ids).

    Returns the table (feature, rows_compared, mismatch_share, max_abs_diff, example: the key
    values of one mismatching row or None, flagged), the coverage (served_rows,
    recomputed_rows, matched_rows, unmatched_served_rows, coverage: the share of served rows
    the recomputation found) and the flags; a coverage below ``skew_min_coverage`` is flagged
    too (kind "skew", name "coverage").
    """
    keys, features = list(keys), list(features)
    _require_columns(served, keys + features, "served")
    _require_columns(recomputed, keys + features, "recomputed")
    for what, frame in (("served", served), ("recomputed", recomputed)):
        dupes = int(frame.duplicated(keys).sum())
        if dupes:
            raise ValueError(
                f"{what} has {dupes} rows with a repeated key {keys}; keys must be unique"
            )
    joined = served[keys + features].merge(
        recomputed[keys + features], on=keys, how="inner", suffixes=("_served", "_recomputed")
    )
    n_served, n_matched = len(served), len(joined)
    coverage = {
        "served_rows": n_served,
        "recomputed_rows": len(recomputed),
        "matched_rows": n_matched,
        "unmatched_served_rows": n_served - n_matched,
        "coverage": n_matched / n_served if n_served else math.nan,
    }
    flags: list[Flag] = []
    if n_served and coverage["coverage"] < thresholds.skew_min_coverage:
        flags.append(_flag("skew", COVERAGE, coverage["coverage"], thresholds.skew_min_coverage))
    rows = []
    for name in features:
        differs, diff = _mismatch(
            joined[f"{name}_served"], joined[f"{name}_recomputed"], thresholds
        )
        share = float(differs.mean()) if n_matched else math.nan
        flagged = n_matched > 0 and share > thresholds.skew_share
        if flagged:
            flags.append(_flag("skew", name, share, thresholds.skew_share))
        example = None
        if differs.any():
            at = int(np.argmax(differs))
            example = {k: _plain(joined[k].iat[at]) for k in keys}
        rows.append(
            {
                "feature": name,
                "rows_compared": n_matched,
                "mismatch_share": share,
                "max_abs_diff": float(np.nanmax(diff)) if np.isfinite(diff).any() else math.nan,
                "example": example,
                "flagged": flagged,
            }
        )
    columns = ["feature", "rows_compared", "mismatch_share", "max_abs_diff", "example", "flagged"]
    return pd.DataFrame(rows, columns=columns), coverage, flags


# --- freshness -----------------------------------------------------------------------------


def _utc(ts: pd.Timestamp) -> pd.Timestamp:
    """A timestamp in UTC; a naive one is taken to be UTC already."""
    ts = pd.Timestamp(ts)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def freshness(
    view_latest: Mapping[str, pd.Timestamp | None],
    now: pd.Timestamp,
    thresholds: MonitorThresholds,
) -> tuple[pd.DataFrame, list[Flag]]:
    """Age in hours of each view's newest row at ``now``, against the view's max age.

    Table columns: view, latest, age_hours, max_age_hours, flagged. A view with no row at
    all (``None`` or NaT) has no age and is flagged with value None.
    """
    now = _utc(now)
    rows, flags = [], []
    for view, latest in view_latest.items():
        limit = thresholds.max_age_hours(view)
        if latest is None or pd.isna(latest):
            latest_utc, age = None, None
        else:
            latest_utc = _utc(latest)
            age = (now - latest_utc).total_seconds() / 3600.0
        flagged = age is None or age > limit
        if flagged:
            flags.append(_flag("freshness", view, age, limit))
        rows.append(
            {
                "view": view,
                "latest": latest_utc,
                "age_hours": math.nan if age is None else age,
                "max_age_hours": limit,
                "flagged": flagged,
            }
        )
    columns = ["view", "latest", "age_hours", "max_age_hours", "flagged"]
    return pd.DataFrame(rows, columns=columns), flags


# --- calibration ---------------------------------------------------------------------------


def calibration_drift(
    predicted: np.ndarray,
    realised: np.ndarray,
    thresholds: MonitorThresholds,
    *,
    bins: int = 10,
) -> tuple[pd.DataFrame, float, list[Flag]]:
    """Predicted probability against the realised 0/1 outcome per equal-count bin of the
    prediction (deciles for ``bins=10``; training.metrics.reliability_curve's bins).

    Table columns: bin, n, predicted_mean, realised_rate, abs_gap, se (the binomial standard
    error sqrt(p (1 - p) / n) of the realised rate were the bin's mean prediction p right),
    threshold (max(calibration_min_gap, calibration_z * se)), flagged. Also returns the
    expected calibration error: the n-weighted mean of abs_gap.
    """
    p = np.asarray(predicted, dtype=np.float64)
    y = np.asarray(realised, dtype=np.float64)
    if len(p) != len(y):
        raise ValueError(f"predicted and realised differ in length: {len(p)} vs {len(y)}")
    if len(p) == 0:
        raise ValueError("calibration_drift needs at least one prediction")
    if not ((p >= 0) & (p <= 1)).all():
        raise ValueError("predicted must be probabilities in [0, 1] (no NaN)")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("realised must be 0/1 outcomes")
    curve = reliability_curve(y, p, n_bins=bins, strategy="equal_mass")
    n = curve.weight
    gap = np.abs(curve.mean_predicted - curve.observed_rate)
    se = np.sqrt(curve.mean_predicted * (1.0 - curve.mean_predicted) / n)
    limit = np.maximum(thresholds.calibration_min_gap, thresholds.calibration_z * se)
    table = pd.DataFrame(
        {
            "bin": np.arange(len(n)),
            "n": n.astype(np.int64),
            "predicted_mean": curve.mean_predicted,
            "realised_rate": curve.observed_rate,
            "abs_gap": gap,
            "se": se,
            "threshold": limit,
            "flagged": gap > limit,
        }
    )
    ece = float(np.sum(n * gap) / n.sum())
    flags = [
        _flag("calibration", f"bin_{i}", float(gap[i]), float(limit[i]))
        for i in np.flatnonzero(gap > limit)
    ]
    return table, ece, flags


# --- report --------------------------------------------------------------------------------


def _plain(x: Any) -> Any:
    """A JSON value: numpy scalars as Python ones, NaN/NaT/inf as None, timestamps ISO."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return [_plain(v) for v in x.tolist()]
    if isinstance(x, pd.DataFrame):
        return [_plain(r) for r in x.to_dict(orient="records")]
    if x is None or x is pd.NaT or x is pd.NA:
        return None
    if isinstance(x, pd.Timestamp):
        return x.isoformat()
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, bool | int | str):
        return x
    return str(x)


def monitor_report(
    *,
    drift: tuple[pd.DataFrame, list[Flag]] | None = None,
    score: tuple[dict[str, Any], list[Flag]] | None = None,
    skew: tuple[pd.DataFrame, dict[str, Any], list[Flag]] | None = None,
    fresh: tuple[pd.DataFrame, list[Flag]] | None = None,
    calibration: tuple[pd.DataFrame, float, list[Flag]] | None = None,
    thresholds: MonitorThresholds | None = None,
) -> dict[str, Any]:
    """The checks' results (each as its function returned it; None: not run) as one
    JSON-ready dict: ``flags`` (all of them), then ``drift`` ({features: rows}),
    ``score_drift`` (the summary), ``skew`` ({features: rows, coverage}), ``freshness``
    ({views: rows}), ``calibration`` ({bins: rows, ece}), each None when not run, and the
    ``thresholds`` when given."""
    flags: list[Flag] = []
    report: dict[str, Any] = {"flags": flags}
    report["drift"] = None if drift is None else {"features": drift[0]}
    report["score_drift"] = None if score is None else score[0]
    report["skew"] = None if skew is None else {"features": skew[0], "coverage": skew[1]}
    report["freshness"] = None if fresh is None else {"views": fresh[0]}
    report["calibration"] = (
        None if calibration is None else {"bins": calibration[0], "ece": calibration[1]}
    )
    for section in (drift, score, skew, fresh, calibration):
        if section is not None:
            flags.extend(section[-1])
    if thresholds is not None:
        report["thresholds"] = asdict(thresholds)
    return _plain(report)


def _cell(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, dict):
        return ", ".join(f"{k}={v}" for k, v in x.items())
    return str(x)


def _md_table(rows: list[dict[str, Any]]) -> list[str]:
    """A Markdown table of the rows; a flagged row is marked in its first column."""
    if not rows:
        return ["(no rows)", ""]
    columns = [c for c in rows[0] if c != "flagged"]
    lines = ["| flag | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        mark = "**FLAG**" if row.get("flagged") else ""
        lines.append(f"| {mark} | " + " | ".join(_cell(row[c]) for c in columns) + " |")
    return [*lines, ""]


def _markdown(result: Mapping[str, Any]) -> str:
    flags = result["flags"]
    lines = ["# homefeed monitoring", ""]
    if flags:
        lines += [f"**{len(flags)} flag(s)**", "", "| kind | name | value | threshold |"]
        lines.append("|---|---|---:|---:|")
        for f in flags:
            row = (f["kind"], f["name"], _cell(f["value"]), _cell(f["threshold"]))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    else:
        lines += ["No flags.", ""]
    if result.get("drift") is not None:
        lines += ["## Feature drift (PSI, reference → serving)", ""]
        lines += _md_table(result["drift"]["features"])
    if result.get("score_drift") is not None:
        lines += ["## Score drift", ""]
        lines += _md_table([result["score_drift"]])
    if result.get("skew") is not None:
        cov = result["skew"]["coverage"]
        lines += [
            "## Training-serving skew",
            "",
            f"Coverage: {_cell(cov['coverage'])} ({cov['matched_rows']} of "
            f"{cov['served_rows']} served rows recomputed, {cov['unmatched_served_rows']} "
            "without a recomputed row).",
            "",
        ]
        lines += _md_table(result["skew"]["features"])
    if result.get("freshness") is not None:
        lines += ["## Freshness (age of each view's newest row)", ""]
        lines += _md_table(result["freshness"]["views"])
    if result.get("calibration") is not None:
        cal = result["calibration"]
        lines += ["## Calibration", "", f"ECE: {_cell(cal['ece'])}", ""]
        lines += _md_table(cal["bins"])
    return "\n".join(lines)


def psi_plot(rows: list[dict[str, Any]], threshold: float | None, path: Path) -> None:
    """PSI per feature as bars, flagged ones in red, with the threshold as a dashed line."""
    from training.report import _plt

    plt = _plt()
    names = [r["feature"] for r in rows]
    values = [r["psi"] or 0.0 for r in rows]
    colors = ["#c33" if r["flagged"] else "#888" for r in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(names) + 2), 3.8))
    ax.bar(names, values, color=colors)
    if threshold is not None:
        ax.axhline(threshold, linestyle="--", color="black", label=f"threshold {threshold:g}")
        ax.legend()
    ax.set_ylabel("PSI (reference → serving)")
    ax.set_title("Feature drift")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: Mapping[str, Any], out_dir: Path, *, plot: bool = True) -> dict[str, Path]:
    """``monitor.json`` and ``monitor.md`` in ``out_dir``, plus ``monitor.png`` (PSI per
    feature) when ``plot`` and the drift section is present. Returns the paths by kind."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "monitor.json", "md": out_dir / "monitor.md"}
    paths["json"].write_text(json.dumps(result, indent=2, allow_nan=False))
    paths["md"].write_text(_markdown(result))
    drift = result.get("drift")
    if plot and drift is not None and drift["features"]:
        threshold = (result.get("thresholds") or {}).get("psi", MonitorThresholds().psi)
        paths["png"] = out_dir / "monitor.png"
        psi_plot(drift["features"], threshold, paths["png"])
    return paths
