"""Issue 3's ranking stage: train, calibrate, evaluate and save the rankers of a dataset.

``train_rankers(home, dataset)`` reads ``<home>/data/<dataset>/training/{train,valid,test}``
and the items table (for margins), tunes the purchase model and LambdaMART on train/valid
(``models.py``), calibrates the purchase model on valid, fits the logistic baseline, and
scores everything on valid and test. The "purchase" model and its figures are those of the
training set's label (``metrics["label"]``): with ``homefeed dataset --label click`` they are
p(click), and ``purchase_egmv`` ranks by expected clicked value, not GMV. A label with a
single class in any split stops it before anything is fitted. ``save`` writes the ranker
files of a bundle (``contract/bundle.py`` layout); ``load`` reads them back.

Metrics (``metrics[split][model][name]``; splits ``valid`` and ``test``):

- ranking, over requests with a relevant row, graded relevance 3/2/1/0: ``ndcg@20``,
  ``ndcg@20_ips`` (gains times the IPS weight, per-request average) and
  ``ndcg@20_ips_total`` (the same, sum-over-sum: the form that tracks the Oracle; see
  ``training.metrics.ndcg_at_k``), ``recall@20``. Models: ``lambdamart``, ``purchase_egmv``
  (calibrated p x price x margin), ``logreg_egmv``, ``popularity``, ``heuristic``,
  ``random``.
- probability of the label (weighted by ``sample_weight``): ``auc``, ``log_loss``, ``pr_auc``,
  ``ece`` (10 equal-mass bins) before and after calibration, for ``purchase`` and
  ``logreg``. The calibrator is fitted on valid, so valid's calibrated figures are in-sample.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from contract import bundle
from contract import columns as C
from contract.calibration import Calibrator
from contract.features import FEATURE_SCHEMA, FeatureSchema, build_matrix
from contract.paths import Paths
from contract.scorer import EVIDENCE_KAPPA, EvidenceShrink, LinearOffset
from training import metrics as M
from training.dataset import IPS_WEIGHT, LABEL, check_label
from training.ranking import ablation
from training.ranking import baselines as B
from training.ranking.calibration import fit_isotonic
from training.ranking.models import (
    CLICK,
    LAMBDAMART,
    PURCHASE,
    RankerBudget,
    RankingData,
    Search,
    boosted,
    click_stage,
    conversion_stage,
    relevance,
    tune_lambdamart,
    tune_purchase,
    two_stage_probability,
    two_stage_reason,
)
from training.tables import read_tables

log = logging.getLogger(__name__)

REPORT_K = 20
EVAL_SPLITS = ("valid", "test")
ECE_BINS = 10


@dataclass
class RankerModels:
    """What a bundle's ``ranker/`` holds, plus the feature schema they were trained on."""

    purchase: lgb.Booster
    lambdamart: lgb.Booster
    calibrator: Calibrator
    schema: FeatureSchema
    offset: LinearOffset | None = None  # the log-odds the purchase trees were boosted from
    evidence: EvidenceShrink | None = None  # the served E[GMV]'s shrink (None: no file)
    # the two-stage model's click stage (None: one stage); ``purchase`` is then p(label |
    # click), learned on clicked rows
    click: lgb.Booster | None = None
    click_offset: LinearOffset | None = None

    def raw_purchase_probability(self, X: np.ndarray) -> np.ndarray:
        return two_stage_probability(self.purchase, self.offset, self.click, self.click_offset, X)

    def purchase_probability(self, X: np.ndarray) -> np.ndarray:
        """Calibrated P(label | shown): P(purchase within 7 days | shown) by default."""
        return self.calibrator.apply(self.raw_purchase_probability(X))

    def rank_score(self, X: np.ndarray) -> np.ndarray:
        """LambdaMART score: only the order within a request means anything."""
        return np.asarray(self.lambdamart.predict(X))


