"""The compiled purchase model as serving runs it: a TL2cgen shared library
(``ranker/purchase.so`` of a bundle, built by ``training.ranking.compile``) loaded with
``tl2cgen.Predictor``. Loading needs TL2cgen's runtime only, never LightGBM.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np


def as_matrix(X: np.ndarray, num_features: int) -> np.ndarray:
    """A C-contiguous float32/float64 (n, num_features) view or copy of ``X``.

    TL2cgen's DMatrix reads raw memory with the row width it is given; a matrix with fewer
    columns than the model would score garbage silently, so the width is checked here.
    """
    if X.ndim != 2 or X.shape[1] != num_features:
        raise ValueError(f"X must have shape (n, {num_features}), got {X.shape}")
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float32)
    return np.ascontiguousarray(X)


class CompiledScorer:
    """A loaded compiled model: ``predict(X) -> scores`` matching ``lightgbm.Booster.predict``.

    For a binary model the scores are probabilities (TL2cgen applies the sigmoid that the
    model file declares). ``nthread=1`` is the serving setting: requests run concurrently on
    their own threads, and 500 rows are too few to gain from OpenMP. TL2cgen's predictor may
    be used by one thread at a time, hence the lock.
    """

    def __init__(self, lib_path: Path, nthread: int = 1) -> None:
        import tl2cgen

        self._tl2cgen = tl2cgen
        self.lib_path = Path(lib_path)
        if not self.lib_path.is_file():
            raise FileNotFoundError(f"compiled model not found at {self.lib_path}")
        self._predictor = tl2cgen.Predictor(self.lib_path, nthread=nthread)
        self.num_features: int = int(self._predictor.num_feature)
        self._lock = threading.Lock()

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Scores of the rows of ``X`` (n, num_features), float32 preferred (no copy).

        NaN marks a missing value, as in LightGBM. Returns shape (n,) for a single-output
        model, (n, k) otherwise.
        """
        X = as_matrix(X, self.num_features)
        n = X.shape[0]
        if n == 0:
            return np.zeros(0, dtype=np.float64)
        dmat = self._tl2cgen.DMatrix(X)
        with self._lock:
            out = self._predictor.predict(dmat)
        scores = out.reshape(n, -1)
        return scores[:, 0] if scores.shape[1] == 1 else scores
