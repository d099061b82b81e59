"""The local mesh supervisor: the four services as processes on one machine (`homefeed up`).

Kubernetes runs the mesh in production; here ``Mesh.start`` spawns retrieval, features and
ranking in parallel (``python -m services.<name>``, every port 0), learns each one's port
from the ``HOMEFEED_READY port=<port>`` line it prints once listening, checks it with the
gRPC health service, then starts the gateway with their addresses. A service that exits or
is not ready in time stops the others, and the error quotes the end of its log.

Each service's stdout and stderr go to ``<home>/run/logs/<name>.log``; the READY line is
read back from that file rather than from a pipe, so a mesh started by ``homefeed up``
keeps running (and may keep printing) after the command has exited.

What is running is recorded in ``<home>/run/``:

- ``mesh.json``: pids, ports, addresses, commands, log paths, ``started_at``, and the path
  of the admin token (written while starting too, so a supervisor killed half-way leaves
  pids that ``homefeed down`` can still stop);
- ``mesh.pid``: the service pids, one a line, gateway first;
- ``admin_token`` (mode 0600): the bearer token the admin RPCs require.

A recorded process counts as running only while its pid is alive, is not a zombie, and
(where ``/proc`` exists) still runs the recorded command, so a reused pid is not mistaken
for a service. State whose processes are all gone is stale and is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.server import READY_LINE

log = logging.getLogger(__name__)

BACKENDS = ("retrieval", "features", "ranking")
GATEWAY = "gateway"
SERVICES = (*BACKENDS, GATEWAY)  # the serving path
CONTROLLER = "rollout"  # the rollout controller (MeshConfig.rollout)
CANARY = "canary"  # a second ranking process, only while a rollout wants one
CANARY_GRACE_S = 3.0  # a finished rollout's canary keeps serving this long (gateways move off)

STATE_VERSION = 1
LOG_TAIL_LINES = 20

# the directory that holds the ``services`` package, put on the children's PYTHONPATH
_SOURCE_ROOT = Path(__file__).resolve().parent.parent
_READY = re.compile(
    "^" + re.escape(READY_LINE).replace(re.escape("{port}"), r"(?P<port>\d+)") + r"\s*$"
)
# a service with admin RPCs on a port of their own (ranking) prints this before READY
_ADMIN = re.compile(r"^HOMEFEED_ADMIN port=(?P<port>\d+)\s*$")
_METRICS = re.compile(r"^HOMEFEED_METRICS port=(?P<port>\d+)\s*$")
_POLL_S = 0.05
_KILL_WAIT_S = 5.0
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})


class MeshError(RuntimeError):
    """The mesh cannot start or its recorded state cannot be used; the message says why."""


def run_dir(home: Path) -> Path:
    return Path(home) / "run"


def state_path(home: Path) -> Path:
    return run_dir(home) / "mesh.json"


@dataclass(frozen=True)
class MeshConfig:
    """What ``Mesh.start`` runs.

    ``commands`` replaces the command of a service (tests start stand-ins with it); the
    default is ``[python, "-m", "services.<name>"]``. ``extra_env`` is applied last, so it
    can also pin a port (``HOMEFEED_GATEWAY_PORT``) or set any service setting.
    """

    home: Path
    dataset: str = "sim-small"
    model: str = "champion"  # registry alias or version, resolved once for every service
    admin_token: str | None = field(default=None, repr=False)  # None: a fresh random one
    startup_timeout: float = 120.0  # s per phase (backends, gateway): feast costs ~10 s
    health_timeout: float = 10.0  # s for a ready service to answer SERVING
    # s each service keeps answering after SIGTERM while reporting NOT_SERVING; locally the
    # gateway is stopped before the backends and no balancer has to notice, so it is short
    lame_duck_seconds: float = 0.5
    python: str = sys.executable
    host: str = "127.0.0.1"
    extra_env: Mapping[str, str] = field(default_factory=dict)
    commands: Mapping[str, Sequence[str]] = field(default_factory=dict)
    # the rollout controller runs beside the services (the gateways report to it); a
    # supervised mesh starts the canary ranking process a rollout asks for, with canary_env
    rollout: bool = True
    canary_env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.commands) - {*SERVICES, CONTROLLER, CANARY})
        if unknown:
            raise ValueError(
                f"commands has unknown services {unknown}; known: {', '.join(SERVICES)}"
            )
        if self.startup_timeout <= 0 or self.health_timeout <= 0:
            raise ValueError(
                "startup_timeout and health_timeout must be > 0 s, got "
                f"{self.startup_timeout} and {self.health_timeout}"
            )

    def command(self, name: str) -> list[str]:
        if name in self.commands:
            return [str(part) for part in self.commands[name]]
        if name == CANARY:  # a ranking deployment of another version
            return self.command("ranking")
        return [self.python, "-m", f"services.{name}"]

    def rollout_state_file(self, home: Path) -> Path:
        """Where the controller keeps the rollout state (``HOMEFEED_ROLLOUT_STATE_FILE``)."""
        given = self.extra_env.get("HOMEFEED_ROLLOUT_STATE_FILE")
        return Path(given) if given else run_dir(home) / "rollout" / "state.json"

    def resolve_model(self) -> str:
        """The registry version ``model`` names, resolved once for the whole mesh so that
        every service serves the same one (a number or a directory passes as it is)."""
        if self.model.isdigit() or "/" in self.model:
            return self.model
        from mlflow.exceptions import MlflowException

        from contract.paths import Paths
        from contract.registry import Registry, default_tracking_uri

        uri = default_tracking_uri(Paths(Path(self.home).resolve()))
        try:
            return str(Registry(uri).get_version(self.model))
        except MlflowException as err:
            raise MeshError(
                f"cannot resolve model {self.model!r} in the registry at {uri}: {err.message}"
            ) from None

    def env(
        self,
        name: str,
        admin_token: str,
        addresses: Mapping[str, str],
        model: str,
        admin_addresses: Mapping[str, str] | None = None,
        canary_address: str | None = None,
    ) -> dict[str, str]:
        """The environment of service ``name``: ours on top of the caller's, ``extra_env``
        on top of that. Every service gets the one resolved ``model`` (the canary its
        release's); the gateway also gets the backends' ``HOMEFEED_<SVC>_ADDR`` and the
        controller's; only the services with admin RPCs (ranking, its canary, the
        controller) get the admin token."""
        env = dict(os.environ)
        python_path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = (
            f"{_SOURCE_ROOT}{os.pathsep}{python_path}" if python_path else str(_SOURCE_ROOT)
        )
        env["PYTHONUNBUFFERED"] = "1"
        env["HOMEFEED_HOME"] = str(Path(self.home).resolve())
        env["HOMEFEED_DATASET"] = self.dataset
        for service in SERVICES:  # the caller's per-service choices would split the mesh
            env.pop(f"HOMEFEED_{service.upper()}_MODEL", None)
            env.pop(f"HOMEFEED_{service.upper()}_BUNDLE_DIR", None)
        env.pop("HOMEFEED_BUNDLE_DIR", None)
        env.pop("HOMEFEED_ADMIN_TOKEN", None)
        if "/" in model:
            env["HOMEFEED_BUNDLE_DIR"] = model
        else:
            env["HOMEFEED_MODEL"] = model
        env.pop("HOMEFEED_ROLLOUT_ADDR", None)
        if name in ("ranking", CANARY, CONTROLLER):
            env["HOMEFEED_ADMIN_TOKEN"] = admin_token
        prefix = f"HOMEFEED_{'ranking' if name == CANARY else name}_".upper()
        env[prefix + "HOST"] = self.host
        env[prefix + "PORT"] = "0"
        env.setdefault(prefix + "LAME_DUCK_SECONDS", str(self.lame_duck_seconds))
        env.setdefault(prefix + "METRICS_PORT", "0")  # /metrics on a free port, recorded
        if name == GATEWAY:
            for backend in BACKENDS:
                env[f"HOMEFEED_{backend.upper()}_ADDR"] = addresses[backend]
            if CONTROLLER in addresses:
                env["HOMEFEED_ROLLOUT_ADDR"] = addresses[CONTROLLER]
        if name == CONTROLLER:
            env["HOMEFEED_ROLLOUT_CANARY_ADDR"] = canary_address or ""
            env["HOMEFEED_ROLLOUT_STABLE_ADMIN_ADDR"] = (admin_addresses or {}).get(
                "ranking", addresses.get("ranking", "")
            )
        env.update(self.extra_env)
        if name == CANARY:
            env["HOMEFEED_RANKING_ADMIN_PORT"] = "0"
            env.update(self.canary_env)
        return env


@dataclass(frozen=True)
class ServiceProcess:
    """One running service as recorded in ``mesh.json``; port/address are None while it
    is starting."""

    name: str
    pid: int
    command: tuple[str, ...]
    log: Path
    port: int | None = None
    address: str | None = None
    admin_address: str | None = None  # where its admin RPCs listen, when apart
    metrics_address: str | None = None  # its Prometheus /metrics endpoint

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "port": self.port,
            "address": self.address,
            "admin_address": self.admin_address,
            "metrics_address": self.metrics_address,
            "command": list(self.command),
            "log": str(self.log),
        }

    @classmethod
    def from_json(cls, name: str, data: Mapping[str, Any]) -> ServiceProcess:
        port = data.get("port")
        return cls(
            name=name,
            pid=int(data["pid"]),
            command=tuple(str(part) for part in data["command"]),
            log=Path(data["log"]),
            port=None if port is None else int(port),
            address=data.get("address"),
            admin_address=data.get("admin_address"),
            metrics_address=data.get("metrics_address"),
        )


class Mesh:
    """A running local mesh: started here (``Mesh.start``) or found on disk
    (``Mesh.from_state``). Use it as a context manager to stop it on the way out."""

    def __init__(
        self,
        home: Path,
        services: Mapping[str, ServiceProcess],
        started_at: str,
        admin_token_file: Path,
        procs: Mapping[str, subprocess.Popen[bytes]] | None = None,
        status: str = "running",
        model: str = "",
    ) -> None:
        self.home = Path(home).resolve()
        self.services: dict[str, ServiceProcess] = dict(services)
        self.started_at = started_at
        self.admin_token_file = admin_token_file
        self.status = status
        self.model = model  # the registry version (or bundle directory) every service serves
        self._procs: dict[str, subprocess.Popen[bytes]] = dict(procs or {})
        self.restarts: dict[str, int] = {}
        self.supervisor_pid: int | None = None  # a detached supervisor process (homefeed up)
        self.canary_port: int | None = None  # reserved at start for a rollout's canary
        self.canary_version: str = ""  # what the canary process serves, while it runs
        self._config: MeshConfig | None = None  # set when started here: restarts need them
        self._token: str | None = None
        self._supervisor: Supervisor | None = None

    def __repr__(self) -> str:
        return f"Mesh(home={str(self.home)!r}, addresses={self.addresses}, pids={self.pids})"

    @property
    def state_file(self) -> Path:
        return state_path(self.home)

    @property
    def pid_file(self) -> Path:
        return run_dir(self.home) / "mesh.pid"

    @property
    def addresses(self) -> dict[str, str]:
        """``host:port`` of every service that is listening."""
        return {n: s.address for n, s in self.services.items() if s.address is not None}

    @property
    def admin_addresses(self) -> dict[str, str]:
        """``host:port`` of the admin RPCs of every service that serves them apart."""
        return {n: s.admin_address for n, s in self.services.items() if s.admin_address is not None}

    @property
    def metrics_addresses(self) -> dict[str, str]:
        """``host:port`` of every service's Prometheus endpoint."""
        return {
            n: s.metrics_address for n, s in self.services.items() if s.metrics_address is not None
        }

    @property
    def ports(self) -> dict[str, int]:
        return {n: s.port for n, s in self.services.items() if s.port is not None}

    @property
    def pids(self) -> dict[str, int]:
        return {n: s.pid for n, s in self.services.items()}

    @property
    def logs(self) -> dict[str, Path]:
        return {n: s.log for n, s in self.services.items()}

    @property
    def admin_token(self) -> str:
        return self.admin_token_file.read_text().strip()

    # --- start ---------------------------------------------------------------------------

    @classmethod
    def start(cls, cfg: MeshConfig) -> Mesh:
        """Start the four services and return once each answers SERVING.

        Raises MeshError when a mesh is already running under ``cfg.home``, or when a
        service exits or is not ready in time (the message quotes the end of its log); the
        services started so far are stopped first.
        """
        home = Path(cfg.home).resolve()
        logs_dir = run_dir(home) / "logs"
        logs_dir.mkdir(parents=True, exist_ok=True)
        with _start_lock(home):
            running = cls.from_state(home)
            if running is not None:
                raise MeshError(
                    f"a mesh is already running under {home} ({_describe(running)}); "
                    "stop it with `homefeed down`"
                )
            model = cfg.resolve_model()
            token = cfg.admin_token or secrets.token_urlsafe(32)
            token_file = _write_token(home, token)
            mesh = cls(
                home,
                {},
                datetime.now(UTC).isoformat(timespec="seconds"),
                token_file,
                status="starting",
                model=model,
            )
            if cfg.rollout:
                mesh.canary_port = _free_port(cfg.host)
            try:
                mesh._launch(cfg, BACKENDS, token)
                if cfg.rollout:
                    mesh._launch(cfg, (CONTROLLER,), token)
                mesh._launch(cfg, (GATEWAY,), token)
            except BaseException:
                try:
                    mesh.stop(timeout=5.0)
                except MeshError as err:
                    log.error("cannot stop a failed start", extra={"reason": str(err)})
                raise
            mesh.status = "running"
            mesh._config, mesh._token = cfg, token
            mesh._write_state()
            log.debug("mesh started", extra={"addresses": mesh.addresses, "pids": mesh.pids})
            return mesh

    # --- supervision ---------------------------------------------------------------------

    def restart(self, name: str) -> None:
        """Start ``name`` again on the port it had (the gateway knows its backends by
        address), once its process has exited. Only for a mesh started by this process."""
        if self._config is None or self._token is None:
            raise MeshError("only the process that started the mesh can restart its services")
        if self._alive(name):
            raise MeshError(f"{name} is still running (pid {self.services[name].pid})")
        info = self.services[name]
        self._procs.pop(name, None)
        extra = {}
        if info.admin_address:  # its admin port too stays where callers know it
            extra[f"HOMEFEED_{name.upper()}_ADMIN_PORT"] = info.admin_address.rsplit(":", 1)[1]
        try:
            self._launch(
                self._config,
                (name,),
                self._token,
                {name: info.port} if info.port else None,
                extra,
            )
        except MeshError:
            if self._alive(name):  # started but never ready: not left half-alive
                self._signal(name, signal.SIGKILL, group=True)
                self._wait([name], _KILL_WAIT_S)
            raise
        self.restarts[name] = self.restarts.get(name, 0) + 1
        self._write_state()

    @property
    def canary_address(self) -> str | None:
        if self.canary_port is None:
            return None
        return f"{_connect_host(self._config.host if self._config else None)}:{self.canary_port}"

    def start_canary(self, version: str) -> None:
        """Start the canary ranking process serving registry ``version`` on the reserved
        canary port (a rollout's; ``Supervisor`` calls it). Only for a mesh started here."""
        if self._config is None or self._token is None or self.canary_port is None:
            raise MeshError("only the process that started the mesh (with rollout) runs a canary")
        if CANARY in self.services and self._alive(CANARY):
            raise MeshError(f"a canary is running already (version {self.canary_version})")
        self._procs.pop(CANARY, None)
        self.canary_version = version
        try:
            self._launch(
                self._config,
                (CANARY,),
                self._token,
                extra_env={"HOMEFEED_RANKING_PORT": str(self.canary_port)},
            )
        except MeshError:
            if CANARY in self.services and self._alive(CANARY):
                self._signal(CANARY, signal.SIGKILL, group=True)
                self._wait([CANARY], _KILL_WAIT_S)
            self.services.pop(CANARY, None)
            self.canary_version = ""
            self._write_state()
            raise

    def stop_canary(self, timeout: float = 10.0) -> None:
        """Drain and stop the canary process (SIGTERM: lame duck, then drain)."""
        if CANARY not in self.services:
            return
        if self._alive(CANARY):
            self._signal(CANARY, signal.SIGTERM)
            if self._wait([CANARY], timeout):
                self._signal(CANARY, signal.SIGKILL, group=True)
                self._wait([CANARY], _KILL_WAIT_S)
        self.services.pop(CANARY, None)
        self._procs.pop(CANARY, None)
        self.canary_version = ""
        self._write_state()

    def supervise(self, policy: RestartPolicy | None = None) -> Supervisor:
        """Start a thread that restarts any service that exits (``Supervisor``); ``stop``
        ends it before stopping the services."""
        if self._supervisor is None:
            self._supervisor = Supervisor(self, policy or RestartPolicy())
            self._supervisor.start()
        return self._supervisor

    def _launch(
        self,
        cfg: MeshConfig,
        names: Sequence[str],
        token: str,
        ports: Mapping[str, int] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        """Spawn ``names`` together (on ``ports`` where given, else on free ones), wait for
        their READY lines, then for SERVING."""
        watchers: dict[str, _LogWatcher] = {}
        hosts: dict[str, str] = {}
        try:
            for name in names:
                command = cfg.command(name)
                env = cfg.env(
                    name,
                    token,
                    self.addresses,
                    self.canary_version if name == CANARY else self.model,
                    self.admin_addresses,
                    self.canary_address,
                )
                if ports and name in ports:
                    env[f"HOMEFEED_{name.upper()}_PORT"] = str(ports[name])
                env.update(extra_env or {})
                log_path = run_dir(self.home) / "logs" / f"{name}.log"
                _rotate(log_path)
                with open(log_path, "ab") as out:
                    try:
                        proc = subprocess.Popen(
                            command,
                            stdin=subprocess.DEVNULL,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            env=env,
                            start_new_session=True,  # outlives `homefeed up`; Ctrl-C stays ours
                        )
                    except OSError as err:
                        raise MeshError(
                            f"cannot run {name} ({shlex.join(command)}): {err}"
                        ) from None
                self._procs[name] = proc
                self.services[name] = ServiceProcess(name, proc.pid, tuple(command), log_path)
                hosts[name] = _connect_host(env.get(f"HOMEFEED_{name.upper()}_HOST"))
                watchers[name] = _LogWatcher(log_path)
            self._write_state()
            self._await_ready(watchers, hosts, cfg.startup_timeout)
        finally:
            for watcher in watchers.values():
                watcher.close()
        self._write_state()
        for name in names:
            self._await_serving(name, cfg.health_timeout)

    def _await_ready(
        self, watchers: Mapping[str, _LogWatcher], hosts: Mapping[str, str], timeout: float
    ) -> None:
        started = time.monotonic()
        pending = dict(watchers)
        while pending:
            for name, watcher in list(pending.items()):
                port = watcher.ready_port()
                if port is not None:
                    info = self.services[name]
                    admin, metrics = watcher.admin_port, watcher.metrics_port
                    self.services[name] = ServiceProcess(
                        name,
                        info.pid,
                        info.command,
                        info.log,
                        port,
                        f"{hosts[name]}:{port}",
                        None if admin is None else f"{hosts[name]}:{admin}",
                        None if metrics is None else f"{hosts[name]}:{metrics}",
                    )
                    del pending[name]
                    continue
                code = self._procs[name].poll()
                if code is not None:
                    raise MeshError(
                        f"{name} exited with status {code} before it was ready"
                        + _tail_note(self.services[name].log)
                    )
            if pending and time.monotonic() - started > timeout:
                late = sorted(pending)
                raise MeshError(
                    f"{' and '.join(late)} not ready after {timeout:g} s (no "
                    f"{READY_LINE.format(port='<port>')!r} line)"
                    + _tail_note(self.services[late[0]].log)
                )
            if pending:
                time.sleep(_POLL_S)

    def _await_serving(self, name: str, timeout: float) -> None:
        info = self.services[name]
        assert info.address is not None
        proc = self._procs[name]
        try:
            check_serving(info.address, timeout, running=lambda: proc.poll() is None)
        except MeshError as err:
            raise MeshError(f"{name}: {err}" + _tail_note(info.log)) from None

    # --- state ---------------------------------------------------------------------------

    @classmethod
    def from_state(cls, home: Path) -> Mesh | None:
        """The mesh recorded under ``home``, or None when none is; stale state (every
        recorded process gone) is removed. MeshError when ``mesh.json`` is unreadable."""
        home = Path(home).resolve()
        path = state_path(home)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise MeshError(
                f"{path} is unreadable ({err}); remove it once no homefeed service runs"
            ) from None
        try:
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {STATE_VERSION}")
            mesh = cls(
                home,
                {n: ServiceProcess.from_json(n, s) for n, s in data["services"].items()},
                str(data["started_at"]),
                Path(data["admin_token_file"]),
                status=str(data.get("status", "running")),
                model=str(data.get("model", "")),
            )
            mesh.restarts = {str(k): int(v) for k, v in (data.get("restarts") or {}).items()}
            canary_port = data.get("canary_port")
            mesh.canary_port = None if canary_port is None else int(canary_port)
            mesh.canary_version = str(data.get("canary_version") or "")
            supervisor = data.get("supervisor_pid")
            mesh.supervisor_pid = None if supervisor is None else int(supervisor)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise MeshError(
                f"{path} is not a mesh state file ({err}); remove it once no homefeed service runs"
            ) from None
        if not any(mesh.alive().values()):
            log.info("removing stale mesh state", extra={"pids": mesh.pids})
            mesh._remove_state(force=True)
            return None
        return mesh

    def _state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "status": self.status,
            "home": str(self.home),
            "started_at": self.started_at,
            "admin_token_file": str(self.admin_token_file),
            "model": self.model,
            "restarts": self.restarts,
            "supervisor_pid": self.supervisor_pid,
            "canary_port": self.canary_port,
            "canary_version": self.canary_version,
            "services": {n: s.to_json() for n, s in self.services.items()},
        }

    def _write_state(self) -> None:
        _atomic_write(self.state_file, json.dumps(self._state(), indent=2) + "\n")
        order = sorted(self.services, key=lambda n: n != GATEWAY)
        _atomic_write(self.pid_file, "".join(f"{self.services[n].pid}\n" for n in order))

    def _remove_state(self, force: bool = False) -> None:
        """Remove the state files, unless they now record another mesh's processes."""
        if not force:
            try:
                recorded = json.loads(self.state_file.read_text())["services"]
                ours = {n: s["pid"] for n, s in recorded.items()} == self.pids
            except (OSError, ValueError, KeyError, TypeError):
                ours = True
            if not ours:
                return
        for path in (self.state_file, self.pid_file, self.admin_token_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # --- processes -----------------------------------------------------------------------

    def alive(self) -> dict[str, bool]:
        """Whether each recorded service process still runs."""
        return {name: self._alive(name) for name in self.services}

    def _alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        if proc is not None:
            return proc.poll() is None
        info = self.services[name]
        return pid_alive(info.pid, info.command)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the gateway and wait up to ``timeout`` s for it to drain, then the same
        for the other services together; SIGKILL whatever is still running after its wait.
        Removes the state files. Safe to call twice.

        A supervised mesh stops its supervisor first (so nothing is restarted on the way
        down); a mesh found on disk whose detached supervisor is alive asks that process to
        stop it, and waits."""
        if self._supervisor is not None:
            self._supervisor.close()
            self._supervisor = None
        supervisor = self.supervisor_pid
        if supervisor is not None and supervisor != os.getpid() and pid_alive(supervisor):
            with contextlib.suppress(ProcessLookupError):
                os.kill(supervisor, signal.SIGTERM)
            deadline = time.monotonic() + 2 * timeout + _KILL_WAIT_S
            while pid_alive(supervisor) and time.monotonic() < deadline:
                time.sleep(_POLL_S)
            if not pid_alive(supervisor):
                self.status = "stopped"
                return
            log.warning("the supervisor did not stop the mesh; stopping it here")
            with contextlib.suppress(ProcessLookupError):
                os.kill(supervisor, signal.SIGKILL)
        others = tuple(n for n in self.services if n != GATEWAY)
        for group in ((GATEWAY,), others):
            live = [n for n in group if n in self.services and self._alive(n)]
            for name in live:
                self._signal(name, signal.SIGTERM)
            left = self._wait(live, timeout)
            for name in left:
                log.warning("killing a service that did not drain", extra={"service": name})
                self._signal(name, signal.SIGKILL, group=True)
            if self._wait(left, _KILL_WAIT_S):
                raise MeshError(f"could not stop {', '.join(left)} (pids {self.pids})")
        self._remove_state()
        self.status = "stopped"

    def _signal(self, name: str, signum: int, group: bool = False) -> None:
        pid = self.services[name].pid
        with contextlib.suppress(ProcessLookupError):
            # each service leads its own session: the group also holds anything it spawned
            if group and os.getpgid(pid) == pid:
                os.killpg(pid, signum)
            else:
                os.kill(pid, signum)

    def _wait(self, names: Sequence[str], timeout: float) -> list[str]:
        """Wait until ``names`` have exited or ``timeout`` passed; returns those still up."""
        deadline = time.monotonic() + timeout
        left = list(names)
        while left:
            left = [n for n in left if self._alive(n)]
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(_POLL_S)
        return left

    def __enter__(self) -> Mesh:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def running_mesh(home: Path, instead: str) -> Mesh:
    """The mesh running under ``home``, for a command that talks to it; ValueError saying
    how to start one, or ``instead`` (what else the command accepts), when none runs."""
    try:
        mesh = Mesh.from_state(home)
    except MeshError as err:
        raise ValueError(str(err)) from None
    if mesh is None:
        raise ValueError(
            f"no mesh is running under {home}; start one with `homefeed up`, or {instead}"
        )
    return mesh


# --- supervision -------------------------------------------------------------------------


@dataclass(frozen=True)
class RestartPolicy:
    """When a service that exited is started again: at once the first time, then after a
    backoff that doubles per failed or repeated restart up to ``max_backoff_s``, and starts
    again from ``initial_backoff_s`` once the service has run ``stable_after_s``."""

    initial_backoff_s: float = 0.0
    second_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    stable_after_s: float = 60.0
    poll_s: float = 0.1

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before restart number ``attempt`` (0-based) in a row."""
        if attempt == 0:
            return self.initial_backoff_s
        return min(self.max_backoff_s, self.second_backoff_s * 2 ** (attempt - 1))


class Supervisor:
    """A thread that restarts the services of ``mesh`` that exit (Kubernetes does this in a
    cluster). Each restart is logged and counted in ``mesh.json``'s ``restarts``."""

    def __init__(self, mesh: Mesh, policy: RestartPolicy) -> None:
        self.mesh = mesh
        self.policy = policy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mesh-supervisor", daemon=True)
        self._attempts: dict[str, int] = {}
        self._due: dict[str, float] = {}
        self._up_since: dict[str, float] = {name: time.monotonic() for name in mesh.services}
        self._canary_idle_since: float | None = None
        self._state_seen: tuple[int, int, int] | None = None  # the rollout state file read
        self._wanted: str | None = None  # ... and the canary version it asked for

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 60.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.policy.poll_s):
            try:
                self.tick(time.monotonic())
            except Exception:  # the supervisor must outlive whatever one restart does
                log.exception("supervisor tick failed")

    def tick(self, now: float) -> None:
        self._tend_canary(now)
        for name in list(self.mesh.services):
            if self._stop.is_set():
                return
            if name == CANARY:  # tended above: it runs only while a rollout wants it
                continue
            if self.mesh._alive(name):
                if now - self._up_since.get(name, now) >= self.policy.stable_after_s:
                    self._attempts.pop(name, None)
                continue
            if name not in self._due:
                attempt = self._attempts.get(name, 0)
                self._due[name] = now + self.policy.backoff(attempt)
                log.warning(
                    "service exited; restarting",
                    extra={
                        "service": name,
                        "attempt": attempt + 1,
                        "backoff_s": self.policy.backoff(attempt),
                    },
                )
            if now < self._due[name]:
                continue
            self._attempts[name] = self._attempts.get(name, 0) + 1
            try:
                self.mesh.restart(name)
            except MeshError as err:
                log.error("restart failed", extra={"service": name, "reason": str(err)})
                self._due.pop(name, None)  # the next tick schedules it with a longer wait
                continue
            del self._due[name]
            self._up_since[name] = time.monotonic()
            log.info("service restarted", extra={"service": name, "pid": self.mesh.pids[name]})

    def _wanted_canary(self) -> str | None:
        """The version the rollout in progress wants a canary of (None: no canary)."""
        from services.rollout.state import ACTIVE
        from services.rollout.store import FileStore, StoreError

        cfg = self.mesh._config
        if cfg is None or not cfg.rollout:
            return None
        path = cfg.rollout_state_file(self.mesh.home)
        try:  # parsed again only when the controller has written it since
            stat = path.stat()
            seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except FileNotFoundError:
            seen = None
        if seen == self._state_seen:
            return self._wanted
        try:
            state = FileStore(path).load()
        except StoreError as err:
            log.warning("cannot read the rollout state", extra={"reason": str(err)})
            return self.mesh.canary_version or None  # keep whatever runs; read it again
        current = state.current if state is not None else None
        active = current is not None and current.phase in ACTIVE
        self._state_seen = seen
        self._wanted = current.spec.version if active and current is not None else None
        return self._wanted

    def _tend_canary(self, now: float) -> None:
        """Start, replace or (after ``CANARY_GRACE_S``) stop the canary as the rollout
        state asks; a canary that exits is started again with the usual backoff."""
        wanted = self._wanted_canary()
        mesh = self.mesh
        running = CANARY in mesh.services and mesh._alive(CANARY)
        if wanted is None:
            if CANARY not in mesh.services:
                self._canary_idle_since = None
                return
            if self._canary_idle_since is None:
                self._canary_idle_since = now
            if now - self._canary_idle_since >= CANARY_GRACE_S or not running:
                log.info("stopping the canary", extra={"version": mesh.canary_version})
                mesh.stop_canary()
                self._canary_idle_since = None
            return
        self._canary_idle_since = None
        if running and mesh.canary_version == wanted:
            return
        if running:  # another version: the rollout changed
            mesh.stop_canary()
        attempt = self._attempts.get(CANARY, 0)
        due = self._due.setdefault(CANARY, now + self.policy.backoff(attempt))
        if now < due:
            return
        self._attempts[CANARY] = attempt + 1
        log.info("starting the canary", extra={"version": wanted, "attempt": attempt + 1})
        try:
            mesh.start_canary(wanted)
        except MeshError as err:
            log.error("canary start failed", extra={"version": wanted, "reason": str(err)})
            del self._due[CANARY]
            return
        del self._due[CANARY]
        self._attempts.pop(CANARY, None)


