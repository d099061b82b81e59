"""The feed pipeline: retrieve -> filter -> features -> rank -> re-rank, with a deadline per
hop, a circuit breaker per downstream and a fallback for each of them.

Per request (``FeedPipeline.run``):

1. **Budget.** The caller's remaining deadline, or the surface's default when it set none.
   Each hop's timeout is ``min(cap, share x budget, time left - reserve)``: retrieval's share
   is 30 %, features' 40 %, ranking's the whole budget (what is left), and ``reserve`` keeps
   a few milliseconds for re-ranking and the response. A hop with less than ``min_hop_s``
   left is not called: it counts as timed out.
2. **Retrieve** ``candidates`` items excluding the cart, and the user's online features as
   retrieval read them. Fallback (failure, timeout, open breaker): the bundle's popularity
   list of the request's (country, device), flag DEGRADATION_RETRIEVAL.
3. **Filter** the cart's items, the items the frontend has already shown this session
   (``seen_item_ids``) and repeated ids out (retrieval was asked to exclude the cart and
   the seen items, and the popularity list was not).
4. **Features** of the remaining candidates (with the user's features, so the service does
   not read them again), then drop every row that is not ``available`` (out of stock,
   delisted, unknown): such an item is never served. Fallback: no item facts,
   so candidates in retrieval order with reason POPULAR (popularity source), CART_SIMILAR
   (content source) or HEURISTIC, flag DEGRADATION_FEATURES; ranking is skipped. Retrieval
   is then the only stock filter.
5. **Rank** the available rows: the features service's matrix goes to ranking as it came
   (the gateway never decodes it), with a row mask when a row was dropped. Fallback:
   heuristic-score order, reason HEURISTIC, E[GMV] 0, empty model version, flag
   DEGRADATION_RANKING.
6. **Re-rank** (``rerank.py``): category cap, new-seller share, exploration over retrieval's
   exploration draw with exact propensities, the coins seeded by the request id.

An experiment (``experiment.py``) may put the user in an arm whose policy is the heuristic:
ranking is then not called and the page is ordered as the ranking fallback orders it,
without a degradation flag. A user the canary holds is in no experiment arm.

Once answered, the page goes to the impression log (``feedlog.py``) off the request path.

Every hop reports the bundle version it serves; a page whose hops disagree with the
gateway's version is flagged (``version_skew``) and logged.

Filtering happens before ranking rather than after: the features service may send NaN
values for unknown items, which ranking refuses for the whole request.

Every array of item ids is int64 end to end; no Python loop runs over the candidates.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np
from homefeed.common.v1 import common_pb2
from homefeed.feed.v1 import feed_pb2
from opentelemetry import trace

from contract.popular import PopularityLists
from services.common import telemetry
from services.common.errors import describe_error
from services.common.interceptors import LatencyRecorder, bounded
from services.common.rollout_stats import CANARY, STABLE
from services.common.telemetry import attributes
from services.gateway import rerank as R
from services.gateway.breaker import BreakerConfig, CircuitBreaker
from services.gateway.canary import CanaryRouter
from services.gateway.clients import (
    CONTENT_SOURCE,
    EXPLORATION_SOURCE,
    POPULARITY_SOURCE,
    Candidates,
    DownstreamError,
    FeaturesClient,
    FeedRequest,
    ItemFeatures,
    RankingClient,
    RetrievalClient,
    Scores,
)
from services.gateway.experiment import HEURISTIC, Experiment
from services.gateway.feedlog import FeedLogger, LogInfo

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRIEVAL = "retrieval"
FEATURES = "features"
RANKING = "ranking"
DOWNSTREAMS = (RETRIEVAL, FEATURES, RANKING)
STAGES = ("retrieval", "filter", "features", "ranking", "rerank", "total")
STAGE_SPANS = {RETRIEVAL: "retrieve", FEATURES: "features", RANKING: "rank"}
MAX_CANDIDATES = 2000  # RetrieveRequest.n and GetFeaturesRequest.item_ids allow 1..2000
STABLE_ARM = STABLE
CANARY_ARM = CANARY


@dataclass(frozen=True)
class PipelineConfig:
    """Candidates, deadlines and per-hop timeouts (seconds)."""

    candidates: int = 500
    home_deadline_s: float = 0.150  # budget when the caller sets no deadline
    checkout_deadline_s: float = 0.100
    retrieval_share: float = 0.3  # of the budget
    features_share: float = 0.4
    retrieval_cap_s: float = 0.045
    features_cap_s: float = 0.060
    ranking_cap_s: float = 0.060
    reserve_s: float = 0.005  # kept for re-ranking and the response
    min_hop_s: float = 0.001  # a hop with less time than this is skipped
    arm: str = STABLE_ARM

    def __post_init__(self) -> None:
        if not 1 <= self.candidates <= MAX_CANDIDATES:
            raise ValueError(f"candidates must be 1..{MAX_CANDIDATES}, got {self.candidates}")
        for name in ("retrieval_share", "features_share"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        for name in (
            "home_deadline_s",
            "checkout_deadline_s",
            "retrieval_cap_s",
            "features_cap_s",
            "ranking_cap_s",
            "min_hop_s",
        ):
            value = getattr(self, name)
            if not value > 0.0:
                raise ValueError(f"{name} must be > 0 s, got {value}")
        if self.reserve_s < 0.0:
            raise ValueError(f"reserve_s must be >= 0 s, got {self.reserve_s}")

    def default_deadline_s(self, surface: int) -> float:
        if surface == common_pb2.SURFACE_CHECKOUT:
            return self.checkout_deadline_s
        return self.home_deadline_s


@dataclass
class StageTimes:
    """Wall milliseconds per stage of one request; ``total`` is set by the servicer."""

    retrieval: float = 0.0
    filter: float = 0.0
    features: float = 0.0
    ranking: float = 0.0
    rerank: float = 0.0
    total: float = 0.0

    def format(self) -> str:
        """The ``hf-stage-ms`` trailer: ``retrieval=0.81;filter=0.02;...;total=3.40``."""
        return (
            f"retrieval={self.retrieval:.2f};filter={self.filter:.2f};"
            f"features={self.features:.2f};ranking={self.ranking:.2f};"
            f"rerank={self.rerank:.2f};total={self.total:.2f}"
        )


class StageTimers:
    """count/p50/p99 per stage over the last ``window`` requests (in-process diagnostics)."""

    def __init__(self, window: int = 2048) -> None:
        self._recorder = LatencyRecorder(window)
        self._stats = {stage: self._recorder.stats(stage) for stage in STAGES}

    def record(self, times: StageTimes) -> None:
        for stage, stats in self._stats.items():
            stats.add(getattr(times, stage), False)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """``{stage: {count, p50_ms, p99_ms}}``."""
        return {
            stage: {k: v for k, v in figures.items() if k != "errors"}
            for stage, figures in self._recorder.snapshot().items()
        }


@dataclass(frozen=True)
class FeedPage:
    """One page as parallel arrays, slot order, plus what the response reports about it."""

    request_id: str
    item_ids: np.ndarray  # int64
    scores: np.ndarray  # float32: E[GMV], heuristic or retrieval score
    egmv: np.ndarray  # float32, 0 when unranked
    reasons: np.ndarray  # int32 feed.v1.Reason
    propensities: np.ndarray  # float64 in (0, 1]
    model_version: str
    arm: str
    degraded: tuple[int, ...]  # feed.v1.Degradation
    candidates: int  # retrieved (or popularity) candidates before filtering
    version_skew: bool = False  # retrieval or features serve another bundle version
    times: StageTimes = field(default_factory=StageTimes)
    ranking_ms: float | None = None  # the ranking call's wall time (None: not called)
    ranked: Scores | None = None  # the ranking hop's answer (canary analysis)
    trace: dict[str, Any] = field(default_factory=dict)  # figures for the request's span
    experiment: str = ""  # the experiment and arm the user is in ("" when none)
    experiment_arm: str = ""
    log: LogInfo | None = None  # for the impression log; None when nothing logs


def make_breakers(
    config: BreakerConfig, clock: Callable[[], float] = time.monotonic
) -> dict[str, CircuitBreaker]:
    return {name: CircuitBreaker(name, config, clock) for name in DOWNSTREAMS}


def _drop_excluded_and_repeats(
    found: Candidates, excluded: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ids, scores and sources of the candidates without the ``excluded`` items (the cart's
    and the seen ones) and repeated ids (the first occurrence stays), at most ``n``."""
    ids, scores, sources = found.item_ids, found.scores, found.sources
    ordered = np.sort(ids)
    if (ordered[1:] == ordered[:-1]).any():
        _, first = np.unique(ids, return_index=True)
        keep = np.sort(first)
        ids, scores, sources = ids[keep], scores[keep], sources[keep]
    if len(excluded):
        mask = ~np.isin(ids, excluded)
        if not mask.all():
            ids, scores, sources = ids[mask], scores[mask], sources[mask]
    return ids[:n], scores[:n], sources[:n]


