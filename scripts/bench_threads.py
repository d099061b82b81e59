"""Where each process of the chain spends its CPU, thread by thread, at concurrency 1.

``python scripts/bench_threads.py`` (after ``make demo``) starts the mesh and the floor
(``tools/floor.py``) one after the other, drives each with ``make bench``'s closed loop at
concurrency 1 and reads every thread's CPU time from ``/proc/<pid>/task`` before and after.
Per process it reports CPU ms per feed of its ``grpc-worker`` threads (the handlers: the
request's parse, the servicer, the response's serialization; ``services.common.server``
names them), of its other Python threads (the gRPC server's polling loop, background work)
and of gRPC core's ``event_engine`` threads, to
``reports/threads.json`` and a table. With ``scripts/bench_cores.py --gap-ms`` it separates
what the services' handlers cost from what gRPC costs around them (``docs/serving.md``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.common.server import WORKER_THREAD_NAME
from tools import bench


def thread_ticks(pid: int) -> dict[tuple[int, str], int]:
    """(tid, comm) -> user + system clock ticks, for every thread of ``pid``."""
    out: dict[tuple[int, str], int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except FileNotFoundError:  # the thread ended
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw.rsplit(")", 1)[1].split()
        out[(int(tid), comm)] = int(fields[11]) + int(fields[12])
    return out


def split(
    before: Mapping[tuple[int, str], int], after: Mapping[tuple[int, str], int], feeds: int
) -> dict[str, float]:
    """CPU ms per feed: handler threads, the other Python threads, gRPC core's threads."""
    per_feed = 1e3 / os.sysconf("SC_CLK_TCK") / max(feeds, 1)
    kinds = {"handlers": 0, "other_python_threads": 0, "grpc_core_threads": 0}
    for key, ticks in after.items():
        comm = key[1]
        kind = (
            "handlers"
            if comm == WORKER_THREAD_NAME
            else "grpc_core_threads"
            if comm == "event_engine"
            else "other_python_threads"
        )
        kinds[kind] += ticks - before.get(key, 0)
    figures = {kind: round(ticks * per_feed, 3) for kind, ticks in kinds.items()}
    figures["total"] = round(sum(kinds.values()) * per_feed, 3)
    return figures


def measure(system: str, config: bench.BenchConfig, payloads: list[bytes]) -> dict[str, Any]:
    running = bench.mesh_running(config) if system == "mesh" else bench.floor_running(config)
    with running as (address, pids):
        # a first level warms the chain up; the second is measured
        bench.run_level(system, address, itertools.cycle(payloads), 1, config, pids, 2)
        before = {name: thread_ticks(pid) for name, pid in pids.items()}
        summary = bench.run_level(system, address, itertools.cycle(payloads), 1, config, pids, 2)
        after = {name: thread_ticks(pid) for name, pid in pids.items()}
    feeds = int(summary["ok"])
    return {
        "feeds": feeds,
        "qps": summary["qps"],
        "p50_ms": summary["p50_ms"],
        "by_process": {name: split(before[name], after[name], feeds) for name in pids},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    config = bench.parse_args(
        ["--preset", args.preset, "--seconds", str(args.seconds), "--warmup", "1"]
    )
    payloads = bench.load_requests(config)
    report = {system: measure(system, config, payloads) for system in ("mesh", "floor")}
    out = args.out or config.paths.reports / "threads.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{'c1, CPU ms per feed':<22}{'handlers':>9}{'other py':>9}{'grpc core':>10}{'total':>8}")
    for system, figures in report.items():
        for name, cpu in figures["by_process"].items():
            print(
                f"{system + ' ' + name:<22}{cpu['handlers']:>9.2f}"
                f"{cpu['other_python_threads']:>9.2f}{cpu['grpc_core_threads']:>10.2f}"
                f"{cpu['total']:>8.2f}"
            )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
