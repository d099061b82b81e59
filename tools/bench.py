"""The serving benchmark (``make bench``): closed-loop gRPC load against the gateway of a
local mesh, against the floor (``tools.floor``: a bare gRPC chain of the mesh's shape whose
handlers do nothing) and against the naive reference; figures in ``reports/bench.json`` and
a table. The targets are ratios to the floor measured in the same run, level by level.

Load: ``C`` workers (asyncio tasks on one ``grpc.aio`` channel in this one process), each
sending its next ``GetFeed`` as soon as the previous one is answered, for ``--seconds`` per
concurrency level after a ``--warmup`` whose answers are discarded. Requests are prepared
and serialized before the clock starts, from a fixed seed, so both systems get the same
sequence: users drawn from the dataset's users table (a share of unknown ids), 80 % HOME and
20 % CHECKOUT with a cart of 1-3 catalog items, the user's country and device as context,
``page_size`` 20, a 1 s deadline, an empty request id (the server generates one).

Figures per level:

- latency percentiles (numpy's linear interpolation) over every answered request, OK or
  not, as the caller saw it: a request that ran into its deadline counts at the deadline;
- ``qps``: OK feeds per second of the measured window (the window ends when the last
  in-flight request returns); ``errors``: non-OK statuses, also counted by code;
- stage p50/p99 from the ``hf-stage-ms`` trailer the gateway (and the reference) sends:
  ``retrieval=0.81;filter=0.02;features=1.20;ranking=0.95;rerank=0.10;total=3.40`` (ms);
- CPU seconds of this client, of each server process and of the whole machine over the
  window; ``server_cpu_ms_per_full_feed`` divides the servers' CPU by the pages served
  whole (a degraded page is not a served feed), ``cpu_ms_per_feed_by_process`` by every OK
  page. The client shares the cores with the servers, and the machine may be shared with
  other work: ``other_cpu_s`` (machine busy time not spent by the client or the servers)
  says how much.

The top-level ``stages_p99_ms`` are those of concurrency 4 (the level of the latency
targets), or of the lowest level measured when 4 was not.

The mesh and the floor run side by side (both started, then each level runs on the floor and
right after on the mesh, so both see the same machine), are stopped, then the reference
server (``python -m tools.reference``) is started and loaded the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from homefeed.common.v1 import common_pb2
from homefeed.feed.v1 import feed_pb2

from contract import columns as C
from contract.bundle import ALIAS_CHAMPION
from contract.paths import REPO_ROOT, Paths
from services.common.server import READY_LINE
from services.common.settings import SettingsError, env_float, env_int, env_str
from services.gateway.admission import retry_after_s

log = logging.getLogger("tools.bench")

GET_FEED = "/homefeed.feed.v1.FeedService/GetFeed"
STAGE_METADATA_KEY = "hf-stage-ms"
STAGES = ("retrieval", "filter", "features", "ranking", "rerank", "total")
STAGE_LEVEL = 4  # the concurrency whose stage p99s are the report's headline figures
SETTLE_S = 5.0  # idle seconds between starting the systems and the first level
REPORT_FORMAT = 2
_READY = re.compile(r"^" + re.escape(READY_LINE).replace(r"\{port\}", r"(?P<port>\d+)") + r"\s*$")


class BenchError(RuntimeError):
    """The benchmark cannot run; the message says what is missing and how to get it."""


# --- configuration -----------------------------------------------------------------------


def _levels(text: str, name: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise SettingsError(
            f"{name} must be comma-separated concurrencies like 1,4,16, got {text!r}"
        ) from None
    if any(c < 1 or c > 1024 for c in levels):
        raise SettingsError(f"{name} must be concurrencies in 1..1024, got {text!r}")
    return tuple(dict.fromkeys(levels))


@dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run does. Defaults come from ``HOMEFEED_BENCH_*`` variables."""

    home: Path
    preset: str = "small"
    levels: tuple[int, ...] = (1, 4, 16)
    reference_levels: tuple[int, ...] = (4,)
    seconds: float = 15.0
    warmup: float = 2.0
    candidates: int = 500
    page_size: int = 20
    deadline: float = 1.0
    unknown_share: float = 0.10
    checkout_share: float = 0.20
    requests: int = 4096  # distinct prepared requests, cycled
    seed: int = 7
    out: Path | None = None  # None: <home>/reports/bench.json

    def __post_init__(self) -> None:
        checks = [
            (self.seconds > 0, f"seconds must be > 0, got {self.seconds}"),
            (self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}"),
            (self.candidates >= 1, f"candidates must be >= 1, got {self.candidates}"),
            (1 <= self.page_size <= 100, f"page_size must be 1..100, got {self.page_size}"),
            (self.deadline > 0, f"deadline must be > 0 s, got {self.deadline}"),
            (
                0 <= self.unknown_share <= 1,
                f"unknown_share must be 0..1, got {self.unknown_share}",
            ),
            (
                0 <= self.checkout_share <= 1,
                f"checkout_share must be 0..1, got {self.checkout_share}",
            ),
            (self.requests >= 1, f"requests must be >= 1, got {self.requests}"),
            (bool(self.levels or self.reference_levels), "no concurrency level to run"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)

    @property
    def dataset(self) -> str:
        return f"sim-{self.preset}"

    @property
    def paths(self) -> Paths:
        return Paths(self.home)

    @property
    def out_path(self) -> Path:
        return self.out or self.paths.reports / "bench.json"


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    """The run's configuration from the command line, defaults from the environment."""
    d = BenchConfig(home=Paths.from_env().home)
    parser = argparse.ArgumentParser(
        prog="python -m tools.bench",
        description="Closed-loop gRPC load against the local mesh's gateway and the naive "
        "reference; writes reports/bench.json and prints a table.",
    )
    parser.add_argument("--home", type=Path, default=d.home, help="HOMEFEED_HOME (%(default)s)")
    parser.add_argument(
        "--preset", default=env_str("HOMEFEED_BENCH_PRESET", d.preset), help="(%(default)s)"
    )
    parser.add_argument(
        "--levels",
        default=env_str("HOMEFEED_BENCH_LEVELS", "1,4,16"),
        help="gateway concurrencies, '' for none (%(default)s)",
    )
    parser.add_argument(
        "--reference-levels",
        default=env_str("HOMEFEED_BENCH_REFERENCE_LEVELS", "4"),
        help="reference concurrencies, '' for none (%(default)s)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=env_float("HOMEFEED_BENCH_SECONDS", d.seconds),
        help="measured seconds per level (%(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=env_float("HOMEFEED_BENCH_WARMUP", d.warmup),
        help="unmeasured seconds before each level (%(default)s)",
    )
    parser.add_argument(
        "--candidates",
        type=int,
        default=env_int("HOMEFEED_BENCH_CANDIDATES", d.candidates),
        help="candidates retrieved and ranked per feed (%(default)s)",
    )
    parser.add_argument("--page-size", type=int, default=d.page_size, help="(%(default)s)")
    parser.add_argument(
        "--deadline", type=float, default=d.deadline, help="per-request deadline, s (%(default)s)"
    )
    parser.add_argument(
        "--requests", type=int, default=d.requests, help="distinct requests (%(default)s)"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="(%(default)s)")
    parser.add_argument(
        "--out", type=Path, default=None, help="report path (<home>/reports/bench.json)"
    )
    args = parser.parse_args(argv)
    return BenchConfig(
        home=args.home.resolve(),
        preset=args.preset,
        levels=_levels(args.levels, "--levels"),
        reference_levels=_levels(args.reference_levels, "--reference-levels"),
        seconds=args.seconds,
        warmup=args.warmup,
        candidates=args.candidates,
        page_size=args.page_size,
        deadline=args.deadline,
        requests=args.requests,
        seed=args.seed,
        out=args.out.resolve() if args.out else None,
    )


# --- figures -------------------------------------------------------------------------------


def percentiles(values_ms: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """p50/p95/p99/max/mean of ``values_ms`` (None for each when there is none)."""
    arr = np.asarray(values_ms, dtype=np.float64)
    if arr.size == 0:
        return dict.fromkeys(("p50_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms"))
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {
        "p50_ms": float(p50),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "max_ms": float(arr.max()),
        "mean_ms": float(arr.mean()),
    }


def parse_stage_ms(value: str) -> dict[str, float]:
    """``"retrieval=0.81;features=1.20"`` -> ``{"retrieval": 0.81, "features": 1.2}``.

    Empty pieces (a trailing ``;``) and spaces are ignored; a piece without ``=``, an empty
    name, a value that is not a finite number >= 0, or a repeated name raises ValueError.
    """
    out: dict[str, float] = {}
    for piece in value.split(";"):
        piece = piece.strip()
        if not piece:
            continue
        name, sep, number = piece.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"{STAGE_METADATA_KEY} piece must be name=ms, got {piece!r}")
        try:
            ms = float(number)
        except ValueError:
            raise ValueError(
                f"{STAGE_METADATA_KEY} value of {name!r} must be a number of ms, got {number!r}"
            ) from None
        if not np.isfinite(ms) or ms < 0:
            raise ValueError(f"{STAGE_METADATA_KEY} value of {name!r} must be >= 0, got {ms}")
        if name in out:
            raise ValueError(f"{STAGE_METADATA_KEY} names {name!r} twice in {value!r}")
        out[name] = ms
    return out


def stage_summary(trailers: Sequence[str | None]) -> dict[str, Any]:
    """p50/p99 per stage over the trailers; counts of missing and malformed ones."""
    samples: dict[str, list[float]] = {}
    missing = malformed = 0
    for trailer in trailers:
        if trailer is None:
            missing += 1
            continue
        try:
            stages = parse_stage_ms(trailer)
        except ValueError:
            malformed += 1
            continue
        for name, ms in stages.items():
            samples.setdefault(name, []).append(ms)
    order = [s for s in STAGES if s in samples] + sorted(set(samples) - set(STAGES))
    p50: dict[str, float] = {}
    p99: dict[str, float] = {}
    for name in order:
        a, b = np.percentile(np.asarray(samples[name]), [50, 99])
        p50[name], p99[name] = float(a), float(b)
    return {
        "stage_p50_ms": p50,
        "stage_p99_ms": p99,
        "stage_samples": max((len(v) for v in samples.values()), default=0),
        "stage_trailers_missing": missing,
        "stage_trailers_malformed": malformed,
    }


@dataclass
class LevelRun:
    """What one measured window produced (raw, before summarising)."""

    concurrency: int
    elapsed_s: float
    latencies_ms: list[float] = field(default_factory=list)  # every answered request
    codes: list[str] = field(default_factory=list)  # status code name per request
    trailers: list[str | None] = field(default_factory=list)  # per OK response
    page_lengths: list[int] = field(default_factory=list)  # per OK response
    candidates: list[int] = field(default_factory=list)  # per OK response
    degraded: list[tuple[int, ...]] = field(default_factory=list)  # per degraded OK response
    client_cpu_s: float = 0.0
    server_cpu_s: float | None = None
    cpu_by_process: dict[str, float] = field(default_factory=dict)  # server CPU s by name
    machine_busy_s: float | None = None
    machine_cpu_s: float | None = None  # wall x cores of the machine over the window


def _degradations(pages: Sequence[tuple[int, ...]]) -> dict[str, int]:
    """How many degraded pages named each dependency (``RETRIEVAL``, ``FEATURES``...)."""
    counts = Counter(value for page in pages for value in page)
    out: dict[str, int] = {}
    for value, n in sorted(counts.items()):
        try:
            name = feed_pb2.Degradation.Name(value).removeprefix("DEGRADATION_")
        except ValueError:
            name = str(value)
        out[name] = n
    return out


# A request refused at the gateway's door (load shedding): counted as ``shed``, not as an
# error, and kept out of the latency percentiles (which describe the admitted feeds).
SHED_CODE = "RESOURCE_EXHAUSTED"


def summarize_level(run: LevelRun, cpu_count: int) -> dict[str, Any]:
    """The report's figures of one level. ``qps`` counts every OK feed; ``full_qps`` only
    those no dependency was missing from (``degraded`` empty), and the servers' CPU per
    full feed divides by those. Latency percentiles cover every answered request but the
    shed ones (``shed``, ``shed_share``, ``shed_p99_ms``)."""
    codes = Counter(run.codes)
    ok = codes.pop("OK", 0)
    shed = codes.pop(SHED_CODE, 0)
    errors = sum(codes.values())
    requests = ok + shed + errors
    full = ok - len(run.degraded)
    shed_mask = np.array([c == SHED_CODE for c in run.codes], dtype=bool)
    latencies = np.asarray(run.latencies_ms, dtype=np.float64)
    elapsed = max(run.elapsed_s, 1e-9)
    out: dict[str, Any] = {
        "concurrency": run.concurrency,
        "duration_s": run.elapsed_s,
        "requests": requests,
        "ok": ok,
        "qps": ok / elapsed,
        "requests_per_s": requests / elapsed,
        **percentiles(latencies[~shed_mask]),
        "errors": errors,
        "error_rate": errors / requests if requests else 0.0,
        "errors_by_code": dict(sorted(codes.items())),
        "shed": shed,
        "shed_share": shed / requests if requests else 0.0,
        "shed_p99_ms": percentiles(latencies[shed_mask])["p99_ms"],
        "degraded_pages": len(run.degraded),
        "degraded_share": len(run.degraded) / ok if ok else 0.0,
        "degraded_by": _degradations(run.degraded),
        "full_qps": (ok - len(run.degraded)) / elapsed,
        "empty_pages": sum(1 for n in run.page_lengths if n == 0),
        "mean_page_length": float(np.mean(run.page_lengths)) if run.page_lengths else None,
        "median_candidates": float(np.median(run.candidates)) if run.candidates else None,
        **stage_summary(run.trailers),
        "client_cpu_s": run.client_cpu_s,
        "client_cpu_share": run.client_cpu_s / (elapsed * cpu_count),
        "server_cpu_s": run.server_cpu_s,
        "server_cpu_ms_per_feed": (
            run.server_cpu_s * 1e3 / ok if run.server_cpu_s is not None and ok else None
        ),
        "server_cpu_ms_per_full_feed": (
            run.server_cpu_s * 1e3 / full if run.server_cpu_s is not None and full else None
        ),
        "cpu_ms_per_feed_by_process": {
            name: seconds * 1e3 / ok if ok else None
            for name, seconds in sorted(run.cpu_by_process.items())
        },
    }
    if run.machine_busy_s is not None and run.machine_cpu_s:
        ours = run.client_cpu_s + (run.server_cpu_s or 0.0)
        out["machine_busy_share"] = run.machine_busy_s / run.machine_cpu_s
        out["other_cpu_s"] = max(run.machine_busy_s - ours, 0.0)
    return out


@dataclass(frozen=True)
class Target:
    """One figure the issue sets a bound on."""

    name: str
    description: str
    path: str  # where the value is in the report, keys joined by dots
    op: str  # "<=" or ">="
    limit: float


TARGETS: tuple[Target, ...] = (
    Target("c1_p50_vs_floor", "p50 at concurrency 1, x floor", "ratios.c1.p50", "<=", 2.0),
    Target("c4_p99_vs_floor", "p99 at concurrency 4, x floor", "ratios.c4.p99", "<=", 1.5),
    *(
        Target(
            f"c{c}_cpu_vs_floor",
            f"server CPU per full feed at concurrency {c}, x floor",
            f"ratios.c{c}.server_cpu_per_full_feed",
            "<=",
            2.0,
        )
        for c in (1, 4, 16)
    ),
    Target(
        "c16_degraded_share",
        "degraded share at concurrency 16",
        "homefeed.c16.degraded_share",
        "<=",
        0.01,
    ),
    Target(
        "c16_full_qps_vs_floor",
        "full feeds/s at concurrency 16, x floor feeds/s",
        "ratios.c16.full_qps",
        ">=",
        0.5,
    ),
    Target("errors", "errors over every homefeed level", "homefeed_errors", "<=", 0),
    Target(
        "reference_over_homefeed_p99_c4",
        "reference p99 / homefeed p99 at concurrency 4",
        "ratio_reference_p99_to_homefeed_p99_c4",
        ">=",
        10,
    ),
)


def level_ratios(
    homefeed: Mapping[int, Mapping[str, Any]], floor: Mapping[int, Mapping[str, Any]]
) -> dict[str, dict[str, float | None]]:
    """Per level run on both: homefeed / floor for p50, p99 and server CPU per full feed
    (the floor's pages are all full), and homefeed's full feeds/s / the floor's feeds/s."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    out: dict[str, dict[str, float | None]] = {}
    for c in sorted(set(homefeed) & set(floor)):
        h, f = homefeed[c], floor[c]
        out[f"c{c}"] = {
            "p50": ratio(h["p50_ms"], f["p50_ms"]),
            "p99": ratio(h["p99_ms"], f["p99_ms"]),
            "server_cpu_per_full_feed": ratio(
                h["server_cpu_ms_per_full_feed"], f["server_cpu_ms_per_feed"]
            ),
            "full_qps": ratio(h["full_qps"], f["qps"]),
        }
    return out


def _lookup(report: Mapping[str, Any], path: str) -> float | None:
    node: Any = report
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, int | float) and not isinstance(node, bool) else None


def evaluate_targets(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target with its value and whether it was met (None: not measured)."""
    out: dict[str, dict[str, Any]] = {}
    for t in TARGETS:
        value = _lookup(report, t.path)
        met = None if value is None else (value <= t.limit if t.op == "<=" else value >= t.limit)
        out[t.name] = {
            "description": t.description,
            "op": t.op,
            "limit": t.limit,
            "value": value,
            "met": met,
        }
    return out


def build_report(
    config: BenchConfig,
    homefeed: Mapping[int, dict[str, Any]],
    reference: Mapping[int, dict[str, Any]],
    cpu_count: int,
    meta: Mapping[str, Any] | None = None,
    floor: Mapping[int, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The ``bench.json`` document from per-level summaries (``summarize_level``).

    Contract: ``homefeed.c<N>.{p50_ms,p95_ms,p99_ms,qps,full_qps,degraded_share,errors,
    server_cpu_ms_per_full_feed,cpu_ms_per_feed_by_process}`` per level run,
    ``floor.c<N>.{qps,p50_ms,p99_ms,server_cpu_ms_per_feed}``, ``ratios.c<N>`` (homefeed /
    floor), ``reference.c<N>.{p50_ms,p99_ms,qps,errors}``, ``stages_p99_ms.{retrieval,
    features,ranking}``, ``candidates``, ``preset``, ``cpu_count``; plus targets, the
    reference's p99 ratio at concurrency 4 and whatever ``meta`` holds (git, machine,
    timings).
    """
    floor = floor or {}
    stage_level = STAGE_LEVEL if STAGE_LEVEL in homefeed else (min(homefeed) if homefeed else None)
    stages: dict[str, float | None] = dict.fromkeys(("retrieval", "features", "ranking"))
    if stage_level is not None:
        stages.update(homefeed[stage_level]["stage_p99_ms"])
    hf4, ref4 = homefeed.get(4, {}).get("p99_ms"), reference.get(4, {}).get("p99_ms")
    ratio = ref4 / hf4 if hf4 and ref4 is not None else None
    # a reference request cut off by its deadline would have taken longer: the ratio is then
    # at least the figure given
    cut_off = reference.get(4, {}).get("errors_by_code", {}).get("DEADLINE_EXCEEDED", 0)
    settings = asdict(config)
    settings["home"] = str(config.home)
    settings["out"] = str(config.out_path)
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "preset": config.preset,
        "dataset": config.dataset,
        "candidates": config.candidates,
        "page_size": config.page_size,
        "cpu_count": cpu_count,
        "homefeed": {f"c{c}": homefeed[c] for c in sorted(homefeed)},
        "floor": {f"c{c}": floor[c] for c in sorted(floor)},
        "ratios": level_ratios(homefeed, floor),
        "homefeed_errors": (
            sum(level["errors"] for level in homefeed.values()) if homefeed else None
        ),
        "reference": {f"c{c}": reference[c] for c in sorted(reference)},
        "stages_p99_ms": stages,
        "stages_level": None if stage_level is None else f"c{stage_level}",
        "ratio_reference_p99_to_homefeed_p99_c4": ratio,
        "ratio_is_lower_bound": bool(ratio is not None and cut_off),
        "config": settings,
        **(meta or {}),
    }
    targets = evaluate_targets(report)
    report["targets"] = targets
    report["targets_met"] = sum(1 for t in targets.values() if t["met"])
    report["targets_measured"] = sum(1 for t in targets.values() if t["met"] is not None)
    report["all_targets_met"] = all(t["met"] for t in targets.values())
    return report


# --- requests ------------------------------------------------------------------------------


def make_requests(
    users: Mapping[str, np.ndarray],
    item_ids: np.ndarray,
    n: int,
    rng: np.random.Generator,
    *,
    page_size: int = 20,
    unknown_share: float = 0.10,
    checkout_share: float = 0.20,
) -> list[feed_pb2.GetFeedRequest]:
    """``n`` requests: known users with their country/device, ``unknown_share`` ids beyond
    the users table (random context), ``checkout_share`` CHECKOUT with 1-3 cart items."""
    user_ids = np.asarray(users[C.USER_ID], dtype=np.int64)
    countries = np.asarray(users[C.COUNTRY]).astype(str)
    devices = np.asarray(users[C.DEVICE]).astype(str)
    if len(user_ids) == 0 or len(item_ids) == 0:
        raise BenchError("the users and items tables must not be empty")
    first_unknown = int(user_ids.max()) + 1
    out: list[feed_pb2.GetFeedRequest] = []
    for _ in range(n):
        if rng.random() < unknown_share:
            user = first_unknown + int(rng.integers(0, 1_000_000))
            country = str(rng.choice(C.COUNTRIES))
            device = str(rng.choice(C.DEVICES))
        else:
            row = int(rng.integers(0, len(user_ids)))
            user, country, device = int(user_ids[row]), countries[row], devices[row]
        request = feed_pb2.GetFeedRequest(
            user_id=user,
            surface=common_pb2.SURFACE_HOME,
            page_size=page_size,
            context=common_pb2.RequestContext(country=country, device=device),
        )
        if rng.random() < checkout_share:
            request.surface = common_pb2.SURFACE_CHECKOUT
            cart = rng.choice(item_ids, size=int(rng.integers(1, 4)), replace=False)
            request.cart_item_ids.extend(int(i) for i in cart)
        out.append(request)
    return out


def load_requests(config: BenchConfig) -> list[bytes]:
    """The serialized request pool from the dataset's users and items tables."""
    from training.tables import read_tables

    tables = read_tables(config.paths.raw(config.dataset), [C.USERS, C.ITEMS])
    users = {col: tables[C.USERS][col].to_numpy() for col in (C.USER_ID, C.COUNTRY, C.DEVICE)}
    requests = make_requests(
        users,
        tables[C.ITEMS][C.ITEM_ID].to_numpy(np.int64),
        config.requests,
        np.random.default_rng(config.seed),
        page_size=config.page_size,
        unknown_share=config.unknown_share,
        checkout_share=config.checkout_share,
    )
    return [r.SerializeToString() for r in requests]


def check_prerequisites(config: BenchConfig) -> None:
    """BenchError saying to run ``make demo`` when the dataset, its Feast store or the
    registered champion bundle is missing, or the bundle predates the feature code."""
    paths = config.paths
    hint = f"run `make demo` first (HOMEFEED_HOME={paths.home})"
    raw = paths.raw(config.dataset)
    needed = {
        "users table": raw / "users.parquet",
        "items table": raw / "items.parquet",
        "Feast registry": paths.feast(config.dataset) / "registry.db",
        "Feast online store": paths.feast(config.dataset) / "online.db",
    }
    for what, path in needed.items():
        if not path.exists():
            raise BenchError(f"no {what} of dataset {config.dataset!r} at {path}: {hint}")
    from contract.registry import Registry, default_tracking_uri

    uri = default_tracking_uri(paths)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise BenchError(f"no model registry at {uri}: {hint}")
    registry = Registry(uri)
    try:
        champion = registry.client.get_model_version_by_alias(registry.name, ALIAS_CHAMPION)
    except Exception as err:  # MLflow's own exception when the alias does not exist
        raise BenchError(
            f"no bundle registered as {ALIAS_CHAMPION!r} at {uri} ({err}): {hint}"
        ) from err
    from contract.features import feature_schema

    built_for = (champion.tags or {}).get("feature_schema_hash")
    code = feature_schema().hash
    if built_for and built_for != code:
        raise BenchError(
            f"the {ALIAS_CHAMPION!r} bundle (version {champion.version}) was built for feature "
            f"schema {built_for[:12]}, the code builds {code[:12]}: the data and bundle are "
            f"older than the features; run `make demo` again (HOMEFEED_HOME={paths.home})"
        )


# --- load ----------------------------------------------------------------------------------


class _CpuProbe:
    """CPU seconds (user + system) of named processes and their children."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self._procs = {name: psutil.Process(pid) for name, pid in pids.items()}

    def __call__(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, proc in self._procs.items():
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                out[name] = t.user + t.system + t.children_user + t.children_system
        return out


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    t = psutil.cpu_times()
    total = sum(t)
    idle = t.idle + getattr(t, "iowait", 0.0)
    return total - idle, total


async def _closed_loop(
    method: grpc.aio.UnaryUnaryMultiCallable,
    payloads: Iterator[bytes],
    concurrency: int,
    seconds: float,
    deadline: float,
    run: LevelRun | None,
) -> None:
    """``concurrency`` workers, each sending its next request when the previous is answered,
    until ``seconds`` have passed; answers are recorded in ``run`` (None: discarded)."""
    end = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < end:
            payload = next(payloads)
            start = time.perf_counter()
            try:
                call = method(payload, timeout=deadline)
                response = await call
                took = time.perf_counter() - start
                trailing = await call.trailing_metadata()
            except grpc.aio.AioRpcError as err:
                if run is not None:
                    run.latencies_ms.append((time.perf_counter() - start) * 1e3)
                    run.codes.append(err.code().name)
                wait_s = retry_after_s(err)
                if wait_s:  # a shed request: back off as told, as a well-behaved client does
                    await asyncio.sleep(min(wait_s, max(end - time.perf_counter(), 0.0)))
                continue
            if run is None:
                continue
            run.latencies_ms.append(took * 1e3)
            run.codes.append("OK")
            trailer = trailing.get(STAGE_METADATA_KEY) if trailing is not None else None
            run.trailers.append(trailer if isinstance(trailer, str) else None)
            run.page_lengths.append(len(response.item_ids))
            run.candidates.append(response.candidates)
            if len(response.degraded):
                run.degraded.append(tuple(response.degraded))

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _run_level_async(
    address: str,
    payloads: Iterator[bytes],
    concurrency: int,
    warmup: float,
    seconds: float,
    deadline: float,
    server_cpu: Callable[[], dict[str, float]] | None,
) -> LevelRun:
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=10)
        method = channel.unary_unary(
            GET_FEED,
            request_serializer=None,
            response_deserializer=feed_pb2.GetFeedResponse.FromString,
        )
        if warmup > 0:
            await _closed_loop(method, payloads, concurrency, warmup, deadline, None)
        run = LevelRun(concurrency=concurrency, elapsed_s=0.0)
        cpu0 = time.process_time()
        srv0 = server_cpu() if server_cpu else None
        busy0, total0 = _machine_cpu()
        start = time.perf_counter()
        await _closed_loop(method, payloads, concurrency, seconds, deadline, run)
        run.elapsed_s = time.perf_counter() - start
        busy1, total1 = _machine_cpu()
        run.client_cpu_s = time.process_time() - cpu0
        if server_cpu is not None and srv0 is not None:
            srv1 = server_cpu()
            run.cpu_by_process = {name: srv1[name] - srv0.get(name, 0.0) for name in srv1}
            run.server_cpu_s = sum(run.cpu_by_process.values())
        run.machine_busy_s, run.machine_cpu_s = busy1 - busy0, total1 - total0
        return run


def run_level(
    system: str,
    address: str,
    payloads: Iterator[bytes],
    concurrency: int,
    config: BenchConfig,
    server_pids: Mapping[str, int],
    cpu_count: int,
) -> dict[str, Any]:
    """The summary of one level against ``address``, logged when it finishes."""
    probe = _CpuProbe(server_pids) if server_pids else None
    log.info(
        "%s: concurrency %d for %.0f s (+%.0f s warm-up)",
        system,
        concurrency,
        config.seconds,
        config.warmup,
    )
    run = asyncio.run(
        _run_level_async(
            address, payloads, concurrency, config.warmup, config.seconds, config.deadline, probe
        )
    )
    summary = summarize_level(run, cpu_count)
    log.info(
        "%s c%d: %.1f feeds/s (%.1f full), p50 %s ms, p99 %s ms, %d errors",
        system,
        concurrency,
        summary["qps"],
        summary["full_qps"],
        _fmt(summary["p50_ms"]),
        _fmt(summary["p99_ms"]),
        summary["errors"],
    )
    return summary


# --- servers -------------------------------------------------------------------------------


@contextlib.contextmanager
def _started(mesh_config: Any, what: str) -> Iterator[tuple[str, dict[str, int]]]:
    """A mesh of ``mesh_config`` (``tools.mesh``): (its gateway's address, pids by name);
    stopped on exit."""
    from tools.mesh import Mesh, MeshError

    try:
        mesh = Mesh.start(mesh_config)
    except MeshError as err:
        raise BenchError(f"the {what} did not start: {err}") from err
    with mesh:
        yield mesh.addresses["gateway"], mesh.pids


def mesh_running(
    config: BenchConfig,
) -> contextlib.AbstractContextManager[tuple[str, dict[str, int]]]:
    """The local mesh for the run."""
    from tools.mesh import MeshConfig

    mesh_config = MeshConfig(
        home=config.home,
        dataset=config.dataset,
        extra_env={"HOMEFEED_GATEWAY_CANDIDATES": str(config.candidates)},
    )
    return _started(mesh_config, "mesh")


def floor_running(
    config: BenchConfig,
) -> contextlib.AbstractContextManager[tuple[str, dict[str, int]]]:
    """The floor chain (``tools.floor``), started by the same supervisor as the mesh under
    ``<home>/run/floor``."""
    from contract.features import FEATURE_SCHEMA
    from tools.mesh import SERVICES, MeshConfig

    command = [sys.executable, "-m", "tools.floor"]
    size = ["--candidates", str(config.candidates), "--width", str(len(FEATURE_SCHEMA))]
    floor_config = MeshConfig(
        home=config.paths.home / "run" / "floor",
        model="0",  # no bundle: nothing to resolve
        commands={name: [*command, name, *size] for name in SERVICES},
        rollout=False,  # the floor is the serving chain only
    )
    return _started(floor_config, "floor")


@contextlib.contextmanager
def reference_running(
    config: BenchConfig, timeout: float = 180.0
) -> Iterator[tuple[str, dict[str, int]]]:
    """``python -m tools.reference`` on a free port: (address, {"reference": pid});
    SIGTERM on exit.

    Its output goes to ``<home>/run/logs/reference.log``; the READY line is read from there.
    """
    log_path = config.paths.home / "run" / "logs" / "reference.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        {
            "HOMEFEED_HOME": str(config.home),
            "HOMEFEED_REFERENCE_DATASET": config.dataset,
            "HOMEFEED_REFERENCE_HOST": "127.0.0.1",
            "HOMEFEED_REFERENCE_PORT": "0",
            "HOMEFEED_REFERENCE_CANDIDATES": str(config.candidates),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tools.reference"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        port = _await_ready(proc, log_path, timeout)
        yield f"127.0.0.1:{port}", {"reference": proc.pid}
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _await_ready(proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        text = log_path.read_text(errors="replace")
        for line in text.splitlines():
            match = _READY.match(line)
            if match:
                return int(match.group("port"))
        if proc.poll() is not None:
            tail = "\n".join("    " + line for line in text.splitlines()[-15:])
            raise BenchError(
                f"the reference server exited with status {proc.returncode} before it was "
                f"ready; last lines of {log_path}:\n{tail}"
            )
        if time.monotonic() > deadline:
            raise BenchError(f"the reference server was not ready after {timeout:g} s")
        time.sleep(0.1)


# --- report --------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine_info() -> dict[str, Any]:
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "cpu_model": cpu_model,
        "cpu_count_logical": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(report: Mapping[str, Any]) -> str:
    """The human-readable summary printed after a run."""
    lines = [
        f"homefeed bench: preset {report['preset']} ({report['dataset']}), "
        f"{report['candidates']} candidates, page {report['page_size']}, "
        f"{report['cpu_count']} CPUs, {report['config']['seconds']:g} s per level after "
        f"{report['config']['warmup']:g} s warm-up",
    ]
    load = report.get("load_average")
    if load:
        lines.append(
            "machine load average (1 min) before/after: "
            f"{_fmt(load['before'][0])}/{_fmt(load['after'][0])}; the cores are shared with "
            "the client and with any other work on the machine (other CPU s below)"
        )
    header = (
        f"{'system':<10}{'conc':>5}{'feeds/s':>9}{'full/s':>9}{'p50 ms':>9}{'p95 ms':>9}"
        f"{'p99 ms':>9}{'max ms':>9}{'errors':>8}{'shed %':>8}{'degr %':>8}{'cpu/feed':>9}"
        f"{'client':>8}{'other':>7}"
    )
    lines += ["", header, "-" * len(header)]
    for system in ("floor", "homefeed", "reference"):
        for level in report.get(system, {}).values():
            lines.append(
                f"{system:<10}{level['concurrency']:>5}{level['qps']:>9.1f}"
                f"{level['full_qps']:>9.1f}"
                f"{_fmt(level['p50_ms']):>9}{_fmt(level['p95_ms']):>9}"
                f"{_fmt(level['p99_ms']):>9}{_fmt(level['max_ms'], 1):>9}"
                f"{level['errors']:>8}{100 * level.get('shed_share', 0.0):>8.1f}"
                f"{100 * level['degraded_share']:>8.1f}"
                f"{_fmt(level['server_cpu_ms_per_full_feed']):>9}"
                f"{_fmt(level['client_cpu_s'], 1):>8}{_fmt(level.get('other_cpu_s'), 1):>7}"
            )
    lines.append(
        "(feeds/s: OK pages; full/s: those with no fallback; shed %: requests refused at the "
        "door with RESOURCE_EXHAUSTED, not errors, not in the percentiles; degr %: pages "
        "served with a fallback; cpu/feed: server CPU ms per full page; client/other: CPU "
        "seconds over the level's window)"
    )
    by_process = {
        f"c{level['concurrency']}": level["cpu_ms_per_feed_by_process"]
        for level in report["homefeed"].values()
        if level.get("cpu_ms_per_feed_by_process")
    }
    if by_process:
        lines.append(
            "homefeed CPU ms per feed by process: "
            + "; ".join(
                f"{c}: " + ", ".join(f"{n} {_fmt(v)}" for n, v in figures.items())
                for c, figures in by_process.items()
            )
        )
    if report.get("ratios"):
        lines += [
            "",
            f"{'homefeed / floor':<18}{'p50':>7}{'p99':>7}{'cpu/full feed':>15}"
            f"{'full feeds/s':>14}",
        ]
        for level, r in report["ratios"].items():
            lines.append(
                f"{level:<18}{_fmt(r['p50']):>7}{_fmt(r['p99']):>7}"
                f"{_fmt(r['server_cpu_per_full_feed']):>15}{_fmt(r['full_qps']):>14}"
            )
    degraded = {
        f"{system} c{level['concurrency']}": level["degraded_by"]
        for system in ("homefeed", "reference")
        for level in report[system].values()
        if level["degraded_pages"]
    }
    if degraded:
        lines.append(
            "degraded pages by dependency: " + "; ".join(f"{k}: {v}" for k, v in degraded.items())
        )
    errors = {
        f"{system} c{level['concurrency']}": level["errors_by_code"]
        for system in ("homefeed", "reference")
        for level in report[system].values()
        if level["errors"]
    }
    if errors:
        lines.append("errors by code: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    stage_header = f"{'stage p99 ms':<16}" + "".join(f"{s:>11}" for s in STAGES)
    lines += ["", stage_header, "-" * len(stage_header)]
    for system in ("homefeed", "reference"):
        for level in report[system].values():
            p99 = level["stage_p99_ms"]
            lines.append(
                f"{system + ' c' + str(level['concurrency']):<16}"
                + "".join(f"{_fmt(p99.get(s)):>11}" for s in STAGES)
            )
    lines += ["", "targets (issue; on 2 cores):"]
    if report.get("ratio_is_lower_bound"):
        lines.append(
            "  (reference requests ran into the deadline at concurrency 4: its p99 and the "
            "ratio are lower bounds)"
        )
    for target in report["targets"].values():
        mark = {True: "ok  ", False: "MISS", None: "n/a "}[target["met"]]
        lines.append(
            f"  [{mark}] {target['description']:<46} {target['op']} {target['limit']:g}: "
            f"{_fmt(target['value'])}"
        )
    lines.append(
        f"{report['targets_met']}/{len(report['targets'])} met "
        f"({report['targets_measured']} measured); report: {report['config']['out']}"
    )
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(path)


def run(config: BenchConfig) -> dict[str, Any]:
    """Run the benchmark, write the report and return it."""
    check_prerequisites(config)
    cpu_count = os.cpu_count() or 1
    started = datetime.now(UTC)
    wall0 = time.perf_counter()
    load_before = os.getloadavg()
    payloads = itertools.cycle(load_requests(config))
    homefeed: dict[int, dict[str, Any]] = {}
    floor: dict[int, dict[str, Any]] = {}
    reference: dict[int, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    if config.levels:
        t0 = time.perf_counter()
        with mesh_running(config) as (address, pids):
            timings["mesh_start_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            with floor_running(config) as (floor_address, floor_pids):
                timings["floor_start_s"] = time.perf_counter() - t0
                time.sleep(SETTLE_S)  # start-up's tail (refreshers' first ticks) is not load
                for c in config.levels:  # side by side: the same machine for both
                    floor[c] = run_level(
                        "floor", floor_address, payloads, c, config, floor_pids, cpu_count
                    )
                    homefeed[c] = run_level(
                        "homefeed", address, payloads, c, config, pids, cpu_count
                    )
    if config.reference_levels:
        t0 = time.perf_counter()
        with reference_running(config) as (address, pids):
            timings["reference_start_s"] = time.perf_counter() - t0
            for c in config.reference_levels:
                reference[c] = run_level("reference", address, payloads, c, config, pids, cpu_count)
    timings["total_s"] = time.perf_counter() - wall0
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    meta = {
        "created_at": started.isoformat(timespec="seconds"),
        "git": {"commit": commit, "dirty": None if status is None else bool(status)},
        "machine": machine_info(),
        "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
        "timings_s": timings,
        "notes": [
            "latency percentiles are over every answered request (OK or not) as the client "
            "saw it; qps counts OK feeds",
            "client, servers and any other work on the machine share its cores: see "
            "client_cpu_s, server_cpu_s and other_cpu_s per level, and load_average",
        ],
    }
    report = build_report(config, homefeed, reference, cpu_count, meta, floor)
    write_report(report, config.out_path)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="bench: %(message)s", stream=sys.stderr)
    try:
        config = parse_args(argv)
        report = run(config)
    except (BenchError, SettingsError) as err:
        sys.stderr.write(f"bench: {err}\n")
        return 1
    sys.stdout.write(format_table(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
