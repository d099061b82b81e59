"""The offline stages as functions over a dataset folder; the CLI and the demo call these.

A dataset lives in ``data/<name>/``: ``raw/`` (validated event tables + ``dataset.json``),
``ground_truth/`` (simulated data only), ``features/`` (Feast offline sources),
``feast/`` (registry and SQLite online store) and ``training/`` (train/valid/test).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from contract import columns as C
from contract.paths import Paths

log = logging.getLogger(__name__)

DATASET_META = "dataset.json"
LONG_WINDOW_DAYS = 120  # beyond this, batch feature snapshots are weekly


def _write_meta(raw_dir: Path, meta: dict[str, Any]) -> None:
    raw_dir.mkdir(parents=True, exist_ok=True)
    (raw_dir / DATASET_META).write_text(json.dumps(meta, indent=2, default=str))


def read_meta(paths: Paths, dataset: str) -> dict[str, Any]:
    path = paths.raw(dataset) / DATASET_META
    if not path.exists():
        raise FileNotFoundError(
            f"dataset {dataset!r} not found at {path.parent}: run `homefeed simulate` or "
            "`homefeed ingest` first"
        )
    meta: dict[str, Any] = json.loads(path.read_text())
    return meta


def window_of(tables: dict[str, pd.DataFrame]) -> tuple[pd.Timestamp, pd.Timestamp]:
    """[first day, day after the last impression) of a dataset without a declared window."""
    ts = tables[C.IMPRESSIONS][C.TS]
    return ts.min().floor("D"), ts.max().floor("D") + pd.Timedelta(days=1)


def load_raw(paths: Paths, dataset: str) -> dict[str, pd.DataFrame]:
    from training.tables import read_tables

    return read_tables(paths.raw(dataset))


def validate(tables: dict[str, pd.DataFrame], meta: dict[str, Any]) -> dict[str, Any]:
    """Run the declared schemas; raises ``ValidationError`` naming table, column and rows."""
    from training.validate import validate_tables

    window = (pd.Timestamp(meta["window_start"]), pd.Timestamp(meta["window_end"]))
    report = validate_tables(tables, window=window, quiet_days=meta.get("quiet_days", ()))
    return {
        "rows": dict(report.row_counts),
        "checks_run": len(report.checks_run),
        "skipped": list(report.skipped),
        "seconds": round(report.seconds, 3),
    }


def simulate_stage(paths: Paths, preset: str, **overrides: Any) -> dict[str, Any]:
    """Simulate, validate, and write raw tables + ground truth. Returns a summary."""
    from training.simulate import load_config, simulate
    from training.tables import write_tables

    cfg = load_config(preset, **overrides)
    result = simulate(cfg)
    meta: dict[str, Any] = {
        "dataset": cfg.dataset,
        "source": "simulator",
        "window_start": cfg.start_ts.isoformat(),
        "window_end": cfg.end_ts.isoformat(),
        "config": cfg.to_dict(),
        "stats": result.stats,
    }
    t0 = time.perf_counter()
    tables = {k: v for k, v in result.tables.items() if k in C.ALL_TABLES}
    validated = validate(tables, meta)
    meta["validate_seconds"] = time.perf_counter() - t0
    raw = paths.raw(cfg.dataset)
    write_tables(tables, raw)
    result.tables["checkout_carts"].to_parquet(raw / "checkout_carts.parquet", index=False)
    result.truth.save(paths.ground_truth(cfg.dataset))
    _write_meta(raw, meta)
    return {"dataset": cfg.dataset, "rows": validated["rows"], **meta}


def ingest_stage(
    paths: Paths,
    source: str,
    dataset: str,
    path: str | None,
    quiet_days: tuple[str, ...] = (),
    **kw: Any,
) -> dict[str, Any]:
    """Read real data through an adapter, validate it, write raw tables.

    ``quiet_days`` (UTC dates) are days known to be unusual, added to the source's own list
    (``ingest.KNOWN_QUIET_DAYS``); the volume check skips them. Long windows get weekly
    feature snapshots (``snapshot_days``) so the batch views stay a manageable size.
    """
    from training.ingest import KNOWN_QUIET_DAYS, ingest
    from training.tables import write_tables

    tables = ingest(source, path, **kw)
    start, end = window_of(tables)
    days = (end - start).days
    meta = {
        "dataset": dataset,
        "source": source,
        "window_start": start.isoformat(),
        "window_end": end.isoformat(),
        "quiet_days": sorted({*KNOWN_QUIET_DAYS.get(source, ()), *quiet_days}),
        "snapshot_days": 1 if days <= LONG_WINDOW_DAYS else 7,
    }
    validated = validate(tables, meta)
    write_tables(tables, paths.raw(dataset))
    _write_meta(paths.raw(dataset), meta)
    return {"dataset": dataset, "rows": validated["rows"], **meta}


def features_stage(
    paths: Paths,
    dataset: str,
    steps: tuple[str, ...] = ("build", "apply", "materialize"),
    online: str | None = None,
    redis: str | None = None,
) -> dict[str, Any]:
    """Build the offline feature tables, `feast apply`, and materialize to the online store."""
    from training.features import build_feature_tables

    meta = read_meta(paths, dataset)
    out: dict[str, Any] = {"seconds": {}}
    if "build" in steps:
        t0 = time.perf_counter()
        stride = int(meta.get("snapshot_days", 1))
        out["rows"] = build_feature_tables(
            load_raw(paths, dataset), paths.features(dataset), stride
        )
        out["seconds"]["build"] = time.perf_counter() - t0
    if "apply" in steps or "materialize" in steps:
        from contract.feature_store import open_store
        from training import feature_store

        t0 = time.perf_counter()
        store = open_store(dataset, paths=paths, online=online, redis=redis)
        out["seconds"]["open_store"] = time.perf_counter() - t0
        if "apply" in steps:
            t0 = time.perf_counter()
            out["applied"] = feature_store.apply(store)
            out["seconds"]["apply"] = time.perf_counter() - t0
        if "materialize" in steps:
            end = pd.Timestamp(meta["window_end"])
            out["seconds"]["materialize"] = feature_store.materialize(store, end)
    return out


PURCHASE_ONLY_NEGATIVES = 2  # sampled negatives per purchase when no feed was logged


def dataset_defaults(tables: dict[str, pd.DataFrame], meta: dict[str, Any]) -> dict[str, Any]:
    """Training-set settings the data calls for: weekly split units for weekly snapshots, and
    for purchase-only data (every impression organic, no clicks) sampled negatives, all kept."""
    out: dict[str, Any] = {"split_unit_days": int(meta.get("snapshot_days", 1))}
    imp = tables[C.IMPRESSIONS]
    if len(imp) and tables[C.CLICKS].empty and (imp[C.POLICY] == C.POLICY_ORGANIC).all():
        out.update(sampled_negatives=PURCHASE_ONLY_NEGATIVES, negative_rate=1.0)
    return out


def dataset_stage(paths: Paths, dataset: str, **cfg_overrides: Any) -> dict[str, Any]:
    """Labels, split, downsampling, propensities, Feast point-in-time join."""
    from contract.feature_store import open_store
    from training.dataset import DatasetConfig, build_training_sets

    meta = read_meta(paths, dataset)
    tables = load_raw(paths, dataset)
    overrides = {**dataset_defaults(tables, meta), **cfg_overrides}
    store = open_store(dataset, paths=paths)
    cfg = DatasetConfig(**overrides)
    return build_training_sets(
        tables,
        store,
        paths.training_sets(dataset),
        cfg,
        data_end=pd.Timestamp(meta["window_end"]),
    )
