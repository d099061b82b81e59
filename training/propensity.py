"""Position-bias (examination) propensities estimated from randomized traffic.

In a randomized request the items are drawn uniformly from the eligible pool and put in a
random order, so an item's relevance is independent of its slot and

    CTR(k) = e(k) * E[P(click | examined)]   =>   e(k) / e(1) = CTR(k) / CTR(1).

Click counts per slot are small (1-2 % of traffic is randomized), so the raw ratios are
noisy. What the estimate does with that:

- **Intervals**: each slot's ratio gets a 95 % interval by simulation: every slot's click
  rate redrawn from its Jeffreys posterior and the fit redone, ``BOOTSTRAP`` times.
- **A monotone fit, when the layout has an order**: examination does not rise down a list,
  so by default the slot CTRs are fitted with a non-increasing isotonic regression
  (pool-adjacent-violators, weighted by impressions). A grid or a carousel (Open Bandit's
  left / centre / right) has no such order: ``monotone=False`` keeps the raw ratios.
- **Only slots the data had**: the curve ends at the last slot with randomized impressions
  (``propensity`` gives later slots the last value), and a slot inside it without any takes
  its upper neighbour's value; a slot is never given examination 0.
- **A correction only when the data can tell**: when every slot's interval holds 1 (no slot
  distinguishable from slot 1), ``applied`` is False and ``propensity`` is 1 everywhere (no
  IPS weighting), and the reason says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from contract import columns as C


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


BOOTSTRAP = 400
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PositionCurve:
    positions: np.ndarray  # 1..K, K = the last slot with randomized impressions
    examination: np.ndarray  # e(k) / e(1): the fit (isotonic when monotone), or the raw ratio
    raw: np.ndarray  # CTR(k) / CTR(1) as observed (NaN for a slot without impressions)
    impressions: np.ndarray  # randomized impressions per slot
    clicks: np.ndarray  # their clicks
    stderr: np.ndarray  # delta-method standard error of the raw ratio
    ci_low: np.ndarray  # bootstrap 95 % interval of the ratio
    ci_high: np.ndarray
    monotone: bool
    applied: bool  # False: no slot is distinguishable from slot 1, so no correction
    reason: str

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
        """The manifest's ``position_curve``: the columns, and whether the correction applies."""
        frame = self.to_frame()
        out: dict[str, object] = {str(k): frame[k].tolist() for k in frame.columns}
        out.update(monotone=self.monotone, applied=self.applied, reason=self.reason)
        return out


def _fill_gaps(values: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """A slot without impressions takes the nearest observed slot above it."""
    out = values.copy()
    for k in range(1, len(out)):
        if not observed[k]:
            out[k] = out[k - 1]
    return out


def _fit(ctr: np.ndarray, n: np.ndarray, monotone: bool) -> np.ndarray:
    observed = n > 0
    fitted = isotonic_decreasing(ctr, n) if monotone else ctr
    return _fill_gaps(fitted, observed)


def estimate_position_curve(
    impressions: pd.DataFrame,
    clicks: pd.DataFrame,
    max_position: int = 50,
    monotone: bool = True,
    seed: int = 0,
) -> PositionCurve:
    """Estimate e(k)/e(1) for the slots 1..max_position the randomized requests had."""
    rand = impressions[impressions[C.POLICY] == C.POLICY_RANDOM]
    rand = rand[(rand[C.POSITION] >= 1) & (rand[C.POSITION] <= max_position)]
    if rand.empty:
        raise ValueError(
            "impressions: no rows with policy 'random'; the position curve needs randomized "
            "traffic (the simulator's randomized_share, or a logged randomized experiment)"
        )
    clicked = rand[C.IMPRESSION_ID].isin(clicks[C.IMPRESSION_ID]).to_numpy()
    pos = rand[C.POSITION].to_numpy()
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
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(np.array(ratios), [tail, 100 - tail], axis=0)
    distinct = observed[1:] & ((high[1:] < 1.0) | (low[1:] > 1.0))
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
