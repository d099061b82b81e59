"""The gateway's part in a canary release: which arm a request is in, the canary ranking
client, what each arm did (counters the rollout controller compares), and mirrored scoring.

``CanaryRouter`` runs a thread that reports this replica's counters to the rollout
controller (``RolloutService.Report``) every ``report_every_ms`` and applies the assignment
it gets back: the rollout id, the canary's weight, the salt of the user hash, the canary's
address and the mirror share. A controller that cannot be reached changes nothing: the
replica keeps the weights it has (and says so in its log once).

Per request, ``arm(user_id)`` is ``stable`` or ``canary`` (``services.common.rollout_stats``:
a salted hash of the user id, so a user stays in one arm for the whole rollout). A canary
request is ranked by the canary deployment through its own circuit breaker; its fallback is
the same heuristic order, counted against the canary arm.

Mirrored scoring: a ``mirror_share`` of stable-arm requests is also sent to the canary on a
background thread after the page is answered (at most two waiting; more are dropped and
counted), and the two rankings of the same candidates are compared. It never delays or
changes a response.

With no rollout in progress nothing is counted and every request is stable.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
from homefeed.common.v1 import common_pb2
from homefeed.rollout.v1 import rollout_pb2, rollout_pb2_grpc

from services.common import tls
from services.common.rollout_stats import (
    CANARY,
    EGMV_EDGES,
    LATENCY_EDGES_MS,
    STABLE,
    arm_of,
    bucket,
    compare_rankings,
    histogram,
)
from services.gateway.breaker import BreakerConfig, CircuitBreaker
from services.gateway.clients import (
    CHANNEL_OPTIONS,
    FeedRequest,
    GrpcRanking,
    RankingClient,
    Scores,
)

log = logging.getLogger(__name__)

REPORT_TIMEOUT_S = 1.0
MIRROR_TIMEOUT_S = 0.25
MIRROR_QUEUE = 2  # mirrored calls waiting at once; more are dropped


@dataclass(frozen=True)
class Assignment:
    """What the controller told this replica last."""

    rollout_id: str = ""
    weight: int = 0
    salt: str = ""
    canary_address: str = ""
    canary_version: str = ""
    mirror_share: float = 0.0
    report_every_s: float = 1.0


class ArmCounters:
    """Cumulative counters of one arm (thread-safe), in ``rollout.v1.ArmCounters``' layout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.feeds = self.degraded = self.ranking_calls = self.ranking_errors = 0
        self.scored = self.non_finite = self.out_of_range = self.constant = 0
        self.ranking_ms = np.zeros(len(LATENCY_EDGES_MS) + 1, dtype=np.int64)
        self.feed_ms = np.zeros(len(LATENCY_EDGES_MS) + 1, dtype=np.int64)
        self.egmv = np.zeros(len(EGMV_EDGES) + 1, dtype=np.int64)

    def record(
        self,
        feed_ms: float,
        degraded: bool,
        ranking_ms: float | None,
        scores: Scores | None,
    ) -> None:
        """One feed: ``ranking_ms`` None when ranking was not called (an open breaker, no
        time left), ``scores`` None when it was not answered (a called hop without
        scores failed)."""
        hist = None
        health = (0, 0, 0)
        if scores is not None and len(scores.egmv):
            egmv, p = scores.egmv, scores.p_purchase
            finite = bool(np.isfinite(egmv).all() and np.isfinite(p).all())
            out = finite and bool((p < 0).any() or (p > 1).any() or (egmv < 0).any())
            constant = len(egmv) > 1 and finite and float(np.ptp(egmv)) == 0.0
            health = (int(not finite), int(out), int(constant))
            hist = histogram(egmv[np.isfinite(egmv)], EGMV_EDGES)
        with self._lock:
            self.feeds += 1
            self.degraded += int(degraded)
            self.feed_ms[bucket(feed_ms, LATENCY_EDGES_MS)] += 1
            if ranking_ms is not None:
                self.ranking_calls += 1
                self.ranking_errors += int(scores is None)
                self.ranking_ms[bucket(ranking_ms, LATENCY_EDGES_MS)] += 1
            if hist is not None:
                self.scored += 1
                self.non_finite += health[0]
                self.out_of_range += health[1]
                self.constant += health[2]
                self.egmv += hist

    def to_proto(self) -> rollout_pb2.ArmCounters:
        with self._lock:
            message = rollout_pb2.ArmCounters(
                feeds=self.feeds,
                degraded=self.degraded,
                ranking_calls=self.ranking_calls,
                ranking_errors=self.ranking_errors,
                scored=self.scored,
                non_finite=self.non_finite,
                out_of_range=self.out_of_range,
                constant=self.constant,
            )
            message.ranking_ms.extend(self.ranking_ms.tolist())
            message.feed_ms.extend(self.feed_ms.tolist())
            message.egmv.extend(self.egmv.tolist())
        return message


