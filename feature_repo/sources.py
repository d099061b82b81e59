"""Offline sources (Parquet written by `homefeed features build`) and push sources.

Paths are relative: Feast resolves them against the store's repo_path, which
`homefeed features` points at the dataset's feature folder (data/<dataset>/features/).
HOMEFEED_FEATURE_DATA, when set, makes them absolute (for the plain feast CLI).
"""

import os

from feast import FileSource, PushSource

from feature_repo import schema as S

FEATURE_DATA = os.environ.get("HOMEFEED_FEATURE_DATA", "")


def _parquet(view: str) -> FileSource:
    return FileSource(
        name=f"{view}_source",
        path=os.path.join(FEATURE_DATA, f"{view}.parquet"),
        timestamp_field=S.EVENT_TIMESTAMP,
        created_timestamp_column=S.CREATED,
    )


user_profile_source = _parquet(S.USER_PROFILE)
user_category_affinity_source = _parquet(S.USER_CATEGORY_AFFINITY)
user_seller_recency_source = _parquet(S.USER_SELLER_RECENCY)
user_content_profile_source = _parquet(S.USER_CONTENT_PROFILE)
item_stats_source = _parquet(S.ITEM_STATS)
seller_stats_source = _parquet(S.SELLER_STATS)

# Streaming features: the event consumer pushes fresh rows online (and, optionally, offline);
# the batch source holds the history that training sets are built from.
user_recent_activity_push = PushSource(
    name="user_recent_activity_push", batch_source=_parquet(S.USER_RECENT_ACTIVITY)
)
item_inventory_push = PushSource(
    name="item_inventory_push", batch_source=_parquet(S.ITEM_INVENTORY)
)
