"""The marketplace's entities: sellers, items, users, and their hidden parameters.

Ids are 0..n-1 so that ground-truth arrays are indexed by id. docs/simulator.md lists every
distribution used here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from contract import columns as C
from contract.timeutil import NS_PER_DAY, from_ns
from training.simulate.config import SimConfig
from training.simulate.groundtruth import GroundTruth

COUNTRY_WEIGHTS = np.array([0.45, 0.15, 0.15, 0.12, 0.13])  # order of columns.COUNTRIES
DEVICE_WEIGHTS = np.array([0.40, 0.40, 0.20])  # order of columns.DEVICES
COUNTRY_PRICE_CAP = np.array([150.0, 120.0, 120.0, 110.0, 130.0])  # heuristic's default cap

# Response-model coefficients not exposed as preset knobs (docs/simulator.md, table 3).
RESPONSE_PARAMS = {
    "novelty_days": 14.0,
    "seller_quality_click": 0.3,
    "discount_click": 0.8,
    "novelty_click": 0.4,
    "cart_match_click": 0.8,
    "cart_intercept": -1.4,
    "cart_affinity": 0.8,
    "seller_quality_cart": 0.5,
    "shipping_cart": 0.25,
    "discount_cart": 0.6,
    "buy_intercept": -0.6,
    "buy_affinity": 0.6,
    "seller_quality_buy": 0.8,
    "quantity_extra_mean": 0.15,
}


@dataclass
class World:
    sellers: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    truth: GroundTruth
    seller_size: np.ndarray  # how many items a seller lists, relative
    item_history_pop: np.ndarray  # clicks the heuristic saw before the window (warm start)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _uniform_times(
    rng: np.random.Generator, n: int, lo: pd.Timestamp, hi: pd.Timestamp
) -> np.ndarray:
    """n uniform int64 ns timestamps in [lo, hi)."""
    return rng.integers(lo.value, hi.value, size=n, dtype=np.int64)


def draw_categories(
    rng: np.random.Generator, n_cat: int, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """The world's first draws: category popularity (Zipf, shuffled) and latent centroids."""
    cat_pop = 1.0 / np.arange(1, n_cat + 1) ** 0.9
    cat_pop = rng.permutation(cat_pop / cat_pop.sum())
    return cat_pop, _unit(rng.normal(size=(n_cat, dim)))


