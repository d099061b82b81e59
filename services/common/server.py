"""Server bootstrap shared by every service: build a grpc server with our interceptor, the
stock health service and reflection; serve it until SIGTERM/SIGINT, then drain.

A service's ``server.py`` is then only its own wiring::

    settings = ServerSettings.from_env("ranking")
    server, port, health = build_server(
        settings, [RANKING_SERVICE_NAME], lambda s: add_RankingServiceServicer_to_server(svc, s)
    )
    serve(server, health, settings, on_stop=model.close)
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import gc
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import NoReturn, Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import telemetry
from services.common.interceptors import LatencyRecorder, ServiceInterceptor
from services.common.logs import configure_logging
from services.common.settings import SEND_LIMIT, ServerSettings, SettingsError
from services.common.tls import TlsFiles

log = logging.getLogger(__name__)

READY_LINE = "HOMEFEED_READY port={port}"
# A stop still running this long after its lame-duck and drain periods is stuck: the stacks
# are dumped and the process exits (status 1) rather than waiting for a SIGKILL.
STOP_OVERDUE_SECONDS = 15.0

# What build_server made for each server: the bound port, so serve() can report it when
# settings.port is 0, and the worker pool, so serve() can release its threads at the end.
_built: weakref.WeakKeyDictionary[grpc.Server, tuple[int, ThreadPoolExecutor]] = (
    weakref.WeakKeyDictionary()
)


def build_server(
    settings: ServerSettings,
    service_names: Sequence[str],
    register: Callable[[grpc.Server], None],
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    recorder: LatencyRecorder | None = None,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A bound, not yet started server and the port it got (a free one when settings.port is 0).

    ``service_names`` are the full proto names (``homefeed.ranking.v1.RankingService``) that
    ``register`` adds; each is reported SERVING by health and listed by reflection. Pass a
    ``recorder`` to read the per-method latency counters of ``ServiceInterceptor``.
    """
    executor = ThreadPoolExecutor(
        settings.max_workers, thread_name_prefix="grpc-worker", initializer=name_os_thread
    )
    server = grpc.server(
        executor,
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        interceptors=[ServiceInterceptor(recorder), *interceptors],
        options=server_options(settings),
    )
    register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *service_names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.port}"
    files = TlsFiles.from_env()  # mutual TLS when configured (services.common.tls)
    try:
        if files is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, files.server_credentials())
    except RuntimeError as err:
        raise OSError(f"cannot bind {address}: {err}") from err
    if port == 0:
        raise OSError(f"cannot bind {address}: the port is taken or the host is not local")
    _built[server] = (port, executor)
    return server, port, health_servicer


WORKER_THREAD_NAME = "grpc-worker"
_PR_SET_NAME = 15  # prctl(2): name the calling thread


