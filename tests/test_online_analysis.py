"""The offline half of the online loop on a planted event log: the experiment analysis and
the monitor read the log back, join the dataset's pre-period, and report what was planted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from contract import columns as C
from contract import eventlog
from contract import events as E
from contract.features import build_matrix, feature_schema
from contract.paths import Paths
from tools.monitor import run_monitor
from tools.online import DEFAULT_EXPERIMENT, analyze
from training.tables import read_tables

T0 = pd.Timestamp("2026-03-01", tz="UTC").value
SECOND = 10**9


def _feed(request_id: str, user: int, arm: str, ts: int, items: list[int], **more: Any) -> dict:
    n = len(items)
    return {
        "type": E.FEED, "request_id": request_id, "user_id": user, "ts": ts,
        "surface": "HOME", "items": items, "positions": list(range(1, n + 1)),
        "scores": [1.0] * n, "egmv": [0.0] * n, "propensities": [1.0] * n,
        "reasons": [E.REASON_HEURISTIC] * n, "model_version": "1", "arm": "stable",
        "experiment": DEFAULT_EXPERIMENT["name"], "experiment_arm": arm, "degraded": [],
        "seen_filtered": 0, "seen_items": 0, "latency_ms": 10.0, "country": "", "device": "",
        "categories": [k % 3 for k in range(n)], "new_seller": [False] * n,
        "prices": [5.0] * n, "features": None, **more,
    }  # fmt: skip


def _purchase(event_id: str, user: int, item: int, request_id: str, ts: int, price: float) -> dict:
    return {
        "type": E.EVENT, "kind": E.PURCHASE, "event_id": event_id, "ts": ts, "user_id": user,
        "item_id": item, "request_id": request_id, "position": 1, "surface": "HOME",
        "price": price, "quantity": 1,
    }  # fmt: skip


def _write(log_dir: Path, records: list[dict]) -> None:
    with eventlog.SegmentLog.open(log_dir, fsync=False) as log:
        keys = [
            E.feed_key(r["request_id"]) if r["type"] == E.FEED else r["event_id"] for r in records
        ]
        assert all(log.append(list(zip(keys, map(E.encode, records), strict=True))))


def test_the_analysis_reads_the_planted_outcomes_per_arm(
    tiny_dataset: dict, home: Paths, tmp_path: Path
) -> None:
    dataset = tiny_dataset["dataset"]
    users = read_tables(home.raw(dataset), [C.USERS])[C.USERS][C.USER_ID]
    ids = users.to_numpy(np.int64)[:400]
    arms = ["heuristic" if k % 2 else "ranker" for k in range(len(ids))]
    records: list[dict] = []
    planted: dict[str, list[float]] = {"heuristic": [], "ranker": []}
    for k, (user, arm) in enumerate(zip(ids.tolist(), arms, strict=True)):
        rid = f"r{k}"
        records.append(_feed(rid, user, arm, T0 + k * SECOND, [1, 2, 3]))
        spend = 0.0
        if k % 5 == 0:  # every fifth user buys; the ranker arm's buyers spend 10 more
            spend = 20.0 + (10.0 if arm == "ranker" else 0.0)
            records.append(_purchase(f"p{k}", user, 2, rid, T0 + k * SECOND + 60, spend))
        planted[arm].append(spend)
    log_dir = tmp_path / "log"
    _write(log_dir, records)
    result = analyze(home, dataset, log_dir, DEFAULT_EXPERIMENT, aa_splits=50, out_dir=tmp_path)
    for arm, spends in planted.items():
        assert result["arms"][arm]["users"] == len(spends)
        assert result["arms"][arm]["gmv_per_user"] == pytest.approx(np.mean(spends))
    lift = result["lift"]["gmv_per_user"]
    assert lift["estimate"] == pytest.approx(
        np.mean(planted["ranker"]) - np.mean(planted["heuristic"])
    )
    assert lift["cuped_ci_low"] is not None  # the dataset's pre-period joined as covariate
    assert result["event_log"] == {
        "location": str(log_dir), "feeds": len(ids), "events": len(ids) // 5 + (len(ids) % 5 > 0),
        "users_in_two_arms": 0,
    }  # fmt: skip
    assert result["guardrails"]["arms"]["ranker"]["category_diversity"] == pytest.approx(1.0)
    saved = json.loads((tmp_path / "experiment.json").read_text())
    assert saved["lift"]["gmv_per_user"]["estimate"] == pytest.approx(lift["estimate"])


def test_the_monitor_flags_no_drift_for_rows_drawn_from_the_reference(
    tiny_dataset: dict, tiny_bundle: Path, home: Paths, tmp_path: Path
) -> None:
    dataset = tiny_dataset["dataset"]
    # the monitor's reference: the newest split's feed impressions on the served surface
    test = pq.read_table(home.training_sets(dataset) / "test.parquet").to_pandas()
    test = test[test["policy"].isin(["heuristic", "random"]) & (test["surface"] == "HOME")]
    assert len(test) <= 200_000  # the reference is then the whole of it
    matrix = build_matrix(test.sample(4000, random_state=0))

    def monitor(rows_matrix: np.ndarray, name: str) -> dict[str, Any]:
        records = []
        for k in range(200):  # 200 sampled feeds of 20 rows each
            rows = rows_matrix[k * 20 : (k + 1) * 20]
            features = {"schema_hash": feature_schema().hash, "cols": rows_matrix.shape[1],
                        "values": rows.ravel().tolist()}  # fmt: skip
            records.append(_feed(f"m{k}", k, "ranker", T0 + k, list(range(20)), features=features))
        _write(tmp_path / name, records)
        return run_monitor(home, dataset, tmp_path / name, tiny_bundle, out_dir=tmp_path / name)

    result = monitor(matrix, "same")
    assert result["window"]["served_rows_with_features"] == 4000
    # a window of seconds cannot hold a week's weekday mix: day_of_week is not checked
    assert list(result["drift"]["not_checked"]) == ["day_of_week"]
    assert len(result["drift"]["features"]) == matrix.shape[1] - 1
    assert result["drift"]["population"] == "logging-policy feeds"
    assert not [f for f in result["flags"] if f["kind"] == "drift"]
    json.loads((tmp_path / "same" / "monitor.json").read_text())

    shifted = matrix.copy()
    column = feature_schema().index("days_since_signup")
    shifted[:, column] += 2.0 * shifted[:, column].std() + 1.0
    drifted = monitor(shifted, "shifted")
    assert [f["name"] for f in drifted["flags"] if f["kind"] == "drift"] == ["days_since_signup"]
