"""Training sets: labels, a time split, negative downsampling, position propensities, and
point-in-time correct features from Feast's historical retrieval.

One row per impression. Labels look forward from the impression (a purchase, click or
add-to-cart logged within ``label_window_days``); features look backward (Feast joins the
latest feature row stamped at or before the impression). Impressions too close to the end of
the data to have a complete label window are dropped, never labelled negative.

The rankers learn one of those outcomes, the ``label`` (``--label``), copied into the
``LABEL`` column; the split is a ratio of days or explicit end dates. Both are recorded in
the manifest, and a label with a single class in any split stops the stage (nothing could
learn from it, and every figure computed on it would be meaningless).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from contract import bundle as B
from contract import columns as C
from contract import content
from contract.features import DAY_OF_WEEK, HOUR
from contract.timeutil import NS_PER_DAY, to_ns
from feature_repo import schema as S
from training.affinity import AffinitySnapshots
from training.memory import release_freed_memory
from training.propensity import PositionCurve, estimate_position_curve
from training.tables import RowsById

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)

EXAMINATION = "examination_propensity"
IPS_WEIGHT = "ips_weight"
MANIFEST = "manifest.json"
LABEL = "label"  # the chosen label's outcome (0/1): what the rankers learn

LABEL_COLUMNS = {
    B.LABEL_PURCHASE: C.LABEL_PURCHASE,
    B.LABEL_ADD_TO_CART: C.LABEL_ATC,
    B.LABEL_CLICK: C.LABEL_CLICK,
}
# default label window by label: a purchase follows a feed by days, a click or an add-to-cart
# comes within the session
LABEL_WINDOW_DAYS = {B.LABEL_PURCHASE: 7, B.LABEL_ADD_TO_CART: 1, B.LABEL_CLICK: 1}
DEFAULT_SPLIT_RATIO = (60, 7, 7)  # train / valid / test days (the seed's)
SPLIT_END_OPTIONS = ("--train-end", "--valid-end", "--test-end")


class SingleClassLabelError(ValueError):
    """A label with one class in a split: no model can learn from it, no figure means anything."""


JOIN_CHUNK_ROWS = 250_000  # ~1.2 GB of Feast join at a time
PREPARE_CHUNK_ROWS = 2_000_000  # impressions labelled, split and downsampled at a time
# Valid and test keep whole feeds (eval_negative_rate 1): past this many rows a split keeps a
# uniform sample of its requests instead, so evaluation's cost stops growing with the log.
EVAL_MAX_ROWS = 2_000_000
RATE_LABELS = (C.LABEL_PURCHASE, C.LABEL_CLICK, C.LABEL_ATC)


@dataclass(frozen=True)
class DatasetConfig:
    label: str = B.LABEL_PURCHASE  # the outcome the rankers learn: a LABEL_COLUMNS key
    label_window_days: int | None = None  # None: the label's LABEL_WINDOW_DAYS
    # the split, by a ratio of train / valid / test days or by the (exclusive, UTC) end dates
    # of the three periods, not both; neither: DEFAULT_SPLIT_RATIO
    split_ratio: tuple[float, float, float] | None = None
    split_dates: tuple[str | None, str | None, str | None] | None = None
    negative_rate: float = 0.1  # share of all-negative train impressions kept (weight 1/rate)
    eval_negative_rate: float = 1.0  # the same for valid / test; 1 keeps whole feeds
    max_position: int = 50  # slots the examination curve is estimated for (at most)
    # the examination curve is non-increasing down the page; off for a grid or carousel
    # layout, whose slots have no such order (Open Bandit's left / centre / right)
    monotone_positions: bool = True
    min_propensity: float = 0.05  # IPS weights are clipped at 1 / min_propensity
    # Purchase-only data (no feed was logged) has no negatives: each organic purchase row gets
    # this many items sampled by train-period purchase popularity as label-0 rows (0: none).
    sampled_negatives: int = 0
    split_unit_days: int = 1  # ratio split boundaries fall on multiples of this (7: weeks)
    seed: int = 11
    join_chunk_rows: int = JOIN_CHUNK_ROWS  # entity rows per Feast join (its memory's bound)
    eval_max_rows: int = EVAL_MAX_ROWS  # valid / test past this: a sample of whole requests
    prepare_chunk_rows: int = PREPARE_CHUNK_ROWS  # impressions labelled at a time

    def __post_init__(self) -> None:
        if self.label not in LABEL_COLUMNS:
            raise ValueError(
                f"label (--label) must be one of {', '.join(LABEL_COLUMNS)}, got {self.label!r}"
            )
        for name in ("join_chunk_rows", "eval_max_rows", "prepare_chunk_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.label_window_days is not None and self.label_window_days < 1:
            raise ValueError(
                f"label_window_days (--label-window-days) must be at least 1 day, got "
                f"{self.label_window_days}"
            )
        if self.split_ratio is not None and self.split_dates is not None:
            raise ValueError(
                "choose the split by ratio (--split-ratio) or by dates (--train-end, "
                "--valid-end, --test-end), not both"
            )
        if self.split_ratio is not None and (
            len(self.split_ratio) != 3 or not all(r > 0 for r in self.split_ratio)
        ):
            raise ValueError(
                "split_ratio (--split-ratio) must be three positive numbers "
                f"train,valid,test such as 60,7,7, got {self.split_ratio}"
            )
        if self.split_dates is not None:
            if len(self.split_dates) != 3:
                raise ValueError(
                    f"split_dates must be (train_end, valid_end, test_end), got {self.split_dates}"
                )
            given = zip(SPLIT_END_OPTIONS[:2], self.split_dates[:2], strict=True)
            missing = [option for option, date in given if not date]
            if missing:
                raise ValueError(
                    f"a split by dates needs --train-end and --valid-end (--test-end defaults "
                    f"to the last labelled day); {' and '.join(missing)} missing"
                )

    @property
    def window_days(self) -> int:
        """The label window in days: the one given, else the label's default."""
        if self.label_window_days is not None:
            return self.label_window_days
        return LABEL_WINDOW_DAYS[self.label]

    @property
    def label_column(self) -> str:
        return LABEL_COLUMNS[self.label]

    @property
    def ratio(self) -> tuple[float, float, float]:
        return self.split_ratio if self.split_ratio is not None else DEFAULT_SPLIT_RATIO


