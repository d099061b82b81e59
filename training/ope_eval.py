"""Off-policy evaluation checked where the truth is known (``training.ope`` has the
estimators).

**Simulator** (``ranker_ope``, in the evaluate stage): the ranker's value, E[margin-GMV] per
1,000 impressions of its top ``k`` (the figure ``policies.ranker.oracle_egmv_per_1k`` gives
by the Oracle), estimated from the heuristic's logged test-day pages only, then compared with
the Oracle's value of the ranker's pages for the very same requests.

- *Reward* of a logged impression: the margin-GMV (price x quantity x margin) of the
  purchases it led to within ``REWARD_DAYS`` (complete for every test impression), times the
  late-purchase factor: how much later purchases add, measured on impressions the log follows
  for ``LATE_FOLLOW_UP_DAYS``. The Oracle counts every purchase decision, late ones and those
  that failed for stock alike; the log cannot see the failures (docs/ope.md).
- *Weights*, position-based (OBP's independent IPS): slot k of a request has weight
  ``π(a at k) / π₀(a at k)`` for the item ``a`` logged there. The ranker is deterministic, so
  the weight is non-zero only where the heuristic happened to put the ranker's item in the
  ranker's slot. The logged ``propensity`` is the Plackett-Luce factor of the slot *given the
  items above it*, which is the item-in-slot probability at slot 1 only; below, ``π₀(a at k)``
  is computed by replaying the logging policy from the logs (``HeuristicReplay``: its pool,
  price caps and checkout boost rebuilt from clicks, inventory, purchases and carts, and its
  own parameters from the dataset's config) and averaging the exact slot-k factor over
  sampled prefixes (``slot_probabilities``). The replay is checked against the logged slot-1
  propensities (``replay_check``). Items the heuristic could not have shown there (outside
  its daily pool, above the user's price cap) have π₀ = 0: IPS cannot see that part of the
  ranker's value at all (``support``).
- *Direct method* (DR's reward model): the served purchase model's E[GMV] of the item (what
  the ranker sorts by), recalibrated on the validation days' logged impressions to realised
  reward per examination (``DirectMethod``, isotonic), times the estimated examination of
  the slot (``manifest.position_curve``). Nothing here reads the simulator's ground truth;
  the Oracle only scores.

**Open Bandit** (``open_bandit_ope``): Bernoulli Thompson sampling's click rate estimated
from the uniform-random policy's logs of the same week and compared with TS's own logged
(on-policy) click rate, per position and over all rows. TS is context-free, so its
item-in-position probabilities are estimated as the frequency of each item at each position
in its own log (the logged ``action_prob`` of the rows TS chose over-weights the periods an
item was likely: its mean per position sums to ~3.7, not 1). DR's reward model is a
position click rate x a per-item factor shrunk to 1, cross-fitted over ``OBD_FOLDS`` folds.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from contract import columns as C
from contract.heuristic import RECENCY_DAYS, heuristic_score
from contract.paths import Paths
from contract.timeutil import NS_PER_DAY, to_ns
from training import ope
from training.policy_eval import Marketplace, ModelPolicy, Request, request_rows
from training.stages import held_out_period
from training.tables import RowsById

log = logging.getLogger(__name__)

ESTIMATORS = ("ips", "snips", "dr", "dr_os")  # dr_os: DR with SLOPE-tuned shrinkage
REWARD_DAYS = 7  # the training label's window: complete for every test-day impression
LATE_FOLLOW_UP_DAYS = 21  # impressions followed this long tell how much later purchases add
MARGINAL_SAMPLES = 512  # Plackett-Luce prefixes drawn per request for π₀(a at k)
DM_ROWS = 400_000  # validation rows the direct method is fitted on (at most)
POPULARITY_DAYS = 7  # the heuristic's click window
CHECKOUT_BOOST = np.log(8.0)  # the heuristic's logit boost for the cart's categories
TARGET_DR_RELATIVE_ERROR = 0.10

# A policy that also hands back its scores: request id -> (items in rank order, their scores).
Scored = dict[int, tuple[np.ndarray, np.ndarray]]


# --- rewards ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rewards:
    """Margin-GMV within ``REWARD_DAYS`` times ``late_factor``, kept for the impressions that
    earned any (a few per thousand: a full-length array would cost 8 bytes an impression)."""

    ids: np.ndarray  # impression ids, increasing
    values: np.ndarray
    late_factor: float

    def of(self, impression_ids: np.ndarray) -> np.ndarray:
        """Each impression's reward (0 for one that earned nothing)."""
        rows = RowsById(self.ids)(np.asarray(impression_ids, dtype=np.int64))
        return np.where(rows >= 0, self.values[np.maximum(rows, 0)], 0.0)


