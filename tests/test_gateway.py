"""The feed gateway's core without the real downstreams: re-ranking rules at their limits,
every circuit-breaker transition on a fake clock, the pipeline over in-process fake clients
(happy path, filters, each fallback, deadlines, breakers), request validation, settings,
the popularity fallback's loading, and the gRPC clients and server against fake downstream
servicers on port 0.

The fake catalog makes alignment errors visible: feature row k carries item_ids[k] in
column 0, and the fake ranker checks it before scoring, so a matrix sliced differently from
its ids fails the test instead of quietly scoring the wrong items.
"""

# Fake servicers carry the proto's method names (Retrieve, GetFeatures, Rank).
# ruff: noqa: N802

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import HealthServicer
from homefeed.common.v1 import common_pb2
from homefeed.features.v1 import features_pb2, features_pb2_grpc
from homefeed.feed.v1 import feed_pb2, feed_pb2_grpc
from homefeed.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from homefeed.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from contract.bundle import POPULAR, write_manifest
from contract.popular import PopularityLists
from services.common.errors import InvalidArgument
from services.common.matrix import from_float_matrix, to_float_matrix
from services.common.settings import ServerSettings, SettingsError
from services.gateway import rerank as R
from services.gateway.admission import (
    RETRY_AFTER_KEY,
    Admission,
    AdmissionConfig,
    Shed,
    retry_after_s,
)
from services.gateway.breaker import BreakerConfig, CircuitBreaker, State
from services.gateway.clients import (
    CHANNEL_OPTIONS,
    Candidates,
    Downstreams,
    FeedRequest,
    ItemFeatures,
    Scores,
)
from services.gateway.pipeline import FeedPipeline, PipelineConfig, StageTimes, make_breakers
from services.gateway.readiness import HopWatcher
from services.gateway.server import SERVICE_NAME, StartupError, create_server, load_popularity
from services.gateway.servicer import (
    STAGE_METADATA_KEY,
    FeedServicer,
    parse_request,
    to_response,
)
from services.gateway.settings import GatewaySettings

ANN = retrieval_pb2.CANDIDATE_SOURCE_ANN
POP = retrieval_pb2.CANDIDATE_SOURCE_POPULARITY
CONTENT = retrieval_pb2.CANDIDATE_SOURCE_CONTENT
EXPLORE = retrieval_pb2.CANDIDATE_SOURCE_EXPLORATION
HOME = common_pb2.SURFACE_HOME
CHECKOUT = common_pb2.SURFACE_CHECKOUT
N_ITEMS = 1000
N_CANDIDATES = 500
COLS = 8
SCHEMA = "schema-hash-of-the-test"
NO_RERANK = R.RerankConfig(diversity_depth=0, new_seller_min_share=0.0, epsilon=0.0)


# --- fakes ----------------------------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    """What a stub raises when the downstream answers with a status."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def rpc_error(code: grpc.StatusCode, details: str = "down") -> FakeRpcError:
    return FakeRpcError(code, details)


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Catalog:
    """Item facts indexed by item id (0..N_ITEMS-1); E[GMV] decreasing with the id's rank in
    a fixed shuffle, so the expected order is known."""

    available: np.ndarray
    values: np.ndarray
    categories: np.ndarray
    new_seller: np.ndarray
    heuristic: np.ndarray
    egmv: np.ndarray

    @classmethod
    def make(cls, seed: int = 0) -> Catalog:
        rng = np.random.default_rng(seed)
        return cls(
            available=np.ones(N_ITEMS, dtype=bool),
            values=rng.uniform(1, 50, N_ITEMS).astype(np.float32),
            categories=np.arange(N_ITEMS, dtype=np.int32),  # all distinct: no cap applies
            new_seller=np.zeros(N_ITEMS, dtype=bool),
            heuristic=rng.permutation(N_ITEMS).astype(np.float32),
            egmv=rng.permutation(N_ITEMS).astype(np.float32) / 100,
        )


@dataclass
class FakeRetrieval:
    ids: np.ndarray
    sources: np.ndarray | None = None
    error: Exception | None = None
    clock: FakeClock | None = None
    takes_s: float = 0.0
    calls: list[dict] = field(default_factory=list)
    user: common_pb2.UserFeatures | None = None
    version: str = "r1"

    def retrieve(self, request: FeedRequest, n: int, timeout_s: float) -> Candidates:
        self.calls.append({"n": n, "timeout_s": timeout_s, "exclude": request.cart_item_ids})
        if self.clock is not None:
            self.clock.advance(self.takes_s)
        if self.error is not None:
            raise self.error
        ids = self.ids[:n]
        sources = self.sources[:n] if self.sources is not None else np.full(len(ids), ANN)
        scores = np.linspace(1.0, 0.0, len(ids), dtype=np.float32)
        return Candidates(
            ids.astype(np.int64), scores, sources.astype(np.int32), self.version, user=self.user
        )


@dataclass
class FakeFeatures:
    catalog: Catalog
    error: Exception | None = None
    clock: FakeClock | None = None
    takes_s: float = 0.0
    calls: list[dict] = field(default_factory=list)

    def get_features(
        self,
        request: FeedRequest,
        item_ids: np.ndarray,
        timeout_s: float,
        user: common_pb2.UserFeatures | None = None,
    ) -> ItemFeatures:
        self.calls.append({"ids": item_ids.copy(), "timeout_s": timeout_s, "user": user})
        if self.clock is not None:
            self.clock.advance(self.takes_s)
        if self.error is not None:
            raise self.error
        assert item_ids.dtype == np.int64
        assert len(np.unique(item_ids)) == len(item_ids), "features got repeated ids"
        c = self.catalog
        matrix = np.zeros((len(item_ids), COLS), dtype=np.float32)
        matrix[:, 0] = item_ids
        values = c.values[item_ids].copy()
        values[~c.available[item_ids]] = np.nan  # what an unknown item may carry
        return ItemFeatures(
            matrix=to_float_matrix(matrix, SCHEMA),
            available=c.available[item_ids],
            values=values,
            prices=values * 3,
            categories=c.categories[item_ids],
            new_seller=c.new_seller[item_ids],
            heuristic_scores=c.heuristic[item_ids],
        )


@dataclass
class FakeRanking:
    catalog: Catalog
    error: Exception | None = None
    clock: FakeClock | None = None
    takes_s: float = 0.0
    calls: list[dict] = field(default_factory=list)

    def rank(
        self,
        request: FeedRequest,
        item_ids: np.ndarray,
        matrix: common_pb2.FloatMatrix,
        row_mask: np.ndarray | None,
        values: np.ndarray,
        timeout_s: float,
    ) -> Scores:
        self.calls.append({"ids": item_ids.copy(), "timeout_s": timeout_s, "mask": row_mask})
        if self.clock is not None:
            self.clock.advance(self.takes_s)
        if self.error is not None:
            raise self.error
        X = from_float_matrix(matrix)
        if row_mask is not None:
            X = X[row_mask]
        np.testing.assert_array_equal(X[:, 0], item_ids.astype(np.float32))
        assert matrix.schema_hash == SCHEMA
        assert np.isfinite(values).all(), "ranking got the values of an unavailable item"
        egmv = self.catalog.egmv[item_ids]
        return Scores(egmv / np.maximum(values, 1e-6), egmv, "7")


POPULAR_US_IOS = np.arange(900, 1000, dtype=np.int64)[::-1].copy()
POPULAR_OVERALL = np.arange(800, 900, dtype=np.int64)


def popularity() -> PopularityLists:
    return PopularityLists(POPULAR_OVERALL, {"US/ios": POPULAR_US_IOS})


@dataclass
class Harness:
    pipeline: FeedPipeline
    retrieval: FakeRetrieval
    features: FakeFeatures
    ranking: FakeRanking
    catalog: Catalog
    clock: FakeClock


def harness(
    catalog: Catalog | None = None,
    candidates: np.ndarray | None = None,
    sources: np.ndarray | None = None,
    rerank: R.RerankConfig = NO_RERANK,
    config: PipelineConfig | None = None,
    breaker: BreakerConfig | None = None,
) -> Harness:
    catalog = catalog if catalog is not None else Catalog.make()
    clock = FakeClock()
    ids = candidates if candidates is not None else np.arange(N_CANDIDATES, dtype=np.int64)
    retrieval = FakeRetrieval(ids, sources, clock=clock)
    features = FakeFeatures(catalog, clock=clock)
    ranking = FakeRanking(catalog, clock=clock)
    pipeline = FeedPipeline(
        retrieval,
        features,
        ranking,
        popularity(),
        config,
        rerank,
        make_breakers(breaker or BreakerConfig(), clock),
        clock=clock,
    )
    return Harness(pipeline, retrieval, features, ranking, catalog, clock)