def describe_label(kind: str, window_days: int) -> str:
    """``click (within 1 day)``, for messages."""
    return f"{kind} (within {window_days} day{'s' if window_days != 1 else ''})"


@dataclass(frozen=True)
class Split:
    train_start: pd.Timestamp
    train_end: pd.Timestamp
    valid_end: pd.Timestamp
    test_end: pd.Timestamp

    def to_dict(self) -> dict[str, str]:
        return {k: v.isoformat() for k, v in asdict(self).items()}


def plan_split(start: pd.Timestamp, end: pd.Timestamp, cfg: DatasetConfig) -> Split:
    """The split of the data window [``start``, ``end``): by ``split_dates`` when given, else
    whole units of ``split_unit_days`` days in the ratio ``split_ratio``. Either way the test
    period ends at least ``label_window_days`` before ``end``."""
    start = start.floor("D")
    if cfg.split_dates is not None:
        return _dated_split(start, end, cfg)
    unit = max(1, cfg.split_unit_days)
    days = int((end - start) / pd.Timedelta(days=1)) - cfg.window_days
    usable = days // unit
    if usable < 3:
        raise ValueError(
            f"data window {start.date()}..{end.date()} leaves {days} labelled days after the "
            f"{cfg.window_days}-day label window of {cfg.label} (--label-window-days); need at "
            f"least 3 units of {unit} day(s) (train, valid, test): shorten the window with "
            "--label-window-days, or bring a longer log"
        )
    ratio = cfg.ratio
    total = sum(ratio)
    valid = max(1, round(usable * ratio[1] / total))
    test = max(1, round(usable * ratio[2] / total))
    train = usable - valid - test
    day = pd.Timedelta(days=unit)
    return Split(
        start,
        start + train * day,
        start + (train + valid) * day,
        start + (train + valid + test) * day,
    )


def _utc(text: str, option: str) -> pd.Timestamp:
    try:
        stamp = pd.Timestamp(text)
    except ValueError:
        raise ValueError(f"{option} expects a UTC date YYYY-MM-DD, got {text!r}") from None
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _dated_split(start: pd.Timestamp, end: pd.Timestamp, cfg: DatasetConfig) -> Split:
    """``split_dates`` checked against the data window: each period non-empty, the test period
    ending where the label window still fits (its default end)."""
    assert cfg.split_dates is not None
    last = (end - pd.Timedelta(days=cfg.window_days)).floor("D")
    train_text, valid_text, test_text = cfg.split_dates
    train_end = _utc(str(train_text), "--train-end")
    valid_end = _utc(str(valid_text), "--valid-end")
    test_end = _utc(str(test_text), "--test-end") if test_text else last
    window = (
        f"the data covers {start.date()}..{end.date()} and the {cfg.window_days}-day label "
        f"window of {cfg.label} (--label-window-days) labels impressions before {last.date()}"
    )
    if train_end <= start:
        raise ValueError(f"--train-end {train_end.date()} leaves the train period empty: {window}")
    if not train_end < valid_end < test_end:
        default = "" if test_text else f" (--test-end defaults to {last.date()}: {window})"
        raise ValueError(
            "split dates must increase, so that no period is left empty (--train-end < "
            f"--valid-end < --test-end), got {train_end.date()}, {valid_end.date()}, "
            f"{test_end.date()}{default}"
        )
    if test_end > last:
        raise ValueError(
            f"--test-end {test_end.date()} is past the last labelled day: {window}; end the "
            f"test period on {last.date()} or earlier"
        )
    return Split(start, train_end, valid_end, test_end)


