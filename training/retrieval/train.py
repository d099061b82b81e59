"""``train_retrieval``: read a dataset, train the towers, export, index, evaluate.

Files written under ``out_dir`` (names from ``contract.bundle``):

- ``retrieval/user_tower.npz``: the user tower for ``contract.tower.UserTower.load``;
- ``retrieval/item_embeddings.npy``: ``(items, dim)`` float32, **not** L2-normalised (the
  score is the raw dot product; an item's norm carries its popularity); with a value weight
  (``TowerConfig.value_weight`` > 0) the last column is the item's ``log(price x margin)``
  and the user tower's last output the weight (``contract.tower.with_value_column``), so the
  index ranks by taste + weight x log(value);
- ``retrieval/item_ids.npy``: int64 item id of each embedding row (= ANN row);
- ``retrieval/scann/``: the ScaNN index, paths relative to the folder;
- ``retrieval/popular.json``: the popularity fallback (``training.retrieval.popular``);
- ``retrieval/config.json``: tower, input, item-encoder and index parameters.

The figures are computed with the exported artefacts (the numpy tower and the reloaded
index), so they measure what serving loads. The test split is used only for the report;
early stopping reads the valid split.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from contract import affinity, bundle
from contract import columns as C
from contract.ann import load_index
from contract.history import History
from contract.paths import Paths
from contract.timeutil import NS_PER_DAY, to_ns
from contract.tower import InputSpec, UserTower, item_value, with_value_column
from feature_repo import schema as S
from training.dataset import MANIFEST
from training.memory import REDUCE_DATA, list_entries, require_fits
from training.retrieval import ann, popular
from training.retrieval.evaluate import (
    EvalGroups,
    eval_groups,
    interleave,
    recall_at_k,
    top_items,
)
from training.retrieval.features import (
    LABELS,
    AffinitySnapshots,
    Catalog,
    positive,
    read_split,
    user_features,
    user_input_spec,
)
from training.retrieval.history import build_history, history_first
from training.retrieval.towers import (
    Examples,
    FitResult,
    ItemEncoder,
    ItemInputs,
    TowerConfig,
    Validation,
    export_user_tower,
    fit,
)
from training.tables import read_tables

log = logging.getLogger(__name__)

POPULAR = bundle.POPULAR
FALLBACK_WINDOW_DAYS = 7
PARITY_ROWS = 256
HEADLINE = ("purchase", "click")  # the groups of the report's top-level recall figures
RECALL_KS = (10, 20, 50, 100, 200)  # the report's recall curve, beside k itself


@dataclass(frozen=True)
class RetrievalData:
    """What retrieval reads from one dataset folder."""

    catalog: Catalog
    users: pd.DataFrame
    spec: InputSpec
    affinity: AffinitySnapshots
    splits: dict[str, pd.DataFrame]
    split_times: dict[str, pd.Timestamp]

    @classmethod
    def load(cls, home: Path, dataset: str) -> RetrievalData:
        paths = Paths(home)
        tables = read_tables(paths.raw(dataset), [C.ITEMS, C.USERS])
        catalog = Catalog.from_items(tables[C.ITEMS])
        spec = user_input_spec(catalog.n_categories)
        training_dir = paths.training_sets(dataset)
        manifest = json.loads((training_dir / MANIFEST).read_text())
        affinity_path = paths.features(dataset) / f"{S.USER_CATEGORY_AFFINITY}.parquet"
        require_fits(
            "retrieval training",
            retrieval_estimate(affinity_path, training_dir, catalog.n_categories),
            REDUCE_DATA,
        )
        return cls(
            catalog=catalog,
            users=tables[C.USERS],
            spec=spec,
            affinity=AffinitySnapshots.read(affinity_path),
            splits={name: read_split(training_dir, name, spec) for name in C.SPLITS},
            split_times={k: pd.Timestamp(v) for k, v in manifest["split"].items()},
        )

    def encode(self, rows: pd.DataFrame) -> np.ndarray:
        return self.spec.encode(user_features(rows, self.spec, self.affinity))


def retrieval_estimate(
    affinity_path: Path, training_dir: Path, n_categories: int
) -> dict[str, float]:
    """Bytes the retrieval stage holds for the category affinity, from file metadata: the
    snapshots as flat arrays (~40 bytes a snapshot and 12 an engaged category, about twice
    while read), and the encoded inputs, bounded by the tower's bucket count whatever the
    taxonomy: ~3 float32 copies (the encoded rows, the examples, torch's batches) of the
    train rows that are encoded, the engaged ones and each request's first, plus one
    batch's float64 intermediates (``EncodedRows``; validation encodes only its sampled
    groups' queries)."""
    meta = pq.ParquetFile(affinity_path).metadata
    snapshots = meta.num_rows
    entries = list_entries(meta, S.AFFINITY_CATEGORIES)
    train = pd.read_parquet(training_dir / "train.parquet", columns=[C.REQUEST_ID, *LABELS])
    encoded = int((first_of_request(train) | positive(train)).sum())
    width = affinity.bucket_count(n_categories) + 32  # the buckets and the scalar inputs
    return {
        "affinity snapshots (flat lists)": 2 * (snapshots * 40 + entries * 12),
        "encoded training rows (engaged rows x tower inputs)": encoded * width * 4 * 3,
        "one batch's encoding (float64)": min(encoded, 100_000) * width * 8 * 4,
    }


@dataclass(frozen=True)
class EncodedRows:
    """The encoded user inputs of only the rows of a split that training reads: each
    request's first row (the normalisation) and the engaged rows (the examples). The
    unengaged rows, most of a split, are never encoded: memory follows the positives."""

    x: np.ndarray  # (encoded rows, inputs) float32
    index: np.ndarray  # split row -> row of x; -1: not encoded

    @classmethod
    def of(
        cls, data: RetrievalData, rows: pd.DataFrame, needed: np.ndarray, batch: int = 100_000
    ) -> EncodedRows:
        """Encoded ``batch`` rows at a time into one float32 array: the encoder's float64
        intermediates and the affinity buckets are one batch's, not the split's."""
        index = np.where(needed, np.cumsum(needed) - 1, -1)
        picked = rows[needed]
        x = np.empty((len(picked), len(data.spec.input_names)), dtype=np.float32)
        for lo in range(0, len(picked), batch):
            x[lo : lo + batch] = data.encode(picked.iloc[lo : lo + batch])
        return cls(x, index)

    def take(self, mask: np.ndarray) -> np.ndarray:
        at = self.index[mask]
        if (at < 0).any():
            raise ValueError(f"{int((at < 0).sum())} of the rows asked for were not encoded")
        return self.x[at]


def first_of_request(rows: pd.DataFrame) -> np.ndarray:
    return ~rows[C.REQUEST_ID].duplicated().to_numpy()


def normalisation(first_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of the encoded inputs of each request's first row (one
    row per request: the serving distribution, not the engaged users'). A constant column
    gets std 1."""
    sample = first_rows.astype(np.float64)
    std = sample.std(axis=0)
    return sample.mean(axis=0).astype(np.float32), np.where(std > 1e-6, std, 1.0).astype(np.float32)


def build_examples(
    rows: pd.DataFrame,
    user_x: EncodedRows,
    catalog_rows: np.ndarray,
    cfg: TowerConfig,
    end: pd.Timestamp,
) -> Examples:
    """Positives of ``rows`` with their request's unengaged impressions as hard negatives.

    A positive weighs ``1 + purchase_weight`` if purchased, else 1, times
    ``0.5 ** (age / recency_half_life_days)`` with ``age`` its days before ``end``: what was
    engaged with lately is what the logging policy will show next, so it counts more.
    """
    engaged = positive(rows)
    listed = catalog_rows >= 0
    if (~listed).any():
        log.warning("%d training rows name items the catalog does not list", (~listed).sum())
    pos = engaged & listed
    neg = ~engaged & listed
    requests = rows[C.REQUEST_ID].to_numpy(np.int64)
    order = np.argsort(requests[neg], kind="stable")
    neg_requests = requests[neg][order]
    neg_items = catalog_rows[neg][order]
    uniq, start, count = np.unique(neg_requests, return_index=True, return_counts=True)
    at = np.searchsorted(uniq, requests[pos])
    at_ok = at < len(uniq)
    at_ok[at_ok] = uniq[at[at_ok]] == requests[pos][at_ok]
    safe = np.minimum(at, max(len(uniq) - 1, 0))
    weight = 1.0 + cfg.purchase_weight * (rows[C.LABEL_PURCHASE].to_numpy()[pos] > 0)
    if cfg.recency_half_life_days:
        age = (end.value - to_ns(rows[C.EVENT_TIMESTAMP])[pos]) / NS_PER_DAY
        weight = weight * 0.5 ** (np.maximum(age, 0.0) / cfg.recency_half_life_days)
    return Examples(
        user_x=np.ascontiguousarray(user_x.take(pos)),
        item_row=catalog_rows[pos],
        weight=weight.astype(np.float32),
        neg_start=np.where(at_ok, start[safe] if len(uniq) else 0, 0).astype(np.int64),
        neg_count=np.where(at_ok, count[safe] if len(uniq) else 0, 0).astype(np.int64),
        neg_items=neg_items.astype(np.int64),
    )


@dataclass(frozen=True)
class Prepared:
    """The training inputs derived from :class:`RetrievalData`."""

    examples: Examples
    items: ItemInputs
    encoder: ItemEncoder
    mean: np.ndarray
    std: np.ndarray
    known: np.ndarray  # catalog rows that appeared in the train split
    valid: Validation
    parity_x: np.ndarray  # a few encoded train rows, to check the numpy export on


def prepare(data: RetrievalData, cfg: TowerConfig, seed: int = 0) -> Prepared:
    """Encode the train split into examples, the catalog into item inputs, and the valid
    split into early-stopping groups."""
    catalog = data.catalog
    train = data.splits["train"]
    train_rows = catalog.rows_of(train[C.ITEM_ID].to_numpy())
    first = first_of_request(train)
    train_x = EncodedRows.of(data, train, first | positive(train))
    mean, std = normalisation(train_x.take(first))
    known = np.zeros(len(catalog), dtype=bool)
    known[train_rows[train_rows >= 0]] = True
    encoder = ItemEncoder.fit(catalog, cfg)
    valid_rows = data.splits["valid"]
    valid_groups = eval_groups(
        valid_rows, positive(valid_rows), catalog.rows_of(valid_rows[C.ITEM_ID].to_numpy())
    ).subsample(cfg.eval_groups, seed)
    return Prepared(
        examples=build_examples(train, train_x, train_rows, cfg, data.split_times["train_end"]),
        items=encoder.encode(
            catalog.content, catalog.category, catalog.price, catalog.item_ids, known
        ),
        encoder=encoder,
        mean=mean,
        std=std,
        known=known,
        valid=Validation(valid_groups, data.encode(valid_rows.iloc[valid_groups.query_row])),
        parity_x=train_x.x[:PARITY_ROWS],
    )


def train_retrieval(
    home: Path,
    dataset: str,
    out_dir: Path,
    seed: int = 0,
    config: TowerConfig | None = None,
    k: int = 500,
    sweep_queries: int = 300,
    latency_queries: int = 1000,
    min_ann_recall: float = 0.95,
    target_ann_recall: float = 0.99,
    threads: int = 1,
) -> dict[str, Any]:
    """Train and export the retrieval stage of ``dataset`` (under ``home``) into
    ``out_dir``; returns the report (metrics, ANN sweep, parameters, timings).

    ``k`` is the number of candidates retrieval returns (capped at the catalog size).
    ``threads`` is passed to ``torch.set_num_threads`` for the run and restored after:
    training is deterministic given ``seed`` and the thread count.
    """
    cfg = config or TowerConfig()
    started = time.perf_counter()
    data = RetrievalData.load(home, dataset)
    prep, fitted, prepare_seconds = _prepare_and_fit(data, cfg, seed, threads)

    k = min(k, len(data.catalog))
    tower, item_emb, parity = _export(fitted, data, prep, out_dir, cfg.value_weight)
    past = before_test(data)
    fallback = _write_popular(data, past, out_dir, k)
    history = _write_history(past, out_dir)
    groups, queries = _test_groups(data, tower, cfg.test_groups, seed)
    rng = np.random.default_rng(seed)
    pool = np.concatenate([queries[n] for n in HEADLINE])
    sweep = ann.sweep(item_emb, pool[rng.permutation(len(pool))[:sweep_queries]], k)
    n_items, dim = item_emb.shape
    chosen = ann.choose(sweep, n_items, dim, min_ann_recall, target_ann_recall)
    params = ann.IndexParams(chosen["num_leaves"], chosen["leaves_to_search"], chosen["reorder"], k)
    ann.save_index(ann.build_index(item_emb, params), out_dir / bundle.SCANN_DIR)
    searcher = load_index(out_dir / bundle.SCANN_DIR)  # measure what serving loads
    latency_q = pool[rng.permutation(len(pool))[:latency_queries]]
    found, ms = ann.timed_search(searcher, latency_q, k)
    ann_recall = ann.overlap_recall(found, ann.exact_top_k(latency_q, item_emb, k))

    report: dict[str, Any] = {
        "dataset": dataset,
        "k": k,
        **_recall_metrics(data, past, groups, queries, item_emb, searcher, fallback, history, k),
        f"ann_recall_at_{k}_vs_exact": ann_recall,
        "query_p50_ms": float(np.percentile(ms, 50)),
        "query_p99_ms": float(np.percentile(ms, 99)),
        "user_tower_p50_ms": _tower_latency_ms(
            tower, data, groups["click"] if len(groups["click"]) else groups["purchase"]
        ),
        "sweep": sweep,
        "train_seconds": fitted.seconds,
        "prepare_seconds": prepare_seconds,
        "numpy_parity_max_abs_diff": parity,
        "groups": {n: len(g) for n, g in groups.items()},
        "positives": len(prep.examples),
        "items_seen_in_training": int(prep.known.sum()),
        "history": fitted.history,
        "best_epoch": fitted.best_epoch,
        "stopped_at_time_budget": fitted.stopped_at_time_budget,
        "params": {"seed": seed, "k": k, "tower": cfg.to_dict(), "index": chosen},
    }
    _write_config(out_dir, dataset, seed, cfg, data, prep, item_emb, chosen)
    report["total_seconds"] = time.perf_counter() - started
    log.info(
        "retrieval: recall@%d %s vs popularity %s; ANN recall %.3f, p50 %.3f ms, p99 %.3f ms",
        k,
        report[f"recall_at_{k}"],
        report[f"popularity_recall_at_{k}"],
        ann_recall,
        report["query_p50_ms"],
        report["query_p99_ms"],
    )
    return report


def _prepare_and_fit(
    data: RetrievalData, cfg: TowerConfig, seed: int, threads: int
) -> tuple[Prepared, FitResult, float]:
    """``prepare`` then ``fit`` on ``threads`` torch threads (restored after); returns the
    prepared inputs, the fit and the seconds preparing took."""
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        prep = prepare(data, cfg, seed)
        prepare_seconds = time.perf_counter() - started
        log.info(
            "retrieval: %d positives, %d of %d items seen in training, %d validation groups "
            "(%.1fs to prepare)",
            len(prep.examples),
            prep.known.sum(),
            len(data.catalog),
            len(prep.valid.groups),
            prepare_seconds,
        )
        fitted = fit(
            prep.examples,
            prep.items,
            prep.mean,
            prep.std,
            data.catalog.n_categories,
            cfg,
            seed,
            prep.valid,
        )
    finally:
        torch.set_num_threads(previous_threads)
    return prep, fitted, prepare_seconds


def fit_tower(data: RetrievalData, cfg: TowerConfig, seed: int = 0) -> tuple[UserTower, np.ndarray]:
    """A tower fitted on ``data``'s train split as ``train_retrieval`` fits it, without the
    index, reports or value column: (the user tower as serving loads it, the catalog's
    embeddings in ``data.catalog`` order). For measurements that refit on part of the data,
    e.g. a tower that never saw some users (``tools.bench_levers``' cross-fitted score)."""
    prep, fitted, _ = _prepare_and_fit(data, cfg, seed, threads=1)
    with tempfile.TemporaryDirectory() as tmp:
        tower, item_emb, _ = _export(fitted, data, prep, Path(tmp), 0.0)
    return tower, item_emb


def _recall_metrics(
    data: RetrievalData,
    past: pd.DataFrame,
    groups: dict[str, EvalGroups],
    queries: dict[str, np.ndarray],
    item_emb: np.ndarray,
    searcher: Any,
    fallback: dict[str, Any],
    history: History,
    k: int,
) -> dict[str, Any]:
    """Recall@k of what serving retrieves (the user's history, then the tower's neighbours),
    of the tower alone (exact and through the index), of popularity (top-k by clicks before
    the test period, ``past``: the window the history source has), of the fallback lists and
    of the model interleaved with the fallback; plus a recall curve over smaller K, and the
    value recall (weighted by price x margin) of what serving retrieves and of popularity."""
    catalog = data.catalog
    # a purchases-only dataset (Complete Journey) has no clicks: there it is popularity by
    # purchases
    engaged = past[C.LABEL_CLICK].to_numpy() > 0
    if not engaged.any():
        engaged = past[C.LABEL_PURCHASE].to_numpy() > 0
    popular_rows = top_items(catalog.rows_of(past[C.ITEM_ID].to_numpy()[engaged]), k, len(catalog))
    exact = {n: ann.exact_top_k(queries[n], item_emb, k) for n in groups}
    via_ann = {n: ann.search(searcher, queries[n], k) for n in HEADLINE}
    fallback_rows = {
        n: _fallback_rows(fallback, catalog, data.users, g, k) for n, g in groups.items()
    }
    history_rows = {n: _history_rows(history, catalog, g, k) for n, g in groups.items()}
    served = {n: history_first(history_rows[n], exact[n], k) for n in groups}
    served_ann = {n: history_first(history_rows[n], via_ann[n], k) for n in HEADLINE}
    retrievers = {
        "history+model": served,
        "model": exact,
        "popularity": popular_rows,
        "fallback": fallback_rows,
        "model+fallback": {n: interleave(exact[n], fallback_rows[n], k) for n in groups},
    }
    # the value recall: each group's share of its items' price x margin (the objective the
    # value column serves), on the logged engagements
    value = None if catalog.margin is None else np.maximum(catalog.price * catalog.margin, 0.0)
    value_recall = {
        f"value_recall_at_{k}": {n: recall_at_k(served[n], groups[n], value) for n in HEADLINE},
        f"popularity_value_recall_at_{k}": {
            n: recall_at_k(popular_rows, groups[n], value) for n in HEADLINE
        },
    }
    return {
        **(value_recall if value is not None else {}),
        f"recall_at_{k}": {n: recall_at_k(served[n], groups[n]) for n in HEADLINE},
        f"recall_at_{k}_via_ann": {n: recall_at_k(served_ann[n], groups[n]) for n in HEADLINE},
        f"model_recall_at_{k}": {n: recall_at_k(exact[n], groups[n]) for n in HEADLINE},
        f"history_recall_at_{k}": {n: recall_at_k(history_rows[n], groups[n]) for n in HEADLINE},
        f"popularity_recall_at_{k}": {n: recall_at_k(popular_rows, groups[n]) for n in HEADLINE},
        f"fallback_recall_at_{k}": {n: recall_at_k(fallback_rows[n], groups[n]) for n in HEADLINE},
        f"model_recall_at_{k}_via_ann": {n: recall_at_k(via_ann[n], groups[n]) for n in HEADLINE},
        "recall_curve": _recall_curve(groups, retrievers, k),
    }


def _export(
    fitted: FitResult, data: RetrievalData, prep: Prepared, out_dir: Path, value_weight: float
) -> tuple[UserTower, np.ndarray, float]:
    """Write the tower and the catalog embeddings, each with the value column when
    ``value_weight`` > 0; return the tower as serving loads it, the embeddings as the index
    holds them, and the largest |numpy - torch| difference on a few train rows (the value
    column left out: it is the constant weight, checked exactly)."""
    tower = export_user_tower(fitted.user_net, data.spec)
    item_emb = fitted.item_net.embed(prep.items)
    if value_weight > 0:
        if data.catalog.margin is None:
            raise ValueError("value-aware retrieval needs the items table's margin column")
        tower = with_value_column(tower, value_weight)
        value = item_value(data.catalog.price, data.catalog.margin)
        item_emb = np.hstack([item_emb, value[:, None]]).astype(np.float32)
    tower.save(out_dir / bundle.USER_TOWER)
    np.save(out_dir / bundle.ITEM_EMBEDDINGS, item_emb)
    np.save(out_dir / bundle.ITEM_IDS, data.catalog.item_ids)
    tower = UserTower.load(out_dir / bundle.USER_TOWER)
    with torch.no_grad():
        reference = fitted.user_net(torch.from_numpy(prep.parity_x)).numpy()
    served = tower.embed(prep.parity_x)
    if value_weight > 0:
        if not np.all(served[:, -1] == np.float32(value_weight)):
            raise AssertionError("the exported tower's value column is not the constant weight")
        served = served[:, :-1]
    parity = float(np.abs(served - reference).max(initial=0.0))
    return tower, item_emb, parity


def _history_rows(history: History, catalog: Catalog, groups: EvalGroups, k: int) -> np.ndarray:
    """``(groups, k)`` catalog rows of each group's user history (-1 padded)."""
    out = np.full((len(groups), k), -1, dtype=np.int64)
    for g, user in enumerate(groups.user_id):
        rows = catalog.rows_of(history.items_of(int(user)))[:k]
        rows = rows[rows >= 0]
        out[g, : len(rows)] = rows
    return out


def before_test(data: RetrievalData) -> pd.DataFrame:
    """The engagement-bearing columns of every row before the test period (the train and
    validation splits): what the event stream holds when the test period begins, and so
    what a bundle serving the test period carries in its history and popularity lists.
    (The tower still trains on the train split alone and early-stops on the validation one.)"""
    cols = [C.USER_ID, C.ITEM_ID, C.EVENT_TIMESTAMP, *LABELS]
    return pd.concat([data.splits[s][cols] for s in ("train", "valid")], ignore_index=True)


def _write_history(past: pd.DataFrame, out_dir: Path) -> History:
    """The history source as of the start of the test period: every engagement in
    ``past`` (:func:`before_test`)."""
    engaged = positive(past)
    history = build_history(
        past[C.USER_ID].to_numpy(np.int64)[engaged],
        past[C.ITEM_ID].to_numpy(np.int64)[engaged],
        to_ns(past[C.EVENT_TIMESTAMP])[engaged],
    )
    history.save(out_dir / bundle.HISTORY)
    return history


def _write_popular(
    data: RetrievalData, past: pd.DataFrame, out_dir: Path, k: int
) -> dict[str, Any]:
    """The popularity lists as of the start of the test period: the engagements of the
    last ``FALLBACK_WINDOW_DAYS`` of ``past`` (:func:`before_test`)."""
    end = data.split_times["valid_end"]
    start = max(end - pd.Timedelta(days=FALLBACK_WINDOW_DAYS), data.split_times["train_start"])
    # every engagement (popular.WEIGHTS), not only clicks: a purchase-only log has none
    fallback = popular.popular_items(past, data.users, start, end, k)
    popular.save_popular(fallback, out_dir / POPULAR)
    return fallback


def _test_groups(
    data: RetrievalData, tower: UserTower, max_groups: int, seed: int
) -> tuple[dict[str, EvalGroups], dict[str, np.ndarray]]:
    """The test split's evaluation groups (at most ``max_groups`` of each kind, a uniform
    sample) and their query embeddings (numpy tower)."""
    test = data.splits["test"]
    rows = data.catalog.rows_of(test[C.ITEM_ID].to_numpy())
    click = test[C.LABEL_CLICK].to_numpy() > 0
    randomized = test[C.POLICY].to_numpy() == C.POLICY_RANDOM
    groups = {
        "purchase": eval_groups(test, test[C.LABEL_PURCHASE].to_numpy() > 0, rows),
        "click": eval_groups(test, click, rows),
        # clicks on randomized traffic: exposure uniform over the pool, not by popularity
        "click_randomized": eval_groups(test, click & randomized, rows),
    }
    groups = {n: g.subsample(max_groups, seed) for n, g in groups.items()}
    queries = {n: tower.embed(data.encode(test.iloc[g.query_row])) for n, g in groups.items()}
    return groups, queries


def _tower_latency_ms(tower: UserTower, data: RetrievalData, groups: EvalGroups) -> float | None:
    """p50 of one user's numpy-tower call from the feature dict (what serving does); None
    when ``groups`` has no query to time."""
    test = data.splits["test"].iloc[groups.query_row[:200]]
    features = user_features(test, data.spec, data.affinity)
    ms = []
    for i in range(len(test)):
        one = {name: values[i] for name, values in features.items()}
        t0 = time.perf_counter_ns()
        tower.embed(one)
        ms.append((time.perf_counter_ns() - t0) / 1e6)
    return float(np.percentile(ms, 50)) if ms else None


def _recall_curve(
    groups: dict[str, EvalGroups], retrievers: dict[str, Any], k: int
) -> dict[str, dict[str, dict[int, float]]]:
    """Recall@K for each K in RECALL_KS up to ``k``: group -> retriever -> K -> recall.
    ``retrievers[name]`` is a shared ``(k,)`` list or a dict of ``(groups, k)`` per group."""
    ks = sorted({kk for kk in RECALL_KS if kk < k} | {k})
    curve: dict[str, dict[str, dict[int, float]]] = {}
    for name, g in groups.items():
        curve[name] = {}
        for who, rows in retrievers.items():
            top = rows if isinstance(rows, np.ndarray) else rows[name]
            curve[name][who] = {kk: recall_at_k(top[..., :kk], g) for kk in ks}
    return curve


def _fallback_rows(
    fallback: dict[str, Any], catalog: Catalog, users: pd.DataFrame, groups: EvalGroups, k: int
) -> np.ndarray:
    """``(groups, k)`` catalog rows of each group's segment list (-1 pads a short list)."""
    segment = users.set_index(C.USER_ID)[[C.COUNTRY, C.DEVICE]].reindex(groups.user_id)
    out = np.full((len(groups), k), -1, dtype=np.int64)
    cache: dict[tuple[str, str], np.ndarray] = {}
    for g, (country, device) in enumerate(segment.itertuples(index=False)):
        key = (str(country), str(device))
        if key not in cache:
            cache[key] = catalog.rows_of(np.asarray(popular.lookup(fallback, *key), np.int64))
        out[g, : len(cache[key])] = cache[key]
    return out


def _write_config(
    out_dir: Path,
    dataset: str,
    seed: int,
    cfg: TowerConfig,
    data: RetrievalData,
    prep: Prepared,
    item_emb: np.ndarray,
    chosen: dict[str, Any],
) -> None:
    config = {
        "dataset": dataset,
        "seed": seed,
        "split": {k: v.isoformat() for k, v in data.split_times.items()},
        "tower": cfg.to_dict(),
        "user_input": {**data.spec.to_dict(), "input_names": data.spec.input_names},
        "item_encoder": prep.encoder.to_dict(),
        "embeddings": {
            "items": int(item_emb.shape[0]),
            "dim": int(item_emb.shape[1]),
            "l2_normalized": False,
            "score": "dot_product",
            # the last column: log(price x margin) on items, the weight on users
            "value_columns": 1 if cfg.value_weight > 0 else 0,
            "value_weight": cfg.value_weight,
            "items_seen_in_training": int(prep.known.sum()),
        },
        "index": {
            **{key: chosen[key] for key in ("num_leaves", "leaves_to_search", "reorder", "k")},
            "dims_per_block": ann.DIMS_PER_BLOCK,
            "anisotropic_quantization_threshold": ann.ANISOTROPIC_THRESHOLD,
            "min_partition_size": ann.MIN_PARTITION_SIZE,
            "sweep_recall": chosen["recall"],
        },
        "fallback": {"file": POPULAR, "window_days": FALLBACK_WINDOW_DAYS},
        "files": {
            "user_tower": bundle.USER_TOWER,
            "item_embeddings": bundle.ITEM_EMBEDDINGS,
            "item_ids": bundle.ITEM_IDS,
            "scann": bundle.SCANN_DIR,
            "popular": POPULAR,
        },
    }
    (out_dir / bundle.RETRIEVAL_CONFIG).write_text(json.dumps(config, indent=2))
