"""`homefeed train`: retrieval -> rankers -> compile -> evaluate -> register.

Each stage reads the dataset's training sets and writes into the dataset's staging folder
(``artifacts/staging/<dataset>/``, laid out like a bundle, see contract/bundle.py), so any
stage can be run alone after the ones it needs. ``register`` freezes the staging folder
into an immutable, versioned bundle (``artifacts/bundles/<version>/``) with checksums and
registers it in MLflow under the ``challenger`` alias (and ``champion`` when there is none).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from contract import bundle as B
from contract.paths import Paths
from training.memory import StagePeaks
from training.stages import read_manifest
from training.staging import (
    STAGE_REPORT,
    TrainConfig,
    read_stage_reports,
    save_stage_report,
    staging_dir,
)

log = logging.getLogger(__name__)

_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. :/]")  # what MLflow accepts in a metric name
STAGES = ("retrieval", "rankers", "compile", "evaluate", "register")


# --- stages ------------------------------------------------------------------------------------
def stage_retrieval(paths: Paths, dataset: str, cfg: TrainConfig) -> dict[str, Any]:
    from training.retrieval.towers import TowerConfig
    from training.retrieval.train import train_retrieval

    stage = staging_dir(paths, dataset)
    tower = TowerConfig(value_weight=cfg.retrieval_value_weight)
    report = train_retrieval(paths.home, dataset, stage, seed=cfg.seed, config=tower)
    return {**report, **write_serving_files(paths, dataset, stage)}


def write_serving_files(paths: Paths, dataset: str, out_dir: Path) -> dict[str, Any]:
    """The bundle's catalogue (``contract.catalog``) from the dataset's items and sellers, and
    its heuristic (``contract.heuristic``): the simulator's logging-policy parameters, the
    defaults for real data."""
    from contract import columns as C
    from contract.catalog import Catalog
    from contract.heuristic import RECENCY_DAYS, Heuristic
    from training.stages import read_meta
    from training.tables import read_tables

    tables = read_tables(paths.raw(dataset), [C.ITEMS, C.SELLERS])
    catalog = Catalog.from_tables(tables[C.ITEMS], tables[C.SELLERS])
    out_dir.mkdir(parents=True, exist_ok=True)
    catalog.save(out_dir / B.CATALOG)
    config = read_meta(paths, dataset).get("config") or {}
    heuristic = Heuristic(recency_days=float(config.get("recency_days", RECENCY_DAYS)))
    heuristic.save(out_dir / B.HEURISTIC)
    return {"catalog_items": len(catalog), "heuristic": heuristic.to_dict()}


def stage_rankers(paths: Paths, dataset: str, cfg: TrainConfig) -> dict[str, Any]:
    """Tune + train the purchase model and LambdaMART, calibrate, score valid and test."""
    from training import metrics as M
    from training.ranking.models import RankerBudget
    from training.ranking.train import ranking_data, read_split, save, train_rankers

    _rankers_fit(paths, dataset)
    budget = RankerBudget(
        trials=cfg.ranker_trials, seconds=cfg.ranker_seconds, two_stage=cfg.two_stage
    )
    result = train_rankers(
        paths.home, dataset, seed=cfg.seed, budget=budget, evidence_kappa=cfg.evidence_kappa
    )
    save(result, staging_dir(paths, dataset))
    metrics: dict[str, Any] = dict(result.metrics)
    # reliability of p(purchase) on the test days, before and after calibration
    test = ranking_data(read_split(paths.home, dataset, "test"))
    raw = result.models.raw_purchase_probability(test.X)
    curves = {}
    for name, p in (("before", raw), ("after", result.models.calibrator.apply(raw))):
        curve = M.reliability_curve(test.purchase, p, test.sample_weight)
        curves[name] = {
            "predicted": curve.mean_predicted.tolist(),
            "observed": curve.observed_rate.tolist(),
        }
    metrics["reliability_test"] = curves
    return metrics


def _rankers_fit(paths: Paths, dataset: str) -> None:
    """The rankers stage's check before it reads a split: ``training.memory.rankers_bytes``
    from the splits' Parquet metadata against the memory available."""
    import pyarrow.parquet as pq

    from contract import columns as C
    from contract.features import FEATURE_SCHEMA
    from training.memory import REDUCE_RANKERS, rankers_bytes, require_fits

    folder = paths.training_sets(dataset)
    files = [folder / f"{split}.parquet" for split in C.SPLITS]
    if not all(f.exists() for f in files):
        return  # train_rankers says which split is missing
    metas = [pq.ParquetFile(f).metadata for f in files]
    rows = sum(m.num_rows for m in metas)
    columns = max(m.num_columns for m in metas)
    parts = rankers_bytes(rows, columns, len(FEATURE_SCHEMA.names))
    require_fits("rankers", parts, REDUCE_RANKERS)


