"""The ScaNN index over the item embeddings: build, serialize, load, and the parameter sweep.

The index is ScaNN's tree + asymmetric hashing + exact reordering with dot-product
scores (the embeddings are not normalised; see ``training.retrieval.towers``):

- ``num_leaves`` k-means partitions; a query scores the items of its ``leaves_to_search``
  nearest partitions;
- within them, 4-bit product-quantised codes (2 dimensions per block, anisotropic loss
  with threshold 0.2 as ScaNN recommends for dot products) give approximate scores;
- the best ``reorder`` of those are rescored exactly and the top ``k`` returned.

:func:`sweep` measures, per configuration, recall@k against exact brute-force search and
single-query latency (one query per call, one thread: what a retrieval server does per
request); :func:`choose` takes the configuration meeting the recall target with the least
work per query (:func:`search_cost`, counted, not timed). ``leaves_to_search`` and
``reorder`` are search-time arguments, so one build per ``num_leaves`` serves every row of
the sweep. A build is deterministic given the embeddings (k-means++ seeding), and so are
its recall and its cost; latencies are wall-clock and vary with machine load, so they are
reported, never used to choose: the same embeddings give the same index on a busy or a
quiet machine.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)

DIMS_PER_BLOCK = 2
ANISOTROPIC_THRESHOLD = 0.2
MIN_PARTITION_SIZE = 10
WARMUP_QUERIES = 20


@dataclass(frozen=True)
class IndexParams:
    num_leaves: int
    leaves_to_search: int
    reorder: int
    k: int = 500


def build_index(embeddings: np.ndarray, params: IndexParams, training_threads: int = 1) -> Any:
    """A ScaNN searcher whose default search returns ``params.k`` neighbours."""
    import scann

    db = np.ascontiguousarray(embeddings, dtype=np.float32)
    n = db.shape[0]
    if not 0 < params.k <= n:
        raise ValueError(f"k must be 1..{n} (the catalog size), got {params.k}")
    return (
        scann.scann_ops_pybind.builder(db, params.k, "dot_product")
        .tree(
            num_leaves=params.num_leaves,
            num_leaves_to_search=params.leaves_to_search,
            training_sample_size=n,
            min_partition_size=MIN_PARTITION_SIZE,
            # k-means++ seeding: ScaNN's random initialisation draws a new seed per process
            # (the same data gave different indexes run to run); this one is reproducible.
            random_init=False,
        )
        .score_ah(DIMS_PER_BLOCK, anisotropic_quantization_threshold=ANISOTROPIC_THRESHOLD)
        .reorder(params.reorder)
        .set_n_training_threads(training_threads)
        .build()
    )


def save_index(searcher: Any, directory: Path) -> None:
    """Serialize with paths relative to ``directory``, so the bundle can be moved."""
    directory.mkdir(parents=True, exist_ok=True)
    searcher.serialize(str(directory), relative_path=True)


def search(searcher: Any, queries: np.ndarray, k: int) -> np.ndarray:
    """``(queries, k)`` catalog rows, best first, with the searcher's default parameters.

    A query whose searched leaves hold fewer than ``k`` items gets fewer results; the rest
    of its row is -1 (ScaNN pads a batch with row 0 and a NaN score).
    """
    out = np.full((len(queries), k), -1, dtype=np.int64)
    if len(queries) == 0:  # e.g. no click groups in a purchases-only dataset
        return out
    idx, dist = searcher.search_batched(np.ascontiguousarray(queries, dtype=np.float32), k)
    found = np.asarray(idx, dtype=np.int64)
    width = min(found.shape[1], k) if found.ndim == 2 else 0
    out[:, :width] = np.where(np.isnan(dist[:, :width]), -1, found[:, :width])
    return out


def exact_top_k(queries: np.ndarray, items: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """Brute-force ``(queries, k)`` rows of the highest dot products, best first."""
    k = min(k, items.shape[0])
    out = np.empty((queries.shape[0], k), dtype=np.int64)
    items = np.ascontiguousarray(items, dtype=np.float32)
    for start in range(0, queries.shape[0], chunk):
        scores = queries[start : start + chunk].astype(np.float32) @ items.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        out[start : start + chunk] = np.take_along_axis(top, order, axis=1)
    return out


def overlap_recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each query's exact top-k that the approximate search returned."""
    if approx.shape != exact.shape:
        raise ValueError(f"shapes differ: approx {approx.shape}, exact {exact.shape}")
    if approx.size == 0:
        return 0.0
    pairs = zip(approx, exact, strict=True)
    hits = [np.intersect1d(a[a >= 0], e, assume_unique=True).size for a, e in pairs]
    return float(np.mean(hits) / exact.shape[1])


