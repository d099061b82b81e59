"""What each service costs to run: start time and resident memory.

``python -m tools.footprint`` starts each service alone (``python -m services.<name>``, as
the mesh and a container do), on the home's registered champion, and records:

- ``start_s``: from spawn to the ``HOMEFEED_READY`` line (imports, bundle load, Feast, warm-up);
- ``rss_mb``: resident memory a second after it is ready (``VmRSS``), and ``rss_peak_mb``
  (``VmHWM``).

Services start one at a time, so one's start does not slow another's. The figures go to
``reports/footprint.json`` and a table; they describe this machine on this run (the README
quotes a before/after pair of runs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from contract.paths import Paths
from training.memory import status_kb

SERVICES = ("retrieval", "features", "ranking", "gateway")
_READY = re.compile(r"HOMEFEED_READY port=(\d+)")


def measure(service: str, home: Path, dataset: str, model: str, timeout: float) -> dict[str, Any]:
    """Start ``service`` alone, wait until it is listening, read its memory, stop it."""
    env = dict(os.environ)
    env.update(
        {
            "HOMEFEED_HOME": str(home),
            "HOMEFEED_DATASET": dataset,
            "HOMEFEED_MODEL": model,
            f"HOMEFEED_{service.upper()}_MODEL": model,
            f"HOMEFEED_{service.upper()}_PORT": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    for backend in ("RETRIEVAL", "FEATURES", "RANKING"):  # the gateway connects lazily
        env.setdefault(f"HOMEFEED_{backend}_ADDR", "127.0.0.1:9")
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", f"services.{service}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = started + timeout
        for line in proc.stdout:
            if _READY.search(line):
                break
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{service} not ready after {timeout} s")
        else:
            raise RuntimeError(f"{service} exited with status {proc.wait()} before it was ready")
        start_s = time.perf_counter() - started
        time.sleep(1.0)  # let start-up threads settle
        rss = status_kb("VmRSS", proc.pid)
        peak = status_kb("VmHWM", proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {
        "start_s": round(start_s, 2),
        "rss_mb": round(rss / 1024, 1) if rss else None,
        "rss_peak_mb": round(peak / 1024, 1) if peak else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.footprint", description=__doc__)
    parser.add_argument("--dataset", default="sim-small")
    parser.add_argument("--model", default="champion", help="registry alias or version")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--out", type=Path, help="default: <home>/reports/footprint.json")
    args = parser.parse_args(argv)
    paths = Paths.from_env()
    figures = {
        name: measure(name, paths.home, args.dataset, args.model, args.timeout) for name in SERVICES
    }
    out = args.out or paths.reports / "footprint.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dataset": args.dataset, "services": figures}, indent=2) + "\n")
    print(f"{'service':<10}{'start s':>9}{'RSS MB':>9}{'peak MB':>9}")
    for name, f in figures.items():
        print(f"{name:<10}{f['start_s']:>9.2f}{f['rss_mb']:>9.1f}{f['rss_peak_mb']:>9.1f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
