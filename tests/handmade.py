"""A hand-built marketplace small enough to reason about every feature value."""

from __future__ import annotations

import numpy as np
import pandas as pd

from contract import columns as C

DAY0 = pd.Timestamp("2026-03-02", tz="UTC")


def ts(days: float) -> pd.Timestamp:
    """DAY0 plus a (fractional) number of days."""
    return DAY0 + pd.Timedelta(days=days)


def handmade_tables() -> dict[str, pd.DataFrame]:
    """Two users, two items, one seller; item 0 clicked twice on day 0 and bought on day 1."""
    items = pd.DataFrame(
        {
            C.ITEM_ID: [0, 1],
            C.SELLER_ID: [0, 0],
            C.CATEGORY: [0, 1],
            C.BRAND: [0, 1],
            C.PRICE: [10.0, 50.0],
            C.LIST_PRICE: [20.0, 50.0],
            C.MARGIN: [0.2, 0.3],
            C.CREATED_AT: [ts(-10), ts(-1)],
            C.SHIPPING_DAYS: [2, 3],
            C.STOCK: [5, 0],
            C.CONTENT: [np.zeros(4, np.float32), np.ones(4, np.float32)],
        }
    )
    users = pd.DataFrame(
        {
            C.USER_ID: [0, 1],
            C.SIGNUP_AT: [ts(-100), ts(2.5)],
            C.COUNTRY: ["US", "GB"],
            C.DEVICE: ["ios", "web"],
            C.COHORT: ["2025-11", "2026-03"],
        }
    )
    sellers = pd.DataFrame(
        {C.SELLER_ID: [0], C.CREATED_AT: [ts(-400)], C.RATING: [4.5], C.IS_NEW: [False]}
    )
    imp = pd.DataFrame(
        {
            C.IMPRESSION_ID: [0, 1, 2, 3],
            C.REQUEST_ID: [0, 0, 1, 2],
            C.USER_ID: [0, 0, 0, 1],
            C.ITEM_ID: [0, 1, 0, 1],
            C.POSITION: [1, 2, 1, 1],
            C.SURFACE: ["HOME"] * 4,
            C.TS: [ts(0.1), ts(0.1), ts(0.5), ts(3.2)],
            C.POLICY: ["heuristic"] * 4,
            C.PROPENSITY: [0.5] * 4,
        }
    )
    clicks = pd.DataFrame({C.IMPRESSION_ID: [0, 2], C.TS: [ts(0.11), ts(0.51)]})
    carts = pd.DataFrame({C.IMPRESSION_ID: [2], C.TS: [ts(0.52)]})
    buys = pd.DataFrame({C.IMPRESSION_ID: [2], C.TS: [ts(1.2)], C.PRICE: [10.0], C.QUANTITY: [2]})
    inv = pd.DataFrame({C.ITEM_ID: [0, 0], C.TS: [ts(0), ts(1.2)], C.STOCK: [5, 3]})
    return {
        C.SELLERS: sellers,
        C.ITEMS: items,
        C.USERS: users,
        C.IMPRESSIONS: imp,
        C.CLICKS: clicks,
        C.ADD_TO_CARTS: carts,
        C.PURCHASES: buys,
        C.INVENTORY: inv,
    }
