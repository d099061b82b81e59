"""Training sets: labels, a time split, negative downsampling, position propensities, and
point-in-time correct features from Feast's historical retrieval.

One row per impression. Labels look forward from the impression (purchase within
``label_window_days``, click, add-to-cart); features look backward (Feast joins the latest
feature row stamped at or before the impression). Impressions too close to the end of the
data to have a complete label window are dropped, never labelled negative.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from contract import columns as C
from contract.features import DAY_OF_WEEK, HOUR
from contract.timeutil import NS_PER_DAY, to_ns
from feature_repo import schema as S
from training.propensity import PositionCurve, estimate_position_curve

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)

EXAMINATION = "examination_propensity"
IPS_WEIGHT = "ips_weight"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class DatasetConfig:
    label_window_days: int = 7
    split_ratio: tuple[int, int, int] = (60, 7, 7)  # train / valid / test days (the seed's)
    negative_rate: float = 0.1  # share of all-negative train impressions kept (weight 1/rate)
    eval_negative_rate: float = 1.0  # the same for valid / test; 1 keeps whole feeds
    max_position: int = 20  # slots the examination curve is estimated for
    min_propensity: float = 0.05  # IPS weights are clipped at 1 / min_propensity
    # Purchase-only data (no feed was logged) has no negatives: each organic purchase row gets
    # this many items sampled by train-period purchase popularity as label-0 rows (0: none).
    sampled_negatives: int = 0
    split_unit_days: int = 1  # split boundaries fall on multiples of this (7: whole weeks)
    seed: int = 11


@dataclass(frozen=True)
class Split:
    train_start: pd.Timestamp
    train_end: pd.Timestamp
    valid_end: pd.Timestamp
    test_end: pd.Timestamp

    def to_dict(self) -> dict[str, str]:
        return {k: v.isoformat() for k, v in asdict(self).items()}


def plan_split(start: pd.Timestamp, end: pd.Timestamp, cfg: DatasetConfig) -> Split:
    """Whole units of ``split_unit_days`` days, in the ratio ``split_ratio``, ending at least
    ``label_window_days`` before ``end``."""
    start = start.floor("D")
    unit = max(1, cfg.split_unit_days)
    days = int((end - start) / pd.Timedelta(days=1)) - cfg.label_window_days
    usable = days // unit
    if usable < 3:
        raise ValueError(
            f"data window {start.date()}..{end.date()} leaves {days} labelled days after the "
            f"{cfg.label_window_days}-day label window; need at least 3 units of {unit} day(s) "
            "(train, valid, test)"
        )
    total = sum(cfg.split_ratio)
    valid = max(1, round(usable * cfg.split_ratio[1] / total))
    test = max(1, round(usable * cfg.split_ratio[2] / total))
    train = usable - valid - test
    day = pd.Timedelta(days=unit)
    return Split(
        start,
        start + train * day,
        start + (train + valid) * day,
        start + (train + valid + test) * day,
    )


def label_impressions(tables: dict[str, pd.DataFrame], label_window_days: int) -> pd.DataFrame:
    """Impressions with purchase-within-window, click and add-to-cart labels."""
    imp = tables[C.IMPRESSIONS].copy()
    imp[C.LABEL_CLICK] = imp[C.IMPRESSION_ID].isin(tables[C.CLICKS][C.IMPRESSION_ID])
    imp[C.LABEL_ATC] = imp[C.IMPRESSION_ID].isin(tables[C.ADD_TO_CARTS][C.IMPRESSION_ID])
    buys = tables[C.PURCHASES]
    row = pd.Index(imp[C.IMPRESSION_ID]).get_indexer(buys[C.IMPRESSION_ID])
    ok = row >= 0
    delay = to_ns(buys[C.TS])[ok] - to_ns(imp[C.TS])[row[ok]]
    hit = np.zeros(len(imp), dtype=bool)
    hit[row[ok][delay <= label_window_days * NS_PER_DAY]] = True
    imp[C.LABEL_PURCHASE] = hit
    for col in (C.LABEL_CLICK, C.LABEL_ATC, C.LABEL_PURCHASE):
        imp[col] = imp[col].astype(np.int8)
    return imp


def add_sampled_negatives(
    imp: pd.DataFrame, items: pd.DataFrame, k: int, seed: int
) -> pd.DataFrame:
    """``imp`` plus ``k`` label-0 rows per organic purchase row: the same request, user and
    time with an item drawn by train-split purchase popularity (add-one smoothed over the
    catalogue), never an item of the same request. Policy ``POLICY_SAMPLED``, weight 1.

    Popularity sampling makes the negatives plausible purchases, so the model must learn who
    buys what rather than what sells; the train split alone sets the distribution so the test
    period's popularity does not leak into its own negatives.
    """
    organic = imp[(imp[C.POLICY] == C.POLICY_ORGANIC) & (imp[C.LABEL_PURCHASE] > 0)]
    if k <= 0 or organic.empty:
        return imp
    rng = np.random.default_rng(seed)
    catalogue = items[C.ITEM_ID].to_numpy(np.int64)
    bought = organic.loc[organic[C.SPLIT] == "train", C.ITEM_ID].to_numpy(np.int64)
    counts = pd.Series(bought).value_counts().reindex(catalogue).fillna(0).to_numpy()
    weights = (counts + 1.0) / (counts + 1.0).sum()
    n = len(organic) * k
    drawn = catalogue[rng.choice(len(catalogue), size=n, p=weights)]
    rows = organic.loc[organic.index.repeat(k)].reset_index(drop=True)
    rows[C.ITEM_ID] = drawn
    # an item the request bought is not a negative of that request
    key = pd.MultiIndex.from_arrays([organic[C.REQUEST_ID].to_numpy(), organic[C.ITEM_ID]])
    clash = pd.MultiIndex.from_arrays([rows[C.REQUEST_ID].to_numpy(), drawn]).isin(key)
    rows = rows[~clash]
    rows[C.POLICY] = C.POLICY_SAMPLED
    for col in (C.LABEL_CLICK, C.LABEL_ATC, C.LABEL_PURCHASE):
        rows[col] = np.int8(0)
    rows[C.IMPRESSION_ID] = imp[C.IMPRESSION_ID].max() + 1 + np.arange(len(rows), dtype=np.int64)
    log.info(
        "sampled %d negatives for %d organic purchases (%d drawn items were the request's own)",
        len(rows),
        len(organic),
        int(clash.sum()),
    )
    return pd.concat([imp, rows], ignore_index=True)


def assign_split(imp: pd.DataFrame, split: Split) -> pd.Series:
    ts = imp[C.TS]
    out = pd.Series(pd.NA, index=imp.index, dtype="string")
    out[(ts >= split.train_start) & (ts < split.train_end)] = "train"
    out[(ts >= split.train_end) & (ts < split.valid_end)] = "valid"
    out[(ts >= split.valid_end) & (ts < split.test_end)] = "test"
    return out


def downsample(imp: pd.DataFrame, cfg: DatasetConfig) -> pd.DataFrame:
    """Keep every impression with a positive label, a ``rate`` share of the rest (weight 1/rate)."""
    rng = np.random.default_rng(cfg.seed)
    labels = imp[[C.LABEL_CLICK, C.LABEL_ATC, C.LABEL_PURCHASE]].to_numpy()
    positive = np.asarray((labels > 0).any(axis=1), dtype=bool)
    rate = np.where(imp[C.SPLIT].to_numpy() == "train", cfg.negative_rate, cfg.eval_negative_rate)
    keep = positive | (rng.random(len(imp)) < rate)
    out = imp[keep].copy()
    out[C.WEIGHT] = np.where(positive[keep], 1.0, 1.0 / rate[keep])
    return out


def add_context(rows: pd.DataFrame) -> pd.DataFrame:
    """Request-time context features (UTC hour, day of week), in place."""
    rows[HOUR] = rows[C.TS].dt.hour.astype(np.int64)
    rows[DAY_OF_WEEK] = rows[C.TS].dt.dayofweek.astype(np.int64)
    return rows


def entity_frame(rows: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """Feast's entity dataframe: join keys + event_timestamp (microseconds, UTC) + payload."""
    seller = pd.Series(items[C.SELLER_ID].to_numpy(), index=items[C.ITEM_ID].to_numpy())
    out = rows.rename(columns={C.TS: C.EVENT_TIMESTAMP})
    out[C.EVENT_TIMESTAMP] = out[C.EVENT_TIMESTAMP].dt.as_unit("us")
    out[C.SELLER_ID] = seller.reindex(out[C.ITEM_ID].to_numpy()).to_numpy()
    return out


