"""The local mesh supervisor (services/mesh.py) and `homefeed up / down / feed / serve`.

Most tests run stand-in services: real gRPC servers built with ``services.common.server``
(health service included) that need no model, so a mesh starts in about a second. The
full-mesh test at the end runs the four real services on the ``tiny_trained`` registry.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from homefeed.common.v1 import common_pb2
from homefeed.feed.v1 import feed_pb2, feed_pb2_grpc

from contract.paths import REPO_ROOT
from tools.cli import build_parser, main, print_feed
from tools.mesh import (
    BACKENDS,
    GATEWAY,
    SERVICES,
    Mesh,
    MeshConfig,
    MeshError,
    RestartPolicy,
    check_serving,
    pid_alive,
    state_path,
)

# A stand-in service: a real server with health and reflection, nothing registered. It logs
# its pid (and, as the gateway, the backend addresses it was given) before serving.
FAKE_SERVICE = """
import os, sys
name = sys.argv[1]
print(f"FAKE name={name} pid={os.getpid()}", file=sys.stderr, flush=True)
from services.common.server import build_server, serve
from services.common.settings import ServerSettings
for var in ("RETRIEVAL", "FEATURES", "RANKING"):
    print(f"FAKE HOMEFEED_{var}_ADDR={os.environ.get(f'HOMEFEED_{var}_ADDR')}", file=sys.stderr)
settings = ServerSettings.from_env(name)
server, port, health = build_server(settings, [], lambda s: None)
serve(server, health, settings)
"""

# Serves like FAKE_SERVICE but ignores SIGTERM: only SIGKILL stops it.
STUBBORN_SERVICE = """
import signal, sys, threading
from services.common.server import build_server, serve
from services.common.settings import ServerSettings
signal.signal(signal.SIGTERM, signal.SIG_IGN)
settings = ServerSettings.from_env(sys.argv[1])
server, port, health = build_server(settings, [], lambda s: None)
thread = threading.Thread(target=serve, args=(server, health, settings), daemon=True)
thread.start()
thread.join()
"""


def fake(name: str, script: str = FAKE_SERVICE) -> list[str]:
    return [sys.executable, "-c", script, name]


def config(home: Path, **overrides: Any) -> MeshConfig:
    commands = {name: fake(name) for name in SERVICES}
    commands.update(overrides.pop("commands", {}))
    overrides.setdefault("startup_timeout", 30)
    overrides.setdefault("model", "1")  # a version number: no registry to resolve it in
    overrides.setdefault("rollout", False)  # no controller unless a test asks for one
    return MeshConfig(home=home, commands=commands, **overrides)


def fake_pids(home: Path) -> dict[str, int]:
    """The pids the stand-ins logged, by service."""
    pids = {}
    for log in (home / "run" / "logs").glob("*.log"):
        match = re.search(r"FAKE name=(\w+) pid=(\d+)", log.read_text())
        if match:
            pids[match.group(1)] = int(match.group(2))
    return pids


def wait_dead(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if pid_alive(pid)]
        if not alive:
            return []
        time.sleep(0.05)
    return alive


@pytest.fixture
def mesh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty HOMEFEED_HOME; whatever a test left running there is stopped after it."""
    monkeypatch.setenv("HOMEFEED_HOME", str(tmp_path))
    yield tmp_path
    with contextlib.suppress(MeshError):
        leftover = Mesh.from_state(tmp_path)
        if leftover is not None:
            leftover.stop(timeout=2)
    for pid in fake_pids(tmp_path).values():
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


# --- supervisor ---------------------------------------------------------------------------


