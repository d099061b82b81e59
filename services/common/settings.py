"""Typed settings from environment variables.

A missing required variable or a value of the wrong type fails at start with the variable's
name and what it should hold, not later with a ``KeyError`` deep in a request. An empty value
counts as unset, as Kubernetes renders an optional value left blank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import overload

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None or value.strip() == "" else value.strip()


@overload
def env_str(name: str, default: str) -> str: ...
@overload
def env_str(name: str, default: None = None) -> str | None: ...
def env_str(name: str, default: str | None = None) -> str | None:
    value = _raw(name)
    return default if value is None else value


@overload
def env_int(name: str, default: int) -> int: ...
@overload
def env_int(name: str, default: None = None) -> int | None: ...
def env_int(name: str, default: int | None = None) -> int | None:
    value = _raw(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {value!r}") from None


@overload
def env_float(name: str, default: float) -> float: ...
@overload
def env_float(name: str, default: None = None) -> float | None: ...
def env_float(name: str, default: float | None = None) -> float | None:
    value = _raw(name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {value!r}") from None


@overload
def env_bool(name: str, default: bool) -> bool: ...
@overload
def env_bool(name: str, default: None = None) -> bool | None: ...
def env_bool(name: str, default: bool | None = None) -> bool | None:
    value = _raw(name)
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise SettingsError(f"{name} must be one of 1/0, true/false, yes/no, on/off, got {value!r}")


def require(name: str, what: str = "set it in the environment") -> str:
    """The value of ``name``; SettingsError ``"<name> is required: <what>"`` when unset.

    ``what`` says what the variable holds, e.g. ``"the model bundle directory"``.
    """
    value = _raw(name)
    if value is None:
        raise SettingsError(f"{name} is required: {what}")
    return value


# The largest request each service accepts, from what a legitimate one needs (gRPC answers
# RESOURCE_EXHAUSTED above it before any of our code runs): a feed request is a few ids and
# strings; Retrieve carries up to 5,000 excluded ids (~50 KB); GetFeatures up to 2,000 ids
# and the user's features; Rank up to 2,000 x 40 float32 (320 KB) plus ids and values.
RECEIVE_LIMITS = {
    "gateway": 64 * 1024,
    "retrieval": 256 * 1024,
    "features": 256 * 1024,
    "ranking": 512 * 1024,
}
# RPCs a backend accepts at once (running or waiting for one of its 8 threads); one more is
# refused at once with RESOURCE_EXHAUSTED (the gateway serves that hop's fallback) rather
# than queued behind work whose callers have given up. The gateway's own limit is derived
# from its admission settings.
CONCURRENCY_LIMITS = {"retrieval": 16, "features": 16, "ranking": 16}
SEND_LIMIT = 4 * 1024 * 1024  # what a server may answer, and a client accept from one


@dataclass(frozen=True)
class ServerSettings:
    """How a service's gRPC server listens, drains and logs."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: the OS picks a free port, reported on the HOMEFEED_READY line
    max_workers: int = 8  # threads serving RPCs concurrently
    # RPCs accepted at once, running or waiting for a thread; past it grpc answers
    # RESOURCE_EXHAUSTED at once (None: no limit, an unbounded queue)
    max_concurrent_rpcs: int | None = None
    max_message_bytes: int = 4 * 1024 * 1024  # the largest request accepted (RECEIVE_LIMITS)
    # On SIGTERM: report NOT_SERVING but keep serving for ``lame_duck_seconds`` (load
    # balancers and the gateway's health checks move away meanwhile), then refuse new RPCs
    # and give the in-flight ones ``drain_seconds`` to finish.
    lame_duck_seconds: float = 2.0
    drain_seconds: float = 5.0
    log_level: str = "INFO"
    metrics_port: int | None = None  # Prometheus /metrics (0: a free port); None: not served

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port must be 0..65535, got {self.port}")
        if self.max_workers < 1:
            raise SettingsError(f"max_workers must be >= 1, got {self.max_workers}")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise SettingsError(f"max_concurrent_rpcs must be >= 1, got {self.max_concurrent_rpcs}")
        if self.max_message_bytes < 1024:
            raise SettingsError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.drain_seconds < 0:
            raise SettingsError(f"drain_seconds must be >= 0, got {self.drain_seconds}")
        if not 0 <= self.lame_duck_seconds <= 300:
            raise SettingsError(f"lame_duck_seconds must be 0..300, got {self.lame_duck_seconds}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise SettingsError(f"metrics_port must be 0..65535, got {self.metrics_port}")
        if self.log_level.upper() not in _LOG_LEVELS:
            raise SettingsError(
                f"log_level must be one of {', '.join(_LOG_LEVELS)}, got {self.log_level!r}"
            )

    @classmethod
    def from_env(cls, service: str) -> ServerSettings:
        """Read ``HOMEFEED_<SERVICE>_{HOST,PORT,MAX_WORKERS,MAX_CONCURRENT_RPCS,
        MAX_MESSAGE_BYTES,LAME_DUCK_SECONDS,DRAIN_SECONDS,LOG_LEVEL,METRICS_PORT}``; unset
        ones keep the defaults (the receive limit is the service's ``RECEIVE_LIMITS``, the
        concurrency limit its ``CONCURRENCY_LIMITS``). An out-of-range value names its
        variable."""
        prefix = f"HOMEFEED_{service.upper().replace('-', '_')}_"
        d = cls(max_message_bytes=RECEIVE_LIMITS.get(service, cls.max_message_bytes))
        try:
            return cls(
                host=env_str(prefix + "HOST", d.host),
                port=env_int(prefix + "PORT", d.port),
                max_workers=env_int(prefix + "MAX_WORKERS", d.max_workers),
                max_concurrent_rpcs=env_int(
                    prefix + "MAX_CONCURRENT_RPCS", CONCURRENCY_LIMITS.get(service)
                ),
                max_message_bytes=env_int(prefix + "MAX_MESSAGE_BYTES", d.max_message_bytes),
                lame_duck_seconds=env_float(prefix + "LAME_DUCK_SECONDS", d.lame_duck_seconds),
                drain_seconds=env_float(prefix + "DRAIN_SECONDS", d.drain_seconds),
                log_level=env_str(prefix + "LOG_LEVEL", d.log_level).upper(),
                metrics_port=env_int(prefix + "METRICS_PORT"),
            )
        except SettingsError as err:
            message = str(err)
            if message.startswith(prefix):  # a malformed value, already named
                raise
            field, rest = message.split(" ", 1)  # an out-of-range field: name its variable
            raise SettingsError(f"{prefix}{field.upper()} {rest}") from None