def label_hits(tables: dict[str, pd.DataFrame], label_window_days: int) -> dict[str, np.ndarray]:
    """Per label column, the (sorted, unique) rows of the impressions table whose outcome was
    logged within ``label_window_days`` days of the impression: the labels of every
    impression, held as the few positive rows rather than as columns."""
    imp = tables[C.IMPRESSIONS]
    rows_of = RowsById(imp[C.IMPRESSION_ID].to_numpy(np.int64))
    shown = to_ns(imp[C.TS])
    window = label_window_days * NS_PER_DAY
    hits = {}
    for col, table in (
        (C.LABEL_CLICK, C.CLICKS),
        (C.LABEL_ATC, C.ADD_TO_CARTS),
        (C.LABEL_PURCHASE, C.PURCHASES),
    ):
        events = tables[table]
        row = rows_of(events[C.IMPRESSION_ID].to_numpy(np.int64))
        ok = row >= 0
        delay = to_ns(events[C.TS])[ok] - shown[row[ok]]
        hits[col] = np.unique(row[ok][delay <= window])
    return hits


def _label_chunk(imp: pd.DataFrame, hits: dict[str, np.ndarray], lo: int) -> pd.DataFrame:
    """``imp`` (the impressions' rows ``lo`` onwards) with its label columns."""
    for col, rows in hits.items():
        within = rows[(rows >= lo) & (rows < lo + len(imp))] - lo
        hit = np.zeros(len(imp), dtype=np.int8)
        hit[within] = 1
        imp[col] = hit
    return imp


def label_impressions(tables: dict[str, pd.DataFrame], label_window_days: int) -> pd.DataFrame:
    """Impressions with their purchase, click and add-to-cart labels: 1 when the outcome was
    logged within ``label_window_days`` days of the impression."""
    hits = label_hits(tables, label_window_days)
    return _label_chunk(tables[C.IMPRESSIONS].copy(), hits, 0)


def add_sampled_negatives(
    imp: pd.DataFrame, items: pd.DataFrame, k: int, seed: int
) -> pd.DataFrame:
    """``imp`` plus ``k`` label-0 rows per organic purchase row (``sampled_negatives``)."""
    rows = sampled_negatives(imp, items, k, seed, int(imp[C.IMPRESSION_ID].max()) + 1)
    return imp if rows.empty else pd.concat([imp, rows], ignore_index=True)


def sampled_negatives(
    imp: pd.DataFrame, items: pd.DataFrame, k: int, seed: int, first_id: int
) -> pd.DataFrame:
    """``k`` label-0 rows per organic purchase row of ``imp``: the same request, user and
    time with an item drawn by train-split purchase popularity (add-one smoothed over the
    catalogue), never an item of the same request. Policy ``POLICY_SAMPLED``, impression ids
    from ``first_id`` on (past every logged one).

    Popularity sampling makes the negatives plausible purchases, so the model must learn who
    buys what rather than what sells; the train split alone sets the distribution so the test
    period's popularity does not leak into its own negatives.
    """
    organic = imp[(imp[C.POLICY] == C.POLICY_ORGANIC) & (imp[C.LABEL_PURCHASE] > 0)]
    if k <= 0 or organic.empty:
        return imp.iloc[:0]
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
    rows = rows[~clash].copy()
    rows[C.POLICY] = C.POLICY_SAMPLED
    for col in (C.LABEL_CLICK, C.LABEL_ATC, C.LABEL_PURCHASE, LABEL):
        if col in rows:
            rows[col] = np.int8(0)
    rows[C.IMPRESSION_ID] = first_id + np.arange(len(rows), dtype=np.int64)
    log.info(
        "sampled %d negatives for %d organic purchases (%d drawn items were the request's own)",
        len(rows),
        len(organic),
        int(clash.sum()),
    )
    return rows


def assign_split(imp: pd.DataFrame, split: Split) -> pd.Series:
    ts = imp[C.TS]
    out = pd.Series(pd.NA, index=imp.index, dtype="string")
    out[(ts >= split.train_start) & (ts < split.train_end)] = "train"
    out[(ts >= split.train_end) & (ts < split.valid_end)] = "valid"
    out[(ts >= split.valid_end) & (ts < split.test_end)] = "test"
    return out


