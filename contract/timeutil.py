"""Timestamps as int64 nanoseconds since the epoch (UTC), the simulator's working unit."""

from __future__ import annotations

import numpy as np
import pandas as pd

NS_PER_S = 10**9
NS_PER_DAY = 86_400 * NS_PER_S


def to_ns(values: pd.Series | pd.DatetimeIndex) -> np.ndarray:
    """int64 ns of a tz-aware (or naive UTC) datetime column, whatever its stored unit."""
    index = pd.DatetimeIndex(values)
    if index.tz is not None:
        index = index.tz_convert("UTC").tz_localize(None)
    return np.asarray(index.as_unit("ns").asi8, dtype=np.int64)  # type: ignore[attr-defined]


def from_ns(ns: np.ndarray) -> pd.DatetimeIndex:
    return pd.to_datetime(np.asarray(ns, dtype=np.int64), unit="ns", utc=True)
