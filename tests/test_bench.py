"""The serving benchmark's maths, report contract and load loop (against a stand-in server),
and the naive reference feed's request checks and core on the tiny fixtures."""

from __future__ import annotations

import asyncio
import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pytest
from homefeed.common.v1 import common_pb2
from homefeed.feed.v1 import feed_pb2, feed_pb2_grpc

from contract import bundle as B
from contract import content
from contract.catalog import Catalog
from contract.paths import Paths
from feature_repo import schema as S
from services.common.errors import InvalidArgument
from services.common.settings import SettingsError
from tools import bench
from tools.reference.feed import FeedRequest, ReferenceFeed, format_stage_ms
from tools.reference.server import to_domain

# --- percentiles and stage trailers ------------------------------------------------------------


def test_percentiles_of_known_values() -> None:
    got = bench.percentiles(np.arange(1, 101, dtype=float))
    assert got["p50_ms"] == pytest.approx(50.5)
    assert got["p95_ms"] == pytest.approx(95.05)
    assert got["p99_ms"] == pytest.approx(99.01)
    assert got["max_ms"] == 100.0
    assert got["mean_ms"] == pytest.approx(50.5)


def test_percentiles_of_one_value_and_of_none() -> None:
    assert set(bench.percentiles([7.0]).values()) == {7.0}
    assert set(bench.percentiles([]).values()) == {None}


