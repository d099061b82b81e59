"""Feature services: one per ranker version, so a model bundle names exactly what it read."""

from feast import FeatureService

from feature_repo import schema as S
from feature_repo.views import (
    item_inventory,
    item_stats,
    seller_stats,
    user_category_affinity,
    user_content_profile,
    user_profile,
    user_recent_activity,
    user_seller_recency,
)

ranker_v2 = FeatureService(
    name=S.RANKER_SERVICE,
    features=[
        user_profile,
        user_category_affinity,
        user_seller_recency,
        user_content_profile,
        item_stats,
        seller_stats,
        user_recent_activity,
        item_inventory,
    ],
    description="Features of the GBDT rankers (purchase model and LambdaMART); v2 adds the "
    "user's content profile (content_affinity_for_item).",
)
