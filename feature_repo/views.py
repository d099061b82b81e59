"""Feature views. Batch views are daily snapshots (features from events strictly before the
snapshot time), so a point-in-time join can never see an event after the impression."""

from datetime import timedelta
from typing import Any

from feast import FeatureView, Field
from feast.types import Array, Float32, Int64, String

from feature_repo import schema as S
from feature_repo.entities import item, seller, user
from feature_repo.sources import (
    item_inventory_push,
    item_stats_source,
    seller_stats_source,
    user_category_affinity_source,
    user_content_profile_source,
    user_profile_source,
    user_recent_activity_push,
    user_seller_recency_source,
)

_TYPES: dict[str, Any] = {
    "int64": Int64,
    "float32": Float32,
    "string": String,
    "float32[]": Array(Float32),
    "int64[]": Array(Int64),
}


def _fields(view: str) -> list[Field]:
    return [Field(name=name, dtype=_TYPES[kind]) for name, kind in S.FEATURES[view].items()]


def _ttl(view: str) -> timedelta:
    """The view's TTL (schema.TTL_SECONDS: serving applies the same one)."""
    return timedelta(seconds=S.TTL_SECONDS[view])


user_profile = FeatureView(
    name=S.USER_PROFILE,
    entities=[user],
    ttl=_ttl(S.USER_PROFILE),
    schema=_fields(S.USER_PROFILE),
    source=user_profile_source,
    description="Who the buyer is and their recency / frequency / spend band over 30 days.",
)

user_category_affinity = FeatureView(
    name=S.USER_CATEGORY_AFFINITY,
    entities=[user],
    ttl=_ttl(S.USER_CATEGORY_AFFINITY),
    schema=_fields(S.USER_CATEGORY_AFFINITY),
    source=user_category_affinity_source,
    description="The user's engaged categories as two short lists and a total (not a user x "
    "category entity): the ranker looks up the candidate's category, so 500 candidates cost "
    "one read, and the row's size follows the user's engagement, not the taxonomy.",
)

user_seller_recency = FeatureView(
    name=S.USER_SELLER_RECENCY,
    entities=[user],
    ttl=_ttl(S.USER_SELLER_RECENCY),
    schema=_fields(S.USER_SELLER_RECENCY),
    source=user_seller_recency_source,
    description="The user's last 30 days of sellers as two aligned lists (not a user x seller "
    "entity): the ranker looks up the candidate's seller, so 500 candidates cost one read.",
)

user_content_profile = FeatureView(
    name=S.USER_CONTENT_PROFILE,
    entities=[user],
    ttl=_ttl(S.USER_CONTENT_PROFILE),
    schema=_fields(S.USER_CONTENT_PROFILE),
    source=user_content_profile_source,
    description="The user's taste in content space (one short vector): the ranker takes its "
    "cosine with each candidate's content, retrieval searches the catalogue with it.",
)

item_stats = FeatureView(
    name=S.ITEM_STATS,
    entities=[item],
    ttl=_ttl(S.ITEM_STATS),
    schema=_fields(S.ITEM_STATS),
    source=item_stats_source,
    description="Catalog attributes and smoothed engagement rates; the features service "
    "keeps these in memory rather than reading 500 rows per request.",
)

seller_stats = FeatureView(
    name=S.SELLER_STATS,
    entities=[seller],
    ttl=_ttl(S.SELLER_STATS),
    schema=_fields(S.SELLER_STATS),
    source=seller_stats_source,
    description="Seller reputation and age; new sellers get guaranteed exposure downstream.",
)

user_recent_activity = FeatureView(
    name=S.USER_RECENT_ACTIVITY,
    entities=[user],
    ttl=_ttl(S.USER_RECENT_ACTIVITY),
    schema=_fields(S.USER_RECENT_ACTIVITY),
    source=user_recent_activity_push,
    description="Views and carts in the last 24 h, pushed as events arrive.",
)

item_inventory = FeatureView(
    name=S.ITEM_INVENTORY,
    entities=[item],
    ttl=_ttl(S.ITEM_INVENTORY),
    schema=_fields(S.ITEM_INVENTORY),
    source=item_inventory_push,
    description="Stock level, pushed on every inventory change.",
)
