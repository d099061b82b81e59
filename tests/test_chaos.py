"""``make chaos`` in small: the fault scenarios against a real mesh on the tiny model.

What is asserted is what a caller must never see (failed feeds, degraded normal feeds under
hostile traffic, a breaker opened by garbage, an admin RPC let through); the timings
(breaker within 1 s, recovery within 5 s, the overload p99) are measured by ``make chaos``
and reported, not asserted, as performance is on these shared machines.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from contract.paths import Paths
from tools.bench import BenchConfig, load_requests
from tools.chaos import Chaos, Outcome, Timing, format_table, hostile_payloads, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def report(tiny_trained: dict, tiny_dataset: dict, home: Paths) -> dict:
    dataset = tiny_dataset["dataset"]
    old = os.environ.get("HOMEFEED_DATASET")
    os.environ["HOMEFEED_DATASET"] = dataset
    try:
        config = BenchConfig(home=home.home, preset=dataset.removeprefix("sim-"), requests=256)
        report = run(
            home.home,
            dataset,
            [
                "kill_ranking",
                "breaker_poison",
                "admin_unauthenticated",
                "drain",
                "overload",
                "canary_good",
                "canary_bad_scores",
                "no_traffic_holds",
                "restart_resumes",
            ],
            Timing.quick(),
            load_requests(config),
            # a scenario whose harness raised (a mesh slow to come up on a loaded 2-core
            # machine) runs once more; one that ran and failed its check never does
            retries=1,
        )
    finally:
        if old is None:
            os.environ.pop("HOMEFEED_DATASET", None)
        else:
            os.environ["HOMEFEED_DATASET"] = old
    print(format_table(report))
    return report["scenarios"]


def ran(report: dict, name: str) -> dict:
    """The scenario's result; a failure naming what it raised when it did not run."""
    r = report[name]
    assert "error" not in r["detail"], f"{name} raised: {r['detail']['error']}"
    return r


def test_a_killed_backend_fails_no_feed_and_comes_back(report: dict) -> None:
    r = ran(report, "kill_ranking")
    assert r["failed_requests"] == 0 and r["total_requests"] > 0, r
    assert r["detail"]["breaker_open_s"] is not None, r  # it did open
    assert r["detail"]["restarted_ready_s"] is not None, r  # the supervisor restarted it
    assert r["detail"]["full_feeds_after_ready_s"] is not None, r  # full feeds came back


def test_hostile_requests_open_no_breaker_and_degrade_no_one(report: dict) -> None:
    r = ran(report, "breaker_poison")
    assert r["passed"], r
    assert set(r["detail"]["hostile_codes"]) <= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}


def test_admin_rpcs_are_refused_without_the_token(report: dict) -> None:
    assert ran(report, "admin_unauthenticated")["passed"], report["admin_unauthenticated"]


def test_sigterm_drains_without_failing_a_feed(report: dict) -> None:
    r = ran(report, "drain")
    assert r["failed_requests"] == 0 and r["total_requests"] > 0, r
    assert r["passed"], r


def test_overload_sheds_and_fails_nothing_else(report: dict) -> None:
    r = ran(report, "overload")
    assert r["failed_requests"] == 0, r
    assert r["detail"]["shed"] > 0 and r["detail"]["admitted"] > 0, r
    assert r["detail"]["healthy_after"], r


def test_a_good_release_is_promoted_and_undone(report: dict) -> None:
    r = ran(report, "canary_good")
    d = r["detail"]
    assert d["phase"] == "PROMOTED", r
    assert d["alias_after_promotion"] == d["release"], r
    assert d["stable_serves_after_promotion"] == [d["release"]], r
    assert d["stable_serves_after_undo"] != [d["release"]], r
    decisions = [w["decision"] for w in d["windows"]]
    # every step taken in order; a window the noisy 2-core machine failed is held and
    # counted, as designed, and fewer than the threshold of them never roll a good release
    # back (one in the first window was seen in a fresh-clone run: the canary pod just up)
    assert [x for x in decisions if x not in ("hold", "failed_check")] == [
        "advance",
        "advance",
        "advance",
        "promote",
    ], r
    assert decisions.count("failed_check") < Timing.quick().canary_threshold, r
    assert r["failed_requests"] <= 0.01 * r["total_requests"], r


def test_a_canary_that_reorders_everything_is_rolled_back(report: dict) -> None:
    r = ran(report, "canary_bad_scores")
    d = r["detail"]
    assert d["phase"] == "FAILED", r
    failed_checks = {name for w in d["windows"] for name in w["failed"]}
    assert "mirror_rank_correlation" in failed_checks, r
    assert r["failed_requests"] <= 0.01 * r["total_requests"], r


def test_a_rollout_without_traffic_holds_and_says_why(report: dict) -> None:
    assert ran(report, "no_traffic_holds")["passed"], report["no_traffic_holds"]


def test_a_rollout_resumes_after_its_controller_and_a_gateway_restart(report: dict) -> None:
    r = ran(report, "restart_resumes")
    d = r["detail"]
    assert d["step_after_restart"] >= d["step_before"] >= 1, r
    assert d["resumed_events"] >= 1 and d["final_phase"] == "PROMOTED", r
    assert d["replicas_in_last_window"] == 2, r


def test_every_hostile_payload_is_distinct() -> None:
    payloads = hostile_payloads()
    assert len(set(payloads)) == len(payloads) > 10


def test_a_scenario_that_raised_runs_once_more_and_one_that_failed_never(monkeypatch) -> None:
    calls: list[str] = []

    def fake_run(self: Chaos, name: str) -> Outcome:
        calls.append(name)
        if name == "flaky" and calls.count("flaky") == 1:
            raise TimeoutError("the mesh was slow")
        if name == "broken":
            raise RuntimeError("always")
        return Outcome(name != "fails", 0, 1, None, None, {})

    monkeypatch.setattr(Chaos, "run", fake_run)
    report = run(Path("."), "sim-tiny", ["flaky", "fails", "broken"], Timing.quick(), [], retries=1)
    s = report["scenarios"]
    assert calls == ["flaky", "flaky", "fails", "broken", "broken"]
    assert s["flaky"]["passed"] and s["flaky"]["detail"]["earlier_errors"] == [
        "TimeoutError: the mesh was slow"
    ]
    assert not s["fails"]["passed"] and "earlier_errors" not in s["fails"]["detail"]
    assert s["broken"]["detail"]["error"] == "RuntimeError: always"
    assert s["broken"]["detail"]["earlier_errors"] == ["RuntimeError: always"]
