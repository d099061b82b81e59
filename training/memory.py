"""Memory per stage: what a stage used at its peak, and whether the next one will fit.

Two halves:

- ``StagePeaks`` measures the process's peak resident memory during a stage. Linux keeps
  the process's high-water mark (``VmHWM`` in ``/proc/self/status``); writing ``5`` to
  ``/proc/self/clear_refs`` resets it to the current resident size, so the mark read at the
  end of the stage is the peak during that stage, not an earlier stage's, when several run
  in one process (``homefeed demo``). It includes what the process still holds from before
  the stage (an earlier stage's freed memory the allocator kept): run a stage alone
  (``homefeed features build``...) for its figure alone. Where the reset is not allowed the
  mark is the process's peak so far, and the figure says so (``peak_is_process_wide``).
- ``require_fits`` stops a stage before it allocates when its estimate exceeds the memory
  the machine has available (``MemAvailable``; an estimate is of what the stage adds to the
  process), with the estimate, what it is made of and the option that reduces it.
  The estimates (``features_build_bytes``...) follow the arrays the stage builds; they are
  checked against measured peaks in ``tests/test_memory.py``.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import resource
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MB = 2**20
# (user, category or seller, snapshot) cells the per-user list views hold at once while built
LIST_CHUNK_CELLS = 8_000_000
# A stage may use this share of the available memory; the rest is for the estimate's error,
# the page cache and whatever else runs on the machine.
HEADROOM = 0.85
# HOMEFEED_MEMORY_LIMIT_MB overrides what the machine reports (a container's limit the
# kernel does not show in /proc/meminfo, or a test)
LIMIT_ENV = "HOMEFEED_MEMORY_LIMIT_MB"

_CLEAR_REFS = Path("/proc/self/clear_refs")
_MEMINFO = Path("/proc/meminfo")


class MemoryEstimateError(MemoryError):
    """A stage would need more memory than the machine has; raised before it allocates."""


def status_kb(field: str, pid: int | str = "self") -> int | None:
    """A ``/proc/<pid>/status`` figure in KB (``VmRSS``, ``VmHWM``); None where there is none."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """This process's resident memory now, MB."""
    kb = status_kb("VmRSS")
    return kb / 1024 if kb is not None else 0.0


def release_freed_memory() -> None:
    """Hand what has been freed back to the kernel: Arrow's memory pool (mimalloc keeps
    freed buffers: reading sim-small's impressions left 450 MB resident beside a 383 MB
    frame), then the cyclic garbage and glibc's heap (``malloc_trim``). Called at each
    stage's start, so a stage's resident memory, and its peak, is its own, and by the
    stages between big Arrow reads."""
    gc.collect()
    with suppress(ImportError):
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _peak_mb() -> float:
    kb = status_kb("VmHWM")
    if kb is None:  # not Linux: the process's peak as getrusage reports it (KB on Linux)
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


@dataclass
class StagePeaks:
    """Peak resident MB by stage name, in the order the stages ran."""

    peaks: dict[str, float] = field(default_factory=dict)
    process_wide: set[str] = field(default_factory=set)

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        """Record ``stage``'s peak resident memory (also when it raises)."""
        release_freed_memory()
        reset = _reset_peak()
        start = time.perf_counter()
        try:
            yield
        finally:
            peak = round(_peak_mb(), 1)
            self.peaks[stage] = peak
            if not reset:
                self.process_wide.add(stage)
            log.info(
                "%s: peak resident memory %.0f MB (%.1f s)",
                stage,
                peak,
                time.perf_counter() - start,
            )

    def report(self) -> dict[str, object]:
        """``{"peak_rss_mb": {...}}`` plus which figures are process-wide, for a report."""
        out: dict[str, object] = {"peak_rss_mb": dict(self.peaks)}
        if self.process_wide:
            out["peak_is_process_wide"] = sorted(self.process_wide)
        return out


def available_mb() -> float:
    """What a stage may add to this process: ``HOMEFEED_MEMORY_LIMIT_MB`` when set, else
    the kernel's ``MemAvailable`` (the estimates are of what a stage adds to what the
    process already holds)."""
    override = os.environ.get(LIMIT_ENV)
    if override:
        try:
            return float(override)
        except ValueError:
            raise ValueError(f"{LIMIT_ENV} must be a number of MB, got {override!r}") from None
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")  # unknown: do not refuse


