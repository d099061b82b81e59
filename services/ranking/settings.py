"""Settings of the ranking service, read once at start from the environment.

- ``HOMEFEED_HOME`` (default: the repo root): where the registry database and the model
  cache live.
- ``HOMEFEED_RANKING_MODEL`` (``champion``): registry alias or version number served at start.
- ``HOMEFEED_RANKING_BUNDLE_DIR`` (unset): serve this bundle directory instead of the
  registry's; ``Reload`` then also accepts directory paths.
- ``HOMEFEED_RANKING_CACHE_DIR`` (``<home>/artifacts/model_cache``): verified local copies
  of registry versions.
- ``MLFLOW_TRACKING_URI`` (``sqlite:///<home>/mlruns/mlflow.db``): the model registry.
- ``HOMEFEED_RANKING_SCORE`` (``purchase``): the served score (``scorer.ServedScore``).
- ``HOMEFEED_ADMIN_TOKEN`` (unset: admin RPCs open, with a warning at start): the bearer
  token ``Reload`` requires.

plus ``HOMEFEED_RANKING_{HOST,PORT,MAX_WORKERS,...}`` (``ServerSettings``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.common.settings import ServerSettings, SettingsError, env_str
from services.ranking.scorer import ServedScore
from training.bundle import ALIAS_CHAMPION
from training.paths import Paths
from training.registry import default_tracking_uri

SERVICE = "ranking"


@dataclass(frozen=True)
class RankingSettings:
    """Where the served bundle comes from, how it is scored, and who may reload it."""

    server: ServerSettings
    home: Path
    model: str = ALIAS_CHAMPION  # registry alias or version number
    bundle_dir: Path | None = None  # set: serve this directory, and allow directory targets
    cache_dir: Path | None = None  # None: <home>/artifacts/model_cache
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else the home's SQLite file
    score: ServedScore = ServedScore.PURCHASE
    admin_token: str | None = field(default=None, repr=False)

    @property
    def model_cache(self) -> Path:
        return (
            self.cache_dir if self.cache_dir is not None else self.paths.artifacts / "model_cache"
        )

    @property
    def paths(self) -> Paths:
        return Paths(self.home)

    @property
    def registry_uri(self) -> str:
        return self.tracking_uri or default_tracking_uri(self.paths)

    @property
    def default_target(self) -> str:
        """What ``Reload`` with an empty target (and the start-up load) loads."""
        return str(self.bundle_dir) if self.bundle_dir is not None else self.model

    def describe_source(self) -> str:
        """Where the start-up model comes from, for log lines and start-up errors."""
        if self.bundle_dir is not None:
            return f"bundle directory {self.bundle_dir} (HOMEFEED_RANKING_BUNDLE_DIR)"
        return f"registry model {self.model!r} (HOMEFEED_RANKING_MODEL) at {self.registry_uri}"

    @classmethod
    def from_env(cls) -> RankingSettings:
        """Read the variables listed in the module docstring; a malformed one raises
        ``SettingsError`` naming it."""
        bundle_dir = env_str("HOMEFEED_RANKING_BUNDLE_DIR")
        cache_dir = env_str("HOMEFEED_RANKING_CACHE_DIR")
        score = env_str("HOMEFEED_RANKING_SCORE", ServedScore.PURCHASE.value)
        try:
            served = ServedScore.parse(score)
        except ValueError as err:
            raise SettingsError(f"HOMEFEED_RANKING_SCORE {err}") from None
        return cls(
            server=ServerSettings.from_env(SERVICE),
            home=Paths.from_env().home,
            model=env_str("HOMEFEED_RANKING_MODEL", ALIAS_CHAMPION),
            bundle_dir=Path(bundle_dir).resolve() if bundle_dir else None,
            cache_dir=Path(cache_dir).resolve() if cache_dir else None,
            tracking_uri=env_str("MLFLOW_TRACKING_URI"),
            score=served,
            admin_token=env_str("HOMEFEED_ADMIN_TOKEN"),
        )
