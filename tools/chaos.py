"""``make chaos``: fault scenarios against a real local mesh under steady load.

Each scenario starts from a healthy, supervised mesh (``tools.mesh``: real processes, real
ports, the registry's champion), drives closed-loop load at its gateway from client threads,
does something bad to it, and checks what a caller saw:

- ``kill_retrieval`` / ``kill_features`` / ``kill_ranking``: kill -9 under load. No feed
  fails (fallbacks), the hop's breaker opens within 1 s, the supervisor restarts the service,
  and full feeds return within 5 s of its readiness.
- ``restart_recovers``: the same measurement of recovery, after the features service is
  killed and restarted.
- ``overload``: 4x the measured capacity for a while. Admitted feeds keep their p99 within
  2x of normal; the rest are refused (RESOURCE_EXHAUSTED) in under 5 ms; nothing else fails;
  the mesh serves full feeds afterwards.
- ``admin_unauthenticated``: Reload without a token, with a wrong one, and on a ranking
  started without one, all refused; a bundle built for another feature schema refused, the
  old model still serving.
- ``breaker_poison``: bursts of hostile requests (non-ASCII and control-character ids,
  oversized strings, malformed protobuf, out-of-range fields) mixed into normal load. No
  breaker opens, no normal feed degrades, every hostile request gets INVALID_ARGUMENT (or
  RESOURCE_EXHAUSTED for one above the gateway's message limit).
- ``drain``: SIGTERM to the gateway and to each backend under load: nothing in flight or
  arriving during the lame-duck period fails; with two gateways behind the client (round
  robin with client-side health checking), no request fails at all.
- ``canary_errors`` (the canary fails 20 % of its calls), ``canary_slow`` (+50 ms),
  ``canary_bad_scores`` (fast and error-free, but its scores shuffled): a rollout of a
  release (a copy of the served bundle registered as a new version, served by the canary
  with ``HOMEFEED_RANKING_FAULTS``) is rolled back within interval x (threshold + 1), with
  under 1 % of feeds failed.
- ``canary_good``: the same release without faults is promoted, in no less than interval x
  steps; the ``champion`` alias moved and stable serves it; then ``undo`` moves it back.
- ``no_traffic_holds``: a rollout without load holds its first step, saying why.
- ``restart_resumes``: the controller killed and one of two gateways restarted mid-rollout;
  the rollout resumes at the step it had and is promoted.

``reports/chaos.json``: ``scenarios.<name>.{passed, failed_requests, total_requests,
seconds_to_decision, limit_seconds, detail}``. ``--quick`` shortens every phase (what
``make test`` runs on the tiny model).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from homefeed.feed.v1 import feed_pb2
from homefeed.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from contract.paths import Paths
from services.gateway.admission import retry_after_s
from tools.mesh import (
    BACKENDS,
    CONTROLLER,
    GATEWAY,
    Mesh,
    MeshConfig,
    RestartPolicy,
    check_serving,
)
from tools.rollout import RolloutClient, detail

log = logging.getLogger(__name__)

GET_FEED = "/homefeed.feed.v1.FeedService/GetFeed"
FEED_SERVICE = "homefeed.feed.v1.FeedService"
SHED = "RESOURCE_EXHAUSTED"
CANARY_SCENARIOS = ("canary_errors", "canary_slow", "canary_bad_scores", "canary_good",
                    "no_traffic_holds", "restart_resumes")  # fmt: skip
SCENARIOS = (
    "kill_retrieval",
    "kill_features",
    "kill_ranking",
    "restart_recovers",
    "overload",
    "admin_unauthenticated",
    "breaker_poison",
    "drain",
    *CANARY_SCENARIOS,
)
CANARY_FAULTS = {
    "canary_errors": "error_rate=0.2",
    "canary_slow": "delay_ms=50",
    "canary_bad_scores": "scores=shuffle",
}


@dataclass(frozen=True)
class Timing:
    """How long each phase runs (seconds); ``quick`` is what ``make test`` uses."""

    steady_s: float = 3.0  # load before the fault
    after_s: float = 8.0  # load after recovery
    capacity_s: float = 6.0
    overload_s: float = 30.0
    poison_s: float = 8.0
    restart_timeout_s: float = 120.0
    canary_interval_s: float = 6.0  # the rollouts' analysis window
    canary_threshold: int = 2
    canary_min_feeds: int = 10  # per arm per window (5 % of ~100 feeds/s x 6 s is ~30)

    @classmethod
    def quick(cls) -> Timing:
        return cls(
            steady_s=1.5,
            after_s=4.0,
            capacity_s=3.0,
            overload_s=6.0,
            poison_s=3.0,
            canary_interval_s=3.0,
        )


@dataclass
class Answer:
    start: float  # wall clock (time.time), comparable with the services' log timestamps
    end: float
    code: str
    degraded: tuple[int, ...] = ()
    hostile: bool = False


@dataclass
class Outcome:
    passed: bool
    failed_requests: int
    total_requests: int
    seconds_to_decision: float | None
    limit_seconds: float | None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "failed_requests": self.failed_requests,
            "total_requests": self.total_requests,
            "seconds_to_decision": _round(self.seconds_to_decision),
            "limit_seconds": self.limit_seconds,
            "detail": self.detail,
        }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


# --- load ----------------------------------------------------------------------------------


class Load:
    """``concurrency`` client threads in a closed loop against ``target``; a refused request
    (RESOURCE_EXHAUSTED) waits for the retry-after hint as a well-behaved client would."""

    def __init__(
        self,
        target: str,
        payloads: Sequence[bytes],
        concurrency: int,
        timeout_s: float = 1.0,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._channel = grpc.insecure_channel(target, options=list(options))
        self._call = self._channel.unary_unary(
            GET_FEED,
            request_serializer=None,
            response_deserializer=feed_pb2.GetFeedResponse.FromString,
        )
        self._payloads = itertools.cycle(payloads)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timeout_s = timeout_s
        self.answers: list[Answer] = []
        self._threads = [
            threading.Thread(target=self._work, name=f"load-{i}", daemon=True)
            for i in range(concurrency)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Answer]:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self._channel.close()
        return self.answers

    def _work(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                payload = next(self._payloads)
            answer, wait_s = send(self._call, payload, self._timeout_s)
            with self._lock:
                self.answers.append(answer)
            if wait_s:
                self._stop.wait(wait_s)


def send(
    call: grpc.UnaryUnaryMultiCallable, payload: bytes, timeout_s: float, hostile: bool = False
) -> tuple[Answer, float]:
    """One request: its answer and how long the server asked to wait before the next."""
    start = time.time()
    try:
        response = call(payload, timeout=timeout_s)
    except grpc.RpcError as err:
        code = err.code().name
        return Answer(start, time.time(), code, hostile=hostile), retry_after_s(err)
    return Answer(start, time.time(), "OK", tuple(response.degraded), hostile), 0.0


def failed(answers: Sequence[Answer]) -> list[Answer]:
    """Answers that are neither a feed nor a refusal at the door."""
    return [a for a in answers if a.code not in ("OK", SHED)]


def p99_ms(answers: Sequence[Answer]) -> float | None:
    if not answers:
        return None
    return float(np.percentile([(a.end - a.start) * 1e3 for a in answers], 99))


def first_full_after(answers: Sequence[Answer], t: float) -> float | None:
    """When the first full (non-degraded) feed requested after ``t`` was answered."""
    full = [a.end for a in answers if a.start >= t and a.code == "OK" and not a.degraded]
    return min(full) if full else None


# --- the mesh ------------------------------------------------------------------------------


@dataclass
class Chaos:
    home: Path
    dataset: str
    timing: Timing
    payloads: list[bytes]
    model: str = "champion"
    concurrency: int = 4

    @contextlib.contextmanager
    def mesh(
        self, canary_env: dict[str, str] | None = None, env: dict[str, str] | None = None
    ) -> Iterator[Mesh]:
        """A fresh supervised mesh; its rollout state in a scratch file (no rollout left
        by an earlier scenario resumes), its canary with ``canary_env``."""
        scratch = tempfile.mkdtemp(prefix="chaos-rollout-")
        cfg = MeshConfig(
            home=self.home,
            dataset=self.dataset,
            model=self.model,
            canary_env=canary_env or {},
            extra_env={"HOMEFEED_ROLLOUT_STATE_FILE": f"{scratch}/state.json", **(env or {})},
        )
        try:
            with Mesh.start(cfg) as mesh:
                mesh.supervise(RestartPolicy(second_backoff_s=0.5, poll_s=0.05))
                yield mesh
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def load(self, mesh: Mesh, concurrency: int | None = None, **kwargs: Any) -> Load:
        return Load(
            mesh.addresses[GATEWAY], self.payloads, concurrency or self.concurrency, **kwargs
        )

    def balanced_load(self, mesh: Mesh, second: str) -> Load:
        """Load over the mesh's gateway and ``second``, round robin with client-side health
        checking (a draining gateway is left at once)."""
        target = f"ipv4:{mesh.addresses[GATEWAY]},{second}"
        config = json.dumps(
            {
                "loadBalancingConfig": [{"round_robin": {}}],
                "healthCheckConfig": {"serviceName": FEED_SERVICE},
            }
        )
        options = [("grpc.service_config", config), ("grpc.enable_retries", 1)]
        return Load(target, self.payloads, self.concurrency, options=options)

    # --- scenarios ---------------------------------------------------------------------------

    def kill(self, name: str) -> Outcome:
        """kill -9 ``name`` under load: no failed feed, its breaker open within 1 s, restarted
        by the supervisor, full feeds within 5 s of its readiness."""
        t = self.timing
        with self.mesh() as mesh, self.load(mesh) as load:
            time.sleep(t.steady_s)
            killed_at = time.time()
            before = _signal(mesh, name, signal.SIGKILL)
            ready_at = _await_restart(mesh, name, t.restart_timeout_s, before)
            time.sleep(t.after_s)
            answers = load.stop()
            opened = breaker_events(mesh.logs[GATEWAY], killed_at, name)
        open_s = opened[0] - killed_at if opened else None
        full_at = first_full_after(answers, ready_at) if ready_at else None
        recover_s = full_at - ready_at if full_at and ready_at else None
        bad = failed(answers)
        passed = (
            not bad
            and open_s is not None
            and open_s <= 1.0
            and recover_s is not None
            and recover_s <= 5.0
        )
        return Outcome(
            passed,
            len(bad),
            len(answers),
            open_s,
            1.0,
            {
                "breaker_open_s": _round(open_s),
                "restarted_ready_s": _round(ready_at - killed_at if ready_at else None),
                "full_feeds_after_ready_s": _round(recover_s),
                "full_feeds_limit_s": 5.0,
                "degraded_feeds": sum(1 for a in answers if a.degraded),
                "failed_codes": _codes(bad),
            },
        )

    def restart_recovers(self) -> Outcome:
        outcome = self.kill("features")
        recover = outcome.detail["full_feeds_after_ready_s"]
        outcome.seconds_to_decision, outcome.limit_seconds = recover, 5.0
        outcome.passed = outcome.failed_requests == 0 and recover is not None and recover <= 5
        return outcome

    def overload(self) -> Outcome:
        """Capacity at the normal concurrency, then 4x that offered open-loop."""
        t = self.timing
        with self.mesh() as mesh:
            with self.load(mesh) as normal:
                time.sleep(t.capacity_s)
                normal_answers = normal.stop()
            ok = [a for a in normal_answers if a.code == "OK"]
            capacity = len(ok) / t.capacity_s
            normal_p99 = p99_ms(ok)
            answers = open_loop(mesh.addresses[GATEWAY], self.payloads, 4 * capacity, t.overload_s)
            check_serving(mesh.addresses[GATEWAY], timeout=10)
            # healthy after: a full feed within 10 s (a breaker opened by the overload's
            # slow calls waits out its open period, or its hop's recovery, first)
            after_answers: list[Answer] = []
            with self.load(mesh, concurrency=1) as after:
                deadline = time.monotonic() + 10.0
                while time.monotonic() < deadline and not any(
                    a.code == "OK" and not a.degraded for a in list(after.answers)
                ):
                    time.sleep(0.2)
                after_answers = after.stop()
        admitted = [a for a in answers if a.code == "OK"]
        shed = [a for a in answers if a.code == SHED]
        bad = failed(answers)
        admitted_p99 = p99_ms(admitted)
        shed_p99 = p99_ms(shed)
        healthy = any(a.code == "OK" and not a.degraded for a in after_answers)
        passed = bool(
            not bad
            and admitted_p99 is not None
            and normal_p99 is not None
            and admitted_p99 <= 2 * normal_p99
            and (shed_p99 is None or shed_p99 < 5.0)
            and healthy
        )
        return Outcome(
            passed,
            len(bad),
            len(answers),
            None,
            None,
            {
                "capacity_feeds_per_s": round(capacity, 1),
                "offered_per_s": round(4 * capacity, 1),
                "normal_p99_ms": _round(normal_p99, 2),
                "admitted_p99_ms": _round(admitted_p99, 2),
                "admitted": len(admitted),
                "admitted_degraded": sum(1 for a in admitted if a.degraded),
                "shed": len(shed),
                "shed_p99_ms": _round(shed_p99, 2),
                "shed_max_ms": _round(
                    max(((a.end - a.start) * 1e3 for a in shed), default=None), 2
                ),
                "failed_codes": _codes(bad),
                "healthy_after": healthy,
            },
        )

    def admin_unauthenticated(self) -> Outcome:
        """Reload refused without or with a wrong token and on a ranking with no token; a
        bundle of another feature schema refused while the old model keeps serving."""
        checks: dict[str, str] = {}
        with self.mesh() as mesh, tempfile.TemporaryDirectory() as tmp:
            ranking = ranking_pb2_grpc.RankingServiceStub(
                grpc.insecure_channel(mesh.admin_addresses["ranking"])
            )
            token = mesh.admin_token
            request = ranking_pb2.ReloadRequest(target="champion")
            attempts: dict[str, tuple[tuple[str, str], ...]] = {
                "no_token": (),
                "wrong_token": (("authorization", "Bearer not-the-token"),),
                "not_bearer": (("authorization", token),),
            }
            for label, metadata in attempts.items():
                checks[label] = _reload_code(ranking, request, metadata)
            bundle = _served_bundle(self.home, mesh.model, Path(tmp))
            other = other_schema_bundle(bundle, Path(tmp) / "other")
            env = {"HOMEFEED_RANKING_BUNDLE_DIR": str(bundle)}
            with _ranking_process(self.home, self.dataset, env, token=None) as address:
                stub = ranking_pb2_grpc.RankingServiceStub(grpc.insecure_channel(address))
                checks["no_token_configured"] = _code(
                    lambda: stub.Reload(
                        ranking_pb2.ReloadRequest(target=str(bundle)),
                        metadata=(("authorization", f"Bearer {token}"),),
                    )
                )
            with _ranking_process(self.home, self.dataset, env, token=token) as address:
                stub = ranking_pb2_grpc.RankingServiceStub(grpc.insecure_channel(address))
                auth = (("authorization", f"Bearer {token}"),)
                checks["other_schema"] = _code(
                    lambda: stub.Reload(ranking_pb2.ReloadRequest(target=str(other)), metadata=auth)
                )
                checks["same_schema_still_reloads"] = _code(
                    lambda: stub.Reload(
                        ranking_pb2.ReloadRequest(target=str(bundle)), metadata=auth
                    )
                )
            with self.load(mesh, concurrency=1) as load:
                time.sleep(1.0)
                answers = load.stop()
        expected = {
            "no_token": "UNAUTHENTICATED",
            "wrong_token": "UNAUTHENTICATED",
            "not_bearer": "UNAUTHENTICATED",
            "no_token_configured": "PERMISSION_DENIED",
            "other_schema": "FAILED_PRECONDITION",
            "same_schema_still_reloads": "OK",
        }
        full = [a for a in answers if a.code == "OK" and not a.degraded]
        passed = checks == expected and len(full) == len(answers) > 0
        return Outcome(
            passed,
            sum(checks[k] != v for k, v in expected.items()),
            len(expected),
            None,
            None,
            {"codes": checks, "expected": expected, "full_feeds_after": len(full)},
        )

    def breaker_poison(self) -> Outcome:
        t = self.timing
        with self.mesh() as mesh, self.load(mesh, concurrency=2) as load:
            started = time.time()
            hostile = poison(mesh.addresses[GATEWAY], t.poison_s)
            answers = load.stop()
            opened = breaker_events(mesh.logs[GATEWAY], started)
        allowed = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
        wrong = [a for a in hostile if a.code not in allowed]
        degraded = [a for a in answers if a.degraded]
        bad = failed(answers)
        passed = not wrong and not degraded and not bad and not opened and len(answers) > 0
        return Outcome(
            passed,
            len(bad) + len(wrong),
            len(answers) + len(hostile),
            None,
            None,
            {
                "hostile_requests": len(hostile),
                "hostile_codes": _codes(hostile),
                "normal_feeds": len(answers),
                "normal_degraded": len(degraded),
                "breaker_openings": len(opened),
            },
        )

    def drain(self) -> Outcome:
        """SIGTERM under load: the gateway (alone, then one of two) and each backend."""
        detail: dict[str, Any] = {}
        failures = total = 0
        with self.mesh() as mesh:
            lame = MeshConfig.lame_duck_seconds  # the mesh's default, which it runs with
            # one gateway: what was in flight or arrived in the lame-duck period is answered
            with self.load(mesh) as load:
                time.sleep(self.timing.steady_s)
                termed = time.time()
                before = _signal(mesh, GATEWAY, signal.SIGTERM)
                time.sleep(lame + 1.0)
                answers = load.stop()
            graced = [a for a in answers if a.start <= termed + lame]
            bad = failed(graced)
            detail["gateway_alone"] = {"in_grace": len(graced), "failed": len(bad)}
            failures, total = failures + len(bad), total + len(graced)
            _await_restart(mesh, GATEWAY, self.timing.restart_timeout_s, before)
            # two gateways behind the client: nothing fails at all
            with (
                _second_gateway(mesh, self.dataset) as second,
                self.balanced_load(mesh, second) as load,
            ):
                time.sleep(self.timing.steady_s)
                before = _signal(mesh, GATEWAY, signal.SIGTERM)
                time.sleep(lame + 2.0)
                answers = load.stop()
            bad = failed(answers)
            detail["two_gateways"] = {"requests": len(answers), "failed": len(bad),
                                      "codes": _codes(bad)}  # fmt: skip
            failures, total = failures + len(bad), total + len(answers)
            _await_restart(mesh, GATEWAY, self.timing.restart_timeout_s, before)
            # each backend: the gateway serves its fallback, nothing fails
            for name in BACKENDS:
                with self.load(mesh) as load:
                    time.sleep(self.timing.steady_s / 2)
                    before = _signal(mesh, name, signal.SIGTERM)
                    time.sleep(lame + 1.0)
                    answers = load.stop()
                bad = failed(answers)
                detail[name] = {"requests": len(answers), "failed": len(bad),
                                "degraded": sum(1 for a in answers if a.degraded)}  # fmt: skip
                failures, total = failures + len(bad), total + len(answers)
                _await_restart(mesh, name, self.timing.restart_timeout_s, before)
        return Outcome(failures == 0 and total > 0, failures, total, None, None, detail)

    # --- canary releases -------------------------------------------------------------------

    def _release(self, mesh: Mesh) -> str:
        """A release to roll out: a copy of the served bundle registered as a new version
        (the same model: a faultless canary of it must pass every check)."""
        from contract.registry import Registry, default_tracking_uri

        with tempfile.TemporaryDirectory() as tmp:
            bundle = _served_bundle(self.home, mesh.model, Path(tmp))
            registry = Registry(default_tracking_uri(Paths(self.home)))
            version = registry.register(bundle, alias=None, params={"purpose": "chaos release"})
        return str(version)

    def _start_rollout(self, mesh: Mesh, version: str, **overrides: Any) -> RolloutClient:
        t = self.timing
        client = RolloutClient(mesh.admin_addresses[CONTROLLER], mesh.admin_token)
        client.start(
            version,
            steps=overrides.get("steps", (5, 25, 50, 100)),
            interval_s=t.canary_interval_s,
            threshold=t.canary_threshold,
            mirror_share=0.2,
            min_feeds=t.canary_min_feeds,
        )
        return client

    def _rollout_timeout(self, steps: int = 4) -> float:
        t = self.timing
        return t.restart_timeout_s + (steps + t.canary_threshold + 4) * (t.canary_interval_s + 1)

    def _report(self, name: str, rollout: dict[str, Any]) -> None:
        """``reports/rollouts/<scenario>/rollout.md`` and its PNG timeline."""
        from tools.rollout_report import write_report

        write_report(rollout, Paths(self.home).reports / "rollouts" / name)

    def canary(self, name: str) -> Outcome:
        """A faulty canary under load: rolled back within interval x (threshold + 1)."""
        t = self.timing
        with self.mesh({"HOMEFEED_RANKING_FAULTS": CANARY_FAULTS[name]}) as mesh:
            version = self._release(mesh)
            with self.load(mesh) as load:
                time.sleep(t.steady_s)
                client = self._start_rollout(mesh, version)
                try:
                    status = client.wait(("PROMOTED", "FAILED", "ABORTED"), self._rollout_timeout())
                finally:
                    client.close()
                answers = load.stop()
        rollout = detail(status)
        self._report(name, rollout)
        decided = _between(rollout, "canary_ready", ("rolled_back", "promoted"))
        limit = t.canary_interval_s * (t.canary_threshold + 1)
        bad = failed(answers)
        share = len(bad) / max(len(answers), 1)
        passed = (
            status.phase == "FAILED" and decided is not None and decided <= limit and share < 0.01
        )
        return Outcome(
            passed, len(bad), len(answers), decided, limit, _rollout_detail(rollout, answers)
        )

    def canary_errors(self) -> Outcome:
        return self.canary("canary_errors")

    def canary_slow(self) -> Outcome:
        return self.canary("canary_slow")

    def canary_bad_scores(self) -> Outcome:
        return self.canary("canary_bad_scores")

    def canary_good(self) -> Outcome:
        """A good release: promoted (alias moved, stable serves it), then undone."""
        t = self.timing
        with self.mesh() as mesh:
            version = self._release(mesh)
            with self.load(mesh) as load:
                time.sleep(t.steady_s)
                client = self._start_rollout(mesh, version)
                try:
                    status = client.wait(("PROMOTED", "FAILED", "ABORTED"), self._rollout_timeout())
                    promoted_alias = _champion(self.home)
                    served_after = _served_versions(mesh, self.payloads)
                    undo_started = time.time()
                    undone = ""
                    if status.phase == "PROMOTED":  # else there is nothing to undo
                        undone = client.undo("chaos: restore the previous champion").phase
                    undo_s = time.time() - undo_started
                    served_after_undo = _served_versions(mesh, self.payloads)
                finally:
                    client.close()
                answers = load.stop()
        rollout = detail(status)
        self._report("canary_good", rollout)
        decided = _between(rollout, "canary_ready", ("promoted", "rolled_back"))
        minimum = t.canary_interval_s * len(rollout["spec"]["steps"])
        bad = failed(answers)
        passed = (
            status.phase == "PROMOTED"
            and decided is not None
            and decided >= minimum
            and promoted_alias == version
            and served_after == {version}
            and undone == "UNDONE"
            and served_after_undo == {mesh.model}
            and len(bad) / max(len(answers), 1) < 0.01
        )
        extra = {
            "release": version,
            "alias_after_promotion": promoted_alias,
            "stable_serves_after_promotion": sorted(served_after),
            "undo_s": _round(undo_s),
            "stable_serves_after_undo": sorted(served_after_undo),
            "min_promotion_s": minimum,
        }
        return Outcome(
            passed,
            len(bad),
            len(answers),
            decided,
            minimum,
            {**_rollout_detail(rollout, answers), **extra},
        )

    def no_traffic_holds(self) -> Outcome:
        """No load: the first step holds, the status says why, nothing fails or promotes."""
        t = self.timing
        with self.mesh() as mesh:
            version = self._release(mesh)
            client = self._start_rollout(mesh, version)
            try:
                client.wait(("PROGRESSING", "FAILED"), t.restart_timeout_s)
                time.sleep(3 * (t.canary_interval_s + 1) + 1)
                status = client.status()
                client.abort("chaos: end of no_traffic_holds")
            finally:
                client.close()
        rollout = detail(status)
        holds = [w for w in rollout.get("windows", []) if w["decision"] == "hold"]
        passed = (
            status.phase == "PROGRESSING"
            and status.weight == rollout["spec"]["steps"][0]
            and status.failed_checks == 0
            and len(holds) >= 2
            and "too little traffic" in status.message
        )
        return Outcome(
            passed,
            0,
            0,
            None,
            None,
            {
                "phase": status.phase,
                "weight": status.weight,
                "windows_held": len(holds),
                "message": status.message,
            },
        )

    def restart_resumes(self) -> Outcome:
        """Mid-rollout, kill -9 the controller and SIGTERM one of two gateways (both report
        to the controller): the rollout resumes at its step and is promoted."""
        t = self.timing
        # what is rehearsed is resuming, not the latency checks: with two gateways, a
        # canary and the load on 2 cores, a p95 can wander past 1.5x + 10 ms by chance
        lenient = {
            "HOMEFEED_ROLLOUT_LATENCY_SLACK_MS": "1000",
            "HOMEFEED_ROLLOUT_FEED_LATENCY_SLACK_MS": "1000",
        }
        with self.mesh(env=lenient) as mesh:
            version = self._release(mesh)
            with (
                _second_gateway(mesh, self.dataset) as second,
                self.balanced_load(mesh, second) as load,
            ):
                time.sleep(t.steady_s)
                client = self._start_rollout(mesh, version)
                try:
                    deadline = time.monotonic() + self._rollout_timeout()
                    while time.monotonic() < deadline:
                        now = client.status()
                        if now.step >= 1 or now.phase not in ("STARTING", "PROGRESSING"):
                            break
                        time.sleep(0.2)
                    before = client.status()
                    restarts = _signal(mesh, CONTROLLER, signal.SIGKILL)
                    gateway_restarts = _signal(mesh, GATEWAY, signal.SIGTERM)
                    _await_restart(mesh, CONTROLLER, t.restart_timeout_s, restarts)
                    _await_restart(mesh, GATEWAY, t.restart_timeout_s, gateway_restarts)
                    client.close()
                    client = RolloutClient(mesh.admin_addresses[CONTROLLER], mesh.admin_token)
                    after = client.status()
                    status = client.wait(("PROMOTED", "FAILED", "ABORTED"), self._rollout_timeout())
                    if status.phase == "PROMOTED":
                        client.undo("chaos: restore the previous champion")
                finally:
                    client.close()
                answers = load.stop()
        rollout = detail(status)
        resumed = [e for e in rollout["events"] if e["event"] == "controller_resumed"]
        bad = failed(answers)
        passed = (
            after.step >= before.step >= 1
            and after.phase == "PROGRESSING"
            and bool(resumed)
            and status.phase == "PROMOTED"
            and not bad
        )
        return Outcome(
            passed,
            len(bad),
            len(answers),
            None,
            None,
            {
                "step_before": before.step,
                "weight_before": before.weight,
                "step_after_restart": after.step,
                "weight_after_restart": after.weight,
                "resumed_events": len(resumed),
                "final_phase": status.phase,
                "replicas_in_last_window": (rollout.get("windows") or [{}])[-1].get("replicas"),
                "failed_codes": _codes(bad),
            },
        )

    def run(self, name: str) -> Outcome:
        if name.startswith("kill_"):
            return self.kill(name.removeprefix("kill_"))
        method: Callable[[], Outcome] = getattr(self, name)
        return method()


# --- helpers -------------------------------------------------------------------------------


def _stamp(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _between(rollout: dict[str, Any], start: str, ends: Sequence[str]) -> float | None:
    """Seconds from the rollout's first ``start`` event to its first of ``ends``."""
    events = rollout.get("events", [])
    t0 = next((_stamp(e["at"]) for e in events if e["event"] == start), None)
    t1 = next((_stamp(e["at"]) for e in events if e["event"] in ends), None)
    return None if t0 is None or t1 is None else t1 - t0


