"""The compiled purchase model as serving runs it: a TL2cgen shared library
(``ranker/purchase.so`` of a bundle, built by ``training.ranking.compile``) loaded with
``tl2cgen.Predictor``. Loading needs TL2cgen's runtime only, never LightGBM.

A bundle whose trees were boosted from a logistic regression's log-odds (LightGBM's
``init_score``; ``ranker/linear_offset.json``) is scored by :class:`PurchaseModel` as
``sigmoid(linear log-odds + the trees' margin)``: the linear part keeps falling with price
where the trees, above the logged price range, stay flat. Training scores with the same
:class:`LinearOffset`, so the two sides run one function.

A bundle may also ship an :class:`EvidenceShrink` (``ranker/evidence.json``): the served
E[GMV] times ``(n + prior) / (n + prior + kappa)``, n being the item's logged impressions
before the request (the ``impressions_total`` feature). Over 500 candidates, most of them
never shown, the highest p is more often an over-estimate than a find (the winner's curse);
the factor discounts the items whose p rests on the least evidence. Training's replay and
the ranking service apply the same object.

A two-stage bundle (``ranker/click.so`` beside ``ranker/purchase.so``) scores
p(label) = p(click) x p(label | click): the click stage is its own compiled trees boosted
from their own linear offset (``ranker/click_offset.json``), and the purchase files hold
the conversion stage, learned on clicked rows only and boosted from 0. Clicks outnumber
purchases about ten to one, so the click stage reads taste, appeal and price from ten times
the positives (``training.ranking.models.two_stage_reason``, ``docs/models.md``).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    def predict(self, X: np.ndarray, margin: bool = False) -> np.ndarray:
        """Scores of the rows of ``X`` (n, num_features), float32 preferred (no copy);
        ``margin=True``: the trees' raw sum, before the sigmoid.

        NaN marks a missing value, as in LightGBM. Returns shape (n,) for a single-output
        model, (n, k) otherwise.
        """
        X = as_matrix(X, self.num_features)
        n = X.shape[0]
        if n == 0:
            return np.zeros(0, dtype=np.float64)
        dmat = self._tl2cgen.DMatrix(X)
        with self._lock:
            out = self._predictor.predict(dmat, pred_margin=margin)
        scores = out.reshape(n, -1)
        return scores[:, 0] if scores.shape[1] == 1 else scores


def sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64))))


@dataclass(frozen=True)
class LinearOffset:
    """A standardized linear model's log-odds: ``((x - mean) / scale) . coef + intercept``,
    a missing or infinite input read as 0 (as the logistic baseline was fitted)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def __post_init__(self) -> None:
        n = len(self.coef)
        if not (len(self.mean) == len(self.scale) == n) or n == 0:
            raise ValueError(
                f"linear offset: mean, scale and coef must have one entry per feature, got "
                f"{len(self.mean)}, {len(self.scale)}, {n}"
            )
        values = np.concatenate([self.mean, self.scale, self.coef, [self.intercept]])
        if not np.all(np.isfinite(values)) or np.any(self.scale <= 0):
            raise ValueError("linear offset: non-finite values or a scale <= 0")

    @classmethod
    def from_standardized(cls, mean: Any, scale: Any, coef: Any, intercept: float) -> LinearOffset:
        return cls(
            np.asarray(mean, dtype=np.float64).ravel(),
            np.asarray(scale, dtype=np.float64).ravel(),
            np.asarray(coef, dtype=np.float64).ravel(),
            float(intercept),
        )

    def margin(self, X: np.ndarray) -> np.ndarray:
        Z = np.nan_to_num(np.asarray(X, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if Z.ndim != 2 or Z.shape[1] != len(self.coef):
            raise ValueError(f"X must have shape (n, {len(self.coef)}), got {Z.shape}")
        return np.asarray(((Z - self.mean) / self.scale) @ self.coef + self.intercept)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "coef": self.coef.tolist(),
            "intercept": self.intercept,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LinearOffset:
        return cls.from_standardized(d["mean"], d["scale"], d["coef"], d["intercept"])

    def require_width(self, width: int, of: str) -> None:
        """ValueError unless the offset reads ``width`` features, as ``of`` does."""
        if len(self.coef) != width:
            raise ValueError(f"linear offset has {len(self.coef)} features, {of} {width}")

    @classmethod
    def read(cls, path: Path) -> LinearOffset | None:
        """The offset at ``path``, None when the file is absent (trees alone)."""
        path = Path(path)
        if not path.exists():
            return None
        return cls.from_dict(json.loads(path.read_text()))


class PurchaseModel:
    """The uncalibrated p(label) serving computes: the compiled trees' probability, or, with
    a :class:`LinearOffset`, ``sigmoid(offset.margin(X) + trees' margin)``; with a ``click``
    stage (a two-stage bundle), that times the click stage's p."""

    num_features: int

    def __init__(
        self,
        compiled: CompiledScorer,
        offset: LinearOffset | None = None,
        click: PurchaseModel | None = None,
    ) -> None:
        if offset is not None:
            offset.require_width(compiled.num_features, "the compiled model takes")
        if click is not None and click.num_features != compiled.num_features:
            raise ValueError(
                f"the click stage takes {click.num_features} features, the compiled model "
                f"takes {compiled.num_features}"
            )
        self.compiled = compiled
        self.offset = offset
        self.click = click
        self.num_features = compiled.num_features

    def predict(self, X: np.ndarray) -> np.ndarray:
        p = self._stage(X)
        return p if self.click is None else p * self.click.predict(X)

    def _stage(self, X: np.ndarray) -> np.ndarray:
        if self.offset is None:
            return self.compiled.predict(X)
        X = as_matrix(X, self.num_features)
        if len(X) == 0:
            return np.zeros(0, dtype=np.float64)
        return sigmoid(self.offset.margin(X) + self.compiled.predict(X, margin=True))


def load_purchase_model(folder: Path, nthread: int = 1) -> PurchaseModel:
    """The served :class:`PurchaseModel` of a bundle (or staging) folder: ``ranker/purchase.so``
    [+ ``ranker/linear_offset.json``] [x the click stage, ``ranker/click.so`` [+
    ``ranker/click_offset.json``], when its library is there]. ``ValueError`` when an offset
    is unreadable or the parts read other numbers of features; ``OSError`` (or TL2cgen's
    error) when a library cannot be loaded."""
    from contract.bundle import CLICK_COMPILED, CLICK_OFFSET, COMPILED_MODEL, LINEAR_OFFSET

    folder = Path(folder)
    click = None
    if (folder / CLICK_COMPILED).exists():
        click = PurchaseModel(
            CompiledScorer(folder / CLICK_COMPILED, nthread=nthread),
            LinearOffset.read(folder / CLICK_OFFSET),
        )
    return PurchaseModel(
        CompiledScorer(folder / COMPILED_MODEL, nthread=nthread),
        LinearOffset.read(folder / LINEAR_OFFSET),
        click,
    )


EVIDENCE_FEATURE = "impressions_total"  # feature_repo.schema ITEM_STATS
EVIDENCE_KAPPA = 2.0  # served default: chosen on sim-small's validation days (docs/models.md)
EVIDENCE_PRIOR = 0.5  # impressions every item is credited with: an unseen item keeps a score


@dataclass(frozen=True)
class EvidenceShrink:
    """E[GMV] x ``(n + prior) / (n + prior + kappa)``, n = column ``column`` of the feature
    matrix (``feature``: the item's logged impressions; missing reads as 0). ``kappa`` 0 is
    no shrink."""

    column: int
    kappa: float = EVIDENCE_KAPPA
    prior: float = EVIDENCE_PRIOR
    feature: str = EVIDENCE_FEATURE

    def __post_init__(self) -> None:
        if not (np.isfinite(self.kappa) and self.kappa >= 0):
            raise ValueError(f"evidence shrink: kappa must be finite and >= 0, got {self.kappa}")
        if not (np.isfinite(self.prior) and self.prior >= 0):
            raise ValueError(f"evidence shrink: prior must be finite and >= 0, got {self.prior}")
        if self.column < 0:
            raise ValueError(f"evidence shrink: column must be >= 0, got {self.column}")

    def factor(self, X: np.ndarray) -> np.ndarray:
        """The multiplier per row of ``X``, in [0, 1]."""
        if self.kappa == 0:
            return np.ones(len(X))
        n = np.nan_to_num(np.asarray(X[:, self.column], dtype=np.float64), nan=0.0)
        n = np.maximum(n, 0.0) + self.prior
        with np.errstate(invalid="ignore"):
            return np.asarray(np.where(n > 0, n / (n + self.kappa), 0.0))

    def apply(self, X: np.ndarray, egmv: np.ndarray) -> np.ndarray:
        return np.asarray(egmv) * self.factor(X)

    def to_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "kappa": self.kappa, "prior": self.prior}

    @classmethod
    def for_schema(
        cls,
        names: tuple[str, ...] | list[str],
        kappa: float = EVIDENCE_KAPPA,
        prior: float = EVIDENCE_PRIOR,
        feature: str = EVIDENCE_FEATURE,
    ) -> EvidenceShrink:
        """The shrink reading ``feature`` from a matrix whose columns are ``names``;
        ValueError when the schema has no such column."""
        if feature not in names:
            raise ValueError(
                f"evidence shrink reads feature {feature!r}, which the feature schema lacks"
            )
        return cls(list(names).index(feature), float(kappa), float(prior), feature)

    @classmethod
    def read(cls, path: Path, names: tuple[str, ...] | list[str]) -> EvidenceShrink | None:
        """The shrink at ``path`` for a schema of ``names``; None when the file is absent
        (a bundle from before the shrink: E[GMV] as the model gives it)."""
        path = Path(path)
        if not path.exists():
            return None
        d = json.loads(path.read_text())
        return cls.for_schema(names, d["kappa"], d.get("prior", 0.0), d["feature"])