@dataclass
class RankerResult:
    models: RankerModels
    logreg: B.LogisticBaseline
    metrics: dict[str, Any] = field(default_factory=dict)
    ablations: dict[str, ablation.AblatedModel] = field(default_factory=dict)

    @property
    def purchase(self) -> lgb.Booster:
        return self.models.purchase

    @property
    def lambdamart(self) -> lgb.Booster:
        return self.models.lambdamart

    @property
    def calibrator(self) -> Calibrator:
        return self.models.calibrator

    @property
    def schema(self) -> FeatureSchema:
        return self.models.schema


def read_split(home: Path, dataset: str, split: str) -> pd.DataFrame:
    """A training-set split with its rows sorted by request (stable: slot order kept)."""
    path = Paths(Path(home)).training_sets(dataset) / f"{split}.parquet"
    if not path.exists():
        raise FileNotFoundError(
            f"training split {path} not found: run `homefeed dataset` for {dataset!r} first"
        )
    frame = pd.read_parquet(path)
    return frame.sort_values(C.REQUEST_ID, kind="stable").reset_index(drop=True)


def read_split_sample(
    home: Path, dataset: str, split: str, max_rows: int, seed: int = 0
) -> pd.DataFrame:
    """At most about ``max_rows`` rows of a split (``read_split``'s order), a uniform sample
    of rows (weights kept:
    a pointwise model fitted on it estimates what it would on all of them), read 500k rows
    at a time so the whole split is never in memory."""
    path = Paths(Path(home)).training_sets(dataset) / f"{split}.parquet"
    if not path.exists():
        raise FileNotFoundError(
            f"training split {path} not found: run `homefeed dataset` for {dataset!r} first"
        )
    source = pq.ParquetFile(path)
    share = min(1.0, max_rows / max(source.metadata.num_rows, 1))
    if share >= 1.0:
        return read_split(home, dataset, split)
    rng = np.random.default_rng(seed)
    parts = [
        batch.filter(pa.array(rng.random(batch.num_rows) < share)).to_pandas()
        for batch in source.iter_batches(batch_size=500_000)
    ]
    frame = pd.concat(parts, ignore_index=True)
    return frame.sort_values(C.REQUEST_ID, kind="stable").reset_index(drop=True)


def ranking_data(frame: pd.DataFrame) -> RankingData:
    """A split's arrays; the binary label is the training set's chosen one (its ``LABEL``
    column; the purchase label in training sets built before the label was a choice)."""
    return RankingData(
        X=build_matrix(frame),
        request_id=frame[C.REQUEST_ID].to_numpy(np.int64),
        relevance=relevance(frame),
        label=frame[LABEL if LABEL in frame else C.LABEL_PURCHASE].to_numpy(np.int64),
        sample_weight=frame[C.WEIGHT].to_numpy(np.float64),
        ips_weight=frame[IPS_WEIGHT].to_numpy(np.float64),
        feature_names=list(FEATURE_SCHEMA.names),
        clicked=frame[C.LABEL_CLICK].to_numpy(np.int64) if C.LABEL_CLICK in frame else None,
    )


def item_margins(items: pd.DataFrame, item_ids: np.ndarray) -> np.ndarray:
    """Margin (share of price) of each item id, from the items table."""
    margin = pd.Series(items[C.MARGIN].to_numpy(), index=items[C.ITEM_ID].to_numpy())
    out = margin.reindex(np.asarray(item_ids)).to_numpy(np.float64)
    if np.isnan(out).any():
        raise ValueError(f"{int(np.isnan(out).sum())} training rows have an item not in items")
    return out


def ranking_metrics(data: RankingData, scores: np.ndarray, k: int = REPORT_K) -> dict[str, float]:
    rel, g, ips = data.relevance, data.request_id, data.ips_weight
    return {
        f"ndcg@{k}": M.ndcg_at_k(rel, scores, g, k),
        f"ndcg@{k}_ips": M.ndcg_at_k(rel, scores, g, k, ips),
        f"ndcg@{k}_ips_total": M.ndcg_at_k(rel, scores, g, k, ips, average="total"),
        f"recall@{k}": M.recall_at_k(rel, scores, g, k),
    }


