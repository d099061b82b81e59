"""Fault injection for rehearsals (``make chaos``): a ranking deployment that errs, is slow
or scores badly on purpose, so the canary analysis can be shown to catch each.

Off unless ``HOMEFEED_RANKING_FAULTS`` is set, e.g. ``error_rate=0.2``, ``delay_ms=50``,
``scores=shuffle`` (a permutation of the real scores: same distribution, wrong order) or
``scores=constant`` (every item the mean score); comma-separated to combine. A service
started with faults says so in a WARNING at start; nothing else changes.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np

from services.common.errors import ServiceError

SCORE_FAULTS = ("", "shuffle", "constant")


class InjectedFault(ServiceError):  # noqa: N818 (named after what it is, like errors.py)
    """The error an ``error_rate`` fault answers with (INTERNAL)."""


@dataclass(frozen=True)
class Faults:
    error_rate: float = 0.0
    delay_ms: float = 0.0
    scores: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {self.error_rate}")
        if not 0.0 <= self.delay_ms <= 10_000:
            raise ValueError(f"delay_ms must be 0..10000, got {self.delay_ms}")
        if self.scores not in SCORE_FAULTS:
            raise ValueError(f"scores must be one of shuffle, constant, got {self.scores!r}")

    @classmethod
    def parse(cls, text: str) -> Faults:
        """``error_rate=0.2,delay_ms=50,scores=shuffle`` (any subset); ValueError naming
        what is wrong."""
        values: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in cls.__dataclass_fields__:
                raise ValueError(
                    f"{part!r} is not one of error_rate=<0..1>, delay_ms=<ms>, "
                    "scores=shuffle|constant"
                )
            values[key] = value
        try:
            return cls(
                error_rate=float(values.get("error_rate", 0.0)),
                delay_ms=float(values.get("delay_ms", 0.0)),
                scores=values.get("scores", ""),
            )
        except ValueError as err:
            raise ValueError(str(err)) from None

    def before(self) -> None:
        """Sleep and/or fail the call, as configured."""
        if self.delay_ms:
            time.sleep(self.delay_ms / 1e3)
        if self.error_rate and random.random() < self.error_rate:
            raise InjectedFault("injected fault (HOMEFEED_RANKING_FAULTS error_rate)")

    def scored(self, p: np.ndarray, egmv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The scores as the fault would have them."""
        if self.scores == "shuffle":
            order = np.random.default_rng().permutation(len(p))
            return p[order], egmv[order]
        if self.scores == "constant":
            return np.full_like(p, p.mean()), np.full_like(egmv, egmv.mean())
        return p, egmv