def test_start_records_state_and_down_stops_it(mesh_home: Path, capsys: pytest.CaptureFixture):
    mesh = Mesh.start(config(mesh_home, admin_token=None))
    assert set(mesh.addresses) == set(SERVICES)
    for address in mesh.addresses.values():
        assert re.fullmatch(r"127\.0\.0\.1:\d+", address)
        check_serving(address, timeout=5)
    assert fake_pids(mesh_home) == mesh.pids

    state = json.loads(state_path(mesh_home).read_text())
    assert state["status"] == "running"
    assert state["started_at"] == mesh.started_at
    for name in SERVICES:
        recorded = state["services"][name]
        assert recorded["pid"] == mesh.pids[name]
        assert recorded["address"] == mesh.addresses[name]
        assert recorded["address"].endswith(f":{recorded['port']}")
        assert recorded["log"] == str(mesh_home / "run" / "logs" / f"{name}.log")
    pid_lines = (mesh_home / "run" / "mesh.pid").read_text().split()
    assert int(pid_lines[0]) == mesh.pids[GATEWAY]
    assert sorted(map(int, pid_lines)) == sorted(mesh.pids.values())

    token_file = mesh_home / "run" / "admin_token"
    assert state["admin_token_file"] == str(token_file)
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert len(mesh.admin_token) >= 32

    # the gateway was given the backends' addresses
    gateway_log = (mesh_home / "run" / "logs" / "gateway.log").read_text()
    for backend in BACKENDS:
        expected = f"HOMEFEED_{backend.upper()}_ADDR={mesh.addresses[backend]}"
        assert expected in gateway_log

    found = Mesh.from_state(mesh_home)
    assert found is not None
    assert found.addresses == mesh.addresses
    assert found.pids == mesh.pids
    assert found.admin_token == mesh.admin_token
    assert all(found.alive().values())

    with pytest.raises(MeshError, match=r"already running.*homefeed down"):
        Mesh.start(config(mesh_home))

    assert main(["down", "--timeout", "5"]) == 0
    assert "stopped gateway" in capsys.readouterr().out
    assert wait_dead(list(mesh.pids.values()), timeout=1) == []
    for name in ("mesh.json", "mesh.pid", "admin_token"):
        assert not (mesh_home / "run" / name).exists()
    assert main(["down"]) == 0
    assert "no mesh is running" in capsys.readouterr().out


def test_context_manager_stops_and_keeps_a_given_token(mesh_home: Path):
    with Mesh.start(config(mesh_home, admin_token="s3cret")) as mesh:
        assert mesh.admin_token == "s3cret"
        pids = list(mesh.pids.values())
        assert all(pid_alive(pid) for pid in pids)
    assert wait_dead(pids, timeout=1) == []
    assert not state_path(mesh_home).exists()
    mesh.stop()  # twice is fine


