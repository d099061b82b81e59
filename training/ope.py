"""Off-policy evaluation: a new policy's value estimated from logs another policy produced,
with the propensities homefeed records (``impressions.propensity``: the probability the
logging policy put *this item* in *this slot*). Outside a simulator there is no Oracle; these
estimators are what a marketplace has.

The three standard estimators, as the Open Bandit Pipeline defines them (Saito et al.,
"Open Bandit Dataset and Pipeline", 2020; Dudík et al., "Doubly Robust Policy Evaluation",
2011), for logged rounds i = 1..n with reward r_i, logging propensity π₀(a_i | x_i) and the
evaluated policy's probability π(a_i | x_i) of the logged action (weight w_i = π / π₀):

- **IPS**: V = (1/n) Σ w_i r_i. Unbiased when π₀ > 0 wherever π > 0; its variance grows
  with the weights.
- **SNIPS** (self-normalised): V = Σ w_i r_i / Σ w_i. Slightly biased, much less variable
  when the weights are large.
- **DR** (doubly robust): V = (1/n) Σ [ q̂_π(x_i) + w_i (r_i − q̂(x_i, a_i)) ], with a reward
  model q̂ (the direct method: here the purchase model's E[GMV]) and q̂_π(x_i) its value
  under the evaluated policy. Unbiased when either the propensities or q̂ are right.

For a ranked page the action is a slate; the *position-based* (independent) form treats
each slot as its own round, with the slot's item-in-slot probabilities, and the page's value
is the sum over slots (``by_slot``). Every estimate carries a 95 % interval (normal, from
the per-round terms; SNIPS by the delta method) and the effective sample size
ESS = (Σ w)² / Σ w², the number of on-policy rounds the weighted log is worth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    estimate: float
    ci_low: float
    ci_high: float
    stderr: float
    ess: float  # effective sample size of the weights
    n: int  # logged rounds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _arrays(
    rewards: np.ndarray, target: np.ndarray, logging: np.ndarray, clip: float | None
) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(rewards, dtype=np.float64)
    p = np.asarray(target, dtype=np.float64)
    q = np.asarray(logging, dtype=np.float64)
    if not (r.shape == p.shape == q.shape) or r.ndim != 1:
        raise ValueError(
            f"rewards, target and logging propensities must be 1-d and aligned, got shapes "
            f"{r.shape}, {p.shape}, {q.shape}"
        )
    if len(r) == 0:
        raise ValueError("no logged rounds to estimate from")
    if not np.all(np.isfinite(q)) or np.any(q <= 0) or np.any(q > 1):
        bad = int(np.sum(~np.isfinite(q) | (q <= 0) | (q > 1)))
        raise ValueError(f"logging propensities must be in (0, 1]; {bad} rounds are not")
    if np.any((p < 0) | (p > 1)) or not np.all(np.isfinite(p)):
        raise ValueError("the evaluated policy's probabilities must be in [0, 1]")
    w = p / q
    if clip is not None:
        w = np.minimum(w, clip)
    return r, w


def effective_sample_size(weights: np.ndarray) -> float:
    w = np.asarray(weights, dtype=np.float64)
    total = float((w * w).sum())
    return float(w.sum() ** 2 / total) if total > 0 else 0.0


def _normal(terms: np.ndarray, w: np.ndarray) -> Estimate:
    n = len(terms)
    mean = float(terms.mean())
    se = float(terms.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return Estimate(mean, mean - Z95 * se, mean + Z95 * se, se, effective_sample_size(w), n)


def ips(
    rewards: np.ndarray, target: np.ndarray, logging: np.ndarray, clip: float | None = None
) -> Estimate:
    """Inverse propensity scoring; ``clip`` caps the weights (biased, less variable)."""
    r, w = _arrays(rewards, target, logging, clip)
    return _normal(w * r, w)


def snips(
    rewards: np.ndarray, target: np.ndarray, logging: np.ndarray, clip: float | None = None
) -> Estimate:
    """Self-normalised IPS, with the delta-method standard error."""
    r, w = _arrays(rewards, target, logging, clip)
    total = w.sum()
    if total <= 0:
        raise ValueError("the evaluated policy never takes a logged action: SNIPS is undefined")
    value = float((w * r).sum() / total)
    n = len(r)
    se = float(np.sqrt(((w * (r - value)) ** 2).sum()) / total) if n > 1 else float("nan")
    return Estimate(value, value - Z95 * se, value + Z95 * se, se, effective_sample_size(w), n)


def doubly_robust(
    rewards: np.ndarray,
    target: np.ndarray,
    logging: np.ndarray,
    q_logged: np.ndarray,
    q_target: np.ndarray,
    clip: float | None = None,
) -> Estimate:
    """Doubly robust: the reward model's value of the evaluated policy (``q_target``, per
    round) corrected by the weighted residuals of the logged actions (``q_logged``: the
    model's reward for the action taken)."""
    r, w = _arrays(rewards, target, logging, clip)
    q_a = np.asarray(q_logged, dtype=np.float64)
    q_pi = np.asarray(q_target, dtype=np.float64)
    if q_a.shape != r.shape or q_pi.shape != r.shape:
        raise ValueError("q_logged and q_target must align with the rewards")
    return _normal(q_pi + w * (r - q_a), w)


def by_slot(estimates: dict[int, Estimate]) -> Estimate:
    """A page's value from per-slot estimates (the position-based form): the sum of the
    slots' values, their variances added (slots' terms treated as independent), the
    smallest slot ESS."""
    if not estimates:
        raise ValueError("no slot to sum")
    value = sum(e.estimate for e in estimates.values())
    se = float(np.sqrt(sum(e.stderr**2 for e in estimates.values())))
    return Estimate(
        float(value),
        float(value - Z95 * se),
        float(value + Z95 * se),
        se,
        min(e.ess for e in estimates.values()),
        max(e.n for e in estimates.values()),
    )


def compare(estimate: Estimate, truth: float) -> dict[str, Any]:
    """Where the truth is known (a simulator's Oracle): the relative error and whether the
    interval covers it."""
    return {
        **estimate.to_dict(),
        "oracle": truth,
        "relative_error": (estimate.estimate - truth) / truth if truth else float("nan"),
        "covers": bool(estimate.ci_low <= truth <= estimate.ci_high),
    }
