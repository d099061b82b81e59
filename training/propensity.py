"""Position-bias (examination) propensities e(k)/e(1): from randomized traffic, and from the
logging policy's own rank variation (intervention harvesting).

Both estimates return a ``PositionCurve`` over slots 1..K (K at most ``max_position``):

- **randomized**: in a randomized request the items are drawn uniformly from the eligible
  pool and put in a random order, so an item's relevance is independent of its slot and
  ``CTR(k) = e(k) * E[P(click | examined)]``, hence ``e(k)/e(1) = CTR(k)/CTR(1)``. Unbiased
  by design, but only 1-2 % of traffic is randomized: noisy (``_randomized``).
- **harvested** (Agarwal, Zaitsev, Wang, Li, Najork, Joachims, WSDM 2019): a stochastic
  logging policy shows the same item at different slots across requests. Within a group
  g = (item, UTC day, surface) of logging-policy impressions, ``E[clicks at k] = n_gk *
  e(k) * r_g``, r_g the group's mean relevance; conditioning on the group's click total
  removes r_g exactly (a multinomial over the group's slots, the conditional / fixed-effects
  Poisson likelihood), so every group with clicks at two or more slots compares those slots
  with no model of relevance and no incidental-parameter bias. The per-slot exposure counts
  n_gk do what the placement propensities do in Agarwal et al.'s weighted estimator. Fitted
  by Newton's method; intervals from the cluster-robust (by group) sandwich covariance, or
  the model's when that is wider (few groups).
  The assumption: within a group, which slot an impression got is independent of its
  user's relevance. True of a non-personalized sampled policy (the simulator's heuristic:
  popularity x recency, Gumbel noise, refreshed daily), hence ``HARVEST_POLICIES``; false on
  a surface whose policy boosts items by something that also raises their click rate (the
  checkout page boosts the cart's categories, which cart-match also makes likelier clicked),
  hence ``HARVEST_SURFACES``; false for a personalized ranker, where only the agreement
  check below protects. Randomized rows are left out so the two estimates are independent.

Common to both:

- **A monotone fit, when the layout has an order**: examination does not rise down a list,
  so by default the curve is fitted with a non-increasing isotonic regression
  (pool-adjacent-violators). A grid or a carousel (Open Bandit's left / centre / right) has
  no such order: ``monotone=False`` keeps the raw ratios.
- **Intervals** by simulation, ``BOOTSTRAP`` draws with the fit redone each time: every
  slot's click rate from its Jeffreys posterior (randomized), or the log ratios from their
  normal approximation (harvested).
- **Only slots the data had**: the curve ends at the last slot with data (``propensity``
  gives later slots the last value), and a slot inside it without any takes its upper
  neighbour's value; a slot is never given examination 0.
- **A correction only when the data can tell**: when every slot's interval holds 1 (no slot
  distinguishable from slot 1), ``applied`` is False and ``propensity`` is 1 everywhere (no
  IPS weighting), and the reason says so.

**Which curve is applied** (``all_traffic=True``): the harvested one when it agrees with the
randomized one (``Agreement``: the randomized clicks per slot tested against what the
harvested curve predicts, jointly and for a trend, at ``AGREEMENT_P``), the randomized one
when they disagree or nothing could be harvested.
Not a precision-weighted combination: the harvested intervals are several times narrower
(docs/simulator.md), so a combination would be the harvested curve with the randomized
one's unbiasedness diluted away, and its intervals would claim a precision the harvested
bias (not in its intervals) does not have. The randomized curve's job is to catch that
bias, so it is kept beside the applied one with the per-slot comparison. Without randomized
traffic the harvested curve is applied unvalidated, and the reason says so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy import sparse, stats
from scipy.sparse import csgraph

from contract import columns as C
from contract.timeutil import NS_PER_DAY, to_ns

BOOTSTRAP = 400
CONFIDENCE = 0.95
# the harvested curve is applied unless the randomized one rejects it at this level (the
# family-wise level of the two tests of ``Agreement``, each run at half of it)
AGREEMENT_P = 0.05
# traffic whose rank variation is independent of relevance within (item, day, surface): the
# module docstring says why randomized rows and the checkout surface are not in it
HARVEST_POLICIES: tuple[str, ...] = (C.POLICY_HEURISTIC,)
HARVEST_SURFACES: tuple[str, ...] = (C.SURFACES[0],)  # HOME
HARVEST_CHUNK_ROWS = 1 << 20  # impressions read at a time: the harvest's memory bound
NEWTON_MAX_ITER = 100

METHOD_RANDOMIZED = "randomized"
METHOD_HARVESTED = "harvested"
METHOD_NONE = "none"  # neither estimate was possible: no correction


def isotonic_decreasing(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted least-squares fit of a non-increasing sequence (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(values.astype(float), weights.astype(float), strict=True):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks.pop()
            w = w1 + w2
            blocks.append([(m1 * w1 + m2 * w2) / w if w > 0 else (m1 + m2) / 2, w, n1 + n2])
    return np.concatenate([np.full(int(n), m) for m, _, n in blocks])


@dataclass(frozen=True)
class Agreement:
    """The harvested curve tested on the randomized traffic's clicks, over the slots both
    have. Under the harvested curve ê, slot k's randomized clicks have mean
    μ_k = n_k ê_k ρ̂, ρ̂ their common click rate given examination (fitted). Residuals
    c_k - μ_k, with their covariance: Poisson given the total, plus ê's own (the harvested
    sandwich). Counts, not log ratios: a slot with few or no randomized clicks still counts
    and weighs what it should. Two tests: the joint one over every slot, and one on the trend
    of the residuals in log(slot), which is how a biased harvest shows (a curve too steep or
    too flat) and which the joint test, spread over many slots, can miss."""

    positions: np.ndarray
    observed: np.ndarray  # randomized clicks per slot
    expected: np.ndarray  # μ_k under the harvested curve
    z: np.ndarray  # each slot's residual over its standard error
    chi2: float  # joint statistic, len(positions) - 1 degrees of freedom
    p_value: float
    trend: float  # slope of log(randomized / harvested) per log(slot), one score step
    trend_p: float

    @property
    def agrees(self) -> bool:
        return min(self.p_value, self.trend_p) >= AGREEMENT_P / 2

    @property
    def disagreeing(self) -> np.ndarray:
        """Slots whose own 95 % test rejects (about 1 in 20 does by chance)."""
        return self.positions[np.abs(self.z) > stats.norm.ppf(0.5 + CONFIDENCE / 2)]

    def to_dict(self) -> dict[str, object]:
        return {
            C.POSITION: self.positions.tolist(),
            "observed": self.observed.tolist(),
            "expected": self.expected.tolist(),
            "z": self.z.tolist(),
            "disagreeing": self.disagreeing.tolist(),
            "chi2": self.chi2,
            "dof": len(self.positions) - 1,
            "p_value": self.p_value,
            "trend": self.trend,
            "trend_p": self.trend_p,
            "agrees": self.agrees,
        }


@dataclass(frozen=True)
class PositionCurve:
    positions: np.ndarray  # 1..K, K = the last slot the estimate had data for
    examination: np.ndarray  # e(k) / e(1): the fit (isotonic when monotone), or the raw ratio
    raw: np.ndarray  # the estimate before the fit (NaN for a slot without data)
    impressions: np.ndarray  # impressions per slot the estimate used
    clicks: np.ndarray  # their clicks
    stderr: np.ndarray  # standard error of the raw ratio
    ci_low: np.ndarray  # 95 % interval of ``examination``
    ci_high: np.ndarray
    monotone: bool
    applied: bool  # False: no slot is distinguishable from slot 1, so no correction
    reason: str
    method: str = METHOD_RANDOMIZED
    # with all_traffic: both estimates, kept beside the applied one, and their comparison
    randomized: PositionCurve | None = None
    harvested: PositionCurve | None = None
    agreement: Agreement | None = None

    def propensity(self, position: np.ndarray) -> np.ndarray:
        """Examination propensity of each slot; slots past the curve take its last value;
        1 everywhere when the correction is not applied."""
        position = np.asarray(position, dtype=np.int64)
        if not self.applied:
            return np.ones(position.shape)
        idx = np.clip(position, 1, len(self.positions)) - 1
        return self.examination[idx]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                C.POSITION: self.positions,
                "examination": self.examination,
                "raw": self.raw,
                "ci_low": self.ci_low,
                "ci_high": self.ci_high,
                "impressions": self.impressions,
                "clicks": self.clicks,
                "stderr": self.stderr,
            }
        )

    def to_dict(self) -> dict[str, object]:
        """The manifest's ``position_curve``: the columns, whether the correction applies and
        which estimate it is, and (all traffic) both estimates and their comparison."""
        frame = self.to_frame()
        out: dict[str, object] = {str(k): frame[k].tolist() for k in frame.columns}
        out.update(
            monotone=self.monotone, applied=self.applied, reason=self.reason, method=self.method
        )
        for name, part in (
            (METHOD_RANDOMIZED, self.randomized),
            (METHOD_HARVESTED, self.harvested),
            ("agreement", self.agreement),
        ):
            if part is not None:
                out[name] = part.to_dict()
        return out


def _fill_gaps(values: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """A slot without data takes the nearest observed slot above it."""
    out = values.copy()
    for k in range(1, len(out)):
        if not observed[k]:
            out[k] = out[k - 1]
    return out


def _fit(values: np.ndarray, weights: np.ndarray, monotone: bool) -> np.ndarray:
    observed = weights > 0
    fitted = isotonic_decreasing(values, weights) if monotone else values
    return _fill_gaps(fitted, observed)


def _interval(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail], axis=0)
    return low, high


def _distinct(observed: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Later slots whose interval excludes slot 1's examination (1)."""
    return observed[1:] & ((high[1:] < 1.0) | (low[1:] > 1.0))


