"""The rollout controller: off the request path, one leader at a time, it moves a canary
release through its steps.

Every gateway replica reports its per-arm counters (``ReportRequest``) every
``report_every`` and gets the assignment back (weight, salt, canary address): the
controller is the only one that reads or writes the rollout state, and a replica that cannot
reach it keeps the weights it has.

A rollout, phase by phase (``state.py``):

- ``STARTING``: waits for the canary ranking deployment (started by whoever deploys: the
  local supervisor, or Helm's ``ranking.canary`` values) to answer SERVING on its address;
  not within ``start_timeout_s`` -> FAILED.
- ``PROGRESSING``: weight ``steps[step]``. Every ``interval_s`` the window's counters
  (summed over the replicas that reported, each from its first report in the window) go to
  ``analysis.analyze``: *hold* (too little traffic: nothing counts), *failed_check* (counted;
  ``threshold`` of them roll back: weight 0, FAILED, the failing checks as the reason) or
  *pass* (next step; from the last step, promote). A window starts one report period after
  a weight change, so it holds traffic at one weight only.
- ``PROMOTING``: the registry alias moves to the release, the stable deployment reloads it
  (warm-up before swap), then PROMOTED and weight 0: the canary drains. A failed promotion
  moves the alias back and ends FAILED.

Operators: ``start``, ``abort`` (weight 0, ABORTED), ``undo`` (the last promotion: alias
back, stable reloads, UNDONE). A controller that starts or regains the lead loads the state
and resumes at the same step with a fresh window.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
from homefeed.rollout.v1 import rollout_pb2

from services.common import telemetry
from services.common.errors import FailedPrecondition, NotFound, Unavailable
from services.common.rollout_stats import STABLE
from services.rollout import analysis as A
from services.rollout.state import (
    ABORTED,
    FAILED,
    PROGRESSING,
    PROMOTED,
    PROMOTING,
    STARTING,
    UNDONE,
    Rollout,
    RolloutSpec,
    RolloutState,
)
from services.rollout.store import LeaderElection, StateStore, StoreError

log = logging.getLogger(__name__)


class Promoter(Protocol):
    """What promotion and undo do to the registry and the stable deployment."""

    def check_version(self, version: str) -> None:
        """Return when ``version`` exists in the registry; NotFound otherwise."""
        ...

    def promote(self, version: str) -> str:
        """Point the serving alias at ``version`` and make stable serve it; returns the
        version the alias named before. On failure the alias is back where it was."""
        ...

    def restore(self, version: str) -> None:
        """Point the serving alias back at ``version`` and make stable serve it."""
        ...


@dataclass(frozen=True)
class ControllerConfig:
    canary_address: str
    defaults: RolloutSpec  # steps, interval, threshold, mirror share, min feeds (version "0")
    analysis: A.AnalysisConfig = field(default_factory=A.AnalysisConfig)
    start_timeout_s: float = 300.0
    tick_s: float = 0.1


_DECISIONS = {A.HOLD: "hold", A.FAILED: "failed_check", A.PASS: "pass"}


def report_every_s(interval_s: float) -> float:
    """How often gateways report: five times a window, at most once a second, at least
    every 50 ms."""
    return min(1.0, max(0.05, interval_s / 5))


def _counters(arm: rollout_pb2.ArmCounters) -> dict[str, Any]:
    out: dict[str, Any] = {name: int(getattr(arm, name)) for name in A.COUNTERS}
    for name, edges in A.HISTOGRAMS.items():
        values = np.zeros(len(edges) + 1, dtype=np.int64)
        given = np.array(getattr(arm, name), dtype=np.int64)
        values[: min(len(given), len(values))] = given[: len(values)]
        out[name] = values
    return out


def _mirror(m: rollout_pb2.MirrorCounters) -> dict[str, float]:
    return {name: float(getattr(m, name)) for name in (*A.MIRROR_COUNTERS, *A.MIRROR_SUMS)}


@dataclass
class _Snapshot:
    stable: dict[str, Any]
    canary: dict[str, Any]
    mirror: dict[str, float]


def _minus(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    return {k: a[k] - b[k] for k in a}


def _plus(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    return {k: a[k] + b[k] for k in a}


class Replicas:
    """The latest counters of every gateway replica for the current rollout, and each one's
    counters when the window started (or when it was first seen in the window)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[tuple[str, str], _Snapshot] = {}
        self._base: dict[tuple[str, str], _Snapshot] = {}
        self.rollout_id = ""

    def record(self, request: rollout_pb2.ReportRequest) -> None:
        if not request.rollout_id or request.rollout_id != self.rollout_id:
            return  # counters of another (or no) rollout: the replica has not switched yet
        key = (request.replica, request.instance)
        snap = _Snapshot(
            _counters(request.stable),
            _counters(request.canary),
            _mirror(request.mirror),
        )
        with self._lock:
            self._latest[key] = snap
            self._base.setdefault(key, snap)  # first seen in this window: counts from now

    def new_window(self, rollout_id: str) -> None:
        """Start a window: what each replica reported so far no longer counts."""
        with self._lock:
            if rollout_id != self.rollout_id:
                self._latest.clear()
                self.rollout_id = rollout_id
            self._base = dict(self._latest)

    def window(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, float], int]:
        """The window so far: stable and canary counters and mirror sums over the replicas
        that reported in it (one that stopped reporting keeps what it reported), and how
        many those were."""
        stable, canary, mirror = A.empty_arm(), A.empty_arm(), A.empty_mirror()
        replicas = 0
        with self._lock:
            for key, latest in list(self._latest.items()):
                base = self._base.get(key, latest)
                stable = _plus(stable, _minus(latest.stable, base.stable))
                canary = _plus(canary, _minus(latest.canary, base.canary))
                mirror = _plus(mirror, _minus(latest.mirror, base.mirror))
                replicas += 1
        return stable, canary, mirror, replicas


