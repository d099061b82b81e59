"""The retrieval core: a verified bundle's user tower, item embeddings, ScaNN index and
popularity lists, plus the catalog's exploration pool and content, turned into one request's
candidates.

:meth:`CandidateIndex.retrieve` assembles up to ``n`` candidates from six sources, in this
order, each best first:

1. **CONTENT** (surface CHECKOUT with a cart the bundle knows): the items whose embeddings
   are closest in angle to the cart's query vector, the mean of the cart items' unit
   embeddings normalised again (every cart item counts the same). Score: the cosine, i.e.
   the inner product of unit vectors, found by brute force over the unit embeddings. Not
   the ScaNN index: its raw inner products reward an item's norm, which carries its
   popularity, and on sim-small (50 random 3-item carts of one category, 245 candidates
   each) only 5 % of its answers share the cart's category, the catalog's base rate,
   against 78 % by cosine; the brute force over the unit embeddings costs a few times
   ScaNN's search. They take ``ceil(checkout_content_share x (n - m))`` slots; the user part
   gets the rest.
2. **HISTORY** (a user the bundle's ``retrieval/history.npz`` lists): the items the user
   engaged with before the bundle's test period (its train and validation days), most
   engaged first (``training.retrieval.history``),
   at most ``min(n - m - placed, ceil(history_share x (n - m)))`` of them (``placed``: the
   candidates of the sources before); what the offline evaluation's recall measures first,
   too. Score: the inner product with the user vector (0 for a user the tower does not know).
3. **PROFILE** (a user whose ``content_profile`` is usable: non-empty, finite, of the
   catalogue's content width; ``contract.content.as_profile``): the best items of
   ``contract.content.ProfileIndex.top`` over the bundle catalogue's content, prices and
   margins, i.e. by ``4 x cosine(profile, content) + log(price x margin)``, at most
   ``min(n - m - placed, ceil(profile_share x (n - m)))`` of them, never an item the
   catalogue has no row for, nor one already placed, excluded, in the cart or out of stock.
   The offline replay (``training.retrieval.retriever``) takes the same rows in the same
   place. Score: that ProfileIndex score. Off when the catalogue carries no content.
4. **ANN** (a known user): the user tower's vector searched in the ScaNN index. Score: the
   inner product ``item_embedding . user_vector``, recomputed exactly for every candidate.
5. **POPULARITY**: the bundle's list for the request's (country, device) segment, else its
   country's, else the global one (``contract.popular.resolve``: a country or device the
   bundle never saw gets the global list, never an empty one). It is the user part of an
   unknown user (no user_profile row), and pads a known user's part when the index returns
   fewer neighbours than asked. Score: ``-log(1 + rank)``, rank 0-based in the full list
   (before any exclusion): the log-popularity of a Zipf(1) list up to a constant, 0 for the
   top item.
6. **EXPLORATION**: the first ``k = min(m, |eligible|)`` of a uniformly random ordering of
   the *eligible pool* (``m = min(exploration, n // 2)``), in that order: the exploration
   pool (recent items and items of new sellers, ``Catalog.exploration_pool``) minus the
   excluded, cart and out-of-stock items and minus the first ``n - m`` candidates of
   sources 1-5. Each eligible item is drawn with probability ``k / |eligible|``, which is
   the propensity every exploration candidate carries (the others carry 0), and the
   response says ``|eligible|``: the gateway's slot propensities account for this draw
   exactly. When fewer than ``m`` items are eligible, every one is drawn and further
   candidates of sources 1-5 outside the pool fill the free slots; which of those are
   returned never depends on the draw.

Excluded ids, cart ids and items out of stock (``stock``, the online store's ``in_stock``,
refreshed in the background) never appear; no id appears twice (an item already placed by an
earlier source is skipped by later ones); at most ``n`` candidates.

The ANN search asks ScaNN for ``need + margin`` neighbours and, when exclusions or earlier
sources removed so many that fewer than ``need`` remain, again with ``k`` grown by the share
they took (``CandidateIndex._nearest``): exclusions rarely hit a user's top neighbours, so
the usual request pays for one small search. ``pre_reorder_num_neighbors`` is raised to
``k`` when ``k`` exceeds the bundle's reorder setting (ScaNN returns at most that many
otherwise).

What it costs per request is measured by ``scripts/bench_cores.py`` (docs/serving.md).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from contract import bundle as B
from contract import columns as C
from contract import content
from contract.ann import load_index
from contract.bundle import BundleError, read_manifest, verify_bundle
from contract.catalog import Catalog
from contract.content import ProfileIndex
from contract.history import History
from contract.popular import PopularityLists
from contract.tower import UserTower, value_columns

log = logging.getLogger(__name__)

MAX_N = 2000  # RetrieveRequest.n
MAX_EXCLUDE = 5000  # RetrieveRequest.exclude_item_ids
MAX_CART = 100  # RetrieveRequest.cart_item_ids
HOME, CHECKOUT = C.SURFACES
SEARCH_MARGIN = 32  # extra neighbours asked for, so that a few exclusions need no second search
# Rows per matrix-vector product: OpenBLAS splits a product of more than ~10k rows over its
# threads, which in a busy threaded server costs far more than it saves (50k x 32 on a
# loaded 2-core machine: 12 ms p50 on 2 threads, 0.1 ms in 8k-row blocks on one).
MATVEC_ROWS = 8192

UserInput = Mapping[str, Any]


class Source(IntEnum):
    """Where a candidate came from; the values are ``retrieval.v1.CandidateSource``'s."""

    ANN = 1
    POPULARITY = 2
    CONTENT = 3
    EXPLORATION = 4
    HISTORY = 5
    PROFILE = 6