def test_stale_state_is_removed(mesh_home: Path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(dead.stdout)
    run = mesh_home / "run"
    run.mkdir()
    services = {
        # an exited process, and a live pid that runs another command (a reused pid)
        "ranking": {"pid": dead_pid, "command": ["python", "-m", "services.ranking"]},
        "gateway": {"pid": os.getpid(), "command": ["python", "-m", "services.gateway"]},
    }
    for name, entry in services.items():
        entry.update(port=1, address="127.0.0.1:1", log=str(run / f"{name}.log"))
    state = {
        "version": 1,
        "status": "running",
        "started_at": "2020-01-01T00:00:00+00:00",
        "admin_token_file": str(run / "admin_token"),
        "services": services,
    }
    state_path(mesh_home).write_text(json.dumps(state))
    (run / "mesh.pid").write_text(f"{dead_pid}\n")
    (run / "admin_token").write_text("old\n")

    assert Mesh.from_state(mesh_home) is None
    assert not any((run / n).exists() for n in ("mesh.json", "mesh.pid", "admin_token"))

    state_path(mesh_home).write_text(json.dumps(state))
    with Mesh.start(config(mesh_home)) as mesh:
        assert mesh.admin_token != "old"


def test_unreadable_state_is_an_error(mesh_home: Path):
    state_path(mesh_home).parent.mkdir()
    state_path(mesh_home).write_text("{not json")
    with pytest.raises(MeshError, match=r"mesh\.json is unreadable"):
        Mesh.from_state(mesh_home)


@pytest.mark.parametrize("dying", ["ranking", GATEWAY])
def test_a_service_dying_at_start_stops_the_others_and_quotes_its_log(mesh_home: Path, dying: str):
    # it dies once the other services it starts beside have logged their pids (polled with
    # a deadline), so the test sees them stopped rather than never started
    others = [n for n in BACKENDS if n != dying] if dying != GATEWAY else list(BACKENDS)
    crash = [
        sys.executable,
        "-c",
        "import pathlib, sys, time\n"
        f"logs = [pathlib.Path({str(mesh_home)!r}) / 'run' / 'logs' / f'{{n}}.log' "
        f"for n in {others!r}]\n"
        "deadline = time.monotonic() + 20\n"
        "while time.monotonic() < deadline and not all(\n"
        "    p.exists() and 'FAKE name=' in p.read_text() for p in logs):\n"
        "    time.sleep(0.01)\n"
        "for i in range(30): print(f'noise {i}', file=sys.stderr)\n"
        "print('cannot load registry model champion: no such alias', file=sys.stderr)\n"
        "sys.exit(3)",
    ]
    with pytest.raises(MeshError) as caught:
        Mesh.start(config(mesh_home, commands={dying: crash}))
    message = str(caught.value)
    assert message.startswith(f"{dying} exited with status 3 before it was ready")
    assert str(mesh_home / "run" / "logs" / f"{dying}.log") in message
    assert "cannot load registry model champion: no such alias" in message
    assert "noise 29" in message and "noise 10" not in message  # the tail, not the whole log
    started = fake_pids(mesh_home)
    assert set(started) == set(BACKENDS) - {dying}
    assert wait_dead(list(started.values()), timeout=1) == []
    assert not state_path(mesh_home).exists()
    assert not (mesh_home / "run" / "admin_token").exists()


def test_a_service_never_ready_times_out(mesh_home: Path):
    silent = [
        sys.executable,
        "-c",
        "import sys, time; print('loading', file=sys.stderr); sys.stderr.flush(); time.sleep(60)",
    ]
    cfg = config(mesh_home, commands={"features": silent}, startup_timeout=1.5)
    start = time.monotonic()
    with pytest.raises(MeshError, match=r"(?s)features not ready after 1.5 s.*loading"):
        Mesh.start(cfg)
    assert time.monotonic() - start < 10
    assert wait_dead(list(fake_pids(mesh_home).values()), timeout=1) == []
    assert not state_path(mesh_home).exists()


def test_a_service_exiting_after_ready_fails_the_health_check(mesh_home: Path):
    liar = [
        sys.executable,
        "-c",
        "import time; print('not HOMEFEED_READY port=2'); print('HOMEFEED_READY port=1'); "
        "time.sleep(0.5); print('bye')",
    ]
    start = time.monotonic()
    with pytest.raises(MeshError) as caught:
        Mesh.start(config(mesh_home, commands={"ranking": liar}))
    message = str(caught.value)
    assert message.startswith("ranking: exited after it reported listening on 127.0.0.1:1")
    assert message.rstrip().endswith("bye")
    assert time.monotonic() - start < 8  # not the 10 s health timeout


def test_stop_kills_a_service_that_ignores_sigterm(mesh_home: Path):
    stubborn = fake(GATEWAY, STUBBORN_SERVICE)
    mesh = Mesh.start(config(mesh_home, commands={GATEWAY: stubborn}))
    gateway = mesh.pids[GATEWAY]
    start = time.monotonic()
    mesh.stop(timeout=1.0)
    assert 1.0 <= time.monotonic() - start < 8
    assert not pid_alive(gateway)
    assert wait_dead(list(mesh.pids.values()), timeout=1) == []


def test_a_supervised_mesh_restarts_a_killed_service_on_its_port(mesh_home: Path):
    with Mesh.start(config(mesh_home)) as mesh:
        mesh.supervise(RestartPolicy(second_backoff_s=0.2, poll_s=0.05))
        before = dict(mesh.services)
        os.kill(mesh.pids["retrieval"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while mesh.restarts.get("retrieval", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert mesh.restarts == {"retrieval": 1}
        after = mesh.services["retrieval"]
        assert after.pid != before["retrieval"].pid and pid_alive(after.pid)
        assert after.address is not None
        assert after.address == before["retrieval"].address  # the gateway finds it again
        check_serving(after.address, timeout=5)
        assert json.loads(state_path(mesh_home).read_text())["restarts"] == {"retrieval": 1}
        assert {n: mesh.services[n].pid for n in ("features", "gateway")} == {
            n: before[n].pid for n in ("features", "gateway")
        }
    assert wait_dead(list(mesh.pids.values())) == []  # stopped, and not restarted again


def test_restart_backoff_doubles_to_its_cap():
    policy = RestartPolicy(initial_backoff_s=0.0, second_backoff_s=0.5, max_backoff_s=4.0)
    assert [policy.backoff(i) for i in range(6)] == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0]


def test_pid_alive_checks_the_command():
    me = Path(f"/proc/{os.getpid()}/cmdline")
    if not me.exists():
        pytest.skip("no /proc on this system")
    argv = [a.decode() for a in me.read_bytes().rstrip(b"\0").split(b"\0")]
    assert pid_alive(os.getpid(), argv)
    assert not pid_alive(os.getpid(), ["python", "-m", "services.ranking"])


def test_config_rejects_unknown_service_commands(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown services \\['gatway'\\]"):
        MeshConfig(home=tmp_path, commands={"gatway": ["true"]})


# --- CLI ----------------------------------------------------------------------------------


def test_help_imports_no_grpc():
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, tools.cli; tools.cli.build_parser(); "
            "print(sorted({'grpc', 'feast', 'mlflow', 'services'} & set(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() == "[]"


def test_feed_arguments_parse():
    args = build_parser().parse_args(
        [
            "feed",
            "--user",
            "7",
            "--surface",
            "checkout",
            "--cart",
            "1, 2,3",
            "--page-size",
            "5",
            "--country",
            "US",
            "--device",
            "ios",
            "--json",
            "--addr",
            "h:1",
        ]
    )
    assert (args.user, args.surface, args.cart, args.page_size) == (7, "checkout", [1, 2, 3], 5)
    assert (args.country, args.device, args.json, args.addr) == ("US", "ios", True, "h:1")
    defaults = build_parser().parse_args(["feed", "--user", "-3"])
    assert (defaults.surface, defaults.cart, defaults.page_size, defaults.json) == (
        "home",
        [],
        20,
        False,
    )
    up = build_parser().parse_args(["up", "--dataset", "sim-tiny", "--model", "3"])
    assert (up.dataset, up.model, up.timeout) == ("sim-tiny", "3", 120.0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--cart", "1,x"],
            "argument --cart: expects comma-separated 64-bit integer item ids "
            "such as 1,2,3, got '1,x'",
        ),
        (["--cart", "1,,2"], "argument --cart: expects comma-separated"),
        (["--cart", str(2**63)], "argument --cart: expects comma-separated"),
        (["--page-size", "0"], "argument --page-size: expects a positive integer, got '0'"),
        (["--surface", "cart"], "argument --surface: invalid choice: 'cart'"),
    ],
)
def test_bad_feed_arguments_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as caught:
        main(["feed", "--user", "1", *argv])
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_serve_becomes_the_service(monkeypatch: pytest.MonkeyPatch):
    calls = []

    def fake_execv(path: str, argv: list[str]) -> None:
        calls.append((path, argv))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", fake_execv)
    with pytest.raises(SystemExit):
        main(["serve", "ranking"])
    assert calls == [(sys.executable, [sys.executable, "-m", "services.ranking"])]
    with pytest.raises(SystemExit) as caught:
        main(["serve", "ranker"])
    assert caught.value.code == 2


def test_feed_without_a_mesh_says_so(mesh_home: Path, capsys: pytest.CaptureFixture):
    assert main(["feed", "--user", "1"]) == 2
    err = capsys.readouterr().err
    assert f"no mesh is running under {mesh_home}" in err and "--addr" in err


class _FakeFeed(feed_pb2_grpc.FeedServiceServicer):
    def __init__(self) -> None:
        self.requests: list[feed_pb2.GetFeedRequest] = []

    def GetFeed(  # noqa: N802 (the proto method name)
        self, request: feed_pb2.GetFeedRequest, context: grpc.ServicerContext
    ) -> feed_pb2.GetFeedResponse:
        self.requests.append(request)
        if request.page_size > 100:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"page_size must be 1..100, got {request.page_size}",
            )
        return feed_pb2.GetFeedResponse(
            request_id="req-1",
            item_ids=[501, 77],
            positions=[1, 2],
            scores=[3.25, 1.5],
            egmv=[3.25, 1.5],
            reasons=[feed_pb2.REASON_RANKED, feed_pb2.REASON_EXPLORATION],
            propensities=[1.0, 0.05],
            model_version="7",
            arm="canary",
            degraded=[feed_pb2.DEGRADATION_FEATURES],
            candidates=480,
        )


@pytest.fixture
def fake_gateway() -> Iterator[tuple[str, _FakeFeed]]:
    servicer = _FakeFeed()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    feed_pb2_grpc.add_FeedServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)