def impression_rewards(
    impressions: pd.DataFrame, purchases: pd.DataFrame, items: pd.DataFrame
) -> Rewards:
    """Each impression's margin-GMV within ``REWARD_DAYS``, scaled by the late-purchase factor
    (all purchases over those within the window, on impressions followed for
    ``LATE_FOLLOW_UP_DAYS``)."""
    rows = RowsById(impressions[C.IMPRESSION_ID].to_numpy(np.int64))(
        purchases[C.IMPRESSION_ID].to_numpy(np.int64)
    )
    ok = rows >= 0
    rows = rows[ok]
    shown = to_ns(impressions[C.TS].iloc[rows])
    delay = (to_ns(purchases[C.TS])[ok] - shown) / NS_PER_DAY
    margin = pd.Series(items[C.MARGIN].to_numpy(), index=items[C.ITEM_ID].to_numpy())
    item = impressions[C.ITEM_ID].to_numpy(np.int64)[rows]
    value = (
        purchases[C.PRICE].to_numpy()[ok]
        * purchases[C.QUANTITY].to_numpy()[ok]
        * margin.reindex(item).to_numpy(np.float64)
    )
    in_window = delay < REWARD_DAYS
    data_end = pd.Timestamp(impressions[C.TS].max()).value
    followed = shown <= data_end - LATE_FOLLOW_UP_DAYS * NS_PER_DAY
    early = float(value[followed & in_window].sum())
    if early <= 0:
        log.warning(
            "no impression followed for %d days: late purchases not counted", LATE_FOLLOW_UP_DAYS
        )
    late_factor = float(value[followed].sum()) / early if early > 0 else 1.0
    ids = impressions[C.IMPRESSION_ID].to_numpy(np.int64)[rows[in_window]]
    per_id = pd.Series(value[in_window]).groupby(ids).sum()
    return Rewards(
        per_id.index.to_numpy(np.int64), per_id.to_numpy(np.float64) * late_factor, late_factor
    )


# --- the logging policy, replayed --------------------------------------------------------------
@dataclass(frozen=True)
class LoggingPolicy:
    """The heuristic's sampling parameters (the simulator's config: a marketplace knows its
    own production policy)."""

    pool_size: int
    temperature: float
    recency_days: float = RECENCY_DAYS

    @classmethod
    def from_dataset(cls, raw_dir: Path) -> LoggingPolicy | None:
        path = Path(raw_dir) / "dataset.json"
        config = json.loads(path.read_text()).get("config", {}) if path.exists() else {}
        if "pool_size" not in config or "policy_temperature" not in config:
            return None
        return cls(
            int(config["pool_size"]),
            float(config["policy_temperature"]),
            float(config.get("recency_days", RECENCY_DAYS)),
        )


@dataclass(frozen=True)
class DayPool:
    items: np.ndarray  # item indices (Marketplace order) of the day's pool
    logits: np.ndarray  # ln(score) / temperature
    mean_paid: np.ndarray  # per user index, as of the day's start


class HeuristicReplay:
    """The heuristic's Plackett-Luce distribution for a logged request, rebuilt from the logs:
    the day's pool (top ``pool_size`` listed, in-stock items by popularity x recency, clicks
    counted by the day of the impression they came from), the user's price cap and, at
    checkout, the cart's category boost and the cart itself left out."""

    def __init__(
        self,
        market: Marketplace,
        impressions: pd.DataFrame,
        clicks: pd.DataFrame,
        policy: LoggingPolicy,
    ):
        self.market = market
        self.policy = policy
        rows = RowsById(impressions[C.IMPRESSION_ID].to_numpy(np.int64))(
            clicks[C.IMPRESSION_ID].to_numpy(np.int64)
        )
        rows = rows[rows >= 0]
        self._click_ts = to_ns(impressions[C.TS].iloc[rows])
        self._click_item = market.item_index.get_indexer(
            pd.Index(impressions[C.ITEM_ID].to_numpy(np.int64)[rows])
        )

    def day(self, day_start: pd.Timestamp) -> DayPool:
        t0 = day_start.value
        state = self.market.day_state(day_start)
        recent = (self._click_ts >= t0 - POPULARITY_DAYS * NS_PER_DAY) & (self._click_ts < t0)
        n = len(self.market.item_ids)
        pop = np.bincount(self._click_item[recent], minlength=n).astype(float)
        age = (t0 - self.market.created) / NS_PER_DAY
        score = np.where(state.eligible, heuristic_score(pop, age, self.policy.recency_days), 0.0)
        size = min(self.policy.pool_size, int(state.eligible.sum()))
        pool = np.argpartition(-score, size - 1)[:size] if size else np.zeros(0, np.int64)
        return DayPool(pool, np.log(score[pool]) / self.policy.temperature, state.mean_paid)

    def weights(self, day: DayPool, row: Request) -> np.ndarray:
        """Unnormalised Plackett-Luce weights over ``day.items`` for one request."""
        market = self.market
        u = market.user_index.get_loc(row.user_id)
        paid = day.mean_paid[u]
        cap = max(market.user_cap[u], 2.5 * paid) if paid > 0 else market.user_cap[u]
        logits = np.where(market.price[day.items] > cap, -np.inf, day.logits)
        cart = market.cart_of(row.request_id)
        if row.surface == "CHECKOUT" and len(cart):
            cart_idx = market.item_index.get_indexer(pd.Index(cart))
            cart_idx = cart_idx[cart_idx >= 0]
            boost = np.isin(market.category[day.items], market.category[cart_idx])
            logits = np.where(boost, logits + CHECKOUT_BOOST, logits)
            logits = np.where(np.isin(day.items, cart_idx), -np.inf, logits)
        finite = np.isfinite(logits)
        if not finite.any():
            return np.zeros(len(logits))
        return np.where(finite, np.exp(logits - logits[finite].max()), 0.0)


