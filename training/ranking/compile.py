"""Compile a LightGBM model to native code with Treelite + TL2cgen, and check the result.

Serving scores ~500 candidates per request within a few milliseconds on one core. LightGBM's
own ``Booster.predict`` walks generic tree arrays; TL2cgen turns every tree into nested C
``if``s that gcc optimises. Measured on this project's machines, the plain compiled code was
*not* faster than LightGBM for 200 trees x 63 leaves: the speed-up comes from
``quantize=1``, which maps each feature value once per row to the index of its threshold
bin, so every split compares integers instead of doubles. Predictions stay bit-identical
because the bins are exactly LightGBM's thresholds.

Parity is part of the contract: a compiled library is only ever served next to a
``parity`` figure (max |compiled - LightGBM|) that must be <= ``PARITY_TOLERANCE``.

The pipeline is ``LightGBM model file -> treelite.Model -> C sources -> gcc -> .so``; the
``.so`` is loaded back with ``tl2cgen.Predictor`` (which applies LightGBM's sigmoid, so a
binary model yields probabilities like ``Booster.predict``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from contract.bundle import COMPILE_REPORT, COMPILED_MODEL
from contract.scorer import CompiledScorer, as_matrix

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-6
SCORING_ROWS = 500  # candidates ranked per request: the latency figure that matters
DEFAULT_GRID: tuple[tuple[int, int], ...] = ((50, 15), (100, 31), (200, 63))


@dataclass(frozen=True)
class CompileReport:
    """What was compiled and how; written into ``ranker/compile.json`` of a bundle."""

    lib_path: str
    lib_bytes: int
    num_trees: int
    num_features: int
    quantize: bool
    annotated: bool
    parallel_comp: int
    compile_seconds: float
    treelite_version: str
    tl2cgen_version: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _default_compile_jobs(parallel_comp: int) -> int:
    return max(1, min(parallel_comp, os.cpu_count() or 1))


def compile_model(
    lgb_model_path: Path,
    out_lib: Path,
    *,
    quantize: bool = True,
    annotate_with: np.ndarray | None = None,
    parallel_comp: int = 2,
    nthread: int | None = None,
) -> CompileReport:
    """Compile a LightGBM text model into a shared library at ``out_lib``.

    ``parallel_comp`` splits the trees into that many C translation units; ``nthread`` is how
    many gcc processes run at once (default: ``min(parallel_comp, cores)``, keep it small on
    shared machines).

    ``annotate_with`` is sample data used to count how often each branch is taken, so gcc lays
    out the likely side first; it changes code layout, never predictions. A LightGBM model
    file already carries each node's training count (``internal_count``), which TL2cgen uses
    for the same hints without annotation: annotating with training-distribution rows
    generated identical C code. It only matters with a sample of *serving* traffic.
    """
    import tl2cgen
    import treelite

    if parallel_comp < 1:
        raise ValueError(f"parallel_comp must be >= 1, got {parallel_comp}")
    jobs = nthread if nthread is not None else _default_compile_jobs(parallel_comp)
    if jobs < 1:
        raise ValueError(f"nthread must be >= 1, got {jobs}")
    lgb_model_path = Path(lgb_model_path)
    if not lgb_model_path.is_file():
        raise FileNotFoundError(f"LightGBM model not found at {lgb_model_path}")
    out_lib = Path(out_lib)
    out_lib.parent.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    model = treelite.frontend.load_lightgbm_model(lgb_model_path)
    params: dict[str, Any] = {"parallel_comp": parallel_comp}
    if quantize:
        params["quantize"] = 1
    with tempfile.TemporaryDirectory(prefix="homefeed-compile-") as tmp:
        if annotate_with is not None:
            sample = as_matrix(annotate_with, model.num_feature)
            annotation = Path(tmp) / "annotation.json"
            tl2cgen.annotate_branch(model, tl2cgen.DMatrix(sample), annotation, nthread=jobs)
            params["annotate_in"] = str(annotation)
        tl2cgen.export_lib(model, toolchain="gcc", libpath=out_lib, params=params, nthread=jobs)
    seconds = time.perf_counter() - started
    report = CompileReport(
        lib_path=str(out_lib),
        lib_bytes=out_lib.stat().st_size,
        num_trees=model.num_tree,
        num_features=model.num_feature,
        quantize=quantize,
        annotated=annotate_with is not None,
        parallel_comp=parallel_comp,
        compile_seconds=round(seconds, 3),
        treelite_version=treelite.__version__,
        tl2cgen_version=tl2cgen.__version__,
    )
    log.info(
        "compiled %s (%d trees, quantize=%s, annotated=%s) to %s in %.1f s",
        lgb_model_path.name,
        report.num_trees,
        quantize,
        report.annotated,
        out_lib,
        seconds,
    )
    return report


def _lgb_booster(lgb_model_path: Path) -> Any:
    import lightgbm as lgb

    return lgb.Booster(model_file=str(lgb_model_path))


def parity(lgb_model_path: Path, lib: Path, X: np.ndarray) -> float:
    """Max |compiled - LightGBM| over the rows of ``X``; must be <= ``PARITY_TOLERANCE``."""
    booster = _lgb_booster(lgb_model_path)
    X = as_matrix(X, booster.num_feature())
    expected = np.asarray(booster.predict(X, num_threads=1), dtype=np.float64)
    got = CompiledScorer(lib, nthread=1).predict(X)
    if expected.shape != got.shape:
        raise ValueError(f"compiled output shape {got.shape} != LightGBM's {expected.shape}")
    diff = float(np.max(np.abs(got - expected))) if expected.size else 0.0
    log.info("parity of %s over %d rows: max |diff| = %.3g", Path(lib).name, len(X), diff)
    return diff


def latency_summary(ms: np.ndarray) -> dict[str, float]:
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "mean_ms": round(float(ms.mean()), 4),
    }


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int
) -> dict[str, np.ndarray]:
    """Per-call wall times (ms) of each function, calls alternated so that both see the same
    machine noise (the machine is shared; absolute figures drift, ratios much less)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: np.empty(repeats) for name in fns}
    for i in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name][i] = (time.perf_counter() - start) * 1e3
    return times