class MirrorCounters:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.mirrored = self.errors = self.dropped = 0
        self.rank_correlation_sum = self.top20_overlap_sum = self.p_diff_sum = 0.0

    def add(self, corr: float, overlap: float, p_diff: float) -> None:
        with self._lock:
            self.mirrored += 1
            self.rank_correlation_sum += corr
            self.top20_overlap_sum += overlap
            self.p_diff_sum += p_diff

    def fail(self, dropped: bool = False) -> None:
        with self._lock:
            if dropped:
                self.dropped += 1
            else:
                self.errors += 1

    def to_proto(self) -> rollout_pb2.MirrorCounters:
        with self._lock:
            return rollout_pb2.MirrorCounters(
                mirrored=self.mirrored,
                errors=self.errors,
                dropped=self.dropped,
                rank_correlation_sum=self.rank_correlation_sum,
                top20_overlap_sum=self.top20_overlap_sum,
                p_diff_sum=self.p_diff_sum,
            )


@dataclass
class _Counters:
    rollout_id: str
    stable: ArmCounters
    canary: ArmCounters
    mirror: MirrorCounters

    @classmethod
    def new(cls, rollout_id: str) -> _Counters:
        return cls(rollout_id, ArmCounters(), ArmCounters(), MirrorCounters())


def replica_name() -> str:
    """``HOMEFEED_GATEWAY_REPLICA``, else ``POD_NAME``, else ``<host>:<pid>``."""
    return (
        os.environ.get("HOMEFEED_GATEWAY_REPLICA")
        or os.environ.get("POD_NAME")
        or f"{socket.gethostname()}:{os.getpid()}"
    )


