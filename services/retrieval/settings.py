"""Settings of the retrieval service, read once at start from the environment.

- ``HOMEFEED_HOME`` (default: the repo root): where ``data/<dataset>/``, the registry
  database and the model cache live.
- ``HOMEFEED_DATASET`` (``sim-small``): the dataset whose Feast store gives the user
  features and the stock.
- ``HOMEFEED_ONLINE_STORE`` (``sqlite``): ``sqlite`` or ``redis``.
- ``HOMEFEED_REDIS`` (required with ``redis``): Feast's connection string, ``host:port``.
- ``HOMEFEED_RETRIEVAL_MODEL``, else ``HOMEFEED_MODEL`` (``champion``): registry alias or
  version number served; its bundle's catalog gives the exploration pool.
- ``HOMEFEED_RETRIEVAL_BUNDLE_DIR``, else ``HOMEFEED_BUNDLE_DIR`` (unset): serve this bundle
  directory instead.
- ``HOMEFEED_RETRIEVAL_CACHE_DIR``, else ``HOMEFEED_MODEL_CACHE``
  (``<home>/artifacts/model_cache``): verified local copies of registry versions (shared by
  the services: one download serves all).
- ``MLFLOW_TRACKING_URI`` (``sqlite:///<home>/mlruns/mlflow.db``): the model registry.
- ``HOMEFEED_RETRIEVAL_EXPLORATION`` (10): exploration candidates per request (0 disables;
  at most half of ``n``).
- ``HOMEFEED_RETRIEVAL_CHECKOUT_CONTENT_SHARE`` (0.5): share of the non-exploration slots
  that cart-similar (CONTENT) candidates take on CHECKOUT.
- ``HOMEFEED_RETRIEVAL_HISTORY_SHARE`` (0.4): at most this share of the non-exploration slots
  goes to the user's history (HISTORY) before the tower's neighbours.
- ``HOMEFEED_RETRIEVAL_PROFILE_SHARE`` (0.5): at most this share of the non-exploration slots
  goes to the items nearest the user's content profile (PROFILE), after the history and
  before the tower's neighbours (0 disables the source).
- ``HOMEFEED_RETRIEVAL_NEW_ITEM_DAYS`` (14): an item listed within this many days of the
  catalog's as-of time is in the exploration pool (so is every item of a seller who joined
  within ``contract.features.NEW_SELLER_DAYS``, the ``seller_is_new`` rule).
- ``HOMEFEED_RETRIEVAL_SEED`` (0): mixed with the request id into the exploration draw, so
  a request id always gets the same draw.
- ``HOMEFEED_RETRIEVAL_STOCK_REFRESH_S`` (2): seconds between checks of the online store's
  stock; an item pushed out of stock stops being retrieved within about this long.

plus ``HOMEFEED_RETRIEVAL_{HOST,PORT,MAX_WORKERS,...}`` (``ServerSettings``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from contract.catalog import NEW_ITEM_DAYS
from contract.content import PROFILE_SHARE
from contract.feature_store import ONLINE_STORES
from contract.paths import Paths
from services.common.bundles import BundleRef
from services.common.settings import (
    ServerSettings,
    SettingsError,
    env_float,
    env_int,
    env_str,
    require,
)
from services.retrieval.index import MAX_N, RetrievalConfig

SERVICE = "retrieval"
_PREFIX = "HOMEFEED_RETRIEVAL_"


@dataclass(frozen=True)
class RetrievalSettings:
    """Which bundle and store are served, and how candidates are assembled."""

    server: ServerSettings
    home: Path
    dataset: str = "sim-small"
    online_store: str = "sqlite"
    redis: str | None = None
    bundle: BundleRef | None = None  # None: the registry's champion under home
    exploration: int = 10
    checkout_content_share: float = 0.5
    history_share: float = 0.4
    profile_share: float = PROFILE_SHARE
    new_item_days: float = NEW_ITEM_DAYS
    seed: int = 0
    stock_refresh_s: float = 2.0

    def __post_init__(self) -> None:
        if self.online_store not in ONLINE_STORES:
            raise SettingsError(
                f"HOMEFEED_ONLINE_STORE must be one of {', '.join(ONLINE_STORES)}, "
                f"got {self.online_store!r}"
            )
        if self.online_store == "redis" and not self.redis:
            raise SettingsError(
                "HOMEFEED_REDIS is required with HOMEFEED_ONLINE_STORE=redis: "
                "the Redis connection string, host:port"
            )
        if not 0 <= self.exploration <= MAX_N // 2:
            raise SettingsError(
                f"{_PREFIX}EXPLORATION must be 0..{MAX_N // 2} candidates, got {self.exploration}"
            )
        if not 0.0 <= self.checkout_content_share <= 1.0:
            raise SettingsError(
                f"{_PREFIX}CHECKOUT_CONTENT_SHARE must be in [0, 1], "
                f"got {self.checkout_content_share}"
            )
        if not 0.0 <= self.history_share <= 1.0:
            raise SettingsError(
                f"{_PREFIX}HISTORY_SHARE must be in [0, 1], got {self.history_share}"
            )
        if not 0.0 <= self.profile_share <= 1.0:
            raise SettingsError(
                f"{_PREFIX}PROFILE_SHARE must be in [0, 1], got {self.profile_share}"
            )
        if not self.new_item_days >= 0:
            raise SettingsError(
                f"{_PREFIX}NEW_ITEM_DAYS must be >= 0 days, got {self.new_item_days}"
            )
        if self.seed < 0:
            raise SettingsError(f"{_PREFIX}SEED must be >= 0, got {self.seed}")
        if not 0 < self.stock_refresh_s <= 3600:
            raise SettingsError(
                f"{_PREFIX}STOCK_REFRESH_S must be in (0, 3600] seconds, got {self.stock_refresh_s}"
            )

    @property
    def paths(self) -> Paths:
        return Paths(self.home)

    @property
    def source(self) -> BundleRef:
        return self.bundle if self.bundle is not None else BundleRef(self.home, service=SERVICE)

    @property
    def config(self) -> RetrievalConfig:
        return RetrievalConfig(
            exploration=self.exploration,
            checkout_content_share=self.checkout_content_share,
            history_share=self.history_share,
            profile_share=self.profile_share,
        )

    @classmethod
    def from_env(cls) -> RetrievalSettings:
        """Read the variables listed in the module docstring; a malformed one raises
        ``SettingsError`` naming it."""
        online = env_str("HOMEFEED_ONLINE_STORE", "sqlite")
        d = cls(server=ServerSettings(), home=Path("."))
        home = Paths.from_env().home
        return cls(
            server=ServerSettings.from_env(SERVICE),
            home=home,
            dataset=env_str("HOMEFEED_DATASET", d.dataset),
            online_store=online,
            redis=(
                require("HOMEFEED_REDIS", "the Redis connection string (host:port)")
                if online == "redis"
                else env_str("HOMEFEED_REDIS")
            ),
            bundle=BundleRef.from_env(SERVICE, home),
            exploration=env_int(_PREFIX + "EXPLORATION", d.exploration),
            checkout_content_share=env_float(
                _PREFIX + "CHECKOUT_CONTENT_SHARE", d.checkout_content_share
            ),
            history_share=env_float(_PREFIX + "HISTORY_SHARE", d.history_share),
            profile_share=env_float(_PREFIX + "PROFILE_SHARE", d.profile_share),
            new_item_days=env_float(_PREFIX + "NEW_ITEM_DAYS", d.new_item_days),
            seed=env_int(_PREFIX + "SEED", d.seed),
            stock_refresh_s=env_float(_PREFIX + "STOCK_REFRESH_S", d.stock_refresh_s),
        )
