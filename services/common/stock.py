"""Which of a fixed list of items are in stock, from the online store's ``item_inventory``
view, kept current by a background thread.

Retrieval never offers an item that is out of stock (the gateway would drop it anyway, and
an exploration draw over items nobody can be shown would make the logged propensities
wrong). The mask follows the features service's rule: an item without an inventory row
counts as in stock (``feature_repo.schema.DEFAULTS``). A refresh reads the view again only
when the store reports a change (a push, a materialization); a failed refresh is logged and
the last mask keeps serving.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from feature_repo import schema as S
from services.common.online import (
    FastPathError,
    OnlineReader,
    close_reader,
    switch_to_fallback,
)
from services.common.periodic import Periodic

log = logging.getLogger(__name__)

IN_STOCK = "in_stock"
if IN_STOCK not in S.FEATURES[S.ITEM_INVENTORY]:
    raise ImportError(f"{S.ITEM_INVENTORY} lost {IN_STOCK}: update services/common/stock.py")


class StockWatcher:
    """``in_stock()``: a bool array aligned with ``item_ids``; swapped whole on refresh, so a
    reader takes no lock."""

    def __init__(
        self,
        reader: OnlineReader,
        item_ids: np.ndarray,
        refresh_s: float = 2.0,
        fallback: OnlineReader | None = None,
    ) -> None:
        self.reader = reader
        self.fallback = fallback
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        self.refreshes = 0
        self.failures = 0
        self._mask: np.ndarray | None = None
        self._changes: object = None
        self._refresher = Periodic("stock-refresh", refresh_s, self._tick)

    def in_stock(self) -> np.ndarray:
        mask = self._mask
        if mask is None:
            raise RuntimeError("StockWatcher.refresh() has not run")
        return mask

    def refresh(self, force: bool = False) -> bool:
        """Read the view again unless the store reports no change; True when it did."""
        changes = self.reader.changes()
        if not force and self._mask is not None and changes == self._changes:
            return False
        started = time.perf_counter()
        rows = self.reader.read_view(S.ITEM_INVENTORY, self.item_ids)
        self._mask = rows.columns[IN_STOCK] == 1
        self._changes = changes
        self.refreshes += 1
        log.debug(
            "stock refreshed",
            extra={
                "in_stock": int(self._mask.sum()),
                "items": len(self._mask),
                "ms": round((time.perf_counter() - started) * 1e3, 1),
            },
        )
        return True

    def _tick(self) -> None:
        try:
            try:
                self.refresh()
            except FastPathError as err:
                switch_to_fallback(self, err, "stock")
                self.refresh(force=True)
        except Exception:  # keep serving the last mask
            self.failures += 1
            log.exception("stock refresh failed; serving the previous mask")

    def start(self) -> None:
        """The background refresher (after a first ``refresh``)."""
        self.in_stock()
        self._refresher.start()

    def close(self, timeout: float = 10.0) -> None:
        self._refresher.close(timeout)
        close_reader(self.reader)
