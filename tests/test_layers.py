"""Serving stands on its own: a service process loads none of the training stack.

The import contracts (``lint-imports``, run by ``make lint`` and ``make test``) check the
code's static imports. These tests check what a service really loads at run time, third
party libraries included: each service is built from a fresh interpreter on a real bundle
and store, and its ``sys.modules`` is read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from contract.paths import REPO_ROOT, Paths
from services.common.serving_only import TRAINING_STACK, block_training_stack

SETTINGS = {
    "retrieval": "RetrievalSettings",
    "features": "FeaturesSettings",
    "ranking": "RankingSettings",
    "gateway": "GatewaySettings",
    "rollout": "RolloutSettings",
}
# What a serving image does not have. PyTorch is blocked before the probe imports anything:
# Feast imports it whenever it is installed (the development environment), which says
# nothing about homefeed's code; every other name must stay unimported on its own.
NEVER = {"training", "tools", "lightgbm", "optuna", "sklearn", "matplotlib", "pandera", "duckdb"}
# ...and what a service outside Kubernetes does not load (the rollout controller imports the
# kubernetes client only with HOMEFEED_ROLLOUT_NAMESPACE set)
NOT_LOCALLY = {"kubernetes"}

PROBE = textwrap.dedent(
    """
    import json, os, sys
    sys.modules["torch"] = None
    from services.{name}.server import create_server
    from services.{name}.settings import {settings}
    create_server({settings}.from_env())
    loaded = sorted(m for m, module in sys.modules.items() if module is not None)
    print("MODULES " + json.dumps(loaded), flush=True)
    os._exit(0)
    """
)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_a_service_loads_nothing_of_the_training_stack(
    name: str, tiny_trained: dict, tiny_dataset: dict, home: Paths
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOMEFEED_")}
    env |= {
        "HOMEFEED_HOME": str(home.home),
        "HOMEFEED_DATASET": tiny_dataset["dataset"],
        "HOMEFEED_RETRIEVAL_ADDR": "127.0.0.1:9",  # the gateway connects lazily
        "HOMEFEED_FEATURES_ADDR": "127.0.0.1:9",
        "HOMEFEED_RANKING_ADDR": "127.0.0.1:9",
        "HOMEFEED_ROLLOUT_CANARY_ADDR": "127.0.0.1:9",  # the controller, too
        "HOMEFEED_ROLLOUT_STABLE_ADMIN_ADDR": "127.0.0.1:9",
        "HOMEFEED_ROLLOUT_STATE_FILE": str(home.home / "run" / "layers-probe" / "state.json"),
    }
    probe = subprocess.run(
        [sys.executable, "-c", PROBE.format(name=name, settings=SETTINGS[name])],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=180,
    )
    lines = [line for line in probe.stdout.splitlines() if line.startswith("MODULES ")]
    assert probe.returncode == 0 and lines, probe.stderr[-3000:]
    loaded = set(json.loads(lines[0].removeprefix("MODULES ")))
    roots = {module.split(".")[0] for module in loaded}
    banned = roots & (NEVER | NOT_LOCALLY)
    assert banned == set(), f"{name} loaded {sorted(banned)}"
    assert f"services.{name}" in loaded and "contract" in roots
    others = {f"services.{other}" for other in SETTINGS if other != name}
    assert loaded & others == set(), f"{name} loaded another service's modules"


def test_the_guard_blocks_the_training_stack_in_a_fresh_process() -> None:
    code = (
        "from services.common.serving_only import block_training_stack\n"
        "block_training_stack()\n"
        "import importlib\n"
        "for name in ('torch', 'lightgbm', 'training.train'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        print('blocked', name)\n"
    )
    probe = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60
    )
    assert probe.stdout.split("\n")[:3] == [
        "blocked torch",
        "blocked lightgbm",
        "blocked training.train",
    ], probe.stderr
    assert set(TRAINING_STACK) >= NEVER | {"torch"}


def test_the_guard_refuses_to_come_too_late() -> None:
    assert "training" in sys.modules or __import__("training")  # this test process has it
    with pytest.raises(RuntimeError, match=r"called after \['training'"):
        block_training_stack(("training",))


def test_every_service_entry_point_installs_the_guard_first() -> None:
    for name in SETTINGS:
        source = (REPO_ROOT / "services" / name / "__main__.py").read_text()
        code = [line for line in source.splitlines() if line and not line.startswith(('"', "#"))]
        assert code[0] == "from services.common.serving_only import block_training_stack", name
        assert code[1].startswith("block_training_stack()"), name