def slot_probabilities(
    weights: np.ndarray,
    targets: np.ndarray,
    slots: np.ndarray,
    rng: np.random.Generator,
    samples: int = MARGINAL_SAMPLES,
) -> np.ndarray:
    """π₀(target at slot) under Plackett-Luce sampling without replacement with ``weights``.

    Slot 1 is exact (w / Σw). For slot k the exact factor given the k - 1 items above,
    ``w_a / (Σw - their weights)`` (0 if ``a`` is among them), is averaged over ``samples``
    prefixes drawn by Gumbel-top-k: a Rao-Blackwellised estimate, far less noisy than counting
    how often ``a`` lands in slot k.
    """
    w = np.asarray(weights, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    slots = np.asarray(slots, dtype=np.int64)
    total = w.sum()
    out = np.zeros(len(targets))
    if total <= 0 or not len(targets):
        return out
    positive = np.flatnonzero(w > 0)
    depth = min(int(slots.max()) - 1, len(positive))
    if depth > 0:
        noisy = np.log(w[positive]) + rng.gumbel(size=(samples, len(positive)))
        top = np.argpartition(-noisy, depth - 1, axis=1)[:, :depth]
        order = np.argsort(-np.take_along_axis(noisy, top, axis=1), axis=1)
        prefix = positive[np.take_along_axis(top, order, axis=1)]
        removed = np.cumsum(w[prefix], axis=1)
    for j, (t, k) in enumerate(zip(targets, slots, strict=True)):
        if w[t] <= 0 or k - 1 > len(positive) - 1:
            continue
        if k == 1:
            out[j] = w[t] / total
            continue
        left = np.maximum(total - removed[:, k - 2], w[t])
        absent = ~(prefix[:, : k - 1] == t).any(axis=1)
        out[j] = float(np.mean(np.where(absent, w[t] / left, 0.0)))
    return out


# --- the direct method -------------------------------------------------------------------------
@dataclass(frozen=True)
class DirectMethod:
    """DR's reward model: ``reward(slot k, item) = examination(k) x scale x E[GMV]^power``,
    the served model's E[GMV] recalibrated to realised reward per examination on logged rows
    (``fit_direct_method``). The recalibration absorbs the quantity per purchase, the late
    purchases and the slot mix the model was trained on (all 50 slots), and its power the
    model's over-dispersion (its top E[GMV] percentiles earn less than it predicts, its bottom
    half more: docs/ope.md). Two parameters rather than an isotonic map: the ranker's items
    sit in the top tail of E[GMV], where an isotonic map's last block rests on a handful of
    purchases. Past the largest E[GMV] it was fitted on it stays at that value: the logs say
    nothing about what lies beyond."""

    scale: float
    power: float
    rows: int
    egmv_max: float = float("inf")  # the largest E[GMV] it was fitted on

    def __call__(self, egmv: np.ndarray, examination: np.ndarray) -> np.ndarray:
        within = np.clip(egmv, 0.0, self.egmv_max)
        return examination * self.scale * np.power(within, self.power)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "scale": self.scale,
            "power": self.power,
            "fitted_egmv_max": self.egmv_max,
        }


EGMV_FLOOR = 1e-6  # E[GMV] below this is fitted as this (its log)


def fit_direct_method(
    egmv: np.ndarray,
    examination: np.ndarray,
    rewards: np.ndarray,
    sample_weight: np.ndarray,
) -> DirectMethod:
    """``scale`` and ``power`` by quasi-Poisson regression (log link, log examination as an
    offset): the rewards are non-negative amounts with mostly zeros, and the fit's total
    equals the realised total."""
    from scipy.optimize import minimize

    if not len(egmv):
        raise ValueError("no logged rows to fit the direct method on")
    x = np.log(np.maximum(np.asarray(egmv, dtype=np.float64), EGMV_FLOOR))
    offset = np.log(np.asarray(examination, dtype=np.float64))
    r = np.asarray(rewards, dtype=np.float64)
    w = np.asarray(sample_weight, dtype=np.float64) / np.sum(sample_weight)

    def loss(p: np.ndarray) -> tuple[float, np.ndarray]:
        eta = offset + p[0] + p[1] * x
        mu = np.exp(eta)
        g = w * (mu - r)
        return float((w * (mu - r * eta)).sum()), np.array([g.sum(), (g * x).sum()])

    start = np.log(max(float((w * r).sum()), 1e-12) / float((w * np.exp(offset + x)).sum()))
    fit = minimize(loss, np.array([start, 1.0]), jac=True, method="BFGS")
    return DirectMethod(float(np.exp(fit.x[0])), float(fit.x[1]), len(r), float(np.max(egmv)))


