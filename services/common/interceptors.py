"""The server interceptor every service installs first: error mapping, one log line per RPC,
and per-method latency counters.

- A ``ServiceError`` becomes its status with its message (``INVALID_ARGUMENT: page_size must
  be 1..100, got 500``).
- Any other exception is logged with its traceback and becomes ``INTERNAL: internal error in
  <rpc>: <ExceptionType>``; the server keeps serving.
- A handler that ends the RPC itself (``context.abort`` or ``context.set_code``) keeps its
  status: grpc's abort raises a bare ``Exception`` after recording the code on the context,
  so a code already set on the context means "aborted, let it through".

Only unary-unary handlers are wrapped; streaming ones (health Watch, reflection) pass
through untouched. Wrapped handlers are cached per method, so an RPC costs a dictionary
lookup, two clock reads, a lock and no log formatting unless the level asks for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from services.common import telemetry
from services.common.errors import InvalidArgument, ServiceError

log = logging.getLogger(__name__)

_OK = grpc.StatusCode.OK
_INTERNAL = grpc.StatusCode.INTERNAL
REQUEST_ID_KEY = "x-request-id"


class _MethodStats:
    """Counters of one method; ``ring`` holds the last ``len(ring)`` latencies in ms."""

    __slots__ = ("count", "errors", "lock", "next", "ring")

    def __init__(self, window: int) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.errors = 0
        self.ring = [0.0] * window
        self.next = 0

    def add(self, ms: float, error: bool) -> None:
        with self.lock:
            self.count += 1
            if error:
                self.errors += 1
            self.ring[self.next] = ms
            self.next = (self.next + 1) % len(self.ring)


class LatencyRecorder:
    """Per-method call and error counts plus p50/p99 over the last ``window`` calls.

    Percentiles come from a bounded ring buffer, so memory stays fixed and the figures
    describe recent traffic rather than the whole uptime.
    """

    def __init__(self, window: int = 1024) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self._lock = threading.Lock()
        self._methods: dict[str, _MethodStats] = {}

    def stats(self, method: str) -> _MethodStats:
        """The counters of ``method``, created on first use."""
        stats = self._methods.get(method)
        if stats is None:
            with self._lock:
                stats = self._methods.setdefault(method, _MethodStats(self.window))
        return stats

    def record(self, method: str, ms: float, error: bool = False) -> None:
        self.stats(method).add(ms, error)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """``{method: {count, errors, p50_ms, p99_ms}}`` for every method seen so far."""
        with self._lock:
            methods = list(self._methods.items())
        out: dict[str, dict[str, float]] = {}
        for method, stats in methods:
            with stats.lock:
                count, errors = stats.count, stats.errors
                recent = stats.ring[: min(count, len(stats.ring))]
            p50, p99 = np.percentile(recent, [50, 99]) if recent else (0.0, 0.0)
            out[method] = {
                "count": count,
                "errors": errors,
                "p50_ms": float(p50),
                "p99_ms": float(p99),
            }
        return out


def _request_id(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            return str(value)
    return ""


def _details(context: grpc.ServicerContext) -> str:
    details = context.details()
    return details.decode(errors="replace") if isinstance(details, bytes) else str(details or "")


class ServiceInterceptor(grpc.ServerInterceptor):
    """Maps errors to statuses, logs each RPC and records its latency in ``recorder``."""

    def __init__(self, recorder: LatencyRecorder | None = None) -> None:
        self.recorder = recorder if recorder is not None else LatencyRecorder()
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method: str = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method.lstrip("/"), handler)
        self._cache[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, rpc: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        behavior = handler.unary_unary
        deserialize = handler.request_deserializer
        stats = self.recorder.stats(rpc)
        duration = telemetry.current().rpc_duration  # homefeed_rpc_duration_seconds

        def observe(ms: float, code: grpc.StatusCode) -> None:
            stats.add(ms, code is not _OK)
            duration.record(ms / 1e3, {"rpc": rpc, "code": code.name})

        def failed(
            context: grpc.ServicerContext,
            code: grpc.StatusCode,
            ms: float,
            msg: str,
            level: int = logging.WARNING,
        ) -> None:
            observe(ms, code)
            if not log.isEnabledFor(level):
                return
            log.log(
                level,
                msg,
                extra={
                    "rpc": rpc,
                    "code": code.name,
                    "ms": round(ms, 3),
                    "request_id": _request_id(context),
                },
            )

        tel = telemetry.current()

        def traced(request: Any, context: grpc.ServicerContext) -> Any:
            """``call`` in a SERVER span continuing the caller's trace."""
            span, token = tel.start_server_span(rpc, context.invocation_metadata())
            code = "UNKNOWN"
            try:
                response = call(request, context)
                status = context.code()
                code = "OK" if status is None else status.name
                return response
            except Exception:
                status = context.code()
                code = "UNKNOWN" if status is None else status.name
                raise
            finally:
                tel.end_server_span(span, token, code)

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                if deserialize is not None:
                    request = _parse(deserialize, request)
                response = behavior(request, context)
            except ServiceError as err:
                code = err.grpc_status_code()
                message = bounded(str(err))
                failed(context, code, (time.perf_counter() - start) * 1e3, message, err.log_level)
                context.abort(code, message)
            except Exception as err:
                ms = (time.perf_counter() - start) * 1e3
                code = context.code()
                if code is not None and code is not _OK:  # the handler aborted: keep its status
                    failed(context, code, ms, f"rpc aborted by the handler: {_details(context)}")
                    raise
                observe(ms, _INTERNAL)
                log.exception(
                    "unexpected error",
                    extra={
                        "rpc": rpc,
                        "code": _INTERNAL.name,
                        "ms": round(ms, 3),
                        "request_id": _request_id(context),
                    },
                )
                context.abort(_INTERNAL, f"internal error in {rpc}: {type(err).__name__}")
            ms = (time.perf_counter() - start) * 1e3
            code = context.code()
            if code is None or code is _OK:
                observe(ms, _OK)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "rpc ok",
                        extra={
                            "rpc": rpc,
                            "code": _OK.name,
                            "ms": round(ms, 3),
                            "request_id": _request_id(context),
                        },
                    )
            else:  # the handler set a status and returned
                failed(
                    context,
                    code,
                    ms,
                    f"rpc failed with a status set by the handler: {_details(context)}",
                )
            return response

        # the request arrives as bytes and is parsed inside ``call``: grpc's own parse failure
        # answers INTERNAL and logs a traceback, where a caller's garbage is INVALID_ARGUMENT
        return grpc.unary_unary_rpc_method_handler(
            traced if tel.tracing else call,
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )


MAX_DETAILS = 1000  # characters of a status message; a longer one is cut


def bounded(message: str, limit: int = MAX_DETAILS) -> str:
    """``message`` cut to ``limit`` characters: status details and log lines carry what the
    caller sent, and must not grow with it."""
    if len(message) <= limit:
        return message
    return f"{message[: limit - 30]}... ({len(message)} characters)"


def _parse(deserialize: Callable[[bytes], Any], data: bytes) -> Any:
    """The request message, or InvalidArgument for bytes that are not one (malformed wire
    format, invalid UTF-8 in a string field)."""
    try:
        return deserialize(data)
    except Exception as err:
        what = getattr(getattr(deserialize, "__self__", None), "__name__", "request")
        raise InvalidArgument(
            f"the request is not a valid {what} message ({len(data)} bytes): "
            f"{type(err).__name__}: {bounded(str(err), 200)}"
        ) from None


class MethodFilter(grpc.ServerInterceptor):
    """Refuses the ``refused`` methods (full names, ``/pkg.Service/Method``) with
    PERMISSION_DENIED and ``message``: a service whose admin RPCs are on another port keeps
    them out of its serving port this way, whatever a caller of that port sends."""

    def __init__(self, refused: set[str], message: str) -> None:
        self.refused = frozenset(refused)
        self._handler = grpc.unary_unary_rpc_method_handler(self._refuse)
        self._message = message

    def _refuse(self, request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, self._message)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method in self.refused:
            return self._handler
        return continuation(handler_call_details)
