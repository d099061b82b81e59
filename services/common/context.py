"""Deadlines derived from the caller's: every hop gets a share of what the caller has left."""

from __future__ import annotations

import grpc

# grpc reports a call without a deadline as "effectively forever" (a huge number of seconds).
_NO_DEADLINE_S = 1e8


def remaining_seconds(context: grpc.ServicerContext | None) -> float | None:
    """Seconds left before the caller's deadline; None when it set none (or no context)."""
    if context is None:
        return None
    remaining = context.time_remaining()
    if remaining is None or remaining > _NO_DEADLINE_S:
        return None
    return max(float(remaining), 0.0)


def child_timeout(
    context: grpc.ServicerContext | None,
    fraction: float,
    cap_s: float,
    floor_s: float = 0.001,
) -> float:
    """Timeout for a downstream call: ``fraction`` of the caller's remaining time, at most
    ``cap_s`` (also used when the caller set no deadline) and at least ``floor_s``.

    The floor keeps a nearly spent deadline from becoming a zero timeout, which grpc treats
    as already expired; the downstream call then fails fast with DEADLINE_EXCEEDED.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not 0.0 < floor_s <= cap_s:
        raise ValueError(f"floor_s must be in (0, cap_s={cap_s}], got {floor_s}")
    remaining = remaining_seconds(context)
    if remaining is None:
        return cap_s
    return min(cap_s, max(floor_s, remaining * fraction))
