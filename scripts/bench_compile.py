"""Benchmark LightGBM vs TL2cgen-compiled scoring of 500 candidates (not a test).

    .venv/bin/python scripts/bench_compile.py                      # synthetic data
    .venv/bin/python scripts/bench_compile.py --dataset sim-small  # a built training set

Trains one binary model (``--trees`` x ``--leaves``), compiles it plain, quantized and
quantized + branch-annotated, checks parity and times the three libraries against
``Booster.predict`` on one thread in the same loop; then trains the ``--grid`` sizes for a
quality / latency table. Writes ``reports/compile.json`` under HOMEFEED_HOME and logs a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from contract.paths import Paths
from training.ranking.compile import (
    PARITY_TOLERANCE,
    SCORING_ROWS,
    benchmark_scoring,
    compile_model,
    parity,
    size_tradeoff,
)

log = logging.getLogger("bench_compile")
VARIANTS = {
    "plain": {"quantize": False},
    "quantized": {"quantize": True},
    "quantized+annotated": {"quantize": True, "annotate": True},
}


def synthetic(n: int, n_features: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Purchase-like data: a rare positive class driven by a few features and interactions."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_features)).astype(np.float32)
    X[:, n_features // 2 :] = np.round(X[:, n_features // 2 :] * 3)  # count-like features
    logit = -2.5 + X[:, 0] - 0.7 * X[:, 1] + 0.6 * X[:, 2] * X[:, 3] + 0.4 * np.abs(X[:, 4])
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int32)
    return X, y


def load_dataset(paths: Paths, dataset: str) -> dict[str, Any]:
    """Train/valid features and purchase labels of a dataset built by ``homefeed dataset``."""
    import pandas as pd

    from contract import columns as C
    from training.dataset import MANIFEST

    folder = paths.training_sets(dataset)
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(
            f"no training sets at {folder}: run `homefeed dataset {dataset}` first"
        )
    from contract.features import FEATURE_SCHEMA, build_matrix

    parts = {name: pd.read_parquet(folder / f"{name}.parquet") for name in ("train", "valid")}
    return {
        "source": f"dataset {dataset}",
        "features": len(FEATURE_SCHEMA.names),
        **{
            name: (build_matrix(part), part[C.LABEL_PURCHASE].to_numpy(np.int32))
            for name, part in parts.items()
        },
    }


def parse_grid(text: str) -> list[tuple[int, int]]:
    try:
        return [
            (int(trees), int(leaves))
            for trees, leaves in (item.split("x") for item in text.split(","))
        ]
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"grid must look like 50x15,100x31 (trees x leaves), got {text!r}"
        ) from e


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, help="HOMEFEED_HOME (default: env or repo root)")
    parser.add_argument("--dataset", help="use this dataset's training sets, else synthetic data")
    parser.add_argument("--rows", type=int, default=20_000, help="synthetic training rows")
    parser.add_argument("--features", type=int, default=40, help="synthetic feature count")
    parser.add_argument("--trees", type=int, default=200)
    parser.add_argument("--leaves", type=int, default=63)
    parser.add_argument("--grid", type=parse_grid, default=parse_grid("50x15,100x31,200x63"))
    parser.add_argument("--no-grid", action="store_true", help="skip the size trade-off")
    parser.add_argument("--repeats", type=int, default=500, help="timed calls per scorer")
    parser.add_argument("--parallel-comp", type=int, default=2, help="C translation units")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.home is not None:
        os.environ["HOMEFEED_HOME"] = str(args.home)
    paths = Paths.from_env()

    import lightgbm as lgb

    if args.dataset:
        data = load_dataset(paths, args.dataset)
    else:
        data = {
            "source": "synthetic",
            "features": args.features,
            "train": synthetic(args.rows, args.features, seed=0),
            "valid": synthetic(max(args.rows // 4, SCORING_ROWS), args.features, seed=1),
        }
    (train_X, train_y), (valid_X, valid_y) = data["train"], data["valid"]
    X500 = np.ascontiguousarray(valid_X[:SCORING_ROWS])
    log.info(
        "data: %s, train %s, valid %s, positive rate %.3f",
        data["source"],
        train_X.shape,
        valid_X.shape,
        train_y.mean(),
    )

    with tempfile.TemporaryDirectory(prefix="bench-compile-") as tmp:
        work = Path(tmp)
        params = {
            "objective": "binary",
            "num_leaves": args.leaves,
            "num_threads": 1,
            "deterministic": True,
            "verbose": -1,
        }
        booster = lgb.train(params, lgb.Dataset(train_X, train_y), num_boost_round=args.trees)
        model = work / "purchase.txt"
        booster.save_model(str(model))

        compiled: dict[str, Any] = {}
        libs = []
        for name, variant in VARIANTS.items():
            lib = work / f"{name.replace('+', '_')}.so"
            report = compile_model(
                model,
                lib,
                quantize=bool(variant["quantize"]),
                annotate_with=train_X if variant.get("annotate") else None,
                parallel_comp=args.parallel_comp,
            )
            compiled[name] = {
                **report.to_dict(),
                "lib_path": lib.name,
                "parity": parity(model, lib, valid_X),
            }
            libs.append(lib)
        bench = benchmark_scoring(model, libs, X500, repeats=args.repeats)
        for name, lib in zip(VARIANTS, libs, strict=True):
            compiled[name]["latency_500"] = bench[f"compiled[{lib.name}]"]

        started = time.perf_counter()
        grid = (
            []
            if args.no_grid
            else size_tradeoff(
                train_X,
                train_y,
                valid_X,
                valid_y,
                args.grid,
                workdir=work / "grid",
                repeats=max(args.repeats // 2, 50),
            )
        )
        grid_seconds = time.perf_counter() - started

    result = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "load_avg_1m": os.getloadavg()[0],
        },
        "data": {
            "source": data["source"],
            "features": data["features"],
            "train_rows": len(train_X),
            "valid_rows": len(valid_X),
        },
        "model": {"trees": args.trees, "leaves": args.leaves},
        "parity_tolerance": PARITY_TOLERANCE,
        "lightgbm_latency_500": bench["lightgbm"],
        "compiled": compiled,
        "repeats": args.repeats,
        "size_tradeoff": grid,
        "size_tradeoff_seconds": round(grid_seconds, 1),
    }
    out = paths.reports / "compile.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    lg = bench["lightgbm"]
    lines = [
        f"{args.trees} trees x {args.leaves} leaves, {SCORING_ROWS} rows, one thread:",
        f"{'scorer':<22}{'p50 ms':>9}{'p99 ms':>9}{'x p50':>8}{'x p99':>8}{'parity':>10}",
        f"{'lightgbm':<22}{lg['p50_ms']:>9.3f}{lg['p99_ms']:>9.3f}{1:>8.2f}{1:>8.2f}{'-':>10}",
    ]
    for name, c in compiled.items():
        lat = c["latency_500"]
        lines.append(
            f"{name:<22}{lat['p50_ms']:>9.3f}{lat['p99_ms']:>9.3f}"
            f"{lat['speedup_p50']:>8.2f}{lat['speedup_p99']:>8.2f}{c['parity']:>10.1e}"
        )
    if grid:
        lines.append(
            f"{'trees x leaves':<16}{'auc':>8}{'logloss':>9}{'lgb p50':>9}{'lgb p99':>9}"
            f"{'tl2 p50':>9}{'tl2 p99':>9}{'compile s':>10}"
        )
        for row in grid:
            lines.append(
                f"{row['num_trees']:>6} x {row['num_leaves']:<7}{row['auc']:>8.4f}"
                f"{row['log_loss']:>9.4f}{row['lightgbm_p50_ms']:>9.3f}"
                f"{row['lightgbm_p99_ms']:>9.3f}{row['compiled_p50_ms']:>9.3f}"
                f"{row['compiled_p99_ms']:>9.3f}{row['compile_seconds']:>10.1f}"
            )
    log.info("\n%s", "\n".join(lines))
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
