"""Re-ranking: from scored candidates to a page, with category diversity, new-seller
exposure and epsilon-exploration. Pure numpy; the only randomness is the generator passed in.

The candidates are ``n`` items (already filtered: in stock, not in the cart), described by
parallel arrays. Items are referred to by their index ``0..n-1`` in those arrays; an
"order" is a permutation of the indices, best first. The rules, in the order they apply:

0. **Base order.** Score descending (E[GMV], or the heuristic score when ranking was
   down), ties in candidate order; without scores (features were down) the candidate order
   itself (retrieval's).

1. **Category cap** (``max_per_category`` items of one category in the first
   ``diversity_depth`` slots; skipped when the categories are unknown). An item is
   *eligible* when fewer than ``max_per_category`` items of its category precede it in the
   base order. The first ``diversity_depth`` slots go to the best ``diversity_depth``
   eligible items in base order; every other item follows, in base order. So the excess of
   a crowded category is pushed down just below the capped slots, and when fewer than
   ``diversity_depth`` items are eligible (a candidate list of one or two categories), the
   eligible ones come first and the best excess items fill the remaining capped slots: the
   cap then holds on the longest prefix it can. Items placed above their base-order
   position (they moved into freed slots) get reason DIVERSITY; nothing after the capped
   slots ever moves up.

2. **New-seller share** (skipped when unknown). Let ``P = min(page_size, n)`` and
   ``target = ceil(new_seller_min_share x P)``, at most the number of new-seller
   candidates. When the first ``P`` slots hold ``k < target`` new-seller items, the
   ``target - k`` lowest non-new-seller slots of the page are handed, top slot first, to
   the best new-seller items below the page, each the best one that keeps its category
   within the cap when the slot is among the first ``diversity_depth`` (the best one
   regardless when none does: the exposure share wins over diversity). Promoted items get
   reason NEW_SELLER; the displaced items move to just below the page, in their order.

3. **Exploration** (``epsilon``). The candidates retrieval drew for exploration (source
   EXPLORATION: the first ``k`` of a uniformly random ordering of its eligible pool of
   ``|E|`` items, ``k`` at most ~10, none of them in the ranked candidates) never take a
   slot of the deterministic order of rules 0-2. Slots are filled top to bottom; for each, a
   coin with P(heads) = epsilon decides: heads, the slot takes the next exploration
   candidate in retrieval's order; tails, the best not-yet-placed item of the
   deterministic order. When one list is used up, the other fills the remaining slots.
   Explored slots get reason EXPLORATION.

**Propensity.** The logged propensity of a slot is the exact probability that the policy
shows that item in that slot, over the coins and retrieval's draw (the request, its ranked
candidates and the eligible pool fixed). With ``t`` the number of explored slots above
slot ``s`` (a Markov chain over the coins, computed exactly in ``slot_probabilities``):

    deterministic item r (0-based in the order):  P(t = s - r before s) x P(tails | t, s)
    exploration item j:                            P(slot s explores) / |E|

since the ``t``-th exploration candidate is uniform over the eligible pool whatever ``t``
is. So epsilon = 0 gives 1 everywhere; every propensity is in (0, 1]. An inverse-propensity
estimator over served logs (slot by slot) is then unbiased for the whole policy, retrieval's
draw included.

The generator is seeded from the request id (``request_seed``), so a request with the same
id and the same candidates gets the same page.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np
from homefeed.feed.v1 import feed_pb2

RANKED = feed_pb2.REASON_RANKED
EXPLORATION = feed_pb2.REASON_EXPLORATION
NEW_SELLER = feed_pb2.REASON_NEW_SELLER
DIVERSITY = feed_pb2.REASON_DIVERSITY
HEURISTIC = feed_pb2.REASON_HEURISTIC
POPULAR = feed_pb2.REASON_POPULAR
CART_SIMILAR = feed_pb2.REASON_CART_SIMILAR

_SHARE_EPS = 1e-9  # 0.1 x 30 is 3.0000000000000004 in floating point; ceil must give 3


@dataclass(frozen=True)
class RerankConfig:
    max_per_category: int = 4
    diversity_depth: int = 20  # the slots the category cap applies to
    new_seller_min_share: float = 0.1  # of the page
    epsilon: float = 0.05  # per-slot exploration probability

    def __post_init__(self) -> None:
        if self.max_per_category < 1:
            raise ValueError(f"max_per_category must be >= 1, got {self.max_per_category}")
        if self.diversity_depth < 0:
            raise ValueError(f"diversity_depth must be >= 0 slots, got {self.diversity_depth}")
        if not 0.0 <= self.new_seller_min_share <= 1.0:
            raise ValueError(
                f"new_seller_min_share must be in [0, 1], got {self.new_seller_min_share}"
            )
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")


@dataclass(frozen=True)
class Page:
    """The page as indices into the candidate arrays, display order, one entry per slot."""

    index: np.ndarray  # int64
    reasons: np.ndarray  # int32 feed.v1.Reason
    propensities: np.ndarray  # float64 in (0, 1]


def request_seed(request_id: str) -> int:
    """A 64-bit seed from the request id (blake2b: stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little")


def base_order(n: int, scores: np.ndarray | None) -> np.ndarray:
    """Rule 0: indices by score descending, ties in candidate order; no scores: 0..n-1."""
    if scores is None:
        return np.arange(n, dtype=np.int64)
    return np.argsort(-scores, kind="stable").astype(np.int64, copy=False)


def cap_categories(
    order: np.ndarray, categories: np.ndarray, max_per_category: int, depth: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rule 1: the capped order and a per-item mask of the items it moved up."""
    n = len(order)
    moved = np.zeros(len(categories), dtype=bool)
    depth = min(depth, n)
    if depth == 0:
        return order, moved
    cats = categories[order]
    head = np.sort(cats[:depth])
    if not (head[max_per_category:] == head[: len(head) - max_per_category]).any():
        return order, moved  # no category has more than max_per_category in the head
    by_category = np.argsort(cats, kind="stable")  # groups a category, base order inside
    grouped = cats[by_category]
    group_start = np.zeros(n, dtype=np.int64)
    starts = np.flatnonzero(grouped[1:] != grouped[:-1]) + 1
    group_start[starts] = starts
    np.maximum.accumulate(group_start, out=group_start)
    occurrence = np.empty(n, dtype=np.int64)
    occurrence[by_category] = np.arange(n) - group_start
    top = np.flatnonzero(occurrence < max_per_category)[:depth]
    rest = np.ones(n, dtype=bool)
    rest[top] = False
    positions = np.concatenate([top, np.flatnonzero(rest)])
    new_order = order[positions]
    up = positions > np.arange(n)
    moved[new_order[up]] = True
    return new_order, moved


def promote_new_sellers(
    order: np.ndarray,
    new_seller: np.ndarray,
    page_size: int,
    min_share: float,
    categories: np.ndarray | None = None,
    max_per_category: int = 0,
    depth: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rule 2: the new order, a per-item mask of the promoted items and one of the displaced
    ones. ``categories`` None (or ``depth`` 0) ignores the category cap."""
    n = len(order)
    promoted = np.zeros(len(new_seller), dtype=bool)
    displaced = np.zeros(len(new_seller), dtype=bool)
    size = min(page_size, n)
    is_new = new_seller[order]
    # only the new sellers in ``order`` can be promoted (``new_seller`` also covers items
    # outside it, such as the exploration candidates)
    target = min(math.ceil(min_share * size - _SHARE_EPS), int(is_new.sum()))
    need = target - int(is_new[:size].sum())
    if need <= 0:
        return order, promoted, displaced
    slots = np.flatnonzero(~is_new[:size])[-need:]
    below = np.flatnonzero(is_new[size:]) + size  # positions of new-seller items, best first
    if categories is None or depth == 0:
        chosen = below[:need]
    else:
        head = min(depth, size)
        head_cats = categories[order[:head]]
        live = np.ones(head, dtype=bool)  # capped slots whose item stays
        below_cats = categories[order[below]]
        free = np.ones(len(below), dtype=bool)
        picks = []
        for slot in slots.tolist():  # `need` turns: at most page_size x share
            if slot < head:
                live[slot] = False
                counts = ((below_cats[:, None] == head_cats[None, :]) & live).sum(axis=1)
                fits = free & (counts < max_per_category)
                pick = int(np.argmax(fits)) if fits.any() else int(np.argmax(free))
                head_cats[slot] = below_cats[pick]
                live[slot] = True
            else:
                pick = int(np.argmax(free))
            free[pick] = False
            picks.append(pick)
        chosen = below[np.asarray(picks, dtype=np.int64)]
    page = order[:size].copy()
    out = order[slots]
    page[slots] = order[chosen]
    keep = np.ones(n - size, dtype=bool)
    keep[chosen - size] = False
    new_order = np.concatenate([page, out, order[size:][keep]])
    promoted[order[chosen]] = True
    displaced[out] = True
    return new_order, promoted, displaced


def slot_probabilities(
    size: int, n_order: int, n_explore: int, epsilon: float
) -> tuple[np.ndarray, np.ndarray]:
    """The exploration chain of a page of ``size`` slots over ``n_order`` deterministic and
    ``n_explore`` exploration candidates: ``before[s, t]``, the probability that ``t`` slots
    above slot ``s`` explored, and ``heads[s, t]``, the probability that slot ``s``
    explores given that (1 when the deterministic order is used up, 0 when the exploration
    candidates are). Read-only arrays of ``min(n_explore, size) + 1`` columns.

    Only ``min(n_order, size)`` and ``min(n_explore, size)`` can change the chain (a page
    never uses more than ``size`` of either), so it is computed once per such shape and
    cached: the loop was a tenth of the gateway's CPU when computed per request."""
    return _chain(size, min(n_order, size), min(n_explore, size), float(epsilon))


@functools.lru_cache(maxsize=1024)
def _chain(
    size: int, n_order: int, n_explore: int, epsilon: float
) -> tuple[np.ndarray, np.ndarray]:
    before = np.zeros((size + 1, n_explore + 1), dtype=np.float64)
    before[0, 0] = 1.0
    heads = np.zeros((size, n_explore + 1), dtype=np.float64)
    t = np.arange(n_explore + 1)
    for s in range(size):
        det_left = n_order - (s - t) > 0  # a deterministic item is left to place
        exp_left = t < n_explore
        heads[s] = np.where(exp_left, np.where(det_left, epsilon, 1.0), 0.0)
        reach = before[s] * np.where(det_left | exp_left, 1.0, 0.0)
        before[s + 1] += reach * (1.0 - heads[s])
        before[s + 1, 1:] += (reach * heads[s])[:-1]
    before.flags.writeable = False
    heads.flags.writeable = False
    return before, heads


def explore(
    order: np.ndarray,
    explore_items: np.ndarray,
    pool_size: int,
    page_size: int,
    epsilon: float,
    rng: np.random.Generator | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rule 3: the page's items, a per-slot explored mask and the exact propensities.

    ``order``: the deterministic order (rules 0-2, no exploration candidate in it);
    ``explore_items``: the exploration candidates in retrieval's order; ``pool_size``: the
    eligible pool they were drawn from (at least ``len(explore_items)``).
    """
    n_order, n_explore = len(order), len(explore_items) if epsilon > 0 else 0
    size = min(page_size, n_order + n_explore)
    if size == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, np.zeros(0, dtype=bool), np.empty(0, dtype=np.float64)
    if n_explore == 0 or rng is None:
        return order[:size].copy(), np.zeros(size, dtype=bool), np.ones(size, dtype=np.float64)
    before, heads = slot_probabilities(size, n_order, n_explore, epsilon)
    coins = rng.random(size)
    items = np.empty(size, dtype=np.int64)
    explored = np.zeros(size, dtype=bool)
    props = np.empty(size, dtype=np.float64)
    pool = max(pool_size, n_explore)
    t = 0
    for s in range(size):
        if coins[s] < heads[s, t]:
            items[s] = explore_items[t]
            explored[s] = True
            props[s] = float(before[s] @ heads[s]) / pool
            t += 1
        else:
            items[s] = order[s - t]
            props[s] = before[s, t] * (1.0 - heads[s, t])
    return items, explored, props


def rerank(
    n: int,
    page_size: int,
    config: RerankConfig,
    base_reasons: np.ndarray,
    *,
    scores: np.ndarray | None = None,
    categories: np.ndarray | None = None,
    new_seller: np.ndarray | None = None,
    exploration: np.ndarray | None = None,
    pool_size: int = 0,
    rng: np.random.Generator | None = None,
) -> Page:
    """Rules 0-3 over ``n`` candidates (see the module docstring).

    ``base_reasons`` (per item) is what an item's slot says when no rule moved it;
    ``categories``/``new_seller`` None skip rules 1/2; ``exploration`` (per item) marks
    retrieval's exploration candidates, drawn from a pool of ``pool_size``; ``rng`` None
    (or epsilon 0) skips exploration.
    """
    reasons = base_reasons.astype(np.int32, copy=True)
    order = base_order(n, scores)
    explore_items = np.empty(0, dtype=np.int64)
    if exploration is not None and exploration.any():
        order = order[~exploration[order]]
        explore_items = np.flatnonzero(exploration)
    if categories is not None and config.diversity_depth > 0:
        order, moved = cap_categories(
            order, categories, config.max_per_category, config.diversity_depth
        )
        reasons[moved] = DIVERSITY
    if new_seller is not None and config.new_seller_min_share > 0.0:
        order, promoted, displaced = promote_new_sellers(
            order,
            new_seller,
            page_size,
            config.new_seller_min_share,
            categories,
            config.max_per_category,
            config.diversity_depth,
        )
        reasons[displaced] = base_reasons[displaced]
        reasons[promoted] = NEW_SELLER
    items, explored, propensities = explore(
        order, explore_items, pool_size, page_size, config.epsilon, rng
    )
    slot_reasons = reasons[items]
    slot_reasons[explored] = EXPLORATION
    return Page(items, slot_reasons, propensities)