def fill_defaults(frame: pd.DataFrame) -> pd.DataFrame:
    """Features Feast found no row for take the value serving uses for an unknown entity."""
    for feats in S.FEATURES.values():
        for name, kind in feats.items():
            if name not in frame or kind.endswith("[]"):
                continue
            default = S.DEFAULTS.get(name)
            if kind == "string":
                frame[name] = frame[name].fillna(default if default is not None else "unknown")
            else:
                frame[name] = frame[name].fillna(default if default is not None else 0)
                frame[name] = frame[name].astype(np.float32 if kind == "float32" else np.int64)
    return frame


def affinity_for_items(
    vectors: pa.ChunkedArray, category: np.ndarray, n_categories: int
) -> np.ndarray:
    """Each row's affinity to its own item's category, read straight from Arrow.

    A missing vector (a user with no profile yet) is the uniform prior 1 / n_categories.
    Going through Arrow keeps the (rows x categories) floats out of Python lists, which is
    what ``to_df()`` would build (13 GB for Complete Journey's 307 categories).
    """
    out = np.full(len(category), 1.0 / n_categories, dtype=np.float32)
    if len(category) == 0:
        return out
    lists = vectors.combine_chunks()
    valid = lists.is_valid().to_numpy(zero_copy_only=False)
    if valid.any():
        flat = lists.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        width = len(flat) // int(valid.sum())
        matrix = flat.reshape(-1, width)
        rows = np.flatnonzero(valid)
        cat = category[rows]
        inside = (cat >= 0) & (cat < width)
        out[rows[inside]] = matrix[np.flatnonzero(inside), cat[inside]]
    return out


