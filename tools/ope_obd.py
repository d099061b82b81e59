"""Off-policy evaluation on the Open Bandit sample: Bernoulli TS's click rate estimated from
the Random policy's logs (IPS, SNIPS, DR) against TS's own logged click rate.

``python -m tools.ope_obd [--path OBD_DIR] [--campaign all] [--out FILE]`` writes
``reports/ope_open_bandit.json`` (``training.ope_eval.open_bandit_ope``) and prints a table.
Without ``--path`` the sample is read from the cache, fetched from PyPI the first time
(``training.ingest.fetch_obd_sample``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from contract.paths import Paths
from training.ingest import OBD_CAMPAIGNS, default_obd_cache, fetch_obd_sample
from training.ope_eval import ESTIMATORS, open_bandit_ope
from training.report import json_default


def table(result: dict[str, Any]) -> str:
    """Overall and per-position rows: estimate, interval, ESS, truth, error, coverage."""
    rows = [
        f"{'where':<10} {'estimator':<6} {'estimate':>9} {'95% interval':>21} {'ESS':>7} "
        f"{'truth':>8} {'rel.err':>8} covers"
    ]
    sections = [("all", result)] + [(f"slot {p}", s) for p, s in result["by_position"].items()]
    for where, section in sections:
        for name in ESTIMATORS:
            e = section[name]
            rows.append(
                f"{where:<10} {name:<6} {e['estimate']:>9.5f} "
                f"[{e['ci_low']:>8.5f}, {e['ci_high']:>8.5f}] {e['ess']:>7.0f} "
                f"{e['oracle']:>8.5f} {e['relative_error']:>+8.1%} {'yes' if e['covers'] else 'no'}"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.ope_obd", description=__doc__)
    parser.add_argument("--path", type=Path, help="an obd/ folder (default: the cache)")
    parser.add_argument("--campaign", choices=OBD_CAMPAIGNS, default="all")
    parser.add_argument("--out", type=Path, help="default: reports/ope_open_bandit.json")
    args = parser.parse_args(argv)
    paths = Paths.from_env()
    sample = args.path if args.path is not None else fetch_obd_sample(default_obd_cache())
    result = open_bandit_ope(sample, args.campaign)
    out = args.out if args.out is not None else paths.reports / "ope_open_bandit.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=json_default) + "\n")
    sys.stdout.write(table(result) + f"\n\nwritten {out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
