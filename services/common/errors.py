"""Domain errors that know their gRPC status, and the request checks every servicer uses.

A servicer raises one of these; ``interceptors.ServiceInterceptor`` turns it into the status
the client sees, with the message unchanged. A message says what was wrong and what would be
right: ``page_size must be 1..100, got 500``.
"""

# The error classes are named after the gRPC status codes they carry, not "...Error".
# ruff: noqa: N818

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TypeVar

import grpc
import numpy as np
from homefeed.common.v1 import common_pb2

from contract.columns import DEVICES

_INT64_MAX = np.iinfo(np.int64).max
INT64_MAX = int(_INT64_MAX)
MAX_REQUEST_ID = 128  # characters of a caller's request id
_COUNTRY = re.compile(r"[A-Z]{2}")
# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799
_SHOWN = 5  # offending values quoted in a message

N = TypeVar("N", int, float)


class ServiceError(Exception):
    """An error with a gRPC status; the message is sent to the client as the status details."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    # how the server logs it: a refusal that comes by the thousand under load (shedding)
    # lowers it, so the log does not grow with an attack or an overload
    log_level: int = logging.WARNING

    def grpc_status_code(self) -> grpc.StatusCode:
        return self.code


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def check_range(name: str, value: N, lo: N, hi: N) -> N:
    """``value`` if ``lo <= value <= hi``, else InvalidArgument naming the field and bounds."""
    if not lo <= value <= hi:  # also rejects NaN
        raise InvalidArgument(f"{name} must be {lo}..{hi}, got {value}")
    return value


def _first(values: np.ndarray) -> str:
    shown = ", ".join(str(int(v)) for v in values[:_SHOWN])
    return f"[{shown}, ...]" if len(values) > _SHOWN else f"[{shown}]"


def check_ids(
    name: str,
    ids: Sequence[int] | np.ndarray,
    max_len: int,
    min_len: int = 0,
    unique: bool = False,
) -> np.ndarray:
    """The ids as a 1-D int64 array, or InvalidArgument.

    Rejects more than ``max_len`` or fewer than ``min_len`` ids, negative ids, non-integer
    arrays and, with ``unique=True``, repeated ids. Accepts a proto repeated field directly.
    """
    n = len(ids)
    if n > max_len:
        raise InvalidArgument(f"{name} must have at most {max_len} ids, got {n}")
    if n < min_len:
        raise InvalidArgument(f"{name} must have at least {min_len} ids, got {n}")
    if n == 0:
        return np.empty(0, dtype=np.int64)
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise InvalidArgument(f"{name} must be a flat list of ids, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise InvalidArgument(f"{name} must be integer ids, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.max() > _INT64_MAX:
        raise InvalidArgument(f"{name} must be ids in 0..{_INT64_MAX}, got {int(arr.max())}")
    arr = arr.astype(np.int64, copy=False)
    negative = arr[arr < 0]
    if len(negative):
        raise InvalidArgument(
            f"{name} must be non-negative ids, got {len(negative)} negative: {_first(negative)}"
        )
    if unique:
        values, counts = np.unique(arr, return_counts=True)
        repeated = values[counts > 1]
        if len(repeated):
            raise InvalidArgument(
                f"{name} must not repeat ids, got {len(repeated)} repeated: {_first(repeated)}"
            )
    return arr


_SURFACES = (common_pb2.SURFACE_HOME, common_pb2.SURFACE_CHECKOUT)


def check_surface(value: int, name: str = "surface") -> int:
    """``value`` if it is SURFACE_HOME or SURFACE_CHECKOUT, else InvalidArgument."""
    if value in _SURFACES:
        return int(value)
    allowed = ", ".join(common_pb2.Surface.Name(s) for s in _SURFACES)
    try:
        got = common_pb2.Surface.Name(value)
    except ValueError:
        got = str(value)
    raise InvalidArgument(f"{name} must be one of {allowed}, got {got}")


_REQUEST_ID = re.compile(r"[\x21-\x7e]*")  # printable ASCII without space


def check_request_id(value: str, note: str = "") -> str:
    """A caller's request id: at most ``MAX_REQUEST_ID`` printable ASCII characters, no
    spaces. It travels as ``x-request-id`` metadata to every hop, and gRPC refuses a
    metadata value outside printable ASCII, so anything else is refused here, at the edge."""
    if len(value) > MAX_REQUEST_ID:
        raise InvalidArgument(
            f"request_id must be at most {MAX_REQUEST_ID} characters{note}, got {len(value)}"
        )
    if not _REQUEST_ID.fullmatch(value):
        bad = next(c for c in value if not "\x21" <= c <= "\x7e")
        raise InvalidArgument(
            f"request_id must be printable ASCII without spaces{note}, got {quote(bad)} at "
            f"index {value.index(bad)}"
        )
    return value


MAX_QUOTED = 40  # characters of a caller's value quoted back in a message


def quote(value: object, limit: int = MAX_QUOTED) -> str:
    """``repr(value)``, cut to ``limit`` characters (with the full length when cut): a caller's
    input is echoed into errors and logs, and one request must not write a megabyte line."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str | bytes) else "cut"
    return f"{text[:limit]}... ({size})"


def check_context(context: common_pb2.RequestContext) -> datetime | None:
    """country: empty or ISO 3166-1 alpha-2 in upper case; device: empty, ios, android or
    web; time: unset or a valid Timestamp. Returns the time (UTC), None when unset."""
    if context.country and not _COUNTRY.fullmatch(context.country):
        raise InvalidArgument(
            "context.country must be empty or an ISO 3166-1 alpha-2 code in upper case "
            f'("US", "DE"), got {quote(context.country)}'
        )
    if context.device and context.device not in DEVICES:
        raise InvalidArgument(
            f"context.device must be empty or one of {', '.join(DEVICES)}, "
            f"got {quote(context.device)}"
        )
    if not context.HasField("time"):
        return None
    check_range("context.time.seconds", context.time.seconds, _MIN_SECONDS, _MAX_SECONDS)
    check_range("context.time.nanos", context.time.nanos, 0, 999_999_999)
    return context.time.ToDatetime(tzinfo=UTC)


def describe_error(err: BaseException) -> str:
    """``DEADLINE_EXCEEDED: Deadline Exceeded`` for a grpc error, ``Type: message`` else."""
    code = getattr(err, "code", None)
    details = getattr(err, "details", None)
    if callable(code) and callable(details):
        try:
            return f"{code().name}: {details()}"
        except Exception:  # not a grpc.Call after all
            pass
    return f"{type(err).__name__}: {err}"
