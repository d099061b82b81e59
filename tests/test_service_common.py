"""services.common: error mapping, health, reflection and graceful drain on a real server on
port 0, plus the validation, matrix, settings, logging and deadline helpers."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import HealthServicer
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from homefeed.common.v1 import common_pb2
from homefeed.feed.v1 import feed_pb2, feed_pb2_grpc

from services.common.context import child_timeout, remaining_seconds
from services.common.errors import (
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
    check_ids,
    check_range,
    check_surface,
)
from services.common.interceptors import LatencyRecorder
from services.common.logs import configure_logging
from services.common.matrix import from_float_matrix, to_float_matrix
from services.common.server import WORKER_THREAD_NAME, build_server, serve
from services.common.settings import (
    ServerSettings,
    SettingsError,
    env_bool,
    env_float,
    env_int,
    env_str,
    require,
)

FEED = feed_pb2.DESCRIPTOR.services_by_name["FeedService"].full_name
GET_FEED = f"{FEED}/GetFeed"
SLOW = 99  # page_size that holds the handler until the test releases it


class _Feed(feed_pb2_grpc.FeedServiceServicer):
    """A throwaway FeedService whose page_size picks the behaviour under test."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.remaining: list[float | None] = []
        self.thread_names: list[str] = []  # the kernel's name of each handler thread

    def GetFeed(  # noqa: N802 (the generated base class names it)
        self, request: feed_pb2.GetFeedRequest, context: grpc.ServicerContext
    ) -> feed_pb2.GetFeedResponse:
        if request.page_size == 500:
            raise InvalidArgument("page_size must be 1..100, got 500")
        if request.page_size == 13:
            raise RuntimeError("boom")
        if request.page_size == 7:
            context.abort(grpc.StatusCode.NOT_FOUND, "x")
        if request.page_size == SLOW:
            self.entered.set()
            # An event instead of a fixed sleep: the test decides when the in-flight call
            # ends, so the drain is observed while it is still running, on a busy machine too.
            self.release.wait(timeout=5.0)
        self.remaining.append(remaining_seconds(context))
        comm = Path(f"/proc/self/task/{threading.get_native_id()}/comm")
        if comm.exists():
            self.thread_names.append(comm.read_text().strip())
        return feed_pb2.GetFeedResponse(request_id=request.request_id, item_ids=[1, 2])


@dataclass
class Served:
    servicer: _Feed
    server: grpc.Server
    port: int
    health: HealthServicer
    settings: ServerSettings
    recorder: LatencyRecorder
    channel: grpc.Channel
    feed: feed_pb2_grpc.FeedServiceStub
    health_stub: health_pb2_grpc.HealthStub


def _build(drain_seconds: float = 5.0, lame_duck_seconds: float = 0.0) -> Served:
    servicer = _Feed()
    recorder = LatencyRecorder(window=16)
    settings = ServerSettings(drain_seconds=drain_seconds, lame_duck_seconds=lame_duck_seconds)
    server, port, health = build_server(
        settings,
        [FEED],
        lambda s: feed_pb2_grpc.add_FeedServiceServicer_to_server(servicer, s),
        recorder=recorder,
    )
    assert port > 0
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return Served(
        servicer,
        server,
        port,
        health,
        settings,
        recorder,
        channel,
        feed_pb2_grpc.FeedServiceStub(channel),
        health_pb2_grpc.HealthStub(channel),
    )


@pytest.fixture
def served() -> Iterator[Served]:
    s = _build()
    s.server.start()
    yield s
    s.channel.close()
    s.server.stop(None)


def _get_feed(s: Served, page_size: int, **kwargs: object) -> feed_pb2.GetFeedResponse:
    return s.feed.GetFeed(
        feed_pb2.GetFeedRequest(request_id="r1", page_size=page_size), timeout=5.0, **kwargs
    )


def _status(s: Served, page_size: int) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        _get_feed(s, page_size)
    return info.value.code(), info.value.details()


# --- the server ---------------------------------------------------------------------------


def test_ok_call_returns_the_response(served: Served) -> None:
    assert list(_get_feed(served, 20).item_ids) == [1, 2]