def feed_request(
    page_size: int = 20,
    cart: list[int] | None = None,
    request_id: str = "req-1",
    surface: int = HOME,
    country: str = "US",
    device: str = "ios",
) -> FeedRequest:
    return FeedRequest(
        request_id=request_id,
        user_id=42,
        surface=surface,
        cart_item_ids=np.asarray(cart or [], dtype=np.int64),
        page_size=page_size,
        context=common_pb2.RequestContext(country=country, device=device),
    )


def expected_top(catalog: Catalog, ids: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-catalog.egmv[ids], kind="stable")][:k]


# --- re-ranking -----------------------------------------------------------------------------


def test_epsilon_zero_is_the_score_order_with_propensity_one() -> None:
    scores = np.array([0.1, 0.5, 0.3, 0.5, 0.0], dtype=np.float32)
    page = R.rerank(5, 4, NO_RERANK, np.full(5, R.RANKED), scores=scores)
    assert page.index.tolist() == [1, 3, 2, 0]  # the tie keeps candidate order
    assert page.propensities.tolist() == [1.0] * 4
    assert page.reasons.tolist() == [R.RANKED] * 4


def test_without_scores_the_candidate_order_is_kept() -> None:
    page = R.rerank(6, 10, NO_RERANK, np.full(6, R.POPULAR))
    assert page.index.tolist() == [0, 1, 2, 3, 4, 5]  # page longer than the candidates
    assert page.reasons.tolist() == [R.POPULAR] * 6


def test_category_cap_pushes_a_crowded_category_below_the_capped_slots() -> None:
    # base order 0..29; items 0..9 share category 100, items 10..29 are all distinct
    categories = np.concatenate([np.full(10, 100), np.arange(20)]).astype(np.int32)
    scores = np.linspace(1.0, 0.0, 30, dtype=np.float32)
    cfg = replace(NO_RERANK, diversity_depth=20, max_per_category=4)
    page = R.rerank(30, 30, cfg, np.full(30, R.RANKED), scores=scores, categories=categories)
    order = page.index.tolist()
    assert order[:20] == [0, 1, 2, 3, *range(10, 26)]
    assert order[20:] == [4, 5, 6, 7, 8, 9, 26, 27, 28, 29]
    assert Counter(categories[order[:20]].tolist())[100] == 4
    reasons = page.reasons.tolist()
    assert reasons[:4] == [R.RANKED] * 4
    assert reasons[4:20] == [R.DIVERSITY] * 16  # moved up into the freed slots
    assert reasons[20:] == [R.RANKED] * 10  # pushed down, not moved up


def test_category_cap_at_its_limit_changes_nothing() -> None:
    categories = np.array([1, 1, 1, 1, 2, 2, 2, 2, 3, 3], dtype=np.int32)
    cfg = replace(NO_RERANK, diversity_depth=10, max_per_category=4)
    page = R.rerank(10, 10, cfg, np.full(10, R.RANKED), categories=categories)
    assert page.index.tolist() == list(range(10))
    assert R.DIVERSITY not in page.reasons.tolist()


def test_a_single_category_keeps_its_order_and_the_cap_holds_where_it_can() -> None:
    one = np.zeros(30, dtype=np.int32)
    cfg = replace(NO_RERANK, diversity_depth=20, max_per_category=4)
    page = R.rerank(30, 20, cfg, np.full(30, R.RANKED), categories=one)
    assert page.index.tolist() == list(range(20))
    assert R.DIVERSITY not in page.reasons.tolist()
    # two categories: the four best of each lead, then the rest in score order
    two = np.array([0] * 10 + [1] * 10, dtype=np.int32)
    page = R.rerank(20, 20, cfg, np.full(20, R.RANKED), categories=two)
    assert page.index.tolist() == [0, 1, 2, 3, 10, 11, 12, 13, *range(4, 10), *range(14, 20)]
    assert page.reasons.tolist()[4:8] == [R.DIVERSITY] * 4


def test_zero_new_seller_items_get_promoted_to_the_share() -> None:
    new = np.zeros(40, dtype=bool)
    new[[25, 30, 35]] = True
    cfg = replace(NO_RERANK, new_seller_min_share=0.1)
    page = R.rerank(40, 20, cfg, np.full(40, R.RANKED), new_seller=new)
    order = page.index.tolist()
    assert len(order) == 20
    assert order[:18] == list(range(18))
    assert order[18:] == [25, 30]  # the two best new-seller items take the two lowest slots
    assert page.reasons.tolist()[18:] == [R.NEW_SELLER] * 2
    assert page.reasons.tolist()[:18] == [R.RANKED] * 18
    # the displaced items come right after the page, the rest keeps its order
    reordered, promoted, displaced = R.promote_new_sellers(np.arange(40), new, 20, 0.1)
    assert reordered.tolist() == [
        *range(18),
        25,
        30,
        18,
        19,
        *range(20, 25),
        *range(26, 30),
        *range(31, 40),
    ]
    assert np.flatnonzero(promoted).tolist() == [25, 30]
    assert np.flatnonzero(displaced).tolist() == [18, 19]


def test_new_seller_share_is_a_ceiling_and_limited_by_what_exists() -> None:
    new = np.zeros(40, dtype=bool)
    new[39] = True
    cfg = replace(NO_RERANK, new_seller_min_share=0.1)
    page = R.rerank(40, 11, cfg, np.full(40, R.RANKED), new_seller=new)  # ceil(1.1) = 2
    assert page.index.tolist() == [*range(10), 39]  # only one new-seller item exists
    already = np.zeros(40, dtype=bool)
    already[[3, 7]] = True
    page = R.rerank(40, 20, cfg, np.full(40, R.RANKED), new_seller=already)
    assert page.index.tolist() == list(range(20))
    assert R.NEW_SELLER not in page.reasons.tolist()
    # 0.1 x 30 is 3.0000000000000004 in floating point: the target is 3, not 4
    many = np.zeros(60, dtype=bool)
    many[40:] = True
    page = R.rerank(60, 30, cfg, np.full(60, R.RANKED), new_seller=many)
    assert int(many[page.index].sum()) == 3


def test_new_seller_promotion_respects_the_category_cap_when_it_can() -> None:
    categories = np.array([1] * 4 + list(range(10, 26)) + [1, 99], dtype=np.int32)
    new = np.zeros(22, dtype=bool)
    new[[20, 21]] = True  # item 20 is of the full category 1, item 21 is not
    cfg = R.RerankConfig(
        max_per_category=4, diversity_depth=20, new_seller_min_share=0.05, epsilon=0.0
    )
    page = R.rerank(22, 20, cfg, np.full(22, R.RANKED), categories=categories, new_seller=new)
    assert page.index.tolist()[-1] == 21
    # when only a capped-category item exists, the share wins
    new = np.zeros(22, dtype=bool)
    new[20] = True
    page = R.rerank(22, 20, cfg, np.full(22, R.RANKED), categories=categories, new_seller=new)
    assert page.index.tolist()[-1] == 20


def test_new_sellers_among_exploration_candidates_only_are_not_promoted() -> None:
    """Found by make bench: the new-seller target counted the exploration candidates' new
    sellers, which the deterministic order does not hold, and the promotion then looked for
    more than there were (argmax of an empty sequence, an INTERNAL error per such feed)."""
    categories = np.arange(30, dtype=np.int32) % 3
    new = np.zeros(30, dtype=bool)
    new[[28, 29]] = True  # both new-seller items are exploration candidates
    exploration = np.zeros(30, dtype=bool)
    exploration[[28, 29]] = True
    cfg = R.RerankConfig(
        max_per_category=4, diversity_depth=20, new_seller_min_share=0.1, epsilon=0.05
    )
    page = R.rerank(
        30,
        20,
        cfg,
        np.full(30, R.RANKED),
        scores=np.arange(30.0)[::-1].copy(),
        categories=categories,
        new_seller=new,
        exploration=exploration,
        pool_size=10,
        rng=np.random.default_rng(0),
    )
    assert len(page.index) == 20
    assert R.NEW_SELLER not in page.reasons.tolist()


def test_epsilon_one_takes_the_exploration_candidates_first_in_retrievals_order() -> None:
    exploration = np.zeros(30, dtype=bool)
    exploration[[17, 5, 29]] = True
    cfg = replace(NO_RERANK, epsilon=1.0)
    page = R.rerank(
        30,
        6,
        cfg,
        np.full(30, R.RANKED),
        scores=np.arange(30.0),
        exploration=exploration,
        pool_size=40,
        rng=np.random.default_rng(3),
    )
    # explored in candidate order; then the deterministic order, best score first
    assert page.index.tolist() == [5, 17, 29, 28, 27, 26]
    assert page.reasons.tolist() == [R.EXPLORATION] * 3 + [R.RANKED] * 3
    # explored slot: P(slot explores) / |pool|; the deterministic slots are certain then
    np.testing.assert_allclose(page.propensities, [1 / 40] * 3 + [1.0] * 3)


