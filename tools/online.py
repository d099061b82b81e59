"""The online loop on one machine (``homefeed online``, ``make online``): an A/B experiment
run by simulated buyers through the real mesh, then analysed.

1. Pick the newest registered bundle trained on the dataset (``make demo`` registers one).
2. Start the mesh with an experiment (``services/gateway/experiment.py``): the bundle's
   ranker against the production heuristic, 50/50 by a salted hash of the user id, and a
   fresh event log (``<home>/data/<dataset>/online/eventlog``).
3. ``homefeed traffic`` for ``days`` simulated days (``tools/traffic.py``): GetFeed, the
   Oracle's responses, LogEvents.
4. Stop the mesh (the gateway flushes its impression log on the way down).
5. ``homefeed experiment analyze`` (``analyze``): per-user outcomes from the log, the
   pre-period GMV of each user from the dataset's last ``pre_days`` days (CUPED's
   covariate), lifts with and without CUPED, SRM, A/A, power, guardrails, and the
   offline-to-online comparison: the bundle's offline E[GMV] lift over the heuristic
   (its ``eval/eval.json``), the measured online lift, and the Oracle's true lift on the
   pages actually served (``reports/traffic.json``) -> ``reports/experiment.{json,md,png}``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from contract import columns as C
from contract.bundle import EVAL_DIR
from contract.feature_store import ONLINE_DB_ENV
from contract.paths import Paths
from contract.timeutil import NS_PER_DAY, to_ns
from training import experiment as X
from training.eventlogs import read_log, user_outcomes
from training.tables import RowsById, read_tables

log = logging.getLogger(__name__)

CONTROL = "heuristic"
TREATMENT = "ranker"
DEFAULT_EXPERIMENT: dict[str, Any] = {
    "name": "ranker-vs-heuristic",
    "salt": "online-loop-1",
    "arms": [
        {"name": CONTROL, "share": 0.5, "policy": "heuristic"},
        {"name": TREATMENT, "share": 0.5, "policy": "model"},
    ],
}


class OnlineError(RuntimeError):
    """The loop cannot run (no bundle for the dataset, no ground truth); says what to run."""


@dataclass(frozen=True)
class OnlineConfig:
    dataset: str = "sim-small"
    days: float = 3.0
    pre_days: float = 30.0
    threads: int = 4
    seed: int = 0
    users: int | None = None
    aa_splits: int = 400
    model: str | None = None  # a registry version; None: the newest for the dataset


def serving_version(paths: Paths, dataset: str) -> tuple[str, Path]:
    """The newest registry version trained on ``dataset`` with the code's feature schema,
    and its bundle directory; OnlineError when there is none."""
    from contract.features import feature_schema
    from contract.registry import Registry, default_tracking_uri

    registry = Registry(default_tracking_uri(paths))
    code = feature_schema().hash
    try:
        versions = registry.client.search_model_versions(f"name='{registry.name}'")
    except Exception as err:  # MLflow's own exception when nothing is registered
        raise OnlineError(f"no model registry under {paths.home}: run `make demo` first") from err
    fitting = [
        v
        for v in versions
        if (v.tags or {}).get("bundle_version", "").endswith(f"-{dataset}")
        and (v.tags or {}).get("feature_schema_hash") == code
    ]
    if not fitting:
        raise OnlineError(
            f"no registered bundle trained on {dataset!r} with this code's feature schema: "
            f"run `make demo` first (HOMEFEED_HOME={paths.home})"
        )
    best = max(fitting, key=lambda v: int(v.version))
    return str(best.version), paths.artifacts / "bundles" / best.tags["bundle_version"]


def eval_report_of(bundle: Path) -> Path:
    """A bundle's evaluation report (``contract.bundle.EVAL_DIR``)."""
    return bundle / EVAL_DIR / "eval.json"


