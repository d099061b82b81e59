"""The offline stages as functions over a dataset folder; the CLI and the demo call these.

A dataset lives in ``data/<name>/``: ``raw/`` (validated event tables + ``dataset.json``),
``ground_truth/`` (simulated data only), ``features/`` (Feast offline sources),
``feast/`` (registry and SQLite online store) and ``training/`` (train/valid/test).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
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


CHECKOUT_CARTS = "checkout_carts.parquet"  # the simulator's checkout surfaces' carts (raw/)


def read_checkout_carts(paths: Paths, dataset: str) -> pd.DataFrame | None:
    """The carts the simulator's checkout requests held (None: a dataset without them, such
    as a real one): the Oracle scores a checkout page with its cart, and the heuristic's
    replay boosts its categories."""
    path = paths.raw(dataset) / CHECKOUT_CARTS
    return pd.read_parquet(path) if path.exists() else None


def read_manifest(paths: Paths, dataset: str) -> dict[str, Any]:
    """The training sets' manifest (``training.dataset.MANIFEST``, written with them)."""
    from training.dataset import MANIFEST

    path = paths.training_sets(dataset) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"no training sets for {dataset!r} at {path.parent}: run `homefeed dataset` first"
        )
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


def held_out_period(manifest: Mapping[str, Any]) -> tuple[pd.Timestamp, pd.Timestamp]:
    """[first, day after the last) test day of the training sets a manifest describes."""
    split = manifest["split"]
    return pd.Timestamp(split["valid_end"]), pd.Timestamp(split["test_end"])


def window_of(tables: dict[str, pd.DataFrame]) -> tuple[pd.Timestamp, pd.Timestamp]:
    """[first day, day after the last impression) of a dataset without a declared window."""
    ts = tables[C.IMPRESSIONS][C.TS]
    return ts.min().floor("D"), ts.max().floor("D") + pd.Timedelta(days=1)


def load_raw(
    paths: Paths, dataset: str, columns: Mapping[str, Sequence[str]] | None = None
) -> dict[str, pd.DataFrame]:
    """The dataset's raw tables; ``columns``: only those of the tables it names."""
    from training.tables import read_tables

    return read_tables(paths.raw(dataset), columns=columns)