class CanaryRouter:
    """Arms, the canary client and the counters; ``start()`` begins reporting."""

    def __init__(
        self,
        controller_address: str,
        breaker_config: BreakerConfig,
        replica: str | None = None,
        connect: Callable[[str], tuple[RankingClient, Callable[[], None]]] | None = None,
    ) -> None:
        self.controller_address = controller_address
        self.replica = replica or replica_name()
        self.instance = uuid.uuid4().hex
        self.assignment = Assignment()
        self.breaker = CircuitBreaker("ranking-canary", breaker_config)
        self._connect = connect or _grpc_ranking
        self._canary: tuple[str, RankingClient, Callable[[], None]] | None = None
        self._counters = _Counters.new("")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="canary-report", daemon=True)
        self._channel = tls.channel(controller_address, CHANNEL_OPTIONS)
        self._stub = rollout_pb2_grpc.RolloutServiceStub(self._channel)
        self._mirror_pool = ThreadPoolExecutor(1, thread_name_prefix="canary-mirror")
        self._mirror_slots = threading.BoundedSemaphore(MIRROR_QUEUE)
        self._unreachable = False

    # --- the report loop -----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._mirror_pool.shutdown(wait=False, cancel_futures=True)
        self._channel.close()
        with self._lock:
            if self._canary is not None:
                self._canary[2]()
                self._canary = None

    def _run(self) -> None:
        while True:
            self.report_once()
            if self._stop.wait(self.assignment.report_every_s):
                return

    def report_once(self) -> bool:
        """Send the counters, apply the answer; False when the controller did not answer."""
        counters = self._counters
        request = rollout_pb2.ReportRequest(
            replica=self.replica,
            instance=self.instance,
            rollout_id=counters.rollout_id,
            stable=counters.stable.to_proto(),
            canary=counters.canary.to_proto(),
            mirror=counters.mirror.to_proto(),
        )
        try:
            response = self._stub.Report(request, timeout=REPORT_TIMEOUT_S)
        except grpc.RpcError as err:
            if not self._unreachable:
                log.warning(
                    "rollout controller unreachable; keeping the current weights",
                    extra={
                        "controller": self.controller_address,
                        "error": f"{err.code().name}: {err.details()}",
                        "weight": self.assignment.weight,
                    },
                )
            self._unreachable = True
            return False
        if self._unreachable:
            log.info(
                "rollout controller reachable again", extra={"controller": self.controller_address}
            )
            self._unreachable = False
        self.apply(response)
        return True

    def apply(self, response: rollout_pb2.ReportResponse) -> None:
        new = Assignment(
            rollout_id=response.rollout_id,
            weight=min(100, response.canary_weight),
            salt=response.salt,
            canary_address=response.canary_address,
            canary_version=response.canary_version,
            mirror_share=min(1.0, max(0.0, response.mirror_share)),
            report_every_s=max(0.05, response.report_every_ms / 1e3 or 1.0),
        )
        old = self.assignment
        if new.rollout_id != self._counters.rollout_id:
            self._counters = _Counters.new(new.rollout_id)
        with self._lock:
            if new.canary_address and (
                self._canary is None or self._canary[0] != new.canary_address
            ):
                if self._canary is not None:
                    self._canary[2]()
                client, close = self._connect(new.canary_address)
                self._canary = (new.canary_address, client, close)
        self.assignment = new
        if (new.rollout_id, new.weight) != (old.rollout_id, old.weight):
            log.info(
                "canary assignment",
                extra={
                    "rollout": new.rollout_id,
                    "weight": new.weight,
                    "canary": new.canary_address,
                    "version": new.canary_version,
                },
            )

    # --- per request ---------------------------------------------------------------------

    def arm(self, user_id: int) -> str:
        a = self.assignment
        if not a.rollout_id or a.weight <= 0 or self._canary is None:
            return STABLE
        return arm_of(user_id, a.salt, a.weight)

    @property
    def active(self) -> bool:
        return bool(self.assignment.rollout_id)

    def canary_client(self) -> RankingClient | None:
        canary = self._canary
        return canary[1] if canary is not None else None

    def record(
        self,
        arm: str,
        feed_ms: float,
        degraded: bool,
        ranking_ms: float | None,
        scores: Scores | None,
    ) -> None:
        counters = self._counters
        if not counters.rollout_id:
            return
        target = counters.canary if arm == CANARY else counters.stable
        target.record(feed_ms, degraded, ranking_ms, scores)

    def maybe_mirror(
        self,
        request: FeedRequest,
        item_ids: np.ndarray,
        matrix: common_pb2.FloatMatrix,
        row_mask: np.ndarray | None,
        values: np.ndarray,
        stable: Scores,
    ) -> None:
        """Score a share of stable requests with the canary too, off the response path."""
        a = self.assignment
        client = self.canary_client()
        if not a.mirror_share or client is None or random.random() >= a.mirror_share:
            return
        counters = self._counters
        if not self._mirror_slots.acquire(blocking=False):
            counters.mirror.fail(dropped=True)
            return

        def mirror() -> None:
            try:
                canary = client.rank(request, item_ids, matrix, row_mask, values, MIRROR_TIMEOUT_S)
                counters.mirror.add(
                    *compare_rankings(
                        stable.egmv, canary.egmv, stable.p_purchase, canary.p_purchase
                    )
                )
            except Exception as err:  # off the response path: counted, never raised
                counters.mirror.fail()
                log.debug("mirrored scoring failed", extra={"error": repr(err)[:200]})
            finally:
                self._mirror_slots.release()

        try:
            self._mirror_pool.submit(mirror)
        except RuntimeError:  # shut down
            self._mirror_slots.release()


def _grpc_ranking(address: str) -> tuple[RankingClient, Callable[[], None]]:
    channel = tls.channel(address, CHANNEL_OPTIONS)
    return GrpcRanking(channel), channel.close
