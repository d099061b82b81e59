"""The three join keys of the marketplace."""

from feast import Entity, ValueType

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.INT64,
    description="A buyer. Ids are non-negative int64 (string ids are hashed at ingest).",
)

item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.INT64,
    description="A listing. Its seller is a separate entity so seller stats join once.",
)

seller = Entity(
    name="seller",
    join_keys=["seller_id"],
    value_type=ValueType.INT64,
    description="A seller; new sellers are the ones the re-ranker guarantees exposure to.",
)