def test_exploration_candidates_never_take_a_deterministic_slot() -> None:
    exploration = np.zeros(10, dtype=bool)
    exploration[[0, 1]] = True  # the two best scores
    page = R.rerank(
        10,
        5,
        replace(NO_RERANK, epsilon=0.0),
        np.full(10, R.RANKED),
        scores=np.arange(10.0)[::-1].copy(),
        exploration=exploration,
        pool_size=2,
        rng=np.random.default_rng(0),
    )
    assert page.index.tolist() == [2, 3, 4, 5, 6]
    assert page.propensities.tolist() == [1.0] * 5


def test_slot_probabilities_only_depend_on_what_a_page_can_use() -> None:
    """The cached chain of min(n, size) candidates is the full chain's first columns."""
    full_before, full_heads = R._chain.__wrapped__(20, 480, 37, 0.05)
    before, heads = R.slot_probabilities(20, 480, 37, 0.05)
    assert before.shape == (21, 21) and not before.flags.writeable
    np.testing.assert_allclose(before, full_before[:, :21], atol=1e-15)
    reachable = np.tri(20, 21, dtype=bool)  # t <= s: at most s of the slots above explored
    np.testing.assert_allclose(heads[reachable], full_heads[:, :21][reachable], atol=1e-15)
    assert (full_before[:, 21:] == 0).all()  # the columns left out are never reached
    assert R.slot_probabilities(20, 480, 37, 0.05)[0] is before  # computed once


def test_slot_probabilities_follow_the_chain() -> None:
    before, heads = R.slot_probabilities(3, 5, 2, 0.25)
    np.testing.assert_allclose(before[0], [1, 0, 0])
    np.testing.assert_allclose(before[1], [0.75, 0.25, 0])
    np.testing.assert_allclose(before[2], [0.75**2, 2 * 0.25 * 0.75, 0.25**2])
    assert heads[2, 2] == 0.0  # both exploration candidates placed: deterministic
    # one deterministic item: slot 2 explores for sure when it was placed in slot 1
    _, heads = R.slot_probabilities(3, 1, 2, 0.25)
    assert heads[1, 0] == 1.0 and heads[1, 1] == 0.25


def test_propensities_are_probabilities_and_deterministic_per_request() -> None:
    cfg = R.RerankConfig(epsilon=0.3)
    categories = np.arange(200, dtype=np.int32) % 7
    new = np.arange(200) % 13 == 0
    scores = np.random.default_rng(0).random(200).astype(np.float32)
    exploration = np.arange(200) % 20 == 3  # ten exploration candidates

    def page(seed: int) -> R.Page:
        return R.rerank(
            200,
            30,
            cfg,
            np.full(200, R.RANKED),
            scores=scores,
            categories=categories,
            new_seller=new,
            exploration=exploration,
            pool_size=500,
            rng=np.random.default_rng(seed),
        )

    a, b = page(R.request_seed("abc")), page(R.request_seed("abc"))
    assert a.index.tolist() == b.index.tolist()
    assert a.propensities.tolist() == b.propensities.tolist()
    others = {tuple(page(R.request_seed(f"r{i}")).index.tolist()) for i in range(20)}
    assert len(others) > 1
    for p in (a, *(page(s) for s in range(50))):
        assert ((p.propensities > 0) & (p.propensities <= 1)).all()
        assert len(set(p.index.tolist())) == 30
        explored = p.reasons == R.EXPLORATION
        assert exploration[p.index[explored]].all() and not exploration[p.index[~explored]].any()
        np.testing.assert_allclose(p.propensities[explored] * 500, 0.3, rtol=0.5)


def test_logged_propensities_are_the_exact_slot_frequencies_of_the_policy() -> None:
    """Every logged propensity is the frequency with which the policy shows that item in
    that slot, retrieval's draw included: the exploration candidates are drawn here as
    retrieval draws them (the first k of a uniform ordering of the pool)."""
    cfg = replace(NO_RERANK, epsilon=0.4)
    n_ranked, pool, k, size = 4, 6, 2, 4
    scores = np.concatenate([np.array([4.0, 3.0, 2.0, 1.0]), np.zeros(k)])
    exploration = np.r_[np.zeros(n_ranked, bool), np.ones(k, bool)]
    runs = 100_000
    rng = np.random.default_rng(11)
    shown: Counter[tuple[int, int]] = Counter()  # (slot, item id) -> count
    logged: dict[tuple[int, int], float] = {}
    ids = np.arange(n_ranked + pool)  # ranked items 0..3, pool items 4..9
    for _ in range(runs):
        drawn = n_ranked + rng.choice(pool, size=k, replace=False)
        candidates = np.concatenate([ids[:n_ranked], drawn])
        page = R.rerank(
            n_ranked + k,
            size,
            cfg,
            np.full(n_ranked + k, R.RANKED),
            scores=scores,
            exploration=exploration,
            pool_size=pool,
            rng=rng,
        )
        for slot, (index, p) in enumerate(zip(page.index, page.propensities, strict=True)):
            key = (slot, int(candidates[index]))
            shown[key] += 1
            assert logged.setdefault(key, float(p)) == pytest.approx(p)
    for key, p in logged.items():
        sigma = np.sqrt(p * (1 - p) / runs)
        assert abs(shown[key] / runs - p) <= 3 * sigma + 1e-12, (key, shown[key] / runs, p)
    for slot in range(size):  # each slot shows exactly one item
        assert sum(p for (s, _), p in logged.items() if s == slot) == pytest.approx(1.0)


def test_rerank_config_rejects_out_of_range_values() -> None:
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\], got 1.5"):
        R.RerankConfig(epsilon=1.5)
    with pytest.raises(ValueError, match="max_per_category must be >= 1"):
        R.RerankConfig(max_per_category=0)


# --- circuit breaker ------------------------------------------------------------------------

CFG = BreakerConfig(
    window=20,
    min_calls=10,
    failure_rate=0.5,
    slow_rate=0.5,
    slow_call_s=0.040,
    open_wait_s=5.0,
    half_open_calls=3,
    half_open_max_wait_s=5.0,
)


def outcome(breaker: CircuitBreaker, failed: bool = False, duration_s: float = 0.001) -> None:
    permit = breaker.try_acquire()
    assert permit is not None, f"breaker {breaker.state} refused a call"
    if failed:
        breaker.on_failure(permit, duration_s)
    else:
        breaker.on_success(permit, duration_s)


def open_breaker(clock: FakeClock) -> CircuitBreaker:
    breaker = CircuitBreaker("ranking", CFG, clock)
    for _ in range(10):
        outcome(breaker, failed=True)
    assert breaker.state is State.OPEN
    return breaker


def test_breaker_waits_for_the_minimum_number_of_calls() -> None:
    breaker = CircuitBreaker("ranking", CFG, FakeClock())
    for _ in range(9):
        outcome(breaker, failed=True)
    assert breaker.state is State.CLOSED  # 100 % failures, but only 9 calls
    outcome(breaker, failed=True)
    assert breaker.state is State.OPEN


def test_breaker_opens_at_the_failure_rate_threshold_not_below() -> None:
    below = CircuitBreaker("ranking", CFG, FakeClock())
    for i in range(10):
        outcome(below, failed=i < 4)
    assert below.state is State.CLOSED  # 40 %
    at = CircuitBreaker("ranking", CFG, FakeClock())
    for i in range(10):
        outcome(at, failed=i >= 5)
    assert at.state is State.OPEN  # 50 %


def test_breaker_window_slides() -> None:
    breaker = CircuitBreaker("ranking", CFG, FakeClock())
    for failed in [False] * 11 + [True] * 9:
        outcome(breaker, failed=failed)
    assert breaker.state is State.CLOSED  # 45 %
    for _ in range(20):
        outcome(breaker)  # the 9 failures leave the window
    assert breaker.snapshot()["failure_rate"] == 0.0
    for _ in range(9):
        outcome(breaker, failed=True)
    assert breaker.state is State.CLOSED  # 9 of the last 20
    outcome(breaker, failed=True)
    assert breaker.state is State.OPEN  # 10 of the last 20 (19 of 50 since the start)


def test_breaker_opens_on_slow_calls() -> None:
    breaker = CircuitBreaker("ranking", CFG, FakeClock())
    for i in range(10):
        outcome(breaker, duration_s=0.040 if i % 2 else 0.039)
    assert breaker.state is State.OPEN  # 5 of 10 at >= 40 ms, all successful


def test_open_breaker_refuses_until_the_wait_then_lets_trials_through() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock)
    clock.advance(4.999)
    assert breaker.try_acquire() is None
    clock.advance(0.001)
    trials = [breaker.try_acquire() for _ in range(4)]
    assert breaker.state is State.HALF_OPEN
    assert all(t is not None for t in trials[:3])
    assert trials[3] is None  # only three trials


