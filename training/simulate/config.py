"""Simulator configuration: presets from ``training/configs/simulate.yaml`` plus overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from contract.heuristic import RECENCY_DAYS

CONFIG_FILE = Path(__file__).resolve().parent.parent / "configs" / "simulate.yaml"


@dataclass(frozen=True)
class SimConfig:
    """Every knob of the generative model; docs/simulator.md explains each one."""

    preset: str
    users: int
    items: int
    sellers: int
    days: int
    seed: int = 7
    start: str = "2026-01-05T00:00:00Z"
    categories: int = 24
    brands_per_category: int = 12
    latent_dim: int = 8
    content_dim: int = 16
    new_seller_share: float = 0.10
    new_seller_days: int = 30
    new_item_share: float = 0.15
    new_user_share: float = 0.15
    mean_sessions_per_day: float = 0.30
    checkout_share: float = 0.25
    randomized_share: float = 0.015
    pool_size: int = 1500
    policy_temperature: float = 0.7
    recency_days: float = RECENCY_DAYS  # the production heuristic's decay
    page_sizes_home: tuple[int, ...] = (20, 30, 40, 50)
    page_size_checkout: int = 20
    restock_probability: float = 0.5
    examination_kappa: float = 3.0
    examination_theta: float = 1.0
    click_intercept: float = -2.7
    affinity_strength: float = 2.2
    appeal_sd: float = 0.5
    seller_quality_sd: float = 0.4
    organic_share: float = 0.0  # organic (search / browse) sessions per feed session
    organic_items: int = 8  # items an organic session looks at
    organic_scan: int = 1000  # catalogue items an organic session's search scans
    organic_focus: float = 1.0  # how sharply the looked-at items follow the user's interest
    explore_epsilon: float = 0.0  # per-slot chance the heuristic's slot shows an exploration item
    explore_new_item_days: float = 14.0  # items this recent (or of new sellers) are explored
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def start_ts(self) -> pd.Timestamp:
        return pd.Timestamp(self.start).tz_convert("UTC")

    @property
    def end_ts(self) -> pd.Timestamp:
        return self.start_ts + pd.Timedelta(days=self.days)

    @property
    def dataset(self) -> str:
        """Folder name under data/ for this preset."""
        return f"sim-{self.preset}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(name: str, value: Any, current: Any) -> Any:
    if isinstance(current, bool):
        return str(value).lower() in ("1", "true", "yes")
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    if isinstance(current, tuple):
        if isinstance(value, str):
            value = [v for v in value.strip("[]()").split(",") if v.strip()]
        return tuple(int(v) for v in value)
    return value


def load_config(preset: str = "small", **overrides: Any) -> SimConfig:
    """The preset's values over the defaults, then ``overrides`` (CLI ``--set k=v``)."""
    raw = yaml.safe_load(CONFIG_FILE.read_text())
    presets = raw["presets"]
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(presets)}")
    values: dict[str, Any] = {**raw["defaults"], **presets[preset], "preset": preset}
    fields = {f.name: f for f in dataclasses.fields(SimConfig)}
    for key, value in overrides.items():
        if key not in fields or key in ("preset", "extra"):
            raise ValueError(f"unknown simulator setting {key!r}; known: {sorted(fields)}")
        values[key] = value
    cfg_kwargs: dict[str, Any] = {}
    defaults = SimConfig(preset="x", users=1, items=1, sellers=1, days=1)
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"{CONFIG_FILE.name}: unknown setting {key!r}")
        cfg_kwargs[key] = _coerce(key, value, getattr(defaults, key))
    cfg = SimConfig(**cfg_kwargs)
    _check(cfg)
    return cfg


def _check(cfg: SimConfig) -> None:
    problems = []
    for name in ("users", "items", "sellers", "days", "categories", "pool_size"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("new_seller_share", "new_item_share", "new_user_share", "checkout_share"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            problems.append(f"{name} must be in [0, 1), got {getattr(cfg, name)}")
    if not 0.0 <= cfg.randomized_share <= 1.0:
        problems.append(f"randomized_share must be in [0, 1], got {cfg.randomized_share}")
    if cfg.organic_share < 0 or cfg.organic_items < 0 or cfg.organic_scan < 1:
        problems.append(
            "organic_share and organic_items must be >= 0 and organic_scan >= 1, got "
            f"{cfg.organic_share}, {cfg.organic_items}, {cfg.organic_scan}"
        )
    if not 0.0 <= cfg.explore_epsilon < 1.0 or cfg.explore_new_item_days < 0:
        problems.append(
            "explore_epsilon must be in [0, 1) and explore_new_item_days >= 0, got "
            f"{cfg.explore_epsilon}, {cfg.explore_new_item_days}"
        )
    if cfg.organic_focus < 0:
        problems.append(f"organic_focus must be >= 0, got {cfg.organic_focus}")
    if max(cfg.page_sizes_home) > cfg.pool_size or cfg.page_size_checkout > cfg.pool_size:
        problems.append("page sizes must not exceed pool_size")
    if problems:
        raise ValueError("invalid simulator config: " + "; ".join(problems))