def _rollout_detail(rollout: dict[str, Any], answers: Sequence[Answer]) -> dict[str, Any]:
    windows = rollout.get("windows", [])
    return {
        "phase": rollout.get("phase"),
        "reason": str(rollout.get("reason", ""))[:300],
        "windows": [
            {
                "weight": w["weight"],
                "decision": w["decision"],
                "failed": [c["name"] for c in w.get("checks", []) if c["passed"] is False],
                "feeds": [w["arms"]["stable"]["feeds"], w["arms"]["canary"]["feeds"]],
            }
            for w in windows
        ],
        "degraded_feeds": sum(1 for a in answers if a.degraded),
    }


def _champion(home: Path) -> str:
    from contract.bundle import ALIAS_CHAMPION
    from contract.registry import Registry, default_tracking_uri

    return str(Registry(default_tracking_uri(Paths(home))).get_version(ALIAS_CHAMPION))


def _served_versions(mesh: Mesh, payloads: Sequence[bytes], n: int = 20) -> set[str]:
    """The model versions that ranked ``n`` feeds (stable arm: no rollout is in progress)."""
    seen: set[str] = set()
    with grpc.insecure_channel(mesh.addresses[GATEWAY]) as channel:
        call = channel.unary_unary(
            GET_FEED,
            request_serializer=None,
            response_deserializer=feed_pb2.GetFeedResponse.FromString,
        )
        for payload in list(payloads)[:n]:
            for _ in range(50):  # the load around it fills the door: wait as told, retry
                try:
                    response = call(payload, timeout=5)
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        break
                    time.sleep(retry_after_s(err) or 0.05)
                    continue
                if response.model_version and not response.degraded:
                    seen.add(response.model_version)
                break
    return seen


