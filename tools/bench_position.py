"""The examination-curve benchmark: the randomized and the harvested (all-traffic) estimates
of ``training.propensity`` on a simulated dataset, against the simulator's true curve.

Reads the raw impressions and clicks (read only; no stage is run), keeps the impressions the
dataset stage would estimate the curve from (the train and valid periods of the default
split; ``--window all``: the whole log), runs ``estimate_position_curve(all_traffic=True)``
once for its time and once under ``tracemalloc`` for its peak memory, and compares both
curves with ``e(k) = (1 + (k-1)/kappa)^-theta`` from the dataset's ground truth (used here
only). Writes ``reports/position_curve.json`` and prints a table per slot and the max
relative errors of slots 1-10 and 11-50. The target (issue 13): slots 1-10 within 10 %.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from contract import columns as C
from contract.paths import Paths
from contract.timeutil import to_ns
from training.dataset import DatasetConfig, plan_split
from training.propensity import PositionCurve, estimate_position_curve
from training.simulate.groundtruth import PARAMS_FILE, examination
from training.stages import dataset_defaults, read_meta
from training.tables import read_tables

COLUMNS = (C.IMPRESSION_ID, C.ITEM_ID, C.POSITION, C.SURFACE, C.TS, C.POLICY)
BANDS = {"1-10": slice(0, 10), "11-50": slice(10, 50)}


def true_curve(paths: Paths, dataset: str, slots: int) -> np.ndarray:
    params = json.loads((paths.ground_truth(dataset) / PARAMS_FILE).read_text())
    positions = np.arange(1, slots + 1)
    return np.asarray(
        examination(positions, params["examination_kappa"], params["examination_theta"])
    )


def _method_summary(curve: PositionCurve, truth: np.ndarray) -> dict[str, Any]:
    k = len(curve.positions)
    rel = np.abs(curve.examination / truth[:k] - 1)
    covered = (curve.ci_low <= truth[:k]) & (truth[:k] <= curve.ci_high)
    out: dict[str, Any] = {"slots": k, "applied": curve.applied, "reason": curve.reason}
    for band, sl in BANDS.items():
        part = rel[sl]
        out[f"max_relative_error_{band}"] = float(part.max()) if len(part) else None
        out[f"mean_relative_error_{band}"] = float(part.mean()) if len(part) else None
        out[f"coverage_{band}"] = float(covered[sl].mean()) if len(part) else None
    out["ci_width_median"] = float(np.median(curve.ci_high - curve.ci_low))
    return out


def _cell(curve: PositionCurve | None, k: int) -> dict[str, float] | None:
    if curve is None or k > len(curve.positions):
        return None
    i = k - 1
    return {
        "estimate": float(curve.examination[i]),
        "ci_low": float(curve.ci_low[i]),
        "ci_high": float(curve.ci_high[i]),
        "raw": float(curve.raw[i]),
        "impressions": float(curve.impressions[i]),
        "clicks": float(curve.clicks[i]),
    }


def run(paths: Paths, dataset: str, window: str, max_position: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    tables = read_tables(
        paths.raw(dataset),
        names=[C.IMPRESSIONS, C.CLICKS],
        columns={C.IMPRESSIONS: COLUMNS, C.CLICKS: (C.IMPRESSION_ID,)},
    )
    load_seconds = time.perf_counter() - t0
    impressions, clicks = tables[C.IMPRESSIONS], tables[C.CLICKS]
    meta = read_meta(paths, dataset)
    ts_ns = to_ns(impressions[C.TS])
    start = pd.Timestamp(int(ts_ns.min()), tz="UTC")
    end = pd.Timestamp(meta["window_end"])
    if window == "history":  # what training.dataset.build_training_sets estimates from
        cfg = DatasetConfig(**dataset_defaults(tables, meta))
        split = plan_split(start, end, cfg)
        lo, hi = split.train_start, split.valid_end
    else:
        lo, hi = start.floor("D"), end
    rows = (ts_ns >= lo.value) & (ts_ns < hi.value)
    del ts_ns

    def estimate() -> PositionCurve:
        return estimate_position_curve(
            impressions, clicks, max_position, all_traffic=True, rows=rows
        )

    t0 = time.perf_counter()
    curve = estimate()
    seconds = time.perf_counter() - t0
    tracemalloc.start()
    estimate()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    slots = max(len(c.positions) for c in (curve.randomized, curve.harvested, curve) if c)
    truth = true_curve(paths, dataset, slots)
    methods = {
        name: _method_summary(c, truth)
        for name, c in (("randomized", curve.randomized), ("harvested", curve.harvested))
        if c is not None
    }
    table = []
    for k in range(1, slots + 1):
        row: dict[str, Any] = {C.POSITION: k, "truth": float(truth[k - 1])}
        for name, c in (("randomized", curve.randomized), ("harvested", curve.harvested)):
            cell = _cell(c, k)
            row[name] = cell
            if cell is not None:
                cell["relative_error"] = cell["estimate"] / row["truth"] - 1
                cell["covers"] = cell["ci_low"] <= row["truth"] <= cell["ci_high"]
        table.append(row)
    return {
        "dataset": dataset,
        "window": {"start": lo.isoformat(), "end": hi.isoformat(), "kind": window},
        "impressions_in_window": int(rows.sum()),
        "applied": {"method": curve.method, "applied": curve.applied, "reason": curve.reason},
        "agreement": curve.agreement.to_dict() if curve.agreement else None,
        "methods": methods,
        "seconds": {"load": load_seconds, "estimate": seconds},
        "estimate_peak_traced_mb": peak / 2**20,
        "slots": table,
    }


def _fmt(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return f"{'-':>22}"
    return f"{cell['estimate']:.3f} [{cell['ci_low']:.3f}, {cell['ci_high']:.3f}]"


def _err(cell: dict[str, Any] | None) -> str:
    return f"{'-':>7}" if cell is None else f"{cell['relative_error']:>+7.1%}"


def print_report(report: dict[str, Any]) -> None:
    w = report["window"]
    print(
        f"{report['dataset']}: {report['impressions_in_window']:,} impressions "
        f"{w['start'][:10]} .. {w['end'][:10]} ({w['kind']})\n"
    )
    print(f"{'slot':>4}  {'randomized [95 % CI]':>22}  {'harvested [95 % CI]':>22}  truth  "
          f"{'err r':>7}  {'err h':>7}")  # fmt: skip
    for row in report["slots"]:
        r, h = row["randomized"], row["harvested"]
        print(
            f"{row[C.POSITION]:>4}  {_fmt(r):>22}  {_fmt(h):>22}  {row['truth']:.3f}  "
            f"{_err(r)}  {_err(h)}"
        )
    print()
    for name, m in report["methods"].items():
        print(
            f"{name:<10} max relative error 1-10 {m['max_relative_error_1-10']:.1%}, "
            f"11-50 {m['max_relative_error_11-50'] or float('nan'):.1%}; intervals hold the "
            f"truth at {m['coverage_1-10']:.0%} (1-10) / "
            f"{m['coverage_11-50'] or float('nan'):.0%} (11-50) of slots"
        )
    a = report["agreement"]
    if a is not None:
        print(
            f"agreement: chi2 {a['chi2']:.1f} on {a['dof']} slots, p = {a['p_value']:.2f}; "
            f"slots apart at 95 %: {a['disagreeing']}"
        )
    print(f"applied: {report['applied']['method']} ({report['applied']['reason']})")
    s = report["seconds"]
    print(
        f"estimate {s['estimate']:.1f} s (load {s['load']:.1f} s), traced peak "
        f"{report['estimate_peak_traced_mb']:.0f} MB"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_position", description=__doc__)
    parser.add_argument("--dataset", default="sim-small")
    parser.add_argument(
        "--window",
        choices=("history", "all"),
        default="history",
        help="history: the train and valid periods, as the dataset stage; all: the whole log",
    )
    parser.add_argument("--max-position", type=int, default=50)
    parser.add_argument(
        "--out", type=Path, default=None, help="default reports/position_curve.json"
    )
    args = parser.parse_args(argv)
    paths = Paths.from_env()
    report = run(paths, args.dataset, args.window, args.max_position)
    out = args.out or paths.reports / "position_curve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print_report(report)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