# --- the simulator's OPE ------------------------------------------------------------------------
def read_logged(raw_dir: Path, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    """The impressions logged in ``[start, end)`` with their slot, policy and propensity."""
    table = pq.read_table(
        Path(raw_dir) / f"{C.IMPRESSIONS}.parquet",
        filters=[(C.TS, ">=", start), (C.TS, "<", end)],
    )
    return table.to_pandas()


@dataclass
class SimulatorLogs:
    """What ``ranker_ope`` reads: the log, the replay of its policy and the truth to score by."""

    market: Marketplace
    replay: HeuristicReplay
    impressions: pd.DataFrame  # the whole log: impression_id, request_id, user_id, item_id, ts
    rewards: Rewards  # aligned with ``impressions``
    logged: pd.DataFrame  # the evaluated days' impressions, all columns
    checkout_carts: pd.DataFrame | None
    examination: np.ndarray  # the estimated curve, slot 1 first
    direct_method: DirectMethod


def _grids(
    requests: pd.DataFrame, logged: pd.DataFrame, reward: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(requests, k) logged item ids (-1: none), rewards and logged propensities."""
    index = pd.Index(requests[C.REQUEST_ID].to_numpy(np.int64))
    i = index.get_indexer(pd.Index(logged[C.REQUEST_ID].to_numpy(np.int64)))
    slot = logged[C.POSITION].to_numpy(np.int64) - 1
    keep = (i >= 0) & (slot >= 0) & (slot < k)
    items = np.full((len(requests), k), -1, dtype=np.int64)
    rewards = np.zeros((len(requests), k))
    propensity = np.zeros((len(requests), k))
    items[i[keep], slot[keep]] = logged[C.ITEM_ID].to_numpy(np.int64)[keep]
    rewards[i[keep], slot[keep]] = reward[keep]
    propensity[i[keep], slot[keep]] = logged[C.PROPENSITY].to_numpy(np.float64)[keep]
    return items, rewards, propensity


def _pages(requests: pd.DataFrame, scored: Scored, market: Marketplace, k: int):
    """(requests, k) ranker item ids (-1: none) and served E[GMV], the cart left out."""
    items = np.full((len(requests), k), -1, dtype=np.int64)
    scores = np.zeros((len(requests), k))
    for i, rid in enumerate(requests[C.REQUEST_ID].to_numpy(np.int64)):
        ranked, s = scored[int(rid)]
        keep = ~np.isin(ranked, market.cart_of(int(rid)))
        ranked, s = ranked[keep][:k], s[keep][:k]
        items[i, : len(ranked)] = ranked
        scores[i, : len(ranked)] = s
    return items, scores


def curve_examination(manifest: dict[str, Any], k: int) -> np.ndarray:
    """The training sets' estimated examination of slots 1..k (slots past the curve take its
    last value, as ``PositionCurve.propensity`` does; 1 everywhere without a curve)."""
    curve = (manifest.get("position_curve") or {}).get("examination")
    if not curve:
        return np.ones(k)
    values = np.asarray(curve, dtype=np.float64)
    return values[np.minimum(np.arange(k), len(values) - 1)]


def fit_direct_method_on_valid(
    home: Path,
    dataset: str,
    egmv: Callable[[np.ndarray, np.ndarray], np.ndarray],
    impressions: pd.DataFrame,
    rewards: Rewards,
    examination: np.ndarray,
) -> DirectMethod:
    """``fit_direct_method`` on (at most ``DM_ROWS`` of) the validation days' logged rows in
    the slots the examination curve covers."""
    from training.ranking.train import ranking_data, read_split_sample

    frame = read_split_sample(home, dataset, "valid", DM_ROWS)
    frame = frame[frame[C.POSITION] <= len(examination)].reset_index(drop=True)
    data = ranking_data(frame)
    return fit_direct_method(
        egmv(data.X, frame[C.ITEM_ID].to_numpy(np.int64)),
        examination[frame[C.POSITION].to_numpy(np.int64) - 1],
        rewards.of(frame[C.IMPRESSION_ID].to_numpy(np.int64)),
        data.sample_weight,
    )


def simulator_logs(
    paths: Paths,
    dataset: str,
    tables: dict[str, pd.DataFrame],
    checkout_carts: pd.DataFrame | None,
    market: Marketplace,
    manifest: dict[str, Any],
    egmv: Callable[[np.ndarray, np.ndarray], np.ndarray],
    k: int,
) -> SimulatorLogs | None:
    """What ``ranker_ope`` needs for the test days of ``manifest``'s split; None when the
    dataset records no logging policy to replay (not a simulator dataset)."""
    policy = LoggingPolicy.from_dataset(paths.raw(dataset))
    if policy is None:
        return None
    impressions = tables[C.IMPRESSIONS]
    rewards = impression_rewards(impressions, tables[C.PURCHASES], tables[C.ITEMS])
    examination = curve_examination(manifest, k)
    start, end = held_out_period(manifest)
    return SimulatorLogs(
        market=market,
        replay=HeuristicReplay(market, impressions, tables[C.CLICKS], policy),
        impressions=impressions,
        rewards=rewards,
        logged=read_logged(paths.raw(dataset), start, end),
        checkout_carts=checkout_carts,
        examination=examination,
        direct_method=fit_direct_method_on_valid(
            paths.home, dataset, egmv, impressions, rewards, examination
        ),
    )


def _heuristic_requests(
    logged: pd.DataFrame, scored: Scored, n: int, seed: int, data_end: int
) -> pd.DataFrame:
    """Up to ``n`` of the heuristic's logged requests whose reward window the log covers,
    those the ranker has already ranked first, then a random sample of the others."""
    rows = logged[logged[C.POLICY] == C.POLICY_HEURISTIC]
    requests = rows.drop_duplicates(C.REQUEST_ID)[[C.REQUEST_ID, C.USER_ID, C.TS, C.SURFACE]]
    complete = to_ns(requests[C.TS]) + REWARD_DAYS * NS_PER_DAY <= data_end
    requests = requests[complete]
    done = requests[C.REQUEST_ID].isin(list(scored)).to_numpy()
    chosen = requests[done]
    if len(chosen) > n:
        chosen = chosen.sample(n, random_state=seed)
    rest = requests[~done]
    more = rest.sample(min(n - len(chosen), len(rest)), random_state=seed)
    out = pd.concat([chosen, more]).sort_values(C.TS, kind="stable")
    return out.reset_index(drop=True)


def ranker_ope(
    logs: SimulatorLogs,
    ranker: ModelPolicy,
    scored: Scored,
    oracle: Any,
    k: int = 20,
    n_requests: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """IPS, SNIPS, DR (and the direct method alone) of ``ranker``'s value from the heuristic's
    logged pages in ``logs.logged``, each against the Oracle's value of the ranker's pages for
    the same requests; figures are E[margin-GMV] per 1,000 impressions of the top ``k``.

    ``ranker`` must record what it ranks into ``scored`` (requests it already ranked are
    reused)."""
    started = time.perf_counter()
    market, replay = logs.market, logs.replay
    data_end = pd.Timestamp(logs.impressions[C.TS].max()).value
    requests = _heuristic_requests(logs.logged, scored, n_requests, seed, data_end)
    if not len(requests):
        return {"skipped": "no heuristic request of the test days has a complete reward window"}
    logged_reward = logs.rewards.of(logs.logged[C.IMPRESSION_ID].to_numpy(np.int64))
    logged_items, rewards, logged_prop = _grids(requests, logs.logged, logged_reward, k)

    rng = np.random.default_rng(seed)
    n = len(requests)
    target_prop = np.zeros((n, k))  # π₀ of the ranker's item in the ranker's slot, at matches
    supported = np.zeros((n, k), dtype=bool)  # π₀(ranker's item at its slot) > 0
    in_pool = np.zeros((n, k), dtype=bool)  # the ranker's item is in the heuristic's day pool
    slot1 = np.full(n, np.nan)  # replayed π₀ of the logged slot-1 item
    items = np.full((n, k), -1, dtype=np.int64)
    scores = np.zeros((n, k))
    for day, group in requests.groupby(requests[C.TS].dt.floor("D"), sort=True):
        day_start = pd.Timestamp(day)
        missing = group[~group[C.REQUEST_ID].isin(list(scored))]
        if len(missing):
            ranker(missing, market.day_state(day_start))
        rows = group.index.to_numpy()
        items[rows], scores[rows] = _pages(group, scored, market, k)
        pool = replay.day(day_start)
        position = pd.Index(market.item_ids[pool.items])
        for i, row in zip(rows, request_rows(group), strict=True):
            w = replay.weights(pool, row)
            at = position.get_indexer(pd.Index(items[i]))
            has = (items[i] >= 0) & (at >= 0)
            supported[i, has] = w[at[has]] > 0
            in_pool[i] = has
            first = position.get_indexer(pd.Index(logged_items[i, :1]))[0]
            slot1[i] = w[first] / w.sum() if first >= 0 and w.sum() > 0 else 0.0
            match = np.flatnonzero((items[i] >= 0) & (items[i] == logged_items[i]))
            if len(match):
                target_prop[i, match] = slot_probabilities(w, at[match], match + 1, rng)

    matched = target_prop > 0
    weights = np.where(matched, 1.0 / np.where(matched, target_prop, 1.0), 0.0)
    q = np.where(items >= 0, logs.direct_method(scores, logs.examination[None, :k]), 0.0)
    estimates = ope.slate(rewards, weights, q, q)
    dm = _mean(q.sum(axis=1))
    ess = [ope.effective_sample_size(weights[:, s]) for s in range(k)]

    truth = np.zeros((n, k))
    truth[items >= 0] = oracle.score_impressions(_page_frame(requests, items), logs.checkout_carts)[
        C.MARGIN
    ].to_numpy()
    per_slot_truth = truth.mean(axis=0)
    per_1k = 1000.0 / k
    oracle_value = float(per_slot_truth.sum() * per_1k)

    out: dict[str, Any] = {"oracle": oracle_value}
    for name in ESTIMATORS:
        out[name] = ope.compare(estimates[name].page.scaled(per_1k), oracle_value)
    # λ is on the weights (π/π₀), not on the reward's units
    out["dr_os"]["shrinkage_lambda"] = estimates["dr_os"].shrinkage
    out["dm"] = ope.compare(dm.scaled(per_1k), oracle_value)
    out["by_slot"] = [
        {
            "slot": s + 1,
            "oracle": float(per_slot_truth[s] * per_1k),
            **{name: _slot_value(estimates[name].slots[s], per_1k) for name in ESTIMATORS},
            "dm": float(q[:, s].mean() * per_1k),
            "ess": ess[s],
            "matches": int(matched[:, s].sum()),
        }
        for s in range(k)
    ]
    out["supported"] = _supported_part(
        rewards, weights, q, truth, supported, per_1k, estimates["ips"]
    )
    logged_p1 = logged_prop[:, 0]
    ok = logged_p1 > 0
    rel = np.abs(slot1[ok] - logged_p1[ok]) / logged_p1[ok]
    has_item = items >= 0
    out["diagnostics"] = {
        "requests": n,
        "slots": k,
        "matched_slots": int(matched.sum()),
        "matched_slots_with_reward": int((matched & (rewards > 0)).sum()),
        # one huge weight times the model's residual is DR's textbook failure (docs/ope.md)
        "largest_weight": float(weights.max()),
        # share of the ranker's slots the heuristic could have filled with the same item,
        # by count and by the direct method's value: what IPS can see at all
        "support_share": float(supported[has_item].mean()) if has_item.any() else 0.0,
        "support_value_share": float(q[supported].sum() / q.sum()) if q.sum() > 0 else 0.0,
        # why the rest is out of reach: not in the day's pool, or priced over the user's cap
        # (or in the checkout cart)
        "unsupported_outside_pool_share": float((has_item & ~in_pool).sum() / has_item.sum())
        if has_item.any()
        else 0.0,
        "unsupported_in_pool_share": float((in_pool & ~supported).sum() / has_item.sum())
        if has_item.any()
        else 0.0,
        # the direct method against the Oracle where IPS can correct it and where it cannot
        "dm_vs_oracle_per_1k": {
            part: {
                "dm": float(q[mask].sum() / n * per_1k),
                "oracle": float(truth[mask].sum() / n * per_1k),
            }
            for part, mask in (("supported", supported), ("unsupported", ~supported & has_item))
        },
        "replay_check": {  # the replayed slot-1 probability vs the logged (exact) propensity
            "requests": int(ok.sum()),
            "median_relative_error": float(np.median(rel)) if len(rel) else None,
            "share_within_1e-6": float((rel < 1e-6).mean()) if len(rel) else None,
        },
        "late_purchase_factor": logs.rewards.late_factor,
        "direct_method": {
            **logs.direct_method.to_dict(),
            # the ranker's slots whose E[GMV] lies past what the model was recalibrated on
            "ranker_slots_past_fitted_range": float(
                (scores[has_item] > logs.direct_method.egmv_max).mean()
            )
            if has_item.any()
            else 0.0,
        },
        "logging_policy_per_1k": {  # the heuristic's own top-k: realised reward vs the Oracle
            "realised": float(rewards.sum(axis=1).mean() * per_1k),
            "oracle": _logged_truth(requests, logs.logged, oracle, logs.checkout_carts, k) * per_1k,
        },
        "seconds": time.perf_counter() - started,
    }
    log.info(
        "OPE of the ranker on %d requests: oracle %.1f, DR %.1f [%.1f, %.1f], DRos %.1f "
        "(lambda %g), DM %.1f, IPS %.1f",
        n,
        oracle_value,
        out["dr"]["estimate"],
        out["dr"]["ci_low"],
        out["dr"]["ci_high"],
        out["dr_os"]["estimate"],
        out["dr_os"]["shrinkage_lambda"],
        out["dm"]["estimate"],
        out["ips"]["estimate"],
    )
    return out


def _supported_part(
    rewards: np.ndarray,
    weights: np.ndarray,
    q: np.ndarray,
    truth: np.ndarray,
    supported: np.ndarray,
    per_1k: float,
    ips: ope.SlateEstimate,
) -> dict[str, Any]:
    """The estimators checked where the logs can check them: the ranker's slots the heuristic
    could have filled with the same item (π₀ > 0). IPS and DR are unbiased for that part's
    value whatever the direct method; on the other slots DR is the direct method and nothing
    in the log can correct it. ``(requests, slots)`` arrays; ``truth`` is the Oracle's value
    of each of the ranker's slots."""
    n = len(truth)
    value = float(truth[supported].sum() / n * per_1k)
    masked = np.where(supported, q, 0.0)
    dr = ope.slate(rewards, weights, masked, masked)["dr"]
    return {
        "slot_share": float(supported.mean()),
        "oracle": value,
        "oracle_share": float(truth[supported].sum() / truth.sum()) if truth.sum() > 0 else 0.0,
        # IPS sees only matched slots, all of them supported: the page's IPS is this part's
        "ips": ope.compare(ips.page.scaled(per_1k), value),
        "dr": ope.compare(dr.page.scaled(per_1k), value),
        "dm": ope.compare(_mean(masked.sum(axis=1)).scaled(per_1k), value),
    }


def ope_targets(section: dict[str, Any]) -> dict[str, Any]:
    """The evaluation's OPE targets: DR within ``TARGET_DR_RELATIVE_ERROR`` of the Oracle,
    its interval covering it; and the same figures for DRos."""
    dr = section.get("dr")
    if not dr:
        return {}
    out = {
        "ope_dr_relative_error": dr["relative_error"],
        "ope_dr_covers": dr["covers"],
        "ope_dr_relative_error_target": TARGET_DR_RELATIVE_ERROR,
    }
    dros = section.get("dr_os")
    if dros:
        out["ope_dr_os_relative_error"] = dros["relative_error"]
        out["ope_dr_os_covers"] = dros["covers"]
    return out


def _mean(values: np.ndarray) -> ope.Estimate:
    return ope.ips(values, np.ones(len(values)), np.ones(len(values)))


def _slot_value(e: ope.Estimate | None, factor: float) -> float | None:
    return None if e is None else e.estimate * factor


def _page_frame(requests: pd.DataFrame, items: np.ndarray) -> pd.DataFrame:
    i, s = np.nonzero(items >= 0)
    frame = requests.iloc[i][[C.REQUEST_ID, C.USER_ID, C.TS]].reset_index(drop=True)
    frame[C.ITEM_ID] = items[i, s]
    frame[C.POSITION] = s + 1
    return frame


def _logged_truth(
    requests: pd.DataFrame, logged: pd.DataFrame, oracle: Any, carts: pd.DataFrame | None, k: int
) -> float:
    rows = logged[logged[C.REQUEST_ID].isin(requests[C.REQUEST_ID]) & (logged[C.POSITION] <= k)]
    return float(oracle.score_impressions(rows, carts)[C.MARGIN].sum() / len(requests))


# --- Open Bandit ----------------------------------------------------------------------------------
OBD_FOLDS = 2
OBD_ITEM_PRIOR_CLICKS = 5.0  # pseudo-clicks shrinking each item's click factor towards 1


def read_obd_log(path: Path) -> pd.DataFrame:
    """One Open Bandit CSV: item_id, position, click, propensity (``action_prob`` or
    ``propensity_score``)."""
    frame = pd.read_csv(path, index_col=0)
    frame = frame.rename(columns={"action_prob": "propensity_score"})
    missing = {"item_id", "position", "click", "propensity_score"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: not an Open Bandit log, columns {sorted(missing)} missing")
    return frame[["item_id", "position", "click", "propensity_score"]]


def obd_policy(log_rows: pd.DataFrame, n_items: int, positions: np.ndarray) -> np.ndarray:
    """(items, positions) probabilities of a context-free policy, as the frequency of each
    item at each position in its own log."""
    counts = np.zeros((n_items, len(positions)))
    col = pd.Index(positions).get_indexer(pd.Index(log_rows["position"]))
    np.add.at(counts, (log_rows["item_id"].to_numpy(), col), 1.0)
    totals = counts.sum(axis=0, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def obd_click_model(
    rows: pd.DataFrame, n_items: int, positions: np.ndarray, prior: float = OBD_ITEM_PRIOR_CLICKS
) -> np.ndarray:
    """(items, positions) click rates: the position's rate x the item's clicks over its
    expected clicks, both counts given ``prior`` pseudo-clicks (an item never clicked gets a
    factor below 1, never 0)."""
    col = pd.Index(positions).get_indexer(pd.Index(rows["position"]))
    clicks = rows["click"].to_numpy(np.float64)
    shown = np.bincount(col, minlength=len(positions)).astype(float)
    ctr = np.divide(
        np.bincount(col, weights=clicks, minlength=len(positions)),
        shown,
        out=np.zeros(len(positions)),
        where=shown > 0,
    )
    item = rows["item_id"].to_numpy()
    expected = np.bincount(item, weights=ctr[col], minlength=n_items)
    observed = np.bincount(item, weights=clicks, minlength=n_items)
    factor = (observed + prior) / (expected + prior)
    return np.clip(factor[:, None] * ctr[None, :], 0.0, 1.0)


def _proportion(clicks: np.ndarray) -> dict[str, float]:
    n = len(clicks)
    p = float(clicks.mean()) if n else float("nan")
    se = float(np.sqrt(p * (1 - p) / n)) if n else float("nan")
    return {"oracle": p, "oracle_ci_low": p - ope.Z95 * se, "oracle_ci_high": p + ope.Z95 * se}


def open_bandit_ope(
    sample_dir: Path, campaign: str = "all", folds: int = OBD_FOLDS, seed: int = 0
) -> dict[str, Any]:
    """Bernoulli TS's click rate from the Random policy's logs (``<sample_dir>/random``),
    against TS's logged click rate (``<sample_dir>/bts``): per estimator overall and by
    position, with the relative error and whether the interval covers the logged rate."""
    root = Path(sample_dir)
    random_log = read_obd_log(root / "random" / campaign / f"{campaign}.csv")
    ts_log = read_obd_log(root / "bts" / campaign / f"{campaign}.csv")
    n_items = int(max(random_log["item_id"].max(), ts_log["item_id"].max())) + 1
    positions = np.union1d(random_log["position"].unique(), ts_log["position"].unique())
    target = obd_policy(ts_log, n_items, positions)

    rng = np.random.default_rng(seed)
    fold = rng.integers(folds, size=len(random_log))
    col = pd.Index(positions).get_indexer(pd.Index(random_log["position"]))
    item = random_log["item_id"].to_numpy()
    q_logged = np.zeros(len(random_log))
    q_target = np.zeros(len(random_log))
    for f in range(folds):
        model = obd_click_model(random_log[fold != f], n_items, positions)
        here = fold == f
        q_logged[here] = model[item[here], col[here]]
        q_target[here] = (target * model).sum(axis=0)[col[here]]

    r = random_log["click"].to_numpy(np.float64)
    pi = target[item, col]
    pi0 = random_log["propensity_score"].to_numpy(np.float64)

    def estimates(m: np.ndarray) -> dict[str, ope.Estimate]:
        return {
            "ips": ope.ips(r[m], pi[m], pi0[m]),
            "snips": ope.snips(r[m], pi[m], pi0[m]),
            "dr": ope.doubly_robust(r[m], pi[m], pi0[m], q_logged[m], q_target[m]),
            "dr_os": ope.doubly_robust_shrinkage(r[m], pi[m], pi0[m], q_logged[m], q_target[m])[0],
        }

    def section(m: np.ndarray, truth_rows: np.ndarray) -> dict[str, Any]:
        truth = _proportion(ts_log["click"].to_numpy(np.float64)[truth_rows])
        return {
            name: {**ope.compare(e, truth["oracle"]), **truth} for name, e in estimates(m).items()
        }

    out: dict[str, Any] = {
        "campaign": campaign,
        "random_rows": len(random_log),
        "ts_rows": len(ts_log),
        "random_clicks": int(r.sum()),
        "ts_clicks": int(ts_log["click"].sum()),
        **section(np.ones(len(r), dtype=bool), np.ones(len(ts_log), dtype=bool)),
        "by_position": {
            int(p): section(
                (random_log["position"] == p).to_numpy(), (ts_log["position"] == p).to_numpy()
            )
            for p in positions
        },
        "policy": "Bernoulli TS, item-in-position frequencies of its own log",
        "reward_model": f"position CTR x item factor ({OBD_ITEM_PRIOR_CLICKS:g} pseudo-clicks), "
        f"{folds}-fold cross-fitted",
    }
    return out


def cached_open_bandit(cache_dir: Path, campaign: str = "all") -> Path | None:
    """The Open Bandit sample's ``obd/`` folder if both logs of ``campaign`` are already in
    ``cache_dir`` (it never fetches: the evaluate stage does not depend on the network)."""
    folder = Path(cache_dir) / "obd"
    logs = [folder / policy / campaign / f"{campaign}.csv" for policy in ("random", "bts")]
    return folder if all(p.is_file() for p in logs) else None
