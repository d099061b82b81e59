"""The evaluation stage: offline metrics, and (on simulated data) every policy scored by the
Oracle, into ``reports/eval.json``, ``reports/eval.md`` and plots, and the bundle's eval/.

The test days are read here for the first time: tuning and calibration used train and
validation only.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from contract import bundle as B
from contract import columns as C
from contract.content import PROFILE_SHARE
from contract.paths import Paths
from training.retrieval.evaluate import explain_uncomputable
from training.stages import held_out_period, read_checkout_carts, read_manifest
from training.tables import RowsById

if TYPE_CHECKING:
    from training.staging import TrainConfig

log = logging.getLogger(__name__)

TARGET_UPLIFT_OVER_HEURISTIC = 0.15
TARGET_SHARE_OF_OPTIMAL = 0.80
TARGET_ECE = 0.01
HEAVY_USER_CLICKS_30D = 5
# real-data evaluations a simulator report quotes: report section -> dataset name
REAL_DATA_SECTIONS = {"complete_journey": "completejourney"}
TARGET_REAL_RECALL_RATIO = 1.5  # served recall@500 over popularity's (issue 13)


def reports_dir(paths: Paths, dataset: str, simulated: bool) -> Path:
    """Simulator runs write ``reports/``; a real dataset writes ``reports/<dataset>/`` so it
    never overwrites the simulator's report."""
    return paths.reports if simulated else paths.reports / dataset


def real_data_section(paths: Paths, dataset: str) -> dict[str, Any] | None:
    """The headline figures of a real dataset's evaluation, when it has been run."""
    path = reports_dir(paths, dataset, simulated=False) / "eval.json"
    if not path.exists():
        return None
    real = json.loads(path.read_text())
    retrieval = real.get("retrieval", {})
    ranking = real.get("ranking", {})
    # recall of next-period purchases (the data has no clicks)
    recall = (retrieval.get("recall_at_500") or {}).get("purchase")
    popular = (retrieval.get("popularity_recall_at_500") or {}).get("purchase")
    return {
        "dataset": dataset,
        "recall_at_500": recall,
        "popularity_recall_at_500": popular,
        "recall_ratio_vs_popularity": recall / popular if recall and popular else None,
        "recall_ratio_target": TARGET_REAL_RECALL_RATIO,
        "auc": ranking.get("auc"),
        "auc_ci_low": ranking.get("auc_ci_low"),
        "auc_ci_high": ranking.get("auc_ci_high"),
        "logloss": ranking.get("logloss"),
        "auc_negatives": "sampled by train-period purchase popularity",
        "test_rows": real.get("test_rows"),
    }


class ItemValue:
    """price x margin of items by id: what a purchase is worth, E[GMV] = p x this."""

    def __init__(self, items: pd.DataFrame):
        self._index = pd.Index(items[C.ITEM_ID].to_numpy())
        self._value = items[C.PRICE].to_numpy() * items[C.MARGIN].to_numpy()

    def __call__(self, item_ids: np.ndarray) -> np.ndarray:
        return np.asarray(self._value[self._index.get_indexer(pd.Index(item_ids))])


