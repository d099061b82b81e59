"""The gateway's view of its three downstreams: what it asks, what it gets back (numpy
arrays, ids as int64), as Protocols the pipeline depends on, and thin gRPC implementations.

A client raises on any failure: ``grpc.RpcError`` from the stub (DEADLINE_EXCEEDED,
UNAVAILABLE, a downstream's INVALID_ARGUMENT...) or ``DownstreamError`` for an answer that
breaks its contract (parallel arrays of different lengths, a matrix of the wrong shape).
The pipeline turns either into that hop's fallback; it never lets one reach the caller.

Each gRPC client owns one channel to its downstream, created once and shared by every
request thread (grpc channels are thread-safe and multiplex calls over one HTTP/2
connection). Calls are plain blocking unary calls with a timeout and the request id in the
``x-request-id`` metadata; none waits for a channel to become ready, so a downstream that is
down fails fast into the fallback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np
from homefeed.common.v1 import common_pb2
from homefeed.features.v1 import features_pb2, features_pb2_grpc
from homefeed.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from homefeed.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from services.common import telemetry, tls
from services.common.interceptors import REQUEST_ID_KEY
from services.common.matrix import extend_packed
from services.common.settings import SEND_LIMIT

EXPLORATION_SOURCE = retrieval_pb2.CANDIDATE_SOURCE_EXPLORATION
POPULARITY_SOURCE = retrieval_pb2.CANDIDATE_SOURCE_POPULARITY
CONTENT_SOURCE = retrieval_pb2.CANDIDATE_SOURCE_CONTENT


# The three downstream calls are reads without side effects, so one retry is safe: only on
# UNAVAILABLE (the connection was refused or closed, a server draining sent GOAWAY: the call
# never ran), within the caller's deadline, and under gRPC's retry throttling, a budget that
# stops retrying once more than ~10 % of recent calls failed (a token bucket of 10, refilled
# by 0.1 per success), so retries cannot multiply the load on a downstream that is down.
RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": "homefeed.retrieval.v1.RetrievalService"},
                    {"service": "homefeed.features.v1.FeaturesService"},
                    {"service": "homefeed.ranking.v1.RankingService", "method": "Rank"},
                ],
                "retryPolicy": {
                    "maxAttempts": 2,
                    "initialBackoff": "0.005s",
                    "maxBackoff": "0.010s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }
)

# A mesh's channels: a restarted downstream is found again within a second (gRPC's default
# reconnect backoff grows to 120 s), and a peer that vanished without closing its connection
# (a killed pod, a dropped network path) is noticed by keepalive pings within ~12 s rather
# than by the kernel's TCP timeout. The servers permit these pings (services.common.server).
CHANNEL_OPTIONS = (
    ("grpc.enable_retries", 1),
    ("grpc.service_config", RETRY_SERVICE_CONFIG),
    ("grpc.max_send_message_length", SEND_LIMIT),
    ("grpc.max_receive_message_length", SEND_LIMIT),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 2_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)


class DownstreamError(Exception):
    """A downstream answered, but not in the shape its contract promises."""


@dataclass(frozen=True)
class FeedRequest:
    """A validated GetFeed request."""

    request_id: str
    user_id: int
    surface: int  # common.v1.Surface, HOME or CHECKOUT
    cart_item_ids: np.ndarray  # int64, <= 100, non-negative
    page_size: int
    context: common_pb2.RequestContext  # forwarded as is; country/device pick popularity
    # int64, <= 1000: already shown this session; excluded like the cart, never served
    seen_item_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


@dataclass(frozen=True)
class Candidates:
    """Retrieval's answer: parallel arrays, best first within each source."""

    item_ids: np.ndarray  # int64
    scores: np.ndarray  # float32, source-specific
    sources: np.ndarray  # int32 retrieval.v1.CandidateSource
    model_version: str = ""
    exploration_pool: int = 0  # the exploration draw's eligible pool size
    user: common_pb2.UserFeatures | None = None  # as retrieval read them: passed to features


