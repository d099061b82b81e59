"""Position-bias (examination) propensities estimated from randomized traffic.

In a randomized request the items are drawn uniformly from the eligible pool and put in a
random order, so an item's relevance is independent of its slot and

    CTR(k) = e(k) * E[P(click | examined)]   =>   e(k) / e(1) = CTR(k) / CTR(1).

Click counts per slot are small (1-2 % of traffic is randomized), so the raw ratios are
noisy; examination does not rise with position, so the slot CTRs are fitted with a
non-increasing isotonic regression (pool-adjacent-violators, weighted by impressions) before
normalising. Positions past ``max_position`` are ignored.
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


@dataclass(frozen=True)
class PositionCurve:
    positions: np.ndarray  # 1..max_position
    examination: np.ndarray  # e(k) / e(1), isotonic
    raw: np.ndarray  # CTR(k) / CTR(1) before the monotone fit
    impressions: np.ndarray  # randomized impressions per slot
    clicks: np.ndarray  # their clicks
    stderr: np.ndarray  # delta-method standard error of the raw ratio

    def propensity(self, position: np.ndarray) -> np.ndarray:
        """Examination propensity of each slot; slots past the curve take its last value."""
        idx = np.clip(np.asarray(position, dtype=np.int64), 1, len(self.positions)) - 1
        return self.examination[idx]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                C.POSITION: self.positions,
                "examination": self.examination,
                "raw": self.raw,
                "impressions": self.impressions,
                "clicks": self.clicks,
                "stderr": self.stderr,
            }
        )


def estimate_position_curve(
    impressions: pd.DataFrame, clicks: pd.DataFrame, max_position: int = 20
) -> PositionCurve:
    """Estimate e(k)/e(1) for k = 1..max_position from the randomized requests."""
    rand = impressions[impressions[C.POLICY] == C.POLICY_RANDOM]
    rand = rand[rand[C.POSITION] <= max_position]
    if rand.empty:
        raise ValueError(
            "impressions: no rows with policy 'random'; the position curve needs randomized "
            "traffic (the simulator's randomized_share, or a logged randomized experiment)"
        )
    clicked = rand[C.IMPRESSION_ID].isin(clicks[C.IMPRESSION_ID]).to_numpy()
    pos = rand[C.POSITION].to_numpy()
    n = np.bincount(pos, minlength=max_position + 1)[1:].astype(float)
    c = np.bincount(pos, weights=clicked, minlength=max_position + 1)[1:]
    if n[0] == 0 or c[0] == 0:
        raise ValueError("impressions: no randomized clicks in slot 1; cannot normalise the curve")
    valid = n > 0
    ctr = np.divide(c, n, out=np.zeros_like(c), where=valid)
    fitted = isotonic_decreasing(ctr, n)
    raw = ctr / ctr[0]
    # var(log ratio) ~ 1/c_k + 1/c_1 (Poisson clicks); se of the ratio by the delta method
    with np.errstate(divide="ignore"):
        stderr = raw * np.sqrt(np.where(c > 0, 1.0 / c, np.inf) + 1.0 / c[0])
    return PositionCurve(
        positions=np.arange(1, max_position + 1),
        examination=fitted / fitted[0],
        raw=raw,
        impressions=n,
        clicks=c,
        stderr=stderr,
    )
