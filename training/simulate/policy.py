"""The logging policy: the production heuristic (``contract.heuristic``) the simulator
serves feeds with.

popularity x recency with price filters, sampled Plackett-Luce so that every shown item has
a logged propensity. A randomized request is the same sampler at infinite temperature
(uniform over the eligible pool). The functions are pure so that evaluation can replay the
heuristic as a baseline policy.
"""

from __future__ import annotations

import numpy as np

NEG_INF = -np.inf


def plackett_luce_topk(
    logits: np.ndarray, k: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ordered top-``k`` slates without replacement, one per row of ``logits``.

    Uses the Gumbel-top-k trick. Returns ``(columns, propensities)``, both (rows, k):
    ``propensities[r, j]`` is the probability that the policy put ``columns[r, j]`` in slot
    j given slots < j (the Plackett-Luce factor), which is what IPS on a slot needs. Slots
    the row could not fill (fewer than k finite logits) get column -1 and propensity 0.
    """
    width = logits.shape[1]
    k = min(k, width)
    perturbed = logits + rng.gumbel(size=logits.shape)
    top = np.argpartition(-perturbed, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(perturbed, top, axis=1), axis=1)
    cols = np.take_along_axis(top, order, axis=1)

    finite = np.isfinite(logits)
    row_max = np.max(np.where(finite, logits, NEG_INF), axis=1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.where(finite, np.exp(logits - row_max), 0.0)
    total = weights.sum(axis=1, keepdims=True)
    chosen = np.take_along_axis(weights, cols, axis=1)
    before = np.cumsum(chosen, axis=1) - chosen
    remaining = total - before
    with np.errstate(invalid="ignore", divide="ignore"):
        prop = np.where(chosen > 0, chosen / remaining, 0.0)
    cols = np.where(chosen > 0, cols, -1)
    return cols, np.clip(prop, 0.0, 1.0)