def test_feed_prints_the_page(fake_gateway, capsys: pytest.CaptureFixture):
    address, servicer = fake_gateway
    argv = [
        "feed",
        "--addr",
        address,
        "--user",
        "42",
        "--surface",
        "checkout",
        "--cart",
        "9,8",
        "--page-size",
        "2",
        "--country",
        "DE",
        "--device",
        "web",
        "--dataset",
        "no-such-dataset",  # the page alone: the item facts are tested below
    ]
    assert main(argv) == 0
    sent = servicer.requests[-1]
    assert (sent.user_id, sent.surface, list(sent.cart_item_ids), sent.page_size) == (
        42,
        common_pb2.SURFACE_CHECKOUT,
        [9, 8],
        2,
    )
    assert (sent.context.country, sent.context.device) == ("DE", "web")

    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(
        r"request req-1  model 7  arm canary  degraded features  candidates 480  "
        r"round trip \d+\.\d ms",
        lines[0],
    )
    assert lines[1].split() == ["pos", "item", "score", "E[GMV]", "reason", "propensity"]
    assert lines[2].split() == ["1", "501", "3.2500", "3.2500", "ranked", "1.000"]
    assert lines[3].split() == ["2", "77", "1.5000", "1.5000", "exploration", "0.050"]
    assert lines[4] == "(no tables of dataset 'no-such-dataset' here: item facts not shown)"

    assert main(["feed", "--addr", address, "--user", "42", "--json"]) == 0
    page = json.loads(capsys.readouterr().out)
    assert page["item_ids"] == ["501", "77"]  # int64 as strings, per the proto JSON mapping
    assert page["degraded"] == ["DEGRADATION_FEATURES"]
    assert page["round_trip_ms"] > 0