def test_half_open_closes_after_all_trials_succeed() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock)
    clock.advance(5.0)
    permits = [breaker.try_acquire() for _ in range(3)]
    for i, permit in enumerate(permits):
        assert permit is not None
        breaker.on_success(permit, 0.001)
        assert breaker.state is (State.CLOSED if i == 2 else State.HALF_OPEN)
    assert breaker.snapshot()["calls"] == 0  # a fresh window
    for _ in range(9):
        outcome(breaker, failed=True)
    assert breaker.state is State.CLOSED


@pytest.mark.parametrize(("failed", "duration_s"), [(True, 0.001), (False, 0.050)])
def test_half_open_reopens_on_a_failed_or_slow_trial(failed: bool, duration_s: float) -> None:
    clock = FakeClock()
    breaker = open_breaker(clock)
    clock.advance(5.0)
    outcome(breaker)
    outcome(breaker, failed=failed, duration_s=duration_s)
    assert breaker.state is State.OPEN
    assert breaker.try_acquire() is None  # the wait starts again
    clock.advance(5.0)
    assert breaker.try_acquire() is not None
    assert breaker.snapshot()["opened"] == 2


def test_half_open_reopens_when_the_trials_do_not_report_in_time() -> None:
    clock = FakeClock()
    breaker = open_breaker(clock)
    clock.advance(5.0)
    stuck = [breaker.try_acquire() for _ in range(3)]
    assert breaker.try_acquire() is None
    clock.advance(5.0)
    assert breaker.try_acquire() is None
    assert breaker.state is State.OPEN
    assert stuck[0] is not None
    breaker.on_success(stuck[0], 0.001)  # a late report from an older epoch is dropped
    assert breaker.state is State.OPEN


def test_a_late_outcome_does_not_count_in_another_state() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("ranking", CFG, clock)
    late = breaker.try_acquire()
    for _ in range(10):
        outcome(breaker, failed=True)
    clock.advance(5.0)
    assert breaker.try_acquire() is not None  # HALF_OPEN
    assert late is not None
    breaker.on_failure(late, 1.0)  # permit of the CLOSED epoch: not a failed trial
    assert breaker.state is State.HALF_OPEN


def test_breaker_config_rejects_out_of_range_values() -> None:
    with pytest.raises(ValueError, match=r"min_calls must be 1..window \(20\), got 30"):
        BreakerConfig(min_calls=30)
    with pytest.raises(ValueError, match=r"failure_rate must be in \(0, 1\], got 0"):
        BreakerConfig(failure_rate=0)


# --- pipeline -------------------------------------------------------------------------------


def test_happy_path_ranks_by_egmv() -> None:
    h = harness()
    page = h.pipeline.run(feed_request(page_size=20), None)
    ids = np.arange(N_CANDIDATES)
    np.testing.assert_array_equal(page.item_ids, expected_top(h.catalog, ids, 20))
    np.testing.assert_allclose(page.egmv, h.catalog.egmv[page.item_ids])
    np.testing.assert_array_equal(page.scores, page.egmv)
    assert page.item_ids.dtype == np.int64
    assert page.reasons.tolist() == [R.RANKED] * 20
    assert page.propensities.tolist() == [1.0] * 20
    assert page.model_version == "7"
    assert page.arm == "stable"
    assert page.degraded == ()
    assert page.candidates == N_CANDIDATES
    assert h.retrieval.calls[0]["n"] == N_CANDIDATES
    assert len(h.features.calls[0]["ids"]) == N_CANDIDATES


def test_default_rerank_serves_a_valid_page() -> None:
    catalog = Catalog.make()
    catalog.categories = (np.arange(N_ITEMS) % 5).astype(np.int32)
    catalog.new_seller = np.arange(N_ITEMS) % 50 == 0
    h = harness(catalog, rerank=R.RerankConfig())
    for i in range(30):
        page = h.pipeline.run(feed_request(page_size=20, request_id=f"r{i}"), None)
        assert len(page.item_ids) == len(set(page.item_ids.tolist())) == 20
        assert ((page.propensities > 0) & (page.propensities <= 1)).all()
        deterministic = page.reasons != R.EXPLORATION
        assert int(catalog.new_seller[page.item_ids[deterministic]].sum()) >= 2 - int(
            (~deterministic).sum()
        )


def test_out_of_stock_items_are_never_served_nor_ranked() -> None:
    catalog = Catalog.make()
    best = expected_top(catalog, np.arange(N_CANDIDATES), 50)
    catalog.available[best[::2]] = False  # half of the 50 best are out of stock
    h = harness(catalog, rerank=R.RerankConfig(epsilon=1.0))
    for i in range(20):
        page = h.pipeline.run(feed_request(page_size=100, request_id=f"r{i}"), None)
        assert catalog.available[page.item_ids].all()
    assert all(catalog.available[c["ids"]].all() for c in h.ranking.calls)
    h = harness(catalog)
    page = h.pipeline.run(feed_request(page_size=20), None)
    np.testing.assert_array_equal(page.item_ids, best[1::2][:20])
    assert page.candidates == N_CANDIDATES  # counted before filtering


def test_cart_items_are_never_served_even_when_retrieval_returns_them() -> None:
    catalog = Catalog.make()
    best = expected_top(catalog, np.arange(N_CANDIDATES), 5).tolist()
    h = harness(catalog, rerank=R.RerankConfig(epsilon=1.0))  # retrieval ignores exclusions
    cart = [*best, 999_999]
    for i in range(20):
        page = h.pipeline.run(feed_request(page_size=100, cart=cart, request_id=f"r{i}"), None)
        assert not set(page.item_ids.tolist()) & set(cart)
    assert h.retrieval.calls[0]["exclude"].tolist() == cart
    assert not set(h.features.calls[0]["ids"].tolist()) & set(cart)


def test_repeated_candidates_are_sent_once() -> None:
    ids = np.array([5, 6, 5, 7, 6, 8], dtype=np.int64)
    h = harness(candidates=ids)
    page = h.pipeline.run(feed_request(page_size=10), None)
    assert h.features.calls[0]["ids"].tolist() == [5, 6, 7, 8]
    assert sorted(page.item_ids.tolist()) == [5, 6, 7, 8]


def test_retrieval_failure_serves_the_context_popularity_list() -> None:
    h = harness()
    h.retrieval.error = rpc_error(grpc.StatusCode.UNAVAILABLE)
    page = h.pipeline.run(feed_request(page_size=20, cart=[999]), None)
    assert page.degraded == (feed_pb2.DEGRADATION_RETRIEVAL,)
    assert set(page.item_ids.tolist()) <= set(POPULAR_US_IOS.tolist()) - {999}
    assert h.features.calls[0]["ids"].tolist() == POPULAR_US_IOS[1:].tolist()
    np.testing.assert_array_equal(
        page.item_ids, expected_top(h.catalog, POPULAR_US_IOS[1:], 20)
    )  # still ranked
    assert page.reasons.tolist() == [R.RANKED] * 20
    assert page.candidates == len(POPULAR_US_IOS)
    page = h.pipeline.run(feed_request(country="JP", device="web"), None)
    assert set(page.item_ids.tolist()) <= set(POPULAR_OVERALL.tolist())


def test_features_failure_serves_retrieval_order_without_ranking() -> None:
    sources = np.array([ANN, POP, CONTENT, ANN, EXPLORE] * 100, dtype=np.int32)
    h = harness(sources=sources)
    h.features.error = grpc.RpcError()
    page = h.pipeline.run(feed_request(page_size=10), None)
    assert page.degraded == (feed_pb2.DEGRADATION_FEATURES,)
    # retrieval's order; an exploration candidate only ever takes an explored slot
    assert page.item_ids.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11]
    assert page.reasons.tolist() == [
        *([R.HEURISTIC, R.POPULAR, R.CART_SIMILAR, R.HEURISTIC] * 2),
        R.HEURISTIC,
        R.POPULAR,
    ]
    assert page.egmv.tolist() == [0.0] * 10
    assert page.model_version == ""
    assert h.ranking.calls == []


def test_ranking_failure_serves_the_heuristic_order() -> None:
    h = harness()
    h.ranking.error = rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED)
    page = h.pipeline.run(feed_request(page_size=20), None)
    ids = np.arange(N_CANDIDATES)
    expected = ids[np.argsort(-h.catalog.heuristic[ids], kind="stable")][:20]
    np.testing.assert_array_equal(page.item_ids, expected)
    np.testing.assert_array_equal(page.scores, h.catalog.heuristic[expected])
    assert page.degraded == (feed_pb2.DEGRADATION_RANKING,)
    assert page.reasons.tolist() == [R.HEURISTIC] * 20
    assert page.egmv.tolist() == [0.0] * 20
    assert page.model_version == ""