def stage_compile(paths: Paths, dataset: str, cfg: TrainConfig) -> dict[str, Any]:
    """Compile the purchase model [and its click stage] with TL2cgen (quantized); refuse it
    unless predictions match LightGBM to 1e-6 on held-out rows; time 500-candidate scoring
    against LightGBM, and the whole served p."""
    from contract.features import build_matrix
    from training.ranking.compile import compile_for_bundle

    stage = staging_dir(paths, dataset)
    model = stage / B.PURCHASE_MODEL
    if not model.exists():
        raise FileNotFoundError(f"{model} missing: run `homefeed train --stage rankers` first")
    valid = pd.read_parquet(paths.training_sets(dataset) / "valid.parquet")
    rows = np.random.default_rng(cfg.seed).permutation(len(valid))[:20_000]
    click = stage / B.CLICK_MODEL
    return compile_for_bundle(
        model,
        stage,
        build_matrix(valid.iloc[np.sort(rows)]),
        click_model_path=click if click.exists() else None,
    )


def stage_evaluate(paths: Paths, dataset: str, cfg: TrainConfig) -> dict[str, Any]:
    from training.evaluate import evaluate

    return evaluate(paths, dataset, staging_dir(paths, dataset), cfg)


def stage_register(paths: Paths, dataset: str, cfg: TrainConfig) -> dict[str, Any]:
    from contract.bundle import write_manifest
    from contract.registry import Registry
    from training.evaluate import reports_dir

    stage = staging_dir(paths, dataset)
    schema = json.loads((stage / B.FEATURE_SCHEMA).read_text())
    manifest = read_manifest(paths, dataset)
    version = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"-{dataset}"
    target = paths.artifacts / "bundles" / version
    simulated = paths.ground_truth(dataset).joinpath("ground_truth.npz").exists()
    published = reports_dir(paths, dataset, simulated) / "eval.json"
    _stamp_eval_reports(version, stage / B.EVAL_DIR / "eval.json", published)
    shutil.copytree(stage, target, ignore=shutil.ignore_patterns(STAGE_REPORT))
    reports = read_stage_reports(stage)
    metrics = _flat_metrics(reports.get("evaluate", {}))
    snapshot = f"{dataset}:{manifest['split']['train_start']}..{manifest['split']['test_end']}"
    label = manifest.get("label") or {"kind": B.LABEL_PURCHASE}  # sets from before the choice
    window = label.get("window_days", B.DEFAULT_LABEL_WINDOW_DAYS)
    write_manifest(
        target,
        version=version,
        data_snapshot=snapshot,
        feature_schema_hash=schema["hash"],
        metrics=metrics,
        label=B.label_entry(label["kind"], window),
    )
    registry = Registry()
    number = registry.register(target, metrics=metrics, params={"dataset": dataset, **asdict(cfg)})
    aliases = [B.ALIAS_CHALLENGER]
    try:
        registry.get_version(B.ALIAS_CHAMPION)
    except Exception:  # no champion yet: the first bundle serves
        registry.set_alias(number, B.ALIAS_CHAMPION)
        aliases.append(B.ALIAS_CHAMPION)
    return {
        "bundle_version": version,
        "registry_version": number,
        "aliases": aliases,
        "path": str(target),
    }


def _stamp_eval_reports(version: str, *reports: Path) -> None:
    """Name the bundle in the evaluation reports (eval.json and eval.md, written before the
    bundle had a version)."""
    from training.report import write_report

    for path in reports:
        if path.exists():
            report = json.loads(path.read_text())
            report["bundle_version"] = version
            write_report(report, path.parent)


def _flat_metrics(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in report.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_metrics(value, name + "."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[_METRIC_NAME.sub("_", name.replace("@", "_at_"))] = float(value)
    return out


RUNNERS = {
    "retrieval": stage_retrieval,
    "rankers": stage_rankers,
    "compile": stage_compile,
    "evaluate": stage_evaluate,
    "register": stage_register,
}


def train(
    paths: Paths, dataset: str, stages: tuple[str, ...] = STAGES, cfg: TrainConfig | None = None
) -> dict[str, Any]:
    """Run ``stages`` in order; returns each stage's report and its seconds."""
    cfg = cfg or TrainConfig()
    read_manifest(paths, dataset)  # fail early, with the command to run
    from training.dataset import check_label

    check_label(paths.training_sets(dataset))  # a single-class label: nothing to learn
    unknown = [s for s in stages if s not in RUNNERS]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    stage = staging_dir(paths, dataset)
    stage.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    peaks = StagePeaks()
    for name in stages:
        t0 = time.perf_counter()
        log.info("train %s: %s", dataset, name)
        with peaks.measure(name):
            report = RUNNERS[name](paths, dataset, cfg)
        report = {**report, "seconds": time.perf_counter() - t0, "peak_rss_mb": peaks.peaks[name]}
        save_stage_report(stage, name, report)
        results[name] = report
    if "evaluate" in stages:
        _record_peaks(paths, dataset, peaks)
    return results


def _record_peaks(paths: Paths, dataset: str, peaks: StagePeaks) -> None:
    """Add the training stages' peak resident memory to the published eval.json/eval.md."""
    from training.evaluate import reports_dir
    from training.report import write_report

    simulated = paths.ground_truth(dataset).joinpath("ground_truth.npz").exists()
    path = reports_dir(paths, dataset, simulated) / "eval.json"
    if path.exists():
        report = json.loads(path.read_text())
        report.update(peaks.report())
        write_report(report, path.parent)