def validate(
    tables: dict[str, pd.DataFrame],
    meta: dict[str, Any],
    quiet_days: tuple[str, ...] = (),
    closed_weekdays: tuple[str, ...] = (),
    volume_tolerance: float | None = None,
) -> dict[str, Any]:
    """Run the declared schemas; raises ``ValidationError`` naming table, column and rows.

    The volume check takes the options stored in ``meta`` by ``ingest_stage``, plus the
    ``quiet_days`` and ``closed_weekdays`` given here, and ``volume_tolerance`` instead of
    the stored one when given; ``meta`` is not changed.
    """
    from training.validate import validate_tables, volume_options

    window = (pd.Timestamp(meta["window_start"]), pd.Timestamp(meta["window_end"]))
    options = volume_options(
        (*meta.get("quiet_days", ()), *quiet_days),
        (*meta.get("closed_weekdays", ()), *closed_weekdays),
        meta.get("volume_tolerance") if volume_tolerance is None else volume_tolerance,
    )
    report = validate_tables(tables, window=window, **options)
    return {
        "rows": dict(report.row_counts),
        "checks_run": len(report.checks_run),
        "skipped": list(report.skipped),
        "seconds": round(report.seconds, 3),
        "volume": options,
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
    result.tables["checkout_carts"].to_parquet(raw / CHECKOUT_CARTS, index=False)
    result.truth.save(paths.ground_truth(cfg.dataset))
    _write_meta(raw, meta)
    return {"dataset": cfg.dataset, "rows": validated["rows"], **meta}


def ingest_stage(
    paths: Paths,
    source: str,
    dataset: str,
    path: str | None,
    quiet_days: tuple[str, ...] = (),
    max_categories: int | None = None,
    closed_weekdays: tuple[str, ...] = (),
    volume_tolerance: float | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """Read real data through an adapter, validate it, write raw tables.

    ``max_categories`` keeps the commonest categories and merges the rest
    (``training.categories``). ``quiet_days`` (UTC days or inclusive ranges such as
    "2011-12-23..2012-01-03") are days known to be unusual, added to the source's own list
    (``ingest.KNOWN_QUIET_DAYS``); the volume check skips them, as it skips the
    ``closed_weekdays`` ("sat"); ``volume_tolerance`` is its factor (None: the default).
    The three are checked before the source is read and stored in ``dataset.json``, so
    later ``validate`` runs of the dataset use them too. Long windows get weekly
    feature snapshots (``snapshot_days``) so the batch views stay a manageable size.
    """
    from training.ingest import KNOWN_QUIET_DAYS, ingest_with_report
    from training.tables import write_tables
    from training.validate import volume_options

    volume = volume_options(
        (*KNOWN_QUIET_DAYS.get(source, ()), *quiet_days), closed_weekdays, volume_tolerance
    )
    tables, report = ingest_with_report(source, path, **kw)
    collapsed: dict[str, int] | None = None
    if max_categories is not None:
        from training.categories import collapse_categories

        tables, collapsed = collapse_categories(tables, max_categories)
    start, end = window_of(tables)
    days = (end - start).days
    meta = {
        "dataset": dataset,
        "source": source,
        "window_start": start.isoformat(),
        "window_end": end.isoformat(),
        **volume,
        "snapshot_days": 1 if days <= LONG_WINDOW_DAYS else 7,
    }
    if collapsed is not None:
        meta["categories_collapsed"] = collapsed
    validated = validate(tables, meta)
    write_tables(tables, paths.raw(dataset))
    _write_meta(paths.raw(dataset), meta)
    return {"dataset": dataset, "rows": validated["rows"], **meta, "ingest": report.as_dict()}


def features_stage(
    paths: Paths,
    dataset: str,
    steps: tuple[str, ...] = ("build", "apply", "materialize"),
    online: str | None = None,
    redis: str | None = None,
) -> dict[str, Any]:
    """Build the offline feature tables, `feast apply`, and materialize to the online store."""
    from training.features import COLUMNS, build_estimate, build_feature_tables
    from training.memory import REDUCE_DATA, StagePeaks, require_fits

    meta = read_meta(paths, dataset)
    out: dict[str, Any] = {"seconds": {}}
    peaks = StagePeaks()
    if "build" in steps:
        t0 = time.perf_counter()
        stride = int(meta.get("snapshot_days", 1))
        with peaks.measure("features_build"):
            tables = load_raw(paths, dataset, COLUMNS)
            require_fits("features build", build_estimate(tables, stride), REDUCE_DATA)
            out["rows"] = build_feature_tables(tables, paths.features(dataset), stride)
            del tables
        out["seconds"]["build"] = time.perf_counter() - t0
    if "apply" in steps or "materialize" in steps:
        from contract.feature_store import open_store
        from training import feature_store

        t0 = time.perf_counter()
        store = open_store(dataset, paths=paths, online=online, redis=redis)
        out["seconds"]["open_store"] = time.perf_counter() - t0
        if "apply" in steps:
            t0 = time.perf_counter()
            with peaks.measure("features_apply"):
                out["applied"] = feature_store.apply(store)
            out["seconds"]["apply"] = time.perf_counter() - t0
        if "materialize" in steps:
            end = pd.Timestamp(meta["window_end"])
            with peaks.measure("features_materialize"):
                out["seconds"]["materialize"] = feature_store.materialize(store, end)
    out.update(peaks.report())
    return out


PURCHASE_ONLY_NEGATIVES = 2  # sampled negatives per purchase when no feed was logged


def dataset_defaults(tables: dict[str, pd.DataFrame], meta: dict[str, Any]) -> dict[str, Any]:
    """Training-set settings the data calls for: weekly split units for weekly snapshots, no
    monotone examination curve for Open Bandit's three-slot carousel, and for purchase-only
    data (every impression organic, no clicks) sampled negatives, all kept."""
    out: dict[str, Any] = {"split_unit_days": int(meta.get("snapshot_days", 1))}
    if meta.get("source") == "open-bandit":  # left / centre / right: no order to fit
        out["monotone_positions"] = False
    imp = tables[C.IMPRESSIONS]
    if len(imp) and tables[C.CLICKS].empty and (imp[C.POLICY] == C.POLICY_ORGANIC).all():
        out.update(sampled_negatives=PURCHASE_ONLY_NEGATIVES, negative_rate=1.0)
    return out


def _prepare_fits(paths: Paths, dataset: str, chunk_rows: int) -> None:
    """The dataset stage's first check, from the raw tables' row counts (Parquet metadata):
    ``training.memory.dataset_prepare_bytes`` against the memory available."""
    import pyarrow.parquet as pq

    from training.memory import REDUCE_DATA, dataset_prepare_bytes, require_fits
    from training.tables import table_path

    def rows(table: str) -> int:
        path = table_path(paths.raw(dataset), table)
        return pq.ParquetFile(path).metadata.num_rows if path.exists() else 0

    outcomes = sum(rows(t) for t in (C.CLICKS, C.ADD_TO_CARTS, C.PURCHASES))
    parts = dataset_prepare_bytes(rows(C.IMPRESSIONS), outcomes, chunk_rows)
    require_fits("dataset (labels and split)", parts, REDUCE_DATA)


def _join_fits(paths: Paths, dataset: str) -> Callable[[int, int], None]:
    """The check ``build_training_sets`` runs before its Feast join, once the entity rows are
    known: ``training.memory.dataset_join_bytes`` against the memory available."""
    import pyarrow.parquet as pq

    from feature_repo import schema as S
    from training.memory import (
        REDUCE_JOIN,
        dataset_join_bytes,
        list_entries,
        require_fits,
    )

    source = paths.features(dataset) / f"{S.USER_CATEGORY_AFFINITY}.parquet"
    meta = pq.ParquetFile(source).metadata if source.exists() else None
    snapshots = meta.num_rows if meta else 0
    entries = list_entries(meta, S.AFFINITY_CATEGORIES) if meta else 0

    def check(rows: int, chunk_rows: int) -> None:
        parts = dataset_join_bytes(rows, snapshots, entries, chunk_rows)
        require_fits("dataset (the Feast join)", parts, REDUCE_JOIN)

    return check


def dataset_stage(paths: Paths, dataset: str, **cfg_overrides: Any) -> dict[str, Any]:
    """Labels, split, downsampling, propensities, Feast point-in-time join. Stops with a
    ``ValueError`` on a bad option (before any table loads), a split that leaves a period
    empty, or a label with a single class in a split (``SingleClassLabelError``)."""
    from contract.feature_store import open_store
    from training.dataset import DatasetConfig, build_training_sets
    from training.memory import StagePeaks

    checked = DatasetConfig(**cfg_overrides)  # bad options: refused before the tables load
    _prepare_fits(paths, dataset, checked.prepare_chunk_rows)  # and a stage that would not fit
    peaks = StagePeaks()
    with peaks.measure("dataset"):
        meta = read_meta(paths, dataset)
        tables = load_raw(paths, dataset)
        overrides = {**dataset_defaults(tables, meta), **cfg_overrides}
        store = open_store(dataset, paths=paths)
        cfg = DatasetConfig(**overrides)
        manifest = build_training_sets(
            tables,
            store,
            paths.training_sets(dataset),
            cfg,
            data_end=pd.Timestamp(meta["window_end"]),
            before_join=_join_fits(paths, dataset),
            consume_tables=True,
        )
        del tables
    return {**manifest, **peaks.report()}
