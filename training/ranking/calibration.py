"""Fitting the purchase model's calibration (the map itself: ``contract.calibration``)."""

from __future__ import annotations

import numpy as np
from sklearn.isotonic import IsotonicRegression

from contract.calibration import Calibrator


def fit_isotonic(
    probs: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
) -> Calibrator:
    """Weighted isotonic regression of ``labels`` on ``probs``."""
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
    iso.fit(
        np.asarray(probs, dtype=np.float64),
        np.asarray(labels, dtype=np.float64),
        sample_weight=None if weights is None else np.asarray(weights, dtype=np.float64),
    )
    return Calibrator(
        np.asarray(iso.X_thresholds_, dtype=np.float64),
        np.asarray(iso.y_thresholds_, dtype=np.float64),
    )
