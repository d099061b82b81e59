"""Baselines the LightGBM rankers have to beat.

- :class:`LogisticBaseline`: logistic regression on the standardized ``build_matrix``
  features, purchase label, ``sample_weight`` as sample weights (so it sees the full
  traffic's class balance, like the purchase model).
- :func:`popularity_score`: the item's clicks in the 7 days before the request
  (``clicks_7d``, read from the row: the feature snapshot is as of the request's day).
- :func:`heuristic_score`: the simulator's logging policy score,
  ``(popularity + 1) * exp(-age_days / recency_days)`` (``training.simulate.policy``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from contract import heuristic
from contract.scorer import LinearOffset

CLICKS_7D = "clicks_7d"
AGE_DAYS = "age_days"


@dataclass
class LogisticBaseline:
    """Standardize, then an L2 logistic regression. ``predict`` returns P(purchase)."""

    scaler: StandardScaler
    model: LogisticRegression

    @classmethod
    def fit(
        cls,
        X: np.ndarray,
        y: np.ndarray,
        sample_weight: np.ndarray | None = None,
        C: float = 1.0,
        max_iter: int = 300,
    ) -> LogisticBaseline:
        X = _finite(X)
        scaler = StandardScaler().fit(X, sample_weight=sample_weight)
        model = LogisticRegression(C=C, max_iter=max_iter)
        model.fit(scaler.transform(X), np.asarray(y), sample_weight=sample_weight)
        return cls(scaler, model)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict_proba(self.scaler.transform(_finite(X)))[:, 1])

    def offset(self) -> LinearOffset:
        """Its log-odds as the served :class:`LinearOffset` (the same function, run by the
        same code in training and serving)."""
        return LinearOffset.from_standardized(
            self.scaler.mean_, self.scaler.scale_, self.model.coef_[0], self.model.intercept_[0]
        )

    def coefficients(self, names: list[str] | tuple[str, ...]) -> dict[str, float]:
        """Standardized coefficients by feature name (comparable across features)."""
        return {n: float(c) for n, c in zip(names, self.model.coef_[0], strict=True)}


def _finite(X: np.ndarray) -> np.ndarray:
    """Missing values (none in training sets; possible at serving) become 0."""
    return np.nan_to_num(np.asarray(X, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def _col(columns: Mapping[str, Any] | pd.DataFrame, name: str) -> np.ndarray:
    value = columns[name]
    return value.to_numpy() if isinstance(value, pd.Series) else np.asarray(value)


def popularity_score(columns: Mapping[str, Any] | pd.DataFrame) -> np.ndarray:
    """Item clicks in the 7 days before the request."""
    return _col(columns, CLICKS_7D).astype(np.float64)


def heuristic_score(
    columns: Mapping[str, Any] | pd.DataFrame, recency_days: float = heuristic.RECENCY_DAYS
) -> np.ndarray:
    """The logging policy's score: popularity x recency."""
    return heuristic.heuristic_score(
        _col(columns, CLICKS_7D).astype(np.float64),
        _col(columns, AGE_DAYS).astype(np.float64),
        recency_days,
    )