def _list_layout(lists: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """(list array, offsets into its child values, lengths with 0 for a null list)."""
    array = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    offsets = array.offsets.to_numpy().astype(np.int64)
    valid = array.is_valid().to_numpy(zero_copy_only=False)
    return array, offsets, np.where(valid, np.diff(offsets), 0)


def seller_days_for_items(
    sellers: pa.ChunkedArray | pa.Array, days: pa.ChunkedArray | pa.Array, seller: np.ndarray
) -> np.ndarray:
    """Each row's days since its user last engaged with its item's seller: the entry of
    ``recent_seller_days`` where ``recent_sellers`` holds ``seller``, read straight from Arrow.

    A seller not in the list, an empty list and a missing one (no row) all give the default
    (365 days). One vectorised pass over the lists' values: no per-row Python. Offsets are
    read rather than ``flatten()``ed so a null list backed by values cannot shift the rows.
    """
    out = np.full(len(seller), S.DEFAULTS[S.SELLER_DAYS_SINCE_ENGAGED], dtype=np.float32)
    if len(seller) == 0:
        return out
    seller_lists, offsets, lengths = _list_layout(sellers)
    day_lists, day_offsets, day_lengths = _list_layout(days)
    if not np.array_equal(lengths, day_lengths):
        raise ValueError(
            f"{S.RECENT_SELLERS} and {S.RECENT_SELLER_DAYS} must be aligned lists, got "
            f"{int((lengths != day_lengths).sum())} rows whose lengths differ"
        )
    parent = np.repeat(np.arange(len(lengths)), lengths)
    within = np.arange(len(parent)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    values = seller_lists.values.to_numpy(zero_copy_only=False)
    hit = values[offsets[parent] + within] == seller[parent]
    rows = parent[hit]
    day_values = day_lists.values.to_numpy(zero_copy_only=False)
    out[rows] = day_values[day_offsets[rows] + within[hit]]
    return out


def historical_features(
    store: FeatureStore, entity_df: pd.DataFrame, n_categories: int
) -> pd.DataFrame:
    """Feast's point-in-time join, with the affinity vector reduced to the item's category and
    the seller lists to the item's seller."""
    service = store.get_feature_service(S.RANKER_SERVICE)
    table = store.get_historical_features(entity_df=entity_df, features=service).to_arrow()
    if table.num_rows != len(entity_df):
        raise RuntimeError(
            f"historical retrieval returned {table.num_rows} rows for {len(entity_df)} entity "
            "rows; the offline store lost rows (a point-in-time join must be a left join)"
        )
    lists = [S.AFFINITY_VECTOR, S.RECENT_SELLERS, S.RECENT_SELLER_DAYS]
    frame = table.drop_columns(lists).to_pandas()
    category = frame["category"].fillna(-1).to_numpy(np.int64)
    vectors = table.column(S.AFFINITY_VECTOR)
    frame[S.AFFINITY_FOR_ITEM] = affinity_for_items(vectors, category, n_categories)
    seller = frame[C.SELLER_ID].fillna(-1).to_numpy(np.int64)
    frame[S.SELLER_DAYS_SINCE_ENGAGED] = seller_days_for_items(
        table.column(S.RECENT_SELLERS), table.column(S.RECENT_SELLER_DAYS), seller
    )
    return frame


def build_training_sets(
    tables: dict[str, pd.DataFrame],
    store: FeatureStore,
    out_dir: Path,
    cfg: DatasetConfig | None = None,
    data_end: pd.Timestamp | None = None,
) -> dict[str, Any]:
    """Write ``train/valid/test.parquet`` and a manifest; returns the manifest."""
    cfg = cfg or DatasetConfig()
    started = time.perf_counter()
    imp = label_impressions(tables, cfg.label_window_days)
    start = imp[C.TS].min()
    end = data_end if data_end is not None else imp[C.TS].max().ceil("D")
    split = plan_split(start, end, cfg)
    imp[C.SPLIT] = assign_split(imp, split)
    censored = int(imp[C.SPLIT].isna().sum())
    imp = imp[imp[C.SPLIT].notna()]
    imp = add_sampled_negatives(imp, tables[C.ITEMS], cfg.sampled_negatives, cfg.seed)

    # examination propensities from the randomized traffic before the test period
    history = imp[imp[C.TS] < split.valid_end]
    curve: PositionCurve | None = None
    if (history[C.POLICY] == C.POLICY_RANDOM).any():
        curve = estimate_position_curve(history, tables[C.CLICKS], cfg.max_position)
        exam = curve.propensity(imp[C.POSITION].to_numpy())
    else:
        log.warning("no randomized traffic: examination propensities set to 1 (no IPS)")
        exam = np.ones(len(imp))
    organic = imp[C.POLICY].isin([C.POLICY_ORGANIC, C.POLICY_SAMPLED]).to_numpy()
    imp[EXAMINATION] = np.where(organic, 1.0, exam)
    imp[IPS_WEIGHT] = 1.0 / np.maximum(imp[EXAMINATION].to_numpy(), cfg.min_propensity)
    add_context(imp)

    rows = downsample(imp, cfg)
    entity = entity_frame(rows, tables[C.ITEMS])
    t0 = time.perf_counter()
    n_cat = int(tables[C.ITEMS][C.CATEGORY].max()) + 1
    joined = fill_defaults(historical_features(store, entity, n_cat))
    join_seconds = time.perf_counter() - t0
    joined = joined.sort_values([C.EVENT_TIMESTAMP, C.IMPRESSION_ID], kind="stable")

    out_dir.mkdir(parents=True, exist_ok=True)
    counts, rates = {}, {}
    for name in C.SPLITS:
        part = joined[joined[C.SPLIT] == name].drop(columns=[C.SPLIT])
        part.to_parquet(out_dir / f"{name}.parquet", index=False)
        counts[name] = len(part)
        w = part[C.WEIGHT].to_numpy()
        rates[name] = {
            lab: float(np.average(part[lab], weights=w)) if len(part) else 0.0
            for lab in (C.LABEL_PURCHASE, C.LABEL_CLICK, C.LABEL_ATC)
        }
    seconds = {"total": time.perf_counter() - started, "feast_join": join_seconds}
    manifest: dict[str, Any] = {
        "config": {**asdict(cfg), "split_ratio": list(cfg.split_ratio)},
        "split": split.to_dict(),
        "rows": counts,
        "impressions_labelled": len(imp),
        "impressions_censored": censored,
        "label_rates": {  # over all labelled impressions, before downsampling
            "purchase_7d": float(imp[C.LABEL_PURCHASE].mean()),
            "click": float(imp[C.LABEL_CLICK].mean()),
            "add_to_cart": float(imp[C.LABEL_ATC].mean()),
        },
        "label_rates_by_split_weighted": rates,
        "feature_service": S.RANKER_SERVICE,
        "features": S.feature_refs(),
        "feature_columns": S.training_columns(),
        "position_curve": None if curve is None else curve.to_frame().to_dict(orient="list"),
        "seconds": seconds,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    log.info("training sets %s in %.1fs", counts, seconds["total"])
    return manifest
