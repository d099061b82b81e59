"""``homefeed.ranking.v1.RankingService``: proto <-> numpy, request checks, admin auth."""

# RPC methods carry the proto's names (Rank, Reload), as the generated base class does.
# ruff: noqa: N802

from __future__ import annotations

import logging

import grpc
import numpy as np
from homefeed.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from services.common.admin import AdminToken
from services.common.errors import InvalidArgument, check_ids, check_range
from services.common.matrix import extend_packed
from services.ranking.faults import Faults
from services.ranking.scorer import MAX_ITEMS, ModelHolder

log = logging.getLogger(__name__)

_INT64_MAX = int(np.iinfo(np.int64).max)


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    """Rank scores with the model current when the request arrives; Reload swaps it.

    Admin RPCs fail closed: with ``admin_token`` None every one is refused
    (PERMISSION_DENIED: there is no token that could authorize it).
    """

    def __init__(
        self, holder: ModelHolder, admin_token: str | None = None, faults: Faults | None = None
    ) -> None:
        self.holder = holder
        self._admin = AdminToken(admin_token)
        self._faults = faults  # rehearsals only (faults.py)

    def Rank(
        self, request: ranking_pb2.RankRequest, context: grpc.ServicerContext
    ) -> ranking_pb2.RankResponse:
        model = self.holder.current()
        check_range("user_id", request.user_id, 0, _INT64_MAX)
        n = len(check_ids("item_ids", request.item_ids, max_len=MAX_ITEMS, min_len=1))
        features = request.features
        model.check_schema_hash(features.schema_hash)
        mask = np.array(request.row_mask, dtype=bool)
        if len(mask) and len(mask) != features.rows:
            raise InvalidArgument(
                f"row_mask must have one entry per matrix row ({features.rows}), got {len(mask)}"
            )
        scored = int(mask.sum()) if len(mask) else features.rows
        if scored != n:
            what = "the rows row_mask keeps" if len(mask) else "features.rows"
            raise InvalidArgument(f"{what} must equal the number of item_ids ({n}), got {scored}")
        if features.cols != model.width:
            raise InvalidArgument(
                f"features.cols must be {model.width} (the columns of feature schema "
                f"{model.schema_hash[:12]}), got {features.cols}"
            )
        if len(features.values) != features.rows * model.width:
            raise InvalidArgument(
                f"features.values must hold rows x cols = {features.rows} x {model.width} = "
                f"{features.rows * model.width} values, got {len(features.values)}"
            )
        if len(request.values) != n:
            raise InvalidArgument(
                f"values must hold one price x margin per item_id ({n}), got {len(request.values)}"
            )
        X = np.array(features.values, dtype=np.float32).reshape(features.rows, model.width)
        if len(mask):
            X = X[mask]
        values = np.array(request.values, dtype=np.float32)
        model.check_values(X, values)
        if self._faults is not None:
            self._faults.before()
        p, egmv = model.score(X, values)
        if self._faults is not None:
            p, egmv = self._faults.scored(p, egmv)
        response = ranking_pb2.RankResponse(
            model_version=model.version, schema_hash=model.schema_hash
        )
        extend_packed(response, "p_purchase", p)
        extend_packed(response, "egmv", egmv)
        return response

    def Reload(
        self, request: ranking_pb2.ReloadRequest, context: grpc.ServicerContext
    ) -> ranking_pb2.ReloadResponse:
        self._admin.authorize(context, "Reload")
        swap = self.holder.reload(request.target)
        return ranking_pb2.ReloadResponse(
            previous_version=swap.previous.version if swap.previous else "",
            model_version=swap.current.version,
        )