def timed_search(
    searcher: Any, queries: np.ndarray, k: int, leaves_to_search: int = -1, reorder: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """One call per query: ``(queries, k)`` rows (-1 pads a short answer) and each call's
    latency in ms."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    for q in queries[:WARMUP_QUERIES]:
        searcher.search(q, k, reorder, leaves_to_search)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    ms = np.empty(len(queries))
    for i, q in enumerate(queries):
        t0 = time.perf_counter_ns()
        idx, _ = searcher.search(q, k, reorder, leaves_to_search)
        ms[i] = (time.perf_counter_ns() - t0) / 1e6
        rows[i, : len(idx)] = idx
    return rows, ms


def default_grid(n_items: int, k: int) -> list[tuple[int, list[int], list[int]]]:
    """(num_leaves, leaves_to_search values, reorder values) around ScaNN's rule of thumb
    num_leaves ≈ √n, searching 5–70 % of the leaves (and 2–4 times the share k/n of the
    catalog a query must return, for a small catalog), reordering k, 2k, 4k or 8k items.
    The wide end is for value-aware embeddings (``contract.tower.with_value_column``): a
    query's top k by taste + value spreads over more leaves than by taste alone (on
    sim-small 40 % of the leaves and 2k reordered reached recall 0.987, not 0.99)."""
    root = math.sqrt(n_items)
    shares = {0.05, 0.1, 0.2, 0.4, 0.7} | {min(1.0, m * k / n_items) for m in (2, 3, 4)}
    grid = []
    for leaves in sorted({max(2, round(root * f)) for f in (0.5, 1.0, 2.0)}):
        searched = sorted({max(1, round(leaves * f)) for f in shares})
        reorders = sorted({min(n_items, k * f) for f in (1, 2, 4, 8)})
        grid.append((leaves, searched, reorders))
    return grid


def sweep(
    embeddings: np.ndarray,
    queries: np.ndarray,
    k: int,
    grid: list[tuple[int, list[int], list[int]]] | None = None,
) -> list[dict[str, Any]]:
    """Recall@k vs exact search and single-query latency of every grid configuration."""
    k = min(k, embeddings.shape[0])
    grid = grid if grid is not None else default_grid(embeddings.shape[0], k)
    exact = exact_top_k(queries, embeddings, k)
    rows: list[dict[str, Any]] = []
    total = sum(len(s) * len(r) for _, s, r in grid)
    with tqdm(total=total, desc="ScaNN sweep", leave=False) as bar:
        for leaves, searched, reorders in grid:
            t0 = time.perf_counter()
            searcher = build_index(embeddings, IndexParams(leaves, searched[0], reorders[0], k))
            build_s = time.perf_counter() - t0
            for n_search in searched:
                for reorder in reorders:
                    found, ms = timed_search(searcher, queries, k, n_search, reorder)
                    row = {
                        **asdict(IndexParams(leaves, n_search, reorder, k)),
                        "recall": round(overlap_recall(found, exact), 4),
                        "p50_ms": round(float(np.percentile(ms, 50)), 4),
                        "p99_ms": round(float(np.percentile(ms, 99)), 4),
                        "build_seconds": round(build_s, 3),
                    }
                    rows.append(row)
                    bar.update()
    return rows


# One query's work in units of one 4-bit AH lookup (a block of DIMS_PER_BLOCK dimensions):
# a float dimension of a centroid or of an exactly reordered item costs more. Rounded from
# a least-squares fit of p50 latency to the three counts over two sim-small sweeps (192
# rows, AMD EPYC, 2026-12-05: Spearman 0.85 with the measured p50). The (centroid, reorder)
# pairs (1, 1), (2, 2), (4, 1), (4, 2) and (8, 2) chose the same configuration on both
# sweeps, whose p50 was the sweep's lowest in one and 0.1 % above it in the other.
CENTROID_DIM_COST = 4.0
REORDER_DIM_COST = 2.0


def search_cost(row: dict[str, Any], n_items: int, dim: int) -> float:
    """A configuration's work per query: scoring every centroid, the AH codes of the items
    in the searched leaves (the catalogue split evenly), and the exact rescoring."""
    leaves = row["num_leaves"]
    return (
        CENTROID_DIM_COST * leaves * dim
        + row["leaves_to_search"] / leaves * n_items * dim / DIMS_PER_BLOCK
        + REORDER_DIM_COST * row["reorder"] * dim
    )


def choose(
    rows: list[dict[str, Any]],
    n_items: int,
    dim: int,
    min_recall: float = 0.95,
    target_recall: float = 0.99,
) -> dict[str, Any]:
    """The row with the least ``search_cost`` reaching ``target_recall``; failing that,
    reaching ``min_recall``; failing that, the most accurate (with a warning). Recall and
    cost are deterministic, so the choice is too: measured latency never decides it (two
    sweeps of the same embeddings chose configurations whose p50s were 1 % apart and whose
    recalls were 0.997 and 0.990)."""
    if not rows:
        raise ValueError("the sweep is empty")

    def key(r: dict[str, Any]) -> tuple[float, ...]:
        cost = search_cost(r, n_items, dim)
        return (cost, -r["recall"], r["num_leaves"], r["leaves_to_search"], r["reorder"])

    for bar in (target_recall, min_recall):
        ok = [r for r in rows if r["recall"] >= bar]
        if ok:
            return min(ok, key=key)
    best = max(rows, key=lambda r: r["recall"])
    log.warning("no ScaNN configuration reaches recall %.2f; best is %s", min_recall, best)
    return best