class FeedPipeline:
    """Composes the three downstreams into a page; thread-safe (no state but the breakers
    and timers, both locked)."""

    def __init__(
        self,
        retrieval: RetrievalClient,
        features: FeaturesClient,
        ranking: RankingClient,
        popularity: PopularityLists,
        config: PipelineConfig | None = None,
        rerank_config: R.RerankConfig | None = None,
        breakers: Mapping[str, CircuitBreaker] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        on_close: Callable[[], None] | None = None,
        model_version: str = "",
        router: CanaryRouter | None = None,
        experiment: Experiment | None = None,
        feed_logger: FeedLogger | None = None,
    ) -> None:
        self.retrieval = retrieval
        self.features = features
        self.ranking = ranking
        self.popularity = popularity
        self.config = config if config is not None else PipelineConfig()
        self.rerank_config = rerank_config if rerank_config is not None else R.RerankConfig()
        self.breakers = dict(breakers) if breakers is not None else make_breakers(BreakerConfig())
        missing = set(DOWNSTREAMS) - set(self.breakers)
        if missing:
            raise ValueError(f"breakers must include {', '.join(sorted(missing))}")
        self.clock = clock
        self.model_version = model_version  # the bundle the gateway and the mesh serve
        self._skews_logged: set[tuple[str, ...]] = set()
        self.timers = StageTimers()
        tel = telemetry.current()
        self.tracer = tel.tracer
        self._stage_ms = tel.meter.create_histogram(
            "homefeed_stage_duration", unit="s", description="feed pipeline stages"
        )
        self._feeds = tel.meter.create_counter("homefeed_feeds", description="feeds answered")
        self._fallbacks = tel.meter.create_counter(
            "homefeed_fallbacks", description="pages that served a hop's fallback"
        )
        self._closers: list[Callable[[], None]] = [on_close] if on_close is not None else []
        self.router = router  # canary releases; None: every request is stable
        if router is not None:
            self._closers.insert(0, router.close)
        self.experiment = experiment  # None: no experiment runs
        self.feed_logger = feed_logger  # None: served feeds are not logged
        if feed_logger is not None:
            self._closers.insert(0, feed_logger.close)

    def add_closer(self, close: Callable[[], None]) -> None:
        """Run ``close`` on ``close()``, before the ones added earlier."""
        self._closers.insert(0, close)

    def close(self) -> None:
        """Release the clients' resources (channels); call once the server has stopped."""
        for close in self._closers:
            close()

    def _call(
        self,
        name: str,
        request: FeedRequest,
        call: Callable[[float], T],
        timeout_s: float,
        breaker: CircuitBreaker | None = None,
        arm: str = STABLE,
    ) -> tuple[T | None, bool]:
        """``_attempt`` in the hop's stage span (the call's client span is its child)."""
        with self.tracer.start_as_current_span(STAGE_SPANS[name]) as span:
            result, called = self._attempt(name, request, call, timeout_s, breaker, arm)
            if span.is_recording():
                used = breaker if breaker is not None else self.breakers[name]
                span.set_attributes(
                    attributes(
                        downstream=used.name,
                        arm=arm,
                        called=called,
                        fallback=result is None,
                        breaker=str(used.state),
                        timeout_ms=round(timeout_s * 1e3, 2),
                    )
                )
            return result, called

    def _attempt(
        self,
        name: str,
        request: FeedRequest,
        call: Callable[[float], T],
        timeout_s: float,
        breaker: CircuitBreaker | None = None,
        arm: str = STABLE,
    ) -> tuple[T | None, bool]:
        """``call(timeout)`` through ``name``'s breaker (or ``breaker``), and whether the
        call was made (not skipped for want of time or by an open breaker); a None result
        means "serve the fallback"."""
        if timeout_s < self.config.min_hop_s:
            log.debug(
                "deadline spent before the hop",
                extra={"downstream": name, "request_id": request.request_id},
            )
            return None, False
        breaker = breaker if breaker is not None else self.breakers[name]
        permit = breaker.try_acquire()
        if permit is None:
            log.debug("breaker open", extra={"downstream": name, "request_id": request.request_id})
            return None, False
        started = self.clock()
        try:
            result = call(timeout_s)
        except (grpc.RpcError, DownstreamError) as err:  # the downstream failed or refused
            refused = _is_refusal(err)
            if refused:  # the request was bad, not the downstream: not counted
                breaker.release(permit)
            else:
                breaker.on_failure(permit, self.clock() - started)
            log.warning(
                "downstream failed, serving its fallback",
                extra={
                    "downstream": name,
                    "arm": arm,
                    "request_id": request.request_id,
                    "error": bounded(describe_error(err), 300),
                    "timeout_ms": round(timeout_s * 1e3, 2),
                    "counted": not refused,
                },
            )
            return None, True
        except Exception:  # the gateway's own bug: said loudly, never held against the hop
            breaker.release(permit)
            log.exception(
                "gateway error calling a downstream (a bug), serving its fallback",
                extra={"downstream": name, "request_id": request.request_id},
            )
            return None, True
        breaker.on_success(permit, self.clock() - started)
        return result, True

    def _popular(self, request: FeedRequest, n: int) -> Candidates:
        """Retrieval's fallback: the request's (country, device) popularity list."""
        ids = self.popularity.lookup(request.context.country, request.context.device)[:n]
        return Candidates(
            ids,
            np.zeros(len(ids), dtype=np.float32),
            np.full(len(ids), POPULARITY_SOURCE, dtype=np.int32),
        )

    def _timeout(self, deadline: float, budget: float, share: float, cap: float) -> float:
        left = deadline - self.clock() - self.config.reserve_s
        return min(cap, share * budget, left)

    def run(self, request: FeedRequest, remaining_s: float | None) -> FeedPage:
        """The page for ``request``; ``remaining_s`` is the caller's deadline (None: none)."""
        cfg = self.config
        clock = self.clock
        t0 = clock()
        budget = remaining_s if remaining_s is not None else cfg.default_deadline_s(request.surface)
        deadline = t0 + budget
        degraded: list[int] = []
        times = StageTimes()
        router = self.router
        arm = router.arm(request.user_id) if router is not None else cfg.arm
        exp_arm = None
        if self.experiment is not None and arm != CANARY_ARM:
            exp_arm = self.experiment.arm_of(request.user_id)
        skip_ranking = exp_arm is not None and exp_arm.policy == HEURISTIC

        n = cfg.candidates
        found, _ = self._call(
            RETRIEVAL,
            request,
            lambda t: self.retrieval.retrieve(request, n, t),
            self._timeout(deadline, budget, cfg.retrieval_share, cfg.retrieval_cap_s),
        )
        if found is None:
            degraded.append(feed_pb2.DEGRADATION_RETRIEVAL)
            found = self._popular(request, n)
        retrieved = len(found.item_ids)
        t1 = clock()
        times.retrieval = (t1 - t0) * 1e3

        excluded = request.cart_item_ids
        if len(request.seen_item_ids):
            excluded = np.concatenate([excluded, request.seen_item_ids])
        ids, scores, sources = _drop_excluded_and_repeats(found, excluded, n)
        t2 = clock()
        times.filter = (t2 - t1) * 1e3
        after_filter = len(ids)

        facts = None
        if len(ids):
            facts, _ = self._call(
                FEATURES,
                request,
                lambda t: self.features.get_features(request, ids, t, found.user),
                self._timeout(deadline, budget, cfg.features_share, cfg.features_cap_s),
            )
            if facts is None:
                degraded.append(feed_pb2.DEGRADATION_FEATURES)
        t3 = clock()
        times.features = (t3 - t2) * 1e3

        ranked = None
        ranking_ms = None
        matrix_rows: np.ndarray | None = None
        categories = new_seller = None
        # ranking's version is not compared: a canary and a promotion serve another ranking
        # bundle on purpose, and its feature schema hash is checked on every Rank
        versions = [found.model_version]
        if facts is None:
            order_scores = None
            base = np.full(len(ids), R.HEURISTIC, dtype=np.int32)
            base[sources == POPULARITY_SOURCE] = R.POPULAR
            base[sources == CONTENT_SOURCE] = R.CART_SIMILAR
            egmv = np.zeros(len(ids), dtype=np.float32)
        else:
            versions.append(facts.model_version)
            available = facts.available
            values, heuristic = facts.values, facts.heuristic_scores
            categories, new_seller = facts.categories, facts.new_seller
            row_mask = None
            matrix_rows = np.arange(len(ids))
            if not available.all():  # ranking gets the whole matrix and this mask
                row_mask = available
                matrix_rows = matrix_rows[available]
                ids, scores, sources = ids[available], scores[available], sources[available]
                values, heuristic = values[available], heuristic[available]
                categories, new_seller = categories[available], new_seller[available]
            t4 = clock()
            times.filter += (t4 - t3) * 1e3
            if len(ids) and not skip_ranking:
                ranking, breaker = self.ranking, None
                if arm == CANARY_ARM and router is not None:
                    ranking, breaker = router.canary_client() or ranking, router.breaker
                ranked, called = self._call(
                    RANKING,
                    request,
                    lambda t: ranking.rank(request, ids, facts.matrix, row_mask, values, t),
                    self._timeout(deadline, budget, 1.0, cfg.ranking_cap_s),
                    breaker,
                    arm,
                )
                ranking_ms = (clock() - t4) * 1e3 if called else None
                if ranked is None:
                    degraded.append(feed_pb2.DEGRADATION_RANKING)
                elif router is not None and arm == STABLE_ARM and router.active:
                    router.maybe_mirror(request, ids, facts.matrix, row_mask, values, ranked)
            if ranked is not None:
                order_scores = scores = ranked.egmv
                egmv = ranked.egmv
                base = np.full(len(ids), R.RANKED, dtype=np.int32)
            else:
                order_scores = scores = heuristic
                egmv = np.zeros(len(ids), dtype=np.float32)
                base = np.full(len(ids), R.HEURISTIC, dtype=np.int32)
            times.ranking = (clock() - t4) * 1e3

        t5 = clock()
        rcfg = self.rerank_config
        rng = (
            np.random.default_rng(R.request_seed(request.request_id)) if rcfg.epsilon > 0 else None
        )
        page = R.rerank(
            len(ids),
            request.page_size,
            rcfg,
            base,
            scores=order_scores,
            categories=categories,
            new_seller=new_seller,
            exploration=sources == EXPLORATION_SOURCE,
            pool_size=found.exploration_pool,
            rng=rng,
        )
        slots = page.index
        t6 = clock()
        times.rerank = (t6 - t5) * 1e3
        log_info = None
        if self.feed_logger is not None:
            served_rows = None if matrix_rows is None else matrix_rows[slots]
            log_info = self._log_info(request, found.item_ids, facts, served_rows)
        skew = self.version_skew(versions, request)
        figures: dict[str, Any] = {}
        if trace.get_current_span().is_recording():
            reasons = page.reasons
            figures = {
                "surface": int(request.surface),
                "country": request.context.country or None,
                "device": request.context.device or None,
                "user_segment": _segment(found),
                "cart_items": len(request.cart_item_ids),
                "dropped_cart_or_repeated": retrieved - after_filter,
                "dropped_unavailable": after_filter - len(ids),
                "ranked": len(ids) if ranked is not None else 0,
                "explored": int((reasons == R.EXPLORATION).sum()),
                "new_seller_promoted": int((reasons == R.NEW_SELLER).sum()),
                "diversity_moved": int((reasons == R.DIVERSITY).sum()),
            }
            self._stage_span("filter", t1, t2, figures, ("dropped_cart_or_repeated",))
            self._stage_span("rerank", t5, t6, figures, ("explored", "new_seller_promoted"))
        return FeedPage(
            request_id=request.request_id,
            item_ids=ids[slots],
            scores=scores[slots],
            egmv=egmv[slots],
            reasons=page.reasons,
            propensities=page.propensities,
            model_version=ranked.model_version if ranked is not None else "",
            arm=arm,
            degraded=tuple(degraded),
            candidates=retrieved,
            version_skew=skew,
            times=times,
            ranking_ms=ranking_ms,
            ranked=ranked,
            trace=figures,
            experiment=self.experiment.name if self.experiment and exp_arm else "",
            experiment_arm=exp_arm.name if exp_arm is not None else "",
            log=log_info,
        )

    def _log_info(
        self,
        request: FeedRequest,
        retrieved: np.ndarray,
        facts: ItemFeatures | None,
        served_rows: np.ndarray | None,
    ) -> LogInfo:
        """What the impression log needs beyond the response; ``served_rows``: the rows of
        ``facts`` the page shows, in slot order (None when features failed)."""
        ctx = request.context
        seen = request.seen_item_ids
        info = LogInfo(
            user_id=request.user_id,
            surface=request.surface,
            ts_ns=ctx.time.ToNanoseconds() if ctx.HasField("time") else time.time_ns(),
            country=ctx.country,
            device=ctx.device,
            seen_filtered=int(np.isin(retrieved, seen).sum()) if len(seen) else 0,
            seen_items=len(seen),
        )
        if facts is None or served_rows is None:
            return info
        logger = self.feed_logger
        sample = logger is not None and logger.wants_features(request.request_id)
        return dataclasses.replace(
            info,
            categories=facts.categories[served_rows],
            new_seller=facts.new_seller[served_rows],
            prices=facts.prices[served_rows],
            matrix=facts.matrix if sample else None,
            matrix_rows=served_rows if sample else None,
        )

    def _stage_span(
        self, name: str, start: float, end: float, figures: dict[str, Any], keys: tuple[str, ...]
    ) -> None:
        """A span for a stage that made no call, recorded after the fact (its times
        converted from the pipeline's clock)."""
        now_ns, now = time.time_ns(), self.clock()
        span = self.tracer.start_span(name, start_time=now_ns - int((now - start) * 1e9))
        span.set_attributes(attributes(**{k: figures[k] for k in keys}))
        span.end(end_time=now_ns - int((now - end) * 1e9))

    def observe(self, page: FeedPage) -> None:
        """Count a finished page (``times.total`` set): stage timers and metrics, the
        canary analysis' per-arm counters during a rollout, and the page's figures on the
        request's span."""
        self.timers.record(page.times)
        for stage in STAGES:
            self._stage_ms.record(getattr(page.times, stage) / 1e3, {"stage": stage})
        self._feeds.add(1, {"arm": page.arm, "degraded": str(bool(page.degraded)).lower()})
        for hop in page.degraded:
            self._fallbacks.add(1, {"hop": _HOP_NAMES.get(hop, str(hop))})
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(
                attributes(
                    request_id=page.request_id,
                    arm=page.arm,
                    model_version=page.model_version,
                    degraded=[_HOP_NAMES.get(d, str(d)) for d in page.degraded],
                    candidates_retrieved=page.candidates,
                    items_served=len(page.item_ids),
                    version_skew=page.version_skew,
                    **page.trace,
                )
            )
        if self.feed_logger is not None and page.log is not None:
            self.feed_logger.offer(page)
        if self.router is not None:
            self.router.record(
                page.arm,
                page.times.total,
                bool(page.degraded),
                page.ranking_ms,
                page.ranked,
            )

    def version_skew(self, versions: list[str], request: FeedRequest) -> bool:
        """True when a hop that answered serves another bundle version than the gateway's
        (logged once per combination of versions: a half-finished rollout or a
        misconfiguration, worth a look, but not a line per request)."""
        if not self.model_version:
            return False
        other = [v for v in versions if v and v != self.model_version]
        if other and tuple(versions) not in self._skews_logged:
            self._skews_logged.add(tuple(versions))
            log.warning(
                "hops serve another model version than the gateway",
                extra={
                    "request_id": request.request_id,
                    "gateway_version": self.model_version,
                    "versions": versions,
                },
            )
        return bool(other)


_HOP_NAMES = {
    feed_pb2.DEGRADATION_RETRIEVAL: RETRIEVAL,
    feed_pb2.DEGRADATION_FEATURES: FEATURES,
    feed_pb2.DEGRADATION_RANKING: RANKING,
}


# Statuses that say the request was wrong rather than the downstream unwell. Only
# INVALID_ARGUMENT: the gateway validates every caller field a downstream checks, so one
# slipping through must not let a caller open a breaker for everyone.
_REFUSAL_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT})


def _segment(found: Candidates) -> str:
    """The user as a span may name them: known (has history) or cold, never an id."""
    if found.user is None:
        return "unknown"
    return "known" if found.user.known else "cold"


def _is_refusal(err: BaseException) -> bool:
    """Whether the downstream refused the request (rather than failed)."""
    code = getattr(err, "code", None)
    try:
        return callable(code) and code() in _REFUSAL_CODES
    except Exception:  # an RpcError that is not a grpc.Call
        return False
