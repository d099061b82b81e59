"""Benchmark a bundle's served score of 500 candidates, as the ranking service computes it
(not a test).

    .venv/bin/python scripts/bench_served_scorer.py --dataset sim-small
    .venv/bin/python scripts/bench_served_scorer.py --bundle <bundle dir> --dataset sim-small

Loads the bundle the way the ranking service does (``services.ranking.scorer.LoadedModel``:
verified, compiled trees [+ linear offset], calibrator) and times, on one thread in the same
loop, over 500 rows of the dataset's test split: ``LoadedModel.score`` (the served p and
E[GMV]), the compiled trees alone (``CompiledScorer.predict``) and LightGBM's own
``Booster.predict`` of the same trees. It checks the served p against training's
``RankerModels.purchase_probability`` on every test row first. Writes
``reports/served_scorer.json`` under HOMEFEED_HOME and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from contract import bundle as B
from contract.features import build_matrix
from contract.paths import Paths
from contract.scorer import CompiledScorer
from services.ranking.scorer import LoadedModel
from training.ranking.compile import (
    SCORING_ROWS,
    cycled_rows,
    latency_summary,
    time_interleaved,
)
from training.ranking.train import load, read_split


def newest_bundle(paths: Paths, dataset: str) -> Path:
    """The newest registered bundle built from ``dataset`` (``<version>-<dataset>``)."""
    found = sorted((paths.artifacts / "bundles").glob(f"*-{dataset}"))
    if not found:
        raise SystemExit(f"no bundle of {dataset} under {paths.artifacts / 'bundles'}: train one")
    return found[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, help="HOMEFEED_HOME (default: env or repo root)")
    parser.add_argument("--dataset", default="sim-small")
    parser.add_argument("--bundle", type=Path, help="bundle directory (default: the newest)")
    parser.add_argument("--repeats", type=int, default=500)
    args = parser.parse_args(argv)
    paths = Paths(args.home) if args.home else Paths.from_env()
    bundle_dir = args.bundle or newest_bundle(paths, args.dataset)
    model = LoadedModel.load(bundle_dir)
    training = load(bundle_dir)
    X_all = build_matrix(read_split(paths.home, args.dataset, "test"))
    served_p, _ = model.score(X_all, np.ones(len(X_all), dtype=np.float32))
    parity = float(np.max(np.abs(served_p - training.purchase_probability(X_all))))
    X = cycled_rows(X_all, SCORING_ROWS).astype(np.float32)
    values = np.ones(len(X), dtype=np.float32)
    trees = CompiledScorer(bundle_dir / B.COMPILED_MODEL)
    times = time_interleaved(
        {
            "served (LoadedModel.score)": lambda: model.score(X, values),
            "compiled trees alone (purchase stage)": lambda: trees.predict(X),
            "lightgbm trees (purchase stage)": lambda: training.purchase.predict(X, num_threads=1),
        },
        repeats=args.repeats,
        warmup=20,
    )
    report = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "bundle": str(bundle_dir),
        "linear_offset": model.compiled.offset is not None,
        "stages": 1 if training.click is None else 2,
        "num_trees": training.purchase.num_trees()
        + (0 if training.click is None else training.click.num_trees()),
        "rows": len(X),
        "repeats": args.repeats,
        "served_vs_training_max_abs_diff": parity,
        "parity_rows": len(X_all),
        "latency_500": {name: latency_summary(ms) for name, ms in times.items()},
    }
    out = paths.reports / "served_scorer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{report['num_trees']} trees, linear offset {report['linear_offset']}, served p vs "
        f"training's over {len(X_all):,} test rows: max |diff| {parity:.3g}"
    )
    print(f"{'scorer (500 rows, 1 thread)':<32}{'p50 ms':>9}{'p99 ms':>9}")
    for name, s in report["latency_500"].items():
        print(f"{name:<32}{s['p50_ms']:>9.3f}{s['p99_ms']:>9.3f}")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