def test_retrieval_and_features_down_serve_popularity_in_order() -> None:
    h = harness()
    h.retrieval.error = rpc_error(grpc.StatusCode.UNAVAILABLE)
    h.features.error = rpc_error(grpc.StatusCode.UNAVAILABLE)
    page = h.pipeline.run(feed_request(page_size=5), None)
    assert page.item_ids.tolist() == POPULAR_US_IOS[:5].tolist()
    assert page.reasons.tolist() == [R.POPULAR] * 5
    assert page.degraded == (feed_pb2.DEGRADATION_RETRIEVAL, feed_pb2.DEGRADATION_FEATURES)


def test_nothing_available_is_an_empty_page_without_a_rank_call() -> None:
    catalog = Catalog.make()
    catalog.available[:] = False
    h = harness(catalog)
    page = h.pipeline.run(feed_request(), None)
    assert page.item_ids.tolist() == []
    assert page.degraded == ()
    assert h.ranking.calls == []


def test_refusals_and_gateway_bugs_never_open_a_breaker() -> None:
    """A caller's bad input refused downstream, or the gateway's own exception, serves the
    fallback for that request only: the breaker does not count it, so one caller cannot
    de-personalise everyone's feed."""
    h = harness()
    h.retrieval.error = rpc_error(grpc.StatusCode.INVALID_ARGUMENT, "bad")
    h.ranking.error = ValueError("a bug in the gateway's client code")
    for i in range(50):
        page = h.pipeline.run(feed_request(request_id=f"r{i}"), None)
        assert page.degraded == (feed_pb2.DEGRADATION_RETRIEVAL, feed_pb2.DEGRADATION_RANKING)
    assert len(h.retrieval.calls) == len(h.ranking.calls) == 50  # never skipped
    for name in ("retrieval", "ranking"):
        snapshot = h.pipeline.breakers[name].snapshot()
        assert snapshot["state"] == "closed" and snapshot["calls"] == 0, snapshot
    h.retrieval.error = h.ranking.error = None
    assert h.pipeline.run(feed_request(), None).degraded == ()


def test_probe_now_ends_the_open_wait() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("x", BreakerConfig(window=2, min_calls=2, open_wait_s=5.0), clock)
    breaker.probe_now()  # closed: nothing to do
    assert breaker.state is State.CLOSED
    for _ in range(2):
        permit = breaker.try_acquire()
        assert permit is not None
        breaker.on_failure(permit, 0.001)
    clock.advance(1.0)
    assert breaker.try_acquire() is None
    breaker.probe_now()
    trial = breaker.try_acquire()
    assert trial is not None and breaker.state is State.HALF_OPEN


def test_released_half_open_trial_is_handed_out_again() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("x", BreakerConfig(window=2, min_calls=2, half_open_calls=1), clock)
    for _ in range(2):
        permit = breaker.try_acquire()
        assert permit is not None
        breaker.on_failure(permit, 0.001)
    clock.advance(10.0)
    trial = breaker.try_acquire()
    assert trial is not None and breaker.state is State.HALF_OPEN
    assert breaker.try_acquire() is None  # the only trial is out
    breaker.release(trial)
    again = breaker.try_acquire()
    assert again is not None
    breaker.on_success(again, 0.001)
    assert breaker.state is State.CLOSED


def test_an_open_breaker_skips_the_downstream_until_its_wait_is_over() -> None:
    h = harness()
    h.ranking.error = rpc_error(grpc.StatusCode.UNAVAILABLE)
    for i in range(12):
        page = h.pipeline.run(feed_request(request_id=f"r{i}"), None)
        assert page.degraded == (feed_pb2.DEGRADATION_RANKING,)
    assert len(h.ranking.calls) == 10  # min_calls failures opened it; two were skipped
    assert h.pipeline.breakers["ranking"].state is State.OPEN
    assert h.pipeline.breakers["features"].state is State.CLOSED
    h.ranking.error = None
    h.clock.advance(5.0)
    for i in range(3):
        page = h.pipeline.run(feed_request(request_id=f"t{i}"), None)
        assert page.degraded == ()
    assert len(h.ranking.calls) == 13
    assert h.pipeline.breakers["ranking"].state is State.CLOSED


def test_slow_downstream_opens_its_breaker() -> None:
    h = harness()
    h.retrieval.takes_s = 0.041
    for i in range(10):
        assert h.pipeline.run(feed_request(request_id=f"r{i}"), 10.0).degraded == ()
    assert h.pipeline.breakers["retrieval"].state is State.OPEN
    page = h.pipeline.run(feed_request(), 10.0)
    assert page.degraded == (feed_pb2.DEGRADATION_RETRIEVAL,)
    assert len(h.retrieval.calls) == 10


def test_hop_timeouts_come_from_the_remaining_deadline() -> None:
    h = harness()
    h.retrieval.takes_s = 0.020
    h.features.takes_s = 0.040
    h.pipeline.run(feed_request(), 0.100)
    assert h.retrieval.calls[0]["timeout_s"] == pytest.approx(0.030)  # 30 % of 100 ms
    assert h.features.calls[0]["timeout_s"] == pytest.approx(0.040)  # 40 % of 100 ms
    assert h.ranking.calls[0]["timeout_s"] == pytest.approx(0.035)  # 100 - 60 - 5 reserve
    h.pipeline.run(feed_request(), 10.0)  # a generous caller: the per-hop caps
    assert [c.calls[1]["timeout_s"] for c in (h.retrieval, h.features, h.ranking)] == [
        pytest.approx(0.045),
        pytest.approx(0.060),
        pytest.approx(0.060),
    ]
    h.pipeline.run(feed_request(surface=CHECKOUT), None)  # no deadline: the surface's 100 ms
    assert h.retrieval.calls[2]["timeout_s"] == pytest.approx(0.030)


def test_a_spent_deadline_skips_the_hops() -> None:
    h = harness()
    page = h.pipeline.run(feed_request(page_size=5), 0.004)  # less than the 5 ms reserve
    assert page.degraded == (feed_pb2.DEGRADATION_RETRIEVAL, feed_pb2.DEGRADATION_FEATURES)
    assert page.item_ids.tolist() == POPULAR_US_IOS[:5].tolist()
    assert h.retrieval.calls == h.features.calls == h.ranking.calls == []
    assert h.pipeline.breakers["retrieval"].snapshot()["calls"] == 0  # not a failure
    h.retrieval.takes_s = 0.055  # retrieval eats the budget: features get no time
    page = h.pipeline.run(feed_request(page_size=5), 0.060)
    assert page.degraded == (feed_pb2.DEGRADATION_FEATURES,)


def test_stage_times_and_timers() -> None:
    times = StageTimes(0.814, 0.02, 1.2, 0.95, 0.1, 3.4)
    assert times.format() == (
        "retrieval=0.81;filter=0.02;features=1.20;ranking=0.95;rerank=0.10;total=3.40"
    )
    h = harness()
    for _ in range(3):
        h.pipeline.timers.record(times)
    snap = h.pipeline.timers.snapshot()
    assert snap["total"] == {"count": 3, "p50_ms": pytest.approx(3.4), "p99_ms": pytest.approx(3.4)}
    assert set(snap) == {"retrieval", "filter", "features", "ranking", "rerank", "total"}


# --- request validation and the servicer ----------------------------------------------------


def valid_proto(**overrides: object) -> feed_pb2.GetFeedRequest:
    fields: dict[str, object] = {
        "request_id": "req-1",
        "user_id": 42,
        "surface": HOME,
        "page_size": 20,
        "cart_item_ids": [3, 4],
        "context": common_pb2.RequestContext(country="US", device="ios"),
    }
    fields.update(overrides)
    return feed_pb2.GetFeedRequest(**fields)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"page_size": 0}, r"^page_size must be 1..100, got 0$"),
        ({"page_size": 101}, r"^page_size must be 1..100, got 101$"),
        ({"surface": 0}, r"^surface must be one of SURFACE_HOME, SURFACE_CHECKOUT, got "),
        ({"user_id": -1}, r"^user_id must be 0..\d+, got -1$"),
        ({"cart_item_ids": list(range(101))}, r"^cart_item_ids must have at most 100 ids"),
        ({"cart_item_ids": [1, -2]}, r"^cart_item_ids must be non-negative ids, got 1 negative"),
        ({"request_id": "x" * 129}, r"^request_id must be at most 128 characters.*got 129$"),
        (
            {"request_id": "r\u00e9q"},
            r"^request_id must be printable ASCII .*got '\u00e9' at index 1$",
        ),
        ({"request_id": "a\nb"}, r"^request_id must be printable ASCII .*got '\\n' at index 1$"),
        ({"request_id": "a b"}, r"^request_id must be printable ASCII without spaces"),
        (
            {"context": common_pb2.RequestContext(device="x" * 100_000)},
            r"^context.device must be .*got 'x{30,}\.\.\. \(100000 characters\)$",
        ),
        (
            {"context": common_pb2.RequestContext(country="us")},
            r"^context.country must be empty or an ISO 3166-1 alpha-2 code",
        ),
        (
            {"context": common_pb2.RequestContext(device="tv")},
            r"^context.device must be empty or one of ios, android, web, got 'tv'$",
        ),
    ],
)
def test_bad_requests_name_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_request(valid_proto(**overrides))


