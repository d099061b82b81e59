"""The ranking core: a verified model bundle loaded for scoring, and the holder that swaps
bundles under live traffic.

Scoring is ``p = calibrator(compiled_purchase_model(X))`` and ``E[GMV] = p x value`` with
``value = price x margin`` sent by the caller. The compiled model is the TL2cgen library of
the bundle (``ranker/purchase.so``), run with one thread per call: the gRPC worker pool gives
the concurrency, and 500 rows are too few to gain from OpenMP. When the bundle ships a
linear offset (``ranker/linear_offset.json``: the trees were boosted from a logistic
regression's log-odds), the uncalibrated p is ``sigmoid(offset + the trees' margin)``
(``contract.scorer.PurchaseModel``). A two-stage bundle also ships a click stage
(``ranker/click.so`` [+ ``ranker/click_offset.json``]): the uncalibrated p is then the
click stage's p times the purchase files' p(purchase | click)
(``contract.scorer.load_purchase_model`` builds either). When it ships an evidence shrink
(``ranker/evidence.json``), E[GMV] is then multiplied by ``(n + prior) / (n + prior + kappa)``
with n the candidate's ``impressions_total`` column (``contract.scorer.EvidenceShrink``);
``p_purchase`` stays the calibrated probability.

A swap is one attribute assignment. A request reads ``ModelHolder.current()`` once and
scores with that model to the end, so a reload in between never mixes two versions in one
response, and readers take no lock. A reload builds and warms the new model completely
before the assignment; when anything fails the old model keeps serving.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from contract.bundle import (
    CALIBRATOR,
    COMPILED_MODEL,
    EVIDENCE,
    FEATURE_SCHEMA,
    LINEAR_OFFSET,
    REGISTERED_MODEL,
    BundleError,
    label_of,
    read_manifest,
    verify_bundle,
)
from contract.calibration import Calibrator
from contract.features import FeatureSchema
from contract.scorer import EvidenceShrink, PurchaseModel, load_purchase_model
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
    quote,
)

if TYPE_CHECKING:
    from contract.registry import Registry

log = logging.getLogger(__name__)

MAX_ITEMS = 2000  # items per Rank request (RankRequest.item_ids)
_WARMUP_ROWS = 8
_SHOWN = 12  # hash characters quoted in messages
_ALIAS = re.compile(r"[A-Za-z0-9_-]+")


class ServedScore(StrEnum):
    """What ``RankResponse.egmv`` (the served score) is computed from.

    Only ``purchase`` exists: E[GMV] from the calibrated purchase model, the one model a
    bundle ships compiled. The bundle's LambdaMART model is a LightGBM text file only; serving
    it would put LightGBM's ``Booster.predict`` on the hot path (several times slower than
    the compiled library) and its scores are not probabilities, so ``p x value`` would not be
    an expected GMV. It stays an offline comparison (``homefeed train --stage evaluate``).
    """

    PURCHASE = "purchase"

    @classmethod
    def parse(cls, value: str) -> ServedScore:
        try:
            return cls(value.strip().lower())
        except ValueError:
            allowed = ", ".join(s.value for s in cls)
            hint = (
                " (the LambdaMART model is not served: bundles ship only the purchase model "
                "compiled, and its scores are not purchase probabilities)"
                if value.strip().lower() == "lambdamart"
                else ""
            )
            raise ValueError(f"must be one of {allowed}, got {value!r}{hint}") from None


class LoadedModel:
    """One bundle ready to score: schema, compiled purchase model and calibrator.

    ``version`` is what responses report as ``model_version``: the registry version number
    (``"3"``), or the bundle's own version id when it was loaded from a directory rather
    than through the registry. ``bundle_version`` is always the bundle's id
    (``20261123T194029-sim-small``). ``outcome`` is the bundle's label entry
    (``contract.bundle.label_of``): what p is the probability of, and so what the served
    ``egmv`` means (an expected clicked value, not GMV, for a click label).
    """

    def __init__(
        self,
        bundle_dir: Path,
        manifest: dict[str, Any],
        schema: FeatureSchema,
        compiled: PurchaseModel,
        calibrator: Calibrator,
        *,
        registry_version: str | None = None,
        served: ServedScore = ServedScore.PURCHASE,
        evidence: EvidenceShrink | None = None,
    ) -> None:
        self.bundle_dir = bundle_dir
        self.evidence = evidence
        self.manifest = manifest
        self.schema = schema
        self.schema_hash = schema.hash
        self.width = len(schema)
        self.compiled = compiled
        self.calibrator = calibrator
        self.bundle_version = str(manifest.get("version", bundle_dir.name))
        self.registry_version = registry_version
        self.version = registry_version if registry_version is not None else self.bundle_version
        self.outcome = label_of(manifest)
        self.served = served
        if compiled.num_features != self.width:
            raise BundleError(
                f"bundle {self.bundle_version}: {COMPILED_MODEL} takes {compiled.num_features} "
                f"features, its feature schema has {self.width}"
            )

    @classmethod
    def load(
        cls,
        bundle_dir: Path,
        *,
        registry_version: str | None = None,
        served: ServedScore = ServedScore.PURCHASE,
        verified: bool = False,
    ) -> LoadedModel:
        """Load a bundle directory; ``verified=True`` skips re-hashing a directory that
        ``Registry.load`` has just verified. Raises ``BundleError`` for a bundle that does not
        verify or does not hang together, ``OSError``/``TL2cgenError`` for a library that
        cannot be loaded."""
        bundle_dir = Path(bundle_dir)
        manifest = read_manifest(bundle_dir) if verified else verify_bundle(bundle_dir)
        try:
            schema = FeatureSchema.from_dict(json.loads((bundle_dir / FEATURE_SCHEMA).read_text()))
            calibrator = Calibrator.from_dict(json.loads((bundle_dir / CALIBRATOR).read_text()))
            evidence = EvidenceShrink.read(bundle_dir / EVIDENCE, schema.names)
        except (KeyError, ValueError) as err:  # JSONDecodeError is a ValueError
            raise BundleError(f"bundle at {bundle_dir}: {type(err).__name__}: {err}") from err
        try:
            compiled = load_purchase_model(bundle_dir, nthread=1)
        except (KeyError, ValueError) as err:  # an offset unreadable, or of another width
            raise BundleError(
                f"bundle at {bundle_dir}: {LINEAR_OFFSET} or the click stage: "
                f"{type(err).__name__}: {err}"
            ) from err
        return cls(
            bundle_dir,
            manifest,
            schema,
            compiled,
            calibrator,
            registry_version=registry_version,
            served=served,
            evidence=evidence,
        )

    @property
    def label(self) -> str:
        """``3 (bundle 20261123T194029-sim-small)`` for logs and messages."""
        if self.registry_version is None:
            return f"bundle {self.bundle_version} at {self.bundle_dir}"
        return f"{self.registry_version} (bundle {self.bundle_version})"

    def score(self, X: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated p(purchase) and E[GMV] = p x values [x the evidence shrink] for the rows
        of ``X``.

        ``X``: float32 (n, width) in the schema's column order, NaN for missing values.
        ``values``: (n,) price x margin. Inputs are assumed checked (``check_inputs``).
        """
        p = self.calibrator.apply(self.compiled.predict(X))
        egmv = p * values
        if self.evidence is not None:
            egmv = self.evidence.apply(X, egmv)
        return p, egmv

    def check_schema_hash(self, got: str) -> None:
        """InvalidArgument when the caller did not say which schema it built, else
        FailedPrecondition when it built another one than this model's."""
        want = self.schema_hash
        if not got:
            raise InvalidArgument(
                "features.schema_hash is required: the hash of the feature schema the matrix "
                f"was built with (model {self.version} takes {want[:_SHOWN]}...)"
            )
        if got != want:
            raise FailedPrecondition(
                f"feature schema {got[:_SHOWN]} does not match model {self.version}'s "
                f"{want[:_SHOWN]}: the features service and the ranking bundle come from "
                "different feature code; deploy matching versions"
            )

    def check_inputs(self, X: np.ndarray, values: np.ndarray) -> None:
        """InvalidArgument naming the request field when ``X`` or ``values`` cannot be
        scored: wrong shapes, a negative or non-finite value, an infinite feature (NaN is
        LightGBM's missing value and allowed)."""
        if X.ndim != 2 or X.shape[1] != self.width:
            raise InvalidArgument(
                f"features.cols must be {self.width} (the columns of feature schema "
                f"{self.schema_hash[:_SHOWN]}), got shape {X.shape}"
            )
        n = X.shape[0]
        if values.shape != (n,):
            raise InvalidArgument(
                f"values must hold one price x margin per row ({n}), got {values.size}"
            )
        self.check_values(X, values)

    def check_values(self, X: np.ndarray, values: np.ndarray) -> None:
        """``check_inputs`` without the shapes (the servicer has checked them)."""
        bad_values = ~(values >= 0) | np.isinf(values)  # NaN fails >= 0
        if bad_values.any():
            first = int(np.argmax(bad_values))
            raise InvalidArgument(
                f"values must be finite and >= 0 (price x margin), got {values[first]} at "
                f"index {first} ({int(bad_values.sum())} bad)"
            )
        infinite = np.isinf(X)
        if infinite.any():
            row, col = (int(i) for i in np.argwhere(infinite)[0])
            raise InvalidArgument(
                f"features.values must be finite or NaN (missing), got {X[row, col]} at row "
                f"{row}, column {col} ({self.schema.names[col]}); {int(infinite.sum())} "
                "infinite values"
            )

    def warm_up(self) -> None:
        """Score a few rows (zeros, all-missing) and check the output; raises ``BundleError``
        when the library returns the wrong shape or anything but probabilities."""
        X = np.zeros((_WARMUP_ROWS, self.width), dtype=np.float32)
        X[1::2] = np.nan
        p, egmv = self.score(X, np.ones(_WARMUP_ROWS, dtype=np.float32))
        if p.shape != (_WARMUP_ROWS,) or egmv.shape != (_WARMUP_ROWS,):
            raise BundleError(
                f"bundle {self.bundle_version}: warm-up scores have shape {p.shape}, expected "
                f"({_WARMUP_ROWS},)"
            )
        if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
            raise BundleError(
                f"bundle {self.bundle_version}: warm-up scores are not probabilities: {p}"
            )