# --- randomized traffic -------------------------------------------------------------------


def _randomized(pos: np.ndarray, clicked: np.ndarray, monotone: bool, seed: int) -> PositionCurve:
    """CTR(k) / CTR(1) over randomized impressions (``pos`` >= 1, ``clicked`` aligned)."""
    last = int(pos.max())
    n = np.bincount(pos, minlength=last + 1)[1:].astype(float)
    c = np.bincount(pos, weights=clicked, minlength=last + 1)[1:]
    if n[0] == 0 or c[0] == 0:
        raise ValueError("impressions: no randomized clicks in slot 1; cannot normalise the curve")
    observed = n > 0
    ctr = np.divide(c, n, out=np.zeros_like(c), where=observed)
    fitted = _fit(ctr, n, monotone)
    raw = np.where(observed, ctr / ctr[0], np.nan)
    # var(log ratio) ~ 1/c_k + 1/c_1 (Poisson clicks); se of the ratio by the delta method
    with np.errstate(divide="ignore", invalid="ignore"):
        stderr = raw * np.sqrt(np.where(c > 0, 1.0 / c, np.inf) + 1.0 / c[0])
    # interval: every slot's click rate redrawn from its Jeffreys posterior, Beta(c + 1/2,
    # n - c + 1/2) (a slot with no click still gets a width), the whole fit redone
    rng = np.random.default_rng(seed)
    rates = rng.beta(c + 0.5, np.maximum(n - c, 0) + 0.5, size=(BOOTSTRAP, len(n)))
    rates[:, ~observed] = 0.0
    ratios = []
    for rate in rates:
        boot = _fit(rate, n, monotone)
        ratios.append(boot / boot[0])
    low, high = _interval(np.array(ratios))
    distinct = _distinct(observed, low, high)
    applied = bool(distinct.any())
    if applied:
        reason = f"{int(distinct.sum())} of {len(n) - 1} later slots differ from slot 1 at 95 %"
    else:
        reason = (
            f"no slot's 95 % interval excludes slot 1's examination ({int(c.sum())} randomized "
            f"clicks over {len(n)} slots): no position correction is applied"
        )
    return PositionCurve(
        positions=np.arange(1, len(n) + 1),
        examination=fitted / fitted[0],
        raw=raw,
        impressions=n,
        clicks=c,
        stderr=stderr,
        ci_low=low,
        ci_high=high,
        monotone=monotone,
        applied=applied,
        reason=reason,
    )


