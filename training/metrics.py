"""Ranking and probability metrics, pure numpy, every one optionally weighted.

Ranking metrics take one row per (request, item): a relevance label, a model score and the
request (group) id; rows need not be sorted. Ties in the score are broken by a fixed
pseudo-random order of the rows (seeded, so results are reproducible), not by their input
order: training sets list a request's rows in slot order, and breaking ties by it would credit
a coarse score (popularity counts, isotonic steps) with the logging policy's ranking.

Groups without any relevant item carry no ranking information and are left out of the
average (LightGBM's own NDCG counts them as 1); if no group has one the result is NaN.

Weights mean different things per family, as in the models that use them:

- ranking (``ndcg_at_k``, ``recall_at_k``): a per-row multiplier of that row's gain, the
  inverse examination propensity (IPS) of its slot. The weighted NDCG divides the weighted
  DCG of the model's order by the weighted DCG of the best order, per request
  (``average="query"``) or summed over requests (``average="total"``, the form to compare
  policies with on logged clicks; see :func:`ndcg_at_k`).
- probability metrics (``auc``, ``log_loss``, ``pr_auc``, calibration): a per-row sample
  weight, e.g. the ``1 / rate`` of a downsampled negative, so the figure is the one of the
  full population.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

BinStrategy = Literal["equal_mass", "equal_width"]
Average = Literal["query", "total"]
TIE_BREAK_SEED = 20_260_105


def _weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"weights must have one value per row ({n}), got shape {w.shape}")
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("weights must be finite and non-negative")
    return w


def _check_same_length(**arrays: np.ndarray) -> int:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays must have the same length, got {lengths}")
    return next(iter(lengths.values()))


def _group_ranks(
    scores: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row order sorted by (group, score descending, fixed random tie-break), the 0-based
    rank of each sorted row within its group, and the group index (0..G-1) of each sorted
    row."""
    tie_break = np.random.default_rng(TIE_BREAK_SEED).permutation(len(scores))
    order = np.lexsort((tie_break, -scores, groups))
    g = groups[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    group_index = np.cumsum(np.r_[False, g[1:] != g[:-1]])
    rank = np.arange(len(g)) - starts[group_index]
    return order, rank, group_index


def dcg_per_group(gains: np.ndarray, scores: np.ndarray, groups: np.ndarray, k: int) -> np.ndarray:
    """DCG@k of each group (ascending group id) with the rows' ``gains`` ordered by ``scores``.

    The building block of the NDCGs below, public so that a per-iteration evaluator (the
    ranker's early stopping) can compute the ideal DCG once and reuse it.
    """
    order, rank, gidx = _group_ranks(np.asarray(scores, dtype=np.float64), np.asarray(groups))
    discount = np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0)
    return np.bincount(gidx, weights=np.asarray(gains, dtype=np.float64)[order] * discount)


def ndcg_at_k(
    labels: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    k: int,
    weights: np.ndarray | None = None,
    average: Average = "query",
) -> float:
    """NDCG@k with graded gain ``2**label - 1`` (times ``weights`` if given).

    ``weights`` (IPS): each row's gain is multiplied by its weight both in the DCG and in the
    ideal DCG, so a relevant item seen at a rarely examined slot counts for more.

    ``average="query"``: the mean over groups of DCG / ideal DCG (the usual NDCG).
    ``average="total"``: sum of DCGs / sum of ideal DCGs. With IPS weights this is the one to
    compare policies with: the per-group ratio normalises each request by its own few
    clicks, so a request with one click scores that click's rank whatever its weight and the
    correction vanishes; on the sim-small validation split the per-group IPS NDCG rated the
    logged order as high as the Oracle's. The total form's denominator does not depend on
    the scores, so it orders rankings like the IPS-weighted DCG, which is unbiased.
    """
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    groups = np.asarray(groups)
    n = _check_same_length(labels=labels, scores=scores, groups=groups)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if average not in ("query", "total"):
        raise ValueError(f"average must be 'query' or 'total', got {average!r}")
    if n == 0:
        return float("nan")
    gains = (np.exp2(labels) - 1.0) * _weights(weights, n)
    dcg = dcg_per_group(gains, scores, groups, k)
    ideal = dcg_per_group(gains, gains, groups, k)
    has = ideal > 0
    if not has.any():
        return float("nan")
    if average == "total":
        return float(dcg[has].sum() / ideal[has].sum())
    return float(np.mean(dcg[has] / ideal[has]))


def recall_at_k(
    labels: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    k: int,
    weights: np.ndarray | None = None,
) -> float:
    """Mean over groups of the (weighted) share of relevant rows (label > 0) in the top k."""
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    groups = np.asarray(groups)
    n = _check_same_length(labels=labels, scores=scores, groups=groups)
    if n == 0:
        return float("nan")
    relevant = (labels > 0) * _weights(weights, n)
    order, rank, gidx = _group_ranks(scores, groups)
    hit = np.bincount(gidx, weights=relevant[order] * (rank < k))
    total = np.bincount(gidx, weights=relevant[order])
    has = total > 0
    if not has.any():
        return float("nan")
    return float(np.mean(hit[has] / total[has]))


def _binary(labels: np.ndarray) -> np.ndarray:
    y = np.asarray(labels, dtype=np.float64)
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0/1")
    return y


def auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Weighted ROC AUC: P(score of a positive > score of a negative), ties counted half."""
    y = _binary(labels)
    s = np.asarray(scores, dtype=np.float64)
    n = _check_same_length(labels=y, scores=s)
    w = _weights(weights, n)
    pos_w, neg_w = w * y, w * (1.0 - y)
    total_pos, total_neg = pos_w.sum(), neg_w.sum()
    if total_pos == 0 or total_neg == 0:
        return float("nan")
    uniq, inverse = np.unique(s, return_inverse=True)  # ascending
    pos_b = np.bincount(inverse, weights=pos_w, minlength=len(uniq))
    neg_b = np.bincount(inverse, weights=neg_w, minlength=len(uniq))
    neg_below = np.cumsum(neg_b) - neg_b
    return float(np.sum(pos_b * (neg_below + 0.5 * neg_b)) / (total_pos * total_neg))


def auc_interval(
    labels: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    weights: np.ndarray | None = None,
    draws: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """A ``confidence`` interval of the weighted AUC by a clustered Poisson bootstrap: each
    group (a request: its rows are not independent) gets one Poisson(1) weight per draw."""
    y = _binary(labels)
    s = np.asarray(scores, dtype=np.float64)
    n = _check_same_length(labels=y, scores=s)
    w = _weights(weights, n)
    _, group = np.unique(np.asarray(groups), return_inverse=True)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        boot = rng.poisson(1.0, group.max() + 1)[group] * w
        value = auc(y, s, boot)
        if np.isfinite(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def log_loss(
    labels: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None, eps: float = 1e-15
) -> float:
    """Weighted mean binary cross-entropy (natural log); probabilities clipped to [eps, 1-eps]."""
    y = _binary(labels)
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1.0 - eps)
    n = _check_same_length(labels=y, probs=p)
    w = _weights(weights, n)
    if w.sum() == 0:
        return float("nan")
    loss = -(y * np.log(p) + (1.0 - y) * np.log1p(-p))
    return float(np.sum(w * loss) / w.sum())


def pr_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Weighted average precision: sum over score thresholds of (recall step) x precision.

    Tied scores form one threshold (as in scikit-learn's ``average_precision_score``).
    """
    y = _binary(labels)
    s = np.asarray(scores, dtype=np.float64)
    n = _check_same_length(labels=y, scores=s)
    w = _weights(weights, n)
    total_pos = float(np.sum(w * y))
    if total_pos == 0:
        return float("nan")
    uniq, inverse = np.unique(-s, return_inverse=True)  # descending scores
    tp = np.cumsum(np.bincount(inverse, weights=w * y, minlength=len(uniq)))
    seen = np.cumsum(np.bincount(inverse, weights=w, minlength=len(uniq)))
    precision = np.divide(tp, seen, out=np.zeros_like(tp), where=seen > 0)
    recall_step = np.diff(np.r_[0.0, tp]) / total_pos
    return float(np.sum(recall_step * precision))


@dataclass(frozen=True)
class ReliabilityCurve:
    """Per non-empty bin: mean predicted probability, observed positive rate, total weight."""

    mean_predicted: np.ndarray
    observed_rate: np.ndarray
    weight: np.ndarray

    def to_dict(self) -> dict[str, list[float]]:
        return {
            "mean_predicted": self.mean_predicted.tolist(),
            "observed_rate": self.observed_rate.tolist(),
            "weight": self.weight.tolist(),
        }


def reliability_curve(
    labels: np.ndarray,
    probs: np.ndarray,
    weights: np.ndarray | None = None,
    n_bins: int = 10,
    strategy: BinStrategy = "equal_mass",
) -> ReliabilityCurve:
    """Bin predictions and compare each bin's mean prediction with its observed rate.

    ``equal_mass`` (the default): bins hold equal total weight of rows sorted by prediction,
    so a rare-event model (purchase p ~ 0.5 %) gets as many informative bins as a balanced
    one; rows with the same prediction may straddle two bins. ``equal_width``: bins of width
    1 / n_bins on [0, 1], where such a model puts nearly everything in the first bin.
    """
    y = _binary(labels)
    p = np.asarray(probs, dtype=np.float64)
    n = _check_same_length(labels=y, probs=p)
    w = _weights(weights, n)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if strategy == "equal_width":
        bins = np.clip((p * n_bins).astype(np.int64), 0, n_bins - 1)
    elif strategy == "equal_mass":
        order = np.argsort(p, kind="stable")
        cum = np.cumsum(w[order])
        total = cum[-1] if n else 0.0
        mid = (cum - 0.5 * w[order]) / total if total > 0 else np.zeros(n)
        bins = np.empty(n, dtype=np.int64)
        bins[order] = np.clip((mid * n_bins).astype(np.int64), 0, n_bins - 1)
    else:
        raise ValueError(f"strategy must be 'equal_mass' or 'equal_width', got {strategy!r}")
    weight = np.bincount(bins, weights=w, minlength=n_bins)
    pred = np.bincount(bins, weights=w * p, minlength=n_bins)
    obs = np.bincount(bins, weights=w * y, minlength=n_bins)
    keep = weight > 0
    return ReliabilityCurve(pred[keep] / weight[keep], obs[keep] / weight[keep], weight[keep])


def expected_calibration_error(
    labels: np.ndarray,
    probs: np.ndarray,
    weights: np.ndarray | None = None,
    n_bins: int = 10,
    strategy: BinStrategy = "equal_mass",
) -> float:
    """Weighted mean over bins of |mean prediction - observed rate|, bins weighted by their
    total weight. Equal-mass bins by default (see :func:`reliability_curve`)."""
    curve = reliability_curve(labels, probs, weights, n_bins, strategy)
    if curve.weight.sum() == 0:
        return float("nan")
    gap = np.abs(curve.mean_predicted - curve.observed_rate)
    return float(np.sum(curve.weight * gap) / curve.weight.sum())