@dataclass(frozen=True)
class ItemFeatures:
    """The features service's answer: row k of ``matrix`` and entry k of every array
    describe the k-th requested item. The gateway never reads the matrix: it forwards the
    message to ranking as it came."""

    matrix: common_pb2.FloatMatrix  # (items, schema width), schema_hash set
    available: np.ndarray  # bool: False = out of stock, delisted or unknown
    values: np.ndarray  # float32 price x margin
    prices: np.ndarray  # float32
    categories: np.ndarray  # int32
    new_seller: np.ndarray  # bool
    heuristic_scores: np.ndarray  # float32
    model_version: str = ""


@dataclass(frozen=True)
class Scores:
    """Ranking's answer, one entry per ranked item."""

    p_purchase: np.ndarray  # float32
    egmv: np.ndarray  # float32
    model_version: str


class RetrievalClient(Protocol):
    def retrieve(self, request: FeedRequest, n: int, timeout_s: float) -> Candidates:
        """Up to ``n`` candidates for the request's user, none of its cart items."""
        ...


class FeaturesClient(Protocol):
    def get_features(
        self,
        request: FeedRequest,
        item_ids: np.ndarray,
        timeout_s: float,
        user: common_pb2.UserFeatures | None = None,
    ) -> ItemFeatures:
        """Features and item facts of ``item_ids`` (unique), in their order; ``user``: the
        user's online features when retrieval read them (else the service reads them)."""
        ...


class RankingClient(Protocol):
    def rank(
        self,
        request: FeedRequest,
        item_ids: np.ndarray,
        matrix: common_pb2.FloatMatrix,
        row_mask: np.ndarray | None,
        values: np.ndarray,
        timeout_s: float,
    ) -> Scores:
        """p(purchase) and E[GMV] of the rows of ``matrix`` that ``row_mask`` keeps (None:
        every row); ``item_ids`` and ``values`` describe those rows."""
        ...


def _metadata(request: FeedRequest) -> tuple[tuple[str, str], ...]:
    return ((REQUEST_ID_KEY, request.request_id),)


RETRIEVE = "homefeed.retrieval.v1.RetrievalService/Retrieve"
GET_FEATURES = "homefeed.features.v1.FeaturesService/GetFeatures"
RANK = "homefeed.ranking.v1.RankingService/Rank"


def _invoke(
    method: grpc.UnaryUnaryMultiCallable,
    rpc: str,
    message: Any,
    timeout_s: float,
    request: FeedRequest,
) -> Any:
    """One blocking call with the request id; in a CLIENT span (``traceparent`` sent along)
    when tracing is on."""
    tel = telemetry.current()
    if not tel.tracing:
        return method(message, timeout=timeout_s, metadata=_metadata(request))
    with tel.client_span(rpc) as carried:
        return method(message, timeout=timeout_s, metadata=(*_metadata(request), *carried))


def _check_lengths(what: str, n: int, **arrays: np.ndarray) -> None:
    for name, array in arrays.items():
        if len(array) != n:
            raise DownstreamError(f"{what}: {name} has {len(array)} entries, expected {n}")


