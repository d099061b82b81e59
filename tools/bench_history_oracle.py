"""Issue 13: how much of the optimum can any policy that learns the user from the logs earn?

``python -m tools.bench_history_oracle [--dataset sim-small] [--requests 300]`` (after
``make demo``) scores, on a sample of the test period's requests (seed 0, as the evaluate
stage samples; ``--requests 1000`` is its very sample), the served ranker beside the
history-limited Oracle (``training.simulate.posterior.HistoryOracle``: it knows every item
and the response model, and infers the user's taste, price sensitivity and budget from
that user's logged impressions before the request):

- ``ranker``, ``optimal_over_candidates``, ``optimal``: as in ``reports/eval.json``;
- ``history_oracle:candidates``: the history-limited Oracle's order of the ranker's own
  candidates: the most a ranker of these candidates can earn in expectation from the logs;
- ``prior_oracle:candidates``: the same with no history (the world's prior over users):
  what knowing the items alone is worth;
- ``history_appeal_oracle:candidates``: the first, with each item's appeal (the click
  logit's item term, the one an item's content does not carry) no longer known but
  believed from the item's logged clicks before the test window
  (``training.simulate.posterior.believed_appeal``);
- ``history_content_oracle:candidates``: as the last, with each item's latent vector no
  longer known but read from its content (the least-squares linear read over the
  catalogue, unit length: the best a linear read of content can do);
- ``prior_appeal_oracle:candidates``, ``prior_content_oracle:candidates``: the last two
  with no history (the user-blind policy that reads items as they do);
- ``history_oracle:catalogue``: its best page over the whole eligible catalogue;
- ``optimal_over_candidates:history_oracle``: the Oracle's best page over the
  history-limited Oracle's top ``--candidates`` catalogue items: the share of the optimum
  candidates chosen from the logs could hold.

Writes ``reports/history_oracle.json`` and prints the table with each policy's share of
the optimum and of the optimum over the ranker's candidates, and the posteriors' effective
sample sizes.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from contract import columns as C
from contract.content import table_content
from tools.offline_bench import arguments, paths_of, write_report
from training.simulate.posterior import PARTICLES
from training.stages import Paths

log = logging.getLogger(__name__)

CANDIDATE_PARTICLES = 4000  # posterior particles that value the ranker's candidates
CATALOGUE_PARTICLES = 500  # ... and the catalogue's shortlist (systematic resampling)
SCREEN_PARTICLES = 64  # the first pass over the whole catalogue that makes the shortlist
SHORTLIST = 3000  # catalogue items the first pass keeps for the full valuation


def latent_read(items: pd.DataFrame, latent: np.ndarray) -> np.ndarray:
    """Each item's latent vector as its content tells it: the least-squares linear read over
    the catalogue (rows in item-id order), unit length."""
    content = table_content(items.sort_values(C.ITEM_ID)).astype(np.float64)
    coef, *_ = np.linalg.lstsq(content, latent, rcond=None)
    out = content @ coef
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def shares(summary: dict[str, dict[str, float]], over: str) -> dict[str, dict[str, float]]:
    """Each policy's E[GMV]/1k with its share of the optimum and of policy ``over``'s (the
    best page over the ranker's candidates)."""
    optimum = summary["optimal"]["oracle_egmv_per_1k"]
    best = summary[over]["oracle_egmv_per_1k"]
    return {
        name: {
            "oracle_egmv_per_1k": row["oracle_egmv_per_1k"],
            "share_of_optimal": row["oracle_egmv_per_1k"] / optimum,
            "share_of_candidates_optimal": row["oracle_egmv_per_1k"] / best,
        }
        for name, row in summary.items()
    }


def print_shares(policies: dict[str, dict[str, float]], width: int) -> None:
    print(f"{'policy':{width}s} {'E[GMV]/1k':>10s} {'of optimum':>11s} {'of cands':>9s}")
    for name, row in policies.items():
        print(
            f"{name:{width}s} {row['oracle_egmv_per_1k']:10.1f} {row['share_of_optimal']:11.1%}"
            f" {row['share_of_candidates_optimal']:9.1%}"
        )


@dataclasses.dataclass
class Replay:
    """What a replay of the test period's requests over the served ranker's candidates
    reads: the dataset's tables and truth, the log's state, the store, the served scorer."""

    paths: Paths
    tables: dict[str, pd.DataFrame]
    items: pd.DataFrame
    oracle: Any
    carts: pd.DataFrame | None
    market: Any
    start: pd.Timestamp
    end: pd.Timestamp
    store: Any
    served: Any
    candidates: Any

    def evaluate(
        self, models: dict[str, Any], n_requests: int, seed: int = 0
    ) -> dict[str, dict[str, float]]:
        """``training.policy_eval.evaluate_policies``'s summary of ``models`` (and the
        heuristic, popularity and the optimum) on ``n_requests`` test requests, 20 slots."""
        from training.policy_eval import evaluate_policies

        summary, _, _ = evaluate_policies(
            self.tables,
            self.oracle,
            self.carts,
            self.start,
            self.end,
            models,
            k=20,
            n_requests=n_requests,
            seed=seed,
            market=self.market,
        )
        return summary

    @classmethod
    def open(cls, home: Path, dataset: str, n_candidates: int = 500) -> Replay:
        from contract.feature_store import open_store
        from training.evaluate import CandidateCache, ServedScorer
        from training.policy_eval import Marketplace
        from training.retrieval.retriever import load_retriever
        from training.simulate import Oracle
        from training.stages import held_out_period, read_checkout_carts, read_manifest
        from training.staging import staging_dir
        from training.tables import read_tables

        paths = Paths(home)
        stage = staging_dir(paths, dataset)
        tables = read_tables(paths.raw(dataset))
        items = tables[C.ITEMS]
        carts = read_checkout_carts(paths, dataset)
        start, end = held_out_period(read_manifest(paths, dataset))
        return cls(
            paths=paths,
            tables=tables,
            items=items,
            oracle=Oracle.load(paths.ground_truth(dataset)),
            carts=carts,
            market=Marketplace(tables, carts),
            start=start,
            end=end,
            store=open_store(dataset, paths=paths),
            served=ServedScorer(stage, items),
            candidates=CandidateCache(load_retriever(stage, home, dataset), items, n_candidates),
        )


def run(
    home: Path, dataset: str, n_requests: int, particles: int, n_candidates: int = 500
) -> dict[str, Any]:
    from training.evaluate import _model_policy, _oracle_over_candidates
    from training.simulate.posterior import (
        Histories,
        HistoryOracle,
        Posterior,
        believed_appeal,
    )
    from training.stages import read_meta

    started = time.perf_counter()
    replay = Replay.open(home, dataset, n_candidates)
    paths, tables, items, oracle = replay.paths, replay.tables, replay.items, replay.oracle
    truth, carts, market = oracle.truth, replay.carts, replay.market
    start, store, served = replay.start, replay.store, replay.served
    candidates = replay.candidates
    histories = Histories(tables, truth, carts)
    bayes = HistoryOracle.from_dataset(paths.raw(dataset), truth, particles)
    ess: list[float] = []
    history_sizes: list[int] = []
    prior = bayes.posterior(0, histories.of(-1, 0))  # no history: every particle, equal weight

    def posteriors(model: HistoryOracle, record: bool) -> Callable[[int, int], Posterior]:
        kept: dict[tuple[int, int], Posterior] = {}

        def posterior_of(user: int, at_ns: int) -> Posterior:
            if (user, at_ns) not in kept:
                history = histories.of(user, at_ns)
                kept[user, at_ns] = model.posterior(user, history)
                if record:
                    ess.append(kept[user, at_ns].ess)
                    history_sizes.append(len(history.items))
            return kept[user, at_ns]

        return posterior_of

    posterior_of = posteriors(bayes, record=True)
    # the items' appeal as the logs before the test window tell it (the rest still known)
    appeal_sd = float(read_meta(paths, dataset)["config"]["appeal_sd"])
    appeal = believed_appeal(truth, histories, start.value, appeal_sd)
    appeal_bayes = bayes.believing(dataclasses.replace(truth, item_appeal=appeal))
    # ... and each item's latent vector read from its content alone (least squares over
    # the catalogue, then unit length): what content tells of an item, at best
    latent = latent_read(items, truth.item_latent)
    content_bayes = bayes.believing(
        dataclasses.replace(truth, item_appeal=appeal, item_latent=latent)
    )
    appeal_prior = appeal_bayes.posterior(0, histories.of(-1, 0))
    content_prior = content_bayes.posterior(0, histories.of(-1, 0))
    log.info("appeal and content beliefs ready, %.0f s", time.perf_counter() - started)

    def rows(requests: pd.DataFrame) -> list[tuple[int, int, int]]:
        return [
            (int(r), int(u), int(pd.Timestamp(t).value))
            for r, u, t in zip(
                requests[C.REQUEST_ID], requests[C.USER_ID], requests[C.TS], strict=True
            )
        ]

    def reranked(model: HistoryOracle, post_of: Callable[[int, int], Posterior]) -> Any:
        def policy(requests: pd.DataFrame, state: Any) -> list[np.ndarray]:
            out = []
            for (rid, user, at), found in zip(
                rows(requests), candidates(requests, state), strict=True
            ):
                found = np.asarray(found, dtype=np.int64)
                value = model.expected_values(
                    user,
                    post_of(user, at).thinned(CANDIDATE_PARTICLES),
                    found,
                    at,
                    market.cart_of(rid),
                )
                out.append(found[np.argsort(-value, kind="stable")])
            return out

        return policy

    catalogue_pages: dict[int, np.ndarray] = {}

    def catalogue(requests: pd.DataFrame, state: Any) -> list[np.ndarray]:
        """Two passes: a coarse posterior (SCREEN_PARTICLES) values the whole catalogue and
        keeps its SHORTLIST best; the finer one (CATALOGUE_PARTICLES) orders those."""
        eligible = market.item_ids[np.flatnonzero(state.eligible)].astype(np.int64)
        out = []
        for rid, user, at in rows(requests):
            cart = market.cart_of(rid)
            pool = eligible[~np.isin(eligible, cart)]
            post = posterior_of(user, at)
            coarse = bayes.expected_values(user, post.thinned(SCREEN_PARTICLES), pool, at, cart)
            keep = min(SHORTLIST, len(pool))
            pool = pool[np.argpartition(-coarse, keep - 1)[:keep]]
            value = bayes.expected_values(user, post.thinned(CATALOGUE_PARTICLES), pool, at, cart)
            n = min(n_candidates, len(pool))
            top = np.argpartition(-value, n - 1)[:n]
            catalogue_pages[rid] = pool[top[np.argsort(-value[top], kind="stable")]]
            out.append(catalogue_pages[rid])
        log.info("history oracle: %d requests, %.0f s", len(ess), time.perf_counter() - started)
        return out

    def over_history_candidates(requests: pd.DataFrame, state: Any) -> list[np.ndarray]:
        return [
            oracle.optimal(
                user,
                catalogue_pages[rid],
                20,
                at=pd.Timestamp(at),
                cart_item_ids=market.cart_of(rid) if len(market.cart_of(rid)) else None,
            )
            for rid, user, at in rows(requests)
        ]

    models = {
        "ranker": _model_policy(store, candidates, served.egmv),
        "optimal_over_candidates": _oracle_over_candidates(oracle, candidates, 20),
        "history_oracle:candidates": reranked(bayes, posterior_of),
        "prior_oracle:candidates": reranked(bayes, lambda user, at: prior),
        "history_appeal_oracle:candidates": reranked(appeal_bayes, posteriors(appeal_bayes, False)),
        "history_content_oracle:candidates": reranked(
            content_bayes, posteriors(content_bayes, False)
        ),
        "prior_appeal_oracle:candidates": reranked(appeal_bayes, lambda user, at: appeal_prior),
        "prior_content_oracle:candidates": reranked(content_bayes, lambda user, at: content_prior),
        "history_oracle:catalogue": catalogue,  # fills catalogue_pages: before the next one
        "optimal_over_candidates:history_oracle": over_history_candidates,
    }
    table = shares(replay.evaluate(models, n_requests), "optimal_over_candidates")
    quantiles = [0.05, 0.25, 0.5, 0.75, 0.95]

    def spread(values: list[float] | list[int]) -> dict[str, float]:
        return {
            str(q): float(v) for q, v in zip(quantiles, np.quantile(values, quantiles), strict=True)
        }

    return {
        "dataset": dataset,
        "requests": n_requests,
        "particles": particles,
        "policies": table,
        "posterior_ess": spread(ess),
        "history_impressions": spread(history_sizes),
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    ap = arguments(__doc__)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--particles", type=int, default=PARTICLES)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    paths = paths_of(args)
    result = run(paths.home, args.dataset, args.requests, args.particles)
    out = write_report(paths, "history_oracle.json", result)
    print_shares(result["policies"], 42)
    print("posterior ESS quantiles:", {k: round(v) for k, v in result["posterior_ess"].items()})
    print(f"{result['seconds']:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
