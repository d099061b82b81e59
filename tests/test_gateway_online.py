"""The gateway's part of the online loop: seen items, experiment arms, the impression log."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from homefeed.events.v1 import events_pb2

from services.common.rollout_stats import BUCKETS
from services.gateway.experiment import Arm, Experiment, ExperimentError
from services.gateway.feedlog import FeedLogger, sampled
from services.gateway.pipeline import FeedPipeline, make_breakers
from services.gateway.settings import GatewaySettings
from tests.test_gateway import (
    FakeRpcError,
    feed_request,
    harness,
    popularity,
)

EXPERIMENT = Experiment(
    name="e1",
    salt="s1",
    arms=(Arm("control", 0.5, "heuristic"), Arm("treatment", 0.5, "model")),
)


def test_seen_items_are_never_served_and_retrieval_is_asked_to_exclude_them() -> None:
    h = harness()
    first = h.pipeline.run(feed_request(page_size=20), None)
    seen = first.item_ids[:15]
    request = dataclasses.replace(feed_request(page_size=20), seen_item_ids=seen)
    second = h.pipeline.run(request, None)
    assert not set(second.item_ids.tolist()) & set(seen.tolist())
    assert len(second.item_ids) == 20


def test_assignment_is_stable_follows_the_shares_and_ignores_the_canary_salt() -> None:
    users = np.arange(20_000)
    arms = [EXPERIMENT.arm_of(int(u)) for u in users]
    names = [a.name if a else "" for a in arms]
    assert names == [(a.name if a else "") for a in map(EXPERIMENT.arm_of, users.tolist())]
    share = names.count("control") / len(names)
    assert abs(share - 0.5) < 0.02
    partial = Experiment("e2", "s2", (Arm("a", 0.1), Arm("b", 0.1)))
    out = sum(partial.arm_of(int(u)) is None for u in users) / len(users)
    assert abs(out - 0.8) < 0.02
    assert partial.edges == [BUCKETS // 10, BUCKETS // 5]
    other_salt = Experiment("e1", "s9", EXPERIMENT.arms)
    moved = np.mean([EXPERIMENT.arm_of(int(u)) != other_salt.arm_of(int(u)) for u in users])
    assert 0.4 < moved < 0.6  # a new salt reshuffles: independent of another hash


def test_experiment_configuration_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ExperimentError, match="sum to at most 1"):
        Experiment("e", "s", (Arm("a", 0.7), Arm("b", 0.7)))
    with pytest.raises(ExperimentError, match="policy"):
        Experiment("e", "s", (Arm("a", 0.5, "magic"),))
    bad = tmp_path / "e.yaml"
    bad.write_text("name: e\nsalt: s\narms: [{name: a}]\n")
    with pytest.raises(ExperimentError, match=r"e\.yaml.*arms\[0\]"):
        Experiment.load(bad)
    pinned = Experiment("e", "s", (Arm("a", 0.5, "model", "12"),))
    pinned.check_versions("12")
    with pytest.raises(ExperimentError, match="wants model version 12"):
        pinned.check_versions("13")


def test_settings_read_the_experiment_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "exp.json"
    path.write_text('{"name": "e1", "salt": "s1", "arms": [{"name": "a", "share": 1.0}]}')
    for name in ("RETRIEVAL", "FEATURES", "RANKING"):
        monkeypatch.setenv(f"HOMEFEED_{name}_ADDR", "127.0.0.1:1")
    monkeypatch.setenv("HOMEFEED_GATEWAY_EXPERIMENT", str(path))
    settings = GatewaySettings.from_env()
    assert settings.experiment is not None and settings.experiment.arms[0].name == "a"
    assert settings.events_addr == "127.0.0.1:1" and settings.log_feeds


def _with_experiment(experiment: Experiment) -> tuple[FeedPipeline, object]:
    h = harness()
    pipeline = FeedPipeline(
        h.retrieval,
        h.features,
        h.ranking,
        popularity(),
        None,
        h.pipeline.rerank_config,
        make_breakers(h.pipeline.breakers["ranking"].config, h.clock),
        clock=h.clock,
        experiment=experiment,
    )
    return pipeline, h


def test_a_heuristic_arm_skips_ranking_without_a_degradation_flag() -> None:
    pipeline, h = _with_experiment(EXPERIMENT)
    by_arm: dict[str, list[int]] = {"control": [], "treatment": []}
    for user in range(40):
        assigned = EXPERIMENT.arm_of(user)
        assert assigned is not None
        by_arm[assigned.name].append(user)
    for arm, users in by_arm.items():
        calls_before = len(h.ranking.calls)  # type: ignore[attr-defined]
        request = dataclasses.replace(feed_request(), user_id=users[0])
        page = pipeline.run(request, None)
        ranked = len(h.ranking.calls) > calls_before  # type: ignore[attr-defined]
        assert page.experiment == "e1" and page.experiment_arm == arm
        assert page.degraded == ()
        assert ranked == (arm == "treatment")
        assert page.model_version == ("7" if arm == "treatment" else "")


def _logger_page(request_id: str = "r1") -> object:
    h = harness()
    pipeline = FeedPipeline(
        h.retrieval,
        h.features,
        h.ranking,
        popularity(),
        clock=h.clock,
        feed_logger=FeedLogger(lambda r, t: events_pb2.LogEventsResponse(), features_rate=1.0),
    )
    page = pipeline.run(dataclasses.replace(feed_request(), request_id=request_id), None)
    pipeline.feed_logger = None  # the page only; nothing started
    return page


def test_the_feed_logger_sends_the_page_with_its_features_and_never_blocks() -> None:
    sent: list[events_pb2.LogEventsRequest] = []
    gate = threading.Event()

    def send(request: events_pb2.LogEventsRequest, timeout: float) -> events_pb2.LogEventsResponse:
        gate.wait(10)
        sent.append(request)
        return events_pb2.LogEventsResponse(accepted=len(request.feeds))

    logger = FeedLogger(send, features_rate=1.0, max_queue=3, flush_s=0.01)
    logger.start()
    page = _logger_page()
    offered = [logger.offer(page) for _ in range(6)]  # type: ignore[arg-type]
    assert offered.count(False) >= 2 and logger.stats.dropped_full >= 2  # full: counted, no wait
    gate.set()
    assert logger.flush(10)
    logger.close()
    feeds = [feed for request in sent for feed in request.feeds]
    assert len(feeds) + logger.stats.dropped_full == 6 and logger.stats.sent == len(feeds)
    feed = feeds[0]
    assert list(feed.item_ids) == page.item_ids.tolist()  # type: ignore[attr-defined]
    assert list(feed.positions) == list(range(1, len(feed.item_ids) + 1))
    assert feed.features.rows == len(feed.item_ids) and feed.features.cols > 0
    first_col = np.asarray(feed.features.values).reshape(feed.features.rows, -1)[:, 0]
    np.testing.assert_array_equal(first_col, np.asarray(feed.item_ids, dtype=np.float32))
    assert len(feed.categories) == len(feed.item_ids)


def test_a_failing_log_loses_feeds_counted_and_the_feed_is_still_served() -> None:
    def send(request: events_pb2.LogEventsRequest, timeout: float) -> events_pb2.LogEventsResponse:
        raise FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down")

    logger = FeedLogger(send, features_rate=0.0, flush_s=0.01)
    logger.start()
    page = _logger_page()
    assert logger.offer(page)  # type: ignore[arg-type]
    assert logger.flush(10)
    logger.close()
    assert logger.stats.dropped_failed == 1 and logger.stats.lost == 1


def test_feature_sampling_is_a_deterministic_share_of_request_ids() -> None:
    ids = [f"r{i}" for i in range(20_000)]
    share = np.mean([sampled(r, 0.05) for r in ids])
    assert 0.04 < share < 0.06
    assert [sampled(r, 0.05) for r in ids[:100]] == [sampled(r, 0.05) for r in ids[:100]]
    assert not sampled("x", 0.0) and sampled("x", 1.0)
