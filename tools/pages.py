"""Printing a feed page and aligned tables for the command line (``homefeed feed``, the demo)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

TOP_CATEGORIES = 5


@dataclass(frozen=True)
class PageFacts:
    """What a person needs to see why a page is the buyer's: each item's category, price,
    seller and whether the seller is new, and the buyer's heaviest categories."""

    items: dict[int, tuple[int, float, int, bool]]  # item -> (category, price, seller, new)
    top_categories: list[tuple[int, float]]  # (category, share of the user's engagement)
    shares: dict[int, float]  # every engaged category -> share


def page_facts(
    raw_dir: Path, features_dir: Path, user_id: int, item_ids: Sequence[int]
) -> PageFacts | None:
    """The facts of ``item_ids`` from the dataset's items table and its newest seller_stats
    snapshot, and ``user_id``'s newest category-affinity snapshot (the offline tables the
    online store was materialized from); None when the dataset's files are not there."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    paths = [
        raw_dir / "items.parquet",
        features_dir / "seller_stats.parquet",
        features_dir / "user_category_affinity.parquet",
    ]
    if not all(p.exists() for p in paths):
        return None
    ids = list(item_ids)
    items = pq.read_table(
        paths[0],
        columns=["item_id", "category", "price", "seller_id"],
        filters=[("item_id", "in", ids)] if ids else None,
    ).to_pandas()
    sellers = pq.read_table(paths[1], columns=["seller_id", "event_timestamp", "seller_is_new"])
    newest = pc.max(sellers.column("event_timestamp"))
    sellers = sellers.filter(pc.equal(sellers.column("event_timestamp"), newest)).to_pandas()
    new = dict(zip(sellers["seller_id"], sellers["seller_is_new"].astype(bool), strict=True))
    facts = {
        int(r.item_id): (
            int(r.category),
            float(r.price),
            int(r.seller_id),
            new.get(r.seller_id, False),
        )
        for r in items.itertuples()
    }
    affinity = pq.read_table(
        paths[2],
        columns=["event_timestamp", "affinity_categories", "affinity_weights"],
        filters=[("user_id", "=", int(user_id))],
    ).to_pandas()
    shares: dict[int, float] = {}
    if len(affinity):
        row = affinity.sort_values("event_timestamp").iloc[-1]
        weights = np.asarray(row["affinity_weights"], dtype=np.float64)
        if len(weights) and weights.sum() > 0:
            cats = np.asarray(row["affinity_categories"], dtype=np.int64)
            shares = {int(c): float(w / weights.sum()) for c, w in zip(cats, weights, strict=True)}
    top = sorted(shares.items(), key=lambda kv: -kv[1])[:TOP_CATEGORIES]
    return PageFacts(facts, top, shares)


def print_feed(
    response: Any,
    round_trip_ms: float | None = None,
    file: IO[str] | None = None,
    facts: PageFacts | None = None,
) -> None:
    """Print a ``GetFeedResponse`` as a header (request id, model version, arm, degraded
    flags, candidate count, round trip) and one table row per item; with ``facts``, also
    the buyer's top categories and each item's category (with the buyer's share of it),
    price, seller and whether the seller is new."""
    from homefeed.feed.v1 import feed_pb2

    out = file if file is not None else sys.stdout
    degraded = [
        feed_pb2.Degradation.Name(d).removeprefix("DEGRADATION_").lower() for d in response.degraded
    ]
    header = [
        f"request {response.request_id or '-'}",
        f"model {response.model_version or '-'}",
        f"arm {response.arm or '-'}",
        f"degraded {','.join(degraded) or 'none'}",
        f"candidates {response.candidates}",
    ]
    if round_trip_ms is not None:
        header.append(f"round trip {round_trip_ms:.1f} ms")
    print("  ".join(header), file=out)
    if facts is not None:
        top = ", ".join(f"{c} ({share:.0%})" for c, share in facts.top_categories)
        print(f"the buyer's top categories: {top or 'none (no engagement on record)'}", file=out)
    head: tuple[str, ...] = ("pos", "item", "score", "E[GMV]", "reason", "propensity")
    if facts is not None:
        head += ("category", "buyer's share", "price", "seller", "new seller")
    rows: list[tuple[str, ...]] = [head]
    for k, item in enumerate(response.item_ids):
        row: tuple[str, ...] = (
            str(_at(response.positions, k, k + 1)),
            str(item),
            f"{_at(response.scores, k, float('nan')):.4f}",
            f"{_at(response.egmv, k, float('nan')):.4f}",
            _reason(feed_pb2, _at(response.reasons, k, 0)),
            _propensity(_at(response.propensities, k, float("nan"))),
        )
        if facts is not None:
            known = facts.items.get(int(item))
            if known is None:
                row += ("?", "", "", "", "")
            else:
                category, price, seller, new = known
                share = facts.shares.get(category)
                row += (
                    str(category),
                    "" if share is None else f"{share:.0%}",
                    f"{price:.2f}",
                    str(seller),
                    "yes" if new else "",
                )
        rows.append(row)
    print(table(rows, align=">>>><>" + (">>>><" if facts is not None else "")), file=out)
    if not response.item_ids:
        print("(empty page)", file=out)


def _at(values: Any, k: int, default: Any) -> Any:
    """Entry k of a parallel repeated field, or ``default`` when the server sent fewer."""
    return values[k] if k < len(values) else default


def _propensity(p: float) -> str:
    """Three decimals; an exploration slot's (about 1e-4) in scientific notation."""
    return f"{p:.1e}" if 0 < p < 0.001 else f"{p:.3f}"


def _reason(feed_pb2: Any, value: int) -> str:
    try:
        return str(feed_pb2.Reason.Name(value)).removeprefix("REASON_").lower()
    except ValueError:
        return f"reason_{value}"


def table(rows: Sequence[Sequence[str]], align: str) -> str:
    """Rows as aligned columns (``align``: one ``<`` or ``>`` per column)."""
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(w) if a == ">" else cell.ljust(w)
            for cell, w, a in zip(row, widths, align, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