def pre_period_gmv(paths: Paths, dataset: str, days: float) -> pd.DataFrame:
    """user_id, pre_gmv, pre_sessions: each user's spend and feeds in the dataset's last
    ``days`` days, before the experiment started (CUPED's covariate)."""
    tables = read_tables(
        paths.raw(dataset),
        names=(C.IMPRESSIONS, C.PURCHASES),
        columns={
            C.IMPRESSIONS: [C.IMPRESSION_ID, C.REQUEST_ID, C.USER_ID, C.TS],
            C.PURCHASES: [C.IMPRESSION_ID, C.TS, C.PRICE, C.QUANTITY],
        },
    )
    imp, buys = tables[C.IMPRESSIONS], tables[C.PURCHASES]
    end = int(to_ns(imp[C.TS]).max()) if len(imp) else 0
    start = end - int(days * NS_PER_DAY)
    recent = imp[to_ns(imp[C.TS]) >= start]
    sessions = recent.groupby(C.USER_ID)[C.REQUEST_ID].nunique().rename("pre_sessions")
    buys = buys[to_ns(buys[C.TS]) >= start]
    rows = RowsById(imp[C.IMPRESSION_ID].to_numpy())(buys[C.IMPRESSION_ID].to_numpy())
    buys = buys[rows >= 0]  # validated tables: every purchase has its impression
    users = imp[C.USER_ID].to_numpy()[rows[rows >= 0]]
    spend = (
        pd.Series(buys[C.PRICE].to_numpy() * buys[C.QUANTITY].to_numpy(), index=users)
        .groupby(level=0)
        .sum()
    )
    out = pd.concat([spend.rename("pre_gmv"), sessions], axis=1).fillna(0.0)
    out.index.name = C.USER_ID
    out["pre_sessions"] = out["pre_sessions"].astype("int64")
    return out.reset_index()


def pages_frame(feeds: pd.DataFrame) -> pd.DataFrame:
    """The guardrail rows: one per served feed of an experiment arm."""
    n = feeds["items"].map(len)
    cats = feeds["categories"]
    diversity = [len(set(c)) / len(c) if len(c) else np.nan for c in cats]
    new_seller = [float(np.mean(v)) if len(v) else np.nan for v in feeds["new_seller"]]
    return pd.DataFrame(
        {
            X.USER_ID: feeds["user_id"].to_numpy(np.int64),
            X.ARM: feeds["experiment_arm"].to_numpy(),
            X.LATENCY_MS: feeds["latency_ms"].to_numpy(np.float64),
            X.ERROR: (feeds["degraded"].map(len) > 0).to_numpy() | (n == 0).to_numpy(),
            X.NEW_SELLER_SHARE: new_seller,
            X.CATEGORY_DIVERSITY: diversity,
        }
    )


