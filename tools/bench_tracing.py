"""What tracing costs: the mesh under the same closed-loop load with tracing off, at the
default sampling (parent-based, 10 %) and at 100 %, spans exported over OTLP/gRPC to a real
receiver (``OTLPSink``: the collector protocol, counting what arrives). ``make bench`` runs it
after the main benchmark; ``reports/tracing.json`` and a table.

The target (issue 10): the default sampling costs at most 10 % of feeds/s. Each variant is a
fresh mesh; the order is alternated over ``--rounds`` so a machine whose speed drifts does
not favour one, and the ratios are to the *off* runs of the same round.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from contract.paths import Paths
from tools.bench import BenchConfig, load_requests, machine_info, run_level
from tools.mesh import Mesh, MeshConfig

log = logging.getLogger(__name__)

VARIANTS = {
    "off": {},
    "default": {},  # the services' default sampler: parent-based, 10 %
    "always": {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
    # diagnostic: every span created but none sampled (the cost of the unsampled path)
    "unsampled": {"OTEL_TRACES_SAMPLER": "parentbased_always_off"},
}
DEFAULT_VARIANTS = ("off", "default", "always")


class OTLPSink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that counts spans and drops them."""

    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()

    def Export(  # noqa: N802 (the generated base class names it)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        n = sum(len(s.spans) for rs in request.resource_spans for s in rs.scope_spans)
        with self._lock:
            self.spans += n
        return trace_service_pb2.ExportTraceServiceResponse()


def run(
    config: BenchConfig,
    rounds: int,
    concurrency: int,
    out: Path,
    variants: Sequence[str] = DEFAULT_VARIANTS,
) -> dict[str, Any]:
    sink = OTLPSink()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    payloads = itertools.cycle(load_requests(config))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    try:
        for r in range(rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                env = {"HOMEFEED_GATEWAY_CANDIDATES": str(config.candidates)}
                if name != "off":
                    env |= {
                        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                        **VARIANTS[name],
                    }
                cfg = MeshConfig(
                    home=config.home, dataset=config.dataset, extra_env=env, rollout=False
                )
                before = sink.spans
                with Mesh.start(cfg) as mesh:
                    time.sleep(2.0)
                    summary = run_level(
                        f"tracing {name}",
                        mesh.addresses["gateway"],
                        payloads,
                        concurrency,
                        config,
                        mesh.pids,
                        os.cpu_count() or 1,
                    )
                time.sleep(0.5)
                summary["spans_exported"] = sink.spans - before
                results[name].append(summary)
    finally:
        server.stop(None)
    report = summarize(results, concurrency)
    report["created_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    report["machine"] = machine_info()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def summarize(results: dict[str, list[dict[str, Any]]], concurrency: int) -> dict[str, Any]:
    """Per variant: median feeds/s, p50/p99, CPU per feed, spans per feed, and the ratio of
    feeds/s to the *off* runs of the same rounds."""
    off = [r["qps"] for r in results["off"]]
    out: dict[str, Any] = {"concurrency": concurrency, "variants": {}}
    for name, runs in results.items():
        qps = [r["qps"] for r in runs]
        ratios = [q / o for q, o in zip(qps, off, strict=False) if o]
        out["variants"][name] = {
            "qps_median": float(np.median(qps)),
            "qps_ratio_to_off": float(np.median(ratios)) if ratios else None,
            "p50_ms_median": float(np.median([r["p50_ms"] for r in runs])),
            "p99_ms_median": float(np.median([r["p99_ms"] for r in runs])),
            "server_cpu_ms_per_feed_median": float(
                np.median([r.get("server_cpu_ms_per_feed") or np.nan for r in runs])
            ),
            "spans_exported": [r["spans_exported"] for r in runs],
            "runs": len(runs),
            "feeds": [r["ok"] for r in runs],
        }
    default = out["variants"].get("default", {}).get("qps_ratio_to_off")
    out["target"] = {
        "default_sampling_qps_ratio_min": 0.9,
        "measured": default,
        "met": default is not None and default >= 0.9,
    }
    return out


def format_table(report: dict[str, Any]) -> str:
    rows = [f"{'tracing':<10}{'feeds/s':>10}{'÷ off':>8}{'p50 ms':>9}{'p99 ms':>9}{'spans':>10}"]
    for name, v in report["variants"].items():
        ratio = v["qps_ratio_to_off"]
        rows.append(
            f"{name:<10}{v['qps_median']:>10.1f}{'-' if ratio is None else f'{ratio:.3f}':>8}"
            f"{v['p50_ms_median']:>9.2f}{v['p99_ms_median']:>9.2f}{sum(v['spans_exported']):>10}"
        )
    t = report["target"]
    if t["measured"] is not None:
        rows.append(
            f"default sampling keeps {t['measured']:.3f} of feeds/s (target >= 0.9: "
            f"{'met' if t['met'] else 'MISSED'})"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_tracing", description=__doc__)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS)}; 'off' must be among them",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="bench-tracing: %(message)s", stream=sys.stderr)
    home = Paths.from_env().home
    config = BenchConfig(
        home=home, preset=args.preset, seconds=args.seconds, warmup=2.0, requests=512
    )
    out = args.out or config.paths.reports / "tracing.json"
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "off" not in variants:
        parser.error(f"--variants must name 'off' and some of {', '.join(VARIANTS)}; got {unknown}")
    report = run(config, args.rounds, args.concurrency, out, variants)
    print(format_table(report))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