def _codes(answers: Sequence[Answer]) -> dict[str, int]:
    out: dict[str, int] = {}
    for a in answers:
        out[a.code] = out.get(a.code, 0) + 1
    return dict(sorted(out.items()))


def _reload_code(
    stub: ranking_pb2_grpc.RankingServiceStub,
    request: ranking_pb2.ReloadRequest,
    metadata: tuple[tuple[str, str], ...],
) -> str:
    return _code(lambda: stub.Reload(request, metadata=metadata, timeout=60))


def _code(call: Callable[[], object]) -> str:
    try:
        call()
    except grpc.RpcError as err:
        return str(err.code().name)
    return "OK"


def _signal(mesh: Mesh, name: str, signum: int) -> int:
    """Send ``signum`` to ``name``; returns its restart count before, for ``_await_restart``
    (read first: a fast restart must not be mistaken for none)."""
    before = mesh.restarts.get(name, 0)
    os.kill(mesh.pids[name], signum)
    return before


def _await_restart(mesh: Mesh, name: str, timeout: float, before: int) -> float | None:
    """Wall time when the supervisor had ``name`` serving again after its restart count was
    ``before`` (None: not in time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mesh.restarts.get(name, 0) > before:
            return time.time()
        time.sleep(0.02)
    return None


def breaker_events(log_path: Path, since: float, downstream: str | None = None) -> list[float]:
    """Wall times of the gateway's "closed -> open" breaker transitions after ``since``."""
    out = []
    with contextlib.suppress(FileNotFoundError), open(log_path, errors="replace") as f:
        for line in f:
            if '"circuit breaker' not in line:
                continue
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("state") != "open":
                    continue
                if downstream is not None and record.get("downstream") != downstream:
                    continue
                ts = datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()
                if ts >= since:
                    out.append(ts)
    return sorted(out)