def downsample(
    imp: pd.DataFrame, cfg: DatasetConfig, rng: np.random.Generator | None = None
) -> pd.DataFrame:
    """Keep every impression with a positive label, a ``rate`` share of the rest (weight
    1/rate). ``rng``: one generator across the chunks of a log (default: from the seed)."""
    rng = rng if rng is not None else np.random.default_rng(cfg.seed)
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
    out = rows.rename(columns={C.TS: C.EVENT_TIMESTAMP}, copy=False)
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


class ItemContent:
    """The catalogue's unit content rows by item id (``contract.content``): what the user's
    content profile is compared with, per training row as per served candidate."""

    def __init__(self, items: pd.DataFrame) -> None:
        self.index = pd.Index(items[C.ITEM_ID].to_numpy(np.int64))
        self.unit = content.table_unit(items)

    def at(self, item_ids: np.ndarray) -> np.ndarray:
        """(rows, dim) unit content of each id; a zero row for an id the catalogue lacks."""
        rows = self.index.get_indexer(pd.Index(np.asarray(item_ids, np.int64)))
        out = self.unit[np.maximum(rows, 0)]
        out[rows < 0] = 0.0
        return out


def content_affinity_for_items(
    profiles: pa.ChunkedArray | pa.Array, item_unit: np.ndarray
) -> np.ndarray:
    """Each row's ``content_affinity_for_item``: the cosine of its user's ``content_profile``
    list (read in place from Arrow) and its item's unit content
    (``contract.content.similarity_rows``; 0 for an empty, missing or mis-sized list)."""
    lists, offsets, lengths = _list_layout(profiles)
    values = lists.values.to_numpy(zero_copy_only=False)
    return content.similarity_rows(offsets[:-1], lengths, values, item_unit)


def historical_features(
    store: FeatureStore,
    entity_df: pd.DataFrame,
    n_categories: int,
    item_content: ItemContent,
    snapshots: AffinitySnapshots | None = None,
) -> pd.DataFrame:
    """Feast's point-in-time join of the ranker's feature service, with the seller lists
    reduced to the item's seller, the user's category affinity reduced to the item's
    category (``contract.affinity.for_rows``, with the row's ``category_share``) and the
    user's content profile to its cosine with the item's content (``contract.content``).

    The affinity view is joined here rather than by Feast, by the same rule
    (``AffinitySnapshots.snapshot_of``: the latest snapshot at or before the row, within the
    view's TTL): through Feast every joined row would carry the user's lists (several
    copies in DuckDB and Arrow), here only the view's own snapshots are read once.
    ``tests/test_dataset.py`` checks the two joins agree. ``snapshots``: the view already
    read (a caller joining in chunks reads it once)."""
    service = store.get_feature_service(S.RANKER_SERVICE)
    refs = [
        f"{projection.name_to_use()}:{field.name}"
        for projection in service.feature_view_projections
        if projection.name != S.USER_CATEGORY_AFFINITY
        for field in projection.features
    ]
    table = store.get_historical_features(entity_df=entity_df, features=refs).to_arrow()
    if table.num_rows != len(entity_df):
        raise RuntimeError(
            f"historical retrieval returned {table.num_rows} rows for {len(entity_df)} entity "
            "rows; the offline store lost rows (a point-in-time join must be a left join)"
        )
    lists = [S.RECENT_SELLERS, S.RECENT_SELLER_DAYS, S.CONTENT_PROFILE]
    frame = table.drop_columns(lists).to_pandas()
    category = frame["category"].fillna(-1).to_numpy(np.int64)
    if snapshots is None:
        snapshots = read_affinity(store)
    users, when = frame[C.USER_ID].to_numpy(np.int64), to_ns(frame[C.EVENT_TIMESTAMP])
    frame[S.AFFINITY_FOR_ITEM] = snapshots.at_categories(
        users, when, category, frame["category_share"].to_numpy(np.float64), n_categories
    )
    frame[S.AFFINITY_TOTAL] = snapshots.totals_at(users, when)
    seller = frame[C.SELLER_ID].fillna(-1).to_numpy(np.int64)
    frame[S.SELLER_DAYS_SINCE_ENGAGED] = seller_days_for_items(
        table.column(S.RECENT_SELLERS), table.column(S.RECENT_SELLER_DAYS), seller
    )
    frame[S.CONTENT_AFFINITY_FOR_ITEM] = content_affinity_for_items(
        table.column(S.CONTENT_PROFILE), item_content.at(frame[C.ITEM_ID].to_numpy(np.int64))
    )
    return frame


