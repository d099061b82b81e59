"""Settings of the features service, read once at start from the environment.

- ``HOMEFEED_HOME`` (default: the repo root): where ``data/<dataset>/`` lives.
- ``HOMEFEED_DATASET`` (``sim-small``): the dataset whose Feast store (``feast/``) is served.
- ``HOMEFEED_FEATURES_MODEL``, else ``HOMEFEED_MODEL`` (``champion``), or
  ``HOMEFEED_FEATURES_BUNDLE_DIR``, else ``HOMEFEED_BUNDLE_DIR``: the bundle whose catalogue
  (prices, margins, sellers, categories) and heuristic are served
  (``services.common.bundles``).
- ``HOMEFEED_ONLINE_STORE`` (``sqlite``): ``sqlite`` or ``redis``.
- ``HOMEFEED_REDIS`` (required with ``redis``): Feast's connection string, ``host:port``.
- ``HOMEFEED_FEATURES_REFRESH_S`` (2): seconds between inventory refreshes; an out-of-stock
  push is served within about this long.
- ``HOMEFEED_FEATURES_BATCH_REFRESH_S`` (3600): seconds between full reloads of the batch
  item views when nothing was materialized (a new materialization reloads them at the next
  inventory tick; a full reload takes about a second of CPU, so it is not done for nothing).
- ``HOMEFEED_EVENT_LOG`` (``<home>/data/<dataset>/eventlog``): where ``LogEvents`` appends:
  a directory of local segment files (fsync per batch), or ``redis://host:port/db`` for a
  Redis Stream (``contract.eventlog``);
- ``HOMEFEED_EVENT_LOG_FSYNC`` (true): fsync each batch before acknowledging it (off only
  for throwaway benchmarks);
- ``HOMEFEED_FEATURES_SQLITE_FAST_PATH`` (true): read the SQLite online tables with SQL
  (checked against Feast's own read at start) instead of ``online_read``.

plus ``HOMEFEED_FEATURES_{HOST,PORT,MAX_WORKERS,...}`` (``ServerSettings``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from contract.feature_store import ONLINE_STORES
from contract.paths import Paths
from services.common.bundles import BundleRef
from services.common.settings import (
    ServerSettings,
    SettingsError,
    env_bool,
    env_float,
    env_str,
    require,
)

SERVICE = "features"


@dataclass(frozen=True)
class FeaturesSettings:
    """Which dataset and store are served, and how often the item table refreshes."""

    server: ServerSettings
    home: Path
    dataset: str = "sim-small"
    online_store: str = "sqlite"
    redis: str | None = None
    refresh_s: float = 2.0
    batch_refresh_s: float = 3600.0
    sqlite_fast_path: bool = True
    bundle: BundleRef | None = None  # None: the registry's champion under home
    event_log: str = ""  # "": <home>/data/<dataset>/eventlog
    event_log_fsync: bool = True

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
        if not 0 < self.refresh_s <= 3600:
            raise SettingsError(
                f"HOMEFEED_FEATURES_REFRESH_S must be in (0, 3600] seconds, got {self.refresh_s}"
            )
        if not self.refresh_s <= self.batch_refresh_s <= 86_400:
            raise SettingsError(
                "HOMEFEED_FEATURES_BATCH_REFRESH_S must be between HOMEFEED_FEATURES_REFRESH_S "
                f"({self.refresh_s}) and 86400 seconds, got {self.batch_refresh_s}"
            )

    @property
    def paths(self) -> Paths:
        return Paths(self.home)

    @property
    def event_log_location(self) -> str:
        """The event log: a directory path, or a ``redis://`` URL."""
        return self.event_log or str(self.paths.eventlog(self.dataset))

    @property
    def source(self) -> BundleRef:
        return self.bundle if self.bundle is not None else BundleRef(self.home, service=SERVICE)

    @classmethod
    def from_env(cls) -> FeaturesSettings:
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
            refresh_s=env_float("HOMEFEED_FEATURES_REFRESH_S", d.refresh_s),
            batch_refresh_s=env_float("HOMEFEED_FEATURES_BATCH_REFRESH_S", d.batch_refresh_s),
            sqlite_fast_path=env_bool("HOMEFEED_FEATURES_SQLITE_FAST_PATH", d.sqlite_fast_path),
            bundle=BundleRef.from_env(SERVICE, home),
            event_log=env_str("HOMEFEED_EVENT_LOG", d.event_log) or "",
            event_log_fsync=env_bool("HOMEFEED_EVENT_LOG_FSYNC", d.event_log_fsync),
        )
