"""Settings of the rollout controller, read once at start from the environment.

Where the deployments are (required):

- ``HOMEFEED_ROLLOUT_CANARY_ADDR``: ``host:port`` of the canary ranking deployment (its
  serving port; the gateways are told it, the controller health-checks it);
- ``HOMEFEED_ROLLOUT_STABLE_ADMIN_ADDR``: ``host:port`` of the stable ranking deployment's
  admin port, where promotion and undo call ``Reload``;
- ``HOMEFEED_ADMIN_TOKEN``: the token the admin RPCs require here and that the controller
  sends to ranking's ``Reload`` (unset: every admin RPC is refused).

Where the state lives: ``HOMEFEED_ROLLOUT_STATE_FILE`` (``<home>/run/rollout/state.json``,
leader elected by an ``flock`` on ``state.json.lock`` beside it), or, with
``HOMEFEED_ROLLOUT_NAMESPACE`` set (in Kubernetes), the ConfigMap
``HOMEFEED_ROLLOUT_CONFIGMAP`` (``homefeed-rollout``) and the Lease
``HOMEFEED_ROLLOUT_LEASE`` (``homefeed-rollout-controller``), this replica named by
``POD_NAME`` (else the host name).

A rollout's defaults (``homefeed rollout start`` may override each):
``HOMEFEED_ROLLOUT_STEPS`` (``5,25,50,100``), ``HOMEFEED_ROLLOUT_INTERVAL_S`` (60),
``HOMEFEED_ROLLOUT_THRESHOLD`` (3), ``HOMEFEED_ROLLOUT_MIRROR_SHARE`` (0.05),
``HOMEFEED_ROLLOUT_MIN_FEEDS`` (20); ``HOMEFEED_ROLLOUT_START_TIMEOUT_S`` (300): how long
the canary may take to answer SERVING.

The analysis limits (``analysis.AnalysisConfig``): ``HOMEFEED_ROLLOUT_<FIELD>`` for each of
its fields, e.g. ``HOMEFEED_ROLLOUT_MAX_PSI`` (0.2), ``..._MIN_RANK_CORRELATION`` (0.5).

The registry (promotion moves its ``champion`` alias): ``MLFLOW_TRACKING_URI``, else
``<HOMEFEED_HOME>/mlruns/mlflow.db``.

plus ``HOMEFEED_ROLLOUT_{HOST,PORT,...}`` (``ServerSettings``; the port serves the gateways'
``Report``) and ``HOMEFEED_ROLLOUT_ADMIN_PORT`` (0: a free one, announced as
``HOMEFEED_ADMIN port=<n>``): the operators' RPCs.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from contract.paths import Paths
from contract.registry import default_tracking_uri
from services.common.settings import (
    ServerSettings,
    SettingsError,
    env_float,
    env_int,
    env_str,
)
from services.common.settings import require as require_env
from services.rollout.analysis import AnalysisConfig
from services.rollout.state import RolloutSpec

SERVICE = "rollout"
PREFIX = "HOMEFEED_ROLLOUT_"


@dataclass(frozen=True)
class KubernetesState:
    namespace: str
    configmap: str = "homefeed-rollout"
    lease: str = "homefeed-rollout-controller"
    identity: str = field(default_factory=socket.gethostname)


@dataclass(frozen=True)
class RolloutSettings:
    server: ServerSettings
    canary_address: str
    stable_admin_address: str
    state_file: Path
    tracking_uri: str
    defaults: RolloutSpec = field(default_factory=lambda: RolloutSpec(version="0"))
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    start_timeout_s: float = 300.0
    admin_token: str | None = field(default=None, repr=False)
    admin_port: int = 0
    kubernetes: KubernetesState | None = None

    @property
    def admin_server(self) -> ServerSettings:
        return replace(self.server, port=self.admin_port, max_workers=2)

    @classmethod
    def from_env(cls) -> RolloutSettings:
        home = Paths.from_env().home
        d = RolloutSpec(version="0")
        steps_text = env_str(PREFIX + "STEPS", ",".join(str(s) for s in d.steps))
        try:
            steps = tuple(int(s) for s in steps_text.split(","))
            defaults = RolloutSpec(
                version="0",
                steps=steps,
                interval_s=env_float(PREFIX + "INTERVAL_S", d.interval_s),
                threshold=env_int(PREFIX + "THRESHOLD", d.threshold),
                mirror_share=env_float(PREFIX + "MIRROR_SHARE", d.mirror_share),
                min_feeds=env_int(PREFIX + "MIN_FEEDS", d.min_feeds),
            )
        except ValueError as err:
            raise SettingsError(f"{PREFIX}<STEPS|INTERVAL_S|...>: {err}") from None
        limits = {}
        for f in fields(AnalysisConfig):
            name = PREFIX + f.name.upper()
            default = getattr(AnalysisConfig(), f.name)
            limits[f.name] = (
                env_int(name, default) if isinstance(default, int) else env_float(name, default)
            )
        namespace = env_str(PREFIX + "NAMESPACE")
        kube = None
        if namespace:
            kube = KubernetesState(
                namespace=namespace,
                configmap=env_str(PREFIX + "CONFIGMAP", "homefeed-rollout"),
                lease=env_str(PREFIX + "LEASE", "homefeed-rollout-controller"),
                identity=env_str("POD_NAME", socket.gethostname()),
            )
        admin_port = env_int(PREFIX + "ADMIN_PORT", 0)
        if not 0 <= admin_port <= 65535:
            raise SettingsError(f"{PREFIX}ADMIN_PORT must be 0..65535, got {admin_port}")
        state_file = env_str(PREFIX + "STATE_FILE")
        return cls(
            server=ServerSettings.from_env(SERVICE),
            canary_address=require_env(
                PREFIX + "CANARY_ADDR", "host:port of the canary ranking deployment"
            ),
            stable_admin_address=require_env(
                PREFIX + "STABLE_ADMIN_ADDR", "host:port of stable ranking's admin port"
            ),
            state_file=Path(state_file) if state_file else home / "run" / "rollout" / "state.json",
            tracking_uri=default_tracking_uri(Paths(home)),
            defaults=defaults,
            analysis=AnalysisConfig(**limits),
            start_timeout_s=env_float(PREFIX + "START_TIMEOUT_S", 300.0),
            admin_token=env_str("HOMEFEED_ADMIN_TOKEN"),
            admin_port=admin_port,
            kubernetes=kube,
        )