def test_parse_stage_ms_reads_the_gateway_trailer() -> None:
    got = bench.parse_stage_ms("retrieval=0.81;features=1.20;ranking=0.95;rerank=0.10;total=3.40")
    assert got == {
        "retrieval": 0.81,
        "features": 1.2,
        "ranking": 0.95,
        "rerank": 0.1,
        "total": 3.4,
    }
    assert bench.parse_stage_ms(" retrieval = 2 ; total=3;") == {"retrieval": 2.0, "total": 3.0}
    assert bench.parse_stage_ms("") == {}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("retrieval", "must be name=ms"),
        ("=1.0", "must be name=ms"),
        ("retrieval=fast", "must be a number"),
        ("retrieval=-1", "must be >= 0"),
        ("retrieval=nan", "must be >= 0"),
        ("retrieval=inf", "must be >= 0"),
        ("total=1;total=2", "twice"),
    ],
)
def test_parse_stage_ms_refuses_malformed_trailers(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bench.parse_stage_ms(value)


def test_reference_trailer_round_trips_through_the_parser() -> None:
    stages = {"retrieval": 12.345, "features": 230.0, "ranking": 6.0, "total": 248.35}
    got = bench.parse_stage_ms(format_stage_ms(stages))
    assert got == pytest.approx(stages, abs=0.006)


def test_stage_summary_counts_missing_and_malformed_trailers() -> None:
    trailers: list[str | None] = [f"retrieval={i};features={2 * i}" for i in range(1, 101)]
    trailers += [None, None, "garbage"]
    got = bench.stage_summary(trailers)
    assert list(got["stage_p99_ms"]) == ["retrieval", "features"]
    assert got["stage_p99_ms"]["retrieval"] == pytest.approx(99.01)
    assert got["stage_p50_ms"]["features"] == pytest.approx(101.0)
    assert got["stage_samples"] == 100
    assert got["stage_trailers_missing"] == 2
    assert got["stage_trailers_malformed"] == 1


# --- level summaries and the report contract ---------------------------------------------------


def synthetic_run(
    concurrency: int, median_ms: float, n: int = 1000, errors: int = 0, seconds: float = 10.0
) -> bench.LevelRun:
    """``n`` OK answers spread around ``median_ms`` plus ``errors`` deadline errors at 1 s."""
    rng = np.random.default_rng(concurrency)
    ok_ms = median_ms * np.exp(rng.normal(0.0, 0.3, n))
    run = bench.LevelRun(concurrency=concurrency, elapsed_s=seconds)
    run.latencies_ms = [*ok_ms.tolist(), *([1000.0] * errors)]
    run.codes = ["OK"] * n + ["DEADLINE_EXCEEDED"] * errors
    third = median_ms / 3
    run.trailers = [f"retrieval={third:.2f};features={third:.2f};ranking={third:.2f}"] * n
    run.page_lengths = [20] * n
    run.candidates = [500] * n
    run.client_cpu_s = 2.0
    run.server_cpu_s = 10.0
    run.machine_busy_s, run.machine_cpu_s = 15.0, 2 * seconds
    return run


def test_summarize_level_counts_errors_and_feeds_per_second() -> None:
    run = synthetic_run(4, 5.0, n=1000, errors=10, seconds=10.0)
    run.degraded = [(feed_pb2.DEGRADATION_RETRIEVAL,)] * 3 + [
        (feed_pb2.DEGRADATION_FEATURES, feed_pb2.DEGRADATION_RANKING)
    ]
    got = bench.summarize_level(run, 2)
    assert got["requests"] == 1010
    assert got["ok"] == 1000
    assert got["qps"] == pytest.approx(100.0)
    assert got["errors"] == 10
    assert got["errors_by_code"] == {"DEADLINE_EXCEEDED": 10}
    assert got["error_rate"] == pytest.approx(10 / 1010)
    assert got["max_ms"] == 1000.0  # errors count at the time the caller waited
    assert got["p50_ms"] == pytest.approx(5.0, rel=0.1)
    assert got["client_cpu_share"] == pytest.approx(2.0 / 20.0)
    assert got["server_cpu_ms_per_feed"] == pytest.approx(10.0)
    assert got["other_cpu_s"] == pytest.approx(3.0)
    assert got["median_candidates"] == 500
    assert got["empty_pages"] == 0
    assert got["degraded_pages"] == 4
    assert got["degraded_share"] == pytest.approx(0.004)
    assert got["degraded_by"] == {"RETRIEVAL": 3, "FEATURES": 1, "RANKING": 1}
    assert got["full_qps"] == pytest.approx(99.6)
    assert got["server_cpu_ms_per_full_feed"] == pytest.approx(10_000 / 996)


def test_shed_requests_are_counted_apart_from_errors_and_latencies() -> None:
    run = synthetic_run(16, 20.0, n=100, seconds=1.0)
    run.latencies_ms += [1.0] * 50
    run.codes += ["RESOURCE_EXHAUSTED"] * 50
    got = bench.summarize_level(run, 2)
    assert (got["requests"], got["ok"], got["shed"], got["errors"]) == (150, 100, 50, 0)
    assert got["shed_share"] == pytest.approx(1 / 3)
    assert got["shed_p99_ms"] == pytest.approx(1.0)
    assert got["p50_ms"] == pytest.approx(20.0, rel=0.1)  # the admitted feeds' latency


def config(tmp_path: Path, **overrides: object) -> bench.BenchConfig:
    return bench.BenchConfig(home=tmp_path, **overrides)  # type: ignore[arg-type]


def floor_levels() -> dict[int, dict]:
    """A floor of 1.5 / 2 / 5 ms at c1 / c4 / c16 and 5 ms of server CPU per feed."""
    out = {}
    for c, ms, n in ((1, 1.5, 1000), (4, 2.0, 2000), (16, 5.0, 4000)):
        run = synthetic_run(c, ms, n=n)
        run.server_cpu_s = 5.0 * n / 1000
        out[c] = bench.summarize_level(run, 2)
    return out


def fast_run(c: int, ms: float, n: int) -> bench.LevelRun:
    run = synthetic_run(c, ms, n=n)
    run.server_cpu_s = 7.5 * n / 1000  # 1.5 x the floor's 5 ms per feed
    return run


def test_report_has_the_contract_keys_and_meets_targets_of_a_fast_mesh(tmp_path: Path) -> None:
    homefeed = {
        c: bench.summarize_level(fast_run(c, ms, n=3500 if c == 16 else 1000), 2)
        for c, ms in ((1, 2.0), (4, 2.5), (16, 8.0))
    }
    reference = {4: bench.summarize_level(synthetic_run(4, 300.0, n=60), 2)}
    report = bench.build_report(
        config(tmp_path), homefeed, reference, 2, {"git": {"x": 1}}, floor_levels()
    )
    json.dumps(report)  # serializable as is
    for level in ("c1", "c4", "c16"):
        for key in ("p50_ms", "p95_ms", "p99_ms", "qps", "full_qps", "degraded_share", "errors"):
            assert isinstance(report["homefeed"][level][key], int | float), (level, key)
        for key in ("qps", "p50_ms", "p99_ms", "server_cpu_ms_per_feed"):
            assert isinstance(report["floor"][level][key], int | float), (level, key)
        assert set(report["ratios"][level]) == {
            "p50",
            "p99",
            "server_cpu_per_full_feed",
            "full_qps",
        }
    for key in ("p50_ms", "p99_ms", "qps", "errors"):
        assert isinstance(report["reference"]["c4"][key], int | float), key
    assert report["ratios"]["c1"]["p50"] == pytest.approx(
        report["homefeed"]["c1"]["p50_ms"] / report["floor"]["c1"]["p50_ms"]
    )
    assert set(report["stages_p99_ms"]) >= {"retrieval", "features", "ranking"}
    assert report["stages_level"] == "c4"
    assert (report["candidates"], report["preset"], report["cpu_count"]) == (500, "small", 2)
    assert report["git"] == {"x": 1}
    ratio = report["reference"]["c4"]["p99_ms"] / report["homefeed"]["c4"]["p99_ms"]
    assert report["ratio_reference_p99_to_homefeed_p99_c4"] == pytest.approx(ratio)
    assert report["all_targets_met"], report["targets"]
    assert report["targets_met"] == report["targets_measured"] == len(bench.TARGETS)
    assert report["ratio_is_lower_bound"] is False

    cut = {4: bench.summarize_level(synthetic_run(4, 300.0, n=60, errors=2), 2)}
    report = bench.build_report(config(tmp_path), homefeed, cut, 2, floor=floor_levels())
    assert report["ratio_is_lower_bound"] is True
    assert report["reference"]["c4"]["p99_ms"] == 1000.0
    assert "lower bounds" in bench.format_table(report)


def test_full_feeds_target_counts_pages_without_a_fallback_only(tmp_path: Path) -> None:
    run = synthetic_run(16, 8.0, n=3000, seconds=10.0)  # 300 feeds/s
    run.degraded = [(feed_pb2.DEGRADATION_FEATURES,)] * 1500  # half of them degraded
    floor = floor_levels()  # 400 feeds/s at c16
    report = bench.build_report(
        config(tmp_path), {16: bench.summarize_level(run, 2)}, {}, 2, floor=floor
    )
    assert report["homefeed"]["c16"]["qps"] == pytest.approx(300.0)
    target = report["targets"]["c16_full_qps_vs_floor"]
    assert (target["value"], target["met"]) == (pytest.approx(150.0 / 400.0), False)
    assert report["targets"]["c16_degraded_share"]["met"] is False
    cpu = report["targets"]["c16_cpu_vs_floor"]  # 10 s over 1500 full feeds vs 5 ms
    assert cpu["value"] == pytest.approx(10_000 / 1500 / 5.0)
    assert "FEATURES" in bench.format_table(report)


def test_report_marks_missed_and_unmeasured_targets(tmp_path: Path) -> None:
    homefeed = {
        1: bench.summarize_level(synthetic_run(1, 12.0), 2),
        16: bench.summarize_level(synthetic_run(16, 30.0, n=1500), 2),
    }
    report = bench.build_report(config(tmp_path), homefeed, {}, 2, floor=floor_levels())
    targets = report["targets"]
    assert targets["c1_p50_vs_floor"]["met"] is False  # 12 ms vs 1.5 ms
    assert targets["c1_p50_vs_floor"]["value"] == pytest.approx(8.0, rel=0.1)
    assert targets["c4_p99_vs_floor"]["met"] is None  # c4 not run
    assert targets["reference_over_homefeed_p99_c4"]["value"] is None
    assert targets["errors"]["met"] is True
    assert report["stages_level"] == "c1"  # no c4: the lowest level run
    assert report["all_targets_met"] is False
    table = bench.format_table(report)
    assert "[MISS] p50 at concurrency 1, x floor" in table
    assert "[n/a ]" in table


def test_report_without_homefeed_levels_has_no_stage_figures(tmp_path: Path) -> None:
    reference = {4: bench.summarize_level(synthetic_run(4, 300.0, n=60), 2)}
    report = bench.build_report(config(tmp_path, levels=()), {}, reference, 2)
    assert report["stages_p99_ms"] == {"retrieval": None, "features": None, "ranking": None}
    assert report["stages_level"] is None
    assert report["homefeed"] == {}
    assert "reference" in bench.format_table(report)


# --- configuration, requests and prerequisites -------------------------------------------------


def test_parse_args_reads_levels_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOMEFEED_BENCH_SECONDS", "3")
    cfg = bench.parse_args(["--levels", "1,4,4,16", "--reference-levels", "", "--warmup", "0"])
    assert cfg.levels == (1, 4, 16)
    assert cfg.reference_levels == ()
    assert cfg.seconds == 3.0
    assert cfg.warmup == 0.0
    assert cfg.dataset == "sim-small"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--levels", "1,x"], "comma-separated"),
        (["--levels", "0"], "1..1024"),
        (["--seconds", "0"], "seconds must be > 0"),
        (["--levels", "", "--reference-levels", ""], "no concurrency level"),
    ],
)
def test_parse_args_refuses_bad_values(args: list[str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        bench.parse_args(args)


def test_make_requests_mixes_users_surfaces_and_carts() -> None:
    users = {
        "user_id": np.arange(100, 200, dtype=np.int64),
        "country": np.array(["US", "DE"] * 50, dtype=object),
        "device": np.array(["ios"] * 100, dtype=object),
    }
    items = np.arange(1000, 1050, dtype=np.int64)
    requests = bench.make_requests(users, items, 4000, np.random.default_rng(0), page_size=20)
    known = [r for r in requests if 100 <= r.user_id < 200]
    unknown = [r for r in requests if r.user_id >= 200]
    assert len(known) + len(unknown) == 4000
    assert 0.08 < len(unknown) / 4000 < 0.12
    checkout = [r for r in requests if r.surface == common_pb2.SURFACE_CHECKOUT]
    assert 0.17 < len(checkout) / 4000 < 0.23
    assert all(1 <= len(r.cart_item_ids) <= 3 for r in checkout)
    assert all(set(r.cart_item_ids) <= set(items.tolist()) for r in checkout)
    assert all(len(set(r.cart_item_ids)) == len(r.cart_item_ids) for r in checkout)
    home = [r for r in requests if r.surface == common_pb2.SURFACE_HOME]
    assert all(not r.cart_item_ids for r in home)
    assert all(r.page_size == 20 and not r.request_id for r in requests)
    assert all(
        r.context.country == ("US" if r.user_id % 2 == 0 else "DE") and r.context.device == "ios"
        for r in known
    )


def test_prerequisites_say_to_run_make_demo(tmp_path: Path) -> None:
    with pytest.raises(bench.BenchError, match=r"run `make demo` first"):
        bench.check_prerequisites(config(tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing created on the way


def test_prerequisites_pass_on_a_trained_home_and_catch_a_stale_bundle(
    tiny_dataset: dict, tiny_trained: dict, home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = bench.BenchConfig(home=home.home, preset=tiny_dataset["dataset"].removeprefix("sim-"))
    bench.check_prerequisites(cfg)
    import contract.features as ranking_features

    newer = ranking_features.FeatureSchema(("a_new_feature",), ("float32",))
    monkeypatch.setattr(ranking_features, "feature_schema", lambda: newer)
    with pytest.raises(bench.BenchError, match=r"older than the features; run `make demo` again"):
        bench.check_prerequisites(cfg)


# --- the load loop against a stand-in gateway --------------------------------------------------


class StandIn(feed_pb2_grpc.FeedServiceServicer):
    """Answers odd users with a page and a stage trailer, even users with INVALID_ARGUMENT."""

    def GetFeed(  # noqa: N802
        self, request: feed_pb2.GetFeedRequest, context: grpc.ServicerContext
    ) -> feed_pb2.GetFeedResponse:
        if request.user_id % 2 == 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "even users are refused")
        context.set_trailing_metadata((("hf-stage-ms", "retrieval=0.50;total=1.00"),))
        response = feed_pb2.GetFeedResponse(candidates=500)
        response.item_ids.extend(range(request.page_size))
        return response


def test_closed_loop_records_answers_errors_and_trailers() -> None:
    server = grpc.server(ThreadPoolExecutor(4))
    feed_pb2_grpc.add_FeedServiceServicer_to_server(StandIn(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        payloads = itertools.cycle(
            feed_pb2.GetFeedRequest(user_id=u, page_size=5).SerializeToString() for u in (1, 2, 3)
        )
        run = asyncio.run(
            bench._run_level_async(f"127.0.0.1:{port}", payloads, 3, 0.1, 0.5, 1.0, None)
        )
    finally:
        server.stop(0)
    summary = bench.summarize_level(run, 2)
    assert summary["ok"] > 10
    assert summary["errors_by_code"] == {"INVALID_ARGUMENT": summary["errors"]}
    assert summary["errors"] == pytest.approx(summary["ok"] / 2, abs=4)  # one in three refused
    assert summary["stage_p99_ms"] == {"retrieval": 0.5, "total": 1.0}
    assert summary["mean_page_length"] == 5
    assert summary["median_candidates"] == 500
    assert 0.5 <= run.elapsed_s < 1.5
    assert summary["client_cpu_s"] > 0


# --- the reference -----------------------------------------------------------------------------


def feed_request(**fields: object) -> feed_pb2.GetFeedRequest:
    base: dict[str, object] = {
        "user_id": 3,
        "surface": common_pb2.SURFACE_HOME,
        "page_size": 20,
        "context": common_pb2.RequestContext(country="US", device="ios"),
    }
    base.update(fields)
    return feed_pb2.GetFeedRequest(**base)


def test_reference_request_to_domain() -> None:
    got = to_domain(feed_request(surface=common_pb2.SURFACE_CHECKOUT, cart_item_ids=[5, 6]))
    assert (got.user_id, got.surface, got.page_size) == (3, "CHECKOUT", 20)
    assert got.cart.tolist() == [5, 6]
    assert (got.country, got.device, got.when) == ("US", "ios", None)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"page_size": 0}, "page_size must be 1..100, got 0"),
        ({"page_size": 101}, "page_size must be 1..100, got 101"),
        ({"surface": common_pb2.SURFACE_UNSPECIFIED}, "surface must be one of"),
        ({"cart_item_ids": list(range(101))}, "cart_item_ids must have at most 100"),
        ({"cart_item_ids": [-4]}, "non-negative"),
        ({"context": common_pb2.RequestContext(country="us")}, "context.country"),
        ({"context": common_pb2.RequestContext(device="tv")}, "context.device must be one of"),
    ],
)
def test_reference_refuses_bad_requests(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        to_domain(feed_request(**fields))


def test_reference_core_ranks_a_page_on_the_tiny_fixtures(
    tiny_dataset: dict, tiny_bundle: Path, home: Paths
) -> None:
    feed = ReferenceFeed.open(home.home, tiny_dataset["dataset"], tiny_bundle, candidates=60)
    cart = feed.item_ids[:3]
    for user, surface in ((0, "HOME"), (10**12, "HOME"), (1, "CHECKOUT")):
        page = feed.feed(
            FeedRequest(user_id=user, surface=surface, page_size=10, cart=cart, country="DE")
        )
        assert 0 < len(page.item_ids) <= 10
        assert len(set(page.item_ids.tolist())) == len(page.item_ids)
        assert not set(page.item_ids.tolist()) & set(cart.tolist())
        assert np.all(np.diff(page.egmv) <= 0)
        assert np.all(page.egmv >= 0)
        assert page.candidates == 60
        assert set(page.stage_ms) == {"retrieval", "features", "ranking", "total"}
        assert page.model_version


def test_reference_content_affinity_is_the_cosine_with_the_users_profile(
    tiny_dataset: dict, tiny_bundle: Path, home: Paths
) -> None:
    """The reference's obvious cosine agrees with ``contract.content.similarity`` over the
    bundle's catalogue content; 0 for a user without a profile."""
    feed = ReferenceFeed.open(home.home, tiny_dataset["dataset"], tiny_bundle, candidates=60)
    users = list(range(60))
    got = feed.store.get_online_features(
        features=[f"{S.USER_CONTENT_PROFILE}:{S.CONTENT_PROFILE}"],
        entity_rows=[{"user_id": u} for u in users],
    ).to_dict()[S.CONTENT_PROFILE]
    user, profile = next((u, p) for u, p in zip(users, got, strict=True) if p)
    catalog = Catalog.load(tiny_bundle / B.CATALOG)
    assert catalog.unit_content.shape[1] == len(profile) > 0
    items = feed.item_ids[:50]
    unit = catalog.unit_content[np.searchsorted(catalog.item_ids, items)]
    when = datetime(2026, 1, 14, tzinfo=UTC)
    columns = feed.candidate_columns(FeedRequest(user, "HOME", 10), items, when)
    cosine = np.asarray(columns[S.CONTENT_AFFINITY_FOR_ITEM])
    np.testing.assert_allclose(cosine, content.similarity(profile, unit), rtol=1e-5, atol=1e-6)
    assert np.abs(cosine).max() > 0.1
    stranger = feed.candidate_columns(FeedRequest(10**12, "HOME", 10), items, when)
    assert (np.asarray(stranger[S.CONTENT_AFFINITY_FOR_ITEM]) == 0).all()