def probability_metrics(
    y: np.ndarray, p: np.ndarray, w: np.ndarray, suffix: str = ""
) -> dict[str, float]:
    out = {
        "auc": M.auc(y, p, w),
        "log_loss": M.log_loss(y, p, w),
        "pr_auc": M.pr_auc(y, p, w),
        "ece": M.expected_calibration_error(y, p, w, ECE_BINS),
        "mean_p": float(np.average(p, weights=w)),
        "rate": float(np.average(y, weights=w)),
    }
    return {f"{k}{suffix}": v for k, v in out.items()}


def evaluate(
    models: RankerModels,
    logreg: B.LogisticBaseline,
    frame: pd.DataFrame,
    data: RankingData,
    margin: np.ndarray,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Every model's ranking and probability figures on one split."""
    y, w = data.label, data.sample_weight
    raw = models.raw_purchase_probability(data.X)
    cal = models.calibrator.apply(raw)
    lr = logreg.predict(data.X)
    price = frame[C.PRICE].to_numpy(np.float64)
    rng = np.random.default_rng(seed)
    low, high = M.auc_interval(y, cal, data.request_id, w, seed=seed)
    return {
        "purchase": {
            **probability_metrics(y, raw, w),
            **probability_metrics(y, cal, w, "_calibrated"),
            # 95 %, a bootstrap over requests (rows of a request are not independent)
            "auc_calibrated_ci_low": low,
            "auc_calibrated_ci_high": high,
        },
        "logreg": probability_metrics(y, lr, w),
        LAMBDAMART: ranking_metrics(data, models.rank_score(data.X)),
        "purchase_egmv": ranking_metrics(data, cal * price * margin),
        "logreg_egmv": ranking_metrics(data, lr * price * margin),
        "popularity": ranking_metrics(data, B.popularity_score(frame)),
        "heuristic": ranking_metrics(data, B.heuristic_score(frame)),
        "random": ranking_metrics(data, rng.random(len(y))),
    }


def train_rankers(
    home: Path,
    dataset: str,
    seed: int = 0,
    budget: RankerBudget | None = None,
    evidence_kappa: float = EVIDENCE_KAPPA,
) -> RankerResult:
    """Tune, calibrate and evaluate both rankers and the logistic baseline on a dataset.
    ``evidence_kappa``: the served E[GMV]'s :class:`EvidenceShrink` (0: none)."""
    budget = budget or RankerBudget()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    label = check_label(Paths(Path(home)).training_sets(dataset))
    frames = {s: read_split(home, dataset, s) for s in C.SPLITS}
    data = {s: ranking_data(f) for s, f in frames.items()}
    data["train"] = data["train"].sample_requests(budget.train_fraction, seed)
    items = read_tables(Paths(Path(home)).raw(dataset), [C.ITEMS])[C.ITEMS]
    margins = {s: item_margins(items, frames[s][C.ITEM_ID].to_numpy()) for s in EVAL_SPLITS}
    seconds["load"] = time.perf_counter() - t0
    log.info("%s: rows %s", dataset, {s: len(d.X) for s, d in data.items()})

    t = time.perf_counter()
    train = data["train"]
    logreg = B.LogisticBaseline.fit(train.X, train.label, train.sample_weight)
    one_stage = two_stage_reason(data["train"], data["valid"], budget)
    seconds["logreg"] = time.perf_counter() - t

    t = time.perf_counter()
    click: Search | None = None
    click_offset: LinearOffset | None = None
    if one_stage is None:
        # p(click) boosted from its own linear offset, x p(label | click) from 0 (with an
        # offset the conversion stage earned less on sim-small: tools.bench_two_stage)
        click_train, click_valid, click_offset = boosted(
            click_stage(data["train"]), click_stage(data["valid"]), budget
        )
        click = tune_purchase(click_train, click_valid, budget, seed, name=CLICK)
        seconds["click"] = time.perf_counter() - t
        t = time.perf_counter()
        offset = None
        purchase = tune_purchase(
            conversion_stage(data["train"]), conversion_stage(data["valid"]), budget, seed
        )
    else:
        log.info("%s: the purchase model is one stage: %s", dataset, one_stage)
        one_train, one_valid, offset = boosted(data["train"], data["valid"], budget)
        purchase = tune_purchase(one_train, one_valid, budget, seed)
    seconds["purchase"] = time.perf_counter() - t
    t = time.perf_counter()
    ablations = ablation.train_ablations(
        data["train"],
        data["valid"],
        purchase.best.params,
        budget,
        seed,
        click_params=None if click is None else click.best.params,
    )
    seconds["ablations"] = time.perf_counter() - t
    t = time.perf_counter()
    ranker = tune_lambdamart(data["train"], data["valid"], budget, seed)
    seconds["lambdamart"] = time.perf_counter() - t

    t = time.perf_counter()
    valid = data["valid"]
    click_booster = None if click is None else click.best.booster
    raw_valid = two_stage_probability(
        purchase.best.booster, offset, click_booster, click_offset, valid.X
    )
    calibrator = fit_isotonic(raw_valid, valid.label, valid.sample_weight)
    seconds["calibration"] = time.perf_counter() - t

    evidence = EvidenceShrink.for_schema(FEATURE_SCHEMA.names, evidence_kappa)
    models = RankerModels(
        purchase.best.booster,
        ranker.best.booster,
        calibrator,
        FEATURE_SCHEMA,
        offset,
        evidence,
        click_booster,
        click_offset,
    )
    t = time.perf_counter()
    metrics: dict[str, Any] = {
        s: evaluate(models, logreg, frames[s], data[s], margins[s], seed) for s in EVAL_SPLITS
    }
    train_auc = M.auc(train.label, models.raw_purchase_probability(train.X), train.sample_weight)
    metrics["purchase_auc_train"] = train_auc
    metrics["purchase_auc_gap"] = train_auc - metrics["valid"]["purchase"]["auc"]
    seconds["evaluate"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    metrics["label"] = {
        "kind": label["kind"],
        "window_days": label["window_days"],
        "score": bundle.score_meaning(label["kind"]),
    }
    metrics["search"] = {PURCHASE: purchase.summary(), LAMBDAMART: ranker.summary()}
    metrics["best_params"] = {PURCHASE: purchase.best.params, LAMBDAMART: ranker.best.params}
    metrics["two_stage"] = {"on": click is not None, "why_not": one_stage}
    if click is not None:
        metrics["search"][CLICK] = click.summary()
        metrics["best_params"][CLICK] = click.best.params
    metrics["rows"] = {s: len(d.X) for s, d in data.items()}
    metrics["budget"] = {k: v for k, v in budget.__dict__.items() if k != "progress"}
    metrics["features"] = list(FEATURE_SCHEMA.names)
    metrics["feature_schema_hash"] = FEATURE_SCHEMA.hash
    metrics["seed"] = seed
    metrics["linear_offset"] = (offset if click is None else click_offset) is not None
    metrics["evidence_shrink"] = evidence.to_dict()
    metrics["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    log.info("rankers for %s in %.1fs", dataset, seconds["total"])
    return RankerResult(models, logreg, metrics, ablations)


def write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_feature_schema(schema: FeatureSchema, path: Path) -> None:
    write_json(schema.to_dict(), path)


def write_calibrator(calibrator: Calibrator, path: Path) -> None:
    write_json(calibrator.to_dict(), path)


def save(result: RankerResult | RankerModels, out_dir: Path) -> dict[str, Path]:
    """Write the ranker files of a bundle under ``out_dir``; returns bundle path -> file."""
    models = result.models if isinstance(result, RankerResult) else result
    out_dir = Path(out_dir)
    paths = {
        name: out_dir / name
        for name in (
            bundle.PURCHASE_MODEL,
            bundle.LAMBDAMART_MODEL,
            bundle.CALIBRATOR,
            bundle.FEATURE_SCHEMA,
        )
    }
    paths[bundle.PURCHASE_MODEL].parent.mkdir(parents=True, exist_ok=True)
    # a file an earlier run wrote that this model has none of would be read with it (a
    # one-stage offset with two-stage trees, an old click stage with one-stage trees)
    for name in (
        bundle.LINEAR_OFFSET,
        bundle.EVIDENCE,
        bundle.CLICK_MODEL,
        bundle.CLICK_COMPILED,
        bundle.CLICK_OFFSET,
    ):
        (out_dir / name).unlink(missing_ok=True)
    models.purchase.save_model(str(paths[bundle.PURCHASE_MODEL]))
    models.lambdamart.save_model(str(paths[bundle.LAMBDAMART_MODEL]))
    write_calibrator(models.calibrator, paths[bundle.CALIBRATOR])
    write_feature_schema(models.schema, paths[bundle.FEATURE_SCHEMA])
    if models.offset is not None:
        paths[bundle.LINEAR_OFFSET] = out_dir / bundle.LINEAR_OFFSET
        write_json(models.offset.to_dict(), paths[bundle.LINEAR_OFFSET])
    if models.evidence is not None:
        paths[bundle.EVIDENCE] = out_dir / bundle.EVIDENCE
        write_json(models.evidence.to_dict(), paths[bundle.EVIDENCE])
    if models.click is not None:
        paths[bundle.CLICK_MODEL] = out_dir / bundle.CLICK_MODEL
        models.click.save_model(str(paths[bundle.CLICK_MODEL]))
        if models.click_offset is not None:
            paths[bundle.CLICK_OFFSET] = out_dir / bundle.CLICK_OFFSET
            write_json(models.click_offset.to_dict(), paths[bundle.CLICK_OFFSET])
    if isinstance(result, RankerResult) and result.ablations:
        ablation.save(result.ablations, out_dir)
    return paths


def load(out_dir: Path) -> RankerModels:
    """Read what :func:`save` wrote. The schema is returned as stored; serving compares it
    with the code's (``build_matrix(..., schema=...)`` raises on a mismatch)."""
    out_dir = Path(out_dir)
    schema = FeatureSchema.from_dict(json.loads((out_dir / bundle.FEATURE_SCHEMA).read_text()))
    calibrator = Calibrator.from_dict(json.loads((out_dir / bundle.CALIBRATOR).read_text()))
    purchase = lgb.Booster(model_file=str(out_dir / bundle.PURCHASE_MODEL))
    lambdamart = lgb.Booster(model_file=str(out_dir / bundle.LAMBDAMART_MODEL))
    for name, booster in (("purchase", purchase), ("lambdamart", lambdamart)):
        if booster.num_feature() != len(schema):
            raise ValueError(
                f"{name} model has {booster.num_feature()} features, feature_schema.json "
                f"lists {len(schema)}"
            )
    offset = LinearOffset.read(out_dir / bundle.LINEAR_OFFSET)
    if offset is not None:
        offset.require_width(len(schema), "feature_schema.json lists")
    evidence = EvidenceShrink.read(out_dir / bundle.EVIDENCE, schema.names)
    click = None
    if (out_dir / bundle.CLICK_MODEL).exists():
        click = lgb.Booster(model_file=str(out_dir / bundle.CLICK_MODEL))
        if click.num_feature() != len(schema):
            raise ValueError(
                f"click model has {click.num_feature()} features, feature_schema.json lists "
                f"{len(schema)}"
            )
    click_offset = LinearOffset.read(out_dir / bundle.CLICK_OFFSET)
    return RankerModels(
        purchase, lambdamart, calibrator, schema, offset, evidence, click, click_offset
    )
