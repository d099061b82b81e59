"""Isotonic calibration of the purchase model's probabilities: the map serving applies
(fitting it is training's: ``training.ranking.calibration.fit_isotonic``).

The purchase model is trained on downsampled negatives with ``1 / rate`` weights, so its
probabilities are roughly on the right scale already; isotonic regression on the validation
split (weighted by ``sample_weight``) fixes what remains (boosting's over-confidence at the
extremes, early stopping on a different split) without changing the order of any two items
by more than merging ties.

The fitted map is stored as breakpoints ``(x, y)`` and applied with ``np.interp``: linear
between breakpoints, constant (clipped) outside them. That is a pure numpy function of the
JSON, so serving needs neither scikit-learn nor a pickle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, eq=False)
class Calibrator:
    """A non-decreasing piecewise-linear map from raw to calibrated probability."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if self.x.ndim != 1 or self.x.shape != self.y.shape or len(self.x) == 0:
            raise ValueError(
                f"calibrator needs equal-length, non-empty 1-D x and y, got {self.x.shape} "
                f"and {self.y.shape}"
            )
        if np.any(np.diff(self.x) < 0) or np.any(np.diff(self.y) < 0):
            raise ValueError("calibrator breakpoints must be non-decreasing in x and in y")

    @classmethod
    def identity(cls) -> Calibrator:
        return cls(np.array([0.0, 1.0]), np.array([0.0, 1.0]))

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Calibrated probabilities; inputs outside [x[0], x[-1]] take the end values."""
        return np.interp(np.asarray(probs, dtype=np.float64), self.x, self.y)

    def to_dict(self) -> dict[str, Any]:
        return {"method": "isotonic", "x": self.x.tolist(), "y": self.y.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibrator:
        if data.get("method", "isotonic") != "isotonic":
            raise ValueError(f"calibrator method must be 'isotonic', got {data['method']!r}")
        return cls(np.asarray(data["x"], dtype=np.float64), np.asarray(data["y"], np.float64))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Calibrator):
            return NotImplemented
        return bool(np.array_equal(self.x, other.x) and np.array_equal(self.y, other.y))
