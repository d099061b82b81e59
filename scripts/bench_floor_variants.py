"""What the services' per-call machinery costs, measured on the floor chain itself.

``python scripts/bench_floor_variants.py`` starts two floor chains (``tools.floor``) side by
side and drives each in turn, alternating, at the same concurrencies:

- ``bare``: the floor of ``make bench`` (grpc server, thread pool, health; trivial handlers);
- ``plumbing``: the same handlers in a server built as the services build theirs
  (``services.common.server.build_server``: the error-mapping/latency interceptor, reflection)
  and with the request id sent as metadata on each downstream call.

The handlers do nothing in both, so the difference is the interceptor, the metadata and the
server build, nothing of homefeed's own work. Rounds alternate the two so the machine's drift
hits both alike; medians over rounds go to ``reports/floor_variants.json`` and a table. Needs
no dataset or bundle.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from homefeed.feed.v1 import feed_pb2

from contract.features import FEATURE_SCHEMA
from contract.paths import Paths
from tools.bench import BenchConfig, run_level
from tools.mesh import SERVICES, Mesh, MeshConfig

VARIANTS = ("bare", "plumbing")
FIELDS = ("p50_ms", "p99_ms", "qps", "server_cpu_ms_per_feed")


@contextlib.contextmanager
def chain(home: Path, variant: str, candidates: int) -> Iterator[tuple[str, dict[str, int]]]:
    command = [sys.executable, "-m", "tools.floor"]
    size = ["--candidates", str(candidates), "--width", str(len(FEATURE_SCHEMA))]
    extra = ["--plumbing"] if variant == "plumbing" else []
    config = MeshConfig(
        home=home / "run" / f"floor-{variant}",
        model="0",
        commands={name: [*command, name, *size, *extra] for name in SERVICES},
    )
    with Mesh.start(config) as mesh:
        yield mesh.addresses["gateway"], mesh.pids


def payloads(n: int = 256) -> Iterator[bytes]:
    return itertools.cycle(
        feed_pb2.GetFeedRequest(request_id=f"r{i}", user_id=i, page_size=20).SerializeToString()
        for i in range(n)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--levels", default="1,4", help="concurrencies (%(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations (%(default)s)")
    parser.add_argument("--seconds", type=float, default=8.0, help="per level (%(default)s)")
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    paths = Paths.from_env()
    levels = [int(c) for c in args.levels.split(",")]
    config = BenchConfig(home=paths.home, seconds=args.seconds, warmup=1.0, levels=tuple(levels))
    cpu_count = os.cpu_count() or 1
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {
        v: {c: [] for c in levels} for v in VARIANTS
    }
    feed = payloads()
    with contextlib.ExitStack() as stack:
        started = {v: stack.enter_context(chain(paths.home, v, args.candidates)) for v in VARIANTS}
        for _ in range(args.rounds):
            for c in levels:
                for v in VARIANTS:
                    address, pids = started[v]
                    runs[v][c].append(run_level(v, address, feed, c, config, pids, cpu_count))
    report: dict[str, Any] = {"rounds": args.rounds, "seconds": args.seconds, "levels": {}}
    rows = []
    for c in levels:
        per: dict[str, dict[str, float]] = {}
        for v in VARIANTS:
            per[v] = {
                f: float(np.median([r[f] for r in runs[v][c] if r[f] is not None])) for f in FIELDS
            }
        ratio = {f: per["plumbing"][f] / per["bare"][f] for f in FIELDS if per["bare"][f]}
        report["levels"][f"c{c}"] = {**per, "plumbing_over_bare": ratio}
        for v in VARIANTS:
            rows.append(
                f"c{c:<3} {v:<9} "
                + " ".join(f"{per[v][f]:>10.2f}" for f in FIELDS)
                + ("" if v == "bare" else "   x" + " x".join(f"{ratio[f]:.2f}" for f in FIELDS))
            )
    out = args.out or paths.reports / "floor_variants.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'level':<4} {'variant':<9} " + " ".join(f"{f:>10.10}" for f in FIELDS))
    print("\n".join(rows))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