def _randomized_rows(
    impressions: pd.DataFrame, rows: np.ndarray | None, max_position: int
) -> pd.DataFrame:
    pos = impressions[C.POSITION].to_numpy()
    keep = (impressions[C.POLICY] == C.POLICY_RANDOM).to_numpy()
    keep &= (pos >= 1) & (pos <= max_position)
    if rows is not None:
        keep &= rows
    return impressions.loc[keep, [C.IMPRESSION_ID, C.POSITION]]


# --- intervention harvesting ----------------------------------------------------------------


@dataclass(frozen=True)
class _Harvest:
    log_ratio: np.ndarray  # log e(k)/e(1) per slot 1..K, NaN where not identified
    cov: np.ndarray  # (K, K) sandwich covariance of log_ratio; 0 / NaN outside identified
    identified: np.ndarray
    impressions: np.ndarray  # per slot, in the groups that inform the fit
    clicks: np.ndarray
    groups: int
    iterations: int


def _hits(ids: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    if len(sorted_ids) == 0:
        return np.zeros(len(ids), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[at] == ids


def harvest_cells(
    impressions: pd.DataFrame,
    clicks: pd.DataFrame,
    rows: np.ndarray | None = None,
    max_position: int = 50,
    policies: tuple[str, ...] = HARVEST_POLICIES,
    surfaces: tuple[str, ...] = HARVEST_SURFACES,
    chunk_rows: int = HARVEST_CHUNK_ROWS,
) -> pd.DataFrame:
    """Impressions and clicks per (group, slot) of the harvestable rows: one row per cell,
    columns ``group`` (0..G-1: item x UTC day x surface), ``slot`` (0-based), ``n``, ``c``.

    Read ``chunk_rows`` impressions at a time, so memory follows the cells (a few per
    item-day), not the log."""
    click_ids = np.unique(clicks[C.IMPRESSION_ID].to_numpy())
    keys = ["item", "day", "surface", "slot"]
    parts: list[pd.DataFrame] = []
    for lo in range(0, len(impressions), chunk_rows):
        part = impressions.iloc[lo : lo + chunk_rows]
        pos = part[C.POSITION].to_numpy()
        keep = (pos >= 1) & (pos <= max_position) & part[C.POLICY].isin(policies).to_numpy()
        if rows is not None:
            keep &= rows[lo : lo + chunk_rows]
        surface = np.full(len(part), -1, dtype=np.int8)
        for code, name in enumerate(surfaces):
            surface[(part[C.SURFACE] == name).to_numpy()] = code
        keep &= surface >= 0
        if not keep.any():
            continue
        frame = pd.DataFrame(
            {
                "item": part[C.ITEM_ID].to_numpy()[keep],
                "day": to_ns(part[C.TS])[keep] // NS_PER_DAY,
                "surface": surface[keep],
                "slot": pos[keep] - 1,
                "c": _hits(part[C.IMPRESSION_ID].to_numpy()[keep], click_ids).astype(np.int64),
            }
        )
        parts.append(frame.groupby(keys, sort=False)["c"].agg(n="size", c="sum").reset_index())
    if not parts:
        return pd.DataFrame({"group": [], "slot": [], "n": [], "c": []}, dtype=np.int64)
    cells = pd.concat(parts, ignore_index=True).groupby(keys, sort=False)[["n", "c"]].sum()
    cells = cells.reset_index()
    group = cells.groupby(["item", "day", "surface"], sort=False).ngroup().to_numpy()
    return pd.DataFrame(
        {
            "group": group.astype(np.int64),
            "slot": cells["slot"].to_numpy(np.int64),
            "n": cells["n"].to_numpy(np.int64),
            "c": cells["c"].to_numpy(np.int64),
        }
    )


def _informative(
    group: np.ndarray, slot: np.ndarray, c: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Cells that inform the slot ratios: in a group with a click and two or more slots, at a
    slot with a click, in the slot-1 component of the slot-group graph. Returns the cell mask
    and the identified slots (slot 0 among them when any other is)."""
    keep = np.ones(len(group), dtype=bool)
    n_slots = int(slot.max()) + 1 if len(slot) else 1
    while True:  # each pass drops cells; stops when none is dropped
        g, s, cc = group[keep], slot[keep], c[keep]
        G = int(group.max()) + 1 if len(group) else 0
        group_clicks = np.bincount(g, weights=cc, minlength=G)
        group_slots = np.bincount(g, minlength=G)
        slot_clicks = np.bincount(s, weights=cc, minlength=n_slots)
        ok = (group_clicks[g] > 0) & (group_slots[g] > 1) & (slot_clicks[s] > 0)
        if ok.all():
            break
        keep[np.flatnonzero(keep)[~ok]] = False
    identified = np.zeros(n_slots, dtype=bool)
    if not keep.any() or not (slot[keep] == 0).any():
        return keep, identified
    g, s = group[keep], slot[keep]
    G = int(group.max()) + 1
    # bipartite graph: nodes 0..n_slots-1 are slots, n_slots.. are groups
    graph = sparse.coo_matrix((np.ones(len(g)), (s, n_slots + g)), shape=(n_slots + G, n_slots + G))
    _, label = csgraph.connected_components(graph, directed=False)
    linked = label[:n_slots] == label[0]
    identified[:] = linked & (np.bincount(s, minlength=n_slots) > 0)
    keep[np.flatnonzero(keep)[~identified[s]]] = False
    if identified.sum() < 2:
        identified[:] = False
    return keep, identified


def _fit_harvest(cells: pd.DataFrame) -> _Harvest | None:
    """Maximum conditional likelihood of log e(k)/e(1) over the cells; None when no slot is
    linked to slot 1 by an item-day's rank variation."""
    group_all = cells["group"].to_numpy()
    slot_all = cells["slot"].to_numpy()
    c_all = cells["c"].to_numpy().astype(float)
    keep, identified = _informative(group_all, slot_all, c_all)
    if not identified.any():
        return None
    K = int(np.flatnonzero(identified).max()) + 1
    free = np.flatnonzero(identified)  # slot 0 first
    index = np.full(K, -1)
    index[free] = np.arange(len(free))
    _, g = np.unique(group_all[keep], return_inverse=True)
    s = index[slot_all[keep]]
    n = cells["n"].to_numpy()[keep].astype(float)
    c = c_all[keep]
    G, m = int(g.max()) + 1, len(free)
    group_clicks = np.bincount(g, weights=c, minlength=G)
    slot_clicks = np.bincount(s, weights=c, minlength=m)

    def expected(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each cell's share of its group's exposure, and its group's total."""
        exposure = n * np.exp(theta[s])
        total = np.bincount(g, weights=exposure, minlength=G)
        return exposure / total[g], total

    def loglik(theta: np.ndarray) -> float:
        _, total = expected(theta)
        return float(slot_clicks @ theta - group_clicks @ np.log(total))

    theta = np.zeros(m)
    information = np.zeros((m, m))
    share = np.zeros(len(c))
    iterations = 0
    while iterations < NEWTON_MAX_ITER:
        iterations += 1
        share, _ = expected(theta)
        fitted = group_clicks[g] * share
        grad = slot_clicks - np.bincount(s, weights=fitted, minlength=m)
        spread = sparse.csr_matrix((np.sqrt(group_clicks[g]) * share, (g, s)), shape=(G, m))
        information = np.diag(np.bincount(s, weights=fitted, minlength=m))
        information -= (spread.T @ spread).toarray()
        step = np.zeros(m)
        # least squares: a slot linked to slot 1 by very few clicks is nearly unidentified
        step[1:] = np.linalg.lstsq(information[1:, 1:], grad[1:], rcond=None)[0]
        before, t = loglik(theta), 1.0
        while loglik(theta + t * step) < before and t > 1e-6:
            t /= 2
        theta = theta + t * step
        if np.abs(t * step).max() < 1e-9:
            break
    share, _ = expected(theta)
    residual = c - group_clicks[g] * share
    scores = sparse.csr_matrix((residual, (g, s)), shape=(G, m))
    meat = (scores.T @ scores).toarray()[1:, 1:]
    bread = np.linalg.pinv(information[1:, 1:], hermitian=True)
    robust = bread @ meat @ bread * G / max(G - 1, 1)
    # the sandwich holds under any dependence within a group but reads low with few groups;
    # the Poisson model's own covariance errs wide (a Bernoulli click varies less than a
    # Poisson count): the wider of the two
    cov = np.zeros((K, K))
    cov[np.ix_(free[1:], free[1:])] = robust if np.trace(robust) >= np.trace(bread) else bread
    log_ratio = np.full(K, np.nan)
    log_ratio[free] = theta
    return _Harvest(
        log_ratio=log_ratio,
        cov=cov,
        identified=identified[:K],
        impressions=np.bincount(free[s], weights=n, minlength=K),
        clicks=np.bincount(free[s], weights=c, minlength=K),
        groups=G,
        iterations=iterations,
    )


def _harvested(fit: _Harvest, monotone: bool, seed: int) -> PositionCurve:
    observed = fit.identified
    raw = np.exp(fit.log_ratio)  # NaN where not identified
    var = np.diag(fit.cov)
    stderr = np.where(observed, raw * np.sqrt(var), np.nan)
    # the fit's weights: each slot's Poisson information about e(k), c_k / e(k)^2
    weights = np.where(observed, fit.clicks / np.where(observed, raw, 1.0) ** 2, 0.0)
    values = np.where(observed, raw, 0.0)
    fitted = _fit(values, weights, monotone)
    free = np.flatnonzero(observed)[1:]
    rng = np.random.default_rng([seed, 1])
    draws = rng.multivariate_normal(
        fit.log_ratio[free], fit.cov[np.ix_(free, free)], size=BOOTSTRAP, method="eigh"
    )
    ratios = []
    for draw in draws:
        boot = values.copy()
        boot[free] = np.exp(draw)
        boot = _fit(boot, weights, monotone)
        ratios.append(boot / boot[0])
    low, high = _interval(np.array(ratios))
    distinct = _distinct(observed, low, high)
    applied = bool(distinct.any())
    K = len(raw)
    if applied:
        reason = f"{int(distinct.sum())} of {K - 1} later slots differ from slot 1 at 95 %"
    else:
        reason = (
            f"no slot's 95 % interval excludes slot 1's examination ({int(fit.clicks.sum())} "
            f"harvested clicks over {K} slots): no position correction is applied"
        )
    return PositionCurve(
        positions=np.arange(1, K + 1),
        examination=fitted / fitted[0],
        raw=raw,
        impressions=fit.impressions,
        clicks=fit.clicks,
        stderr=stderr,
        ci_low=low,
        ci_high=high,
        monotone=monotone,
        applied=applied,
        reason=reason,
        method=METHOD_HARVESTED,
    )


def compare(randomized: PositionCurve, fit: _Harvest) -> Agreement | None:
    """The tests of ``Agreement``; None without two slots to compare or a randomized click."""
    K = min(len(randomized.positions), len(fit.log_ratio))
    idx = np.flatnonzero(fit.identified[:K] & (randomized.impressions[:K] > 0))
    c = randomized.clicks[idx]
    if len(idx) < 2 or c.sum() == 0:
        return None
    exposure = randomized.impressions[idx] * np.exp(fit.log_ratio[idx])
    mu = exposure * c.sum() / exposure.sum()
    # d mu / d log e = (I - mu 1' / M) diag(mu): the common rate refits when e moves
    jac = np.diag(mu) - np.outer(mu, mu) / mu.sum()
    cov = jac + jac @ fit.cov[np.ix_(idx, idx)] @ jac.T
    residual = c - mu
    chi2 = float(residual @ np.linalg.pinv(cov, hermitian=True) @ residual)
    x = np.log(idx + 1.0)
    score, variance = float(x @ residual), float(x @ cov @ x)
    return Agreement(
        positions=idx + 1,
        observed=c,
        expected=mu,
        z=residual / np.sqrt(np.diag(cov)),
        chi2=chi2,
        p_value=float(stats.chi2.sf(chi2, len(idx) - 1)),
        trend=score / float(x @ jac @ x),
        trend_p=float(2 * stats.norm.sf(abs(score) / np.sqrt(variance))),
    )


# --- the estimate -------------------------------------------------------------------------


def estimate_position_curve(
    impressions: pd.DataFrame,
    clicks: pd.DataFrame,
    max_position: int = 50,
    monotone: bool = True,
    seed: int = 0,
    *,
    all_traffic: bool = False,
    rows: np.ndarray | None = None,
) -> PositionCurve:
    """Estimate e(k)/e(1) for slots 1..max_position.

    ``all_traffic=False``: from the randomized requests only (raises ``ValueError`` without
    any, or without a click in slot 1). ``all_traffic=True``: the randomized and the
    harvested estimates, the applied one chosen as the module docstring says; needs the
    item, ts and surface columns; never raises for lack of data: with neither estimate the
    curve is ``method="none"``, not applied. ``rows``: a boolean mask of the impressions to
    use (the table is read in place, not copied)."""
    if rows is not None:
        rows = np.asarray(rows, dtype=bool)
    rand = _randomized_rows(impressions, rows, max_position)
    if not all_traffic:
        if rand.empty:
            raise ValueError(
                "impressions: no rows with policy 'random'; the position curve needs "
                "randomized traffic (the simulator's randomized_share, or a logged randomized "
                "experiment)"
            )
        clicked = rand[C.IMPRESSION_ID].isin(clicks[C.IMPRESSION_ID]).to_numpy()
        return _randomized(rand[C.POSITION].to_numpy(), clicked, monotone, seed)

    randomized: PositionCurve | None = None
    why: list[str] = []
    if rand.empty:
        why.append("no randomized traffic")
    else:
        clicked = rand[C.IMPRESSION_ID].isin(clicks[C.IMPRESSION_ID]).to_numpy()
        if clicked[rand[C.POSITION].to_numpy() == 1].any():
            randomized = _randomized(rand[C.POSITION].to_numpy(), clicked, monotone, seed)
        else:
            why.append("no randomized click in slot 1")
    del rand
    fit = _fit_harvest(harvest_cells(impressions, clicks, rows, max_position))
    harvested = None if fit is None else _harvested(fit, monotone, seed)
    if fit is None:
        why.append(
            f"nothing to harvest: no slot is linked to slot 1 by an item shown at both within "
            f"a day ({'/'.join(HARVEST_POLICIES)} traffic on {'/'.join(HARVEST_SURFACES)}, "
            "no rank variation)"
        )
    agreement = None if fit is None or randomized is None else compare(randomized, fit)

    chosen: PositionCurve
    if harvested is not None and (agreement is None or agreement.agrees):
        chosen = harvested
        assert fit is not None
        if agreement is None:
            check = "not validated: " + ("; ".join(why) or "no slot to compare")
        else:
            check = (
                f"agrees with the randomized curve over {len(agreement.positions)} slots "
                f"(joint p = {agreement.p_value:.2f}, trend p = {agreement.trend_p:.2f})"
            )
        head = f"harvested from {fit.groups} item-days, {check}"
    elif randomized is not None:
        chosen = randomized
        if agreement is not None:
            head = (
                f"randomized: the harvested curve disagrees with it (joint p = "
                f"{agreement.p_value:.2g}, trend {agreement.trend:+.2f} per log slot, p = "
                f"{agreement.trend_p:.2g}; slots {agreement.disagreeing.tolist()} at 95 %)"
            )
        else:
            head = "randomized: " + "; ".join(why)
    else:
        return PositionCurve(
            positions=np.array([1]),
            examination=np.ones(1),
            raw=np.full(1, np.nan),
            impressions=np.zeros(1),
            clicks=np.zeros(1),
            stderr=np.zeros(1),
            ci_low=np.ones(1),
            ci_high=np.ones(1),
            monotone=monotone,
            applied=False,
            reason="no position curve (" + "; ".join(why) + "): no position correction is applied",
            method=METHOD_NONE,
        )
    return replace(
        chosen,
        reason=f"{head}; {chosen.reason}",
        randomized=randomized,
        harvested=harvested,
        agreement=agreement,
    )
