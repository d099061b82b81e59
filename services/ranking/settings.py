"""Settings of the ranking service, read once at start from the environment.

- ``HOMEFEED_HOME`` (default: the repo root): where the registry database and the model
  cache live.
- ``HOMEFEED_RANKING_MODEL``, else ``HOMEFEED_MODEL`` (``champion``): registry alias or
  version number served at start.
- ``HOMEFEED_RANKING_BUNDLE_DIR``, else ``HOMEFEED_BUNDLE_DIR`` (unset): serve this bundle
  directory instead of the registry's; ``Reload`` then also accepts directory paths.
- ``HOMEFEED_RANKING_CACHE_DIR``, else ``HOMEFEED_MODEL_CACHE``
  (``<home>/artifacts/model_cache``): verified local copies of registry versions.
- ``MLFLOW_TRACKING_URI`` (``sqlite:///<home>/mlruns/mlflow.db``): the model registry.
- ``HOMEFEED_RANKING_SCORE`` (``purchase``): the served score (``scorer.ServedScore``).
- ``HOMEFEED_RANKING_ADMIN_PORT`` (0: a free one), ``HOMEFEED_RANKING_ADMIN_HOST`` (the
  serving host): where the admin RPCs (Reload) listen; the serving port refuses them;
- ``HOMEFEED_RANKING_FAULTS`` (unset): injected faults for rehearsals (``faults.py``);
- ``HOMEFEED_ADMIN_TOKEN`` (unset: admin RPCs refused, with a warning at start): the bearer
  token ``Reload`` requires.

plus ``HOMEFEED_RANKING_{HOST,PORT,MAX_WORKERS,...}`` (``ServerSettings``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from contract.paths import Paths
from services.common.bundles import BundleRef
from services.common.settings import ServerSettings, SettingsError, env_int, env_str
from services.ranking.faults import Faults
from services.ranking.scorer import ServedScore

SERVICE = "ranking"


@dataclass(frozen=True)
class RankingSettings:
    """Where the served bundle comes from, how it is scored, and who may reload it."""

    server: ServerSettings
    home: Path
    bundle: BundleRef | None = None  # None: the registry's champion under home; a bundle
    # directory also lets Reload take directory targets
    score: ServedScore = ServedScore.PURCHASE
    admin_token: str | None = field(default=None, repr=False)
    # admin RPCs (Reload) listen on a port of their own, so a network policy can keep every
    # caller of Rank away from them; 0: a free port, reported as HOMEFEED_ADMIN port=<n>
    admin_port: int = 0
    admin_host: str | None = None  # None: the serving host
    faults: Faults | None = None  # rehearsals only: errors, delay or bad scores on purpose

    def __post_init__(self) -> None:
        if not 0 <= self.admin_port <= 65535:
            raise SettingsError(
                f"HOMEFEED_RANKING_ADMIN_PORT must be 0..65535, got {self.admin_port}"
            )

    @property
    def admin_server(self) -> ServerSettings:
        """The admin server's settings: the serving ones on the admin host and port."""
        host = self.admin_host if self.admin_host is not None else self.server.host
        return replace(self.server, host=host, port=self.admin_port, max_workers=2)

    @property
    def source(self) -> BundleRef:
        return self.bundle if self.bundle is not None else BundleRef(self.home, service=SERVICE)

    @property
    def default_target(self) -> str:
        """What ``Reload`` with an empty target (and the start-up load) loads."""
        source = self.source
        return str(source.bundle_dir) if source.bundle_dir is not None else source.model

    @classmethod
    def from_env(cls) -> RankingSettings:
        """Read the variables listed in the module docstring; a malformed one raises
        ``SettingsError`` naming it."""
        score = env_str("HOMEFEED_RANKING_SCORE", ServedScore.PURCHASE.value)
        try:
            served = ServedScore.parse(score)
        except ValueError as err:
            raise SettingsError(f"HOMEFEED_RANKING_SCORE {err}") from None
        home = Paths.from_env().home
        faults_text = env_str("HOMEFEED_RANKING_FAULTS")
        try:
            faults = Faults.parse(faults_text) if faults_text else None
        except ValueError as err:
            raise SettingsError(f"HOMEFEED_RANKING_FAULTS {err}") from None
        return cls(
            server=ServerSettings.from_env(SERVICE),
            home=home,
            bundle=BundleRef.from_env(SERVICE, home),
            score=served,
            admin_token=env_str("HOMEFEED_ADMIN_TOKEN"),
            admin_port=env_int("HOMEFEED_RANKING_ADMIN_PORT", 0),
            admin_host=env_str("HOMEFEED_RANKING_ADMIN_HOST"),
            faults=faults,
        )