class Swap(NamedTuple):
    """What a reload did: the model before (None at start) and the one serving now."""

    previous: LoadedModel | None
    current: LoadedModel


class ModelHolder:
    """The serving model and how to replace it.

    ``current()`` is a plain attribute read (no lock on the hot path). ``reload(target)``
    loads ``target`` (a registry alias or version; with ``allow_directories`` also a bundle
    directory path, written with a ``/``), warms it up and swaps it in; reloads run one at a
    time. A target that cannot be loaded raises a ``ServiceError`` (FailedPrecondition for a
    bundle that fails verification or warm-up) and leaves the current model serving.
    """

    def __init__(
        self,
        *,
        default_target: str,
        cache_dir: Path,
        tracking_uri: str | None = None,
        allow_directories: bool = False,
        served: ServedScore = ServedScore.PURCHASE,
        model_name: str = REGISTERED_MODEL,
        expected_schema_hash: str | None = None,
    ) -> None:
        self.default_target = default_target
        # the feature schema the features service builds matrices in: a bundle trained on
        # another one could only refuse every request, so it is refused at load instead
        self.expected_schema_hash = expected_schema_hash
        self.cache_dir = Path(cache_dir)
        self.tracking_uri = tracking_uri
        self.allow_directories = allow_directories
        self.served = served
        self.model_name = model_name
        self._registry: Registry | None = None
        self._model: LoadedModel | None = None
        self._reload_lock = threading.Lock()

    def current(self) -> LoadedModel:
        model = self._model
        if model is None:
            raise Unavailable("no ranking model is loaded yet")
        return model

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            from contract.registry import Registry

            self._registry = Registry(self.tracking_uri, name=self.model_name)
        return self._registry

    def reload(self, target: str = "") -> Swap:
        """Load ``target`` (empty: ``default_target``) and swap it in; see the class doc."""
        target = target.strip() or self.default_target
        with self._reload_lock:
            previous = self._model
            started = time.perf_counter()
            try:
                model = self._load(target)
            except ServiceError as err:
                log.warning(
                    "reload refused",
                    extra={"target": target, "reason": str(err), "code": err.code.name},
                )
                if previous is None:
                    raise
                raise type(err)(f"{err}; still serving model {previous.label}") from err
            self._model = model
        log.info(
            "serving model",
            extra={
                "target": target,
                "model_version": model.version,
                "bundle_version": model.bundle_version,
                "label": model.outcome["kind"],
                "score_meaning": model.outcome["score"],
                "previous_version": previous.version if previous else None,
                "schema_hash": model.schema_hash,
                "seconds": round(time.perf_counter() - started, 3),
            },
        )
        return Swap(previous, model)

    def _load(self, target: str) -> LoadedModel:
        if "/" in target:
            if not self.allow_directories:
                raise InvalidArgument(
                    "target must be a registry alias (e.g. champion) or a version number, "
                    f"got {quote(target)}; directories are accepted only when the service serves "
                    "a bundle directory (HOMEFEED_RANKING_BUNDLE_DIR)"
                )
            bundle_dir, registry_version, verified = Path(target), None, False
            what = f"bundle directory {target}"
        elif _ALIAS.fullmatch(target):
            registry_version = self._resolve(target)
            what = f"{self.model_name} version {registry_version}"
            if not target.isdigit():
                what += f" (@{target})"
            bundle_dir, verified = self._fetch(registry_version, what), True
        else:
            raise InvalidArgument(
                "target must be a registry alias (letters, digits, _ or -) or a version "
                f"number, got {quote(target)}"
            )
        expected = self.expected_schema_hash
        if expected is None and self._model is not None:
            expected = self._model.schema_hash
        try:
            model = LoadedModel.load(
                bundle_dir, registry_version=registry_version, served=self.served, verified=verified
            )
        except Exception as err:  # whatever the bundle does wrong, the old model keeps serving
            raise FailedPrecondition(f"cannot load {what}: {type(err).__name__}: {err}") from err
        if expected is not None and model.schema_hash != expected:
            raise FailedPrecondition(
                f"cannot load {what}: it was built for feature schema {model.schema_hash[:12]}, "
                f"the features this service is sent are built in schema {expected[:12]}"
            )
        try:
            model.warm_up()
        except Exception as err:  # whatever the bundle does wrong, the old model keeps serving
            raise FailedPrecondition(f"cannot load {what}: {type(err).__name__}: {err}") from err
        return model

    def _resolve(self, target: str) -> str:
        """The registry version number a target names."""
        if target.isdigit():
            return str(int(target))
        from mlflow.exceptions import MlflowException

        try:
            return str(self.registry.get_version(target))
        except MlflowException as err:
            raise _registry_error(err, f"alias {target!r} of {self.model_name}") from err

    def _fetch(self, version: str, what: str) -> Path:
        """A verified local copy of a registry version."""
        from mlflow.exceptions import MlflowException

        try:
            return self.registry.load(version, self.cache_dir)
        except MlflowException as err:
            raise _registry_error(err, what) from err
        except (BundleError, OSError) as err:
            raise FailedPrecondition(f"cannot load {what}: {err}") from err


# MLflow answers an unknown alias with INVALID_PARAMETER_VALUE, an unknown version with
# RESOURCE_DOES_NOT_EXIST; anything else (INTERNAL_ERROR, TEMPORARILY_UNAVAILABLE, a server
# that does not answer) means the registry could not be asked.
_UNKNOWN_TO_REGISTRY = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})


def _registry_error(err: Any, what: str) -> ServiceError:
    """NotFound for a name or version the registry does not know, else Unavailable."""
    message = getattr(err, "message", str(err))
    if getattr(err, "error_code", "") in _UNKNOWN_TO_REGISTRY:
        return NotFound(f"{what} is not in the model registry: {message}")
    return Unavailable(f"the model registry failed to resolve {what}: {message}")
