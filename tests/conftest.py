"""Shared fixtures: a tiny simulated marketplace, a homefeed home in a temp folder, and a
real redis-server on a free loopback port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.paths import Paths


@pytest.fixture(scope="session")
def tiny_sim():
    from training.simulate import load_config, simulate

    return simulate(load_config("tiny"))


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Paths]:
    """A HOMEFEED_HOME for the session; stages write data/ and reports/ under it."""
    root = tmp_path_factory.mktemp("homefeed_home")
    old = os.environ.get("HOMEFEED_HOME")
    os.environ["HOMEFEED_HOME"] = str(root)
    yield Paths(root)
    if old is None:
        os.environ.pop("HOMEFEED_HOME", None)
    else:
        os.environ["HOMEFEED_HOME"] = old


@pytest.fixture(scope="session")
def tiny_dataset(home: Paths) -> dict:
    """sim-tiny simulated, validated, featurized (Feast, SQLite), and split into training sets."""
    from training.stages import dataset_stage, features_stage, simulate_stage

    sim = simulate_stage(home, "tiny")
    features = features_stage(home, sim["dataset"])
    manifest = dataset_stage(home, sim["dataset"])
    return {"dataset": sim["dataset"], "sim": sim, "features": features, "manifest": manifest}


@pytest.fixture(scope="session")
def tiny_trained(tiny_dataset: dict, home: Paths) -> dict:
    """Every `homefeed train` stage on sim-tiny with a small budget: a registered bundle
    (``@challenger``; the first registration is also ``@champion``) and the stage reports."""
    from training.train import STAGES, TrainConfig, train

    cfg = TrainConfig(ranker_trials=2, eval_requests=120, ope_requests=120)
    return train(home, tiny_dataset["dataset"], STAGES, cfg)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_trained: dict, home: Paths) -> Path:
    """The directory of the bundle ``tiny_trained`` registered."""
    return home.artifacts / "bundles" / tiny_trained["register"]["bundle_version"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[str]:
    """A real redis-server on 127.0.0.1:<free port>; yields Feast's connection string."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed; `make setup` installs it (Debian redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def tables():
    from tests.handmade import handmade_tables

    return handmade_tables()


# DuckDB's Python bindings (Feast's offline store) report "nanobind: leaked ..." when the
# interpreter tears down, dozens of lines printed after pytest's summary. Once the summary is
# out, leave without that teardown, with pytest's own exit status.
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS.append(int(exitstatus))


def pytest_unconfigure(config: pytest.Config) -> None:
    import sys

    if _EXIT_STATUS and "duckdb" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