def open_loop(target: str, payloads: Sequence[bytes], rate: float, seconds: float) -> list[Answer]:
    """``rate`` requests per second for ``seconds``, each sent on time whatever the answers."""
    answers: list[Answer] = []
    lock = threading.Lock()
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            GET_FEED, request_serializer=None,
            response_deserializer=feed_pb2.GetFeedResponse.FromString,
        )  # fmt: skip
        pending = []
        start = time.monotonic()
        for i, payload in enumerate(itertools.cycle(payloads)):
            due = start + i / rate
            if due - start > seconds:
                break
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent = time.time()
            future = call.future(payload, timeout=1.0)

            def done(f: grpc.Future, sent: float = sent) -> None:
                try:
                    response = f.result()
                    answer = Answer(sent, time.time(), "OK", tuple(response.degraded))
                except grpc.RpcError as err:
                    answer = Answer(sent, time.time(), err.code().name)
                with lock:
                    answers.append(answer)

            future.add_done_callback(done)
            pending.append(future)
        for future in pending:
            with contextlib.suppress(Exception):
                future.result(timeout=5)
        time.sleep(0.1)
    return answers


def hostile_payloads() -> list[bytes]:
    """What an attacker or a broken client sends: each must be refused at the door."""
    ok = feed_pb2.GetFeedRequest(user_id=1, page_size=10, surface=1)
    out = []
    for request_id in ("r\u00e9sum\u00e9", "a\nb", "x\x00y", "\u202e", "a b", "x" * 200):
        bad = feed_pb2.GetFeedRequest()
        bad.CopyFrom(ok)
        bad.request_id = request_id
        out.append(bad.SerializeToString())
    for name, value in (("page_size", 0), ("page_size", 10_000), ("surface", 99)):
        bad = feed_pb2.GetFeedRequest()
        bad.CopyFrom(ok)
        setattr(bad, name, value)
        out.append(bad.SerializeToString())
    big = feed_pb2.GetFeedRequest()
    big.CopyFrom(ok)
    big.context.country = "X" * 100_000  # above the gateway's 64 KB message limit
    out.append(big.SerializeToString())
    long_device = feed_pb2.GetFeedRequest()
    long_device.CopyFrom(ok)
    long_device.context.device = "d" * 30_000
    out.append(long_device.SerializeToString())
    carts = feed_pb2.GetFeedRequest()
    carts.CopyFrom(ok)
    carts.cart_item_ids.extend(range(500))
    out.append(carts.SerializeToString())
    number = feed_pb2.GetFeedRequest.DESCRIPTOR.fields_by_name["request_id"].number
    out += [b"\xff\xff\xff\xff", bytes([(number << 3) | 2, 2, 0xFF, 0xFE]), b"\x0a\x7f"]
    return out


