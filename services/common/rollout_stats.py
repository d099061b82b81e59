"""What the gateways and the rollout controller agree on about a canary release: which arm a
user is in, the fixed histogram buckets the gateways count in (so replicas' counts add up),
and the figures the controller computes from them (quantiles, PSI, rank agreement).

Arms: a user's bucket is ``blake2b(salt:user_id) mod 10000``; the user is in the canary arm
when the bucket is below ``weight x 100``. With one salt per rollout and weights that only
grow (5 -> 25 -> 50 -> 100 %), a user in the canary arm stays in it for the whole rollout,
and a new rollout draws a new salt, so the same users are not always the first to try a
model.
"""

from __future__ import annotations

import hashlib

import numpy as np

STABLE = "stable"
CANARY = "canary"
ARMS = (STABLE, CANARY)
BUCKETS = 10_000  # arm buckets: weights in steps of 0.01 %

# Latency buckets (milliseconds): 0.25 ms x 2^(k/4), k = 0..59 (up to ~8 s), one below the
# first edge and one above the last: ~19 % wide, fine enough to tell 1.5x apart.
LATENCY_EDGES_MS = 0.25 * 2.0 ** (np.arange(60) / 4.0)
# E[GMV] buckets: 8 per decade from 1e-6 to 1e4, and one for 0 and below.
EGMV_EDGES = 10.0 ** (np.arange(-48, 33) / 8.0)
LATENCY_BINS = len(LATENCY_EDGES_MS) + 1
EGMV_BINS = len(EGMV_EDGES) + 1


def user_bucket(user_id: int, salt: str) -> int:
    """The user's arm bucket, 0..9999, stable for a salt."""
    digest = hashlib.blake2b(f"{salt}:{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def arm_of(user_id: int, salt: str, weight_percent: float) -> str:
    """``canary`` when the user's bucket falls under the canary's weight, else ``stable``."""
    if weight_percent <= 0:
        return STABLE
    if weight_percent >= 100:
        return CANARY
    return CANARY if user_bucket(user_id, salt) < round(weight_percent * 100) else STABLE


def bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The bucket of each value: 0 below ``edges[0]``, k for ``edges[k-1] <= v < edges[k]``,
    ``len(edges)`` at or above the last edge."""
    return np.searchsorted(edges, values, side="right")


def bucket(value: float, edges: np.ndarray) -> int:
    """``bin_index`` of one value."""
    return int(np.searchsorted(edges, value, side="right"))


def histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bucket (int64, ``len(edges) + 1``); NaN values are not counted."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return np.bincount(bin_index(values, edges), minlength=len(edges) + 1).astype(np.int64)


def quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float | None:
    """The ``q`` quantile of a histogram, as the upper edge of the bucket it falls in (the
    last edge for the overflow bucket); None for an empty histogram."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return None
    k = int(np.searchsorted(np.cumsum(counts), q * total, side="left"))
    return float(edges[min(k, len(edges) - 1)])


def psi(
    expected: np.ndarray, actual: np.ndarray, groups: int = 10, eps: float = 1e-4
) -> float | None:
    """Population stability index of ``actual`` against ``expected`` (two histograms over
    the same buckets), over ``expected``'s deciles: buckets are merged into ``groups``
    groups of about equal expected mass, then ``sum((a - e) * ln(a / e))`` over the groups'
    shares (each floored at ``eps``). None when either histogram is empty.

    Rules of thumb: < 0.1 no shift, 0.1-0.25 a moderate one, > 0.25 a large one."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.sum() <= 0 or a.sum() <= 0:
        return None
    cum = np.cumsum(e) / e.sum()
    # group of each bucket: how many decile boundaries lie strictly below its cumulative mass
    group = np.minimum((cum * groups - 1e-9).astype(np.int64), groups - 1)
    group = np.maximum.accumulate(group)
    e_share = np.bincount(group, weights=e, minlength=groups) / e.sum()
    a_share = np.bincount(group, weights=a, minlength=groups) / a.sum()
    keep = (e_share > 0) | (a_share > 0)
    e_share = np.maximum(e_share[keep], eps)
    a_share = np.maximum(a_share[keep], eps)
    return float(np.sum((a_share - e_share) * np.log(a_share / e_share)))


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    return ranks


def compare_rankings(
    stable_egmv: np.ndarray,
    canary_egmv: np.ndarray,
    stable_p: np.ndarray,
    canary_p: np.ndarray,
    top: int = 20,
) -> tuple[float, float, float]:
    """How two models ranked the same candidates: Spearman rank correlation of E[GMV]
    (0 when either side is constant or not finite), the overlap of their top ``top`` (0..1),
    and the mean absolute difference of p(purchase) (1 when a side is not finite)."""
    s = np.asarray(stable_egmv, dtype=np.float64)
    c = np.asarray(canary_egmv, dtype=np.float64)
    n = len(s)
    if n == 0 or len(c) != n:
        return 0.0, 0.0, 1.0
    if not (np.isfinite(s).all() and np.isfinite(c).all()):
        return 0.0, 0.0, 1.0
    if n > 1 and np.ptp(s) > 0 and np.ptp(c) > 0:
        corr = float(np.corrcoef(_ranks(s), _ranks(c))[0, 1])
    else:
        corr = 0.0 if n > 1 else 1.0
    k = min(top, n)
    top_s = np.argpartition(-s, k - 1)[:k]
    top_c = np.argpartition(-c, k - 1)[:k]
    overlap = len(np.intersect1d(top_s, top_c)) / k
    diff = np.abs(np.asarray(stable_p, np.float64) - np.asarray(canary_p, np.float64))
    p_diff = float(diff.mean()) if np.isfinite(diff).all() else 1.0
    return corr, overlap, p_diff