def test_valid_requests_at_the_limits() -> None:
    parsed = parse_request(
        valid_proto(
            request_id="",
            page_size=100,
            cart_item_ids=list(range(100)),
            context=common_pb2.RequestContext(),
        )
    )
    assert (
        len(parsed.request_id) == 32
        and parsed.request_id != parse_request(valid_proto(request_id="")).request_id
    )  # a fresh uuid4 hex each time
    assert parsed.cart_item_ids.dtype == np.int64 and len(parsed.cart_item_ids) == 100
    assert parse_request(valid_proto(request_id="x" * 128, page_size=1)).page_size == 1


class FakeContext:
    def __init__(self, remaining: float | None = None) -> None:
        self.remaining = remaining
        self.trailing: tuple = ()

    def time_remaining(self) -> float | None:
        return self.remaining

    def set_trailing_metadata(self, metadata: tuple) -> None:
        self.trailing = metadata


def test_servicer_builds_parallel_arrays_and_the_stage_trailer() -> None:
    h = harness()
    context = FakeContext(remaining=1.0)
    response = FeedServicer(h.pipeline).GetFeed(valid_proto(page_size=7), context)
    assert list(response.positions) == [1, 2, 3, 4, 5, 6, 7]
    assert len(response.item_ids) == len(response.scores) == len(response.egmv) == 7
    assert len(response.reasons) == len(response.propensities) == 7
    assert not {3, 4} & set(response.item_ids)
    assert response.model_version == "7" and response.arm == "stable"
    assert list(response.degraded) == []
    [(key, value)] = context.trailing
    assert key == STAGE_METADATA_KEY
    stages = dict(piece.split("=") for piece in value.split(";"))
    assert list(stages) == ["retrieval", "filter", "features", "ranking", "rerank", "total"]
    assert float(stages["total"]) >= float(stages["rerank"]) >= 0
    assert h.pipeline.timers.snapshot()["total"]["count"] == 1
    assert h.retrieval.calls[0]["timeout_s"] == pytest.approx(0.045)  # cap, 1 s deadline


# --- settings and the popularity fallback ---------------------------------------------------