def require_fits(
    stage: str, parts: Mapping[str, float], reduce_with: str, available: float | None = None
) -> float:
    """Raise ``MemoryEstimateError`` when the estimate (``parts``: bytes by what they hold)
    exceeds ``HEADROOM`` of the available memory; returns the estimate in MB."""
    total_mb = sum(parts.values()) / MB
    limit = available_mb() if available is None else available
    if total_mb > HEADROOM * limit:
        biggest = sorted(parts.items(), key=lambda kv: -kv[1])[:3]
        detail = ", ".join(f"{name} {b / MB:,.0f} MB" for name, b in biggest)
        raise MemoryEstimateError(
            f"{stage} needs an estimated {total_mb:,.0f} MB ({detail}) but "
            f"{limit:,.0f} MB are available (a stage may use {HEADROOM:.0%} of it); "
            f"stopped before allocating. {reduce_with}"
        )
    log.info("%s: estimated %.0f MB of %.0f MB available", stage, total_mb, limit)
    return total_mb


# --- estimates ---------------------------------------------------------------------------

F64 = 8
F32 = 4


def features_build_bytes(
    users: int,
    items: int,
    sellers: int,
    categories: int,
    days: int,
    snapshots: int,
    events: int,
    engagements: int,
    impressions: int | None = None,
    content_dim: int = 0,
) -> dict[str, float]:
    """What ``training.features.build_feature_tables`` adds to a process that holds the
    tables it reads, by part: the builder's per-impression and per-engagement indices, and
    the largest single view (views are built, written and freed one at a time).

    Per cell, fitted to the large preset's measured views (200k users, 500k items, 31
    snapshots, 55 M impressions, 4.3 M engagements; ``docs/data-schema.md``): an item or
    user snapshot costs ~400 bytes while its view is gathered and written; a per-user list
    view ~28 bytes per (user, category or seller, snapshot) cell, each engagement reaching
    the snapshots of the next 30 days (sparse: a category costs nothing until engaged with,
    ``contract.affinity``); the categories themselves only categories x days; and ~64 MB
    whatever the size (sim-tiny's build adds 30-60 MB).
    """
    stride = max(days / max(snapshots - 1, 1), 1.0)
    cells = engagements * (30 / stride + 1)
    n_imp = events if impressions is None else impressions
    views = {
        "item views (items x snapshots)": items * snapshots * 400.0,
        "user views (users x snapshots)": users * snapshots * 350.0,
        "per-user lists (engaged user x category or seller x snapshot cells)": cells * 28.0
        + min(cells, LIST_CHUNK_CELLS) * 64.0
        + users * snapshots * 6 * F64,
        "seller views (sellers x snapshots)": sellers * snapshots * 400.0,
        # a user row plus its content_profile list (float32) and weight per cell, written
        # through Arrow; the float64 window sums (three cells x (dim + 1) arrays, the last
        # column the weights) are bounded by the chunk; the per-(user, day) sums and their
        # running sum (two user-days x (dim + 1) arrays) by the user-days that saw an
        # engagement or an organic impression
        "content profiles (users x snapshots x content width)": users
        * snapshots
        * 2
        * (32.0 + 4.0 * content_dim)
        + min(users * snapshots * (content_dim + 1), LIST_CHUNK_CELLS) * 3 * F64
        + min(users * days, engagements + n_imp) * (content_dim + 1) * 2 * F64,
    }
    largest = max(views, key=lambda k: views[k])
    return {
        "event indices (impressions and engagements)": n_imp * 25.0 + engagements * 64.0,
        f"the largest view, {largest}": views[largest],
        "categories (categories x days)": categories * (days + 1 + 3 * snapshots) * F64,
        "fixed (Arrow writer, pandas buffers)": 64 * MB,
    }


