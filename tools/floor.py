"""The floor of ``make bench``: a bare chain of the mesh's shape, with handlers that do nothing.

Four sync grpcio server processes, built as the services build theirs (a thread pool of the
same size, the same server options, a health service beside), speaking the real protos:

    client --GetFeed--> gateway --Retrieve--> retrieval
                                --GetFeatures--> features
                                --Rank--> ranking

Each backend answers every request with one canned response of the real size for the
benchmark's candidate count (500 candidate ids with scores and sources; a 500 x width
float32 matrix with its parallel arrays; 500 scores). The gateway parses the request, makes
the three calls in order with canned requests of the real size (the ids; the matrix), parses
each answer and returns a canned page. So what the chain costs is gRPC itself (transport,
thread-pool hand-offs, protobuf parsing and serialization of payloads of the real size),
which is what the services' figures are compared with: everything above it is homefeed's.

``python -m tools.floor <role> [--candidates N] [--width W]`` runs one process; it prints
``HOMEFEED_READY port=<port>`` once listening and serves until SIGTERM. The gateway takes its
backends' addresses from ``HOMEFEED_{RETRIEVAL,FEATURES,RANKING}_ADDR``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from homefeed.common.v1 import common_pb2
from homefeed.features.v1 import features_pb2
from homefeed.feed.v1 import feed_pb2
from homefeed.ranking.v1 import ranking_pb2
from homefeed.retrieval.v1 import retrieval_pb2

from contract.features import FEATURE_SCHEMA
from services.common.interceptors import REQUEST_ID_KEY
from services.common.server import READY_LINE, build_server, name_os_thread, server_options
from services.common.settings import ServerSettings
from services.gateway.clients import CHANNEL_OPTIONS

ROLES = ("retrieval", "features", "ranking", "gateway")
RETRIEVE = "/homefeed.retrieval.v1.RetrievalService/Retrieve"
GET_FEATURES = "/homefeed.features.v1.FeaturesService/GetFeatures"
RANK = "/homefeed.ranking.v1.RankingService/Rank"
GET_FEED = "/homefeed.feed.v1.FeedService/GetFeed"
PAGE = 20


def canned(n: int, width: int, seed: int = 0) -> dict[str, Any]:
    """One request's worth of each message, with values of the real kinds and sizes."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(10 * n + 1000, size=n, replace=False).astype(np.int64).tolist()
    floats = rng.random(n).astype(np.float32).tolist()
    matrix = common_pb2.FloatMatrix(
        rows=n, cols=width, values=rng.random(n * width).astype(np.float32).tolist()
    )
    context = common_pb2.RequestContext(country="US", device="ios")
    return {
        "retrieve_request": retrieval_pb2.RetrieveRequest(
            request_id="r", user_id=1, n=n, surface=common_pb2.SURFACE_HOME, context=context
        ),
        "retrieve_response": retrieval_pb2.RetrieveResponse(
            item_ids=ids,
            scores=floats,
            sources=[retrieval_pb2.CANDIDATE_SOURCE_ANN] * n,
            propensities=[0.0] * n,
            known_user=True,
            model_version="1",
        ),
        "features_request": features_pb2.GetFeaturesRequest(
            request_id="r", user_id=1, item_ids=ids, surface=common_pb2.SURFACE_HOME
        ),
        "features_response": features_pb2.GetFeaturesResponse(
            features=matrix,
            available=[True] * n,
            values=floats,
            prices=floats,
            categories=[1] * n,
            new_seller=[False] * n,
            heuristic_scores=floats,
            known_user=True,
        ),
        "rank_request": ranking_pb2.RankRequest(
            request_id="r", user_id=1, item_ids=ids, features=matrix, values=floats
        ),
        "rank_response": ranking_pb2.RankResponse(
            p_purchase=floats, egmv=floats, model_version="1"
        ),
        "feed_response": feed_pb2.GetFeedResponse(
            request_id="r",
            item_ids=ids[:PAGE],
            positions=list(range(1, PAGE + 1)),
            scores=floats[:PAGE],
            egmv=floats[:PAGE],
            reasons=[feed_pb2.REASON_RANKED] * PAGE,
            propensities=[1.0] * PAGE,
            model_version="1",
            arm="stable",
            candidates=n,
        ),
    }


def _unary(
    behavior: Callable[[Any, grpc.ServicerContext], Any], request_type: Any
) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=request_type.FromString,
        response_serializer=lambda message: message.SerializeToString(),
    )


