"""Issue 13's exploratory ranking levers, scored by the Oracle on the same test requests.

``python -m tools.bench_levers [--dataset sim-small] [--requests 400]`` (after ``make demo``)
reads the staged bundle (``artifacts/staging/<dataset>``) and its training sets, refits the
purchase model with the stage's tuned parameters for each variant below, and scores every
variant's E[GMV] order over the same retrieval candidates, with the PROFILE source off (as
served) and on at 0.5, on the same sampled test requests:

- ``served``: the staged compiled model and calibrator (what serving scores);
- ``logreg``: the logistic-regression baseline;
- ``refit``: the purchase model refitted as the stage fits it (the reference for the next two);
- ``tower_score``: the refit with the two-tower score (the staged user vector as of the row
  . the item embedding) as one more feature;
- ``linear_offset``: the refit boosted from the logistic regression's log-odds (LightGBM's
  ``init_score``), so the price terms extrapolate linearly;
- ``value_capped``: the served p x min(price, the logged pool's highest shown price) x margin;
- ``optimal_over_candidates``: the Oracle's best page over the candidates.

Writes ``reports/levers.json`` and prints a table. None of these variants is served; the
figures are what ``docs/models.md`` quotes for the levers that were measured and not kept.
"""

from __future__ import annotations

import argparse
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

Scorer = Callable[[pd.DataFrame, np.ndarray], np.ndarray]  # (pair frame, matrix) -> E[GMV]


def _with_column(data: Any, column: np.ndarray | None) -> Any:
    """A RankingData with ``column`` appended to its matrix (or unchanged)."""
    if column is None:
        return data
    X = np.column_stack([data.X, column]).astype(np.float32)
    return dataclasses.replace(data, X=X, feature_names=[*data.feature_names, "tower_score"])


