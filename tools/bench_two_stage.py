"""Issue 13: a two-stage purchase model, p(click) x p(purchase | click), against the one-stage
model, each refitted with the staged model's tuned parameters and scored by the Oracle on
the same requests (measured when the served model was one stage; a two-stage staging's
click stage keeps its own parameters, and the one-stage refit reuses the conversion
stage's).

``python -m tools.bench_two_stage [--dataset sim-small] [--seeds 0,1,2] [--requests 1000]``
(after ``make demo``). Clicks outnumber purchases about ten to one in the training sets
(sim-small: 250,213 clicked rows, 22,408 purchases), so a click stage learns taste, appeal
and price from ten times the positives, and the conversion stage, fitted on the clicked
rows only, learns what turns a click into a purchase. For each LightGBM seed (bagging and
feature sampling) it fits, on the rankers stage's train and valid splits:

- ``one_stage``: the served recipe, the purchase trees boosted from their linear offset;
- ``two_stage``: the click stage boosted from a linear offset fitted on the click label,
  times the conversion stage boosted from 0;
- ``two_stage_offsets``: the same with the conversion stage boosted from its own offset.

Every model is calibrated by isotonic regression on valid (the product, for two stages)
and scored as the ranker is (calibrated p x price x margin x the bundle's evidence shrink)
over the served ranker's candidates. Writes ``reports/two_stage.json`` and prints each
seed's figures with the change against the one-stage model of the same seed.
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

from tools.bench_history_oracle import Replay
from tools.offline_bench import arguments, paths_of, write_report
from training.stages import Paths

log = logging.getLogger(__name__)

VARIANTS = ("one_stage", "two_stage", "two_stage_offsets")
Scorer = Callable[[np.ndarray], np.ndarray]


def product(first: Scorer, second: Scorer) -> Scorer:
    return lambda X: first(X) * second(X)


def calibrated(raw: Scorer, calibrator: Any) -> Scorer:
    return lambda X: np.asarray(calibrator.apply(raw(X)))


@dataclasses.dataclass
class Splits:
    """The rankers stage's train and valid splits, each stage's view of them, and the staged
    model's tuned parameters: read once, refitted per seed."""

    data: dict[str, Any]  # split -> RankingData
    click: dict[str, Any]  # every row, labelled by its click
    conversion: dict[str, Any]  # the clicked rows
    params: dict[str, Any]
    click_params: dict[str, Any]

    @classmethod
    def read(cls, home: Path, dataset: str) -> Splits:
        from training.ranking.models import click_stage, conversion_stage
        from training.ranking.train import ranking_data, read_split
        from training.staging import read_stage_reports, staging_dir

        best = read_stage_reports(staging_dir(Paths(home), dataset))["rankers"]["best_params"]
        data = {s: ranking_data(read_split(home, dataset, s)) for s in ("train", "valid")}
        return cls(
            data=data,
            click={s: click_stage(d) for s, d in data.items()},
            conversion={s: conversion_stage(d) for s, d in data.items()},
            params=best["purchase"],
            # a two-stage staging: its click stage's own parameters (the conversion stage's
            # serve the one-stage refit too; the ablation's two_stage lever is the one-stage
            # model's own search)
            click_params=best.get("click", best["purchase"]),
        )