def name_os_thread(name: str = WORKER_THREAD_NAME) -> None:
    """Give the calling thread ``name`` (at most 15 bytes) in the kernel too, where
    ``top -H``, ``/proc/<pid>/task/*/comm`` and profilers see it: the handler threads of a
    service then stand apart from gRPC core's ``event_engine`` threads and the rest. A no-op
    outside Linux."""
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def server_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """The channel arguments of every service's server."""
    return [
        ("grpc.max_send_message_length", SEND_LIMIT),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # two servers must never share a port by accident (a stale one would get traffic)
        ("grpc.so_reuseport", 0),
        # the gateway's keepalive pings (every 10 s, also between calls) are welcome
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def serve(
    server: grpc.Server,
    health_servicer: health.HealthServicer,
    settings: ServerSettings,
    on_stop: Callable[[], None] | None = None,
    stop_event: threading.Event | None = None,
) -> None:
    """Start ``server`` and block until it has drained after a stop request.

    A stop request is SIGTERM or SIGINT (handlers are installed when called from the main
    thread) or ``stop_event`` being set, which is how tests and supervisors in-process stop
    it. Then, like a lame duck: health turns NOT_SERVING for every service (load balancers
    and health-checking clients stop sending) while the server keeps answering for
    ``settings.lame_duck_seconds``, so a request routed before they noticed is still served;
    then it refuses new RPCs and gives in-flight ones ``settings.drain_seconds`` to finish,
    ``on_stop`` runs (close channels, flush logs) once they have, and this returns. A second
    signal skips what is left of the lame-duck period.

    Once listening it prints ``HOMEFEED_READY port=<port>`` on stdout for a supervisor.
    """
    stop = stop_event if stop_event is not None else threading.Event()
    hurry = threading.Event()  # a second stop request: end the lame-duck period now
    port, executor = _built.get(server, (settings.port, None))
    previous = _install_signal_handlers(stop, hurry)
    try:
        _freeze_start_up_heap()
        server.start()
        log.info("listening", extra={"port": port, "host": settings.host})
        sys.stdout.write(READY_LINE.format(port=port) + "\n")
        sys.stdout.flush()
        stop.wait()
        # A stop that hangs (a stuck thread, a lock) must not outlive the pod's grace period
        # silently: past the drain's own budget, every thread's stack goes to stderr and the
        # process exits with status 1.
        _arm_stop_deadline(
            settings.lame_duck_seconds + settings.drain_seconds + STOP_OVERDUE_SECONDS
        )
        log.info(
            "lame duck: not serving, still answering",
            extra={"port": port, "lame_duck_seconds": settings.lame_duck_seconds},
        )
        health_servicer.enter_graceful_shutdown()
        if settings.lame_duck_seconds > 0:
            hurry.wait(settings.lame_duck_seconds)
        log.info("draining", extra={"port": port, "drain_seconds": settings.drain_seconds})
        server.stop(settings.drain_seconds).wait()
        if on_stop is not None:
            try:
                on_stop()
            except Exception:  # the server is down already; finish the shutdown regardless
                log.exception("on_stop failed")
        server.wait_for_termination()
        if executor is not None:
            executor.shutdown(wait=False)
        log.info("stopped", extra={"port": port})
    finally:
        faulthandler.cancel_dump_traceback_later()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _arm_stop_deadline(seconds: float) -> None:
    """Past ``seconds`` from now, dump every thread's stack to stderr and exit (status 1),
    unless ``faulthandler.cancel_dump_traceback_later`` runs first. Without a real stderr
    file (a test capturing it) there is no deadline."""
    for stream in (sys.stderr, sys.__stderr__):
        if stream is None:
            continue
        try:
            faulthandler.dump_traceback_later(seconds, exit=True, file=stream)
            return
        except (AttributeError, OSError, ValueError):  # no fileno(): try the next one
            continue


def _freeze_start_up_heap() -> None:
    """Move everything start-up allocated (Feast, MLflow, the bundle: hundreds of thousands
    of objects that live as long as the process) out of the cyclic garbage collector's
    reach. Otherwise every full collection walks all of them, which shows as CPU per request
    and as latency spikes; the requests' own garbage is still collected as usual."""
    gc.collect()
    gc.freeze()


_Handler = Callable[[int, FrameType | None], object] | int | None


def _install_signal_handlers(stop: threading.Event, hurry: threading.Event) -> dict[int, _Handler]:
    """SIGTERM/SIGINT set ``stop``, a second one ``hurry``; returns the handlers they
    replaced. Signal handlers can only be installed from the main thread; elsewhere this
    does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            log.warning(
                "already stopping: draining now", extra={"signal": signal.Signals(signum).name}
            )
            hurry.set()
        stop.set()

    previous: dict[int, _Handler] = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.getsignal(signum)
        signal.signal(signum, on_signal)
    return previous


def exit_after(main: Callable[[], int]) -> NoReturn:
    """Run a service's ``main`` and exit with its status, skipping the interpreter's teardown.

    Once ``serve`` has drained there is nothing left to clean up, yet unloading Feast,
    ScaNN, DuckDB and friends takes the process another 2-4 s to exit, which is what
    ``homefeed down`` and a rolling restart would wait for. Output is flushed first.
    """
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class StartupError(RuntimeError):
    """A service cannot start: the message names what it tried to load (bundle, dataset,
    store) and the reason."""


class _HasServer(Protocol):
    @property
    def server(self) -> ServerSettings: ...


S = TypeVar("S", bound=_HasServer)
Started = tuple[grpc.Server, health.HealthServicer, Callable[[], None] | None]


def run_service(service: str, load_settings: Callable[[], S], start: Callable[[S], Started]) -> int:
    """A service's ``main``: settings from the environment, JSON logs, ``start`` (a bound
    server, its health servicer and what to close after the drain), then ``serve`` until
    SIGTERM. Exit status 1 with the reason on stderr when the settings are bad or the
    service cannot start (``StartupError``, a port it cannot bind)."""
    try:
        settings = load_settings()
        TlsFiles.from_env()  # all three files or none, readable
    except SettingsError as err:
        sys.stderr.write(f"{service}: {err}\n")
        return 1
    configure_logging(service, settings.server.log_level)
    try:
        telemetry.configure(service, settings.server.metrics_port, settings.server.host)
    except OSError as err:  # the metrics port is taken
        log.error("cannot start", extra={"reason": f"metrics endpoint: {err}"})
        sys.stderr.write(f"{service}: metrics endpoint: {err}\n")
        return 1
    try:
        server, health_servicer, on_stop = start(settings)
    except (StartupError, OSError) as err:
        log.error("cannot start", extra={"reason": str(err)})
        sys.stderr.write(f"{service}: {err}\n")
        return 1
    serve(server, health_servicer, settings.server, on_stop=on_stop)
    _arm_stop_deadline(STOP_OVERDUE_SECONDS)  # as in ``serve``
    telemetry.current().shutdown()
    faulthandler.cancel_dump_traceback_later()
    return 0