def test_feed_error_prints_the_status_and_exits_2(fake_gateway, capsys: pytest.CaptureFixture):
    address, _ = fake_gateway
    assert main(["feed", "--addr", address, "--user", "1", "--page-size", "500"]) == 2
    assert "INVALID_ARGUMENT: page_size must be 1..100, got 500" in capsys.readouterr().err


def test_print_feed_of_an_empty_page(capsys: pytest.CaptureFixture):
    print_feed(feed_pb2.GetFeedResponse(request_id="r", degraded=[1, 3]))
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        "request r  model -  arm -  degraded retrieval,ranking  candidates 0"
    )
    assert "(empty page)" in out


def test_a_page_shows_why_it_is_the_buyers(tiny_dataset: dict, home, capsys) -> None:
    """Each item's category (with the buyer's share of it), price, seller and new-seller
    flag, and the buyer's top categories, from the dataset's own tables."""
    import pandas as pd

    from tools.pages import page_facts

    dataset = tiny_dataset["dataset"]
    affinity = pd.read_parquet(home.features(dataset) / "user_category_affinity.parquet")
    user = int(affinity.loc[affinity["affinity_total"] > 0, "user_id"].iloc[-1])
    items = pd.read_parquet(home.raw(dataset) / "items.parquet").head(3)
    ids = [*items["item_id"].tolist(), 10**12]  # and an item the dataset does not hold
    facts = page_facts(home.raw(dataset), home.features(dataset), user, ids)
    assert facts is not None and facts.top_categories
    assert 0 < sum(share for _, share in facts.top_categories) <= 1.0 + 1e-9
    first = items.iloc[0]
    assert facts.items[int(first["item_id"])][:3] == (
        int(first["category"]),
        float(first["price"]),
        int(first["seller_id"]),
    )
    page = feed_pb2.GetFeedResponse(request_id="r", item_ids=ids, positions=[1, 2, 3, 4])
    print_feed(page, facts=facts)
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("the buyer's top categories: ")
    assert "buyer's share" in out[2] and "new seller" in out[2]
    assert out[3].split()[6] == str(int(first["category"]))
    assert page_facts(home.raw("nope"), home.features("nope"), user, ids) is None


