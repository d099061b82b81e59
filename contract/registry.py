"""Bundle versions and aliases in MLflow's model registry: register (training), resolve and
load (serving). Layout and verification of a bundle: ``contract.bundle``.

A bundle is not an MLflow model (it has no ``MLmodel`` file and no pyfunc flavor), and
MLflow 3's ``mlflow.register_model`` on a ``runs:/<id>/bundle`` URI refuses exactly that
case: with no ``MLmodel`` file there it looks for a *LoggedModel* of that name and raises
``Unable to find a logged_model``. So ``Registry.register`` logs the bundle directory as
plain run artifacts and creates the version with ``MlflowClient.create_model_version(name,
source=<run artifact URI>/bundle, run_id=...)``, which stores the source as given. ``load``
downloads that source and verifies it before anyone reads it.

``import mlflow`` costs over a second, so it happens only inside ``Registry`` methods. The
client needs only MLflow's tracking client (``mlflow-skinny`` plus SQLAlchemy for a SQLite
registry), not the MLflow server.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contract.bundle import (
    ALIAS_CHALLENGER,
    REGISTERED_MODEL,
    BundleError,
    check_schema,
    verify_bundle,
)
from contract.paths import Paths

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

EXPERIMENT = "homefeed-bundles"
BUNDLE_ARTIFACT_PATH = "bundle"  # where a run keeps the bundle among its artifacts


def default_tracking_uri(paths: Paths | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set (e.g. a tracking server), else the home's SQLite file."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    paths = paths or Paths.from_env()
    return f"sqlite:///{paths.home / 'mlruns' / 'mlflow.db'}"


def _sqlite_file(uri: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) else None


def _flat_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested metrics dict, keyed ``a.b.c``; MLflow takes floats only."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat_metrics(value, f"{name}."))
        elif (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        ):
            out[name] = float(value)
    return out


class Registry:
    """Bundle versions and aliases in MLflow's model registry.

    Without a URI (argument or ``MLFLOW_TRACKING_URI``), runs and the registry live in
    ``<HOMEFEED_HOME>/mlruns/mlflow.db``. With any ``sqlite:///`` URI the artifacts go next to
    the database file (``artifacts/``), not to MLflow's default ``./mlruns`` under whatever
    the working directory is. With a server URI the server decides where artifacts go.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        name: str = REGISTERED_MODEL,
        experiment: str = EXPERIMENT,
    ) -> None:
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.name = name
        self.experiment = experiment
        db = _sqlite_file(self.tracking_uri)
        self.artifact_root: Path | None = db.resolve().parent / "artifacts" if db else None
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            from mlflow import MlflowClient

            db = _sqlite_file(self.tracking_uri)
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(
                tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri
            )
        return self._client

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return str(found.experiment_id)
        location = self.artifact_root.as_uri() if self.artifact_root else None
        try:
            return str(self.client.create_experiment(self.experiment, artifact_location=location))
        except MlflowException:  # created concurrently
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return str(found.experiment_id)

    def _ensure_registered_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            try:
                self.client.create_registered_model(
                    name, description="homefeed model bundles (contract/bundle.py)"
                )
            except MlflowException:
                self.client.get_registered_model(name)  # created concurrently, else raise

    def register(
        self,
        bundle_dir: Path,
        *,
        name: str | None = None,
        alias: str | None = ALIAS_CHALLENGER,
        metrics: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> int:
        """Log ``bundle_dir`` as one run's artifacts and register it; returns the version.

        The bundle is verified first: an unverifiable bundle is never registered. The run
        logs ``params``, and the manifest's metrics updated with ``metrics`` (numeric leaves,
        nested keys joined with dots). ``alias`` (None: none) is moved to the new version.
        """
        from mlflow.entities import Metric, Param, RunTag

        name = name or self.name
        bundle_dir = Path(bundle_dir)
        manifest = verify_bundle(bundle_dir)
        started = time.perf_counter()
        client = self.client
        run = client.create_run(
            self._experiment_id(),
            run_name=f"bundle-{manifest['version']}",
            tags={"homefeed.bundle_version": str(manifest["version"])},
        )
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        all_params = {
            "bundle_version": manifest["version"],
            "data_snapshot": manifest.get("data_snapshot"),
            "feature_schema_hash": manifest.get("feature_schema_hash"),
            **(params or {}),
        }
        all_metrics = _flat_metrics({**manifest.get("metrics", {}), **(metrics or {})})
        try:
            client.log_batch(
                run_id,
                metrics=[Metric(k, v, now, 0) for k, v in all_metrics.items()],
                params=[Param(k, str(v)) for k, v in all_params.items()],
                tags=[RunTag("homefeed.created_at", str(manifest.get("created_at")))],
            )
            client.log_artifacts(run_id, str(bundle_dir), artifact_path=BUNDLE_ARTIFACT_PATH)
        except BaseException:
            client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id, status="FINISHED")

        self._ensure_registered_model(name)
        source = f"{run.info.artifact_uri.rstrip('/')}/{BUNDLE_ARTIFACT_PATH}"
        mv = client.create_model_version(
            name,
            source=source,
            run_id=run_id,
            tags={
                "bundle_version": str(manifest["version"]),
                "feature_schema_hash": str(manifest.get("feature_schema_hash")),
            },
        )
        version = int(mv.version)
        if alias:
            client.set_registered_model_alias(name, alias, str(version))
        log.info(
            "registered bundle %s as %s version %d%s in %.2f s",
            manifest["version"],
            name,
            version,
            f" (@{alias})" if alias else "",
            time.perf_counter() - started,
        )
        return version

    def set_alias(self, version: int, alias: str, *, name: str | None = None) -> None:
        """Point ``alias`` (e.g. ``champion``) at ``version``, moving it if it was elsewhere."""
        self.client.set_registered_model_alias(name or self.name, alias, str(int(version)))
        log.info("%s@%s -> version %d", name or self.name, alias, version)

    def get_version(self, alias: str, *, name: str | None = None) -> int:
        return int(self.client.get_model_version_by_alias(name or self.name, alias).version)

    def _resolve(self, alias_or_version: str | int, name: str) -> int:
        if isinstance(alias_or_version, int):
            return alias_or_version
        if alias_or_version.isdigit():
            return int(alias_or_version)
        return self.get_version(alias_or_version, name=name)

    def load(
        self,
        alias_or_version: str | int,
        cache_dir: Path,
        expected_schema_hash: str | None = None,
        *,
        name: str | None = None,
    ) -> Path:
        """A verified local copy of a registered bundle: ``<cache_dir>/<name>/v<version>``.

        A cached copy is reused when it verifies, and replaced when it does not. The download
        goes to a temporary folder beside the cache entry and is renamed into place only once
        verified, so a reader never sees a half-written bundle. Raises ``BundleError`` when the
        registered bundle does not verify or was built for another schema.
        """
        name = name or self.name
        started = time.perf_counter()
        version = self._resolve(alias_or_version, name)
        model_cache = Path(cache_dir) / name
        target = model_cache / f"v{version}"
        manifest: dict[str, Any] | None = None
        if target.exists():
            try:
                manifest = verify_bundle(target)
                log.debug("reusing cached %s version %d at %s", name, version, target)
            except BundleError as err:
                log.warning(
                    "cached copy of %s version %d is refused (%s); fetching it again",
                    name,
                    version,
                    err,
                )
                shutil.rmtree(target)
        if manifest is None:
            manifest = self._download(name, version, model_cache, target)
        check_schema(target, manifest, expected_schema_hash)
        log.info(
            "loaded %s version %d (bundle %s) in %.2f s",
            name,
            version,
            manifest.get("version"),
            time.perf_counter() - started,
        )
        return target

    def _download(self, name: str, version: int, model_cache: Path, target: Path) -> dict[str, Any]:
        import mlflow.artifacts

        # a tqdm bar per download is noise in a server's log; an explicit setting still wins
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mv = self.client.get_model_version(name, str(version))
        model_cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=model_cache))
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=mv.source, dst_path=str(tmp), tracking_uri=self.tracking_uri
                )
            )
            try:
                manifest = verify_bundle(local)
            except BundleError as err:
                raise BundleError(f"{name} version {version} ({mv.source}): {err}") from err
            try:
                local.rename(target)
            except OSError:
                manifest = verify_bundle(target)  # another process put it there first
            return manifest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