class Controller:
    """Decides (when leading) and answers the gateways and the operators."""

    def __init__(
        self,
        store: StateStore,
        election: LeaderElection,
        promoter: Promoter,
        canary_ready: Callable[[], bool],
        config: ControllerConfig,
        clock: Callable[[], float] = time.monotonic,
        on_leading: Callable[[bool], None] | None = None,
    ) -> None:
        self.store = store
        self.election = election
        self.promoter = promoter
        self.canary_ready = canary_ready
        self.config = config
        self.clock = clock
        self.replicas = Replicas()
        self.on_leading = on_leading  # told each change of the lead (readiness follows it)
        self._lock = threading.RLock()  # the state, between the loop and the admin RPCs
        self._state = RolloutState()
        self.leading = False
        self._phase_since = clock()
        self._opens_at: float | None = None  # when the next window opens (after settling)
        self._window: tuple[float, str] | None = None  # the open window: clock, ISO time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        meter = telemetry.current().meter
        self._checks = meter.create_counter(
            "homefeed_rollout_checks", description="canary checks by outcome"
        )
        self._decisions = meter.create_counter(
            "homefeed_rollout_decisions", description="analysis windows by decision"
        )

    # --- loop ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rollout-controller", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.election.release()

    def _run(self) -> None:
        while not self._stop.wait(self.config.tick_s):
            try:
                self.tick()
            except Exception:  # the loop must outlive one bad tick (a store error, a bug)
                log.exception("rollout controller tick failed")

    def tick(self) -> None:
        """One step of the loop: keep or take the lead, then act on the current rollout."""
        leading = self.election.acquire()
        if leading != self.leading:
            self._lead(leading)
        if not leading:
            return
        with self._lock:
            rollout = self._state.current
            if rollout is None or not rollout.active:
                return
            if rollout.phase == STARTING:
                self._starting(rollout)
            elif rollout.phase == PROGRESSING:
                self._progressing(rollout)
            elif rollout.phase == PROMOTING:  # a promotion cut short by a restart
                self._promote(rollout)

    def _lead(self, leading: bool) -> None:
        with self._lock:
            if leading:  # lead only with the state loaded (an unreadable one: retried)
                loaded = self.store.load()
                self._state = loaded if loaded is not None else RolloutState()
            self.leading = leading
            if leading:
                current = self._state.current
                if current is not None and current.active:
                    current.event("controller_resumed", step=current.step, weight=current.weight)
                    log.info(
                        "resuming a rollout",
                        extra={
                            "rollout": current.id,
                            "phase": current.phase,
                            "weight": current.weight,
                        },
                    )
                    self._begin(current)
                    self._save()
            log.info("rollout controller lead", extra={"leading": leading})
        if self.on_leading is not None:
            self.on_leading(leading)

    def _save(self) -> None:
        try:
            self.store.save(self._state)
        except StoreError:
            log.exception("cannot save the rollout state")
            raise

    def _begin(self, rollout: Rollout) -> None:
        """A new phase or window starts now (a window after one report period)."""
        now = self.clock()
        self._phase_since = now
        self._opens_at = now + report_every_s(rollout.spec.interval_s)
        self._window = None
        self.replicas.new_window(rollout.id)  # reports of this rollout count from here

    def _starting(self, rollout: Rollout) -> None:
        if self.canary_ready():
            rollout.phase = PROGRESSING
            rollout.step = 0
            rollout.weight = rollout.spec.steps[0]
            rollout.message = f"canary ready; {rollout.weight} % of users in the canary arm"
            rollout.event("canary_ready")
            rollout.event("weight", weight=rollout.weight, step=0)
            self._begin(rollout)
            self._save()
            return
        waited = self.clock() - self._phase_since
        if waited > self.config.start_timeout_s:
            self._end(
                rollout,
                FAILED,
                f"the canary at {self.config.canary_address} did not answer SERVING within "
                f"{self.config.start_timeout_s:g} s",
                "rolled_back",
            )
            return
        rollout.message = (  # not saved: status shows it, a restart recomputes it
            f"waiting for the canary at {self.config.canary_address} to answer SERVING "
            f"({waited:.0f} s of {self.config.start_timeout_s:g} s)"
        )

    def _progressing(self, rollout: Rollout) -> None:
        now = self.clock()
        if self._window is None:
            if self._opens_at is None:  # no window planned yet (a fresh lead)
                self._begin(rollout)
                return
            if now >= self._opens_at:
                self.replicas.new_window(rollout.id)
                self._window = (now, datetime.now(UTC).isoformat(timespec="milliseconds"))
            return
        if now - self._window[0] >= rollout.spec.interval_s:
            self._decide(rollout, now, *self._window)

    def _decide(self, rollout: Rollout, now: float, opened: float, opened_at: str) -> None:
        spec = rollout.spec
        stable, canary, mirror, replicas = self.replicas.window()
        verdict = A.analyze(
            stable,
            canary,
            mirror,
            min_feeds=spec.min_feeds,
            mirror_share=spec.mirror_share,
            config=self.config.analysis,
            baseline=rollout.baseline or None,
            weight=rollout.weight,
        )
        for check in verdict.checks:
            outcome = {True: "passed", False: "failed", None: "no_data"}[check["passed"]]
            self._checks.add(1, {"check": check["name"], "outcome": outcome})
        stable_figures = verdict.figures["arms"][STABLE]
        if stable_figures["feeds"] >= spec.min_feeds:
            rollout.baseline = {"figures": stable_figures, "egmv": stable["egmv"].tolist()}
        window: dict[str, Any] = {
            "started_at": opened_at,
            "ended_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "seconds": round(now - opened, 3),
            "step": rollout.step,
            "weight": rollout.weight,
            "replicas": replicas,
            **verdict.figures,
            "checks": verdict.checks,
        }
        self._decisions.add(1, {"decision": _DECISIONS[verdict.outcome]})
        if verdict.outcome == A.HOLD:
            window["decision"] = "hold"
            rollout.message = verdict.message
        elif verdict.outcome == A.FAILED:
            rollout.failed_checks += 1
            if rollout.failed_checks >= spec.threshold:
                window["decision"] = "rollback"
                window["message"] = verdict.message
                rollout.add_window(window)
                self._end(
                    rollout,
                    FAILED,
                    f"rolled back at {rollout.weight} % after {rollout.failed_checks} failed "
                    f"checks (threshold {spec.threshold}); last: {verdict.message}",
                    "rolled_back",
                )
                return
            window["decision"] = "failed_check"
            rollout.message = (
                f"check failed ({rollout.failed_checks} of {spec.threshold}), holding at "
                f"{rollout.weight} %: {verdict.message}"
            )
        elif rollout.step + 1 < len(spec.steps):
            window["decision"] = "advance"
            rollout.step += 1
            rollout.weight = spec.steps[rollout.step]
            rollout.message = f"{verdict.message}; advanced to {rollout.weight} %"
            rollout.event("weight", weight=rollout.weight, step=rollout.step)
        else:
            window["decision"] = "promote"
            window["message"] = verdict.message
            rollout.add_window(window)
            rollout.phase = PROMOTING
            rollout.message = f"{verdict.message}; promoting version {spec.version}"
            rollout.event("promoting")
            self._save()
            self._promote(rollout)
            return
        window["message"] = verdict.message
        rollout.add_window(window)
        log.info(
            "rollout window",
            extra={
                "rollout": rollout.id,
                "decision": window["decision"],
                "weight": rollout.weight,
                "verdict": verdict.message,
            },
        )
        self._begin(rollout)
        self._save()

    def _promote(self, rollout: Rollout) -> None:
        try:
            previous = self.promoter.promote(rollout.spec.version)
        except Exception as err:  # the registry or the stable deployment refused
            log.exception("promotion failed", extra={"rollout": rollout.id})
            self._end(rollout, FAILED, f"promotion failed: {err}", "rolled_back")
            return
        rollout.previous_champion = previous
        self._end(
            rollout,
            PROMOTED,
            f"version {rollout.spec.version} promoted (was {previous or 'none'}); stable "
            "serves it and the canary drains",
            "promoted",
        )

    def _end(self, rollout: Rollout, phase: str, reason: str, event: str) -> None:
        rollout.phase = phase
        rollout.weight = 0
        rollout.reason = reason
        rollout.message = reason
        rollout.event(event, reason=reason)
        log.warning(
            "rollout ended", extra={"rollout": rollout.id, "phase": phase, "reason": reason}
        )
        self._opens_at = self._window = None
        self._save()

    # --- gateways ------------------------------------------------------------------------

    def report(self, request: rollout_pb2.ReportRequest) -> rollout_pb2.ReportResponse:
        """Record a replica's counters; the assignment it should apply. A controller that
        does not lead answers UNAVAILABLE (its state may be stale): the replica keeps its
        weights."""
        if not self.leading:
            raise Unavailable("this rollout controller is not the leader")
        self.replicas.record(request)
        with self._lock:
            rollout = self._state.current
            response = rollout_pb2.ReportResponse(
                report_every_ms=round(1e3 * report_every_s(self.config.defaults.interval_s))
            )
            if rollout is None or not rollout.active:
                return response
            response.rollout_id = rollout.id
            response.salt = rollout.salt
            response.canary_address = self.config.canary_address
            response.canary_version = rollout.spec.version
            response.report_every_ms = round(1e3 * report_every_s(rollout.spec.interval_s))
            if rollout.phase in (PROGRESSING, PROMOTING):
                response.canary_weight = rollout.weight
                response.mirror_share = rollout.spec.mirror_share
            return response

    # --- operators -----------------------------------------------------------------------

    def _require_lead(self) -> None:
        if not self.leading:
            raise FailedPrecondition(
                "this controller replica is not the leader; retry (the service routes to the "
                "leader once it reports ready)"
            )

    def start_rollout(self, spec: RolloutSpec) -> Rollout:
        with self._lock:
            self._require_lead()
            current = self._state.current
            if current is not None and current.active:
                raise FailedPrecondition(
                    f"rollout {current.id} of version {current.spec.version} is {current.phase}; "
                    "abort it first (`homefeed rollout abort`)"
                )
            self.promoter.check_version(spec.version)
            rollout = Rollout.new(spec)
            rollout.message = f"waiting for the canary at {self.config.canary_address}"
            rollout.event("started", spec=spec.to_json())
            self._state.start(rollout)
            self._begin(rollout)
            self._save()
            log.info("rollout started", extra={"rollout": rollout.id, "version": spec.version})
            return rollout

    def abort(self, reason: str) -> Rollout:
        with self._lock:
            self._require_lead()
            rollout = self._state.current
            if rollout is None or not rollout.active:
                raise FailedPrecondition("no rollout is in progress")
            if rollout.phase == PROMOTING:
                raise FailedPrecondition(
                    "the rollout is being promoted; wait for it, then `homefeed rollout undo`"
                )
            self._end(
                rollout,
                ABORTED,
                f"aborted by an operator: {reason or 'no reason given'}",
                "aborted",
            )
            return rollout

    def undo(self, reason: str) -> Rollout:
        with self._lock:
            self._require_lead()
            current = self._state.current
            if current is not None and current.active:
                raise FailedPrecondition(
                    f"rollout {current.id} is {current.phase}; abort it instead"
                )
            promoted = self._state.last_promoted()
            if promoted is None:
                raise NotFound("no promoted rollout to undo")
            if not promoted.previous_champion:
                raise FailedPrecondition(
                    f"rollout {promoted.id} recorded no previous version to return to"
                )
            self.promoter.restore(promoted.previous_champion)
            promoted.phase = UNDONE
            promoted.reason = (
                f"undone by an operator: {reason or 'no reason given'}; version "
                f"{promoted.previous_champion} serves again"
            )
            promoted.message = promoted.reason
            promoted.event("undone", reason=promoted.reason)
            self._save()
            return promoted

    def status(self) -> Rollout | None:
        with self._lock:
            return self._state.current

    def history(self) -> list[Rollout]:
        with self._lock:
            return self._state.all()