@dataclass(frozen=True)
class Candidates:
    """Parallel arrays, one entry per candidate: content, user part, padding, exploration."""

    item_ids: np.ndarray  # int64
    scores: np.ndarray  # float32
    sources: np.ndarray  # int32 Source values
    propensities: np.ndarray  # float32: k / |eligible| for exploration, else 0
    known_user: bool
    exploration_pool: int = 0  # |eligible|: the pool the exploration candidates came from

    def __len__(self) -> int:
        return len(self.item_ids)


@dataclass(frozen=True)
class RetrievalConfig:
    """The knobs of candidate assembly (module docstring)."""

    exploration: int = 10  # m; 0 disables exploration
    checkout_content_share: float = 0.5  # of the non-exploration slots, on CHECKOUT
    history_share: float = 0.4  # of the non-exploration slots, at most, for the history source
    # of the non-exploration slots, at most, for the profile source (default: off)
    profile_share: float = content.PROFILE_SHARE
    search_margin: int = SEARCH_MARGIN

    def __post_init__(self) -> None:
        if not 0 <= self.exploration <= MAX_N // 2:
            raise ValueError(f"exploration must be 0..{MAX_N // 2}, got {self.exploration}")
        if not 0.0 <= self.checkout_content_share <= 1.0:
            raise ValueError(
                f"checkout_content_share must be in [0, 1], got {self.checkout_content_share}"
            )
        if not 0.0 <= self.history_share <= 1.0:
            raise ValueError(f"history_share must be in [0, 1], got {self.history_share}")
        if not 0.0 <= self.profile_share <= 1.0:
            raise ValueError(f"profile_share must be in [0, 1], got {self.profile_share}")
        if self.search_margin < 0:
            raise ValueError(f"search_margin must be >= 0, got {self.search_margin}")


