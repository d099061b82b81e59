"""``make chaos`` in small: the fault scenarios against a real mesh on the tiny model.

What is asserted is what a caller must never see (failed feeds, degraded normal feeds under
hostile traffic, a breaker opened by garbage, an admin RPC let through); the timings
(breaker within 1 s, recovery within 5 s, the overload p99) are measured by ``make chaos``
and reported, not asserted, as performance is on these shared machines.
"""

from __future__ import annotations

import os

import pytest

from contract.paths import Paths
from tools.bench import BenchConfig, load_requests
from tools.chaos import Timing, format_table, hostile_payloads, run

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
            ],
            Timing.quick(),
            load_requests(config),
        )
    finally:
        if old is None:
            os.environ.pop("HOMEFEED_DATASET", None)
        else:
            os.environ["HOMEFEED_DATASET"] = old
    print(format_table(report))
    return report["scenarios"]


def test_a_killed_backend_fails_no_feed_and_comes_back(report: dict) -> None:
    r = report["kill_ranking"]
    assert r["failed_requests"] == 0 and r["total_requests"] > 0, r
    assert r["detail"]["breaker_open_s"] is not None, r  # it did open
    assert r["detail"]["restarted_ready_s"] is not None, r  # the supervisor restarted it
    assert r["detail"]["full_feeds_after_ready_s"] is not None, r  # full feeds came back


def test_hostile_requests_open_no_breaker_and_degrade_no_one(report: dict) -> None:
    r = report["breaker_poison"]
    assert r["passed"], r
    assert set(r["detail"]["hostile_codes"]) <= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}


def test_admin_rpcs_are_refused_without_the_token(report: dict) -> None:
    assert report["admin_unauthenticated"]["passed"], report["admin_unauthenticated"]


def test_sigterm_drains_without_failing_a_feed(report: dict) -> None:
    r = report["drain"]
    assert r["failed_requests"] == 0 and r["total_requests"] > 0, r
    assert r["passed"], r


def test_overload_sheds_and_fails_nothing_else(report: dict) -> None:
    r = report["overload"]
    assert r["failed_requests"] == 0, r
    assert r["detail"]["shed"] > 0 and r["detail"]["admitted"] > 0, r
    assert r["detail"]["healthy_after"], r


def test_scenarios_not_built_say_so(report: dict) -> None:
    r = report["canary_good"]
    assert r["passed"] is False and "not built" in r["detail"]["reason"]


def test_every_hostile_payload_is_distinct() -> None:
    payloads = hostile_payloads()
    assert len(set(payloads)) == len(payloads) > 10
