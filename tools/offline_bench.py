"""What the offline benchmarks (``python -m tools.bench_<name>``, after ``make demo``) share:
the command line's dataset and home, and the JSON report each writes under ``reports/``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from contract.paths import Paths


def arguments(doc: str) -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first line, with ``--dataset`` and ``--home``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--dataset", default="sim-small")
    parser.add_argument(
        "--home", type=Path, default=None, help="the demo's home (default: HOMEFEED_HOME)"
    )
    return parser


def paths_of(args: argparse.Namespace) -> Paths:
    """``--home``'s paths, else the environment's (``HOMEFEED_HOME``, else the repo)."""
    return Paths.from_env() if args.home is None else Paths(args.home)


def write_report(paths: Paths, name: str, report: dict[str, Any]) -> Path:
    """``reports/<name>`` of ``paths``, written (indented JSON); its path."""
    paths.reports.mkdir(parents=True, exist_ok=True)
    out = paths.reports / name
    out.write_text(json.dumps(report, indent=2))
    return out