@pytest.fixture
def gateway_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in ("RETRIEVAL", "FEATURES", "RANKING"):
        monkeypatch.setenv(f"HOMEFEED_{name}_ADDR", f"127.0.0.1:{5000 + len(name)}")
    monkeypatch.setenv("HOMEFEED_HOME", str(tmp_path))
    for name in ("HOMEFEED_MODEL", "HOMEFEED_BUNDLE_DIR", "HOMEFEED_GATEWAY_MODEL"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_settings_defaults_and_overrides(gateway_env: pytest.MonkeyPatch) -> None:
    settings = GatewaySettings.from_env()
    assert settings.pipeline == PipelineConfig()
    assert settings.rerank == R.RerankConfig()
    assert settings.breaker == BreakerConfig()
    assert settings.source.model == "champion" and settings.source.bundle_dir is None
    gateway_env.setenv("HOMEFEED_MODEL", "7")  # the mesh's one version
    assert GatewaySettings.from_env().source.model == "7"
    gateway_env.setenv("HOMEFEED_GATEWAY_MODEL", "8")  # a service's own wins
    assert GatewaySettings.from_env().source.model == "8"
    gateway_env.setenv("HOMEFEED_GATEWAY_CANDIDATES", "300")
    gateway_env.setenv("HOMEFEED_GATEWAY_RANKING_TIMEOUT_MS", "25")
    gateway_env.setenv("HOMEFEED_GATEWAY_EPSILON", "0")
    gateway_env.setenv("HOMEFEED_GATEWAY_BREAKER_SLOW_CALL_MS", "12.5")
    settings = GatewaySettings.from_env()
    assert settings.pipeline.candidates == 300
    assert settings.pipeline.ranking_cap_s == pytest.approx(0.025)
    assert settings.rerank.epsilon == 0.0
    assert settings.breaker.slow_call_s == pytest.approx(0.0125)


@pytest.mark.parametrize("missing", ["RETRIEVAL", "FEATURES", "RANKING"])
def test_settings_name_a_missing_address(gateway_env: pytest.MonkeyPatch, missing: str) -> None:
    gateway_env.delenv(f"HOMEFEED_{missing}_ADDR")
    with pytest.raises(SettingsError, match=f"^HOMEFEED_{missing}_ADDR is required"):
        GatewaySettings.from_env()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("HOMEFEED_GATEWAY_CANDIDATES", "5000", "must be 1..2000, got 5000"),
        ("HOMEFEED_GATEWAY_EPSILON", "1.5", r"must be in \[0, 1\], got 1.5"),
        ("HOMEFEED_GATEWAY_BREAKER_MIN_CALLS", "50", r"must be 1..window \(20\), got 50"),
        ("HOMEFEED_GATEWAY_MAX_PER_CATEGORY", "four", "must be an integer, got 'four'"),
    ],
)
def test_settings_name_a_bad_value(
    gateway_env: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    gateway_env.setenv(name, value)
    with pytest.raises(SettingsError, match=f"^{name}.*{message}"):
        GatewaySettings.from_env()


def make_bundle(path: Path, popular: object) -> Path:
    (path / "retrieval").mkdir(parents=True)
    (path / POPULAR).write_text(json.dumps(popular))
    write_manifest(path, version="test", data_snapshot="none", feature_schema_hash="x", metrics={})
    return path


def test_popularity_loads_from_a_verified_bundle_directory(
    gateway_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bundle = make_bundle(
        tmp_path / "bundle",
        {"k": 3, "overall": [1, 2, 3], "segments": {"US/ios": [7, 8, 9], "DE/web": [4, 5, 6]}},
    )
    gateway_env.setenv("HOMEFEED_GATEWAY_BUNDLE_DIR", str(bundle))
    lists, version = load_popularity(GatewaySettings.from_env())
    assert lists.lookup("DE", "web").tolist() == [4, 5, 6]
    assert lists.lookup("DE", "ios").tolist() == [1, 2, 3]
    assert lists.lookup("US", "ios").dtype == np.int64 and version == "test"
    (bundle / POPULAR).write_text('{"overall": [], "segments": {}}')  # not what was verified
    with pytest.raises(StartupError, match=r"HOMEFEED_GATEWAY_BUNDLE_DIR.*modified"):
        load_popularity(GatewaySettings.from_env())


def test_malformed_popularity_lists_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"segments\['US/ios'\] must be a list of non-negative"):
        PopularityLists.from_json({"overall": [1], "segments": {"US/ios": [1, -2]}})
    with pytest.raises(ValueError, match="must be an object with 'overall' and 'segments'"):
        PopularityLists.from_json([1, 2, 3])


# --- gRPC: the real clients against fake downstream servicers, and the server -----------------


@dataclass
class Seen:
    retrieve: list[retrieval_pb2.RetrieveRequest] = field(default_factory=list)
    features: list[features_pb2.GetFeaturesRequest] = field(default_factory=list)
    rank: list[ranking_pb2.RankRequest] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    broken: str = ""  # "retrieval": answer with arrays of different lengths


class FakeDownstreams(
    retrieval_pb2_grpc.RetrievalServiceServicer,
    features_pb2_grpc.FeaturesServiceServicer,
    ranking_pb2_grpc.RankingServiceServicer,
):
    """All three services in one servicer, answering from the fake catalog."""

    def __init__(self, catalog: Catalog, seen: Seen) -> None:
        self.catalog = catalog
        self.seen = seen

    def _note(self, context: grpc.ServicerContext) -> None:
        metadata = context.invocation_metadata()
        self.seen.request_ids += [v for k, v in metadata if k == "x-request-id"]

    def Retrieve(
        self, request: retrieval_pb2.RetrieveRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.RetrieveResponse:
        self._note(context)
        self.seen.retrieve.append(request)
        response = retrieval_pb2.RetrieveResponse(model_version="r1")
        response.item_ids.extend(range(request.n))
        response.scores.extend([0.5] * request.n)
        response.sources.extend([ANN] * (request.n - (self.seen.broken == "retrieval")))
        response.propensities.extend([0.0] * request.n)
        return response

    def GetFeatures(
        self, request: features_pb2.GetFeaturesRequest, context: grpc.ServicerContext
    ) -> features_pb2.GetFeaturesResponse:
        self._note(context)
        self.seen.features.append(request)
        ids = np.array(request.item_ids, dtype=np.int64)
        c = self.catalog
        matrix = np.zeros((len(ids), COLS), dtype=np.float32)
        matrix[:, 0] = ids
        response = features_pb2.GetFeaturesResponse(features=to_float_matrix(matrix, SCHEMA))
        response.available.extend(c.available[ids].tolist())
        response.values.extend(c.values[ids].tolist())
        response.prices.extend(c.values[ids].tolist())
        response.categories.extend(c.categories[ids].tolist())
        response.new_seller.extend(c.new_seller[ids].tolist())
        response.heuristic_scores.extend(c.heuristic[ids].tolist())
        return response

    def Rank(
        self, request: ranking_pb2.RankRequest, context: grpc.ServicerContext
    ) -> ranking_pb2.RankResponse:
        self._note(context)
        self.seen.rank.append(request)
        ids = np.array(request.item_ids, dtype=np.int64)
        X = from_float_matrix(request.features)
        if len(request.row_mask):
            X = X[np.array(request.row_mask, dtype=bool)]
        assert (X[:, 0] == ids).all() and request.features.schema_hash == SCHEMA
        egmv = self.catalog.egmv[ids]
        response = ranking_pb2.RankResponse(model_version="7", schema_hash=SCHEMA)
        response.p_purchase.extend((egmv / 100).tolist())
        response.egmv.extend(egmv.tolist())
        return response


@dataclass
class FakeMesh:
    address: str
    seen: Seen
    catalog: Catalog


@pytest.fixture
def fake_mesh() -> Iterator[FakeMesh]:
    catalog = Catalog.make()
    catalog.available[np.argsort(-catalog.egmv[:N_CANDIDATES])[:3]] = False  # 3 best: no stock
    seen = Seen()
    servicer = FakeDownstreams(catalog, seen)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(servicer, server)
    features_pb2_grpc.add_FeaturesServiceServicer_to_server(servicer, server)
    ranking_pb2_grpc.add_RankingServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield FakeMesh(f"127.0.0.1:{port}", seen, catalog)
    server.stop(0)


def grpc_pipeline(address: str, rerank: R.RerankConfig = NO_RERANK) -> FeedPipeline:
    clients = Downstreams.connect(address, address, address)
    return FeedPipeline(
        clients.retrieval,
        clients.features,
        clients.ranking,
        popularity(),
        rerank_config=rerank,
        on_close=clients.close,
    )


def test_grpc_clients_carry_the_request_to_each_downstream(fake_mesh: FakeMesh) -> None:
    pipeline = grpc_pipeline(fake_mesh.address)
    try:
        page = pipeline.run(feed_request(page_size=10, cart=[1, 2], request_id="rid-9"), 5.0)
    finally:
        pipeline.close()
    seen, catalog = fake_mesh.seen, fake_mesh.catalog
    assert page.degraded == ()
    [retrieve] = seen.retrieve
    assert retrieve.n == N_CANDIDATES and list(retrieve.exclude_item_ids) == [1, 2]
    assert list(retrieve.cart_item_ids) == [1, 2] and retrieve.context.country == "US"
    [features] = seen.features
    assert 1 not in features.item_ids and len(features.item_ids) == N_CANDIDATES - 2
    [rank] = seen.rank
    assert catalog.available[list(rank.item_ids)].all()
    # the features service's matrix, forwarded whole, and a mask of the available rows
    assert rank.features.rows == len(features.item_ids) == len(rank.row_mask)
    assert sum(rank.row_mask) == len(rank.item_ids) == N_CANDIDATES - 2 - 3
    assert features.HasField("user") is False  # the fake retrieval read no user
    candidates = np.array([i for i in range(N_CANDIDATES) if i not in (1, 2)])
    candidates = candidates[catalog.available[candidates]]
    np.testing.assert_array_equal(page.item_ids, expected_top(catalog, candidates, 10))
    assert seen.request_ids == ["rid-9"] * 3


def test_a_malformed_downstream_answer_is_served_by_the_fallback(fake_mesh: FakeMesh) -> None:
    fake_mesh.seen.broken = "retrieval"
    pipeline = grpc_pipeline(fake_mesh.address)
    try:
        page = pipeline.run(feed_request(page_size=5), 5.0)
    finally:
        pipeline.close()
    assert page.degraded == (feed_pb2.DEGRADATION_RETRIEVAL,)
    assert set(page.item_ids.tolist()) <= set(POPULAR_US_IOS.tolist())


def test_unreachable_downstreams_fail_fast_into_the_fallbacks() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: refused
        pipeline = grpc_pipeline(address)
        try:
            page = pipeline.run(feed_request(page_size=5), 5.0)
        finally:
            pipeline.close()
    assert page.degraded == (feed_pb2.DEGRADATION_RETRIEVAL, feed_pb2.DEGRADATION_FEATURES)
    assert page.item_ids.tolist() == POPULAR_US_IOS[:5].tolist()
    assert page.times.retrieval < 1000 and page.times.features < 1000


def gateway_settings(address: str, **overrides: object) -> GatewaySettings:
    """Settings of a gateway whose three downstreams are all at ``address``."""
    return GatewaySettings(
        server=ServerSettings(port=0),
        retrieval_addr=address,
        features_addr=address,
        ranking_addr=address,
        home=Path("."),
        **overrides,  # type: ignore[arg-type]
    )


def test_gateway_server_over_grpc(fake_mesh: FakeMesh) -> None:
    settings = gateway_settings(fake_mesh.address)
    pipeline = grpc_pipeline(fake_mesh.address, rerank=R.RerankConfig())
    server, port, served = create_server(settings, pipeline)
    assert served is pipeline and SERVICE_NAME == "homefeed.feed.v1.FeedService"
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = feed_pb2_grpc.FeedServiceStub(channel)
            response, call = stub.GetFeed.with_call(
                valid_proto(request_id="", page_size=20), timeout=5.0
            )
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetFeed(valid_proto(page_size=500), timeout=5.0)
    finally:
        server.stop(0)
        pipeline.close()
    assert len(response.item_ids) == 20 and len(response.request_id) == 32
    assert all(0 < p <= 1 for p in response.propensities)
    trailer = dict(call.trailing_metadata())[STAGE_METADATA_KEY]
    assert {p.split("=")[0] for p in trailer.split(";")} >= {"retrieval", "ranking", "total"}
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "page_size must be 1..100, got 500"
    assert response.model_version == "7" and list(response.degraded) == []


def test_the_users_features_go_from_retrieval_to_features_once() -> None:
    h = harness()
    user = common_pb2.UserFeatures(known=True, number_names=["clicks_30d"], number_values=[3.0])
    h.retrieval.user = user
    h.pipeline.run(feed_request(), None)
    assert h.features.calls[0]["user"] is user


def test_a_page_whose_hops_serve_another_version_is_flagged(caplog) -> None:
    h = harness()
    h.pipeline.model_version = "7"  # what ranking reports; retrieval reports "r1"
    with caplog.at_level("WARNING", logger="services.gateway.pipeline"):
        page = h.pipeline.run(feed_request(), None)
    assert page.version_skew and "another model version" in caplog.text
    h.retrieval.version = "7"
    assert not h.pipeline.run(feed_request(), None).version_skew
    h.pipeline.model_version = ""  # a gateway that does not know its version flags nothing
    h.retrieval.version = "r1"
    assert not h.pipeline.run(feed_request(), None).version_skew


def test_a_version_skew_is_logged_once_per_combination(caplog) -> None:
    h = harness()
    h.pipeline.model_version = "7"  # retrieval reports "r1"
    with caplog.at_level("WARNING", logger="services.gateway.pipeline"):
        for _ in range(5):
            assert h.pipeline.run(feed_request(), None).version_skew
    assert caplog.text.count("another model version") == 1


# --- load shedding and readiness ----------------------------------------------------------


def test_admission_refuses_past_capacity_and_short_deadlines() -> None:
    admission = Admission(AdmissionConfig(max_in_flight=2, min_budget_s=0.010))
    admission.admit(1.0)
    admission.admit(None)  # no deadline: nothing to check but capacity
    with pytest.raises(Shed, match=r"at capacity \(2 feeds in flight\)") as full:
        admission.admit(1.0)
    assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert full.value.retry_after_ms == 50
    admission.release()
    admission.admit(1.0)  # a slot came free
    with pytest.raises(Shed, match=r"remaining deadline \(5\.0 ms\) cannot cover"):
        admission.admit(0.005)
    assert admission.snapshot() == {
        "in_flight": 2,
        "admitted": 3,
        "shed_full": 1,
        "shed_deadline": 1,
    }


def test_the_gateway_sheds_at_once_with_a_retry_hint(fake_mesh: FakeMesh) -> None:
    """One feed held in flight; the next is refused at once (no queue), with the hint, and
    the held one still completes."""
    settings = gateway_settings(fake_mesh.address, admission=AdmissionConfig(max_in_flight=1))
    assert settings.serving.max_workers == settings.serving.max_concurrent_rpcs == 3  # 1 + 2 spare
    h = harness()
    entered, release = threading.Event(), threading.Event()
    retrieve = h.retrieval.retrieve

    def held(request: FeedRequest, n: int, timeout_s: float) -> Candidates:
        entered.set()
        release.wait(10)
        return retrieve(request, n, timeout_s)

    h.retrieval.retrieve = held  # type: ignore[method-assign]
    server, port, _ = create_server(settings, h.pipeline)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = feed_pb2_grpc.FeedServiceStub(channel)
            first = stub.GetFeed.future(valid_proto(page_size=5), timeout=10.0)
            assert entered.wait(5)
            started = time.perf_counter()
            with pytest.raises(grpc.RpcError) as shed:
                stub.GetFeed(valid_proto(page_size=5), timeout=5.0)
            took = time.perf_counter() - started
            release.set()
            assert len(first.result(timeout=10).item_ids) == 5
            assert len(stub.GetFeed(valid_proto(page_size=5), timeout=5.0).item_ids) == 5
    finally:
        release.set()
        server.stop(0)
    assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "at capacity (1 feeds in flight)" in (shed.value.details() or "")
    assert dict(shed.value.trailing_metadata())[RETRY_AFTER_KEY] == "50"
    assert retry_after_s(shed.value) == 0.05
    assert retry_after_s(ValueError("not a call")) == 0.0
    assert took < 1.0
    assert all(
        b.snapshot()["calls"] == 0 or b.state is State.CLOSED for b in h.pipeline.breakers.values()
    )


def test_readiness_follows_the_downstreams_health_liveness_does_not() -> None:
    backend = grpc.server(futures.ThreadPoolExecutor(2))
    backend_health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(backend_health, backend)
    backend_port = backend.add_insecure_port("127.0.0.1:0")
    backend.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # bound, never listening
        channels = {
            "retrieval": grpc.insecure_channel(
                f"127.0.0.1:{backend_port}", options=CHANNEL_OPTIONS
            ),
            "features": grpc.insecure_channel(dead, options=CHANNEL_OPTIONS),
        }
        gateway_health = HealthServicer()
        recovered: list[str] = []
        watcher = HopWatcher(
            channels, gateway_health, SERVICE_NAME, interval_s=60, on_recovered=recovered.append
        )
        try:
            assert watcher.check() is True
            assert watcher.hops == {"retrieval": True, "features": False}
            backend_health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            assert watcher.check() is False
            backend_health.set("", health_pb2.HealthCheckResponse.SERVING)
            assert watcher.check() is True and recovered == ["retrieval"]
            backend_health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            assert watcher.check() is False
            status = gateway_health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), None)
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            backend.stop(0).wait()
            assert watcher.check() is False
            alive = gateway_health.Check(health_pb2.HealthCheckRequest(service=""), None)
            assert alive.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            watcher.close()
            for channel in channels.values():
                channel.close()
            backend.stop(0)


