"""Ablations of the served ranker: what each lever is worth, switched off alone.

The evaluation stage scores every ablation on the same Oracle requests as the served ranker
(``training.evaluate``: ``report["ablation"]``). Two kinds of lever:

- **model levers**, trained here by the rankers stage: the purchase model refitted with the
  tuned parameters (no new search), early-stopped and calibrated exactly as the served one,
  on a training set without the lever. A feature lever sets its columns to 0 in train and
  valid: a constant column is never split on, so the model is the one the feature's absence
  would give. With the linear offset on, each lever's model is boosted from a logistic
  regression fitted on its own training set (a zeroed column gets coefficient 0).
  ``linear_offset`` is the trees boosted from 0. With a two-stage served model, each lever
  refits both stages (the click stage with its tuned parameters and its own offset, the
  conversion stage with its own), and ``two_stage`` is the one-stage model, found by its own
  search of the same budget. Saved under ``eval/ablation/<lever>/`` (LightGBM text +
  calibrator [+ linear offset] [+ the click stage and its offset]).
- **serving levers**, applied by the evaluation alone: the retrieval PROFILE source off, the
  isotonic calibration off (the raw probability times the item's value), or the evidence
  shrink off (``contract.scorer.EvidenceShrink``; every other lever keeps it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np

from contract.calibration import Calibrator
from contract.features import CONTENT_AFFINITY_EXPECTED, FEATURE_SCHEMA, ORGANIC_CONTEXT
from contract.scorer import EVIDENCE_FEATURE, LinearOffset
from feature_repo import schema as S
from training.ranking.calibration import fit_isotonic
from training.ranking.models import (
    RankerBudget,
    RankingData,
    boosted,
    click_stage,
    conversion_stage,
    fit_purchase,
    offset_probability,
    purchase_datasets,
    tune_purchase,
    two_stage_probability,
)

log = logging.getLogger(__name__)

ABLATION_DIR = "eval/ablation"  # evaluation material, never part of a served bundle
MODEL_FILE = "purchase.txt"
CALIBRATOR_FILE = "calibrator.json"
OFFSET_FILE = "linear_offset.json"
CLICK_FILE = "click.txt"
CLICK_OFFSET_FILE = "click_offset.json"
TWO_STAGE = "two_stage"  # the lever: the served two stages against one purchase model

# model levers: (feature columns removed from the purchase model, budget changes)
FEATURE_LEVERS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "content_affinity_feature": ((S.CONTENT_AFFINITY_FOR_ITEM, CONTENT_AFFINITY_EXPECTED), {}),
    "profile_evidence_feature": ((CONTENT_AFFINITY_EXPECTED, S.CONTENT_PROFILE_WEIGHT), {}),
    "category_affinity_feature": ((S.AFFINITY_FOR_ITEM,), {}),
    "monotone_price": ((), {"monotone_price": False}),
    "organic_context_feature": ((ORGANIC_CONTEXT,), {}),
    "linear_offset": ((), {"linear_offset": False}),
    "impressions_total_feature": ((EVIDENCE_FEATURE,), {}),
}
# what each lever is, for the report (serving levers included)
LEVERS: dict[str, str] = {
    "content_affinity_feature": "ranker without content_affinity_for_item and "
    "content_affinity_expected (user content profile x item content)",
    "profile_evidence_feature": "ranker without content_profile_weight and "
    "content_affinity_expected (the cosine not weighed by the profile's evidence)",
    "category_affinity_feature": "ranker without category_affinity_for_item",
    "profile_candidates": "retrieval without the PROFILE source (history + ANN only)",
    "calibration": "raw p(purchase) x value, no isotonic calibration",
    "monotone_price": "ranker without the decreasing-in-price constraint",
    "organic_context_feature": "ranker trained without organic_context (organic rows look "
    "like feed slots)",
    "linear_offset": "purchase trees boosted from 0, not from the logistic log-odds (two "
    "stages: the click stage's)",
    TWO_STAGE: "one purchase model (its own search), not p(click) x p(purchase | click)",
    "impressions_total_feature": "ranker without impressions_total (the shrink still reads it)",
    "evidence_shrink": "E[GMV] not shrunk by the item's logged impressions",
    "retrieval_value": "retrieval by the tower's taste alone, without the index's "
    "log(price x margin) column",
}


@dataclass
class AblatedModel:
    booster: lgb.Booster
    calibrator: Calibrator
    offset: LinearOffset | None = None
    click: lgb.Booster | None = None  # the click stage of a two-stage model
    click_offset: LinearOffset | None = None

    def egmv_probability(self, X: np.ndarray) -> np.ndarray:
        raw = two_stage_probability(self.booster, self.offset, self.click, self.click_offset, X)
        return np.asarray(self.calibrator.apply(raw))


def without(data: RankingData, features: tuple[str, ...]) -> RankingData:
    """``data`` with ``features`` set to 0 (a copy of the matrix)."""
    X = data.X.copy()
    for name in features:
        X[:, FEATURE_SCHEMA.index(name)] = 0.0
    return dataclasses.replace(data, X=X)


def _one_stage(
    train: RankingData, valid: RankingData, budget: RankerBudget, seed: int
) -> AblatedModel:
    """The one-stage purchase model the served recipe would have shipped: boosted from its
    linear offset, tuned by its own search of ``budget``."""
    tr, va, offset = boosted(train, valid, budget)
    search = tune_purchase(tr, va, budget, seed, name="one-stage purchase")
    raw = offset_probability(search.best.booster, offset, va.X)
    return AblatedModel(search.best.booster, fit_isotonic(raw, va.label, va.sample_weight), offset)


def _two_stages(
    train: RankingData,
    valid: RankingData,
    params: dict[str, Any],
    click_params: dict[str, Any],
    budget: RankerBudget,
    seed: int,
) -> AblatedModel:
    """The served two-stage recipe with fixed parameters: the click stage boosted from its
    own offset (when ``budget.linear_offset``), the conversion stage from 0."""
    click_train, click_valid, click_offset = boosted(click_stage(train), click_stage(valid), budget)
    click = fit_purchase(
        *purchase_datasets(click_train, click_valid, budget), click_params, budget, seed
    )
    conversion = fit_purchase(
        *purchase_datasets(conversion_stage(train), conversion_stage(valid), budget),
        params,
        budget,
        seed,
    )
    raw = two_stage_probability(conversion.booster, None, click.booster, click_offset, valid.X)
    calibrator = fit_isotonic(raw, valid.label, valid.sample_weight)
    return AblatedModel(conversion.booster, calibrator, None, click.booster, click_offset)


def train_ablations(
    train: RankingData,
    valid: RankingData,
    params: dict[str, Any],
    budget: RankerBudget,
    seed: int,
    levers: dict[str, tuple[tuple[str, ...], dict[str, Any]]] | None = None,
    click_params: dict[str, Any] | None = None,
) -> dict[str, AblatedModel]:
    """One purchase model per model lever, with the tuned ``params`` (two stages when
    ``click_params``, the click stage's tuned parameters, are given; then also the
    ``two_stage`` lever, unless ``levers`` names the levers)."""
    out: dict[str, AblatedModel] = {}
    if click_params is not None and levers is None:
        out[TWO_STAGE] = _one_stage(train, valid, budget, seed)
        log.info("ablation %s: %d rounds", TWO_STAGE, out[TWO_STAGE].booster.num_trees())
    for lever, (features, changes) in (FEATURE_LEVERS if levers is None else levers).items():
        missing = [f for f in features if f not in FEATURE_SCHEMA.names]
        if missing:
            log.warning("ablation %s: features %s not in the schema, skipped", lever, missing)
            continue
        # a column that never varies is never split on (and standardizes to 0 in the offset):
        # e.g. no organic rows, or only organic ones (Complete Journey): nothing to remove
        idle = [f for f in features if np.ptp(train.X[:, FEATURE_SCHEMA.index(f)]) == 0]
        if features and len(idle) == len(features):
            log.info("ablation %s: %s constant in every training row, skipped", lever, idle)
            continue
        tr, va = without(train, features), without(valid, features)
        lever_budget = dataclasses.replace(budget, **changes)
        if click_params is not None:
            out[lever] = _two_stages(tr, va, params, click_params, lever_budget, seed)
            log.info("ablation %s: two stages", lever)
            continue
        tr, va, offset = boosted(tr, va, lever_budget)
        dtrain, dvalid = purchase_datasets(tr, va, lever_budget)
        fit = fit_purchase(dtrain, dvalid, params, lever_budget, seed)
        raw = offset_probability(fit.booster, offset, va.X)
        calibrator = fit_isotonic(raw, va.label, va.sample_weight)
        out[lever] = AblatedModel(fit.booster, calibrator, offset)
        log.info("ablation %s: %d rounds", lever, fit.booster.num_trees())
    return out


def save(models: dict[str, AblatedModel], stage: Path) -> None:
    """Write every lever's model, replacing whatever an earlier run left (a lever's old
    offset file would otherwise be read with its new trees)."""
    shutil.rmtree(stage / ABLATION_DIR, ignore_errors=True)
    for lever, model in models.items():
        folder = stage / ABLATION_DIR / lever
        folder.mkdir(parents=True, exist_ok=True)
        model.booster.save_model(str(folder / MODEL_FILE))
        (folder / CALIBRATOR_FILE).write_text(json.dumps(model.calibrator.to_dict()) + "\n")
        if model.offset is not None:
            (folder / OFFSET_FILE).write_text(json.dumps(model.offset.to_dict()) + "\n")
        if model.click is not None:
            model.click.save_model(str(folder / CLICK_FILE))
        if model.click_offset is not None:
            (folder / CLICK_OFFSET_FILE).write_text(json.dumps(model.click_offset.to_dict()) + "\n")


def load(stage: Path) -> dict[str, AblatedModel]:
    root = stage / ABLATION_DIR
    out: dict[str, AblatedModel] = {}
    if not root.is_dir():
        return out
    for folder in sorted(p for p in root.iterdir() if (p / MODEL_FILE).exists()):
        calibrator = Calibrator.from_dict(json.loads((folder / CALIBRATOR_FILE).read_text()))
        click = folder / CLICK_FILE
        out[folder.name] = AblatedModel(
            lgb.Booster(model_file=str(folder / MODEL_FILE)),
            calibrator,
            LinearOffset.read(folder / OFFSET_FILE),
            lgb.Booster(model_file=str(click)) if click.exists() else None,
            LinearOffset.read(folder / CLICK_OFFSET_FILE),
        )
    return out
