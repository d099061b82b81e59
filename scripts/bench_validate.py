"""Time `validate_tables` on a synthetic data set of realistic size (not a test).

    .venv/bin/python scripts/bench_validate.py --impressions 6000000 --clicks 300000

Logs the wall time of one validation of valid tables and, with ``--corrupt``, of tables
where a whole column breaks a rule (the slowest path: every row becomes a failure case).
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import pandas as pd

from contract.columns import (
    ADD_TO_CARTS,
    BRAND,
    CATEGORY,
    CLICKS,
    COHORT,
    CONTENT,
    COUNTRY,
    CREATED_AT,
    DEVICE,
    IMPRESSION_ID,
    IMPRESSIONS,
    INVENTORY,
    IS_NEW,
    ITEM_ID,
    ITEMS,
    LIST_PRICE,
    MARGIN,
    POLICY,
    POLICY_HEURISTIC,
    POLICY_ORGANIC,
    POLICY_RANDOM,
    POSITION,
    PRICE,
    PROPENSITY,
    PURCHASES,
    QUANTITY,
    RATING,
    REQUEST_ID,
    SELLER_ID,
    SELLERS,
    SHIPPING_DAYS,
    SIGNUP_AT,
    STOCK,
    SURFACE,
    SURFACES,
    TS,
    USER_ID,
    USERS,
)
from training.validate import ValidationError, validate_tables

logger = logging.getLogger("bench_validate")
START = pd.Timestamp("2024-01-01", tz="UTC")
DAYS = 30
END = START + pd.Timedelta(days=DAYS)


def synthetic_tables(n_impressions: int, n_clicks: int, seed: int = 0) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    n_sellers, n_items, n_users = 5_000, 100_000, 200_000

    def ts(n: int, start: pd.Timestamp = START, days: int = DAYS) -> pd.Series:
        seconds = np.sort(rng.integers(0, days * 86_400, n))
        return pd.Series(start + pd.to_timedelta(seconds, unit="s"))

    sellers = pd.DataFrame(
        {
            SELLER_ID: np.arange(n_sellers),
            CREATED_AT: ts(n_sellers, START - pd.Timedelta(days=900), 800),
            RATING: rng.uniform(1, 5, n_sellers),
            IS_NEW: rng.random(n_sellers) < 0.1,
        }
    )
    price = rng.uniform(1, 200, n_items)
    items = pd.DataFrame(
        {
            ITEM_ID: np.arange(n_items),
            SELLER_ID: rng.integers(0, n_sellers, n_items),
            CATEGORY: rng.integers(0, 50, n_items),
            BRAND: rng.integers(0, 500, n_items),
            PRICE: price,
            LIST_PRICE: price * rng.uniform(1, 1.5, n_items),
            MARGIN: rng.uniform(0, 0.6, n_items),
            CREATED_AT: ts(n_items, START - pd.Timedelta(days=400), 390),
            SHIPPING_DAYS: rng.integers(0, 10, n_items),
            STOCK: rng.integers(0, 100, n_items),
            CONTENT: list(rng.standard_normal((n_items, 32), dtype=np.float32)),
        }
    )
    users = pd.DataFrame(
        {
            USER_ID: np.arange(n_users),
            SIGNUP_AT: ts(n_users, START - pd.Timedelta(days=900), 890),
            COUNTRY: rng.choice(np.array(["US", "GB", "DE"], dtype=object), n_users),
            DEVICE: rng.choice(np.array(["ios", "android", "web"], dtype=object), n_users),
            COHORT: rng.choice(np.array(["a", "b"], dtype=object), n_users),
        }
    )
    policies = np.array([POLICY_HEURISTIC, POLICY_RANDOM, POLICY_ORGANIC], dtype=object)
    policy = rng.choice(policies, n_impressions, p=[0.85, 0.1, 0.05])
    organic = policy == POLICY_ORGANIC
    impressions = pd.DataFrame(
        {
            IMPRESSION_ID: np.arange(n_impressions),
            REQUEST_ID: np.arange(n_impressions) // 20,
            USER_ID: rng.integers(0, n_users, n_impressions),
            ITEM_ID: rng.integers(0, n_items, n_impressions),
            POSITION: np.where(organic, 0, rng.integers(1, 21, n_impressions)),
            SURFACE: rng.choice(np.array(SURFACES, dtype=object), n_impressions),
            TS: ts(n_impressions),
            POLICY: policy,
            PROPENSITY: np.where(organic, np.nan, rng.uniform(0.01, 1, n_impressions)),
        }
    )

    def events(n: int, delay_s: int) -> pd.DataFrame:
        ids = np.sort(rng.choice(n_impressions, n, replace=False))
        delay = pd.to_timedelta(rng.integers(0, delay_s, n), unit="s")
        df = pd.DataFrame({IMPRESSION_ID: ids, TS: impressions[TS].iloc[ids].array + delay})
        return df[df[TS] < END].reset_index(drop=True)  # clicks are cut at the window's end

    clicks = events(n_clicks, 600)
    add_to_carts = events(n_clicks // 3, 3_600)
    purchases = events(n_clicks // 10, 86_400)
    purchases[PRICE] = rng.uniform(1, 200, len(purchases))
    purchases[QUANTITY] = rng.integers(1, 4, len(purchases))
    inventory = pd.DataFrame(
        {
            ITEM_ID: np.tile(np.arange(n_items), 3),
            TS: ts(3 * n_items),
            STOCK: rng.integers(0, 100, 3 * n_items),
        }
    )
    return {
        SELLERS: sellers,
        ITEMS: items,
        USERS: users,
        IMPRESSIONS: impressions,
        CLICKS: clicks,
        ADD_TO_CARTS: add_to_carts,
        PURCHASES: purchases,
        INVENTORY: inventory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=6_000_000)
    parser.add_argument("--clicks", type=int, default=300_000)
    parser.add_argument("--corrupt", action="store_true", help="also time a broken column")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG, format="%(name)s %(message)s")
    logging.getLogger("training.validate").setLevel(logging.DEBUG)

    tables = synthetic_tables(args.impressions, args.clicks)
    window = (START, END)
    started = time.perf_counter()
    validate_tables(tables, window=window)
    logger.info(
        "valid: %s impressions, %s clicks validated in %.2f s",
        f"{args.impressions:,}",
        f"{args.clicks:,}",
        time.perf_counter() - started,
    )
    if args.corrupt:
        tables[IMPRESSIONS][SURFACE] = "FEED"  # every impression breaks allowed_values
        tables[IMPRESSIONS][POSITION] = 0  # every feed impression breaks position_by_policy
        started = time.perf_counter()
        try:
            validate_tables(tables, window=window)
        except ValidationError as err:
            logger.info(
                "corrupt: %d violations found in %.2f s",
                len(err.violations),
                time.perf_counter() - started,
            )


if __name__ == "__main__":
    main()