def poison(target: str, seconds: float, burst: int = 12, pause_s: float = 0.05) -> list[Answer]:
    """Bursts of hostile requests for ``seconds``."""
    answers = []
    payloads = hostile_payloads()
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(GET_FEED, request_serializer=None)
        end = time.monotonic() + seconds
        cycle = itertools.cycle(payloads)
        while time.monotonic() < end:
            for _ in range(burst):
                answers.append(send(call, next(cycle), 1.0, hostile=True)[0])
            time.sleep(pause_s)
    return answers


def _served_bundle(home: Path, model: str, dest: Path) -> Path:
    """A copy of the bundle the mesh serves."""
    if "/" in model:
        return Path(model)
    from contract.registry import Registry, default_tracking_uri

    registry = Registry(default_tracking_uri(Paths(home)))
    cached = registry.load(model, dest / "cache")
    copy = dest / "served"
    shutil.copytree(cached, copy)
    return copy


def other_schema_bundle(bundle: Path, dest: Path) -> Path:
    """A copy of ``bundle`` that says it was built for another feature schema (its last
    column renamed), consistent in itself: it verifies, it only does not fit this mesh."""
    from contract.bundle import BUNDLE_MANIFEST, FEATURE_SCHEMA, write_manifest
    from contract.features import FeatureSchema

    shutil.copytree(bundle, dest)
    manifest = json.loads((dest / BUNDLE_MANIFEST).read_text())
    schema = json.loads((dest / FEATURE_SCHEMA).read_text())
    schema["names"][-1] += "_v2"
    other = FeatureSchema(tuple(schema["names"]), tuple(schema["dtypes"]))
    (dest / FEATURE_SCHEMA).write_text(json.dumps(other.to_dict()))
    (dest / BUNDLE_MANIFEST).unlink()
    write_manifest(
        dest,
        version=str(manifest["version"]) + "-other-schema",
        data_snapshot=str(manifest["data_snapshot"]),
        feature_schema_hash=other.hash,
        metrics=manifest.get("metrics", {}),
    )
    return dest


