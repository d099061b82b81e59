"""Issue 13's exploratory ranking levers, scored by the Oracle on the same test requests.

``python -m tools.bench_levers [--dataset sim-small] [--requests 400]`` (after ``make demo``)
reads the staged bundle (``artifacts/staging/<dataset>``) and its training sets, refits the
purchase model with the stage's tuned parameters for each variant below, and scores every
variant's E[GMV] order over the same retrieval candidates, with the PROFILE source off (as
served) and on at 0.5, on the same sampled test requests:

- ``served``: the staged compiled model and calibrator (what serving scores);
- ``logreg``: the logistic-regression baseline;
- ``refit``: the purchase model refitted as the rankers stage fits the served one (tuned
  parameters, linear offset, monotone price; ``training.ranking.ablation.train_ablations``)
  and scored with the bundle's evidence shrink: the reference for the next one;
- ``tower_score``: the same recipe with the two-tower score (the staged user vector as of
  the row . the item embedding, over the taste columns: the index's value column left out,
  price and margin being features already) as one more feature;
- ``tower_crossfit``: the same, with each training row's score from a tower fitted (the
  staged tower's config, ``training.retrieval.train.fit_tower``) without that row's user
  (:data:`CROSSFIT_FOLDS` user folds); valid and test rows keep the staged tower's score,
  which never trained on them. The staged tower learned from the training rows' own
  engagements, so ``tower_score``'s training column is an in-sample fit;
- ``value_capped``: the served p x min(price, the logged pool's highest shown price) x margin;
- ``optimal_over_candidates``: the Oracle's best page over the candidates.

Writes ``reports/levers.json`` and prints a table. None of these variants is served; the
figures are what ``docs/models.md`` quotes for the levers that were measured and not kept.

``python -m tools.bench_levers --served-sweep [--requests 1000]`` refits nothing: it scores
the staged (served) model under settings that need no retraining, on the evaluate stage's
request sample (1,000 requests, seed 0), and writes ``reports/levers_sweep.json``:

- ``profile@<share>``: the PROFILE retrieval source at each of :data:`PROFILE_SHARES`, with
  ``optimal_over_candidates@<share>`` beside it;
- ``history@<cap>``: the history source capped at each of :data:`HISTORY_CAPS` items,
  built from the same engagements as the bundle's (``training.retrieval.train.before_test``);
- ``evidence@<kappa>``, ``evidence_total@<kappa>[+<prior>]`` and ``evidence_7d@<kappa>``: the
  model's unshrunk E[GMV] (p x price x margin) times (n + prior) / (n + prior + kappa), n the
  item's logged impressions (feed and organic) before the evaluated days, or the served
  feature ``impressions_total`` (the same count as of the request's daily snapshot: what
  ``contract.scorer.EvidenceShrink`` reads), or the served ``impressions_7d``; on the test
  days and, to choose kappa without them, on the validation days (``valid:`` names).
  ``served`` applies the bundle's own shrink, ``unshrunk`` none.
- ``retrieval_value@<w>``: the index's value column weighted ``w`` instead of the bundle's
  (``contract.tower.with_value_column``; 0: the tower's taste alone), at each of
  :data:`VALUE_WEIGHTS`, with ``optimal_over_candidates:retrieval_value@<w>`` beside it, on
  the test and the validation days (a bundle without the column: skipped).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from contract import columns as C
from contract.features import build_matrix
from contract.paths import Paths
from feature_repo import schema as S
from tools.offline_bench import arguments, paths_of, write_report

Scorer = Callable[[pd.DataFrame, np.ndarray], np.ndarray]  # (pair frame, matrix) -> E[GMV]


def _with_column(data: Any, column: np.ndarray | None) -> Any:
    """A RankingData with ``column`` appended to its matrix (or unchanged)."""
    if column is None:
        return data
    X = np.column_stack([data.X, column]).astype(np.float32)
    return dataclasses.replace(data, X=X, feature_names=[*data.feature_names, "tower_score"])


def _table(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each policy's E[GMV]/1k and its share of the Oracle's optimum on the same requests."""
    optimum = summary["optimal"]["oracle_egmv_per_1k"]
    return {
        name: {
            "oracle_egmv_per_1k": s["oracle_egmv_per_1k"],
            "share_of_optimal": s["oracle_egmv_per_1k"] / optimum if optimum else None,
        }
        for name, s in summary.items()
    }


