"""Where a service's model bundle comes from, and resolving it once at start.

Every service serves one bundle: a registry version (an alias such as ``champion`` is
resolved to its version number once, at start) or a bundle directory. The mesh resolves the
alias itself and hands every service the same version number (``HOMEFEED_MODEL``), so the
four services serve one version; a service-specific variable
(``HOMEFEED_<SERVICE>_MODEL``, ``..._BUNDLE_DIR``) overrides it, which is how a ranking
canary serves another one.

What a service reports as its model version is ``Resolved.version``: the registry version
number, or the bundle's own id when it serves a directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.bundle import ALIAS_CHAMPION, read_manifest, verify_bundle
from contract.paths import Paths
from contract.registry import Registry, default_tracking_uri
from services.common.settings import env_str

MODEL_ENV = "HOMEFEED_MODEL"
BUNDLE_DIR_ENV = "HOMEFEED_BUNDLE_DIR"
CACHE_DIR_ENV = "HOMEFEED_MODEL_CACHE"


@dataclass(frozen=True)
class BundleRef:
    """A registry alias or version, or a bundle directory (which wins when set)."""

    home: Path
    model: str = ALIAS_CHAMPION
    bundle_dir: Path | None = None
    cache_dir: Path | None = None  # None: <home>/artifacts/model_cache
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else the home's SQLite file
    service: str = ""  # names the variables in messages

    @classmethod
    def from_env(cls, service: str, home: Path) -> BundleRef:
        """``HOMEFEED_<SERVICE>_MODEL`` / ``_BUNDLE_DIR`` / ``_CACHE_DIR``, else the mesh-wide
        ``HOMEFEED_MODEL`` / ``HOMEFEED_BUNDLE_DIR`` / ``HOMEFEED_MODEL_CACHE``."""
        prefix = f"HOMEFEED_{service.upper()}_"
        bundle_dir = env_str(prefix + "BUNDLE_DIR", env_str(BUNDLE_DIR_ENV))
        cache_dir = env_str(prefix + "CACHE_DIR", env_str(CACHE_DIR_ENV))
        return cls(
            home=home,
            model=env_str(prefix + "MODEL", env_str(MODEL_ENV, ALIAS_CHAMPION)),
            bundle_dir=Path(bundle_dir).resolve() if bundle_dir else None,
            cache_dir=Path(cache_dir).resolve() if cache_dir else None,
            tracking_uri=env_str("MLFLOW_TRACKING_URI"),
            service=service,
        )

    @property
    def model_cache(self) -> Path:
        return (
            self.cache_dir
            if self.cache_dir is not None
            else Paths(self.home).artifacts / ("model_cache")
        )

    @property
    def registry_uri(self) -> str:
        return self.tracking_uri or default_tracking_uri(Paths(self.home))

    def describe(self) -> str:
        """Where the bundle comes from, for log lines and start-up errors."""
        own = f"HOMEFEED_{self.service.upper()}_" if self.service else ""
        if self.bundle_dir is not None:
            names = f"{own}BUNDLE_DIR or {BUNDLE_DIR_ENV}" if own else BUNDLE_DIR_ENV
            return f"bundle directory {self.bundle_dir} ({names})"
        names = f"{own}MODEL or {MODEL_ENV}" if own else MODEL_ENV
        return f"registry model {self.model!r} ({names}) at {self.registry_uri}"


@dataclass(frozen=True)
class Resolved:
    """A verified local bundle and the version a service reports for it."""

    path: Path
    version: str  # registry version number, or the bundle's id for a directory
    manifest: dict[str, Any]

    @property
    def bundle_version(self) -> str:
        return str(self.manifest.get("version", self.path.name))


class RegistryError(RuntimeError):
    """The registry could not resolve or serve the bundle (unknown alias or version, a
    registry that does not answer); the message says which and why."""


def resolve_bundle(ref: BundleRef, expected_schema_hash: str | None = None) -> Resolved:
    """Verify the directory, or resolve the alias to a version and fetch a verified copy.

    Raises ``BundleError`` for a bundle that does not verify (or was built for another
    feature schema), ``RegistryError`` when the registry cannot resolve or serve it, and
    ``OSError`` when the cache cannot be written.
    """
    if ref.bundle_dir is not None:
        manifest = verify_bundle(ref.bundle_dir, expected_schema_hash)
        return Resolved(ref.bundle_dir, str(manifest.get("version", ref.bundle_dir.name)), manifest)
    from mlflow.exceptions import MlflowException

    registry = Registry(ref.registry_uri)
    try:
        version = int(ref.model) if ref.model.isdigit() else registry.get_version(ref.model)
        path = registry.load(version, ref.model_cache, expected_schema_hash)
    except MlflowException as err:
        raise RegistryError(f"{ref.describe()}: {err.message}") from err
    return Resolved(path, str(version), read_manifest(path))