def draw_user_hidden(
    rng: np.random.Generator, n: int, cat_pop: np.ndarray, cat_centroid: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A user's hidden parameters from the world's prior: taste (a unit vector near one to
    three favourite categories' centroids), price sensitivity and budget. ``build_world``
    draws its users with it; ``training.simulate.posterior`` draws its particles with it."""
    n_cat, dim = cat_centroid.shape
    n_fav = 1 + rng.binomial(2, 0.4, n)
    taste = np.zeros((n, dim))
    for slot in range(3):
        fav = rng.choice(n_cat, size=n, p=cat_pop)
        weight = (slot < n_fav) * rng.uniform(0.5, 1.0, n)
        taste += weight[:, None] * cat_centroid[fav]
    taste = _unit(taste + 0.35 * rng.normal(size=(n, dim)))
    sensitivity = np.exp(rng.normal(np.log(0.8), 0.5, n))
    budget = np.exp(rng.normal(np.log(45.0), 0.8, n))
    return taste, sensitivity, budget


def world_categories(seed: int, categories: int, latent_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The category popularity and centroids ``build_world`` drew for a config with this
    seed and shape (the ground truth does not store them): the same first draws from
    ``simulate``'s world stream, its seed's first spawned child (which does not depend on
    how many children are spawned)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
    return draw_categories(rng, categories, latent_dim)


def build_world(cfg: SimConfig, rng: np.random.Generator) -> World:
    """Draw every entity and hidden parameter of the marketplace."""
    start, end = cfg.start_ts, cfg.end_ts
    n_cat, dim = cfg.categories, cfg.latent_dim
    day = pd.Timedelta(days=1)

    # -- categories: popularity (Zipf), latent centroid, price level, margin level ------
    cat_pop, cat_centroid = draw_categories(rng, n_cat, dim)
    cat_median_price = np.exp(rng.uniform(np.log(8.0), np.log(250.0), n_cat))
    cat_margin = rng.uniform(0.12, 0.45, n_cat)
    n_brands = n_cat * cfg.brands_per_category
    brand_offset = rng.normal(size=(n_brands, dim))
    brand_premium = np.exp(rng.normal(0.0, 0.3, n_brands))

    # -- sellers -------------------------------------------------------------------------
    n_s = cfg.sellers
    new_seller = rng.random(n_s) < cfg.new_seller_share
    seller_created = np.where(
        new_seller,
        _uniform_times(rng, n_s, start - cfg.new_seller_days * day, start + 0.8 * cfg.days * day),
        _uniform_times(rng, n_s, start - 730 * day, start - cfg.new_seller_days * day),
    )
    seller_quality = rng.normal(0.0, cfg.seller_quality_sd, n_s)
    rating_noise = np.where(new_seller, 0.5, 0.2) * rng.normal(size=n_s)
    rating = np.clip(np.round(4.2 + 0.7 * seller_quality + rating_noise, 1), 1.0, 5.0)
    seller_size = np.exp(rng.normal(0.0, 1.0, n_s)) * np.where(new_seller, 0.4, 1.0)
    seller_main_cat = rng.choice(n_cat, size=n_s, p=cat_pop)
    sellers = pd.DataFrame(
        {
            C.SELLER_ID: np.arange(n_s, dtype=np.int64),
            C.CREATED_AT: from_ns(seller_created),
            C.RATING: rating.astype(np.float64),
            C.IS_NEW: new_seller,
        }
    )

    # -- items ---------------------------------------------------------------------------
    n_i = cfg.items
    seller = rng.choice(n_s, size=n_i, p=seller_size / seller_size.sum())
    in_main = rng.random(n_i) < 0.7
    category = np.where(in_main, seller_main_cat[seller], rng.choice(n_cat, size=n_i, p=cat_pop))
    brand_rank = np.minimum(rng.zipf(1.6, n_i) - 1, cfg.brands_per_category - 1)
    brand = category * cfg.brands_per_category + brand_rank
    latent = _unit(
        cat_centroid[category]
        + 0.5 * brand_offset[brand] / np.sqrt(dim)
        + 0.35 * rng.normal(size=(n_i, dim))
    )
    mixing = rng.normal(0.0, 1.0 / np.sqrt(dim), size=(dim, cfg.content_dim))
    content = latent @ mixing + 0.15 * rng.normal(size=(n_i, cfg.content_dim))
    appeal = rng.normal(0.0, cfg.appeal_sd, n_i)
    price = (
        np.round(
            cat_median_price[category] * brand_premium[brand] * np.exp(rng.normal(0.0, 0.6, n_i)), 0
        )
        - 0.01
    )
    price = np.maximum(price, 0.99)
    discounted = rng.random(n_i) < 0.35
    discount = np.where(discounted, rng.uniform(0.05, 0.5, n_i), 0.0)
    list_price = np.where(discounted, np.round(price / (1.0 - discount), 2), price)
    discount = 1.0 - price / list_price
    margin = np.clip(cat_margin[category] + rng.normal(0.0, 0.05, n_i), 0.02, 0.9)
    shipping = (
        1 + rng.poisson(1.5, n_i) + np.where(new_seller[seller] & (rng.random(n_i) < 0.5), 2, 0)
    )
    new_item = rng.random(n_i) < cfg.new_item_share
    item_created = np.where(
        new_item,
        _uniform_times(rng, n_i, start, end),
        _uniform_times(rng, n_i, start - 365 * day, start),
    )
    # an item is never listed before its seller joined
    listing_lag = (rng.exponential(3.0, n_i) * NS_PER_DAY).astype(np.int64)
    item_created = np.maximum(item_created, seller_created[seller] + listing_lag)
    item_created = np.minimum(item_created, end.value - NS_PER_DAY // 2)
    # popularity the heuristic saw before the window: clicks over the past week
    existed = item_created < start.value
    history_rate = 2.0 * np.exp(1.2 * appeal) * cat_pop[category] * n_cat
    item_history_pop = np.where(existed, rng.poisson(history_rate), 0).astype(np.float64)
    # sellers stock what sells: a base level plus about two weeks of the item's clicks
    stock = rng.poisson(np.exp(rng.normal(3.5, 1.0, n_i)) + 2.0 * item_history_pop)
    items = pd.DataFrame(
        {
            C.ITEM_ID: np.arange(n_i, dtype=np.int64),
            C.SELLER_ID: seller.astype(np.int64),
            C.CATEGORY: category.astype(np.int64),
            C.BRAND: brand.astype(np.int64),
            C.PRICE: price.astype(np.float64),
            C.LIST_PRICE: list_price.astype(np.float64),
            C.MARGIN: margin.astype(np.float64),
            C.CREATED_AT: from_ns(item_created),
            C.SHIPPING_DAYS: shipping.astype(np.int64),
            C.STOCK: stock.astype(np.int64),
            C.CONTENT: list(content.astype(np.float32)),
        }
    )

    # -- users ---------------------------------------------------------------------------
    n_u = cfg.users
    new_user = rng.random(n_u) < cfg.new_user_share
    signup = np.where(
        new_user,
        _uniform_times(rng, n_u, start, end),
        _uniform_times(rng, n_u, start - 730 * day, start),
    )
    country = rng.choice(len(C.COUNTRIES), size=n_u, p=COUNTRY_WEIGHTS)
    device = rng.choice(len(C.DEVICES), size=n_u, p=DEVICE_WEIGHTS)
    taste, sensitivity, budget = draw_user_hidden(rng, n_u, cat_pop, cat_centroid)
    signup_ts = from_ns(signup)
    users = pd.DataFrame(
        {
            C.USER_ID: np.arange(n_u, dtype=np.int64),
            C.SIGNUP_AT: signup_ts,
            C.COUNTRY: np.asarray(C.COUNTRIES, dtype=object)[country],
            C.DEVICE: np.asarray(C.DEVICES, dtype=object)[device],
            C.COHORT: signup_ts.strftime("%Y-%m").to_numpy(dtype=object),
        }
    )

    params = {
        k: float(getattr(cfg, k))
        for k in (
            "examination_kappa",
            "examination_theta",
            "click_intercept",
            "affinity_strength",
        )
    }
    params.update(RESPONSE_PARAMS)
    params["start_ns"] = float(start.value)
    params["end_ns"] = float(end.value)
    truth = GroundTruth(
        params=params,
        user_taste=taste,
        user_price_sensitivity=sensitivity,
        user_budget=budget,
        user_country=country.astype(np.int64),
        user_device=device.astype(np.int64),
        item_latent=latent,
        item_appeal=appeal,
        item_category=category.astype(np.int64),
        item_price=price,
        item_discount=discount,
        item_margin=margin,
        item_shipping_days=shipping.astype(np.float64),
        item_created_ns=item_created,
        item_seller_quality=seller_quality[seller],
        country_category=rng.normal(0.0, 0.3, (len(C.COUNTRIES), n_cat)),
        device_category=rng.normal(0.0, 0.2, (len(C.DEVICES), n_cat)),
    )
    return World(sellers, items, users, truth, seller_size, item_history_pop)
