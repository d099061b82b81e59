"""Feature services: one per ranker version, so a model bundle names exactly what it read."""

from feast import FeatureService

from feature_repo import schema as S
from feature_repo.views import (
    item_inventory,
    item_stats,
    seller_stats,
    user_category_affinity,
    user_profile,
    user_recent_activity,
    user_seller_recency,
)

ranker_v1 = FeatureService(
    name=S.RANKER_SERVICE,
    features=[
        user_profile,
        user_category_affinity,
        user_seller_recency,
        item_stats,
        seller_stats,
        user_recent_activity,
        item_inventory,
    ],
    description="Features of the first GBDT ranker (purchase model and LambdaMART).",
)
