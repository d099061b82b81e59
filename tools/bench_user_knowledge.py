"""Issue 13: what each part of knowing the user is worth, and how much of it the logs give.

``python -m tools.bench_user_knowledge [--dataset sim-small] [--requests 1000]`` (after
``make demo``) orders the served ranker's own candidates with the simulator's exact
response model, every item term known, and the user's hidden parameters replaced, one
group at a time, by a plug-in value:

- ``known``: the true taste, price sensitivity and budget (the Oracle over the candidates,
  the checkout cart's category term included);
- ``budget_hidden``, ``sensitivity_hidden``, ``price_hidden`` (both), ``taste_hidden``
  (affinity 0 with every item), ``all_hidden``: the population's median budget and
  sensitivity in place of the user's own;
- ``taste_read``: the taste read from the user's logs, the content profile's rule (clicks
  1, purchases 3, organic impressions 1 over the 30 days before the test period) applied
  to each item's latent vector as content tells it (the least-squares linear read of the
  latent from content over the catalogue, unit length; the read knows the latent vectors,
  so it is the best a linear read of content can do, not something a model could fit);
  sensitivity and budget true;
- ``taste_read_budget_known``, ``taste_read_budget_read``, ``taste_read_price_hidden``:
  that taste with the median sensitivity and the true budget, the budget read from the
  logs, or the median budget. The budget read is the best linear read of the log budget
  from two statistics of the same 30 days (the mean log price of the items shown to the
  user and how far the clicked items' mean log price sits above it), least squares
  against the true budgets, shrunk toward the median by clicks / (clicks + 5).

Plug-in values are not a posterior: a Bayes policy that weighed the uncertainty would earn
at least as much (``tools.bench_history_oracle`` does that for the whole user). These rows
say which part of the user matters for the value of a page, and how well the logs read
it. Writes ``reports/user_knowledge.json`` and prints each policy's share of the Oracle's
best page over the candidates, with the reads' correlations with the truth.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from contract import columns as C
from tools.bench_history_oracle import Replay, latent_read, print_shares, shares
from tools.offline_bench import arguments, paths_of, write_report

log = logging.getLogger(__name__)

PROFILE_DAYS = 30  # the content profile's window (training.features.user_content_profile)
WEIGHTS = {"click": 1.0, "purchase": 3.0, "organic": 1.0}  # its event weights
BUDGET_SHRINK_CLICKS = 5.0  # the budget read's pull toward the median: clicks / (clicks + 5)


def window_events(
    tables: dict[str, pd.DataFrame], start: pd.Timestamp
) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """The impressions of the ``PROFILE_DAYS`` before ``start``, which of them were clicked,
    and their purchases (user_id, item_id)."""
    imp = tables[C.IMPRESSIONS]
    imp = imp[(imp[C.TS] < start) & (imp[C.TS] >= start - pd.Timedelta(days=PROFILE_DAYS))]
    clicked = imp[C.IMPRESSION_ID].isin(tables[C.CLICKS][C.IMPRESSION_ID]).to_numpy()
    bought = tables[C.PURCHASES]
    bought = bought[bought[C.TS] < start].merge(
        imp[[C.IMPRESSION_ID, C.USER_ID, C.ITEM_ID]], on=C.IMPRESSION_ID
    )
    return imp, clicked, bought


def taste_read(
    imp: pd.DataFrame, clicked: np.ndarray, bought: pd.DataFrame, latent: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per user: the unit-length weighted sum of the engaged items' ``latent`` rows (zero
    without engagement) and the weight behind it."""
    organic = (imp[C.POLICY].to_numpy() == C.POLICY_ORGANIC) * WEIGHTS["organic"]
    weight = np.r_[organic + clicked * WEIGHTS["click"], np.full(len(bought), WEIGHTS["purchase"])]
    users = np.r_[imp[C.USER_ID].to_numpy(np.int64), bought[C.USER_ID].to_numpy(np.int64)]
    rows = np.r_[imp[C.ITEM_ID].to_numpy(np.int64), bought[C.ITEM_ID].to_numpy(np.int64)]
    taste = np.zeros((n, latent.shape[1]))
    np.add.at(taste, users, weight[:, None] * latent[rows])
    norm = np.linalg.norm(taste, axis=1, keepdims=True)
    taste = np.where(norm > 0, taste / np.maximum(norm, 1e-12), 0.0)
    return taste, np.bincount(users, weights=weight, minlength=n)