def cycled_rows(X: np.ndarray, n: int) -> np.ndarray:
    """``n`` rows of ``X``, cycling when ``X`` is shorter."""
    if len(X) == 0:
        raise ValueError("X has no rows")
    return np.ascontiguousarray(X[np.arange(n) % len(X)])


def benchmark_scoring(
    lgb_model_path: Path,
    lib: Path | Sequence[Path],
    X500: np.ndarray,
    repeats: int = 300,
    warmup: int = 20,
) -> dict[str, Any]:
    """p50/p99 latency of scoring ``X500`` (one request's candidates) on one thread.

    LightGBM (``num_threads=1``) and each compiled library (``nthread=1``) are timed in the
    same loop. ``lib`` may be one library or several (e.g. quantized and not); figures are
    keyed ``compiled`` for one, ``compiled[<file name>]`` for several, each with its
    ``speedup_p50``/``speedup_p99`` = LightGBM / compiled.
    """
    booster = _lgb_booster(lgb_model_path)
    X = as_matrix(X500, booster.num_feature()).astype(np.float32)
    libs = [Path(lib)] if isinstance(lib, str | Path) else [Path(p) for p in lib]
    names = ["compiled"] if len(libs) == 1 else [f"compiled[{p.name}]" for p in libs]
    fns: dict[str, Callable[[], object]] = {"lightgbm": lambda: booster.predict(X, num_threads=1)}
    for name, path in zip(names, libs, strict=True):
        fns[name] = partial(CompiledScorer(path, nthread=1).predict, X)
    times = time_interleaved(fns, repeats, warmup)
    result: dict[str, Any] = {
        "rows": len(X),
        "features": X.shape[1],
        "num_trees": booster.num_trees(),
        "repeats": repeats,
        "lightgbm": latency_summary(times["lightgbm"]),
    }
    for name in names:
        summary = latency_summary(times[name])
        summary["speedup_p50"] = round(result["lightgbm"]["p50_ms"] / summary["p50_ms"], 3)
        summary["speedup_p99"] = round(result["lightgbm"]["p99_ms"] / summary["p99_ms"], 3)
        result[name] = summary
    return result


def _metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import log_loss, roc_auc_score

    auc = roc_auc_score(y, p) if len(np.unique(y)) == 2 else math.nan
    return {"auc": round(float(auc), 5), "log_loss": round(float(log_loss(y, p)), 5)}


