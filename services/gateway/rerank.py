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

3. **Exploration** (``epsilon``). Slots are filled top to bottom. For each slot a coin
   with P(heads) = epsilon decides: heads, the slot goes to an item drawn uniformly from
   the *pool*; tails, to the best not-yet-placed item of the order from rules 0-2. The pool
   is the not-yet-placed candidates that retrieval sampled for exploration (source
   EXPLORATION) when any is left, else all not-yet-placed candidates. Explored slots get
   reason EXPLORATION. Explored items can break rules 1 and 2 on the page; the
   deterministic order still satisfies them.

**Propensity.** The logged propensity of slot ``s`` is the probability that the policy
puts the item it placed there in slot ``s``, given the items placed in slots ``1..s-1``
(the request's candidates fixed)::

    p_s(i) = (1 - epsilon) x [i is the best not-yet-placed item]
             + epsilon x [i in pool_s] / |pool_s|

It depends only on which item was placed, not on how the coin fell: an explored draw that
happens to pick the deterministic item gets ``1 - epsilon + epsilon / |pool_s|``, as does a
deterministic slot whose item is in the pool. So epsilon = 0 gives 1 everywhere and
epsilon = 1 gives ``1 / |pool_s|``; every propensity is in (0, 1], and the product over
slots ``1..s`` is the probability of the page's first ``s`` slots, which is what a
slot-wise or a top-k inverse-propensity estimator needs.

The generator is seeded from the request id (``request_seed``), so a request with the same
id and the same candidates gets the same page.
"""

from __future__ import annotations

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
    target = min(math.ceil(min_share * size - _SHARE_EPS), int(new_seller.sum()))
    is_new = new_seller[order]
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


def explore(
    order: np.ndarray,
    page_size: int,
    epsilon: float,
    rng: np.random.Generator | None,
    preferred: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rule 3: the page's items, a per-slot explored mask and the propensities.

    ``preferred`` (per item) marks the exploration-source candidates. Runs of deterministic
    slots are filled with vectorized steps; the Python loop turns once per explored slot.
    """
    n = len(order)
    size = min(page_size, n)
    if size == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, np.zeros(0, dtype=bool), np.empty(0, dtype=np.float64)
    if epsilon == 0.0 or rng is None:
        return order[:size].copy(), np.zeros(size, dtype=bool), np.ones(size, dtype=np.float64)
    coins = rng.random(size) < epsilon
    pref = np.zeros(n, dtype=bool) if preferred is None else preferred.astype(bool, copy=False)
    placed = np.zeros(n, dtype=bool)
    items = np.empty(size, dtype=np.int64)
    props = np.empty(size, dtype=np.float64)
    pref_left = int(pref.sum())
    cursor = 0  # positions of `order` before it hold placed items only
    slot = 0  # also the number of items placed so far
    for stop in [*np.flatnonzero(coins).tolist(), size]:
        run = stop - slot
        if run > 0:  # deterministic slots slot..stop-1
            tail = order[cursor : cursor + run + slot]  # enough: at most `slot` are placed
            free = np.flatnonzero(~placed[tail])[:run]
            picked = tail[free]
            cursor += int(free[-1]) + 1
            left_before = (n - slot) - np.arange(run)
            if pref_left == 0:
                props[slot:stop] = (1.0 - epsilon) + epsilon / left_before
            else:
                picked_pref = pref[picked]
                pref_before = pref_left - (np.cumsum(picked_pref) - picked_pref)
                restricted = pref_before > 0
                pool = np.where(restricted, pref_before, left_before)
                in_pool = np.where(restricted, picked_pref, True)
                props[slot:stop] = (1.0 - epsilon) + epsilon * in_pool / pool
                pref_left -= int(picked_pref.sum())
            items[slot:stop] = picked
            placed[picked] = True
            slot = stop
        if slot == size:
            break
        pool_items = np.flatnonzero(~placed & pref) if pref_left > 0 else np.flatnonzero(~placed)
        item = int(pool_items[rng.integers(len(pool_items))])
        while placed[order[cursor]]:
            cursor += 1
        greedy = int(order[cursor])
        props[slot] = epsilon / len(pool_items) + (1.0 - epsilon) * (item == greedy)
        items[slot] = item
        placed[item] = True
        pref_left -= int(pref[item])
        slot += 1
    return items, coins, props


def rerank(
    n: int,
    page_size: int,
    config: RerankConfig,
    base_reasons: np.ndarray,
    *,
    scores: np.ndarray | None = None,
    categories: np.ndarray | None = None,
    new_seller: np.ndarray | None = None,
    preferred: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> Page:
    """Rules 0-3 over ``n`` candidates (see the module docstring).

    ``base_reasons`` (per item) is what an item's slot says when no rule moved it;
    ``categories``/``new_seller`` None skip rules 1/2; ``rng`` None (or epsilon 0) skips
    exploration.
    """
    reasons = base_reasons.astype(np.int32, copy=True)
    order = base_order(n, scores)
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
    items, explored, propensities = explore(order, page_size, config.epsilon, rng, preferred)
    slot_reasons = reasons[items]
    slot_reasons[explored] = EXPLORATION
    return Page(items, slot_reasons, propensities)