class _FlakyRetrieval(retrieval_pb2_grpc.RetrievalServiceServicer):
    """UNAVAILABLE on every odd call (as a draining server's refused stream), else an answer."""

    def __init__(self) -> None:
        self.calls = 0

    def Retrieve(
        self, request: retrieval_pb2.RetrieveRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.RetrieveResponse:
        self.calls += 1
        if self.calls % 2:
            context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        return retrieval_pb2.RetrieveResponse(
            item_ids=[1, 2], scores=[0.5, 0.4], sources=[ANN, ANN]
        )


def test_an_unavailable_downstream_call_is_retried_once() -> None:
    servicer = _FlakyRetrieval()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        clients = Downstreams.connect(*[f"127.0.0.1:{port}"] * 3)
        try:
            found = clients.retrieval.retrieve(feed_request(), 10, 5.0)
        finally:
            clients.close()
    finally:
        server.stop(0)
    assert found.item_ids.tolist() == [1, 2]
    assert servicer.calls == 2  # the UNAVAILABLE attempt and its one retry


# --- canary releases --------------------------------------------------------------------


def canary_harness(weight: int, mirror_share: float = 0.0, error: Exception | None = None):
    """A pipeline whose router has applied a rollout assignment; the canary is a second
    FakeRanking that reports version "9"."""
    from homefeed.rollout.v1 import rollout_pb2

    from services.gateway.canary import CanaryRouter

    h = harness()
    canary = FakeRanking(h.catalog)
    canary.error = error
    original = canary.rank

    def rank(*args, **kwargs):
        scores = original(*args, **kwargs)
        return Scores(scores.p_purchase, scores.egmv, "9")

    canary.rank = rank  # type: ignore[method-assign]
    router = CanaryRouter(
        "127.0.0.1:1", BreakerConfig(), replica="g1", connect=lambda addr: (canary, lambda: None)
    )
    router.apply(
        rollout_pb2.ReportResponse(
            rollout_id="r1",
            canary_weight=weight,
            salt="s",
            canary_address="127.0.0.1:2",
            canary_version="9",
            mirror_share=mirror_share,
            report_every_ms=100,
        )
    )
    h.pipeline.router = router
    return h, canary, router


def request_for(user: int) -> FeedRequest:
    r = feed_request()
    return FeedRequest(r.request_id, user, r.surface, r.cart_item_ids, r.page_size, r.context)


def test_canary_users_are_ranked_by_the_canary_and_counted_per_arm() -> None:
    from services.common.rollout_stats import arm_of

    h, canary, router = canary_harness(weight=50)
    pages = {}
    for user in range(40):
        page = h.pipeline.run(request_for(user), None)
        page.times.total = 5.0
        h.pipeline.observe(page)
        pages[user] = page
        assert page.arm == arm_of(user, "s", 50)
        assert page.model_version == ("9" if page.arm == "canary" else "7")
        assert not page.version_skew  # ranking's version is not compared
    n_canary = sum(p.arm == "canary" for p in pages.values())
    assert 5 < n_canary < 35 and len(canary.calls) == n_canary
    counters = router._counters
    assert counters.canary.feeds == n_canary and counters.stable.feeds == 40 - n_canary
    assert counters.canary.scored == n_canary and counters.canary.egmv.sum() > 0
    response = to_response(pages[0])
    assert response.arm == pages[0].arm
    # a user keeps their arm
    assert h.pipeline.run(request_for(0), None).arm == pages[0].arm


def test_a_failing_canary_degrades_only_its_arm_through_its_own_breaker() -> None:
    h, _, router = canary_harness(weight=50, error=FakeRpcError(grpc.StatusCode.INTERNAL))
    for user in range(60):
        page = h.pipeline.run(request_for(user), None)
        page.times.total = 5.0
        h.pipeline.observe(page)
        if page.arm == "stable":
            assert page.degraded == ()
        else:
            assert page.degraded == (feed_pb2.DEGRADATION_RANKING,)
    assert router.breaker.state.value == "open"
    assert h.pipeline.breakers["ranking"].state.value == "closed"
    canary = router._counters.canary
    assert 0 < canary.ranking_errors == canary.ranking_calls  # calls made, all failed...
    assert canary.ranking_calls < canary.feeds == canary.degraded  # ...the rest skipped
    assert router._counters.stable.ranking_errors == 0


def test_mirrored_scoring_compares_the_canary_off_the_response_path() -> None:
    h, _, router = canary_harness(weight=0, mirror_share=1.0)
    for user in range(5):
        page = h.pipeline.run(request_for(user), None)
        assert page.arm == "stable" and page.model_version == "7"
    router._mirror_pool.shutdown(wait=True)
    mirror = router._counters.mirror
    assert mirror.mirrored + mirror.dropped == 5 and mirror.mirrored >= 1
    assert mirror.rank_correlation_sum / mirror.mirrored == pytest.approx(1.0)
    assert mirror.top20_overlap_sum / mirror.mirrored == 1.0


def test_without_a_rollout_nothing_is_counted_and_everyone_is_stable() -> None:
    from homefeed.rollout.v1 import rollout_pb2

    h, canary, router = canary_harness(weight=50)
    router.apply(rollout_pb2.ReportResponse(report_every_ms=100))  # the rollout ended
    page = h.pipeline.run(request_for(3), None)
    h.pipeline.observe(page)
    assert page.arm == "stable" and canary.calls == []
    assert router._counters.stable.feeds == 0