def run(home: Path, dataset: str, n_requests: int, seed: int = 0) -> dict[str, Any]:
    from contract.feature_store import open_store
    from contract.tower import UserTower
    from training.evaluate import (
        EVAL_IMPRESSION_COLUMNS,
        CandidateCache,
        ItemValue,
        ServedScorer,
        _oracle_over_candidates,
    )
    from training.policy_eval import evaluate_policies
    from training.ranking.baselines import LogisticBaseline
    from training.ranking.calibration import fit_isotonic
    from training.ranking.models import RankerBudget, fit_purchase, purchase_datasets
    from training.ranking.train import ranking_data, read_split
    from training.request_features import features_for_pairs, pair_frame
    from training.retrieval.features import AffinitySnapshots, user_features
    from training.retrieval.retriever import Retriever
    from training.simulate import Oracle
    from training.staging import read_stage_reports, staging_dir
    from training.tables import read_tables

    started = time.perf_counter()
    paths = Paths(home)
    stage = staging_dir(paths, dataset)
    params = read_stage_reports(stage)["rankers"]["best_params"]["purchase"]
    tower = UserTower.load(stage / "retrieval" / "user_tower.npz")
    embeddings = np.load(stage / "retrieval" / "item_embeddings.npy")
    embedded = pd.Index(np.load(stage / "retrieval" / "item_ids.npy"))
    snapshots = AffinitySnapshots.read(
        paths.features(dataset) / f"{S.USER_CATEGORY_AFFINITY}.parquet"
    )

    def tower_score(frame: pd.DataFrame) -> np.ndarray:
        query = tower.embed(user_features(frame, tower.spec, snapshots))
        rows = embedded.get_indexer(pd.Index(frame[C.ITEM_ID].to_numpy()))
        score = np.einsum("ij,ij->i", query, embeddings[np.maximum(rows, 0)])
        return np.where(rows >= 0, score, 0.0).astype(np.float32)

    frames = {s: read_split(home, dataset, s) for s in ("train", "valid")}
    base = {s: ranking_data(f) for s, f in frames.items()}
    towered = {s: _with_column(base[s], tower_score(frames[s])) for s in base}
    logreg = LogisticBaseline.fit(base["train"].X, base["train"].label, base["train"].sample_weight)

    def log_odds(X: np.ndarray) -> np.ndarray:
        z = logreg.scaler.transform(np.nan_to_num(X))
        return np.asarray(z @ logreg.model.coef_[0] + logreg.model.intercept_[0])

    budget = RankerBudget(trials=1, progress=False)

    def refit(data: dict[str, Any], offset: bool) -> Callable[[np.ndarray], np.ndarray]:
        dtrain, dvalid = purchase_datasets(data["train"], data["valid"], budget)
        if offset:
            dtrain.set_init_score(log_odds(data["train"].X))
            dvalid.set_init_score(log_odds(data["valid"].X))
        booster = fit_purchase(dtrain, dvalid, params, budget, seed).booster

        def raw(X: np.ndarray) -> np.ndarray:
            if not offset:
                return np.asarray(booster.predict(X))
            margin = log_odds(X) + np.asarray(booster.predict(X, raw_score=True))
            return np.asarray(1.0 / (1.0 + np.exp(-margin)))

        valid = data["valid"]
        calibrator = fit_isotonic(raw(valid.X), valid.label, valid.sample_weight)
        return lambda X: np.asarray(calibrator.apply(raw(X)))

    tables = read_tables(paths.raw(dataset), columns={C.IMPRESSIONS: EVAL_IMPRESSION_COLUMNS})
    items = read_tables(paths.raw(dataset), [C.ITEMS])[C.ITEMS]
    oracle = Oracle.load(paths.ground_truth(dataset))
    store = open_store(dataset, paths=paths)
    served = ServedScorer(stage, tables[C.ITEMS])
    value = ItemValue(tables[C.ITEMS])
    price = pd.Series(items[C.PRICE].to_numpy(), index=items[C.ITEM_ID].to_numpy())
    manifest = json.loads((paths.training_sets(dataset) / "manifest.json").read_text())
    start = pd.Timestamp(manifest["split"]["valid_end"])
    end = pd.Timestamp(manifest["split"]["test_end"])
    imp = tables[C.IMPRESSIONS]
    shown_max = float(price.reindex(imp.loc[imp[C.TS] < start, C.ITEM_ID].unique()).max())

    refit_p = refit(base, offset=False)
    tower_p = refit(towered, offset=False)
    offset_p = refit(base, offset=True)

    def capped(frame: pd.DataFrame, X: np.ndarray) -> np.ndarray:
        ids = frame[C.ITEM_ID].to_numpy()
        p = np.asarray(served.calibrator.apply(served.scorer.predict(X)))
        own = price.reindex(ids).to_numpy()
        return p * value(ids) * np.minimum(own, shown_max) / np.maximum(own, 1e-9)

    scorers: dict[str, Scorer] = {
        "served": lambda f, X: served.egmv(X, f[C.ITEM_ID].to_numpy()),
        "logreg": lambda f, X: logreg.predict(X) * value(f[C.ITEM_ID].to_numpy()),
        "refit": lambda f, X: refit_p(X) * value(f[C.ITEM_ID].to_numpy()),
        "tower_score": lambda f, X: (
            tower_p(np.column_stack([X, tower_score(f)])) * value(f[C.ITEM_ID].to_numpy())
        ),
        "linear_offset": lambda f, X: offset_p(X) * value(f[C.ITEM_ID].to_numpy()),
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
    carts_path = paths.raw(dataset) / "checkout_carts.parquet"
    carts = pd.read_parquet(carts_path) if carts_path.exists() else None
    summary, _, _ = evaluate_policies(
        tables, oracle, carts, start, end, models, k=20, n_requests=n_requests, seed=seed
    )
    optimum = summary["optimal"]["oracle_egmv_per_1k"]
    table = {
        name: {
            "oracle_egmv_per_1k": s["oracle_egmv_per_1k"],
            "share_of_optimal": s["oracle_egmv_per_1k"] / optimum if optimum else None,
        }
        for name, s in summary.items()
    }
    return {
        "dataset": dataset,
        "requests": n_requests,
        "logged_max_price": shown_max,
        "policies": table,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="sim-small")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--home", type=Path, default=None)
    args = parser.parse_args(argv)
    paths = Paths.from_env() if args.home is None else Paths(args.home)
    report = run(paths.home, args.dataset, args.requests)
    paths.reports.mkdir(parents=True, exist_ok=True)
    (paths.reports / "levers.json").write_text(json.dumps(report, indent=2))
    print(f"{'policy@PROFILE share':<34}{'E[GMV]/1k':>10}{'of optimum':>12}")
    for name, row in report["policies"].items():
        print(f"{name:<34}{row['oracle_egmv_per_1k']:>10.1f}{row['share_of_optimal']:>12.3f}")
    print(f"{report['seconds']:.0f} s; reports/levers.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
