"""The canary analysis of one window: the arms' counters over the window in, figures, checks
and a verdict out. Pure (no I/O, no clock), so every rule is unit-tested on numbers.

A window's verdict:

- ``hold`` when either arm had fewer than ``min_feeds`` feeds (or, with mirroring on, too
  few mirrored requests): the window neither promotes nor fails, and the message says which
  arm had how many;
- ``failed_check`` when any check failed (the controller counts it and holds the step;
  ``threshold`` of them roll back);
- ``pass`` otherwise (the controller advances, or promotes from the last step).

The checks compare the canary with the stable arm of the *same* window (both arms see the
same mesh, load and time of day), with an allowance for noise; at 100 % there is no stable
traffic and the last window's stable figures are the baseline. Model-health checks need no
stable traffic: non-finite or out-of-range scores, constant scores, the score
distribution's shift (PSI of E[GMV] over the stable arm's deciles), and mirrored scoring of
the same candidates by both models (rank correlation, top-20 overlap, p(purchase)
difference). Defaults and their reasons: ``docs/releasing.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.common.rollout_stats import (
    CANARY,
    EGMV_EDGES,
    LATENCY_EDGES_MS,
    STABLE,
    psi,
    quantile,
)

HOLD = "hold"
FAILED = "failed_check"
PASS = "pass"

COUNTERS = (
    "feeds",
    "degraded",
    "ranking_calls",
    "ranking_errors",
    "scored",
    "non_finite",
    "out_of_range",
    "constant",
)
HISTOGRAMS = {"ranking_ms": LATENCY_EDGES_MS, "feed_ms": LATENCY_EDGES_MS, "egmv": EGMV_EDGES}
MIRROR_COUNTERS = ("mirrored", "errors", "dropped")
MIRROR_SUMS = ("rank_correlation_sum", "top20_overlap_sum", "p_diff_sum")


@dataclass(frozen=True)
class AnalysisConfig:
    """Limits of the checks (``docs/releasing.md`` gives the reasons)."""

    max_error_rate_increase: float = 0.01  # canary ranking-error rate above stable's
    max_fallback_rate_increase: float = 0.02  # canary degraded pages above stable's
    significance_z: float = 2.33  # ...and above it beyond chance (one-sided, ~99 %)
    latency_ratio: float = 1.5  # canary ranking p95/p99 within ratio x stable + slack
    latency_slack_ms: float = 10.0
    feed_latency_ratio: float = 1.3  # whole-feed p99
    feed_latency_slack_ms: float = 15.0
    min_p95_samples: int = 20  # fewer canary calls: the quantile is not checked
    min_p99_samples: int = 100
    max_non_finite_share: float = 0.0  # requests with a NaN/inf/out-of-range score
    max_constant_share: float = 0.01  # requests whose scores were all equal
    max_psi: float = 0.2  # E[GMV] distribution shift (0.1-0.25 is "moderate")
    min_mirrored: int = 5  # mirrored requests for the mirror checks to count
    min_rank_correlation: float = 0.5
    min_top20_overlap: float = 0.4
    max_p_diff: float = 0.05


@dataclass(frozen=True)
class Verdict:
    outcome: str  # HOLD, FAILED, PASS
    message: str
    figures: dict[str, Any]  # arms, mirror, psi (the window's JSON without timing)
    checks: list[dict[str, Any]]

    @property
    def failed(self) -> list[str]:
        return [c["name"] for c in self.checks if c["passed"] is False]


def empty_arm() -> dict[str, Any]:
    arm: dict[str, Any] = {name: 0 for name in COUNTERS}
    for name, edges in HISTOGRAMS.items():
        arm[name] = np.zeros(len(edges) + 1, dtype=np.int64)
    return arm


def empty_mirror() -> dict[str, float]:
    return {name: 0 for name in (*MIRROR_COUNTERS, *MIRROR_SUMS)}


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def arm_figures(arm: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON figures of one arm's window counters."""
    out: dict[str, Any] = {name: int(arm[name]) for name in COUNTERS}
    out["error_rate"] = _rate(out["ranking_errors"], out["ranking_calls"])
    out["fallback_rate"] = _rate(out["degraded"], out["feeds"])
    for q in (95, 99):
        out[f"ranking_p{q}_ms"] = quantile(arm["ranking_ms"], LATENCY_EDGES_MS, q / 100)
        out[f"feed_p{q}_ms"] = quantile(arm["feed_ms"], LATENCY_EDGES_MS, q / 100)
    return out


