"""Traces and metrics from the real mesh: four service processes export spans over OTLP/gRPC
to a real receiver (a server of the OpenTelemetry collector protocol, the one Jaeger's
collector speaks, built from the ``opentelemetry-proto`` stubs), and every service's
Prometheus endpoint is scraped and parsed with ``prometheus_client``'s parser."""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from homefeed.common.v1 import common_pb2
from homefeed.feed.v1 import feed_pb2, feed_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.common.telemetry import LATENCY_BUCKETS_S
from tools.mesh import GATEWAY, SERVICES, Mesh, MeshConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
FRONTEND_SPAN = "00f067aa0ba902b7"


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that keeps every span with its service's name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []
        self._lock = threading.Lock()

    def Export(  # noqa: N802 (the generated base class names it)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append((attrs.get("service.name", ""), span))
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> list[tuple[str, Any]]:
        with self._lock:
            return [(s, span) for s, span in self.spans if span.trace_id.hex() == trace_id]


@pytest.fixture(scope="module")
def observed(tiny_trained: dict, tiny_dataset: dict, home) -> Iterator[tuple[Mesh, Receiver]]:
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # ms: export soon, for the test
        "HOMEFEED_ROLLOUT_STATE_FILE": str(home.home / "run" / "telemetry" / "state.json"),
    }
    old = os.environ.get("HOMEFEED_DATASET")
    os.environ["HOMEFEED_DATASET"] = tiny_dataset["dataset"]
    cfg = MeshConfig(home=home.home, dataset=tiny_dataset["dataset"], extra_env=env)
    try:
        with Mesh.start(cfg) as mesh:
            yield mesh, receiver
    finally:
        server.stop(None)
        if old is None:
            os.environ.pop("HOMEFEED_DATASET", None)
        else:
            os.environ["HOMEFEED_DATASET"] = old


def _feed(mesh: Mesh, user: int, traceparent: str | None = None) -> feed_pb2.GetFeedResponse:
    metadata = (("traceparent", traceparent),) if traceparent else ()
    with grpc.insecure_channel(mesh.addresses[GATEWAY]) as channel:
        return feed_pb2_grpc.FeedServiceStub(channel).GetFeed(
            feed_pb2.GetFeedRequest(
                user_id=user,
                surface=common_pb2.SURFACE_HOME,
                page_size=20,
                context=common_pb2.RequestContext(country="US", device="ios"),
            ),
            timeout=10,
            metadata=metadata,
        )


def test_one_trace_per_feed_across_the_four_services(observed: tuple[Mesh, Receiver]) -> None:
    mesh, receiver = observed
    page = _feed(mesh, 1, f"00-{TRACE_ID}-{FRONTEND_SPAN}-01")
    assert not page.degraded
    wanted = {f"homefeed-{name}" for name in SERVICES}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        spans = receiver.of_trace(TRACE_ID)
        if {s for s, _ in spans} >= wanted and len(spans) >= 12:
            break
        time.sleep(0.2)
    spans = receiver.of_trace(TRACE_ID)
    assert {s for s, _ in spans} >= wanted, sorted({s for s, _ in spans})
    by_id = {span.span_id.hex(): (service, span) for service, span in spans}

    def named(name: str, service: str) -> Any:
        found = [span for s, span in spans if span.name == name and s == service]
        assert len(found) == 1, (name, service, [(s, sp.name) for s, sp in spans])
        return found[0]

    root = named("/homefeed.feed.v1.FeedService/GetFeed", "homefeed-gateway")
    assert root.parent_span_id.hex() == FRONTEND_SPAN  # the frontend's trace continues
    attrs = {a.key: a.value for a in root.attributes}
    assert attrs["homefeed.arm"].string_value == "stable"
    assert attrs["homefeed.model_version"].string_value == page.model_version
    assert attrs["homefeed.user_segment"].string_value in ("known", "cold")
    assert attrs["homefeed.items_served"].int_value == len(page.item_ids)
    assert "homefeed.dropped_unavailable" in attrs
    for stage in ("retrieve", "filter", "features", "rank", "rerank"):
        assert named(stage, "homefeed-gateway").parent_span_id == root.span_id, stage
    hops = {
        "retrieve": ("/homefeed.retrieval.v1.RetrievalService/Retrieve", "homefeed-retrieval"),
        "features": ("/homefeed.features.v1.FeaturesService/GetFeatures", "homefeed-features"),
        "rank": ("/homefeed.ranking.v1.RankingService/Rank", "homefeed-ranking"),
    }
    for stage, (rpc, service) in hops.items():
        stage_span = named(stage, "homefeed-gateway")
        stage_attrs = {a.key: a.value for a in stage_span.attributes}
        assert stage_attrs["homefeed.breaker"].string_value == "closed"
        clients = [
            span
            for s, span in spans
            if s == "homefeed-gateway" and span.parent_span_id == stage_span.span_id
        ]
        assert [c.name for c in clients] == [rpc], stage
        server_span = named(rpc, service)
        assert server_span.parent_span_id == clients[0].span_id  # across the process boundary
        assert by_id[server_span.parent_span_id.hex()][0] == "homefeed-gateway"


def test_every_service_exposes_prometheus_metrics(observed: tuple[Mesh, Receiver]) -> None:
    mesh, _ = observed
    for user in range(5):
        _feed(mesh, user)
    scraped = {}
    for name, address in mesh.metrics_addresses.items():
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
            scraped[name] = {
                family.name: family
                for family in text_string_to_metric_families(reply.read().decode())
            }
    assert set(scraped) >= set(SERVICES)
    rpcs = {
        "gateway": "homefeed.feed.v1.FeedService/GetFeed",
        "retrieval": "homefeed.retrieval.v1.RetrievalService/Retrieve",
        "features": "homefeed.features.v1.FeaturesService/GetFeatures",
        "ranking": "homefeed.ranking.v1.RankingService/Rank",
    }
    for service, rpc in rpcs.items():
        family = scraped[service]["homefeed_rpc_duration_seconds"]
        counts = [
            s.value
            for s in family.samples
            if s.name.endswith("_count") and s.labels.get("rpc") == rpc and s.labels["code"] == "OK"
        ]
        assert counts and counts[0] >= 5, (service, counts)
        bounds = sorted(
            {float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")}
        )
        assert bounds[:-1] == list(LATENCY_BUCKETS_S) and bounds[-1] == float("inf")
        info = scraped[service]["homefeed_model_info"]
        assert [s.labels["version"] for s in info.samples] == [
            s.labels["version"] for s in scraped["ranking"]["homefeed_model_info"].samples
        ]
    gateway = scraped["gateway"]
    feeds = sum(s.value for s in gateway["homefeed_feeds"].samples if s.name.endswith("_total"))
    assert feeds >= 5
    states = {s.labels["downstream"]: s.value for s in gateway["homefeed_breaker_state"].samples}
    assert states["retrieval"] == states["features"] == states["ranking"] == 0.0
    assert {s.labels["reason"] for s in gateway["homefeed_shed"].samples} >= {"at_capacity"}
    stages = {s.labels["stage"] for s in gateway["homefeed_stage_duration_seconds"].samples}
    assert stages >= {"retrieval", "features", "ranking", "rerank", "total"}
    age = scraped["features"]["homefeed_feature_age_seconds"]
    assert all(0 <= s.value < 3600 for s in age.samples)
    assert "homefeed_canary_weight" in scraped["rollout"]