def fit_variants(splits: Splits, seed: int) -> tuple[dict[str, Scorer], dict[str, Any]]:
    """Each variant's calibrated p(purchase) scorer, and its validation figures."""
    from training import metrics as M
    from training.ranking.calibration import fit_isotonic
    from training.ranking.models import (
        RankerBudget,
        boosted,
        fit_purchase,
        offset_probability,
        purchase_datasets,
    )

    budget = RankerBudget(progress=False)
    from_zero = dataclasses.replace(budget, linear_offset=False)

    def stage(split: dict[str, Any], offset_on: bool, p: dict[str, Any]) -> Scorer:
        train, valid, offset = boosted(
            split["train"], split["valid"], budget if offset_on else from_zero
        )
        fit = fit_purchase(*purchase_datasets(train, valid, budget), p, budget, seed)
        return lambda X: offset_probability(fit.booster, offset, X)

    raws: dict[str, Scorer] = {"one_stage": stage(splits.data, True, splits.params)}
    click_stage = stage(splits.click, True, splits.click_params)
    for name, offset_on in (("two_stage", False), ("two_stage_offsets", True)):
        conv = stage(splits.conversion, offset_on, splits.params)
        raws[name] = product(conv, click_stage)
    valid = splits.data["valid"]
    scorers: dict[str, Scorer] = {}
    figures: dict[str, Any] = {}
    for name, raw in raws.items():
        p = raw(valid.X)
        calibrator = fit_isotonic(p, valid.label, valid.sample_weight)
        scorers[name] = calibrated(raw, calibrator)
        figures[name] = {
            "valid_auc": M.auc(valid.label, p, valid.sample_weight),
            "valid_log_loss_calibrated": M.log_loss(
                valid.label, calibrator.apply(p), valid.sample_weight
            ),
        }
    return scorers, figures


def run(
    home: Path, dataset: str, seeds: list[int], n_requests: int, request_seed: int = 0
) -> dict[str, Any]:
    from training.evaluate import _model_policy

    started = time.perf_counter()
    replay = Replay.open(home, dataset)
    served = replay.served
    models: dict[str, Any] = {"ranker": _model_policy(replay.store, replay.candidates, served.egmv)}
    fits: dict[str, Any] = {}
    splits = Splits.read(home, dataset)
    for seed in seeds:
        scorers, fits[str(seed)] = fit_variants(splits, seed)
        for name, scorer in scorers.items():
            models[f"{name}@{seed}"] = _model_policy(
                replay.store, replay.candidates, served.scored_by(scorer)
            )
        log.info("seed %d fitted, %.0f s", seed, time.perf_counter() - started)
    summary = replay.evaluate(models, n_requests, request_seed)
    value = {name: row["oracle_egmv_per_1k"] for name, row in summary.items()}
    per_seed = {
        str(seed): {
            name: {
                "oracle_egmv_per_1k": value[f"{name}@{seed}"],
                "change_vs_one_stage": value[f"{name}@{seed}"] / value[f"one_stage@{seed}"] - 1,
                **fits[str(seed)][name],
            }
            for name in VARIANTS
        }
        for seed in seeds
    }
    mean_change = {
        name: float(np.mean([per_seed[str(s)][name]["change_vs_one_stage"] for s in seeds]))
        for name in VARIANTS
    }
    return {
        "dataset": dataset,
        "requests": n_requests,
        "request_seed": request_seed,
        "served_ranker": value["ranker"],
        "optimal": value["optimal"],
        "seeds": per_seed,
        "mean_change_vs_one_stage": mean_change,
        "rows": {
            "train": len(splits.data["train"].X),
            "train_clicked": int(splits.click["train"].label.sum()),
            "train_label": int(splits.data["train"].label.sum()),
        },
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    ap = arguments(__doc__)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--request-seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    paths = paths_of(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    result = run(paths.home, args.dataset, seeds, args.requests, args.request_seed)
    out = write_report(paths, "two_stage.json", result)
    print(f"served ranker {result['served_ranker']:.1f} E[GMV]/1k, {args.requests} requests")
    print(f"{'seed':>4s} {'variant':18s} {'E[GMV]/1k':>10s} {'change':>8s} {'valid logloss':>14s}")
    for seed, rows in result["seeds"].items():
        for name, row in rows.items():
            print(
                f"{seed:>4s} {name:18s} {row['oracle_egmv_per_1k']:10.1f}"
                f" {row['change_vs_one_stage']:+8.1%} {row['valid_log_loss_calibrated']:14.6f}"
            )
    for name, change in result["mean_change_vs_one_stage"].items():
        print(f"mean change of {name}: {change:+.1%}")
    print(f"{result['seconds']:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