def mirror_figures(mirror: Mapping[str, float]) -> dict[str, Any]:
    n = int(mirror["mirrored"])
    out: dict[str, Any] = {name: int(mirror[name]) for name in MIRROR_COUNTERS}
    for name in MIRROR_SUMS:
        out[name.removesuffix("_sum")] = mirror[name] / n if n else None
    return out


def _check(
    name: str, passed: bool | None, value: float | None, limit: str, detail: str
) -> dict[str, Any]:
    return {"name": name, "passed": passed, "value": value, "limit": limit, "detail": detail}


def excess_z(bad_c: int, n_c: int, bad_s: int, n_s: int, allowance: float) -> float:
    """How many standard errors the canary's rate exceeds the stable rate plus
    ``allowance`` (a one-sided two-proportion z statistic; <= 0 when it does not exceed
    it). With few calls one unlucky failure is not a regression; 20 % errors are."""
    if n_c == 0:
        return 0.0
    pc = bad_c / n_c
    ps = bad_s / n_s if n_s else 0.0
    excess = pc - ps - allowance
    if excess <= 0:
        return 0.0
    pooled = (bad_c + bad_s) / (n_c + n_s) if n_s else pc
    var = pooled * (1 - pooled) * (1 / n_c + (1 / n_s if n_s else 0.0))
    var = max(var, 1.0 / (n_c * n_c))  # no infinite z at a stable rate of 0
    return float(excess / np.sqrt(var))


def _fmt(value: float | None, unit: str = "") -> str:
    return "–" if value is None else f"{value:.3g}{unit}"


