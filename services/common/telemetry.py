"""Traces and metrics of a service, with OpenTelemetry.

**Traces** are off unless an OTLP endpoint is configured (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; ``OTEL_SDK_DISABLED=true`` turns them off again).
Then every RPC the server answers gets a SERVER span (``ServiceInterceptor``) and every
call the gateway makes a CLIENT span, linked by W3C ``traceparent`` in the metadata, so a
frontend's trace continues through the mesh; the gateway adds a span per stage; a batch span
processor
exports them over OTLP/gRPC in the background (a full queue drops spans, it never blocks a
request). Sampling: ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` as the SDK reads
them; unset, parent-based with a ratio of ``DEFAULT_SAMPLING_RATIO`` (a frontend's sampled
trace is always followed). The service's name is ``OTEL_SERVICE_NAME`` or
``homefeed-<service>``.

**Metrics** are recorded always (a few microseconds per RPC) and exposed for Prometheus when
``HOMEFEED_<SERVICE>_METRICS_PORT`` is set (0: a free port, announced as
``HOMEFEED_METRICS port=<n>`` on stdout): ``/metrics`` on that port, in Prometheus' text
format. The instruments (names as Prometheus shows them):

- ``homefeed_rpc_duration_seconds{rpc, code}``: every RPC a server answers (count by code =
  errors by code);
- gateway: ``homefeed_stage_duration_seconds{stage}``, ``homefeed_feeds_total{arm,
  degraded}``, ``homefeed_fallbacks_total{hop}``, ``homefeed_shed_total{reason}``,
  ``homefeed_breaker_state{downstream}`` (0 closed, 1 half-open, 2 open),
  ``homefeed_canary_weight``;
- rollout controller: ``homefeed_rollout_checks_total{check, outcome}``,
  ``homefeed_rollout_decisions_total{decision}``, ``homefeed_canary_weight``;
- every service: ``homefeed_model_info{version}`` (1 for the version it serves);
- features: ``homefeed_feature_age_seconds`` (since the item features were last loaded).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.metrics import CallbackOptions, Observation

log = logging.getLogger(__name__)

DEFAULT_SAMPLING_RATIO = 0.1
METRICS_LINE = "HOMEFEED_METRICS port={port}"
# seconds: a feed takes ~3-60 ms, a hop ~0.5-20 ms, a reload seconds
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
    0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


_TRACE_KEYS = frozenset({"traceparent", "tracestate", "baggage"})


def _rpc_attrs(rpc: str) -> dict[str, str]:
    service, _, method = rpc.rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


Reading = Callable[[], Iterable[tuple[float, dict[str, str]]]]


def _observe(name: str, read: Reading) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        try:
            return [Observation(value, attrs) for value, attrs in read()]
        except Exception:  # a scrape must never fail because one reading did
            log.debug("metric read failed", extra={"metric": name}, exc_info=True)
            return []

    return callback


def tracing_configured() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


@dataclass
class Telemetry:
    """What a service records with: its tracer and meter (no-op ones until ``configure``)."""

    service: str = ""
    tracer: trace.Tracer = field(default_factory=lambda: trace.NoOpTracer())
    meter: metrics.Meter = field(default_factory=lambda: metrics.NoOpMeter("homefeed"))
    tracing: bool = False
    metrics_port: int | None = None
    _provider: Any = None
    _meter_provider: Any = None
    _metrics_server: Any = None
    rpc_duration: Any = None

    def __post_init__(self) -> None:
        self.rpc_duration = self.meter.create_histogram(
            "homefeed_rpc_duration", unit="s", description="RPCs answered, by method and code"
        )

    def start_server_span(
        self, rpc: str, metadata: Sequence[tuple[str, Any]] | None
    ) -> tuple[trace.Span, object]:
        """A SERVER span for ``rpc``, child of the caller's ``traceparent`` when the
        metadata carries one, made current; ``end_server_span`` ends it. (Interceptors of
        our own rather than the gRPC instrumentation's: those cost ~0.15 ms of CPU per call
        even for unsampled traces, a tenth of a feed's budget across its hops.)"""
        carrier = {k: v for k, v in metadata or () if k in _TRACE_KEYS}
        parent = propagate.extract(carrier) if carrier else None
        span = self.tracer.start_span(
            f"/{rpc}", context=parent, kind=trace.SpanKind.SERVER, attributes=_rpc_attrs(rpc)
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        return span, token

    def end_server_span(self, span: trace.Span, token: object, code: str) -> None:
        if span.is_recording():
            span.set_attribute("rpc.grpc.status_code", code)
            if code != "OK":
                span.set_status(trace.Status(trace.StatusCode.ERROR, code))
        span.end()
        otel_context.detach(token)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def client_span(self, rpc: str) -> Iterator[list[tuple[str, str]]]:
        """A CLIENT span around a call to ``rpc``; yields the metadata that carries it
        (``traceparent``) to the server."""
        with self.tracer.start_as_current_span(
            f"/{rpc}", kind=trace.SpanKind.CLIENT, attributes=_rpc_attrs(rpc)
        ) as span:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            try:
                yield list(carrier.items())
            except grpc.RpcError as err:
                if span.is_recording():
                    code = getattr(err, "code", None)
                    name = code().name if callable(code) else "UNKNOWN"
                    span.set_attribute("rpc.grpc.status_code", name)
                    span.set_status(trace.Status(trace.StatusCode.ERROR, name))
                raise

    def gauge(self, name: str, read: Reading, **kw: Any) -> None:
        """An observable gauge whose ``read()`` gives (value, attributes) pairs at scrape."""
        self.meter.create_observable_gauge(name, callbacks=[_observe(name, read)], **kw)

    def counter(self, name: str, read: Reading, **kw: Any) -> None:
        """An observable (monotonic) counter whose ``read()`` gives cumulative totals."""
        self.meter.create_observable_counter(name, callbacks=[_observe(name, read)], **kw)

    def model_info(self, version: Callable[[], str]) -> None:
        """``homefeed_model_info{version}`` = 1 for the version served now."""
        self.gauge("homefeed_model_info", lambda: [(1.0, {"version": version()})])

    def shutdown(self) -> None:
        """Flush and stop the exporters (after the server has drained)."""
        for provider in (self._provider, self._meter_provider):
            if provider is not None:
                try:
                    provider.shutdown()
                except Exception:  # shutting down: say it, go on
                    log.warning("telemetry shutdown failed", exc_info=True)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()


_current = Telemetry()


def current() -> Telemetry:
    """The process's telemetry (no-op until ``configure``)."""
    return _current


def configure(service: str, metrics_port: int | None, host: str = "0.0.0.0") -> Telemetry:
    """Set up traces (when an endpoint is configured) and metrics for ``service``; with a
    ``metrics_port`` (0: a free one), serve ``/metrics`` there and announce the port."""
    global _current
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
    from opentelemetry.sdk.resources import Resource

    name = os.environ.get("OTEL_SERVICE_NAME") or f"homefeed-{service}"
    resource = Resource.create({"service.name": name, "service.namespace": "homefeed"})
    provider = None
    tracer: trace.Tracer = trace.NoOpTracer()
    tracing = tracing_configured()
    if tracing:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        sampler = None  # the SDK reads OTEL_TRACES_SAMPLER / _ARG
        if not os.environ.get("OTEL_TRACES_SAMPLER"):
            sampler = ParentBased(TraceIdRatioBased(DEFAULT_SAMPLING_RATIO))
        provider = TracerProvider(sampler=sampler, resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        tracer = provider.get_tracer(f"homefeed.{service}")

    readers: list[Any] = []
    server = None
    port = None
    if metrics_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        readers.append(PrometheusMetricReader(registry=registry))
        server, _ = start_http_server(metrics_port, addr=host, registry=registry)
        port = int(server.server_port)
    views = [
        View(
            instrument_name="homefeed_*duration",
            aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS_S),
        )
    ]
    meter_provider = MeterProvider(metric_readers=readers, resource=resource, views=views)
    _current = Telemetry(
        service=service,
        tracer=tracer,
        meter=meter_provider.get_meter(f"homefeed.{service}"),
        tracing=tracing,
        metrics_port=port,
        _provider=provider,
        _meter_provider=meter_provider,
        _metrics_server=server,
    )
    if port is not None:
        sys.stdout.write(METRICS_LINE.format(port=port) + "\n")
        sys.stdout.flush()
    log.info(
        "telemetry",
        extra={
            "tracing": tracing,
            "otlp_endpoint": os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
            "metrics_port": port,
        },
    )
    return _current


def attributes(**values: object) -> dict[str, Any]:
    """Span attributes without the Nones, sequences as lists of str."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, Sequence) and not isinstance(value, str):
            out[f"homefeed.{key}"] = [str(v) for v in value]
        else:
            out[f"homefeed.{key}"] = value
    return out
