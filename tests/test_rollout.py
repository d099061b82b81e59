"""The canary release without processes: arm assignment, the histogram figures, the
analysis' verdicts, and the controller's state machine over a file store with a fake
promoter and canary probe (``tests/test_chaos.py`` drives the real mesh)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from homefeed.rollout.v1 import rollout_pb2

from services.common.errors import FailedPrecondition, NotFound, Unavailable
from services.common.rollout_stats import (
    CANARY,
    EGMV_EDGES,
    LATENCY_EDGES_MS,
    arm_of,
    compare_rankings,
    histogram,
    psi,
    quantile,
    user_bucket,
)
from services.gateway.canary import ArmCounters, MirrorCounters
from services.gateway.clients import Scores
from services.rollout import analysis as A
from services.rollout.controller import Controller, ControllerConfig
from services.rollout.state import (
    ABORTED,
    FAILED,
    PROGRESSING,
    PROMOTED,
    STARTING,
    UNDONE,
    Rollout,
    RolloutSpec,
)
from services.rollout.store import FileLock, FileStore, StoreError

# --- arms and figures ---------------------------------------------------------------------


def test_arms_are_stable_per_user_and_grow_with_the_weight() -> None:
    users = np.arange(20_000)
    arms = {w: [arm_of(int(u), "salt", w) for u in users] for w in (0, 5, 25, 50, 100)}
    for w in (0, 5, 25, 50, 100):
        share = np.mean([a == CANARY for a in arms[w]])
        assert abs(share - w / 100) < 0.01, (w, share)
    # a user in the canary at 5 % is in it at every later step
    for lo, hi in ((5, 25), (25, 50), (50, 100)):
        assert all(arms[hi][i] == CANARY for i, a in enumerate(arms[lo]) if a == CANARY)
    # another salt draws other users
    other = [arm_of(int(u), "other", 5) for u in users[:2000]]
    assert other != arms[5][:2000]
    assert user_bucket(42, "salt") == user_bucket(42, "salt")


def test_quantiles_and_psi_from_histograms() -> None:
    rng = np.random.default_rng(0)
    ms = rng.lognormal(1.0, 0.4, 5000)
    hist = histogram(ms, LATENCY_EDGES_MS)
    p99 = quantile(hist, LATENCY_EDGES_MS, 0.99)
    assert p99 is not None and np.quantile(ms, 0.99) <= p99 <= 1.2 * np.quantile(ms, 0.99)
    assert quantile(np.zeros_like(hist), LATENCY_EDGES_MS, 0.5) is None

    a = histogram(rng.lognormal(0, 1, 20_000), EGMV_EDGES)
    b = histogram(rng.lognormal(0, 1, 20_000), EGMV_EDGES)
    shifted = histogram(rng.lognormal(1.0, 1, 20_000), EGMV_EDGES)
    constant = histogram(np.full(20_000, 1.0), EGMV_EDGES)
    same, moved, flat = psi(a, b), psi(a, shifted), psi(a, constant)
    assert same is not None and same < 0.02
    assert moved is not None and moved > 0.25
    assert flat is not None and flat > 1.0
    assert psi(a, np.zeros_like(a)) is None


def test_compare_rankings_tells_reordering_from_agreement() -> None:
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 0.2, 500)
    values = rng.uniform(1, 50, 500)
    egmv = p * values
    same = compare_rankings(egmv, egmv, p, p)
    assert same == (pytest.approx(1.0), 1.0, 0.0)
    order = rng.permutation(500)
    shuffled = compare_rankings(egmv, egmv[order], p, p[order])
    assert abs(shuffled[0]) < 0.2 and shuffled[1] < 0.3 and shuffled[2] > 0.03
    flat = compare_rankings(egmv, np.full(500, egmv.mean()), p, np.full(500, p.mean()))
    assert flat[0] == 0.0
    assert compare_rankings(egmv, egmv * np.nan, p, p) == (0.0, 0.0, 1.0)


# --- the analysis -------------------------------------------------------------------------


def arm(
    feeds: int,
    *,
    errors: int = 0,
    ranking_ms: float = 3.0,
    feed_ms: float = 12.0,
    egmv=None,
    constant: int = 0,
    degraded: int = 0,
) -> dict[str, Any]:
    counters = ArmCounters()
    rng = np.random.default_rng(feeds)
    for i in range(feeds):
        scores = egmv if egmv is not None else rng.lognormal(0, 1, 50)
        p = np.clip(scores / 100, 0, 1)
        failed = i < errors
        counters.record(
            feed_ms * rng.uniform(0.9, 1.1),
            i < degraded or failed,
            ranking_ms * rng.uniform(0.9, 1.1),
            None if failed else Scores(p.astype(np.float32), scores.astype(np.float32), "1"),
        )
    out = A.empty_arm()
    message = counters.to_proto()
    for name in A.COUNTERS:
        out[name] = getattr(message, name)
    for name in A.HISTOGRAMS:
        out[name] = np.array(getattr(message, name), dtype=np.int64)
    out["constant"] += constant
    return out


def mirror(
    n: int, corr: float = 0.95, overlap: float = 0.9, p_diff: float = 0.005
) -> dict[str, float]:
    m = MirrorCounters()
    for _ in range(n):
        m.add(corr, overlap, p_diff)
    message = m.to_proto()
    return {k: getattr(message, k) for k in (*A.MIRROR_COUNTERS, *A.MIRROR_SUMS)}


def analyze(stable, canary, m, **kw: Any) -> A.Verdict:
    kw.setdefault("min_feeds", 20)
    kw.setdefault("mirror_share", 0.1)
    kw.setdefault("weight", 25)
    return A.analyze(stable, canary, m, config=A.AnalysisConfig(), **kw)


def test_a_healthy_canary_passes_every_check() -> None:
    verdict = analyze(arm(300), arm(100), mirror(20))
    assert verdict.outcome == A.PASS, verdict.message
    assert {c["name"] for c in verdict.checks} >= {
        "error_rate",
        "ranking_p99_ms",
        "feed_p99_ms",
        "score_psi",
        "mirror_rank_correlation",
        "mirror_top20_overlap",
        "constant_scores",
    }


def test_too_little_traffic_holds_and_says_why() -> None:
    verdict = analyze(arm(300), arm(3), mirror(20))
    assert verdict.outcome == A.HOLD
    assert "the canary arm had 3 feeds" in verdict.message and "fewer than 20" in verdict.message
    assert verdict.checks == []


@pytest.mark.parametrize(
    ("canary", "m", "failing"),
    [
        (dict(errors=25), mirror(20), "error_rate"),
        (dict(ranking_ms=53.0, feed_ms=62.0), mirror(20), "ranking_p99_ms"),
        (dict(egmv=np.full(50, 1.0)), mirror(20, corr=0.0, overlap=0.1), "constant_scores"),
        ({}, mirror(20, corr=0.05, overlap=0.1, p_diff=0.05), "mirror_rank_correlation"),
        (dict(degraded=30), mirror(20), "fallback_rate"),
    ],
)
def test_each_kind_of_bad_canary_fails_its_check(canary, m, failing) -> None:
    verdict = analyze(arm(300), arm(100, **canary), m)
    assert verdict.outcome == A.FAILED
    assert failing in verdict.failed, verdict.message


def test_too_few_mirrored_requests_hold_rather_than_pass() -> None:
    verdict = analyze(arm(300), arm(100), mirror(2))
    assert verdict.outcome == A.HOLD and "mirror_rank_correlation" in verdict.message


def test_at_100_percent_the_last_stable_window_is_the_baseline() -> None:
    stable = arm(300)
    baseline = {"figures": A.arm_figures(stable), "egmv": stable["egmv"].tolist()}
    verdict = analyze(arm(0), arm(300), mirror(0), weight=100, baseline=baseline)
    assert verdict.outcome == A.PASS, verdict.message
    slow = analyze(arm(0), arm(300, ranking_ms=60), mirror(0), weight=100, baseline=baseline)
    assert slow.outcome == A.FAILED
    assert analyze(arm(0), arm(300), mirror(0), weight=100).outcome == A.HOLD


# --- the controller -----------------------------------------------------------------------


class FakePromoter:
    def __init__(self) -> None:
        self.champion = "1"
        self.calls: list[tuple[str, str]] = []
        self.fail = False

    def check_version(self, version: str) -> None:
        if version == "404":
            raise NotFound("no such version")

    def promote(self, version: str) -> str:
        self.calls.append(("promote", version))
        if self.fail:
            raise RuntimeError("stable did not reload")
        previous, self.champion = self.champion, version
        return previous

    def restore(self, version: str) -> None:
        self.calls.append(("restore", version))
        self.champion = version


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def current(controller: Controller) -> Rollout:
    rollout = controller.status()
    assert rollout is not None
    return rollout


def make(tmp_path: Path, ready: bool = True, **cfg: Any) -> tuple[Controller, FakePromoter, Clock]:
    clock = Clock()
    promoter = FakePromoter()
    controller = Controller(
        FileStore(tmp_path / "state.json"),
        FileLock(tmp_path / "state.lock"),
        promoter,
        lambda: ready,
        ControllerConfig(
            canary_address="127.0.0.1:1",
            defaults=RolloutSpec(version="0"),
            start_timeout_s=cfg.pop("start_timeout_s", 30.0),
        ),
        clock=clock,
    )
    controller.tick()
    assert controller.leading
    return controller, promoter, clock


def report(
    controller: Controller, stable: dict, canary: dict, m: dict, replica: str = "g1"
) -> rollout_pb2.ReportResponse:
    rollout = controller.status()
    request = rollout_pb2.ReportRequest(
        replica=replica, instance="i1", rollout_id=rollout.id if rollout else ""
    )
    for target, counters in ((request.stable, stable), (request.canary, canary)):
        for name in A.COUNTERS:
            setattr(target, name, int(counters[name]))
        for name in A.HISTOGRAMS:
            getattr(target, name).extend(counters[name].tolist())
    for name in (*A.MIRROR_COUNTERS, *A.MIRROR_SUMS):
        setattr(request.mirror, name, m[name])
    return controller.report(request)


def zero() -> tuple[dict, dict, dict]:
    return A.empty_arm(), A.empty_arm(), A.empty_mirror()


def run_window(
    controller: Controller, clock: Clock, stable: dict, canary: dict, m: dict, totals: list
) -> None:
    """One analysis window: the window opens, then the replica's cumulative counters grow
    by (stable, canary, m) before it closes."""
    spec = current(controller).spec
    clock.now += 1.0  # the settle period (report_every)
    controller.tick()  # opens the window
    totals[0] = {k: totals[0][k] + stable[k] for k in stable}
    totals[1] = {k: totals[1][k] + canary[k] for k in canary}
    totals[2] = {k: totals[2][k] + m[k] for k in m}
    report(controller, totals[0], totals[1], totals[2])
    clock.now += spec.interval_s
    controller.tick()


def test_a_healthy_rollout_steps_through_and_promotes(tmp_path: Path) -> None:
    controller, promoter, clock = make(tmp_path)
    rollout = controller.start_rollout(RolloutSpec(version="2", interval_s=10, mirror_share=0.1))
    assert rollout.phase == STARTING
    assert report(controller, *zero()).canary_weight == 0
    controller.tick()
    assert current(controller).phase == PROGRESSING and current(controller).weight == 5
    response = report(controller, *zero())
    assert (response.canary_weight, response.salt) == (5, rollout.salt)
    assert response.canary_address == "127.0.0.1:1" and response.canary_version == "2"
    totals = list(zero())
    report(controller, totals[0], totals[1], totals[2])
    seen = []
    for _ in range(4):
        run_window(controller, clock, arm(300), arm(100), mirror(20), totals)
        seen.append(current(controller).weight)
    assert seen == [25, 50, 100, 0]
    done = current(controller)
    assert done.phase == PROMOTED and done.previous_champion == "1"
    assert promoter.calls == [("promote", "2")]
    assert [w["decision"] for w in done.windows] == ["advance", "advance", "advance", "promote"]
    assert report(controller, *zero()).canary_weight == 0


def test_a_failing_canary_is_rolled_back_after_threshold_checks(tmp_path: Path) -> None:
    controller, promoter, clock = make(tmp_path)
    controller.start_rollout(RolloutSpec(version="2", interval_s=10, threshold=2, mirror_share=0.1))
    controller.tick()
    totals = list(zero())
    report(controller, totals[0], totals[1], totals[2])
    run_window(controller, clock, arm(300), arm(100, errors=30), mirror(20), totals)
    status = current(controller)
    assert status.phase == PROGRESSING and status.weight == 5 and status.failed_checks == 1
    assert "check failed (1 of 2)" in status.message
    run_window(controller, clock, arm(300), arm(100, errors=30), mirror(20), totals)
    status = current(controller)
    assert status.phase == FAILED and status.weight == 0
    assert "error_rate" in status.reason and "rolled back at 5 %" in status.reason
    assert promoter.calls == []
    assert report(controller, *zero()).rollout_id == ""


def test_no_traffic_holds_the_step(tmp_path: Path) -> None:
    controller, _, clock = make(tmp_path)
    controller.start_rollout(RolloutSpec(version="2", interval_s=10, threshold=1))
    controller.tick()
    totals = list(zero())
    report(controller, totals[0], totals[1], totals[2])
    for _ in range(3):
        run_window(controller, clock, arm(2), arm(1), mirror(0), totals)
    status = current(controller)
    assert status.phase == PROGRESSING and status.weight == 5 and status.failed_checks == 0
    assert "too little traffic" in status.message
    assert [w["decision"] for w in status.windows] == ["hold"] * 3


def test_a_restarted_controller_resumes_at_the_same_step(tmp_path: Path) -> None:
    controller, _, clock = make(tmp_path)
    controller.start_rollout(RolloutSpec(version="2", interval_s=10, mirror_share=0.1))
    controller.tick()
    totals = list(zero())
    report(controller, totals[0], totals[1], totals[2])
    run_window(controller, clock, arm(300), arm(100), mirror(20), totals)
    assert current(controller).weight == 25
    controller.close()  # releases the lock, as a dying process would

    again, _, clock2 = make(tmp_path)
    status = current(again)
    assert status.phase == PROGRESSING and status.weight == 25 and status.step == 1
    assert status.events[-1]["event"] == "controller_resumed"
    # a replica's counters from before the restart do not count in the new window
    report(again, totals[0], totals[1], totals[2])
    run_window(again, clock2, arm(300), arm(100), mirror(20), totals)
    assert current(again).weight == 50


def test_only_one_controller_leads(tmp_path: Path) -> None:
    first, _, _ = make(tmp_path)
    second = Controller(
        FileStore(tmp_path / "state.json"),
        FileLock(tmp_path / "state.lock"),
        FakePromoter(),
        lambda: True,
        ControllerConfig(canary_address="x:1", defaults=RolloutSpec(version="0")),
    )
    second.tick()
    assert not second.leading
    with pytest.raises(FailedPrecondition, match="not the leader"):
        second.start_rollout(RolloutSpec(version="2"))
    with pytest.raises(Unavailable):  # a stale follower must not reset the gateways' weights
        report(second, *zero())
    first.close()
    second.tick()
    assert second.leading


def test_an_unreadable_state_is_never_led_over(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("{not json")
    controller = Controller(
        FileStore(tmp_path / "state.json"),
        FileLock(tmp_path / "state.lock"),
        FakePromoter(),
        lambda: True,
        ControllerConfig(canary_address="x:1", defaults=RolloutSpec(version="0")),
    )
    with pytest.raises(StoreError, match="does not hold a rollout state"):
        controller.tick()
    assert not controller.leading
    assert (tmp_path / "state.json").read_text() == "{not json"  # nothing overwritten


def test_abort_undo_and_refusals(tmp_path: Path) -> None:
    controller, promoter, clock = make(tmp_path)
    with pytest.raises(NotFound):
        controller.start_rollout(RolloutSpec(version="404"))
    with pytest.raises(FailedPrecondition, match="no rollout"):
        controller.abort("why")
    controller.start_rollout(RolloutSpec(version="2", interval_s=10, mirror_share=0))
    with pytest.raises(FailedPrecondition, match="abort it first"):
        controller.start_rollout(RolloutSpec(version="3"))
    aborted = controller.abort("bad idea")
    assert aborted.phase == ABORTED and aborted.weight == 0 and "bad idea" in aborted.reason
    with pytest.raises(NotFound, match="no promoted rollout"):
        controller.undo("")

    controller.start_rollout(RolloutSpec(version="3", interval_s=10, steps=(100,), mirror_share=0))
    controller.tick()
    totals = list(zero())
    report(controller, totals[0], totals[1], totals[2])
    stable = arm(300)
    current(controller).baseline = {
        "figures": A.arm_figures(stable),
        "egmv": stable["egmv"].tolist(),
    }
    run_window(controller, clock, A.empty_arm(), arm(300), mirror(0), totals)
    assert current(controller).phase == PROMOTED and promoter.champion == "3"
    undone = controller.undo("regret")
    assert undone.phase == UNDONE and promoter.champion == "1"
    assert promoter.calls[-1] == ("restore", "1")
    assert [r.phase for r in controller.history()] == [UNDONE, ABORTED]


def test_a_failed_promotion_ends_failed(tmp_path: Path) -> None:
    controller, promoter, clock = make(tmp_path)
    promoter.fail = True
    controller.start_rollout(
        RolloutSpec(version="3", interval_s=10, steps=(50, 100), mirror_share=0)
    )
    controller.tick()
    totals = list(zero())
    report(controller, totals[0], totals[1], totals[2])
    run_window(controller, clock, arm(300), arm(300), mirror(0), totals)
    run_window(controller, clock, arm(0), arm(300), mirror(0), totals)
    status = current(controller)
    assert status.phase == FAILED and "promotion failed" in status.reason


def test_a_canary_that_never_gets_ready_fails_the_rollout(tmp_path: Path) -> None:
    controller, _, clock = make(tmp_path, ready=False, start_timeout_s=5)
    controller.start_rollout(RolloutSpec(version="2"))
    controller.tick()
    assert (
        current(controller).phase == STARTING
        and "waiting for the canary" in current(controller).message
    )
    clock.now += 6
    controller.tick()
    assert (
        current(controller).phase == FAILED
        and "did not answer SERVING" in current(controller).reason
    )


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="ending at 100"):
        RolloutSpec(version="2", steps=(5, 25))
    with pytest.raises(ValueError, match="increase"):
        RolloutSpec(version="2", steps=(50, 25, 100))
    with pytest.raises(ValueError, match="version"):
        RolloutSpec(version="champion")


def test_promotion_reloads_every_stable_pod_a_name_resolves_to() -> None:
    from services.rollout.server import stable_pods

    assert stable_pods("10.0.0.7:50064") == ["10.0.0.7:50064"]
    assert stable_pods("[::1]:50064") == ["[::1]:50064"]
    assert stable_pods("localhost:50064")[0] in ("127.0.0.1:50064", "[::1]:50064")
    assert stable_pods("no-such-host.invalid:1") == ["no-such-host.invalid:1"]