class ServedScorer:
    """The served score from a staging folder: compiled p(purchase) [with the bundle's linear
    offset] [x the click stage's p] -> isotonic -> E[GMV]."""

    def __init__(self, stage: Path, items: pd.DataFrame):
        from contract.calibration import Calibrator
        from contract.features import FEATURE_SCHEMA
        from contract.scorer import EvidenceShrink, load_purchase_model

        self.scorer = load_purchase_model(stage)
        self.calibrator = Calibrator.from_dict(json.loads((stage / B.CALIBRATOR).read_text()))
        self.value = ItemValue(items)
        self.evidence = EvidenceShrink.read(stage / B.EVIDENCE, FEATURE_SCHEMA.names)

    def unshrunk(self, X: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """p x price x margin, before the evidence shrink."""
        return np.asarray(self.calibrator.apply(self.scorer.predict(X)) * self.value(item_ids))

    def egmv(self, X: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """The served score: ``unshrunk`` [x the bundle's evidence shrink]."""
        return self.shrunk(X, self.unshrunk(X, item_ids))

    def shrunk(self, X: np.ndarray, egmv: np.ndarray) -> np.ndarray:
        """``egmv`` times the bundle's evidence shrink of each row (unchanged without one)."""
        return egmv if self.evidence is None else self.evidence.apply(X, egmv)

    def scored_by(
        self, probability: Callable[[np.ndarray], np.ndarray]
    ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """The served score with ``probability(X)`` in place of the served calibrated
        p(purchase): x price x margin [x the bundle's evidence shrink]. How a refitted or
        ablated purchase model is scored on the served ranker's terms."""

        def egmv(X: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
            return self.shrunk(X, np.asarray(probability(X)) * self.value(item_ids))

        return egmv


class CandidateCache:
    """Retrieval candidates per request, filtered (listed, in stock), computed once and shared
    by every policy that re-ranks them; and their feature matrix, joined once per request
    group (the replay asks every policy for the same group in turn)."""

    def __init__(self, retriever, items: pd.DataFrame, n_candidates: int):
        self.retriever = retriever
        self.items = items
        self.item_index = pd.Index(items[C.ITEM_ID].to_numpy())
        self.n = n_candidates
        self._cache: dict[int, np.ndarray] = {}
        self._joined: tuple[tuple[int, ...], list[np.ndarray], np.ndarray, np.ndarray] | None = None

    def features(
        self, requests: pd.DataFrame, state, store
    ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """(candidates per request, their ``build_matrix`` rows, their item ids), the
        request-time Feast join done once for the last group asked."""
        from contract.features import build_matrix
        from training.request_features import features_for_pairs, pair_frame

        key = tuple(int(r) for r in requests[C.REQUEST_ID])
        if self._joined is None or self._joined[0] != key:
            filtered = self(requests, state)
            frame = features_for_pairs(store, pair_frame(requests, filtered), self.items)
            self._joined = (key, filtered, build_matrix(frame), frame[C.ITEM_ID].to_numpy())
        return self._joined[1], self._joined[2], self._joined[3]

    def __call__(self, requests: pd.DataFrame, state) -> list[np.ndarray]:
        missing = requests[~requests[C.REQUEST_ID].isin(list(self._cache))]
        if len(missing):
            for rid, c in zip(missing[C.REQUEST_ID], self.retriever(missing, self.n), strict=True):
                idx = self.item_index.get_indexer(pd.Index(c))
                ok = (idx >= 0) & state.eligible[np.maximum(idx, 0)]
                self._cache[int(rid)] = np.asarray(c)[ok]
        return [self._cache[int(rid)] for rid in requests[C.REQUEST_ID]]


def _logreg_egmv(paths: Paths, dataset: str, items: pd.DataFrame):
    """The logistic-regression baseline's E[GMV] scorer, fitted on (at most
    ``LOGREG_MAX_ROWS`` rows sampled from) the train split."""
    from training.ranking.baselines import LogisticBaseline
    from training.ranking.train import ranking_data, read_split_sample

    train = ranking_data(read_split_sample(paths.home, dataset, "train", LOGREG_MAX_ROWS))
    model = LogisticBaseline.fit(train.X, train.purchase, train.sample_weight)
    value = ItemValue(items)

    def egmv(X: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict(X) * value(item_ids))

    return egmv


def _model_policy(
    store,
    candidates: CandidateCache,
    score_fn,
    record: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
):
    """A policy: retrieval candidates, hard filters, request-time features, E[GMV] order.
    ``record`` keeps each request's order and scores (request id -> (items, scores))."""

    def policy(requests: pd.DataFrame, state) -> list[np.ndarray]:
        filtered, X, item_ids = candidates.features(requests, state, store)
        scores = score_fn(X, item_ids)
        out, start = [], 0
        for rid, c in zip(requests[C.REQUEST_ID], filtered, strict=True):
            s = scores[start : start + len(c)]
            order = np.argsort(-s, kind="stable")
            out.append(np.asarray(c)[order])
            if record is not None:
                record[int(rid)] = (out[-1], s[order])
            start += len(c)
        return out

    return policy


def _oracle_over_candidates(oracle, candidates: CandidateCache, k: int):
    """The Oracle's best order of the very candidates the ranker sees: splits the gap to the
    catalogue optimum into what retrieval misses and what ranking misses."""

    def policy(requests: pd.DataFrame, state) -> list[np.ndarray]:
        return [
            oracle.optimal(int(u), c, k, objective="margin", at=pd.Timestamp(t))
            for u, t, c in zip(
                requests[C.USER_ID], requests[C.TS], candidates(requests, state), strict=True
            )
        ]

    return policy


PROFILE_SHARE_WHEN_ON = 0.5  # the PROFILE source's share when the ablation switches it on
ABLATION = "ablation:"  # policy-name prefix of a lever switched off alone


def _ablation_policies(
    paths, dataset, stage, store, retriever, candidates, served, oracle, tables, cfg
) -> dict[str, Any]:
    """Each lever switched off alone (``training.ranking.ablation``), as a policy the replay
    scores on the same requests as the served ranker: the model levers' refitted purchase
    models, the calibration off, the evidence shrink off (when the bundle has one), the
    PROFILE retrieval source flipped from its served setting and the index's value column
    off (when the bundle has one), each with the Oracle's best order of those
    candidates."""
    from training.ranking import ablation
    from training.retrieval.retriever import Retriever

    items = tables[C.ITEMS]
    out: dict[str, Any] = {}
    # the served evidence shrink stays on every other lever's policy
    for lever, model in ablation.load(stage).items():
        egmv = served.scored_by(model.egmv_probability)
        out[ABLATION + lever] = _model_policy(store, candidates, egmv)
    uncalibrated = served.scored_by(served.scorer.predict)
    out[ABLATION + "calibration"] = _model_policy(store, candidates, uncalibrated)
    if served.evidence is not None and served.evidence.kappa > 0:
        out[ABLATION + "evidence_shrink"] = _model_policy(store, candidates, served.unshrunk)
    flipped = 0.0 if retriever.profile_share > 0 else PROFILE_SHARE_WHEN_ON
    other = Retriever(stage, retriever.store, paths, dataset, retriever.items, flipped)
    flipped_candidates = CandidateCache(other, items, cfg.candidates)
    out[ABLATION + "profile_candidates"] = _model_policy(store, flipped_candidates, served.egmv)
    out[ABLATION + "profile_candidates:optimal_over_candidates"] = _oracle_over_candidates(
        oracle, flipped_candidates, cfg.k
    )
    if retriever.value_columns and retriever.value_weight != 0:
        taste = Retriever(
            stage,
            retriever.store,
            paths,
            dataset,
            retriever.items,
            retriever.profile_share,
            value_weight=0.0,
        )
        taste_candidates = CandidateCache(taste, items, cfg.candidates)
        out[ABLATION + "retrieval_value"] = _model_policy(store, taste_candidates, served.egmv)
        out[ABLATION + "retrieval_value:optimal_over_candidates"] = _oracle_over_candidates(
            oracle, taste_candidates, cfg.k
        )
    return out


def _ablation_section(summary: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Moves the ablation policies out of ``summary`` (and ``values``) into the report's
    ``ablation``: per lever its E[GMV]/1k and the change against the served ranker."""
    from training.ranking.ablation import LEVERS

    served = summary["ranker"]["oracle_egmv_per_1k"]
    out: dict[str, Any] = {}
    for name in [n for n in summary if n.startswith(ABLATION)]:
        figures = summary.pop(name)
        values.pop(name, None)
        lever, _, part = name.removeprefix(ABLATION).partition(":")
        entry = out.setdefault(lever, {"what": LEVERS.get(lever, lever)})
        if lever == "profile_candidates":
            entry["what"] = (
                "retrieval without the PROFILE source"
                if PROFILE_SHARE > 0
                else f"retrieval with the PROFILE source switched on at {PROFILE_SHARE_WHEN_ON} "
                "(served: off, contract.content.PROFILE_SHARE)"
            )
        if part:
            entry[part] = figures["oracle_egmv_per_1k"]
            continue
        v = figures["oracle_egmv_per_1k"]
        entry.update(
            oracle_egmv_per_1k=v,
            change_vs_served=v / served - 1 if served else None,
            personalisation=figures.get("personalisation"),
        )
    return out


def segments(
    requests: pd.DataFrame, values: dict[str, Any], tables: dict[str, pd.DataFrame], k: int
) -> dict[str, Any]:
    """Ranker vs heuristic E[GMV] per 1k impressions by user segment."""
    users = tables[C.USERS].set_index(C.USER_ID)
    signup = users.loc[requests[C.USER_ID], C.SIGNUP_AT].to_numpy()
    new_user = (requests[C.TS].to_numpy() - signup) < np.timedelta64(30, "D")
    imp = tables[C.IMPRESSIONS]
    rows = RowsById(imp[C.IMPRESSION_ID].to_numpy(np.int64))(
        tables[C.CLICKS][C.IMPRESSION_ID].to_numpy(np.int64)
    )
    clicker = imp[C.USER_ID].to_numpy(np.int64)[rows[rows >= 0]]
    per_user = pd.Series(clicker).value_counts()
    heavy = per_user.reindex(requests[C.USER_ID]).fillna(0).to_numpy() >= HEAVY_USER_CLICKS_30D
    masks = {
        "new_users": new_user,
        "returning_users": ~new_user,
        "heavy_users": heavy,
        "light_users": ~heavy,
        "checkout": (requests[C.SURFACE] == "CHECKOUT").to_numpy(),
        "home": (requests[C.SURFACE] == "HOME").to_numpy(),
    }
    out: dict[str, Any] = {}
    for name, mask in masks.items():
        if not mask.any():
            continue
        out[name] = {"requests": int(mask.sum())}
        for policy in ("heuristic", "ranker", "optimal"):
            if policy in values:
                out[name][policy] = float(values[policy].egmv[mask].mean() * 1000 / k)
    return out


def _retrieval_section(retrieval: dict[str, Any], stage: Path) -> dict[str, Any]:
    """The retrieval stage's report, each figure it could not compute None with the reason
    in ``skipped`` (``training.retrieval.evaluate.explain_uncomputable``)."""
    popular_path = stage / B.POPULAR
    popular = json.loads(popular_path.read_text()) if popular_path.exists() else None
    return explain_uncomputable(retrieval, popular) if retrieval else {}


LOGREG_MAX_ROWS = 1_000_000  # 39 features: more rows would not move the fit, only memory
EVAL_IMPRESSION_COLUMNS = (
    C.IMPRESSION_ID,
    C.REQUEST_ID,
    C.USER_ID,
    C.ITEM_ID,
    C.TS,
    C.SURFACE,
    C.POLICY,  # organic sessions are not feed requests to replay
)


def ranker_ope_samples(
    paths: Paths, dataset: str, stage: Path, cfg: TrainConfig
) -> Callable[[int, int], dict[str, Any]] | None:
    """The ranker's off-policy estimates (``training.ope_eval.ranker_ope``) from a trained
    staging folder alone, without the rest of the stage, as a function of the number of
    logged requests and the seed that samples them: the tables, the logs' replay, the
    candidates and the Oracle are loaded once, and each call ranks its own sample anew.
    None when the dataset records no logging policy. ``evaluate`` computes its own sample
    with what it has already built."""
    from contract.feature_store import open_store
    from training.ope_eval import ranker_ope, simulator_logs
    from training.policy_eval import Marketplace
    from training.retrieval.retriever import load_retriever
    from training.simulate import Oracle
    from training.tables import read_tables

    manifest = read_manifest(paths, dataset)
    tables = read_tables(paths.raw(dataset), columns={C.IMPRESSIONS: EVAL_IMPRESSION_COLUMNS})
    carts = read_checkout_carts(paths, dataset)
    served = ServedScorer(stage, tables[C.ITEMS])
    market = Marketplace(tables, carts)
    logs = simulator_logs(paths, dataset, tables, carts, market, manifest, served.egmv, cfg.k)
    if logs is None:
        return None
    candidates = CandidateCache(
        load_retriever(stage, paths.home, dataset), tables[C.ITEMS], cfg.candidates
    )
    store = open_store(dataset, paths=paths)
    oracle = Oracle.load(paths.ground_truth(dataset))

    def sample(n_requests: int, seed: int) -> dict[str, Any]:
        # a fresh record: ranker_ope takes the requests the ranker has already ranked first
        scored: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        ranker = _model_policy(store, candidates, served.egmv, record=scored)
        return ranker_ope(logs, ranker, scored, oracle, cfg.k, n_requests, seed)

    return sample


def ranker_ope_from_stage(
    paths: Paths, dataset: str, stage: Path, cfg: TrainConfig
) -> dict[str, Any] | None:
    """``ranker_ope_samples`` for ``cfg.ope_requests`` requests drawn with ``cfg.seed``."""
    sample = ranker_ope_samples(paths, dataset, stage, cfg)
    return None if sample is None else sample(cfg.ope_requests, cfg.seed)


def evaluate(paths: Paths, dataset: str, stage: Path, cfg: TrainConfig) -> dict[str, Any]:
    from contract.feature_store import open_store
    from training.ingest import default_obd_cache
    from training.ope_eval import cached_open_bandit, open_bandit_ope
    from training.report import ablation_plot, policy_plot, reliability_plot, write_report
    from training.staging import read_stage_reports

    started = time.perf_counter()
    reports = read_stage_reports(stage)
    manifest = read_manifest(paths, dataset)
    report: dict[str, Any] = {
        "preset": dataset.removeprefix("sim-"),
        "dataset": dataset,
        "bundle_version": "staging",
    }
    rankers = reports.get("rankers", {})
    test = rankers.get("test", {})
    if test:
        purchase, lmart, served = test["purchase"], test["lambdamart"], test["purchase_egmv"]
        report["ranking"] = {
            # LambdaMART, the ranking model (graded relevance, IPS-corrected)
            "ndcg_at_20": lmart["ndcg@20"],
            "ndcg_at_20_ips": lmart["ndcg@20_ips"],
            "ndcg_at_20_ips_total": lmart["ndcg@20_ips_total"],
            # the served score: calibrated p(purchase) x price x margin
            "served_egmv_ndcg_at_20": served["ndcg@20"],
            "served_egmv_ndcg_at_20_ips": served["ndcg@20_ips"],
            # the purchase model, calibrated
            "auc": purchase["auc_calibrated"],
            "auc_ci_low": purchase.get("auc_calibrated_ci_low"),
            "auc_ci_high": purchase.get("auc_calibrated_ci_high"),
            "logloss": purchase["log_loss_calibrated"],
            "pr_auc": purchase["pr_auc_calibrated"],
            "train_valid_auc_gap": rankers.get("purchase_auc_gap"),
            "baselines": {
                k: test[k]
                for k in ("logreg", "logreg_egmv", "popularity", "heuristic", "random")
                if k in test
            },
        }
        report["calibration"] = {
            "ece_before": purchase["ece"],
            "ece_after": purchase["ece_calibrated"],
            "reliability": rankers.get("reliability_test", {}),
        }
    report["retrieval"] = _retrieval_section(reports.get("retrieval", {}), stage)
    compiled = reports.get("compile", {})
    latency = compiled.get("latency_500", {})
    served_latency = compiled.get("latency_500_served", {})
    report["compiled"] = {
        "max_abs_diff": compiled.get("parity_max_abs_diff"),
        **latency.get("compiled", {}),
        # the whole served p (both stages of a two-stage model, offsets included)
        "p99_ms_500": served_latency.get("p99_ms", latency.get("compiled", {}).get("p99_ms")),
        "p50_ms_500": served_latency.get("p50_ms", latency.get("compiled", {}).get("p50_ms")),
        "stages": served_latency.get("stages", 1),
        "num_trees": served_latency.get("num_trees", latency.get("num_trees")),
    }
    report["lightgbm"] = {
        **latency.get("lightgbm", {}),
        "p99_ms_500": latency.get("lightgbm", {}).get("p99_ms"),
    }

    report["test_rows"] = manifest["rows"]["test"]
    truth_dir = paths.ground_truth(dataset)
    simulated = (truth_dir / "ground_truth.npz").exists()
    if simulated:
        for section, real_dataset in REAL_DATA_SECTIONS.items():
            found = real_data_section(paths, real_dataset)
            if found is not None:
                report[section] = found
    if simulated:
        from training.ope_eval import ope_targets, ranker_ope, simulator_logs
        from training.policy_eval import Marketplace, evaluate_policies
        from training.retrieval.retriever import load_retriever
        from training.simulate import Oracle
        from training.tables import read_tables

        # what the policies' replay reads of every impression (not its position or policy)
        tables = read_tables(paths.raw(dataset), columns={C.IMPRESSIONS: EVAL_IMPRESSION_COLUMNS})
        carts = read_checkout_carts(paths, dataset)
        oracle = Oracle.load(truth_dir)
        store = open_store(dataset, paths=paths)
        served = ServedScorer(stage, tables[C.ITEMS])
        retriever = load_retriever(stage, paths.home, dataset)
        candidates = CandidateCache(retriever, tables[C.ITEMS], cfg.candidates)
        logreg = _logreg_egmv(paths, dataset, tables[C.ITEMS])
        ranked: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # reused by the OPE below
        ranker = _model_policy(store, candidates, served.egmv, record=ranked)
        models = {
            "logreg": _model_policy(store, candidates, logreg),
            "ranker": ranker,
            "optimal_over_candidates": _oracle_over_candidates(oracle, candidates, cfg.k),
        }
        models.update(
            _ablation_policies(
                paths, dataset, stage, store, retriever, candidates, served, oracle, tables, cfg
            )
        )
        market = Marketplace(tables, carts)
        start, end = held_out_period(manifest)
        summary, values, requests = evaluate_policies(
            tables,
            oracle,
            carts,
            start,
            end,
            models,
            k=cfg.k,
            n_requests=cfg.eval_requests,
            seed=cfg.seed,
            market=market,
        )
        report["ablation"] = _ablation_section(summary, values)
        report["policies"] = summary
        report["segments"] = segments(requests, values, tables, cfg.k)
        h = summary["heuristic"]["oracle_egmv_per_1k"]
        r = summary["ranker"]["oracle_egmv_per_1k"]
        o = summary["optimal"]["oracle_egmv_per_1k"]
        oc = summary["optimal_over_candidates"]["oracle_egmv_per_1k"]
        report["targets"] = {
            "ranker_uplift_over_heuristic": r / h - 1 if h else None,
            "ranker_share_of_optimal": r / o if o else None,
            "ranker_share_of_optimal_over_its_candidates": r / oc if oc else None,
            "candidates_share_of_optimal": oc / o if o else None,
            "uplift_target": TARGET_UPLIFT_OVER_HEURISTIC,
            "share_of_optimal_target": TARGET_SHARE_OF_OPTIMAL,
            "ece_target": TARGET_ECE,
        }
        logs = (
            simulator_logs(paths, dataset, tables, carts, market, manifest, served.egmv, cfg.k)
            if cfg.ope_requests > 0
            else None
        )
        if logs is not None:
            report["ope"] = ranker_ope(
                logs, ranker, ranked, oracle, cfg.k, cfg.ope_requests, cfg.seed
            )
            report["ope"]["oracle_policies_sample"] = r
            report["targets"].update(ope_targets(report["ope"]))
    obd = cached_open_bandit(default_obd_cache())
    if obd is not None:
        report["ope_open_bandit"] = open_bandit_ope(obd)
    out = stage / B.EVAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    curves = report.get("calibration", {}).get("reliability")
    if curves:
        reliability_plot(curves, out / "reliability.png")
    if "policies" in report:
        policy_plot(report["policies"], out / "policies.png")
    if report.get("ablation"):
        served_value = report["policies"]["ranker"]["oracle_egmv_per_1k"]
        ablation_plot(report["ablation"], served_value, out / "ablation.png")
    report["seconds"] = time.perf_counter() - started
    write_report(report, out)
    published = reports_dir(paths, dataset, simulated)
    published.mkdir(parents=True, exist_ok=True)
    for name in ("eval.json", "eval.md", "reliability.png", "policies.png", "ablation.png"):
        if (out / name).exists():
            shutil.copy(out / name, published / name)
    return report