def read_affinity(store: FeatureStore) -> AffinitySnapshots:
    """The affinity view's offline snapshots (``training.affinity``)."""
    return AffinitySnapshots.read(_source_path(store, S.USER_CATEGORY_AFFINITY))


def join_in_chunks(
    store: FeatureStore,
    entity: pd.DataFrame,
    n_categories: int,
    item_content: ItemContent,
    chunk_rows: int,
) -> pd.DataFrame:
    """``fill_defaults(historical_features(...))`` of ``entity`` in time-ordered chunks of
    at most ``chunk_rows`` rows, concatenated (``iter_joined``)."""
    chunks = iter_joined(store, entity, n_categories, item_content, chunk_rows)
    return pd.concat(list(chunks), ignore_index=True)


def iter_joined(
    store: FeatureStore,
    entity: pd.DataFrame,
    n_categories: int,
    item_content: ItemContent,
    chunk_rows: int,
) -> Iterator[pd.DataFrame]:
    """``fill_defaults(historical_features(...))`` of ``entity``, ``chunk_rows`` rows at a time
    in time order: Feast's join costs ~4.8 KB a row while it runs (DuckDB, Arrow, pandas), so
    its transient part is bounded by the chunk; a caller that writes each chunk out holds no
    more than one."""
    if len(entity) <= chunk_rows:
        yield fill_defaults(historical_features(store, entity, n_categories, item_content))
        return
    snapshots = read_affinity(store)
    order = np.argsort(to_ns(entity[C.EVENT_TIMESTAMP]), kind="stable")
    for lo in range(0, len(entity), chunk_rows):
        chunk = entity.iloc[order[lo : lo + chunk_rows]]
        yield fill_defaults(
            historical_features(store, chunk, n_categories, item_content, snapshots)
        )
        log.info("joined %d of %d entity rows", min(lo + chunk_rows, len(entity)), len(entity))


