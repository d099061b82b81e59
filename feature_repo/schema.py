"""Names and types of every feature, in one place and without importing feast.

The batch jobs (training/features.py) write exactly these columns, the views declare
exactly these fields, and the training sets and serving read them by these names.
Types: "int64", "float32", "string", "float32[]" and "int64[]" (lists; see each feature).
"""

from __future__ import annotations

# source file (Parquet, under the dataset's feature folder) of each view
USER_PROFILE = "user_profile"
USER_CATEGORY_AFFINITY = "user_category_affinity"
USER_SELLER_RECENCY = "user_seller_recency"
USER_CONTENT_PROFILE = "user_content_profile"
ITEM_STATS = "item_stats"
SELLER_STATS = "seller_stats"
USER_RECENT_ACTIVITY = "user_recent_activity"
ITEM_INVENTORY = "item_inventory"

EVENT_TIMESTAMP = "event_timestamp"
CREATED = "created"

ENTITY_OF_VIEW = {
    USER_PROFILE: "user_id",
    USER_CATEGORY_AFFINITY: "user_id",
    USER_SELLER_RECENCY: "user_id",
    USER_CONTENT_PROFILE: "user_id",
    ITEM_STATS: "item_id",
    SELLER_STATS: "seller_id",
    USER_RECENT_ACTIVITY: "user_id",
    ITEM_INVENTORY: "item_id",
}

FEATURES: dict[str, dict[str, str]] = {
    USER_PROFILE: {
        "country": "string",
        "device": "string",
        "days_since_signup": "float32",
        "recency_days": "float32",  # days since the last click; 365 when none in 30 days
        "clicks_30d": "int64",
        "purchases_30d": "int64",
        "spend_30d": "float32",
        "spend_band": "int64",  # 0 none, 1 < 25, 2 < 75, 3 < 200, 4 >= 200 (currency units)
        "avg_price_paid_30d": "float32",  # 0 when no purchase
    },
    # The categories the user engaged with in the 30 days before the snapshot (a click
    # weighs 1, a purchase 3), heaviest first, at most contract.affinity.TOP_K, their weights
    # (aligned; both empty without engagement) and the window's total weight over all
    # categories. contract.affinity turns them into the ranker's and the tower's inputs.
    USER_CATEGORY_AFFINITY: {
        "affinity_categories": "int64[]",
        "affinity_weights": "float32[]",
        "affinity_total": "float32",
    },
    # The sellers the user clicked or bought from in the 30 days before the snapshot, most
    # recent first, at most 50, and the days from the last such click / purchase to the
    # snapshot, aligned (both empty without engagement).
    USER_SELLER_RECENCY: {
        "recent_sellers": "int64[]",
        "recent_seller_days": "float32[]",
    },
    # The user's taste in content space: the unit-length weighted sum of the unit content
    # vectors of the items clicked (1), bought (3) or shown by the user's own search and
    # browse (organic impressions, 1) in the 30 days before the snapshot (empty without
    # any). contract.content turns it into the ranker's content_affinity_for_item and
    # retrieval's PROFILE source. content_profile_weight: the weights' sum (0 without any),
    # the evidence the profile rests on (contract.content.evidence_shrink).
    USER_CONTENT_PROFILE: {
        "content_profile": "float32[]",
        "content_profile_weight": "float32",
    },
    ITEM_STATS: {
        "category": "int64",
        "brand": "int64",
        "price": "float32",
        "discount": "float32",  # 1 - price / list_price
        "shipping_days": "int64",
        "age_days": "float32",
        "impressions_7d": "int64",
        # every logged impression of the item (feed and organic) before the snapshot: the
        # evidence its scores rest on (contract.scorer.EvidenceShrink)
        "impressions_total": "int64",
        "clicks_7d": "int64",
        "ctr_7d": "float32",  # Beta-smoothed toward the catalog's CTR
        "ctr_30d": "float32",
        "purchase_rate_7d": "float32",  # purchases per impression, Beta-smoothed
        "purchase_rate_30d": "float32",
        "popularity_7d": "float32",  # log1p(clicks_7d)
        # the item's category's share of everyone's engagement in the 30 days before the
        # snapshot, Laplace-smoothed: the prior of category_affinity_for_item
        "category_share": "float32",
    },
    SELLER_STATS: {
        "seller_rating": "float32",
        "seller_age_days": "float32",
        "seller_is_new": "int64",  # joined within 30 days of the snapshot
    },
    USER_RECENT_ACTIVITY: {
        "views_24h": "int64",  # item-page views (clicks) in the last 24 h
        "carts_24h": "int64",  # add-to-carts in the last 24 h
    },
    ITEM_INVENTORY: {
        "stock": "int64",
        "in_stock": "int64",
    },
}

# The value a feature takes when Feast has no row for the entity (a user who signed up today,
# no activity in 24 h, an item never seen in the inventory log). Training sets and serving
# fill the same values; anything not listed is 0 (numbers) or "unknown" (strings) and
# missing lists (affinity, sellers) are empty.
DEFAULTS: dict[str, float | int | str] = {
    "country": "unknown",
    "device": "unknown",
    "recency_days": 365.0,
    "seller_days_since_engaged": 365.0,  # the seller is not in the user's 30-day list
    "seller_rating": 4.0,
    "in_stock": 1,
}