def analyze(
    stable: Mapping[str, Any],
    canary: Mapping[str, Any],
    mirror: Mapping[str, float],
    *,
    min_feeds: int,
    mirror_share: float,
    config: AnalysisConfig,
    baseline: Mapping[str, Any] | None = None,
    weight: int = 0,
) -> Verdict:
    """The verdict of one window. ``stable``/``canary``: the arms' counters summed over the
    replicas (``empty_arm`` layout); ``baseline``: figures (``arm_figures``) and the E[GMV]
    histogram of the last stable window with traffic, used when the stable arm has none (at
    100 %)."""
    cfg = config
    s, c = arm_figures(stable), arm_figures(canary)
    m = mirror_figures(mirror)
    stable_egmv = np.asarray(stable["egmv"])
    ref = s
    if s["feeds"] < min_feeds and weight >= 100 and baseline:
        ref = dict(baseline["figures"])
        stable_egmv = np.asarray(baseline["egmv"], dtype=np.int64)
    shift = psi(stable_egmv, canary["egmv"])
    figures = {"arms": {STABLE: s, CANARY: c}, "mirror": m, "psi": shift}

    short = []
    if c["feeds"] < min_feeds:
        short.append(f"the canary arm had {c['feeds']} feeds")
    if ref["feeds"] < min_feeds:
        short.append(f"the stable arm had {s['feeds']} feeds (and no baseline)")
    if short:
        return Verdict(
            HOLD,
            f"too little traffic at {weight} %: {' and '.join(short)} in the window, fewer "
            f"than {min_feeds}; holding the step (neither promoting nor failing)",
            figures,
            [],
        )

    checks: list[dict[str, Any]] = []
    z = cfg.significance_z
    for name, bad, total, allowance in (
        ("error_rate", "ranking_errors", "ranking_calls", cfg.max_error_rate_increase),
        ("fallback_rate", "degraded", "feeds", cfg.max_fallback_rate_increase),
    ):
        sr, cr = ref[name] or 0.0, c[name] or 0.0
        score = excess_z(c[bad], c[total], ref[bad], ref[total], allowance)
        checks.append(
            _check(
                name,
                score <= z,
                cr,
                f"<= stable {sr:.3f} + {allowance} (z {score:.2f} <= {z})",
                f"{bad} {c[bad]}/{c[total]} vs stable {ref[bad]}/{ref[total]}",
            )
        )
    hop = (cfg.latency_ratio, cfg.latency_slack_ms, "ranking_calls")
    feed = (cfg.feed_latency_ratio, cfg.feed_latency_slack_ms, "feeds")
    for name, (ratio, slack, calls), least in (
        ("ranking_p95_ms", hop, cfg.min_p95_samples),
        ("ranking_p99_ms", hop, cfg.min_p99_samples),
        ("feed_p95_ms", feed, cfg.min_p95_samples),
        ("feed_p99_ms", feed, cfg.min_p99_samples),
    ):
        if c[calls] < least:  # a quantile of a handful of calls is one unlucky call
            continue
        sv, cv = ref[name], c[name]
        if sv is None or cv is None:
            checks.append(_check(name, None, cv, "", "no latency recorded"))
            continue
        limit = sv * ratio + slack
        checks.append(
            _check(name, cv <= limit, cv, f"<= {ratio} x stable {sv:.3g} + {slack} ms", "")
        )
    scored = max(c["scored"], 1)
    bad = (c["non_finite"] + c["out_of_range"]) / scored
    checks.append(
        _check(
            "score_validity",
            bad <= cfg.max_non_finite_share,
            bad,
            f"<= {cfg.max_non_finite_share}",
            f"{c['non_finite']} requests with NaN/inf scores, {c['out_of_range']} out of range, "
            f"of {c['scored']}",
        )
    )
    constant = c["constant"] / scored
    checks.append(
        _check(
            "constant_scores",
            constant <= cfg.max_constant_share,
            constant,
            f"<= {cfg.max_constant_share}",
            f"{c['constant']} of {c['scored']} requests had all scores equal",
        )
    )
    checks.append(
        _check(
            "score_psi",
            None if shift is None else shift <= cfg.max_psi,
            shift,
            f"<= {cfg.max_psi}",
            "PSI of the canary's E[GMV] over the stable arm's deciles",
        )
    )
    if mirror_share > 0 and weight < 100:
        n = m["mirrored"]
        if n < cfg.min_mirrored:
            detail = f"{n} mirrored requests (fewer than {cfg.min_mirrored}): no verdict"
            for name in ("rank_correlation", "top20_overlap", "p_diff"):
                checks.append(_check(f"mirror_{name}", None, m[name], "", detail))
        else:
            detail = f"over {n} stable requests scored by both models"
            rc, ov, pd = m["rank_correlation"], m["top20_overlap"], m["p_diff"]
            checks.append(
                _check(
                    "mirror_rank_correlation",
                    rc >= cfg.min_rank_correlation,
                    rc,
                    f">= {cfg.min_rank_correlation}",
                    detail,
                )
            )
            checks.append(
                _check(
                    "mirror_top20_overlap",
                    ov >= cfg.min_top20_overlap,
                    ov,
                    f">= {cfg.min_top20_overlap}",
                    detail,
                )
            )
            checks.append(
                _check("mirror_p_diff", pd <= cfg.max_p_diff, pd, f"<= {cfg.max_p_diff}", detail)
            )

    failed = [ch for ch in checks if ch["passed"] is False]
    if failed:
        parts = [f"{ch['name']} {_fmt(ch['value'])} (limit {ch['limit']})" for ch in failed]
        return Verdict(FAILED, "failed: " + "; ".join(parts), figures, checks)
    unknown = [ch["name"] for ch in checks if ch["passed"] is None]
    if unknown:
        return Verdict(
            HOLD,
            f"no verdict at {weight} % for {', '.join(unknown)} (not enough data in the "
            "window); holding the step",
            figures,
            checks,
        )
    return Verdict(PASS, f"all {len(checks)} checks passed at {weight} %", figures, checks)