def matvec(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """``matrix @ vector`` in blocks of MATVEC_ROWS rows, each on one BLAS thread."""
    out = np.empty(len(matrix), dtype=np.result_type(matrix, vector))
    for start in range(0, len(matrix), MATVEC_ROWS):
        stop = start + MATVEC_ROWS
        np.dot(matrix[start:stop], vector, out=out[start:stop])
    return out


class IdRows:
    """Item id -> row of the bundle's arrays, -1 for an id the bundle does not list.

    Ids that fit a table at most ``DENSE_SLACK`` times the catalog (the simulator's
    0..n-1) are looked up in that table: 13 us for 5,000 ids on sim-small, against 470 us
    for a binary search over the sorted ids, which sparse ids (Complete Journey) use.
    """

    DENSE_SLACK = 4

    def __init__(self, item_ids: np.ndarray) -> None:
        self.order = np.argsort(item_ids, kind="stable")
        self.sorted = item_ids[self.order]
        if len(self.sorted) > 1 and (np.diff(self.sorted) == 0).any():
            raise ValueError("item ids must be unique")
        self.table: np.ndarray | None = None
        n = len(item_ids)
        if n and self.sorted[0] >= 0 and self.sorted[-1] < self.DENSE_SLACK * n + 1024:
            self.table = np.full(int(self.sorted[-1]) + 1, -1, dtype=np.int64)
            self.table[item_ids] = np.arange(n)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        if len(self.sorted) == 0 or len(ids) == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        if self.table is not None:
            out = np.full(len(ids), -1, dtype=np.int64)
            inside = (ids >= 0) & (ids < len(self.table))
            out[inside] = self.table[ids[inside]]
            return out
        pos = np.minimum(np.searchsorted(self.sorted, ids), len(self.sorted) - 1)
        return np.where(self.sorted[pos] == ids, self.order[pos], -1).astype(np.int64)


@dataclass(frozen=True)
class ProfileSource:
    """The PROFILE source over an index's rows: ``contract.content.ProfileIndex`` of the
    catalogue's content, prices and margins aligned to the rows, and the rows the catalogue
    has no row for (never chosen)."""

    index: ProfileIndex
    missing: np.ndarray  # bool per row

    @classmethod
    def of(cls, catalog: Catalog, item_ids: np.ndarray) -> ProfileSource | None:
        """The source for the rows ``item_ids``; None (off) when the catalogue carries no
        content (dim 0) or lists none of the items."""
        if catalog.content.shape[1] == 0 or not len(catalog):
            return None
        pos = np.minimum(np.searchsorted(catalog.item_ids, item_ids), len(catalog) - 1)
        found = catalog.item_ids[pos] == item_ids
        if not found.any():
            return None
        content = np.where(found[:, None], catalog.unit_content[pos], np.float32(0))
        prices = np.where(found, catalog.prices[pos], 0.0)
        margins = np.where(found, catalog.margins[pos], 0.0)
        return cls(ProfileIndex(content, prices, margins), ~found)

    @property
    def dim(self) -> int:
        return self.index.dim

    def top(
        self, profile: np.ndarray | None, k: int, blocked: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores) of the best ``k`` rows neither blocked nor missing, best first."""
        if self.missing.any():
            blocked = blocked | self.missing
        return self.index.top(profile, k, blocked)


@dataclass(frozen=True)
class _Part:
    rows: np.ndarray  # int64 rows of the bundle's arrays
    scores: np.ndarray  # float32
    source: Source


class _Request:
    """One request's bookkeeping: which rows are taken (excluded, cart, or already placed)."""

    def __init__(
        self, size: int, blocked_rows: np.ndarray, in_stock: np.ndarray | None = None
    ) -> None:
        self.blocked = np.zeros(size, dtype=bool) if in_stock is None else ~in_stock
        self.blocked[blocked_rows] = True
        self.n_blocked = int(np.count_nonzero(self.blocked))

    def take(self, rows: np.ndarray, limit: int) -> np.ndarray:
        """The first ``limit`` of ``rows`` (unique) not blocked yet, now blocked."""
        kept = rows[~self.blocked[rows]][:limit]
        self.blocked[kept] = True
        self.n_blocked += len(kept)
        return kept


class CandidateIndex:
    """One bundle's retrieval state, read-only after construction (safe across threads)."""

    def __init__(
        self,
        *,
        item_ids: np.ndarray,
        embeddings: np.ndarray,
        searcher: Any,
        tower: UserTower,
        popular_lists: PopularityLists,
        pool_ids: np.ndarray,
        reorder: int,
        version: str,
        bundle_version: str,
        config: RetrievalConfig | None = None,
        history: History | None = None,
        catalog: Catalog | None = None,
        value_columns: int = 0,
    ) -> None:
        """``stock`` (set after construction, None: everything in stock) answers the
        current in-stock mask over the rows. ``catalog`` (the bundle's) gives the PROFILE
        source its content, prices and margins; None or a catalogue without content: off.
        ``value_columns``: how many last embedding columns are the value column
        (``contract.tower.value_columns``), which the CONTENT source's cosine leaves out."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(item_ids):
            raise BundleError(
                f"bundle {bundle_version}: {len(item_ids)} item ids but embeddings of shape "
                f"{embeddings.shape}"
            )
        if embeddings.shape[1] != tower.dim:
            raise BundleError(
                f"bundle {bundle_version}: item embeddings have {embeddings.shape[1]} "
                f"dimensions, the user tower's output {tower.dim}"
            )
        try:
            self.rows_of = IdRows(item_ids)
        except ValueError as err:
            raise BundleError(f"bundle {bundle_version}: {B.ITEM_IDS}: {err}") from None
        self.item_ids = item_ids
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if not 0 <= value_columns < embeddings.shape[1]:
            raise BundleError(
                f"bundle {bundle_version}: {value_columns} value columns of "
                f"{embeddings.shape[1]} embedding dimensions"
            )
        # the taste part: a cart's neighbours by angle, not by price
        taste = np.ascontiguousarray(self.embeddings[:, : embeddings.shape[1] - value_columns])
        norms = np.linalg.norm(taste, axis=1, keepdims=True)
        self.unit = np.divide(taste, norms, out=np.zeros_like(taste), where=norms > 0)
        self.searcher = searcher
        self.tower = tower
        self.reorder = int(reorder)
        self.version = version
        self.bundle_version = bundle_version
        self.config = config or RetrievalConfig()
        self.history = history
        self.stock: Callable[[], np.ndarray] | None = None
        self.size = len(item_ids)
        self.popular_lists = popular_lists
        self._popular = {
            key: self._popularity_rows(ids) for key, ids in popular_lists.lists().items()
        }
        pool_rows = self.rows_of(np.asarray(pool_ids, dtype=np.int64))
        self.pool_rows = np.unique(pool_rows[pool_rows >= 0])
        self.profile = ProfileSource.of(catalog, item_ids) if catalog is not None else None

    @classmethod
    def load(
        cls,
        bundle_dir: Path,
        *,
        pool_ids: np.ndarray,
        version: str | None = None,
        verified: bool = False,
        config: RetrievalConfig | None = None,
        catalog: Catalog | None = None,
    ) -> CandidateIndex:
        """The index of a bundle directory; ``verified=True`` skips re-hashing a directory
        that ``Registry.load`` has just verified. ``version`` is what responses report
        (the registry version), default the bundle's own id; ``catalog``, the bundle's
        catalogue when the caller has read it already (else read here). Raises
        ``BundleError`` for a bundle that does not verify or whose retrieval files do not
        hang together."""
        bundle_dir = Path(bundle_dir)
        manifest = read_manifest(bundle_dir) if verified else verify_bundle(bundle_dir)
        bundle_version = str(manifest.get("version", bundle_dir.name))
        try:
            settings = json.loads((bundle_dir / B.RETRIEVAL_CONFIG).read_text())
            reorder = int(settings["index"]["reorder"])
            lists = PopularityLists.load(bundle_dir / B.POPULAR)
            tower = UserTower.load(bundle_dir / B.USER_TOWER)
            item_ids = np.load(bundle_dir / B.ITEM_IDS, allow_pickle=False)
            embeddings = np.load(bundle_dir / B.ITEM_EMBEDDINGS, allow_pickle=False)
            searcher = load_index(bundle_dir / B.SCANN_DIR)
            history_file = bundle_dir / B.HISTORY
            history = History.load(history_file) if history_file.exists() else None
            if catalog is None:
                catalog = Catalog.load(bundle_dir / B.CATALOG)
        except (KeyError, ValueError, OSError) as err:  # JSONDecodeError is a ValueError
            raise BundleError(
                f"bundle {bundle_version} at {bundle_dir}: {type(err).__name__}: {err}"
            ) from err
        return cls(
            item_ids=item_ids,
            embeddings=embeddings,
            searcher=searcher,
            tower=tower,
            popular_lists=lists,
            pool_ids=pool_ids,
            reorder=reorder,
            version=version if version is not None else bundle_version,
            bundle_version=bundle_version,
            config=config,
            history=history,
            catalog=catalog,
            value_columns=value_columns(settings),
        )

    def _popularity_rows(self, ids: np.ndarray) -> _Part:
        rows = self.rows_of(np.asarray(ids, dtype=np.int64))
        scores = (0.0 - np.log1p(np.arange(len(rows), dtype=np.float64))).astype(np.float32)
        _, first = np.unique(rows, return_index=True)
        keep = np.zeros(len(rows), dtype=bool)
        keep[first] = True
        keep &= rows >= 0
        return _Part(rows[keep], scores[keep], Source.POPULARITY)

    def popular_for(self, country: str, device: str) -> _Part:
        """The popularity list of a (country, device): its segment's, else its country's,
        else the global one."""
        return self._popular[self.popular_lists.resolve(country, device)]

    @property
    def exploration_pool_size(self) -> int:
        return len(self.pool_rows)

    def user_vector(self, user: UserInput) -> np.ndarray:
        """The tower's ``(dim,)`` float32 vector of one user's feature dict."""
        return self.tower.embed(user)[0]

    def cart_vector(self, cart_rows: np.ndarray) -> np.ndarray | None:
        """The unit mean of the cart items' unit embeddings; None when it is zero."""
        mean = self.unit[cart_rows].astype(np.float64).mean(axis=0)
        norm = float(np.linalg.norm(mean))
        return (mean / norm).astype(np.float32) if norm > 1e-6 else None

    def search(self, query: np.ndarray, k: int) -> np.ndarray:
        """Up to ``k`` rows nearest to ``query`` by inner product, best first (ScaNN)."""
        k = min(k, self.size)
        if k <= 0:
            return np.empty(0, dtype=np.int64)
        rows, dist = self.searcher.search(query, k, max(self.reorder, k), -1)
        rows = np.asarray(rows, dtype=np.int64)
        return rows[np.isfinite(np.asarray(dist)) & (rows >= 0)]

    def exact_top_k(self, query: np.ndarray, k: int) -> np.ndarray:
        """Brute-force rows of the ``k`` highest inner products, best first (a reference for
        the index's recall, and a fallback nobody needs on the hot path)."""
        scores = matvec(self.embeddings, query.astype(np.float32))
        k = min(k, self.size)
        top = np.argpartition(-scores, k - 1)[:k] if k < self.size else np.arange(self.size)
        return top[np.argsort(-scores[top], kind="stable")].astype(np.int64)

    def _nearest(self, query: np.ndarray, need: int, req: _Request) -> _Part:
        """The ``need`` best unblocked rows for ``query`` (fewer when the index has fewer).

        A search that leaves fewer than ``need`` unblocked rows is repeated with ``k`` grown
        by the blocked share it saw (plus a quarter), capped at ``need + blocked + margin``,
        which cannot come up short unless the index holds fewer items.
        """
        margin = self.config.search_margin
        cap = min(self.size, need + req.n_blocked + margin)
        k = min(cap, need + margin)
        while True:
            found = self.search(query, k)
            free = int(np.count_nonzero(~req.blocked[found]))
            if free >= need or len(found) < k or k >= cap:
                break
            k = min(cap, max(k + 1, math.ceil(1.25 * need * len(found) / max(free, 1)) + margin))
        rows = req.take(found, need)
        return _Part(rows, self.embeddings[rows] @ query, Source.ANN)

    def _similar(self, query: np.ndarray, need: int, req: _Request) -> _Part:
        """The ``need`` unblocked rows of highest cosine with the unit ``query`` (exact)."""
        cosine = matvec(self.unit, query)
        cosine[req.blocked] = -np.inf
        k = min(need, self.size - req.n_blocked)
        if k <= 0:
            return _Part(np.empty(0, np.int64), np.empty(0, np.float32), Source.CONTENT)
        top = np.argpartition(-cosine, k - 1)[:k] if k < self.size else np.arange(self.size)
        top = top[np.argsort(-cosine[top], kind="stable")]
        rows = req.take(top.astype(np.int64), k)
        return _Part(rows, cosine[rows], Source.CONTENT)

    def retrieve(
        self,
        user: UserInput | None,
        n: int,
        exclude: np.ndarray,
        surface: str,
        cart: np.ndarray,
        country: str,
        device: str,
        rng: np.random.Generator,
        user_id: int | None = None,
        profile: np.ndarray | None = None,
    ) -> Candidates:
        """Up to ``n`` candidates (module docstring) for a user given as the tower's feature
        dict (None: unknown user), for the history source their id, and for the profile
        source their ``content_profile`` (None or unusable: no PROFILE candidates).
        ``exclude`` and ``cart`` are int64 ids, already checked; ids the bundle does not list
        are ignored. ``rng`` draws the exploration items."""
        if not 1 <= n <= MAX_N:
            raise ValueError(f"n must be 1..{MAX_N}, got {n}")
        if surface not in C.SURFACES:
            raise ValueError(f"surface must be one of {C.SURFACES}, got {surface!r}")
        excluded = self.rows_of(exclude)
        cart_rows = self.rows_of(cart)
        cart_rows = cart_rows[cart_rows >= 0]
        in_stock = self.stock() if self.stock is not None else None
        req = _Request(self.size, np.concatenate([excluded[excluded >= 0], cart_rows]), in_stock)
        m = min(self.config.exploration, n // 2) if len(self.pool_rows) else 0

        parts: list[_Part] = []
        if surface == CHECKOUT and len(cart_rows):
            share = math.ceil(self.config.checkout_content_share * (n - m))
            query = self.cart_vector(cart_rows)
            if share and query is not None:
                parts.append(self._similar(query, share, req))
        placed = sum(len(p.rows) for p in parts)
        vector = self.user_vector(user) if user is not None else None
        if self.history is not None and user_id is not None:
            cap = min(n - m - placed, math.ceil(self.config.history_share * (n - m)))
            past = self.rows_of(self.history.items_of(int(user_id)))
            rows = req.take(past[past >= 0], max(cap, 0))
            if len(rows):
                scores = (
                    self.embeddings[rows] @ vector
                    if vector is not None
                    else np.zeros(len(rows), np.float32)
                )
                parts.append(_Part(rows, scores, Source.HISTORY))
                placed += len(rows)
        if self.profile is not None and profile is not None:
            cap = min(n - m - placed, math.ceil(self.config.profile_share * (n - m)))
            if cap > 0:
                top, scores = self.profile.top(profile, cap, req.blocked)
                rows = req.take(top, cap)  # all free: top skips the blocked rows
                if len(rows):
                    parts.append(_Part(rows, scores, Source.PROFILE))
                    placed += len(rows)
        if vector is not None:
            parts.append(self._nearest(vector, n - placed, req))
            placed += len(parts[-1].rows)
        if placed < n:
            ranked = self.popular_for(country, device)
            free = ~req.blocked[ranked.rows]
            rows = req.take(ranked.rows, n - placed)
            parts.append(_Part(rows, ranked.scores[free][: len(rows)], Source.POPULARITY))
        rows = np.concatenate([p.rows for p in parts])
        scores = np.concatenate([p.scores for p in parts]).astype(np.float32, copy=False)
        sources = np.concatenate([np.full(len(p.rows), p.source, np.int32) for p in parts])
        return self._explore(rows, scores, sources, n, m, req, rng, known=user is not None)

    def _explore(
        self,
        rows: np.ndarray,
        scores: np.ndarray,
        sources: np.ndarray,
        n: int,
        m: int,
        req: _Request,
        rng: np.random.Generator,
        *,
        known: bool,
    ) -> Candidates:
        """The first ``n - m`` ranked candidates, then the exploration draw: the first
        ``k = min(m, |E|)`` of a uniformly random ordering of the eligible pool ``E`` (the
        exploration pool minus what is blocked and minus those ranked candidates). When
        ``|E| < m`` (all of it drawn), further ranked candidates outside ``E`` fill the free
        slots. Which ranked candidates are returned never depends on the draw, so the
        gateway's propensities can account for the draw exactly."""
        quota = n - m
        drawn = eligible = self.pool_rows[:0]
        if m:
            req.blocked[rows[quota:]] = False
            eligible = self.pool_rows[~req.blocked[self.pool_rows]]
            k = min(m, len(eligible))
            drawn = eligible[rng.choice(len(eligible), size=k, replace=False)] if k else drawn
        keep = np.zeros(len(rows), dtype=bool)
        keep[:quota] = True
        if len(drawn) < m:  # every eligible item is drawn: the reserve outside it fills up
            req.blocked[drawn] = True
            reserve = np.flatnonzero(~req.blocked[rows[quota:]])[: m - len(drawn)] + quota
            keep[reserve] = True
        k = len(drawn)
        return Candidates(
            item_ids=self.item_ids[np.concatenate([rows[keep], drawn])],
            scores=np.concatenate([scores[keep], np.zeros(k, np.float32)]),
            sources=np.concatenate([sources[keep], np.full(k, Source.EXPLORATION, np.int32)]),
            propensities=np.concatenate(
                [
                    np.zeros(int(keep.sum()), np.float32),
                    np.full(k, k / max(len(eligible), 1), np.float32),
                ]
            ),
            known_user=known,
            exploration_pool=len(eligible),
        )