@pytest.mark.skipif(sys.platform != "linux", reason="thread names in /proc are Linux's")
def test_handlers_run_on_threads_the_kernel_knows_by_name(served: Served) -> None:
    _get_feed(served, 20)
    # top -H, /proc/<pid>/task/*/comm and scripts/bench_threads.py tell them from the rest
    assert served.servicer.thread_names == [WORKER_THREAD_NAME]


def test_service_error_becomes_its_status_with_its_message(served: Served) -> None:
    assert _status(served, 500) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "page_size must be 1..100, got 500",
    )


def test_unexpected_error_is_internal_logged_and_the_server_keeps_serving(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="services.common.interceptors"):
        code, details = _status(served, 13)
    assert code == grpc.StatusCode.INTERNAL
    assert details == f"internal error in {GET_FEED}: RuntimeError"
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1
    assert logged[0].rpc == GET_FEED  # type: ignore[attr-defined]
    assert "boom" in str(logged[0].exc_info[1])  # type: ignore[index]
    assert list(_get_feed(served, 20).item_ids) == [1, 2]


def _raw_call(s: Served, payload: bytes) -> tuple[grpc.StatusCode, str]:
    call = s.channel.unary_unary(f"/{GET_FEED}", request_serializer=None)
    with pytest.raises(grpc.RpcError) as info:
        call(payload, timeout=5.0)
    return info.value.code(), info.value.details()