class GrpcRetrieval:
    """``RetrievalService.Retrieve`` over one channel; the cart is both excluded and, for
    CHECKOUT, the seed of cart-similar candidates."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)

    def retrieve(self, request: FeedRequest, n: int, timeout_s: float) -> Candidates:
        cart = request.cart_item_ids.tolist()
        message = retrieval_pb2.RetrieveRequest(
            request_id=request.request_id,
            user_id=request.user_id,
            n=n,
            surface=request.surface,
            context=request.context,
            include_user_features=True,
        )
        message.exclude_item_ids.extend(cart)
        if len(request.seen_item_ids):
            message.exclude_item_ids.extend(request.seen_item_ids.tolist())
        message.cart_item_ids.extend(cart)
        response = _invoke(self._stub.Retrieve, RETRIEVE, message, timeout_s, request)
        ids = np.array(response.item_ids, dtype=np.int64)
        scores = np.array(response.scores, dtype=np.float32)
        sources = np.array(response.sources, dtype=np.int32)
        _check_lengths("Retrieve", len(ids), scores=scores, sources=sources)
        return Candidates(
            ids,
            scores,
            sources,
            response.model_version,
            response.exploration_pool,
            response.user if response.HasField("user") else None,
        )


class GrpcFeatures:
    """``FeaturesService.GetFeatures`` over one channel, in the service's own schema (the
    ranking service checks that the schema is its bundle's)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = features_pb2_grpc.FeaturesServiceStub(channel)

    def get_features(
        self,
        request: FeedRequest,
        item_ids: np.ndarray,
        timeout_s: float,
        user: common_pb2.UserFeatures | None = None,
    ) -> ItemFeatures:
        message = features_pb2.GetFeaturesRequest(
            request_id=request.request_id,
            user_id=request.user_id,
            surface=request.surface,
            context=request.context,
            user=user,
        )
        message.item_ids.extend(item_ids.tolist())
        response = _invoke(self._stub.GetFeatures, GET_FEATURES, message, timeout_s, request)
        n = len(item_ids)
        matrix = response.features
        if matrix.rows != n or len(matrix.values) != n * matrix.cols or not matrix.cols:
            raise DownstreamError(
                f"GetFeatures: a {matrix.rows} x {matrix.cols} matrix of {len(matrix.values)} "
                f"values for {n} items"
            )
        out = ItemFeatures(
            matrix=matrix,
            available=np.array(response.available, dtype=bool),
            values=np.array(response.values, dtype=np.float32),
            prices=np.array(response.prices, dtype=np.float32),
            categories=np.array(response.categories, dtype=np.int32),
            new_seller=np.array(response.new_seller, dtype=bool),
            heuristic_scores=np.array(response.heuristic_scores, dtype=np.float32),
            model_version=response.model_version,
        )
        _check_lengths(
            "GetFeatures",
            n,
            **{
                "available": out.available,
                "values": out.values,
                "prices": out.prices,
                "categories": out.categories,
                "new_seller": out.new_seller,
                "heuristic_scores": out.heuristic_scores,
            },
        )
        return out


class GrpcRanking:
    """``RankingService.Rank`` over one channel."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = ranking_pb2_grpc.RankingServiceStub(channel)

    def rank(
        self,
        request: FeedRequest,
        item_ids: np.ndarray,
        matrix: common_pb2.FloatMatrix,
        row_mask: np.ndarray | None,
        values: np.ndarray,
        timeout_s: float,
    ) -> Scores:
        message = ranking_pb2.RankRequest(
            request_id=request.request_id, user_id=request.user_id, features=matrix
        )
        message.item_ids.extend(item_ids.tolist())
        extend_packed(message, "values", values)
        if row_mask is not None:
            extend_packed(message, "row_mask", row_mask)
        response = _invoke(self._stub.Rank, RANK, message, timeout_s, request)
        p = np.array(response.p_purchase, dtype=np.float32)
        egmv = np.array(response.egmv, dtype=np.float32)
        _check_lengths("Rank", len(item_ids), p_purchase=p, egmv=egmv)
        return Scores(p, egmv, response.model_version)


@dataclass(frozen=True)
class Downstreams:
    """The three gRPC clients and their channels; ``close`` releases the channels."""

    retrieval: GrpcRetrieval
    features: GrpcFeatures
    ranking: GrpcRanking
    channels: tuple[grpc.Channel, ...]

    @classmethod
    def connect(cls, retrieval_addr: str, features_addr: str, ranking_addr: str) -> Downstreams:
        """One channel per address (they connect lazily, on the first call)."""
        channels = tuple(
            tls.channel(addr, CHANNEL_OPTIONS)
            for addr in (retrieval_addr, features_addr, ranking_addr)
        )
        return cls(
            GrpcRetrieval(channels[0]),
            GrpcFeatures(channels[1]),
            GrpcRanking(channels[2]),
            channels,
        )

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