def budget_read(
    imp: pd.DataFrame, clicked: np.ndarray, log_price: np.ndarray, budget: np.ndarray
) -> tuple[np.ndarray, dict[str, float]]:
    """Every user's budget read from the window's prices (the median where the user clicked
    nothing), and the read's fit: coefficients and correlation with the log budget."""
    lp = log_price[imp[C.ITEM_ID].to_numpy(np.int64)]
    frame = pd.DataFrame({"user": imp[C.USER_ID].to_numpy(np.int64), "lp": lp, "c": clicked})
    shown = frame.groupby("user")["lp"].mean()
    clicks = frame[frame["c"]].groupby("user")["lp"].agg(["mean", "size"])
    stats = pd.DataFrame({"shown": shown}).join(clicks, how="inner")
    users = stats.index.to_numpy(np.int64)
    A = np.c_[np.ones(len(stats)), stats["shown"], stats["mean"] - stats["shown"]]
    truth = np.log(budget[users])
    coef, *_ = np.linalg.lstsq(A, truth, rcond=None)
    median = np.log(np.median(budget))
    k = stats["size"].to_numpy() / (stats["size"].to_numpy() + BUDGET_SHRINK_CLICKS)
    read = median + k * (A @ coef - median)
    out = np.full(len(budget), np.exp(median))
    out[users] = np.exp(read)
    fit = {
        "users_read": len(users),
        "intercept": float(coef[0]),
        "shown_log_price": float(coef[1]),
        "click_lift": float(coef[2]),
        "r_log_budget": float(np.corrcoef(read, truth)[0, 1]),
    }
    return out, fit


def run(home: Path, dataset: str, n_requests: int, n_candidates: int = 500) -> dict[str, Any]:
    from training.evaluate import _model_policy
    from training.simulate import Oracle

    started = time.perf_counter()
    replay = Replay.open(home, dataset, n_candidates)
    tables, oracle, market = replay.tables, replay.oracle, replay.market
    truth, candidates = oracle.truth, replay.candidates
    n = len(truth.user_budget)
    median_budget = np.full(n, float(np.median(truth.user_budget)))
    median_sensitivity = np.full(n, float(np.median(truth.user_price_sensitivity)))
    no_taste = np.zeros_like(truth.user_taste)
    imp, clicked, bought = window_events(tables, replay.start)
    read, evidence = taste_read(
        imp, clicked, bought, latent_read(replay.items, truth.item_latent), n
    )
    budget, budget_fit = budget_read(imp, clicked, np.log(truth.item_price), truth.user_budget)
    engaged = evidence > 0
    reads = {
        "users": n,
        "users_with_taste_read": int(engaged.sum()),
        "taste_cosine_mean": float(np.einsum("ud,ud->u", read, truth.user_taste)[engaged].mean()),
        "budget": budget_fit,
    }

    def believing(**hidden: Any) -> Any:
        """The exact model's order of the candidates, the user's parameters replaced."""
        model = Oracle(dataclasses.replace(truth, **hidden))

        def policy(requests: pd.DataFrame, state: Any) -> list[np.ndarray]:
            out = []
            for rid, user, at, found in zip(
                requests[C.REQUEST_ID],
                requests[C.USER_ID],
                requests[C.TS],
                candidates(requests, state),
                strict=True,
            ):
                cart = market.cart_of(int(rid))
                out.append(
                    model.optimal(
                        int(user),
                        np.asarray(found, dtype=np.int64),
                        20,
                        at=pd.Timestamp(at),
                        cart_item_ids=cart if len(cart) else None,
                    )
                )
            return out

        return policy

    price_hidden = {"user_budget": median_budget, "user_price_sensitivity": median_sensitivity}
    models = {
        "ranker": _model_policy(replay.store, candidates, replay.served.egmv),
        "known": believing(),
        "budget_hidden": believing(user_budget=median_budget),
        "sensitivity_hidden": believing(user_price_sensitivity=median_sensitivity),
        "price_hidden": believing(**price_hidden),
        "taste_hidden": believing(user_taste=no_taste),
        "all_hidden": believing(user_taste=no_taste, **price_hidden),
        "taste_read": believing(user_taste=read),
        "taste_read_budget_known": believing(
            user_taste=read, user_price_sensitivity=median_sensitivity
        ),
        "taste_read_budget_read": believing(
            user_taste=read, user_budget=budget, user_price_sensitivity=median_sensitivity
        ),
        "taste_read_price_hidden": believing(user_taste=read, **price_hidden),
    }
    summary = replay.evaluate(models, n_requests)
    return {
        "dataset": dataset,
        "requests": n_requests,
        "policies": shares(summary, "known"),
        "reads": reads,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    ap = arguments(__doc__)
    ap.add_argument("--requests", type=int, default=1000)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    paths = paths_of(args)
    result = run(paths.home, args.dataset, args.requests)
    out = write_report(paths, "user_knowledge.json", result)
    print_shares(result["policies"], 26)
    reads = result["reads"]
    print(
        f"taste read: mean cosine with the true taste {reads['taste_cosine_mean']:.3f} over "
        f"{reads['users_with_taste_read']:,} of {reads['users']:,} users; budget read: r "
        f"{reads['budget']['r_log_budget']:.3f} with the log budget"
    )
    print(f"{result['seconds']:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
