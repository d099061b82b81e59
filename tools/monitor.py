"""``homefeed monitor``: the serving window in the event log against the data the served
bundle was trained on -> ``reports/monitor.{json,md,png}`` (``training/monitor.py`` holds
the statistics and thresholds).

- **Feature drift**: PSI of every feature of the matrix, the logged rows of the sampled feeds
  (``HOMEFEED_GATEWAY_LOG_FEATURES_RATE``) against the training split's rows built by the
  same ``contract.features.build_matrix``.
- **Score drift**: PSI of the served E[GMV] of ranked items, the first half of the serving
  window against the second (a window-over-window check: the training split carries no
  served scores).
- **Freshness**: the newest row of each feature view (batch views: the offline tables that
  were materialized; stream views: the newest event the log pushed) against the end of the
  serving window.
- **Calibration**: p(purchase) = E[GMV] / (price x margin) of every ranked item served,
  against whether the buyer bought it from that feed (the purchase events of the log).

Not here yet: training-serving skew against a point-in-time recomputation of the logged
rows (``training.monitor.training_serving_skew`` is ready; the recomputation is not wired).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from contract import events as E
from contract.catalog import Catalog
from contract.features import build_matrix, feature_schema
from contract.paths import Paths
from feature_repo import schema as S
from training import monitor as M
from training.eventlogs import read_log, served_feature_rows, served_items

REFERENCE_ROWS = 200_000


def _reference_rows(paths: Paths, dataset: str, names: list[str]) -> pd.DataFrame:
    """The first REFERENCE_ROWS rows of the train split as the matrix serving builds."""
    table = pq.ParquetFile(paths.training_sets(dataset) / "train.parquet")
    frames, rows = [], 0
    for batch in table.iter_batches(batch_size=50_000):
        frames.append(batch.to_pandas())
        rows += batch.num_rows
        if rows >= REFERENCE_ROWS:
            break
    train = pd.concat(frames, ignore_index=True)
    return pd.DataFrame(build_matrix(train), columns=names)


def _view_latest(paths: Paths, dataset: str, events: pd.DataFrame) -> dict[str, Any]:
    latest: dict[str, Any] = {}
    for view in S.BATCH_VIEWS + S.STREAM_VIEWS:
        path = paths.features(dataset) / f"{view}.parquet"
        stamps = (
            pq.read_table(path, columns=[S.EVENT_TIMESTAMP]).column(0) if path.exists() else None
        )
        latest[view] = (
            pd.Timestamp(stamps.to_pandas().max()) if stamps is not None and len(stamps) else None
        )
    pushed = {
        S.ITEM_INVENTORY: events[events["kind"] == E.INVENTORY]["ts"],
        S.USER_RECENT_ACTIVITY: events[events["kind"].isin([E.CLICK, E.ADD_TO_CART])]["ts"],
    }
    for view, ts in pushed.items():
        if len(ts):
            newest = ts.max()
            latest[view] = newest if latest[view] is None else max(latest[view], newest)
    return latest


def run_monitor(
    paths: Paths,
    dataset: str,
    log_location: str | Path,
    bundle: Path,
    thresholds: M.MonitorThresholds | None = None,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    thresholds = thresholds or M.MonitorThresholds()
    feeds, events = read_log(log_location)
    if feeds.empty:
        raise ValueError(f"the event log {log_location} holds no served feed")
    names = list(feature_schema().names)
    sections: dict[str, Any] = {}
    served_rows = served_feature_rows(feeds, names)
    if len(served_rows):
        reference = _reference_rows(paths, dataset, names)
        sections["drift"] = M.feature_drift(reference, served_rows, names, thresholds)
    items = served_items(feeds)
    ranked = items[items["reason"].isin([E.REASON_RANKED]) & (items["egmv"] > 0)]
    if len(ranked) >= 20:
        cut = ranked["ts"].quantile(0.5)
        first, second = ranked[ranked["ts"] <= cut], ranked[ranked["ts"] > cut]
        if len(first) and len(second):
            sections["score"] = M.score_drift(
                first["egmv"].to_numpy(), second["egmv"].to_numpy(), thresholds
            )
        catalog = Catalog.load(bundle / "catalog.npz")
        rows = np.searchsorted(catalog.item_ids, ranked["item_id"].to_numpy())
        rows = np.minimum(rows, len(catalog.item_ids) - 1)
        value = catalog.prices[rows] * catalog.margins[rows]
        p = np.clip(ranked["egmv"].to_numpy() / np.where(value > 0, value, np.nan), 0.0, 1.0)
        buys = events[events["kind"] == E.PURCHASE]
        bought = set(zip(buys["request_id"], buys["item_id"], strict=True))
        realised = np.array(
            [(r, i) in bought for r, i in zip(ranked["request_id"], ranked["item_id"], strict=True)]
        )
        ok = np.isfinite(p)
        sections["calibration"] = M.calibration_drift(p[ok], realised[ok].astype(int), thresholds)
    now = feeds["ts"].max()
    sections["fresh"] = M.freshness(_view_latest(paths, dataset, events), now, thresholds)
    result = M.monitor_report(thresholds=thresholds, **sections)
    result["window"] = {
        "feeds": len(feeds),
        "sampled_feeds": int(feeds["features"].notna().sum()),
        "served_rows_with_features": len(served_rows),
        "start": str(feeds["ts"].min()),
        "end": str(now),
    }
    M.write_report(result, out_dir if out_dir is not None else paths.reports)
    return result