def run(home: Path, dataset: str, n_requests: int, seed: int = 0) -> dict[str, Any]:
    from contract.feature_store import open_store
    from contract.tower import UserTower, value_columns
    from training.evaluate import (
        EVAL_IMPRESSION_COLUMNS,
        CandidateCache,
        ItemValue,
        ServedScorer,
        _oracle_over_candidates,
    )
    from training.policy_eval import evaluate_policies
    from training.ranking.ablation import train_ablations
    from training.ranking.baselines import LogisticBaseline
    from training.ranking.models import RankerBudget
    from training.ranking.train import ranking_data, read_split
    from training.request_features import features_for_pairs, pair_frame
    from training.retrieval.features import AffinitySnapshots, user_features
    from training.retrieval.retriever import Retriever
    from training.retrieval.towers import TowerConfig
    from training.retrieval.train import RetrievalData, fit_tower
    from training.simulate import Oracle
    from training.stages import held_out_period, read_checkout_carts, read_manifest
    from training.staging import read_stage_reports, staging_dir
    from training.tables import read_tables

    started = time.perf_counter()
    paths = Paths(home)
    stage = staging_dir(paths, dataset)
    best = read_stage_reports(stage)["rankers"]["best_params"]
    params = best["purchase"]
    click_params = best.get("click")  # a two-stage served model's click stage
    tower = UserTower.load(stage / "retrieval" / "user_tower.npz")
    embeddings = np.load(stage / "retrieval" / "item_embeddings.npy")
    embedded = pd.Index(np.load(stage / "retrieval" / "item_ids.npy"))
    # the taste columns: the score leaves the index's value column out (value is a feature)
    settings = json.loads((stage / "retrieval" / "config.json").read_text())
    taste = embeddings.shape[1] - value_columns(settings)
    snapshots = AffinitySnapshots.read(
        paths.features(dataset) / f"{S.USER_CATEGORY_AFFINITY}.parquet"
    )

    def score_of(
        user_tower: UserTower, item_emb: np.ndarray, ids: pd.Index, cols: int, frame: pd.DataFrame
    ) -> np.ndarray:
        query = user_tower.embed(user_features(frame, user_tower.spec, snapshots))
        rows = ids.get_indexer(pd.Index(frame[C.ITEM_ID].to_numpy()))
        score = np.einsum("ij,ij->i", query[:, :cols], item_emb[np.maximum(rows, 0), :cols])
        return np.where(rows >= 0, score, 0.0).astype(np.float32)

    def tower_score(frame: pd.DataFrame) -> np.ndarray:
        return score_of(tower, embeddings, embedded, taste, frame)

    # the cross-fitted score: each training row's by a tower fitted without its user
    tower_cfg = dataclasses.replace(
        TowerConfig.from_dict(read_stage_reports(stage)["retrieval"]["params"]["tower"]),
        value_weight=0.0,
    )
    rdata = RetrievalData.load(home, dataset)
    rtrain = rdata.splits["train"]
    fold_towers = []
    for fold in range(CROSSFIT_FOLDS):
        held = rtrain[C.USER_ID].to_numpy() % CROSSFIT_FOLDS == fold
        part = {**rdata.splits, "train": rtrain[~held].reset_index(drop=True)}
        fold_towers.append(fit_tower(dataclasses.replace(rdata, splits=part), tower_cfg, seed))
    catalog_ids = pd.Index(rdata.catalog.item_ids)

    def crossfit_score(frame: pd.DataFrame) -> np.ndarray:
        out = np.zeros(len(frame), dtype=np.float32)
        fold_of = frame[C.USER_ID].to_numpy() % CROSSFIT_FOLDS
        for fold, (user_tower, item_emb) in enumerate(fold_towers):
            here = fold_of == fold
            if here.any():
                cols = item_emb.shape[1]
                out[here] = score_of(user_tower, item_emb, catalog_ids, cols, frame[here])
        return out

    frames = {s: read_split(home, dataset, s) for s in ("train", "valid")}
    base = {s: ranking_data(f) for s, f in frames.items()}
    towered = {s: _with_column(base[s], tower_score(frames[s])) for s in base}
    crossfit = {  # valid rows: the staged tower never trained on them
        "train": _with_column(base["train"], crossfit_score(frames["train"])),
        "valid": towered["valid"],
    }
    logreg = LogisticBaseline.fit(base["train"].X, base["train"].label, base["train"].sample_weight)

    budget = RankerBudget(trials=1, progress=False)  # the served recipe: offset, monotone

    def refit(data: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
        """Calibrated p of the purchase model refitted as the rankers stage fits the served
        one (tuned parameters, linear offset, monotone price, early stopping, isotonic; both
        stages of a two-stage model)."""
        lever: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {"refit": ((), {})}
        return train_ablations(
            data["train"], data["valid"], params, budget, seed, lever, click_params
        )["refit"].egmv_probability

    tables = read_tables(paths.raw(dataset), columns={C.IMPRESSIONS: EVAL_IMPRESSION_COLUMNS})
    items = read_tables(paths.raw(dataset), [C.ITEMS])[C.ITEMS]
    oracle = Oracle.load(paths.ground_truth(dataset))
    store = open_store(dataset, paths=paths)
    served = ServedScorer(stage, tables[C.ITEMS])
    value = ItemValue(tables[C.ITEMS])
    price = pd.Series(items[C.PRICE].to_numpy(), index=items[C.ITEM_ID].to_numpy())
    start, end = held_out_period(read_manifest(paths, dataset))
    imp = tables[C.IMPRESSIONS]
    shown_max = float(price.reindex(imp.loc[imp[C.TS] < start, C.ITEM_ID].unique()).max())

    refit_p = refit(base)
    tower_p = refit(towered)
    crossfit_p = refit(crossfit)

    shrunk = served.shrunk  # the bundle's evidence shrink, as served

    def capped(frame: pd.DataFrame, X: np.ndarray) -> np.ndarray:
        ids = frame[C.ITEM_ID].to_numpy()
        p = np.asarray(served.calibrator.apply(served.scorer.predict(X)))
        own = price.reindex(ids).to_numpy()
        return p * value(ids) * np.minimum(own, shown_max) / np.maximum(own, 1e-9)

    scorers: dict[str, Scorer] = {
        "served": lambda f, X: served.egmv(X, f[C.ITEM_ID].to_numpy()),
        "logreg": lambda f, X: logreg.predict(X) * value(f[C.ITEM_ID].to_numpy()),
        "refit": lambda f, X: served.scored_by(refit_p)(X, f[C.ITEM_ID].to_numpy()),
        "tower_score": lambda f, X: shrunk(
            X, tower_p(np.column_stack([X, tower_score(f)])) * value(f[C.ITEM_ID].to_numpy())
        ),
        "tower_crossfit": lambda f, X: shrunk(
            X, crossfit_p(np.column_stack([X, tower_score(f)])) * value(f[C.ITEM_ID].to_numpy())
        ),
        "value_capped": capped,
    }

    def policy(candidates: CandidateCache, score: Scorer) -> Callable[..., list[np.ndarray]]:
        def ranked(requests: pd.DataFrame, state: Any) -> list[np.ndarray]:
            found = candidates(requests, state)
            frame = features_for_pairs(store, pair_frame(requests, found), tables[C.ITEMS])
            scores = score(frame, build_matrix(frame))
            out, at = [], 0
            for c in found:
                out.append(np.asarray(c)[np.argsort(-scores[at : at + len(c)], kind="stable")])
                at += len(c)
            return out

        return ranked

    models: dict[str, Any] = {}
    for share in (0.0, 0.5):
        retriever = Retriever(stage, store, paths, dataset, items, profile_share=share)
        cache = CandidateCache(retriever, tables[C.ITEMS], 500)
        for name, score in scorers.items():
            models[f"{name}@{share}"] = policy(cache, score)
        models[f"optimal_over_candidates@{share}"] = _oracle_over_candidates(oracle, cache, 20)
    carts = read_checkout_carts(paths, dataset)
    summary, _, _ = evaluate_policies(
        tables, oracle, carts, start, end, models, k=20, n_requests=n_requests, seed=seed
    )
    table = _table(summary)
    return {
        "dataset": dataset,
        "requests": n_requests,
        "logged_max_price": shown_max,
        "policies": table,
        "seconds": time.perf_counter() - started,
    }


CROSSFIT_FOLDS = 2  # user folds of the cross-fitted tower score (user_id mod folds)
PROFILE_SHARES = (0.0, 0.1, 0.2, 0.3, 0.5)
HISTORY_CAPS = (200, 300, 500)
KAPPAS = (1.0, 2.0, 5.0, 10.0, 20.0)
VALUE_WEIGHTS = (0.0, 1.0, 1.5, 2.0, 3.0)
PRIORS = (0.0, 0.5, 1.0)  # impressions every item is credited with (evidence_total only)


def served_sweep(home: Path, dataset: str, n_requests: int, seed: int = 0) -> dict[str, Any]:
    """The ``--served-sweep`` report (module docstring)."""
    from contract.feature_store import open_store
    from contract.features import FEATURE_SCHEMA
    from contract.scorer import EVIDENCE_FEATURE
    from contract.timeutil import to_ns
    from training.evaluate import (
        EVAL_IMPRESSION_COLUMNS,
        CandidateCache,
        ServedScorer,
        _model_policy,
        _oracle_over_candidates,
    )
    from training.policy_eval import Marketplace, evaluate_policies
    from training.retrieval.features import positive
    from training.retrieval.history import build_history
    from training.retrieval.retriever import Retriever
    from training.retrieval.train import RetrievalData, before_test
    from training.simulate import Oracle
    from training.stages import read_checkout_carts, read_manifest
    from training.staging import staging_dir
    from training.tables import read_tables

    started = time.perf_counter()
    paths = Paths(home)
    stage = staging_dir(paths, dataset)
    tables = read_tables(paths.raw(dataset), columns={C.IMPRESSIONS: EVAL_IMPRESSION_COLUMNS})
    items = tables[C.ITEMS]
    oracle = Oracle.load(paths.ground_truth(dataset))
    store = open_store(dataset, paths=paths)
    served = ServedScorer(stage, items)
    carts = read_checkout_carts(paths, dataset)
    market = Marketplace(tables, carts)
    split = read_manifest(paths, dataset)["split"]
    past = before_test(RetrievalData.load(home, dataset))
    engaged = positive(past)
    impressions_7d = FEATURE_SCHEMA.names.index("impressions_7d")
    impressions_total = FEATURE_SCHEMA.names.index(EVIDENCE_FEATURE)
    n_items = int(items[C.ITEM_ID].max()) + 1

    def retriever(
        share: float, cap: int | None = None, value_weight: float | None = None
    ) -> CandidateCache:
        found = Retriever(
            stage, store, paths, dataset, items, profile_share=share, value_weight=value_weight
        )
        if cap is not None:
            found.history = build_history(
                past[C.USER_ID].to_numpy(np.int64)[engaged],
                past[C.ITEM_ID].to_numpy(np.int64)[engaged],
                to_ns(past[C.EVENT_TIMESTAMP])[engaged],
                max_items=cap,
            )
        return CandidateCache(found, items, 500)

    def evidence(before: pd.Timestamp) -> np.ndarray:
        imp = tables[C.IMPRESSIONS]
        counts = imp.loc[imp[C.TS] < before, C.ITEM_ID].value_counts()
        n = np.zeros(n_items)
        n[counts.index.to_numpy(np.int64)] = counts.to_numpy()
        return n

    def shrunk(
        n: np.ndarray | int, kappa: float, prior: float = 0.0
    ) -> Callable[[np.ndarray, np.ndarray], Any]:
        """n: per-item counts, or the feature column to read them from."""

        def egmv(X: np.ndarray, ids: np.ndarray) -> np.ndarray:
            seen = np.nan_to_num(X[:, n]) if isinstance(n, int) else n[ids]
            seen = seen + prior
            with np.errstate(invalid="ignore"):
                factor = np.where(seen > 0, seen / (seen + kappa), 0.0)
            return served.unshrunk(X, ids) * factor

        return egmv

    windows = {"valid": ("train_end", "valid_end"), "test": ("valid_end", "test_end")}
    policies: dict[str, dict[str, Any]] = {}
    for window, (lo, hi) in windows.items():
        start, end = pd.Timestamp(split[lo]), pd.Timestamp(split[hi])
        served_cache = retriever(0.0)
        n = evidence(start)
        models: dict[str, Any] = {
            "served": _model_policy(store, served_cache, served.egmv),
            "unshrunk": _model_policy(store, served_cache, served.unshrunk),
        }
        for kappa in KAPPAS:
            models[f"evidence@{kappa:g}"] = _model_policy(store, served_cache, shrunk(n, kappa))
            for prior in PRIORS:
                name = f"evidence_total@{kappa:g}" + (f"+{prior:g}" if prior else "")
                models[name] = _model_policy(
                    store, served_cache, shrunk(impressions_total, kappa, prior)
                )
            models[f"evidence_7d@{kappa:g}"] = _model_policy(
                store, served_cache, shrunk(impressions_7d, kappa)
            )
        for weight in VALUE_WEIGHTS if served_cache.retriever.value_columns else ():
            cache = retriever(0.0, value_weight=weight)
            models[f"retrieval_value@{weight:g}"] = _model_policy(store, cache, served.egmv)
            models[f"optimal_over_candidates:retrieval_value@{weight:g}"] = _oracle_over_candidates(
                oracle, cache, 20
            )
        if window == "test":
            for share in PROFILE_SHARES:
                cache = served_cache if share == 0 else retriever(share)
                models[f"profile@{share:g}"] = _model_policy(store, cache, served.egmv)
                models[f"optimal_over_candidates@{share:g}"] = _oracle_over_candidates(
                    oracle, cache, 20
                )
            for cap in HISTORY_CAPS:
                cache = retriever(0.0, cap)
                models[f"history@{cap}"] = _model_policy(store, cache, served.egmv)
                models[f"optimal_over_candidates:history@{cap}"] = _oracle_over_candidates(
                    oracle, cache, 20
                )
        summary, _, _ = evaluate_policies(
            tables,
            oracle,
            carts,
            start,
            end,
            models,
            k=20,
            n_requests=n_requests,
            seed=seed,
            market=market,
        )
        prefix = "" if window == "test" else "valid:"
        policies.update({prefix + name: row for name, row in _table(summary).items()})
    return {
        "dataset": dataset,
        "requests": n_requests,
        "policies": policies,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--requests", type=int, default=None, help="400; 1000 with the sweep")
    parser.add_argument(
        "--served-sweep", action="store_true", help="the served model's settings, no refits"
    )
    args = parser.parse_args(argv)
    paths = paths_of(args)
    if args.served_sweep:
        report = served_sweep(paths.home, args.dataset, args.requests or 1000)
        out = "levers_sweep.json"
    else:
        report = run(paths.home, args.dataset, args.requests or 400)
        out = "levers.json"
    write_report(paths, out, report)
    print(f"{'policy':<34}{'E[GMV]/1k':>10}{'of optimum':>12}")
    for name, row in report["policies"].items():
        print(f"{name:<34}{row['oracle_egmv_per_1k']:>10.1f}{row['share_of_optimal']:>12.3f}")
    print(f"{report['seconds']:.0f} s; reports/{out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