def dataset_prepare_bytes(
    impressions: int, outcomes: int, chunk_rows: int = 2_000_000
) -> dict[str, float]:
    """What the dataset stage holds before its join: the raw tables read whole, one chunk of
    ``chunk_rows`` impressions labelled, split, given propensities and context (several
    pandas copies of its rows), and the rows kept for the join (the train split's positives
    and downsampled negatives, valid and test capped by ``eval_max_rows``: about a fifth of
    the log). Fitted to measured pre-join peaks: sim-small (5.6 M impressions), the large
    preset (55 M: 7.8 GB; before the labelling was chunked it passed 18 GB); it errs high."""
    return {
        "impressions read (impressions x ~95 bytes)": impressions * 95.0,
        "rows kept for the join (impressions x ~40 bytes)": impressions * 40.0,
        "one chunk labelled and split (chunk x ~380 bytes)": min(impressions, chunk_rows) * 380.0,
        "outcome tables (clicks, add-to-carts, purchases)": outcomes * 120.0,
        "libraries (Feast, DuckDB, pandas)": 300 * MB,
    }


def dataset_join_bytes(
    rows: int, affinity_snapshots: int, affinity_entries: int, chunk_rows: int | None = None
) -> dict[str, float]:
    """What the dataset stage's point-in-time join adds to the process for ``rows`` entity
    rows joined ``chunk_rows`` at a time (None: at once): Feast's join of every view but
    the affinity (~4.8 KB a row of the chunk across DuckDB, Arrow and pandas, the seller
    lists included; each chunk's result is written out before the next), the entity rows
    themselves (~260 bytes a row), the affinity view's snapshots read once as flat lists
    (~40 bytes a snapshot and 12 an engaged category, twice while read;
    ``training.dataset.historical_features`` reduces them to each row's category) and
    ~300 MB for Feast and DuckDB. Fitted to measured peaks: sim-tiny (42.6 k rows: ~300 MB
    added), a 333 k-line purchase-only log (976 k rows: ~4.6 GB added), the large preset
    (9.5 M rows: 4.4 GB in all); it errs high."""
    chunk = rows if chunk_rows is None else min(rows, chunk_rows)
    return {
        "joined rows (Feast, DuckDB, Arrow)": chunk * 4800.0,
        "entity rows (rows x ~260 bytes)": rows * 260.0,
        "affinity snapshots (flat lists)": 2 * (affinity_snapshots * 40 + affinity_entries * 12),
        "Feast and DuckDB": 300 * MB,
    }


def rankers_bytes(rows: int, columns: int, features: int) -> dict[str, float]:
    """What the rankers stage holds: the three training splits read whole (``rows`` rows of
    ``columns`` columns, ~8 bytes a cell, about twice while each is sorted by request), their
    feature matrices (float32) with LightGBM's binned copy of the train and valid ones, and
    ~400 MB of libraries. Fitted to measured peaks: sim-small (1.26 M rows: 1.9 GB), the
    large preset (9.5 M rows of 52 columns: 11.5 GB)."""
    return {
        "training sets (rows x columns x ~8 bytes, twice while sorted)": rows * columns * 17.6,
        "feature matrices and LightGBM's bins (rows x features x ~6 bytes)": rows * features * 6.0,
        "libraries (LightGBM, Optuna, pandas)": 400 * MB,
    }


def list_entries(meta: Any, column: str) -> int:
    """Values of a list column over a Parquet file's row groups (``pyarrow.parquet
    .FileMetaData``; its leaf's value count): what reading it will hold, before reading."""
    total = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            if chunk.path_in_schema.split(".")[0] == column:
                total += chunk.num_values
    return total


REDUCE_DATA = (
    "It follows the data's rows (impressions, items and users x snapshots, engagements), not its "
    "taxonomy: give the stage more memory (HOMEFEED_MEMORY_LIMIT_MB sets the limit a "
    "container's kernel does not report) or ingest a shorter window of the logs."
)
REDUCE_RANKERS = (
    "It follows the training sets' rows: `homefeed dataset --negative-rate R` keeps fewer "
    "of the train split's negatives, `--eval-max-rows N` caps the valid and test splits."
)
REDUCE_JOIN = (
    "The Feast join's part follows its chunk: `homefeed dataset --join-chunk-rows N` "
    "(default 250,000) joins fewer rows at a time."
)
