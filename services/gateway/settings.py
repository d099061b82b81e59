"""Settings of the feed gateway, read once at start from the environment.

Downstreams (required; a missing one stops the start naming it):

- ``HOMEFEED_RETRIEVAL_ADDR``, ``HOMEFEED_FEATURES_ADDR``, ``HOMEFEED_RANKING_ADDR``:
  ``host:port`` of each service.

Popularity fallback (the bundle's ``retrieval/popular.json``, loaded and verified at start):

- ``HOMEFEED_GATEWAY_MODEL``, else ``HOMEFEED_MODEL`` (``champion``): registry alias or
  version of the bundle; ``HOMEFEED_GATEWAY_BUNDLE_DIR``, else ``HOMEFEED_BUNDLE_DIR``: read
  this bundle directory instead (``services.common.bundles``);
- ``HOMEFEED_GATEWAY_CACHE_DIR``, else ``HOMEFEED_MODEL_CACHE``
  (``<home>/artifacts/model_cache``), ``MLFLOW_TRACKING_URI``, ``HOMEFEED_HOME``: where
  registry bundles are cached and the registry lives.

Pipeline (``pipeline.PipelineConfig``; times in milliseconds):

- ``HOMEFEED_GATEWAY_CANDIDATES`` (500, 1..2000): candidates retrieved per request;
- ``HOMEFEED_GATEWAY_HOME_DEADLINE_MS`` (150), ``HOMEFEED_GATEWAY_CHECKOUT_DEADLINE_MS``
  (100): the budget when the caller sets no deadline;
- ``HOMEFEED_GATEWAY_RETRIEVAL_SHARE`` (0.3), ``HOMEFEED_GATEWAY_FEATURES_SHARE`` (0.4):
  the share of the budget a hop may use;
- ``HOMEFEED_GATEWAY_RETRIEVAL_TIMEOUT_MS`` (45), ``HOMEFEED_GATEWAY_FEATURES_TIMEOUT_MS``
  (60), ``HOMEFEED_GATEWAY_RANKING_TIMEOUT_MS`` (60): per-hop caps;
- ``HOMEFEED_GATEWAY_RESERVE_MS`` (5): kept for re-ranking and the response.

Re-ranking (``rerank.RerankConfig``):

- ``HOMEFEED_GATEWAY_MAX_PER_CATEGORY`` (4), ``HOMEFEED_GATEWAY_DIVERSITY_DEPTH`` (20),
  ``HOMEFEED_GATEWAY_NEW_SELLER_MIN_SHARE`` (0.1), ``HOMEFEED_GATEWAY_EPSILON`` (0.05).

Circuit breakers (``breaker.BreakerConfig``, the same for the three downstreams):

- ``HOMEFEED_GATEWAY_BREAKER_WINDOW`` (20 calls), ``..._BREAKER_MIN_CALLS`` (10),
  ``..._BREAKER_FAILURE_RATE`` (0.5), ``..._BREAKER_SLOW_RATE`` (0.5),
  ``..._BREAKER_SLOW_CALL_MS`` (40), ``..._BREAKER_OPEN_WAIT_S`` (5),
  ``..._BREAKER_HALF_OPEN_CALLS`` (3), ``..._BREAKER_HALF_OPEN_MAX_WAIT_S`` (5).

Load shedding (``admission.AdmissionConfig``) and readiness:

- ``HOMEFEED_GATEWAY_MAX_IN_FLIGHT`` (4): feeds computed at once; one more is refused with
  RESOURCE_EXHAUSTED and a ``retry-after-ms`` trailer;
- ``HOMEFEED_GATEWAY_SPARE_RPCS`` (2): threads beyond that (health checks, the refusals
  themselves); the server refuses RPCs beyond them itself, so nothing queues;
- ``HOMEFEED_GATEWAY_MIN_BUDGET_MS`` (10): a request with less time left is refused at once;
- ``HOMEFEED_GATEWAY_HOP_CHECK_S`` (1): how often the downstreams' health is checked
  (``readiness.HopWatcher``).

Canary releases (``canary.CanaryRouter``):

- ``HOMEFEED_ROLLOUT_ADDR`` (unset: no rollouts, every request is stable): ``host:port`` of
  the rollout controller, which this replica reports to and takes its weights from;
- ``HOMEFEED_GATEWAY_REPLICA`` (else ``POD_NAME``, else ``<host>:<pid>``): this replica's
  name in the reports.

Experiments and the impression log:

- ``HOMEFEED_GATEWAY_EXPERIMENT`` (unset: none): a YAML/JSON file with the experiment's
  name, salt and arms (``experiment.Experiment``);
- ``HOMEFEED_GATEWAY_LOG_FEEDS`` (true): send every served feed to the event log;
- ``HOMEFEED_EVENTS_ADDR`` (else ``HOMEFEED_FEATURES_ADDR``: the features process serves
  ``LogEvents``): ``host:port`` of the events service;
- ``HOMEFEED_GATEWAY_LOG_FEATURES_RATE`` (0.05): share of logged feeds that carry the
  feature rows they were ranked with (skew checks).

plus ``HOMEFEED_GATEWAY_{HOST,PORT,...}`` (``ServerSettings``; ``MAX_WORKERS`` is derived).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from contract.paths import Paths
from services.common.bundles import BundleRef
from services.common.settings import (
    ServerSettings,
    SettingsError,
    env_bool,
    env_float,
    env_int,
    env_str,
)
from services.common.settings import require as require_env
from services.gateway.admission import AdmissionConfig
from services.gateway.breaker import BreakerConfig
from services.gateway.experiment import Experiment, ExperimentError
from services.gateway.pipeline import PipelineConfig
from services.gateway.rerank import RerankConfig

SERVICE = "gateway"
SPARE_RPCS = 2  # beyond max_in_flight: health checks, reflection, refusals
PREFIX = "HOMEFEED_GATEWAY_"

C = TypeVar("C")


@dataclass(frozen=True)
class GatewaySettings:
    """Where the downstreams are, where the popularity fallback comes from, and how the
    pipeline, the re-ranking and the breakers behave."""

    server: ServerSettings
    retrieval_addr: str
    features_addr: str
    ranking_addr: str
    home: Path
    bundle: BundleRef | None = None  # None: the registry's champion under home
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    hop_check_s: float = 1.0
    spare_rpcs: int = SPARE_RPCS
    rollout_addr: str | None = None  # the rollout controller; None: no canary releases
    experiment: Experiment | None = None
    log_feeds: bool = True
    events_addr: str = ""  # "": features_addr
    log_features_rate: float = 0.05

    def __post_init__(self) -> None:
        if not 0.05 <= self.hop_check_s <= 60:
            raise SettingsError(f"{PREFIX}HOP_CHECK_S must be 0.05..60, got {self.hop_check_s}")
        if not 1 <= self.spare_rpcs <= 64:
            raise SettingsError(f"{PREFIX}SPARE_RPCS must be 1..64, got {self.spare_rpcs}")
        if not 0.0 <= self.log_features_rate <= 1.0:
            raise SettingsError(
                f"{PREFIX}LOG_FEATURES_RATE must be in [0, 1], got {self.log_features_rate}"
            )

    @property
    def serving(self) -> ServerSettings:
        """The server settings with the thread pool sized by admission: ``max_in_flight``
        feeds plus spare threads, and no RPC beyond them waiting in grpc's queue."""
        workers = self.admission.max_in_flight + self.spare_rpcs
        return replace(self.server, max_workers=workers, max_concurrent_rpcs=workers)

    @property
    def source(self) -> BundleRef:
        return self.bundle if self.bundle is not None else BundleRef(self.home, service=SERVICE)

    @classmethod
    def from_env(cls) -> GatewaySettings:
        """Read the variables listed in the module docstring; a missing required one or a
        malformed or out-of-range value raises ``SettingsError`` naming it."""
        retrieval = require_env("HOMEFEED_RETRIEVAL_ADDR", "host:port of the retrieval service")
        features = require_env("HOMEFEED_FEATURES_ADDR", "host:port of the features service")
        ranking = require_env("HOMEFEED_RANKING_ADDR", "host:port of the ranking service")
        p, r, b, a = PipelineConfig(), RerankConfig(), BreakerConfig(), AdmissionConfig()

        def ms(name: str, default_s: float) -> float:
            return env_float(PREFIX + name, default_s * 1e3) / 1e3

        pipeline = _build(
            PipelineConfig,
            {
                "candidates": ("CANDIDATES", env_int(PREFIX + "CANDIDATES", p.candidates)),
                "home_deadline_s": ("HOME_DEADLINE_MS", ms("HOME_DEADLINE_MS", p.home_deadline_s)),
                "checkout_deadline_s": (
                    "CHECKOUT_DEADLINE_MS",
                    ms("CHECKOUT_DEADLINE_MS", p.checkout_deadline_s),
                ),
                "retrieval_share": (
                    "RETRIEVAL_SHARE",
                    env_float(PREFIX + "RETRIEVAL_SHARE", p.retrieval_share),
                ),
                "features_share": (
                    "FEATURES_SHARE",
                    env_float(PREFIX + "FEATURES_SHARE", p.features_share),
                ),
                "retrieval_cap_s": (
                    "RETRIEVAL_TIMEOUT_MS",
                    ms("RETRIEVAL_TIMEOUT_MS", p.retrieval_cap_s),
                ),
                "features_cap_s": (
                    "FEATURES_TIMEOUT_MS",
                    ms("FEATURES_TIMEOUT_MS", p.features_cap_s),
                ),
                "ranking_cap_s": ("RANKING_TIMEOUT_MS", ms("RANKING_TIMEOUT_MS", p.ranking_cap_s)),
                "reserve_s": ("RESERVE_MS", ms("RESERVE_MS", p.reserve_s)),
            },
        )
        rerank = _build(
            RerankConfig,
            {
                "max_per_category": (
                    "MAX_PER_CATEGORY",
                    env_int(PREFIX + "MAX_PER_CATEGORY", r.max_per_category),
                ),
                "diversity_depth": (
                    "DIVERSITY_DEPTH",
                    env_int(PREFIX + "DIVERSITY_DEPTH", r.diversity_depth),
                ),
                "new_seller_min_share": (
                    "NEW_SELLER_MIN_SHARE",
                    env_float(PREFIX + "NEW_SELLER_MIN_SHARE", r.new_seller_min_share),
                ),
                "epsilon": ("EPSILON", env_float(PREFIX + "EPSILON", r.epsilon)),
            },
        )
        breaker = _build(
            BreakerConfig,
            {
                "window": ("BREAKER_WINDOW", env_int(PREFIX + "BREAKER_WINDOW", b.window)),
                "min_calls": (
                    "BREAKER_MIN_CALLS",
                    env_int(PREFIX + "BREAKER_MIN_CALLS", b.min_calls),
                ),
                "failure_rate": (
                    "BREAKER_FAILURE_RATE",
                    env_float(PREFIX + "BREAKER_FAILURE_RATE", b.failure_rate),
                ),
                "slow_rate": (
                    "BREAKER_SLOW_RATE",
                    env_float(PREFIX + "BREAKER_SLOW_RATE", b.slow_rate),
                ),
                "slow_call_s": ("BREAKER_SLOW_CALL_MS", ms("BREAKER_SLOW_CALL_MS", b.slow_call_s)),
                "open_wait_s": (
                    "BREAKER_OPEN_WAIT_S",
                    env_float(PREFIX + "BREAKER_OPEN_WAIT_S", b.open_wait_s),
                ),
                "half_open_calls": (
                    "BREAKER_HALF_OPEN_CALLS",
                    env_int(PREFIX + "BREAKER_HALF_OPEN_CALLS", b.half_open_calls),
                ),
                "half_open_max_wait_s": (
                    "BREAKER_HALF_OPEN_MAX_WAIT_S",
                    env_float(PREFIX + "BREAKER_HALF_OPEN_MAX_WAIT_S", b.half_open_max_wait_s),
                ),
            },
        )
        admission = _build(
            AdmissionConfig,
            {
                "max_in_flight": (
                    "MAX_IN_FLIGHT",
                    env_int(PREFIX + "MAX_IN_FLIGHT", a.max_in_flight),
                ),
                "min_budget_s": ("MIN_BUDGET_MS", ms("MIN_BUDGET_MS", a.min_budget_s)),
            },
        )
        home = Paths.from_env().home
        return cls(
            server=ServerSettings.from_env(SERVICE),
            retrieval_addr=retrieval,
            features_addr=features,
            ranking_addr=ranking,
            home=home,
            bundle=BundleRef.from_env(SERVICE, home),
            pipeline=pipeline,
            rerank=rerank,
            breaker=breaker,
            admission=admission,
            hop_check_s=env_float(PREFIX + "HOP_CHECK_S", 1.0),
            spare_rpcs=env_int(PREFIX + "SPARE_RPCS", SPARE_RPCS),
            rollout_addr=env_str("HOMEFEED_ROLLOUT_ADDR"),
            experiment=_experiment(env_str(PREFIX + "EXPERIMENT")),
            log_feeds=env_bool(PREFIX + "LOG_FEEDS", True),
            events_addr=env_str("HOMEFEED_EVENTS_ADDR", "") or features,
            log_features_rate=env_float(PREFIX + "LOG_FEATURES_RATE", 0.05),
        )


def _experiment(path: str | None) -> Experiment | None:
    if not path:
        return None
    try:
        return Experiment.load(path)
    except ExperimentError as err:
        raise SettingsError(f"{PREFIX}EXPERIMENT: {err}") from None


def _build(factory: Callable[..., C], fields: dict[str, tuple[str, object]]) -> C:
    """``factory(**values)``; its ValueError for an out-of-range field is re-raised as a
    SettingsError naming the environment variable (``field must be ...`` messages)."""
    try:
        return factory(**{name: value for name, (_, value) in fields.items()})
    except ValueError as err:
        message = str(err)
        name, _, rest = message.partition(" ")
        if name in fields:
            raise SettingsError(f"{PREFIX}{fields[name][0]} (as {name}) {rest}") from None
        raise SettingsError(message) from None