class SplitWriter:
    """Joined rows appended to ``train/valid/test.parquet`` as they come (written as
    ``.partial`` and renamed on ``close``), with each split's row count and weighted label
    rates. Chunks must come in (event time, impression id) order for the files to be."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.schema: pa.Schema | None = None
        self.counts = {name: 0 for name in C.SPLITS}
        self.weight = {name: 0.0 for name in C.SPLITS}
        self.weighted = {name: dict.fromkeys(RATE_LABELS, 0.0) for name in C.SPLITS}

    def _partial(self, name: str) -> Path:
        return self.out_dir / f"{name}.parquet.partial"

    def write(self, joined: pd.DataFrame) -> None:
        joined = joined.sort_values([C.EVENT_TIMESTAMP, C.IMPRESSION_ID], kind="stable")
        for name in C.SPLITS:
            part = joined[joined[C.SPLIT] == name].drop(columns=[C.SPLIT])
            if part.empty:
                continue
            table = pa.Table.from_pandas(part, preserve_index=False)
            if self.schema is None:
                self.schema = table.schema
            elif not table.schema.equals(self.schema, check_metadata=False):
                table = table.cast(self.schema)
            if name not in self.writers:
                self.writers[name] = pq.ParquetWriter(self._partial(name), self.schema)
            self.writers[name].write_table(table.replace_schema_metadata(self.schema.metadata))
            w = part[C.WEIGHT].to_numpy(np.float64)
            self.counts[name] += len(part)
            self.weight[name] += float(w.sum())
            for lab in RATE_LABELS:
                self.weighted[name][lab] += float(w @ part[lab].to_numpy(np.float64))

    def close(self) -> None:
        for name in C.SPLITS:
            if name not in self.writers and self.schema is not None:  # no row: an empty file
                self.writers[name] = pq.ParquetWriter(self._partial(name), self.schema)
            if name in self.writers:
                self.writers[name].close()
                self._partial(name).replace(self.out_dir / f"{name}.parquet")
        self.writers = {}

    def rates(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                lab: self.weighted[name][lab] / self.weight[name] if self.weight[name] else 0.0
                for lab in RATE_LABELS
            }
            for name in C.SPLITS
        }


def _source_path(store: FeatureStore, view: str) -> Path:
    """The offline Parquet file of a batch view (relative paths are the store's repo's)."""
    from feast import FileSource

    source = store.get_feature_view(view).batch_source
    if not isinstance(source, FileSource):
        raise TypeError(f"{view}: expected a Parquet FileSource offline, got {source!r}")
    path = Path(source.path)
    return path if path.is_absolute() else Path(store.repo_path) / path


def require_periods(counts: dict[str, int], split: Split) -> None:
    """Every period of the split holds impressions (``counts``: labelled impressions per
    period; a gap in the log can empty one)."""
    bounds = {
        "train": (split.train_start, split.train_end),
        "valid": (split.train_end, split.valid_end),
        "test": (split.valid_end, split.test_end),
    }
    for name, (lo, hi) in bounds.items():
        if counts.get(name, 0) == 0:
            raise ValueError(
                f"the {name} period {lo.date()}..{hi.date()} holds no impressions: move the "
                "split (--train-end, --valid-end, --test-end or --split-ratio) so that every "
                "period has data"
            )


def require_two_classes(
    frame: pd.DataFrame, column: str, where: str, kind: str, window_days: int
) -> None:
    """Raise ``SingleClassLabelError`` unless ``frame[column]``, the ``kind`` label, holds both
    classes; the message names the label, ``where`` (``the train split``), the row counts and
    what to change."""
    positive = int((frame[column].to_numpy() > 0).sum())
    others = {
        other: int((frame[col].to_numpy() > 0).sum())
        for other, col in LABEL_COLUMNS.items()
        if kind != other and col in frame
    }
    require_two_classes_counted(len(frame), positive, others, where, kind, window_days)


def require_two_classes_counted(
    rows: int, positive: int, others: dict[str, int], where: str, kind: str, window_days: int
) -> None:
    """``require_two_classes`` from counts: ``rows`` rows of which ``positive`` are positive
    for the ``kind`` label, ``others`` the positive rows of the other labels."""
    if 0 < positive < rows:
        return
    if positive == 0:
        named = ", ".join(f"{other} {n:,}" for other, n in others.items())
        state = f"none of its {rows:,} rows is positive"
        fix = (
            f"pick another --label (positive rows of the others there: {named}), or a "
            f"longer --label-window-days if {kind} comes later than {window_days} day(s) after "
            "the impression"
        )
    else:
        state = f"all {rows:,} rows are positive"
        fix = (
            "the log holds no negatives for it: log the impressions the outcome did not "
            "follow, or sample negatives (sampled_negatives)"
        )
    raise SingleClassLabelError(
        f"the {describe_label(kind, window_days)} label has a single class in {where}: "
        f"{state}. No model can learn from it and every figure would be meaningless, "
        f"so the run stops here; {fix}"
    )


def check_label(folder: Path) -> dict[str, Any]:
    """The label entry of the training sets in ``folder`` once every split is checked to hold
    both of its classes (``require_two_classes``): what `homefeed train` runs before it fits
    anything. Training sets from before the label was a choice are labelled purchase."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(
            f"no training sets at {path.parent}: run `homefeed dataset` for this dataset first"
        )
    manifest = json.loads(path.read_text())
    days = manifest.get("config", {}).get("label_window_days") or B.DEFAULT_LABEL_WINDOW_DAYS
    label: dict[str, Any] = manifest.get("label") or {
        "kind": B.LABEL_PURCHASE,
        "column": C.LABEL_PURCHASE,
        "window_days": days,
    }
    for split in C.SPLITS:
        part = Path(folder) / f"{split}.parquet"
        names = set(pq.read_schema(part).names)
        columns = [c for c in (LABEL, *LABEL_COLUMNS.values()) if c in names]
        frame = pd.read_parquet(part, columns=columns)
        column = LABEL if LABEL in frame else label["column"]
        where = f"the {split} split of {folder}"
        require_two_classes(frame, column, where, label["kind"], int(label["window_days"]))
    return label


def request_share(request_ids: np.ndarray, share: float) -> np.ndarray:
    """Whether each request is in a uniform ``share`` of requests: a hash of its id, so a
    request's rows agree across the chunks of a log and across runs."""
    if share >= 1.0:
        return np.ones(len(request_ids), dtype=bool)
    mixed = request_ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    mixed ^= mixed >> np.uint64(29)
    return (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53) < share


def eval_shares(ts_ns: np.ndarray, split: Split, cfg: DatasetConfig) -> dict[str, float]:
    """The share of requests valid and test keep: all of them unless the split's impressions
    (kept at ``eval_negative_rate``) would pass ``eval_max_rows``."""
    out = {"train": 1.0}
    for name, lo, hi in (
        ("valid", split.train_end, split.valid_end),
        ("test", split.valid_end, split.test_end),
    ):
        n = int(((ts_ns >= lo.value) & (ts_ns < hi.value)).sum()) * cfg.eval_negative_rate
        out[name] = min(1.0, cfg.eval_max_rows / n) if n > 0 else 1.0
    return out