# --- the real mesh ------------------------------------------------------------------------


def _missing_services() -> list[str]:
    return [n for n in SERVICES if not (REPO_ROOT / "services" / n / "__main__.py").exists()]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(
    bool(_missing_services()), reason=f"services not written yet: {_missing_services()}"
)
def test_up_feed_down_on_the_tiny_model(tiny_trained: dict, tiny_dataset: dict, home):
    env = {**os.environ, "HOMEFEED_HOME": str(home.home)}
    env.pop("HOMEFEED_ADMIN_TOKEN", None)

    def homefeed(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tools.cli", *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    mesh: Mesh | None = None
    up = homefeed("up", "--dataset", tiny_dataset["dataset"], timeout=400)
    try:
        assert up.returncode == 0, up.stderr
        for name in SERVICES:
            assert re.search(
                rf"^{name}\s+127\.0\.0\.1:\d+\s+\d+\s+\S+{name}\.log$", up.stdout, re.M
            ), up.stdout
        mesh = Mesh.from_state(home.home)
        assert mesh is not None and all(mesh.alive().values())

        feed = homefeed("feed", "--user", "1", "--page-size", "20", "--json")
        assert feed.returncode == 0, feed.stderr
        page = json.loads(feed.stdout)
        assert len(page["item_ids"]) == 20
        assert page["positions"] == list(range(1, 21))
        assert page["model_version"]
        assert page["degraded"] == []

        table = homefeed(
            "feed", "--user", "1", "--surface", "checkout", "--cart", ",".join(page["item_ids"][:2])
        )
        assert table.returncode == 0, table.stderr
        assert "degraded none" in table.stdout.splitlines()[0]
        served = [line.split()[1] for line in table.stdout.splitlines()[2:]]
        assert served and not set(served) & set(page["item_ids"][:2])

        bad = homefeed("feed", "--user", "1", "--page-size", "500")
        assert bad.returncode == 2
        assert "INVALID_ARGUMENT" in bad.stderr and "page_size" in bad.stderr

        # the detached supervisor restarts a killed backend on its port; feeds are full again
        os.kill(mesh.pids["ranking"], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            again = Mesh.from_state(home.home)
            if again is not None and again.restarts.get("ranking") == 1:
                break
            time.sleep(0.2)
        assert again is not None and again.restarts == {"ranking": 1}
        assert again.services["ranking"].address == mesh.services["ranking"].address
        deadline = time.monotonic() + 10
        while True:
            feed = homefeed("feed", "--user", "1", "--json")
            page = json.loads(feed.stdout)
            if page["degraded"] == [] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert page["degraded"] == [], page
        mesh = again
    finally:
        down = homefeed("down")
    assert down.returncode == 0, down.stderr
    assert "stopped" in down.stdout
    assert mesh is not None
    assert wait_dead(list(mesh.pids.values()), timeout=5) == []
    assert Mesh.from_state(home.home) is None
