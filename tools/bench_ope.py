"""Issue 13: the ranker's off-policy estimates over several samples of the heuristic's logged
test requests, each against the Oracle, and checked where the log can check them.

``python -m tools.bench_ope [--dataset sim-small] [--samples 2000:0,2000:1,8000:0]``
(after ``make demo``; each sample is ``requests:seed``). The evaluate stage reports one
sample (``ope`` in ``reports/eval.json``); one sample says little about an estimator whose
error moves by tens of per cent between samples (docs/ope.md). For each sample this gives
IPS, DR, DRos and the direct method against the Oracle's value of the ranker's pages, and
the same on the *supported* slots only, the ranker's slots the heuristic could have filled
with the same item, where IPS and DR are unbiased whatever the direct method: there the
log validates the estimators; on the other slots DR is the direct method. Writes
``reports/ope_samples.json`` and prints a table.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from tools.offline_bench import arguments, paths_of, write_report
from training.stages import Paths

log = logging.getLogger(__name__)

ESTIMATORS = ("dr", "dr_os", "dm", "ips")
SUPPORTED = ("dr", "ips", "dm")


def parse_samples(text: str) -> list[tuple[int, int]]:
    """``"2000:0,8000:1"`` -> [(2000, 0), (8000, 1)]."""
    out = []
    for part in text.split(","):
        requests, _, seed = part.partition(":")
        if not seed:
            raise ValueError(f"a sample is requests:seed, got {part!r}")
        out.append((int(requests), int(seed)))
    return out


def _row(requests: int, seed: int, result: dict[str, Any], seconds: float) -> dict[str, Any]:
    d = result["diagnostics"]
    part = result["supported"]
    return {
        "requests_asked": requests,
        "seed": seed,
        "requests": d["requests"],
        "oracle": result["oracle"],
        **{name: result[name] for name in ESTIMATORS},
        "shrinkage_lambda": result["dr_os"]["shrinkage_lambda"],
        "supported": part,
        "matched_slots": d["matched_slots"],
        "matched_slots_with_reward": d["matched_slots_with_reward"],
        "largest_weight": d["largest_weight"],
        "seconds": seconds,
    }


def summary(rows: list[dict[str, Any]], within: float) -> dict[str, Any]:
    """How often each estimator met the issue's target (within ``within`` of the Oracle, its
    interval covering it), on the page and on the supported slots."""

    def met(e: dict[str, Any]) -> bool:
        return abs(e["relative_error"]) <= within and bool(e["covers"])

    return {
        "samples": len(rows),
        "page": {name: sum(met(r[name]) for r in rows) for name in ESTIMATORS},
        "supported": {name: sum(met(r["supported"][name]) for r in rows) for name in SUPPORTED},
    }


def run(home: Path, dataset: str, samples: list[tuple[int, int]]) -> dict[str, Any]:
    from training.evaluate import ranker_ope_samples
    from training.ope_eval import TARGET_DR_RELATIVE_ERROR
    from training.staging import TrainConfig, staging_dir

    started = time.perf_counter()
    paths = Paths(home)
    sample = ranker_ope_samples(paths, dataset, staging_dir(paths, dataset), TrainConfig())
    if sample is None:
        raise SystemExit(f"{dataset} records no logging policy: no off-policy evaluation")
    rows = []
    for requests, seed in samples:
        t = time.perf_counter()
        rows.append(_row(requests, seed, sample(requests, seed), time.perf_counter() - t))
    return {
        "dataset": dataset,
        "rows": rows,
        "target_relative_error": TARGET_DR_RELATIVE_ERROR,
        "met": summary(rows, TARGET_DR_RELATIVE_ERROR),
        "seconds": time.perf_counter() - started,
    }


def _cell(e: dict[str, Any]) -> str:
    return f"{e['relative_error']:+6.1%}{'' if e['covers'] else ' x'}"


def main(argv: list[str] | None = None) -> int:
    ap = arguments(__doc__)
    ap.add_argument("--samples", default="2000:0,2000:1,2000:2,2000:3,8000:0,8000:1")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    paths = paths_of(args)
    result = run(paths.home, args.dataset, parse_samples(args.samples))
    out = write_report(paths, "ope_samples.json", result)
    print("relative error against the Oracle; x: the 95 % interval misses it")
    print(
        f"{'requests':>8s} {'seed':>4s} {'oracle':>7s} {'DR':>9s} {'DRos':>9s} {'DM':>9s}"
        f" {'IPS':>9s} | {'supp.':>5s} {'oracle':>7s} {'DR':>9s} {'IPS':>9s} {'DM':>9s}"
        f" {'max w':>8s}"
    )
    for r in result["rows"]:
        s = r["supported"]
        print(
            f"{r['requests']:8d} {r['seed']:4d} {r['oracle']:7.1f}"
            + "".join(f" {_cell(r[n]):>9s}" for n in ESTIMATORS)
            + f" | {s['slot_share']:5.2f} {s['oracle']:7.1f}"
            + "".join(f" {_cell(s[n]):>9s}" for n in SUPPORTED)
            + f" {r['largest_weight']:8.0f}"
        )
    met = result["met"]
    print(
        f"within {result['target_relative_error']:.0%} and covering, of {met['samples']}: "
        + ", ".join(f"{n} {c}" for n, c in met["page"].items())
        + "; on the supported slots: "
        + ", ".join(f"{n} {c}" for n, c in met["supported"].items())
    )
    print(f"{result['seconds']:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
