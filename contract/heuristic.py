"""The production heuristic: popularity x recency.

It is the order homefeed serves when ranking (or features) is unavailable, the baseline the
models are judged against, and the simulator's logging policy, which imports it from here
(the policy that logged a dataset is the one serving falls back to, so a degraded page is
what the training data looked like)::

    score = (clicks in the last 7 days + 1) x exp(-age_days / recency_days)

A bundle carries the parameters of the heuristic that logged its training data in
``heuristic.json`` (``Heuristic.load``); real data, which has no logging policy of its own,
gets the defaults.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

RECENCY_DAYS = 60.0  # the recency decay (days)


def heuristic_score(
    popularity: np.ndarray, age_days: np.ndarray, recency_days: float = RECENCY_DAYS
) -> np.ndarray:
    """(recent clicks + 1) x exp(-age / recency_days); higher is shown first. A negative age
    (listed after the reference time) counts as 0."""
    return (popularity + 1.0) * np.exp(-np.maximum(age_days, 0.0) / recency_days)


@dataclass(frozen=True)
class Heuristic:
    """The heuristic's parameters as a bundle records them."""

    recency_days: float = RECENCY_DAYS

    def __post_init__(self) -> None:
        if not self.recency_days > 0:
            raise ValueError(f"recency_days must be > 0, got {self.recency_days}")

    def score(self, clicks_7d: np.ndarray, age_days: np.ndarray) -> np.ndarray:
        return heuristic_score(clicks_7d, age_days, self.recency_days)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Heuristic:
        return cls(recency_days=float(data.get("recency_days", RECENCY_DAYS)))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Heuristic:
        return cls.from_dict(json.loads(Path(path).read_text()))