def analyze(
    paths: Paths,
    dataset: str,
    log_location: str | Path,
    experiment: dict[str, Any],
    *,
    eval_report: Path | None = None,
    traffic: dict[str, Any] | None = None,
    pre_days: float = 30.0,
    aa_splits: int = 400,
    out_dir: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The experiment's report (module docstring, step 5), with ``extra``'s keys; written
    to ``out_dir`` (default ``reports/``) as experiment.json, .md and .png."""
    started = time.perf_counter()
    feeds, events = read_log(log_location)
    if feeds.empty:
        raise OnlineError(f"the event log {log_location} holds no served feed")
    shares = {arm["name"]: float(arm["share"]) for arm in experiment["arms"]}
    in_experiment = feeds[feeds["experiment"] == experiment["name"]]
    users = user_outcomes(in_experiment, events)
    users = users[users["arm"].isin(list(shares))]
    pre = pre_period_gmv(paths, dataset, pre_days)
    users = users.merge(pre, on=C.USER_ID, how="left").fillna({"pre_gmv": 0.0, "pre_sessions": 0})
    arms = [a["name"] for a in experiment["arms"]]
    control, treatment = (CONTROL, TREATMENT) if set(arms) >= {CONTROL, TREATMENT} else arms[:2]
    extra = {
        **(extra or {}),
        "experiment": experiment,
        "event_log": {
            "location": str(log_location),
            "feeds": len(feeds),
            "events": len(events),
            "users_in_two_arms": int((users["arm_changes"] > 0).sum()),
        },
    }
    extra.update(_offline_online(eval_report, traffic, control, treatment))
    result = X.analyze(
        users,
        pages_frame(in_experiment),
        control=control,
        treatment=treatment,
        expected_shares=shares,
        aa_splits=aa_splits,
        extra=extra,
    )
    result["seconds"] = round(time.perf_counter() - started, 2)
    X.write_report(result, out_dir if out_dir is not None else paths.reports)
    return result


def _offline_online(
    eval_report: Path | None, traffic: dict[str, Any] | None, control: str, treatment: str
) -> dict[str, Any]:
    """offline_expected_lift (the bundle's offline Oracle E[GMV] of the ranker over the
    heuristic's, relative) and oracle_true_lift (the Oracle's expected GMV per user of the
    pages each arm was actually served, relative)."""
    out: dict[str, Any] = {"offline_expected_lift": None, "oracle_true_lift": None}
    if eval_report is not None and eval_report.exists():
        policies = json.loads(eval_report.read_text()).get("policies", {})
        base = policies.get("heuristic", {}).get("oracle_gmv_per_1k")
        new = policies.get("ranker", {}).get("oracle_gmv_per_1k")
        if base and new is not None:
            out["offline_expected_lift"] = new / base - 1.0
            out["offline"] = {"heuristic_gmv_per_1k": base, "ranker_gmv_per_1k": new}
    if traffic is not None:
        arms = traffic.get("arms", {})
        if control in arms and treatment in arms:
            c = arms[control]["oracle"]["expected_gmv_per_user"]
            t = arms[treatment]["oracle"]["expected_gmv_per_user"]
            out["oracle_true_lift"] = t / c - 1.0 if c else None
            out["oracle"] = {arm: arms[arm]["oracle"] for arm in (control, treatment)}
    return out


def prepare_log(paths: Paths, dataset: str) -> Path:
    """A fresh event-log directory for one run of the loop (the previous run's removed)."""
    location = paths.data / dataset / "online" / "eventlog"
    if location.exists():
        shutil.rmtree(location)
    location.parent.mkdir(parents=True, exist_ok=True)
    return location


def prepare_online_store(paths: Paths, dataset: str) -> Path:
    """A fresh copy of the dataset's SQLite online store for one run of the loop: the run's
    pushes (stock, recent activity) change the copy, never the store ``homefeed features``
    materialized, so every run starts from the same state and other users of the store
    (``make demo``'s mesh, the tests) never see simulated traffic."""
    source = paths.feast(dataset) / "online.db"
    if not source.exists():
        raise OnlineError(f"{source} does not exist: run `homefeed features all` first")
    copy = paths.data / dataset / "online" / "online.db"
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, copy)
    return copy


def write_experiment(paths: Paths, experiment: dict[str, Any]) -> Path:
    path = paths.home / "run" / "experiment.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(experiment, indent=2))
    return path


def run_online(paths: Paths, cfg: OnlineConfig) -> dict[str, Any]:
    """Steps 1-5 of the module docstring; the experiment report, with the traffic summary
    under ``traffic``."""
    from tools.mesh import Mesh, MeshConfig
    from tools.traffic import TrafficConfig, run_traffic

    if not paths.ground_truth(cfg.dataset).exists():
        raise OnlineError(
            f"dataset {cfg.dataset!r} has no ground truth: the online loop needs a simulated "
            "dataset (run `make demo` first)"
        )
    if cfg.model is not None:
        version, eval_report = cfg.model, None
    else:
        version, bundle = serving_version(paths, cfg.dataset)
        eval_report = eval_report_of(bundle)
    experiment = DEFAULT_EXPERIMENT
    experiment_file = write_experiment(paths, experiment)
    location = prepare_log(paths, cfg.dataset)
    online_db = prepare_online_store(paths, cfg.dataset)
    env = {
        "HOMEFEED_GATEWAY_EXPERIMENT": str(experiment_file),
        "HOMEFEED_EVENT_LOG": str(location),
        ONLINE_DB_ENV: str(online_db),
        # every traffic session calls the gateway once per page and LogEvents once
        "HOMEFEED_GATEWAY_MAX_IN_FLIGHT": str(max(4, cfg.threads)),
    }
    print(
        f"online loop: bundle version {version}, experiment {experiment['name']} "
        f"({', '.join(a['name'] for a in experiment['arms'])}), {cfg.days:g} simulated days",
        flush=True,
    )
    mesh_cfg = MeshConfig(
        home=paths.home, dataset=cfg.dataset, model=version, extra_env=env, rollout=False
    )
    with Mesh.start(mesh_cfg) as mesh:
        traffic = run_traffic(
            paths,
            cfg.dataset,
            mesh.addresses["gateway"],
            mesh.addresses["features"],
            TrafficConfig(days=cfg.days, threads=cfg.threads, seed=cfg.seed, users=cfg.users),
        )
    summary = {
        k: traffic[k]
        for k in (
            "seconds", "sessions", "feeds", "feeds_per_s", "simulated_days_per_minute",
            "events_sent", "events_rejected", "event_errors", "feed_errors",
            "seen_items_served_again",
        )
    }  # fmt: skip
    return analyze(
        paths,
        cfg.dataset,
        location,
        experiment,
        eval_report=eval_report,
        traffic=traffic,
        pre_days=cfg.pre_days,
        aa_splits=cfg.aa_splits,
        extra={"traffic": summary, "model_version": version},
    )