@contextlib.contextmanager
def _service_process(
    name: str, env_extra: dict[str, str], home: Path, dataset: str
) -> Iterator[str]:
    """``python -m services.<name>`` on a free port: yields its address (its admin address
    when it serves admin RPCs apart)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(f"HOMEFEED_{name.upper()}_")}
    env.pop("HOMEFEED_ADMIN_TOKEN", None)
    env.update(
        {
            "HOMEFEED_HOME": str(home),
            "HOMEFEED_DATASET": dataset,
            f"HOMEFEED_{name.upper()}_PORT": "0",
            f"HOMEFEED_{name.upper()}_LAME_DUCK_SECONDS": "0",
            **env_extra,
        }
    )
    log_file = tempfile.TemporaryFile()  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(
        [sys.executable, "-m", f"services.{name}"],
        stdout=subprocess.PIPE,
        stderr=log_file,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        admin = None
        if line.startswith("HOMEFEED_ADMIN port="):  # ranking: its admin port comes first
            admin = f"127.0.0.1:{int(line.split('=', 1)[1])}"
            line = proc.stdout.readline()
        if not line.startswith("HOMEFEED_READY port="):
            log_file.seek(0)
            raise RuntimeError(f"{name} did not start: {log_file.read()[-2000:]!r}")
        address = f"127.0.0.1:{int(line.split('=', 1)[1])}"
        check_serving(address, timeout=10)
        yield admin or address
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_file.close()


def _ranking_process(
    home: Path, dataset: str, env: dict[str, str], token: str | None
) -> contextlib.AbstractContextManager[str]:
    extra = dict(env)
    if token is not None:
        extra["HOMEFEED_ADMIN_TOKEN"] = token
    return _service_process("ranking", extra, home, dataset)


def _second_gateway(mesh: Mesh, dataset: str) -> contextlib.AbstractContextManager[str]:
    extra = {f"HOMEFEED_{b.upper()}_ADDR": mesh.addresses[b] for b in BACKENDS}
    extra["HOMEFEED_MODEL"] = mesh.model
    if CONTROLLER in mesh.addresses:  # it reports to the controller too: a second replica
        extra["HOMEFEED_ROLLOUT_ADDR"] = mesh.addresses[CONTROLLER]
        extra["HOMEFEED_GATEWAY_REPLICA"] = "second-gateway"
    return _service_process(GATEWAY, extra, mesh.home, dataset)


# --- main ----------------------------------------------------------------------------------


def run(
    home: Path,
    dataset: str,
    scenarios: Sequence[str],
    timing: Timing,
    payloads: list[bytes],
    model: str = "champion",
    retries: int = 0,
) -> dict[str, Any]:
    """Each scenario in turn. One that *raised* (its mesh did not come up, an RPC timed out:
    the harness failed, not the property it checks) is run again up to ``retries`` times; a
    scenario that ran and failed its check is never re-run. What the earlier attempts raised
    stays in the result (``detail.earlier_errors``)."""
    chaos = Chaos(home, dataset, timing, payloads, model)
    results: dict[str, Any] = {}
    for name in scenarios:
        started = time.perf_counter()
        errors: list[str] = []
        while True:
            log.info("scenario %s", name)
            try:
                outcome = chaos.run(name)
                break
            except Exception as err:  # one broken scenario must not hide the others' results
                log.exception("scenario %s raised", name)
                errors.append(f"{type(err).__name__}: {err}"[:2000])
                if len(errors) > retries:
                    outcome = Outcome(False, 0, 0, None, None, {"error": errors.pop()})
                    break
        if errors:
            outcome.detail["earlier_errors"] = errors
        result = outcome.to_json()
        result["wall_s"] = round(time.perf_counter() - started, 1)
        results[name] = result
        log.info("scenario %s: %s", name, "passed" if outcome.passed else "FAILED")
    return {"scenarios": results, "passed": sum(r["passed"] for r in results.values())}


def format_table(report: dict[str, Any]) -> str:
    rows = [
        f"{'scenario':<24}{'passed':>8}{'failed':>8}{'total':>8}{'decision s':>12}{'wall s':>8}"
        "  detail"
    ]
    for name, r in report["scenarios"].items():
        decided = "-" if r["seconds_to_decision"] is None else f"{r['seconds_to_decision']:.2f}"
        detail = json.dumps(r["detail"], separators=(",", ":"))
        rows.append(
            f"{name:<24}{'yes' if r['passed'] else 'NO':>8}{r['failed_requests']:>8}"
            f"{r['total_requests']:>8}{decided:>12}{r.get('wall_s', 0):>8.1f}  {detail[:150]}"
        )
    rows.append(f"{report['passed']}/{len(report['scenarios'])} scenarios passed")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    from tools.bench import BenchConfig, load_requests

    parser = argparse.ArgumentParser(prog="python -m tools.chaos", description=__doc__)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--preset", default="small")
    parser.add_argument("--quick", action="store_true", help="short phases (make test)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    names = [n for n in args.scenarios.split(",") if n]
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    paths = Paths.from_env()
    config = BenchConfig(home=paths.home, preset=args.preset, requests=512)
    os.environ.setdefault("HOMEFEED_DATASET", config.dataset)
    report = run(
        paths.home,
        config.dataset,
        names,
        Timing.quick() if args.quick else Timing(),
        load_requests(config),
    )
    out = args.out or paths.reports / "chaos.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"-> {out}")
    return 0 if report["passed"] == len(names) else 1


if __name__ == "__main__":
    raise SystemExit(main())
