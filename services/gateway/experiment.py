"""A/B experiments: which arm a user is in, and what that arm serves.

An experiment is configuration (a YAML or JSON file, ``HOMEFEED_GATEWAY_EXPERIMENT``)::

    name: champion-vs-heuristic
    salt: exp-2026-12          # a new salt reshuffles every user
    arms:
      - {name: champion, share: 0.5, policy: model}            # the stable ranking bundle
      - {name: heuristic, share: 0.5, policy: heuristic}       # popularity x recency order

A user's arm is a salted hash of the user id (``user_bucket``: 10,000 buckets), so it is
the same on every request and every gateway replica, and independent of the canary's hash
(another salt). Shares may sum to less than 1: the rest of the users are not in the
experiment. ``policy: model`` ranks with the stable ranking deployment (``model_version``,
when given, must be the version the gateway serves: the gateway refuses to start
otherwise); ``policy: heuristic`` skips ranking and orders the candidates by the heuristic
score, exactly as the ranking fallback would, but without the degradation flag.

A canary release and an experiment never assign one user two ways: a user the canary
holds is served by the canary and left out of the experiment (``experiment_arm`` empty),
so no experiment arm mixes two ranking bundles. The analysis counts users by their logged
arm, so the canary's share shows as fewer users, not as a sample-ratio mismatch between
arms.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from services.common.rollout_stats import BUCKETS, user_bucket

MODEL = "model"
HEURISTIC = "heuristic"
POLICIES = (MODEL, HEURISTIC)
MAX_ARMS = 8


class ExperimentError(ValueError):
    """The experiment's configuration is malformed; the message names the field."""


@dataclass(frozen=True)
class Arm:
    name: str
    share: float
    policy: str = MODEL
    model_version: str = ""


@dataclass(frozen=True)
class Experiment:
    name: str
    salt: str
    arms: tuple[Arm, ...]

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 64:
            raise ExperimentError("experiment name must be 1..64 characters")
        if not self.salt:
            raise ExperimentError("experiment salt must not be empty")
        if not 1 <= len(self.arms) <= MAX_ARMS:
            raise ExperimentError(f"an experiment has 1..{MAX_ARMS} arms, got {len(self.arms)}")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ExperimentError(f"arm names must be unique, got {names}")
        for arm in self.arms:
            if not arm.name or len(arm.name) > 64:
                raise ExperimentError("arm names must be 1..64 characters")
            if arm.policy not in POLICIES:
                raise ExperimentError(
                    f"arm {arm.name!r}: policy must be one of {', '.join(POLICIES)}, "
                    f"got {arm.policy!r}"
                )
            if not 0.0 < arm.share <= 1.0:
                raise ExperimentError(f"arm {arm.name!r}: share must be in (0, 1]")
        if sum(a.share for a in self.arms) > 1.0 + 1e-9:
            raise ExperimentError("arm shares must sum to at most 1")

    @property
    def edges(self) -> list[int]:
        """Cumulative bucket edges: arm k holds buckets [edges[k-1], edges[k])."""
        edges, total = [], 0.0
        for arm in self.arms:
            total += arm.share
            edges.append(round(total * BUCKETS))
        return edges

    def arm_of(self, user_id: int) -> Arm | None:
        """The user's arm; None when the user is outside every arm's share."""
        bucket = user_bucket(user_id, self.salt)
        for arm, edge in zip(self.arms, self.edges, strict=True):
            if bucket < edge:
                return arm
        return None

    def expected_shares(self) -> dict[str, float]:
        return {a.name: a.share for a in self.arms}

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "salt": self.salt,
            "arms": [
                {
                    "name": a.name,
                    "share": a.share,
                    "policy": a.policy,
                    "model_version": a.model_version,
                }
                for a in self.arms
            ],
        }

    @classmethod
    def from_mapping(cls, data: Any) -> Experiment:
        if not isinstance(data, dict):
            raise ExperimentError("an experiment is a mapping with name, salt and arms")
        unknown = sorted(set(data) - {"name", "salt", "arms"})
        if unknown:
            raise ExperimentError(f"unknown experiment fields: {', '.join(unknown)}")
        arms = data.get("arms")
        if not isinstance(arms, list):
            raise ExperimentError("experiment arms must be a list")
        parsed = []
        for i, arm in enumerate(arms):
            if not isinstance(arm, dict):
                raise ExperimentError(f"arms[{i}] must be a mapping")
            extra = sorted(set(arm) - {"name", "share", "policy", "model_version"})
            if extra:
                raise ExperimentError(f"arms[{i}]: unknown fields {', '.join(extra)}")
            try:
                parsed.append(
                    Arm(
                        name=str(arm["name"]),
                        share=float(arm["share"]),
                        policy=str(arm.get("policy", MODEL)),
                        model_version=str(arm.get("model_version", "") or ""),
                    )
                )
            except (KeyError, TypeError, ValueError) as err:
                raise ExperimentError(f"arms[{i}] needs name and a numeric share: {err}") from None
        return cls(
            name=str(data.get("name", "")), salt=str(data.get("salt", "")), arms=tuple(parsed)
        )

    @classmethod
    def load(cls, path: str | Path) -> Experiment:
        """From a YAML (or JSON) file; ExperimentError naming the file otherwise."""
        path = Path(path)
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as err:
            raise ExperimentError(f"cannot read the experiment {path}: {err}") from None
        try:
            return cls.from_mapping(data)
        except ExperimentError as err:
            raise ExperimentError(f"{path}: {err}") from None

    def check_versions(self, served_version: str) -> None:
        """A ``model`` arm naming a version must name the one the stable ranking serves."""
        for arm in self.arms:
            if arm.policy == MODEL and arm.model_version and arm.model_version != served_version:
                raise ExperimentError(
                    f"arm {arm.name!r} wants model version {arm.model_version}, but the "
                    f"gateway serves {served_version or 'an unknown version'}: release it "
                    "first (homefeed rollout start), or drop model_version"
                )
