"""Marketplace simulator: the development dataset (docs/simulator.md).

``simulate(cfg)`` draws a world (sellers, items, users, hidden tastes), serves it feeds with
the logging policy day by day, and returns the event tables plus the ground truth, which is
saved apart and exposed only through :class:`Oracle`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from contract import columns as C
from training.simulate.config import SimConfig, load_config
from training.simulate.engine import Simulation
from training.simulate.groundtruth import GroundTruth, ListValue, Oracle
from training.simulate.world import build_world

__all__ = [
    "GroundTruth",
    "ListValue",
    "Oracle",
    "SimConfig",
    "SimulationResult",
    "load_config",
    "simulate",
]

log = logging.getLogger(__name__)


@dataclass
class SimulationResult:
    config: SimConfig
    tables: dict[str, pd.DataFrame]
    truth: GroundTruth
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def oracle(self) -> Oracle:
        return Oracle(self.truth)


def simulate(cfg: SimConfig) -> SimulationResult:
    """Run the generative model; deterministic for a given config (seed included)."""
    started = time.perf_counter()
    # spawn(n)'s first children are spawn(n - 1)'s: adding the organic and the exploration
    # streams changed nothing for the world and the feed
    seeds = np.random.SeedSequence(cfg.seed).spawn(4)
    world = build_world(cfg, np.random.default_rng(seeds[0]))
    sim = Simulation(
        cfg,
        world,
        np.random.default_rng(seeds[1]),
        np.random.default_rng(seeds[2]),
        np.random.default_rng(seeds[3]),
    )
    events = sim.run()
    tables = {C.SELLERS: world.sellers, C.ITEMS: world.items, C.USERS: world.users, **events}
    stats: dict[str, float] = {k: float(v) for k, v in sim.stats.items()}
    stats["seconds"] = time.perf_counter() - started
    log.info("simulated %s in %.1fs", cfg.preset, stats["seconds"])
    return SimulationResult(cfg, tables, world.truth, stats)
