"""Printing a feed page and aligned tables for the command line (``homefeed feed``, the demo)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import IO, Any


def print_feed(
    response: Any, round_trip_ms: float | None = None, file: IO[str] | None = None
) -> None:
    """Print a ``GetFeedResponse`` as a header (request id, model version, arm, degraded
    flags, candidate count, round trip) and one table row per item."""
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
    rows = [("pos", "item", "score", "E[GMV]", "reason", "propensity")]
    for k, item in enumerate(response.item_ids):
        rows.append(
            (
                str(_at(response.positions, k, k + 1)),
                str(item),
                f"{_at(response.scores, k, float('nan')):.4f}",
                f"{_at(response.egmv, k, float('nan')):.4f}",
                _reason(feed_pb2, _at(response.reasons, k, 0)),
                f"{_at(response.propensities, k, float('nan')):.3f}",
            )
        )
    print(table(rows, align=">>>><>"), file=out)
    if not response.item_ids:
        print("(empty page)", file=out)


def _at(values: Any, k: int, default: Any) -> Any:
    """Entry k of a parallel repeated field, or ``default`` when the server sent fewer."""
    return values[k] if k < len(values) else default


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