def test_malformed_requests_are_invalid_argument_without_a_traceback(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    field = feed_pb2.GetFeedRequest.DESCRIPTOR.fields_by_name["request_id"].number
    bad_utf8 = bytes([(field << 3) | 2, 2, 0xFF, 0xFE])
    with caplog.at_level(logging.DEBUG):
        for payload in (b"\xff\xff\xff\xff", bad_utf8, b"\x0a\x7f"):
            code, details = _raw_call(served, payload)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
            assert details.startswith("the request is not a valid GetFeedRequest message (")
            assert len(details) < 400
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    stats = served.recorder.snapshot()[GET_FEED]
    assert (stats["count"], stats["errors"]) == (3, 3)
    assert list(_get_feed(served, 20).item_ids) == [1, 2]


def test_oversized_requests_are_refused_before_the_handler() -> None:
    settings = ServerSettings(max_message_bytes=4096)
    servicer = _Feed()
    server, port, _ = build_server(
        settings, [FEED], lambda s: feed_pb2_grpc.add_FeedServiceServicer_to_server(servicer, s)
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = feed_pb2_grpc.FeedServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.GetFeed(feed_pb2.GetFeedRequest(request_id="x" * 5000), timeout=5.0)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert servicer.remaining == []
    finally:
        server.stop(None)


def test_a_backend_refuses_rpcs_beyond_its_concurrency_limit_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert ServerSettings.from_env("features").max_concurrent_rpcs == 16
    assert ServerSettings.from_env("gateway").max_concurrent_rpcs is None  # derived there
    monkeypatch.setenv("HOMEFEED_RANKING_MAX_CONCURRENT_RPCS", "1")
    settings = ServerSettings.from_env("ranking")
    servicer = _Feed()
    server, port, _ = build_server(
        settings, [FEED], lambda s: feed_pb2_grpc.add_FeedServiceServicer_to_server(servicer, s)
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = feed_pb2_grpc.FeedServiceStub(channel)
            slow = stub.GetFeed.future(feed_pb2.GetFeedRequest(page_size=SLOW), timeout=10)
            assert servicer.entered.wait(5)
            started = time.perf_counter()
            with pytest.raises(grpc.RpcError) as info:
                stub.GetFeed(feed_pb2.GetFeedRequest(page_size=1), timeout=5)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.perf_counter() - started < 1.0  # refused, not queued
            servicer.release.set()
            assert list(slow.result().item_ids) == [1, 2]
    finally:
        server.stop(None)


def test_receive_limits_are_per_service() -> None:
    assert ServerSettings.from_env("gateway").max_message_bytes == 64 * 1024
    assert ServerSettings.from_env("ranking").max_message_bytes == 512 * 1024


def test_handler_abort_keeps_its_status(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="services.common.interceptors"):
        assert _status(served, 7) == (grpc.StatusCode.NOT_FOUND, "x")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "rpc aborted by the handler: x")
    ]


def test_latency_recorder_counts_calls_and_errors(served: Served) -> None:
    for page_size in (20, 20, 500, 13, 7):
        with contextlib.suppress(grpc.RpcError):
            _get_feed(served, page_size)
    stats = served.recorder.snapshot()[GET_FEED]
    assert stats["count"] == 5
    assert stats["errors"] == 3
    assert 0.0 < stats["p50_ms"] <= stats["p99_ms"] < 5000.0


def test_latency_recorder_keeps_only_the_last_window() -> None:
    recorder = LatencyRecorder(window=4)
    for ms in (1000.0, 1000.0, 1.0, 2.0, 3.0, 4.0):
        recorder.record("m", ms)
    recorder.record("m", 5.0, error=True)
    stats = recorder.snapshot()["m"]
    assert (stats["count"], stats["errors"]) == (7, 1)
    assert stats["p99_ms"] < 6.0  # the two 1000 ms calls have left the window
    assert stats["p50_ms"] == 3.5


def test_health_reports_serving_for_the_server_and_each_service(served: Served) -> None:
    for name in ("", FEED):
        reply = served.health_stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as info:
        served.health_stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(served: Served) -> None:
    services = set(ProtoReflectionDescriptorDatabase(served.channel).get_services())
    assert services == {
        FEED,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


def test_handler_sees_the_callers_deadline(served: Served) -> None:
    _get_feed(served, 20)  # timeout=5.0
    served.feed.GetFeed(feed_pb2.GetFeedRequest(page_size=20))  # no deadline
    with_deadline, without = served.servicer.remaining
    # grpc converts the deadline between clocks, so it can read a few ms over the timeout
    assert with_deadline == pytest.approx(5.0, abs=0.5)
    assert without is None


def test_port_in_use_is_refused(served: Served) -> None:
    with pytest.raises(OSError, match=f"cannot bind 127.0.0.1:{served.port}"):
        build_server(ServerSettings(port=served.port), [], lambda s: None)


def test_serve_drains_in_flight_calls_then_stops(capsys: pytest.CaptureFixture[str]) -> None:
    s = _build(drain_seconds=5.0)
    stop = threading.Event()
    stopped: list[str] = []
    thread = threading.Thread(
        target=serve,
        args=(s.server, s.health, s.settings),
        kwargs={"on_stop": lambda: stopped.append("on_stop"), "stop_event": stop},
    )
    thread.start()
    try:
        watch = s.health_stub.Watch(
            health_pb2.HealthCheckRequest(service=FEED), wait_for_ready=True, timeout=10
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        in_flight = s.feed.GetFeed.future(feed_pb2.GetFeedRequest(page_size=SLOW), timeout=10)
        assert s.servicer.entered.wait(5.0)

        stop.set()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # a watcher would otherwise hold the drain for its whole grace
        refused = None
        for _ in range(200):  # until the server stops taking new calls
            served_before = len(s.servicer.remaining)
            try:
                _get_feed(s, 20, wait_for_ready=False)
            except grpc.RpcError as err:
                refused = err.code()
                break
            stop.wait(0.01)
        # grpc core refuses a call racing its shutdown as CANCELLED, a later one as UNAVAILABLE
        assert refused in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert len(s.servicer.remaining) == served_before  # never reached the handler
        assert not in_flight.done() and not stopped  # still draining

        s.servicer.release.set()
        assert list(in_flight.result(timeout=5).item_ids) == [1, 2]
        thread.join(timeout=5)
        assert not thread.is_alive()
        assert stopped == ["on_stop"]
    finally:
        s.servicer.release.set()
        stop.set()
        thread.join(timeout=10)
        s.channel.close()
    # the bound port, not settings.port (0)
    assert capsys.readouterr().out == f"HOMEFEED_READY port={s.port}\n"


def test_lame_duck_keeps_answering_while_not_serving() -> None:
    """After a stop request health says NOT_SERVING at once, yet calls that still arrive
    (routed before the balancer noticed) are answered until the lame-duck period ends."""
    s = _build(drain_seconds=1.0, lame_duck_seconds=1.0)
    stop = threading.Event()
    thread = threading.Thread(
        target=serve, args=(s.server, s.health, s.settings), kwargs={"stop_event": stop}
    )
    thread.start()
    try:
        check = health_pb2.HealthCheckRequest(service=FEED)
        reply = s.health_stub.Check(check, wait_for_ready=True, timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stop.set()
        started = time.monotonic()
        while (
            s.health_stub.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        ):
            assert time.monotonic() - started < 0.5, "health did not turn NOT_SERVING"
        answered = 0
        while time.monotonic() - started < 0.8:  # well inside the lame-duck second
            assert list(_get_feed(s, 20).item_ids) == [1, 2]
            answered += 1
        assert answered > 0
        thread.join(timeout=10)
        assert not thread.is_alive()
        assert time.monotonic() - started >= 1.0  # it did wait out the period
    finally:
        stop.set()
        thread.join(timeout=10)
        s.channel.close()


_SERVE_MAIN = """
from services.common.logs import configure_logging
from services.common.server import WORKER_THREAD_NAME, build_server, serve
from services.common.settings import ServerSettings

configure_logging("probe")
settings = ServerSettings(drain_seconds=1.0, lame_duck_seconds=0.2)
server, port, health = build_server(settings, [], lambda s: None)
serve(server, health, settings, on_stop=lambda: print("on_stop", flush=True))
"""


def test_sigterm_drains_and_exits_cleanly() -> None:
    """The real signal path, in a child process so the test runner is not signalled."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE_MAIN],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert ready.startswith("HOMEFEED_READY port="), proc.stderr.read() if proc.stderr else ""
        port = int(ready.split("=", 1)[1])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out == "on_stop\n"
    messages = [json.loads(line)["msg"] for line in err.splitlines()]
    assert messages == [
        "listening",
        "lame duck: not serving, still answering",
        "draining",
        "stopped",
    ]


# --- errors and validation ----------------------------------------------------------------


def test_service_errors_carry_their_status() -> None:
    assert ServiceError("x").grpc_status_code() == grpc.StatusCode.INTERNAL
    assert InvalidArgument("x").grpc_status_code() == grpc.StatusCode.INVALID_ARGUMENT
    assert NotFound("x").grpc_status_code() == grpc.StatusCode.NOT_FOUND
    assert Unavailable("x").grpc_status_code() == grpc.StatusCode.UNAVAILABLE


def test_check_range_accepts_the_limits_and_names_the_field() -> None:
    assert check_range("page_size", 1, 1, 100) == 1
    assert check_range("page_size", 100, 1, 100) == 100
    for bad in (0, 101, 500):
        with pytest.raises(InvalidArgument, match=rf"^page_size must be 1\.\.100, got {bad}$"):
            check_range("page_size", bad, 1, 100)
    with pytest.raises(InvalidArgument, match=r"^epsilon must be 0\.0\.\.1\.0, got nan$"):
        check_range("epsilon", float("nan"), 0.0, 1.0)


def test_check_ids_returns_int64_from_lists_and_proto_fields() -> None:
    request = feed_pb2.GetFeedRequest(cart_item_ids=[5, 3, 9])
    out = check_ids("cart_item_ids", request.cart_item_ids, max_len=100)
    assert out.dtype == np.int64 and out.tolist() == [5, 3, 9]
    assert check_ids("cart_item_ids", [], max_len=100).dtype == np.int64
    assert check_ids("ids", np.array([1, 2], dtype=np.uint32), max_len=2).dtype == np.int64


@pytest.mark.parametrize(
    ("ids", "kwargs", "message"),
    [
        (list(range(101)), {}, "cart_item_ids must have at most 100 ids, got 101"),
        ([], {"min_len": 1}, "cart_item_ids must have at least 1 ids, got 0"),
        (
            [4, -1, 2, -7, -8, -9, -10, -11],
            {},
            "cart_item_ids must be non-negative ids, got 6 negative: [-1, -7, -8, -9, -10, ...]",
        ),
        (
            [3, 1, 3, 2, 1],
            {"unique": True},
            "cart_item_ids must not repeat ids, got 2 repeated: [1, 3]",
        ),
        (np.array([1.5, 2.0]), {}, "cart_item_ids must be integer ids, got dtype float64"),
        (
            np.zeros((2, 2), np.int64),
            {},
            "cart_item_ids must be a flat list of ids, got shape (2, 2)",
        ),
    ],
)
def test_check_ids_rejects_with_field_count_and_values(
    ids: list[int] | np.ndarray, kwargs: dict, message: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_ids("cart_item_ids", ids, max_len=100, **kwargs)
    assert str(info.value) == message


def test_repeated_ids_are_fine_unless_unique_is_asked() -> None:
    assert check_ids("ids", [1, 1], max_len=2).tolist() == [1, 1]


def test_check_surface() -> None:
    assert check_surface(common_pb2.SURFACE_HOME) == common_pb2.SURFACE_HOME
    assert check_surface(common_pb2.SURFACE_CHECKOUT) == common_pb2.SURFACE_CHECKOUT
    allowed = "surface must be one of SURFACE_HOME, SURFACE_CHECKOUT, got"
    with pytest.raises(InvalidArgument, match=f"^{allowed} SURFACE_UNSPECIFIED$"):
        check_surface(common_pb2.SURFACE_UNSPECIFIED)
    with pytest.raises(InvalidArgument, match=f"^{allowed} 9$"):
        check_surface(9)


# --- matrix -------------------------------------------------------------------------------


def test_matrix_round_trip_is_bit_exact() -> None:
    X = np.random.default_rng(0).random((500, 40), dtype=np.float32)
    X[0, :4] = [np.nan, -0.0, np.inf, 1e-45]
    msg = to_float_matrix(X, "abc")
    assert (msg.rows, msg.cols, msg.schema_hash) == (500, 40, "abc")
    back = from_float_matrix(common_pb2.FloatMatrix.FromString(msg.SerializeToString()), 40)
    assert back.dtype == np.float32 and back.shape == (500, 40)
    assert back.tobytes() == X.tobytes()


def test_matrix_fast_path_writes_what_the_plain_field_would() -> None:
    X = np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2]  # float64, not contiguous
    plain = common_pb2.FloatMatrix(rows=3, cols=2, schema_hash="h", values=X.ravel().tolist())
    assert to_float_matrix(X, "h").SerializeToString() == plain.SerializeToString()


def test_matrix_without_rows() -> None:
    back = from_float_matrix(to_float_matrix(np.zeros((0, 40), np.float32), "h"), 40)
    assert back.shape == (0, 40)


def test_matrix_mismatches_are_invalid_argument() -> None:
    short = common_pb2.FloatMatrix(rows=2, cols=3, values=[1.0] * 5)
    with pytest.raises(InvalidArgument, match=r"rows x cols = 2 x 3 = 6, got 5"):
        from_float_matrix(short)
    msg = to_float_matrix(np.zeros((2, 3), np.float32), "h")
    with pytest.raises(
        InvalidArgument, match=r"must have 40 columns \(the feature schema's\), got 3$"
    ):
        from_float_matrix(msg, expected_cols=40)
    with pytest.raises(ValueError, match="must be 2-D"):
        to_float_matrix(np.zeros(3, np.float32), "h")


# --- settings -----------------------------------------------------------------------------


def test_require_names_the_missing_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOMEFEED_RANKING_BUNDLE", raising=False)
    with pytest.raises(
        SettingsError, match=r"^HOMEFEED_RANKING_BUNDLE is required: the bundle directory$"
    ):
        require("HOMEFEED_RANKING_BUNDLE", "the bundle directory")
    monkeypatch.setenv("HOMEFEED_RANKING_BUNDLE", "  ")
    with pytest.raises(SettingsError, match="HOMEFEED_RANKING_BUNDLE is required"):
        require("HOMEFEED_RANKING_BUNDLE")
    monkeypatch.setenv("HOMEFEED_RANKING_BUNDLE", "/b")
    assert require("HOMEFEED_RANKING_BUNDLE") == "/b"


def test_typed_env_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_I", "42")
    monkeypatch.setenv("HF_F", "0.25")
    monkeypatch.setenv("HF_B", "Yes")
    monkeypatch.setenv("HF_S", "x")
    monkeypatch.delenv("HF_UNSET", raising=False)
    assert (env_int("HF_I"), env_float("HF_F"), env_bool("HF_B"), env_str("HF_S")) == (
        42,
        0.25,
        True,
        "x",
    )
    assert env_int("HF_UNSET") is None and env_int("HF_UNSET", 3) == 3


@pytest.mark.parametrize(
    ("reader", "value", "message"),
    [
        (env_int, "4.5", "HF_X must be an integer, got '4.5'"),
        (env_float, "fast", "HF_X must be a number, got 'fast'"),
        (env_bool, "maybe", "HF_X must be one of 1/0, true/false, yes/no, on/off, got 'maybe'"),
    ],
)
def test_malformed_env_values_name_variable_and_value(
    monkeypatch: pytest.MonkeyPatch, reader: object, value: str, message: str
) -> None:
    monkeypatch.setenv("HF_X", value)
    with pytest.raises(SettingsError) as info:
        reader("HF_X")  # type: ignore[operator]
    assert str(info.value) == message


def test_server_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOMEFEED_RANKING_PORT", "50051")
    monkeypatch.setenv("HOMEFEED_RANKING_DRAIN_SECONDS", "1.5")
    monkeypatch.setenv("HOMEFEED_RANKING_LOG_LEVEL", "debug")
    s = ServerSettings.from_env("ranking")
    assert (s.host, s.port, s.drain_seconds, s.log_level, s.max_workers) == (
        "127.0.0.1",
        50051,
        1.5,
        "DEBUG",
        8,
    )
    monkeypatch.setenv("HOMEFEED_RANKING_PORT", "70000")
    with pytest.raises(SettingsError) as info:
        ServerSettings.from_env("ranking")
    assert str(info.value) == "HOMEFEED_RANKING_PORT must be 0..65535, got 70000"
    monkeypatch.setenv("HOMEFEED_RANKING_PORT", "http")
    with pytest.raises(SettingsError) as info:
        ServerSettings.from_env("ranking")
    assert str(info.value) == "HOMEFEED_RANKING_PORT must be an integer, got 'http'"


# --- logs and deadlines -------------------------------------------------------------------


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def test_logs_are_one_json_object_per_record(root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    configure_logging("ranking", "DEBUG", stream=stream)
    configure_logging("ranking", "INFO", stream=stream)  # idempotent: still one handler
    log = logging.getLogger("homefeed.test")
    log.debug("hidden at INFO")
    log.warning("rpc failed", extra={"rpc": GET_FEED, "code": "INTERNAL", "ms": 1.5})
    try:
        raise ValueError("bad")
    except ValueError:
        log.exception("with traceback")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert {k: first[k] for k in ("level", "service", "logger", "msg", "rpc", "code", "ms")} == {
        "level": "WARNING",
        "service": "ranking",
        "logger": "homefeed.test",
        "msg": "rpc failed",
        "rpc": GET_FEED,
        "code": "INTERNAL",
        "ms": 1.5,
    }
    assert second["level"] == "ERROR"
    assert "Traceback" in second["exc"] and "ValueError: bad" in second["exc"]


def test_configure_logging_rejects_unknown_levels(root_logger: logging.Logger) -> None:
    with pytest.raises(ValueError, match="log level must be one of"):
        configure_logging("ranking", "LOUD")


class _Deadline:
    def __init__(self, remaining: float) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float:
        return self.remaining


def test_child_timeout_takes_a_share_of_the_callers_deadline() -> None:
    ctx = _Deadline(0.1)
    assert child_timeout(ctx, 0.5, cap_s=1.0) == pytest.approx(0.05)
    assert child_timeout(_Deadline(10.0), 0.5, cap_s=1.0) == 1.0
    assert child_timeout(_Deadline(0.0), 0.5, cap_s=1.0, floor_s=0.002) == 0.002
    assert child_timeout(None, 0.5, cap_s=0.3) == 0.3
    assert remaining_seconds(_Deadline(1e12)) is None
    with pytest.raises(ValueError, match="fraction must be in"):
        child_timeout(None, 0.0, cap_s=1.0)


def test_a_stop_that_hangs_dumps_every_stack_and_exits() -> None:
    """A stop stuck past its deadline (a lock, a thread that never returns) must not wait
    for the orchestrator's SIGKILL in silence: the stacks go to stderr, the status is 1."""
    script = (
        "import threading, time\n"
        "from services.common.server import _arm_stop_deadline\n"
        "_arm_stop_deadline(0.5)\n"
        "threading.Event().wait(30)  # stuck\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert time.perf_counter() - t0 < 20
    assert "most recent call first" in proc.stderr and "<string>" in proc.stderr