# --- helpers -------------------------------------------------------------------------------


def check_serving(address: str, timeout: float, running: Callable[[], bool] | None = None) -> None:
    """Return once the grpc health service at ``address`` reports the server (``""``)
    SERVING; MeshError with the last answer after ``timeout`` s, or as soon as ``running``
    (the server process's liveness) says it has exited."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if running is not None and not running():
                raise MeshError(f"exited after it reported listening on {address}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise MeshError(f"health check of {address} failed after {timeout:g} s: {last}")
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=""),
                    timeout=min(remaining, 2.0),
                    wait_for_ready=True,
                )
            except grpc.RpcError as err:
                last = f"{err.code().name}: {err.details()}"
            else:
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            time.sleep(_POLL_S)


def pid_alive(pid: int, command: Sequence[str] | None = None) -> bool:
    """Whether ``pid`` runs and is not a zombie; with ``command``, also that it still runs
    that command line (checked where ``/proc`` exists), so a reused pid does not count."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: not one of ours
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():
        return True
    try:
        stat = (proc / "stat").read_text()
        if stat[stat.rindex(")") + 2 :].startswith(("Z", "X")):
            return False
        if command is not None:
            argv = (proc / "cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            return [a.decode(errors="replace") for a in argv] == list(command)
    except (FileNotFoundError, ProcessLookupError):
        return False
    return True


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _tail_note(path: Path) -> str:
    text = tail(path)
    if not text:
        return f"; its log {path} is empty"
    indented = "\n".join("    " + line for line in text.splitlines())
    return f"; last lines of {path}:\n{indented}"


def _describe(mesh: Mesh) -> str:
    alive = mesh.alive()
    parts = [
        f"{n} pid {s.pid}"
        + (f" at {s.address}" if s.address else "")
        + ("" if alive[n] else " (exited)")
        for n, s in mesh.services.items()
    ]
    return ", ".join(parts)


def _connect_host(host: str | None) -> str:
    """Where a client reaches a server bound to ``host`` (a wildcard means loopback)."""
    return "127.0.0.1" if host is None or host.strip() in _WILDCARD_HOSTS else host.strip()


class _LogWatcher:
    """Reads a growing log file and finds the READY line among complete lines."""

    def __init__(self, path: Path) -> None:
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 (closed by close())
        self._file.seek(0, os.SEEK_END)
        self._partial = b""
        self.admin_port: int | None = None
        self.metrics_port: int | None = None

    def ready_port(self) -> int | None:
        chunk = self._file.read()
        if not chunk:
            return None
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for line in lines:
            text = line.decode(errors="replace")
            admin = _ADMIN.match(text)
            if admin:
                self.admin_port = int(admin.group("port"))
            metrics = _METRICS.match(text)
            if metrics:
                self.metrics_port = int(metrics.group("port"))
            match = _READY.match(text)
            if match:
                return int(match.group("port"))
        return None

    def close(self) -> None:
        self._file.close()


@contextlib.contextmanager
def _start_lock(home: Path) -> Iterator[None]:
    """Serializes starts under one home: two `homefeed up` at once would both find no mesh."""
    path = run_dir(home) / "mesh.lock"
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MeshError(f"another mesh is being started under {home}") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_token(home: Path, token: str) -> Path:
    path = run_dir(home) / "admin_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path


def _free_port(host: str) -> int:
    """A port free on ``host`` now (reserved for a process started later; another process
    could take it meanwhile, which the later start then reports)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_connect_host(host), 0))
        return int(sock.getsockname()[1])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rotate(log_path: Path) -> None:
    """Keep the previous run's log as ``<name>.log.1``: it may explain why it stopped."""
    if log_path.exists() and log_path.stat().st_size > 0:
        os.replace(log_path, log_path.with_name(log_path.name + ".1"))


# --- the detached supervisor of ``homefeed up`` ---------------------------------------------


def supervise_main(argv: Sequence[str] | None = None) -> int:
    """``python -m tools.mesh supervise``: start the mesh, restart what exits, stop it all
    on SIGTERM/SIGINT. ``homefeed up`` runs it detached; ``homefeed down`` signals it."""
    import argparse

    from services.common.logs import configure_logging

    parser = argparse.ArgumentParser(prog="python -m tools.mesh supervise")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--dataset", default="sim-small")
    parser.add_argument("--model", default="champion")
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    configure_logging("supervisor")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    cfg = MeshConfig(
        home=args.home,
        dataset=args.dataset,
        model=args.model,
        admin_token=os.environ.get("HOMEFEED_ADMIN_TOKEN") or None,
        startup_timeout=args.startup_timeout,
    )
    try:
        mesh = Mesh.start(cfg)
    except MeshError as err:
        sys.stderr.write(f"{err}\n")
        return 1
    mesh.supervisor_pid = os.getpid()
    mesh._write_state()
    mesh.supervise()
    stop.wait()
    mesh.stop()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["supervise"]:
        sys.stderr.write("usage: python -m tools.mesh supervise --home DIR [options]\n")
        raise SystemExit(2)
    raise SystemExit(supervise_main(sys.argv[2:]))
