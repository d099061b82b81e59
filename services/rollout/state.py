"""A rollout as the controller keeps it: what was asked (``RolloutSpec``), where it is
(phase, step, weight, failed checks) and what happened (every analysis window with its
figures, checks and decision; events such as "started", "promoted", "aborted").

The whole state is one JSON document (``RolloutState.to_json``): the current rollout and
the history of finished ones. Locally it is a file written atomically; in Kubernetes the
``data["state.json"]`` of a ConfigMap (``store.py``). Either way it is all a restarted
controller needs to resume at the same step.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

STATE_VERSION = 1

STARTING = "STARTING"  # waiting for the canary deployment to be ready
PROGRESSING = "PROGRESSING"
PROMOTING = "PROMOTING"  # alias moved, stable reloading
PROMOTED = "PROMOTED"
FAILED = "FAILED"  # rolled back by the analysis
ABORTED = "ABORTED"  # stopped by an operator
UNDONE = "UNDONE"  # promoted, then rolled back by an operator
ACTIVE = frozenset({STARTING, PROGRESSING, PROMOTING})
PHASES = (STARTING, PROGRESSING, PROMOTING, PROMOTED, FAILED, ABORTED, UNDONE)

MAX_WINDOWS = 500  # per rollout; the oldest are dropped beyond it
MAX_HISTORY = 50  # finished rollouts kept


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class RolloutSpec:
    """What a rollout was asked to do; the defaults and their reasons are in
    ``docs/releasing.md``."""

    version: str
    steps: tuple[int, ...] = (5, 25, 50, 100)
    interval_s: float = 60.0
    threshold: int = 3
    mirror_share: float = 0.05
    min_feeds: int = 20

    def __post_init__(self) -> None:
        if not self.version.isdigit():
            raise ValueError(f"version must be a registry version number, got {self.version!r}")
        steps = tuple(int(s) for s in self.steps)
        if not steps or steps[-1] != 100 or any(not 0 < s <= 100 for s in steps):
            raise ValueError(f"steps must be percentages in 1..100 ending at 100, got {steps}")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError(f"steps must increase, got {steps}")
        object.__setattr__(self, "steps", steps)
        if not 0.5 <= self.interval_s <= 86_400:
            raise ValueError(f"interval_s must be 0.5..86400 s, got {self.interval_s}")
        if not 1 <= self.threshold <= 100:
            raise ValueError(f"threshold must be 1..100, got {self.threshold}")
        if not 0.0 <= self.mirror_share <= 1.0:
            raise ValueError(f"mirror_share must be in [0, 1], got {self.mirror_share}")
        if not 1 <= self.min_feeds <= 1_000_000:
            raise ValueError(f"min_feeds must be 1..1000000, got {self.min_feeds}")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["steps"] = list(self.steps)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutSpec:
        return cls(
            version=str(data["version"]),
            steps=tuple(int(s) for s in data["steps"]),
            interval_s=float(data["interval_s"]),
            threshold=int(data["threshold"]),
            mirror_share=float(data["mirror_share"]),
            min_feeds=int(data["min_feeds"]),
        )


@dataclass
class Rollout:
    """One rollout; the controller mutates it and saves the whole state after each change."""

    id: str
    spec: RolloutSpec
    salt: str
    phase: str = STARTING
    step: int = 0
    weight: int = 0
    failed_checks: int = 0
    reason: str = ""
    message: str = ""
    created_at: str = field(default_factory=now_iso)
    updated_at: str = field(default_factory=now_iso)
    previous_champion: str = ""  # the version the alias named before a promotion
    # the last window's stable figures with traffic: the baseline at 100 %
    baseline: dict[str, Any] = field(default_factory=dict)
    windows: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def new(cls, spec: RolloutSpec) -> Rollout:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        return cls(id=f"r{stamp}-v{spec.version}", spec=spec, salt=secrets.token_hex(8))

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE

    def event(self, what: str, **detail: Any) -> None:
        self.updated_at = now_iso()
        self.events.append({"at": self.updated_at, "event": what, **detail})

    def add_window(self, window: dict[str, Any]) -> None:
        self.windows.append(window)
        del self.windows[:-MAX_WINDOWS]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["spec"] = self.spec.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Rollout:
        if data.get("phase") not in PHASES:
            raise ValueError(f"unknown rollout phase {data.get('phase')!r}")
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        fields["spec"] = RolloutSpec.from_json(data["spec"])
        return cls(**fields)


@dataclass
class RolloutState:
    """The current (or last) rollout and the finished ones before it, newest last."""

    current: Rollout | None = None
    history: list[Rollout] = field(default_factory=list)

    def start(self, rollout: Rollout) -> None:
        """Make ``rollout`` current; the one before (finished: it stays current until a new
        one starts, so ``status`` shows how it ended) goes to the history."""
        if self.current is not None:
            self.history.append(self.current)
            del self.history[:-MAX_HISTORY]
        self.current = rollout

    def all(self) -> list[Rollout]:
        """Every rollout kept, newest first."""
        out = list(reversed(self.history))
        if self.current is not None:
            out.insert(0, self.current)
        return out

    def last_promoted(self) -> Rollout | None:
        for rollout in self.all():
            if rollout.phase == PROMOTED:
                return rollout
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "current": self.current.to_json() if self.current is not None else None,
            "history": [r.to_json() for r in self.history],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutState:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"state version {data.get('version')!r}, expected {STATE_VERSION}")
        current = data.get("current")
        return cls(
            current=Rollout.from_json(current) if current else None,
            history=[Rollout.from_json(r) for r in data.get("history") or []],
        )