def prepare_rows(
    tables: dict[str, pd.DataFrame],
    cfg: DatasetConfig,
    split: Split,
    curve: PositionCurve | None,
    hits: dict[str, np.ndarray],
    shares: dict[str, float],
    consume_tables: bool = False,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The rows the join needs, ``cfg.prepare_chunk_rows`` impressions at a time: labelled,
    split (censored rows dropped), valid / test sampled by request (``shares``), given
    their examination propensity, IPS weight and context, then downsampled. Returns them and
    the tally of every labelled impression (rows per period, positives per label).
    ``consume_tables``: the event tables leave ``tables`` before the kept chunks are
    concatenated (``build_training_sets``)."""
    impressions = tables[C.IMPRESSIONS]
    rng = np.random.default_rng(cfg.seed)
    kept: list[pd.DataFrame] = []
    tally: dict[str, Any] = {
        "labelled": 0,
        "censored": 0,
        "periods": dict.fromkeys(C.SPLITS, 0),
        "positives": dict.fromkeys(RATE_LABELS, 0),
    }
    for lo in range(0, len(impressions), cfg.prepare_chunk_rows):
        imp = _label_chunk(impressions.iloc[lo : lo + cfg.prepare_chunk_rows].copy(), hits, lo)
        imp[C.SPLIT] = assign_split(imp, split)
        labelled = imp[C.SPLIT].notna().to_numpy()
        tally["censored"] += int((~labelled).sum())
        imp = imp[labelled]
        for name, n in imp[C.SPLIT].value_counts().items():
            tally["periods"][name] += int(n)
        tally["labelled"] += len(imp)
        for col in RATE_LABELS:
            tally["positives"][col] += int(imp[col].sum())
        sampled = np.ones(len(imp), dtype=bool)
        for name in ("valid", "test"):
            if shares[name] < 1.0:
                in_split = (imp[C.SPLIT] == name).to_numpy()
                keep = request_share(imp[C.REQUEST_ID].to_numpy(np.int64), shares[name])
                sampled &= ~in_split | keep
        imp = imp[sampled]
        _propensities(imp, cfg, curve)
        kept.append(downsample(imp, cfg, rng))
    first_id = int(impressions[C.IMPRESSION_ID].max()) + 1 if len(impressions) else 0
    empty = impressions.iloc[:0]
    del impressions
    if consume_tables:  # every impression: from here on only the rows kept are needed
        for name in (C.IMPRESSIONS, C.CLICKS, C.ADD_TO_CARTS, C.PURCHASES, C.INVENTORY):
            tables.pop(name, None)
    rows = pd.concat(kept, ignore_index=True) if kept else empty
    del kept
    if cfg.sampled_negatives > 0:
        negatives = sampled_negatives(
            rows, tables[C.ITEMS], cfg.sampled_negatives, cfg.seed, first_id
        )
        if not negatives.empty:
            tally["labelled"] += len(negatives)
            for name, n in negatives[C.SPLIT].value_counts().items():
                tally["periods"][name] += int(n)
            negatives = downsample(negatives, cfg, rng)
            rows = pd.concat([rows, negatives], ignore_index=True)
    return rows, tally


def _propensities(imp: pd.DataFrame, cfg: DatasetConfig, curve: PositionCurve | None) -> None:
    """The label, examination propensity, IPS weight and context columns, in place."""
    imp[LABEL] = imp[cfg.label_column]
    exam = curve.propensity(imp[C.POSITION].to_numpy()) if curve is not None else np.ones(len(imp))
    organic = imp[C.POLICY].isin([C.POLICY_ORGANIC, C.POLICY_SAMPLED]).to_numpy()
    imp[EXAMINATION] = np.where(organic, 1.0, exam)
    imp[IPS_WEIGHT] = 1.0 / np.maximum(imp[EXAMINATION].to_numpy(), cfg.min_propensity)
    add_context(imp)


def build_training_sets(
    tables: dict[str, pd.DataFrame],
    store: FeatureStore,
    out_dir: Path,
    cfg: DatasetConfig | None = None,
    data_end: pd.Timestamp | None = None,
    before_join: Callable[[int, int], None] | None = None,
    consume_tables: bool = False,
) -> dict[str, Any]:
    """Write ``train/valid/test.parquet`` and a manifest; returns the manifest.

    Memory follows the rows kept, not the log: impressions are labelled, split and
    downsampled ``cfg.prepare_chunk_rows`` at a time (``prepare_rows``), valid and test keep a
    sample of whole requests past ``cfg.eval_max_rows``, and the Feast join's chunks are
    written out as they come (``SplitWriter``).

    ``consume_tables``: the event tables are removed from ``tables`` once the entity rows
    are known, so the caller's dict does not keep them alive through the join.

    ``before_join(rows, chunk_rows)`` runs once the entity rows are known, before the Feast
    join allocates (the dataset stage's memory check raises there)."""
    cfg = cfg or DatasetConfig()
    started = time.perf_counter()
    impressions = tables[C.IMPRESSIONS]
    hits = label_hits(tables, cfg.window_days)
    if len(hits[cfg.label_column]) == 0:  # a log without the outcome: say so before any split
        others = {k: len(hits[col]) for k, col in LABEL_COLUMNS.items() if k != cfg.label}
        require_two_classes_counted(
            len(impressions), 0, others, "the log", cfg.label, cfg.window_days
        )
    ts_ns = to_ns(impressions[C.TS])
    start = pd.Timestamp(int(ts_ns.min()), tz="UTC")
    end = data_end if data_end is not None else pd.Timestamp(int(ts_ns.max()), tz="UTC").ceil("D")
    split = plan_split(start, end, cfg)
    shares = eval_shares(ts_ns, split, cfg)

    # examination propensities from the traffic before the test period (randomized and
    # harvested from the logging policy's rank variation: training.propensity)
    history = (ts_ns >= split.train_start.value) & (ts_ns < split.valid_end.value)
    del ts_ns
    curve: PositionCurve | None = None
    if history.any():
        curve = estimate_position_curve(
            impressions,
            tables[C.CLICKS],
            cfg.max_position,
            monotone=cfg.monotone_positions,
            seed=cfg.seed,
            all_traffic=True,
            rows=history,
        )
        log.info("position curve over %d slots: %s", len(curve.positions), curve.reason)
    else:
        log.warning("no traffic before the test period: examination propensities set to 1")
    del history
    del impressions
    rows, tally = prepare_rows(tables, cfg, split, curve, hits, shares, consume_tables)
    del hits
    require_periods(tally["periods"], split)
    label_rates = {  # over all labelled impressions, before downsampling
        f"purchase_{cfg.window_days}d": tally["positives"][C.LABEL_PURCHASE] / tally["labelled"],
        "click": tally["positives"][C.LABEL_CLICK] / tally["labelled"],
        "add_to_cart": tally["positives"][C.LABEL_ATC] / tally["labelled"],
    }
    positives = {}
    for name in C.SPLITS:  # before the Feast join, the stage's costly part
        part = rows[rows[C.SPLIT] == name]
        require_two_classes(part, LABEL, f"the {name} split", cfg.label, cfg.window_days)
        positives[name] = int(part[LABEL].sum())
    # chunks in (time, id) order: the files come out sorted
    rows = rows.iloc[np.lexsort((rows[C.IMPRESSION_ID].to_numpy(), to_ns(rows[C.TS])))]
    entity = entity_frame(rows.reset_index(drop=True), tables[C.ITEMS])
    del rows
    n_cat = int(tables[C.ITEMS][C.CATEGORY].max()) + 1
    if before_join is not None:
        before_join(len(entity), cfg.join_chunk_rows)
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = SplitWriter(out_dir)
    item_content = ItemContent(tables[C.ITEMS])
    for joined in iter_joined(store, entity, n_cat, item_content, cfg.join_chunk_rows):
        writer.write(joined)
        del joined
        release_freed_memory()  # the chunk's Arrow and DuckDB buffers, before the next
    writer.close()
    join_seconds = time.perf_counter() - t0
    counts, rates = writer.counts, writer.rates()
    seconds = {"total": time.perf_counter() - started, "feast_join": join_seconds}
    by_dates = cfg.split_dates is not None
    manifest: dict[str, Any] = {
        "config": {
            **asdict(cfg),
            "label_window_days": cfg.window_days,
            "split_ratio": None if by_dates else list(cfg.ratio),
            "split_dates": list(cfg.split_dates) if cfg.split_dates is not None else None,
        },
        "label": {
            "kind": cfg.label,
            "column": cfg.label_column,
            "window_days": cfg.window_days,
            "score": B.score_meaning(cfg.label),
            "positive_rows": positives,  # after downsampling, as written
        },
        "split_by": "dates" if by_dates else "ratio",
        "split": split.to_dict(),
        "rows": counts,
        "impressions_labelled": tally["labelled"],
        "impressions_censored": tally["censored"],
        # valid / test: the share of requests kept (1: every feed; eval_max_rows)
        "eval_request_share": {k: shares[k] for k in ("valid", "test")},
        "label_rates": label_rates,
        "label_rates_by_split_weighted": rates,
        "feature_service": S.RANKER_SERVICE,
        "features": S.feature_refs(),
        "feature_columns": S.training_columns(),
        "position_curve": None if curve is None else curve.to_dict(),
        "seconds": seconds,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    log.info("training sets %s in %.1fs", counts, seconds["total"])
    return manifest
