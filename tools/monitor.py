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

- **Training-serving skew**: the same logged rows against training's recomputation of them
  for the same user, item and time (``training.skew``: Feast's point-in-time join of the
  batch views, the stream views from the dataset's and the log's events), compared feature
  by feature (``training.monitor.training_serving_skew``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from contract import columns as C
from contract import events as E
from contract.catalog import Catalog
from contract.features import DAY_OF_WEEK, build_matrix, feature_schema
from contract.paths import Paths
from feature_repo import schema as S
from training import monitor as M
from training.eventlogs import read_log, served_feature_rows, served_items

REFERENCE_ROWS = 200_000
MIN_DRIFT_ROWS = 500  # served rows below which the drift check uses every policy's feeds


def _reference_rows(
    paths: Paths, dataset: str, names: list[str], surfaces: list[str]
) -> tuple[pd.DataFrame, str]:
    """Up to REFERENCE_ROWS feed impressions of the logging policy on ``surfaces`` (the
    serving window's: another surface's requests are another population, and its share is
    the traffic mix, not a feature's drift) from the newest split of the dataset's training
    sets (test, else valid, else train: the data nearest the serving window), drawn in
    proportion to their sample weight (undoing negative downsampling), as the matrix
    serving builds; and which split they came from."""
    root = paths.training_sets(dataset)
    split = next(s for s in ("test", "valid", "train") if (root / f"{s}.parquet").exists())
    table = pq.read_table(root / f"{split}.parquet")
    frame = table.to_pandas()
    del table
    policy = frame[C.POLICY].isin([C.POLICY_HEURISTIC, C.POLICY_RANDOM])
    frame = frame[policy & frame[C.SURFACE].isin(surfaces)]
    weight = frame[C.WEIGHT].to_numpy(np.float64) if C.WEIGHT in frame else np.ones(len(frame))
    rng = np.random.default_rng(0)
    if len(weight) and not np.allclose(weight, weight[0]):  # downsampled: draw by weight
        take = rng.choice(len(frame), size=REFERENCE_ROWS, p=weight / weight.sum())
        frame = frame.iloc[np.sort(take)]
    elif len(frame) > REFERENCE_ROWS:
        frame = frame.iloc[np.sort(rng.choice(len(frame), REFERENCE_ROWS, replace=False))]
    return pd.DataFrame(build_matrix(frame), columns=names), split


def _logging_policy_feeds(feeds: pd.DataFrame) -> pd.DataFrame:
    """The feeds the logging policy chose (no ranked item: the heuristic arm, the fallback):
    the population the reference's impressions are a sample of. Another policy's pages
    differ from the logs by design (it chooses other items), which is not drift."""
    ranked = feeds["reasons"].map(lambda r: E.REASON_RANKED in r)
    return feeds[~ranked.to_numpy(bool)]


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


def _skew(
    paths: Paths,
    dataset: str,
    served_rows: pd.DataFrame,
    events: pd.DataFrame,
    names: list[str],
    thresholds: M.MonitorThresholds,
) -> tuple[pd.DataFrame, dict[str, Any], list[M.Flag]]:
    """The logged rows against training's recomputation of them (``training.skew``)."""
    from contract.feature_store import open_store
    from training.skew import KEYS, recompute_rows
    from training.tables import read_tables

    served = served_rows.drop_duplicates(KEYS)  # a page never repeats an item; be safe
    recomputed = recompute_rows(
        open_store(dataset, paths=paths), read_tables(paths.raw(dataset)), served, events
    )
    return M.training_serving_skew(served, recomputed, KEYS, names, thresholds)


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
    drift_info: dict[str, Any] = {}
    if len(served_rows):
        sections["skew"] = _skew(paths, dataset, served_rows, events, names, thresholds)
        logged = served_feature_rows(_logging_policy_feeds(feeds), names)
        population = "logging-policy feeds"
        if len(logged) < MIN_DRIFT_ROWS:  # no heuristic arm: every served row, and say so
            logged, population = served_rows, "all served feeds (too few logging-policy ones)"
        surfaces = sorted(set(feeds["surface"]))
        reference, split = _reference_rows(paths, dataset, names, surfaces)
        span_days = (feeds["ts"].max() - feeds["ts"].min()) / pd.Timedelta(days=1)
        checked = [n for n in names if not (n == DAY_OF_WEEK and span_days < 7)]
        sections["drift"] = M.feature_drift(reference, logged, checked, thresholds)
        drift_info = {
            "population": population,
            "served_rows": len(logged),
            "reference": f"{split} split, feed impressions of the logging policy on the "
            f"served surfaces ({', '.join(surfaces)})",
            "reference_rows": len(reference),
            "not_checked": {
                n: f"the window spans {span_days:.1f} days; a weekday mix needs 7"
                for n in names
                if n not in checked
            },
        }
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
    if result.get("drift") is not None:
        result["drift"].update(drift_info)
    result["window"] = {
        "feeds": len(feeds),
        "sampled_feeds": int(feeds["features"].notna().sum()),
        "served_rows_with_features": len(served_rows),
        "start": str(feeds["ts"].min()),
        "end": str(now),
    }
    M.write_report(result, out_dir if out_dir is not None else paths.reports)
    return result