def size_tradeoff(
    train_X: np.ndarray,
    train_y: np.ndarray,
    valid_X: np.ndarray,
    valid_y: np.ndarray,
    grid: Sequence[tuple[int, int]] = DEFAULT_GRID,
    *,
    workdir: Path | None = None,
    learning_rate: float = 0.1,
    repeats: int = 200,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Quality vs latency of binary LightGBM models of different sizes.

    For each ``(num_trees, num_leaves)`` in ``grid``: train on (train_X, train_y) with a fixed
    number of rounds (no early stopping, so the size is what the row says), compile it
    quantized, and record validation AUC / log loss, parity and the 500-row scoring
    latency of LightGBM and the compiled library. Models and libraries go to ``workdir``
    (a temporary folder when not given).
    """
    import lightgbm as lgb

    X500 = cycled_rows(np.asarray(valid_X, dtype=np.float32), SCORING_ROWS)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="homefeed-tradeoff-") as tmp:
        out = Path(workdir) if workdir is not None else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        train = lgb.Dataset(train_X, label=train_y, free_raw_data=False)
        for num_trees, num_leaves in grid:
            params = {
                "objective": "binary",
                "num_leaves": num_leaves,
                "learning_rate": learning_rate,
                "num_threads": 1,
                "seed": seed,
                "deterministic": True,
                "verbose": -1,
            }
            started = time.perf_counter()
            booster = lgb.train(params, train, num_boost_round=num_trees)
            train_seconds = time.perf_counter() - started
            model_path = out / f"gbm_{num_trees}x{num_leaves}.txt"
            booster.save_model(str(model_path))
            lib = out / f"gbm_{num_trees}x{num_leaves}.so"
            report = compile_model(model_path, lib, quantize=True)
            valid_p = np.asarray(booster.predict(valid_X, num_threads=1))
            bench = benchmark_scoring(model_path, lib, X500, repeats=repeats)
            rows.append(
                {
                    "num_trees": num_trees,
                    "num_leaves": num_leaves,
                    **_metrics(np.asarray(valid_y), valid_p),
                    "parity": parity(model_path, lib, valid_X),
                    "train_seconds": round(train_seconds, 2),
                    "compile_seconds": report.compile_seconds,
                    "lib_bytes": report.lib_bytes,
                    "lightgbm_p50_ms": bench["lightgbm"]["p50_ms"],
                    "lightgbm_p99_ms": bench["lightgbm"]["p99_ms"],
                    "compiled_p50_ms": bench["compiled"]["p50_ms"],
                    "compiled_p99_ms": bench["compiled"]["p99_ms"],
                }
            )
            log.info("size trade-off: %s", rows[-1])
    return rows


def _compile_checked(
    lgb_model_path: Path, lib: Path, X_sample: np.ndarray, quantize: bool, parallel_comp: int
) -> tuple[CompileReport, float]:
    """Compile, then refuse (delete the library, ``ValueError``) beyond the tolerance."""
    report = compile_model(lgb_model_path, lib, quantize=quantize, parallel_comp=parallel_comp)
    max_diff = parity(lgb_model_path, lib, X_sample)
    if max_diff > PARITY_TOLERANCE:
        lib.unlink()
        raise ValueError(
            f"compiled model differs from LightGBM by {max_diff:.3g} > {PARITY_TOLERANCE}: "
            f"not shipping {lib.parent.name}/{lib.name}"
        )
    return report, max_diff


def compile_for_bundle(
    lgb_model_path: Path,
    bundle_dir: Path,
    X_sample: np.ndarray,
    *,
    quantize: bool = True,
    parallel_comp: int = 2,
    repeats: int = 200,
    click_model_path: Path | None = None,
) -> dict[str, Any]:
    """Compile the purchase model into ``ranker/purchase.so`` of a bundle being built (and
    a two-stage model's click stage, ``click_model_path``, into ``ranker/click.so``), and
    write ``ranker/compile.json`` (compile parameters, parity, 500-row latency of the trees
    against LightGBM, and ``latency_500_served``: the whole served p, both stages and their
    offsets, as ``contract.scorer.load_purchase_model`` builds it).

    ``X_sample`` should be held-out rows (its first 500, cycled if fewer, are timed). Raises
    ``ValueError`` when parity exceeds ``PARITY_TOLERANCE``: such a library must not ship.
    """
    from contract.bundle import CLICK_COMPILED
    from contract.scorer import load_purchase_model

    bundle_dir = Path(bundle_dir)
    lib = bundle_dir / COMPILED_MODEL
    click_lib = bundle_dir / CLICK_COMPILED
    click_lib.unlink(missing_ok=True)  # a one-stage model never ships an old click stage
    report, max_diff = _compile_checked(lgb_model_path, lib, X_sample, quantize, parallel_comp)
    X500 = cycled_rows(np.asarray(X_sample), SCORING_ROWS)
    latency = benchmark_scoring(lgb_model_path, lib, X500, repeats=repeats)
    summary: dict[str, Any] = {
        **report.to_dict(),
        "lib_path": COMPILED_MODEL,
        "parity_max_abs_diff": max_diff,
        "parity_rows": len(X_sample),
        "parity_tolerance": PARITY_TOLERANCE,
        "latency_500": latency,
    }
    if click_model_path is not None:
        try:
            click, click_diff = _compile_checked(
                click_model_path, click_lib, X_sample, quantize, parallel_comp
            )
        except ValueError:
            lib.unlink()
            raise
        summary["click"] = {
            **click.to_dict(),
            "lib_path": CLICK_COMPILED,
            "parity_max_abs_diff": click_diff,
            "latency_500": benchmark_scoring(click_model_path, click_lib, X500, repeats=repeats),
        }
        summary["parity_max_abs_diff"] = max(max_diff, click_diff)
    served = load_purchase_model(bundle_dir)
    X32 = X500.astype(np.float32)
    times = time_interleaved({"served": lambda: served.predict(X32)}, repeats, warmup=20)
    summary["latency_500_served"] = {
        **latency_summary(times["served"]),
        "stages": 1 if click_model_path is None else 2,
        "num_trees": latency["num_trees"]
        + (summary["click"]["latency_500"]["num_trees"] if click_model_path else 0),
    }
    (bundle_dir / COMPILE_REPORT).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