# Batch views are snapshots: daily for the simulator, weekly for long real-data windows (a
# year of Complete Journey). Their TTL covers one weekly stride plus a missed run; a staler
# row is no longer the entity's state and reads as missing (DEFAULTS).
SNAPSHOT_TTL_DAYS = 8

# Per-user lists are read once per user; a training row (and serving, per candidate) keeps
# only the scalar they reduce to with the candidate: user x item features.
AFFINITY_CATEGORIES = "affinity_categories"
AFFINITY_WEIGHTS = "affinity_weights"
AFFINITY_TOTAL = "affinity_total"
AFFINITY_FOR_ITEM = "category_affinity_for_item"  # contract.affinity.for_items
RECENT_SELLERS = "recent_sellers"
RECENT_SELLER_DAYS = "recent_seller_days"
SELLER_DAYS_SINCE_ENGAGED = "seller_days_since_engaged"  # the days entry of the item's seller
CONTENT_PROFILE = "content_profile"
CONTENT_AFFINITY_FOR_ITEM = "content_affinity_for_item"  # contract.content.similarity
CONTENT_PROFILE_WEIGHT = "content_profile_weight"
# list feature -> the float32 scalar a training row holds in its place
REDUCED_FOR_ITEM: dict[str, str] = {
    AFFINITY_CATEGORIES: AFFINITY_FOR_ITEM,
    AFFINITY_WEIGHTS: AFFINITY_FOR_ITEM,
    RECENT_SELLERS: SELLER_DAYS_SINCE_ENGAGED,
    RECENT_SELLER_DAYS: SELLER_DAYS_SINCE_ENGAGED,
    CONTENT_PROFILE: CONTENT_AFFINITY_FOR_ITEM,
}

BATCH_VIEWS = (
    USER_PROFILE,
    USER_CATEGORY_AFFINITY,
    USER_SELLER_RECENCY,
    USER_CONTENT_PROFILE,
    ITEM_STATS,
    SELLER_STATS,
)
STREAM_VIEWS = (USER_RECENT_ACTIVITY, ITEM_INVENTORY)

# Each view's time to live in seconds (0: none). Training's point-in-time join reads a row
# only while ``row time >= impression time - TTL``; Feast's online read returns the latest
# row whatever its age, so serving applies the same rule itself against the request's time
# (``services.common.users``, ``services.features.items``): a row the join would not have
# found is served as missing (DEFAULTS), as training saw it. feature_repo/views.py declares
# these TTLs to Feast.
TTL_SECONDS: dict[str, int] = {
    USER_PROFILE: SNAPSHOT_TTL_DAYS * 86_400,
    USER_CATEGORY_AFFINITY: SNAPSHOT_TTL_DAYS * 86_400,
    USER_SELLER_RECENCY: SNAPSHOT_TTL_DAYS * 86_400,
    USER_CONTENT_PROFILE: SNAPSHOT_TTL_DAYS * 86_400,
    ITEM_STATS: SNAPSHOT_TTL_DAYS * 86_400,
    SELLER_STATS: SNAPSHOT_TTL_DAYS * 86_400,
    USER_RECENT_ACTIVITY: 86_400,  # a count older than its own window is no longer true
    ITEM_INVENTORY: 0,  # rows are written on change only: the last one stays true
}


def expired(view: str, row_s: int, at_s: float) -> bool:
    """Whether a ``view`` row stamped ``row_s`` (seconds since 1970, UTC) is past its TTL at
    ``at_s``: the point-in-time join would not find it."""
    ttl = TTL_SECONDS[view]
    return ttl > 0 and row_s < at_s - ttl


# The stream views' state at the end of the batch data, handed from `homefeed features` to
# the features service (``<features dir>/STREAM_STATE``): the clicks and add-to-carts of the
# last 24 h and the purchases of the last 30 days, as (kind, user_id, item_id, ts in ns). The
# service seeds its per-user windows with them before replaying the event log, so the first
# events after the data's end count the window training counts (without it, a user who
# clicked an hour before the end would start again from zero).
STREAM_STATE = "stream_state.parquet"
STREAM_STATE_ACTIVITY_S = 86_400
STREAM_STATE_PURCHASE_S = 30 * 86_400


# The feature service each ranker version reads; the bundle records which one it used.
RANKER_SERVICE = "ranker_v2"  # v2: + user_content_profile
RANKER_VIEWS = BATCH_VIEWS + STREAM_VIEWS


def feature_refs(views: tuple[str, ...] = RANKER_VIEWS) -> list[str]:
    """``view:feature`` references in a stable order."""
    return [f"{view}:{name}" for view in views for name in FEATURES[view]]


def training_columns(views: tuple[str, ...] = RANKER_VIEWS) -> list[str]:
    """The scalar feature columns of a training row: every feature, with each per-user list
    replaced by the scalar it reduces to (REDUCED_FOR_ITEM), once."""
    columns = (REDUCED_FOR_ITEM.get(name, name) for view in views for name in FEATURES[view])
    return list(dict.fromkeys(columns))
