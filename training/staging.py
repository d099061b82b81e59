"""The training run's configuration and its staging folder (``artifacts/staging/<dataset>/``,
laid out like a bundle), shared by the stages of ``training.train`` and by evaluation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.paths import Paths
from contract.scorer import EVIDENCE_KAPPA
from contract.tower import VALUE_WEIGHT as RETRIEVAL_VALUE_WEIGHT
from training.report import json_default

STAGE_REPORT = "stage_reports.json"


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    k: int = 20  # slots the policies are compared on
    eval_requests: int = 1000  # test-period requests the Oracle scores
    candidates: int = 500  # retrieval candidates a model policy re-ranks
    # heuristic-logged test requests the ranker's off-policy estimates read (0: no OPE);
    # each one the policies' sample did not already rank costs a 500-candidate feature join
    ope_requests: int = 2000
    ranker_trials: int = 8  # Optuna trials per model
    # the purchase model as p(click) x p(label | click) where the log allows it
    two_stage: bool = True
    ranker_seconds: float = 1800.0  # wall-clock safety net per model (the budget is trials)
    # the served E[GMV]'s shrink by the item's logged impressions (contract.scorer; 0: none)
    evidence_kappa: float = EVIDENCE_KAPPA
    # value-aware retrieval: the index scores taste + w x log(price x margin)
    # (training.retrieval.towers.TowerConfig.value_weight; 0: taste alone)
    retrieval_value_weight: float = RETRIEVAL_VALUE_WEIGHT


def staging_dir(paths: Paths, dataset: str) -> Path:
    return paths.artifacts / "staging" / dataset


def read_stage_reports(stage_dir: Path) -> dict[str, Any]:
    path = stage_dir / STAGE_REPORT
    return json.loads(path.read_text()) if path.exists() else {}


def save_stage_report(stage_dir: Path, stage: str, report: dict[str, Any]) -> None:
    reports = read_stage_reports(stage_dir)
    reports[stage] = report
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / STAGE_REPORT).write_text(json.dumps(reports, indent=2, default=json_default))