def handlers(role: str, messages: dict[str, Any]) -> dict[str, grpc.RpcMethodHandler]:
    """The role's one method, answering with its canned response."""
    if role == "retrieval":
        answer = messages["retrieve_response"]
        return {RETRIEVE: _unary(lambda request, context: answer, retrieval_pb2.RetrieveRequest)}
    if role == "features":
        answer = messages["features_response"]
        return {
            GET_FEATURES: _unary(lambda request, context: answer, features_pb2.GetFeaturesRequest)
        }
    if role == "ranking":
        answer = messages["rank_response"]
        return {RANK: _unary(lambda request, context: answer, ranking_pb2.RankRequest)}
    raise ValueError(f"role must be one of {ROLES}, got {role!r}")


def gateway_handlers(
    messages: dict[str, Any],
    addresses: dict[str, str],
    metadata: tuple[tuple[str, str], ...] | None = None,
) -> dict[str, grpc.RpcMethodHandler]:
    """GetFeed: three sequential calls with canned requests, each answer parsed, over
    channels with the gateway's options; with ``metadata`` (the services send the request
    id) on every call."""
    options = CHANNEL_OPTIONS
    calls = []
    for role, method, request, response_type in (
        ("retrieval", RETRIEVE, "retrieve_request", retrieval_pb2.RetrieveResponse),
        ("features", GET_FEATURES, "features_request", features_pb2.GetFeaturesResponse),
        ("ranking", RANK, "rank_request", ranking_pb2.RankResponse),
    ):
        channel = grpc.insecure_channel(addresses[role], options=options)
        stub = channel.unary_unary(
            method,
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response_type.FromString,
        )
        calls.append((stub, messages[request]))
    page = messages["feed_response"]

    def get_feed(request: feed_pb2.GetFeedRequest, context: grpc.ServicerContext) -> Any:
        for stub, downstream_request in calls:
            stub(downstream_request, timeout=1.0, metadata=metadata)
        return page

    return {GET_FEED: _unary(get_feed, feed_pb2.GetFeedRequest)}


class _Generic(grpc.GenericRpcHandler):
    def __init__(self, methods: dict[str, grpc.RpcMethodHandler]) -> None:
        self.methods = methods

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self.methods.get(handler_call_details.method)


SERVICE_NAMES = {
    "retrieval": "homefeed.retrieval.v1.RetrievalService",
    "features": "homefeed.features.v1.FeaturesService",
    "ranking": "homefeed.ranking.v1.RankingService",
    "gateway": "homefeed.feed.v1.FeedService",
}


def serve(role: str, candidates: int, width: int, plumbing: bool = False) -> int:
    """Serve ``role`` until SIGTERM. ``plumbing``: build the server as the services do
    (``services.common.server.build_server``: their interceptor, health and reflection) and
    send the request id as metadata on the gateway's calls, so that variant's cost over
    the bare floor is the services' per-call machinery alone."""
    settings = ServerSettings.from_env(role)  # HOMEFEED_<ROLE>_{HOST,PORT,...}, as the mesh sets
    messages = canned(candidates, width)
    if role == "gateway":
        addresses = {
            name: os.environ[f"HOMEFEED_{name.upper()}_ADDR"]
            for name in ("retrieval", "features", "ranking")
        }
        metadata = ((REQUEST_ID_KEY, "r"),) if plumbing else None
        methods = gateway_handlers(messages, addresses, metadata)
    else:
        methods = handlers(role, messages)
    if plumbing:
        server, port, _ = build_server(
            settings,
            [SERVICE_NAMES[role]],
            lambda s: s.add_generic_rpc_handlers((_Generic(methods),)),
        )
        return _run(server, port)
    server = grpc.server(
        ThreadPoolExecutor(settings.max_workers, initializer=name_os_thread),
        options=server_options(settings),
    )
    server.add_generic_rpc_handlers((_Generic(methods),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    return _run(server, port)


def _run(server: grpc.Server, port: int) -> int:
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sys.stdout.write(READY_LINE.format(port=port) + "\n")
    sys.stdout.flush()
    stop.wait()
    server.stop(1).wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.floor", description=__doc__)
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--width", type=int, default=len(FEATURE_SCHEMA))
    parser.add_argument(
        "--plumbing",
        action="store_true",
        help="the services' server build (interceptor, reflection) and request-id metadata",
    )
    args = parser.parse_args(argv)
    return serve(args.role, args.candidates, args.width, args.plumbing)


if __name__ == "__main__":
    raise SystemExit(main())
