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
- **DRos** (DR with optimistic shrinkage; Su, Dimakopoulou, Krishnamurthy and Dudík, "Doubly
  Robust Off-Policy Evaluation with Shrinkage", 2020; OBP's ``DoublyRobustWithShrinkage``):
  DR with each weight replaced by ŵ = λw / (w² + λ), which leaves the weights well below
  √λ alone and pulls the rare huge ones (a matched slot the logging policy filled with
  probability 0.001) down towards 0, i.e. towards the direct method. λ = ∞ is DR. λ is
  chosen from the logs by SLOPE (Su, Srinath and Krishnamurthy, "Adaptive Estimator
  Selection for Off-Policy Evaluation", 2020, in the SLOPE++ form of Tucker and Lee, 2021,
  which is OBP's ``tuning_method="slope"``): going from the least to the most shrunk, keep
  shrinking while the estimate stays within the confidence widths of every less shrunk one.
  SLOPE lets the shrunk estimate carry a bias of the order of DR's own standard error, so
  the shrunk estimator's own interval, narrow around that value, can miss: DRos's interval
  is the union of it and DR's (never narrower than DR's, covering at least as often).

For a ranked page the action is a slate; the *position-based* (independent) form treats
each slot as its own round, with the slot's item-in-slot probabilities, and the page's value
is the sum over slots (``slate``; ``by_slot`` sums independent slot estimates). Every
estimate carries a 95 % interval (normal, from the per-round terms; SNIPS by the delta
method) and the effective sample size ESS = (Σ w)² / Σ w², the number of on-policy rounds
the weighted log is worth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
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

    def scaled(self, factor: float) -> Estimate:
        """The same estimate in other units (per page -> per 1,000 impressions)."""
        return replace(
            self,
            estimate=self.estimate * factor,
            ci_low=self.ci_low * factor,
            ci_high=self.ci_high * factor,
            stderr=self.stderr * abs(factor),
        )


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


def _snips(r: np.ndarray, w: np.ndarray) -> Estimate:
    total = w.sum()
    if total <= 0:
        raise ValueError("the evaluated policy never takes a logged action: SNIPS is undefined")
    value = float((w * r).sum() / total)
    n = len(r)
    se = float(np.sqrt(((w * (r - value)) ** 2).sum()) / total) if n > 1 else float("nan")
    return Estimate(value, value - Z95 * se, value + Z95 * se, se, effective_sample_size(w), n)


def snips(
    rewards: np.ndarray, target: np.ndarray, logging: np.ndarray, clip: float | None = None
) -> Estimate:
    """Self-normalised IPS, with the delta-method standard error."""
    r, w = _arrays(rewards, target, logging, clip)
    return _snips(r, w)


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
    q_a, q_pi = _reward_model(q_logged, q_target, r.shape)
    return _normal(q_pi + w * (r - q_a), w)


def _reward_model(
    q_logged: np.ndarray, q_target: np.ndarray, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """DR's reward-model arrays as float64, refused unless aligned with the rewards."""
    q_a = np.asarray(q_logged, dtype=np.float64)
    q_pi = np.asarray(q_target, dtype=np.float64)
    if q_a.shape != shape or q_pi.shape != shape:
        raise ValueError("q_logged and q_target must align with the rewards")
    return q_a, q_pi


SHRINKAGE_LAMBDAS = (float("inf"), *(10.0 ** np.arange(8.0, -0.5, -0.5)))  # DR first
SLOPE_DELTA = 0.05  # one-sided level of SLOPE's confidence widths
SLOPE_C = float(np.sqrt(6.0) - 1.0)  # SLOPE++'s constant (Tucker and Lee, 2021)


def shrink(weights: np.ndarray, lam: float) -> np.ndarray:
    """Optimistic shrinkage of importance weights, λw / (w² + λ); λ = ∞ leaves them."""
    w = np.asarray(weights, dtype=np.float64)
    if np.isinf(lam):
        return w
    if lam <= 0:
        raise ValueError(f"the shrinkage λ must be > 0, got {lam}")
    return lam * w / (w * w + lam)


def slope_width(terms: np.ndarray, delta: float = SLOPE_DELTA) -> float:
    """SLOPE's confidence width of a mean: Student-t, one-sided at ``delta``."""
    from scipy import stats

    n = len(terms)
    if n < 2:
        return float("inf")
    return float(np.sqrt(np.var(terms) / (n - 1)) * stats.t(n - 1).ppf(1.0 - delta))


def slope(candidates: list[np.ndarray]) -> int:
    """The index SLOPE++ picks among per-round terms of candidate estimators ordered from
    the least biased (widest) to the most: candidates are visited by decreasing width, and
    one is kept while its mean lies within ``width_i + C · width_j`` of every kept one's."""
    means = np.array([float(t.mean()) for t in candidates])
    widths = np.array([slope_width(t) for t in candidates])
    order = np.argsort(-widths, kind="stable")
    kept: list[int] = []
    for i in order:
        if kept and not np.all(
            np.abs(means[kept] - means[i]) <= widths[i] + SLOPE_C * widths[kept]
        ):
            break
        kept.append(int(i))
    return kept[-1]


def doubly_robust_shrinkage(
    rewards: np.ndarray,
    target: np.ndarray,
    logging: np.ndarray,
    q_logged: np.ndarray,
    q_target: np.ndarray,
) -> tuple[Estimate, float]:
    """DR with optimistic shrinkage, λ chosen by SLOPE: (the estimate, λ; ∞ is DR)."""
    r, w = _arrays(rewards, target, logging, None)
    q_a, q_pi = _reward_model(q_logged, q_target, r.shape)
    out, lam = _shrunk_dr(r[:, None], w[:, None], q_a[:, None], q_pi[:, None])
    return out.page, lam


@dataclass(frozen=True)
class SlateEstimate:
    """A page's value in the position-based form and each slot's (slot 1 first; None for a
    slot the evaluated policy never matched in the log, where SNIPS is undefined).
    ``shrinkage`` is the λ a shrunk estimator chose (∞: none), None for the others."""

    page: Estimate
    slots: tuple[Estimate | None, ...]
    shrinkage: float | None = None

    @property
    def undefined_slots(self) -> list[int]:
        return [k + 1 for k, e in enumerate(self.slots) if e is None]


def slate(
    rewards: np.ndarray,
    weights: np.ndarray,
    q_logged: np.ndarray | None = None,
    q_target: np.ndarray | None = None,
) -> dict[str, SlateEstimate]:
    """IPS, SNIPS and (given a reward model) DR and DRos of a ranked page, position-based
    form.

    Arrays are (requests, slots): the logged reward in each slot, the slot's weight
    ``π(a at k) / π₀(a at k)`` of the item logged there (item-in-slot probabilities, 0
    where the evaluated policy would not put that item there), and for DR the model's
    reward of the logged item and its value under the evaluated policy in that slot.

    Each slot is estimated on its own (``ips``/``snips``/``doubly_robust``); the page is
    the sum of the slots, its interval from the per-request sums (the slots of one request
    are not independent: a request's model terms move together) and, for SNIPS, from the
    summed delta-method influence of the slots. A page's ESS is its smallest slot's.
    """
    r = np.asarray(rewards, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if r.ndim != 2 or r.shape != w.shape or r.shape[0] == 0:
        raise ValueError(
            f"rewards and weights must be aligned (requests, slots) arrays, got {r.shape} "
            f"and {w.shape}"
        )
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("slot weights must be finite and >= 0")
    n, slots = r.shape
    ess = [effective_sample_size(w[:, k]) for k in range(slots)]
    out = {
        "ips": _slate_of(w * r, ess, [_normal(w[:, k] * r[:, k], w[:, k]) for k in range(slots)])
    }

    per_slot: list[Estimate | None] = []
    influence = np.zeros(n)
    for k in range(slots):
        if w[:, k].sum() <= 0:
            per_slot.append(None)
            continue
        e = _snips(r[:, k], w[:, k])
        per_slot.append(e)
        influence += w[:, k] * (r[:, k] - e.estimate) / w[:, k].mean()
    value = sum(e.estimate for e in per_slot if e is not None)
    se = float(np.sqrt((influence**2).sum()) / n) if n > 1 else float("nan")
    page = Estimate(float(value), value - Z95 * se, value + Z95 * se, se, min(ess), n)
    out["snips"] = SlateEstimate(page, tuple(per_slot))

    if q_logged is not None and q_target is not None:
        q_a, q_pi = _reward_model(q_logged, q_target, r.shape)
        terms = q_pi + w * (r - q_a)
        out["dr"] = _slate_of(terms, ess, [_normal(terms[:, k], w[:, k]) for k in range(slots)])
        dros, lam = _shrunk_dr(r, w, q_a, q_pi)
        out["dr_os"] = replace(dros, shrinkage=lam)
    return out


def _shrunk_dr(
    r: np.ndarray, w: np.ndarray, q_a: np.ndarray, q_pi: np.ndarray
) -> tuple[SlateEstimate, float]:
    """DRos of (requests, slots) arrays and its λ: one λ for the page, chosen by SLOPE over
    the per-request page terms, applied to every slot."""
    shrunk = [q_pi + shrink(w, lam) * (r - q_a) for lam in SHRINKAGE_LAMBDAS]
    dr = _normal(shrunk[0].sum(axis=1), np.ones(len(r)))  # λ = ∞ (the first): DR's page
    best = slope([t.sum(axis=1) for t in shrunk])
    lam, w_os = SHRINKAGE_LAMBDAS[best], shrink(w, SHRINKAGE_LAMBDAS[best])
    slots = w.shape[1]
    dros = _slate_of(
        shrunk[best],
        [effective_sample_size(w_os[:, k]) for k in range(slots)],
        [_normal(shrunk[best][:, k], w_os[:, k]) for k in range(slots)],
    )
    # shrinkage buys a better point, not certainty: the interval spans DR's as well
    page = replace(
        dros.page,
        ci_low=min(dros.page.ci_low, dr.ci_low),
        ci_high=max(dros.page.ci_high, dr.ci_high),
    )
    return SlateEstimate(page, dros.slots), lam


def _slate_of(terms: np.ndarray, ess: list[float], slots: list[Estimate]) -> SlateEstimate:
    page = _normal(terms.sum(axis=1), np.ones(len(terms)))
    return SlateEstimate(replace(page, ess=min(ess)), tuple(slots))


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
