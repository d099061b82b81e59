"""``homefeed.ranking.v1.RankingService``: proto <-> numpy, request checks, admin auth."""

# RPC methods carry the proto's names (Rank, Reload), as the generated base class does.
# ruff: noqa: N802

from __future__ import annotations

import hmac
import logging

import grpc
import numpy as np
from homefeed.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from services.common.errors import (
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    check_ids,
    check_range,
)
from services.common.matrix import extend_packed
from services.ranking.scorer import MAX_ITEMS, ModelHolder

log = logging.getLogger(__name__)

AUTHORIZATION_KEY = "authorization"
_INT64_MAX = int(np.iinfo(np.int64).max)


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    """Rank scores with the model current when the request arrives; Reload swaps it.

    Admin RPCs fail closed: with ``admin_token`` None every one is refused
    (PERMISSION_DENIED: there is no token that could authorize it).
    """

    def __init__(self, holder: ModelHolder, admin_token: str | None = None) -> None:
        self.holder = holder
        self._admin_token = admin_token.encode() if admin_token else None

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
        p, egmv = model.score(X, values)
        response = ranking_pb2.RankResponse(
            model_version=model.version, schema_hash=model.schema_hash
        )
        extend_packed(response, "p_purchase", p)
        extend_packed(response, "egmv", egmv)
        return response

    def Reload(
        self, request: ranking_pb2.ReloadRequest, context: grpc.ServicerContext
    ) -> ranking_pb2.ReloadResponse:
        self._authorize(context)
        swap = self.holder.reload(request.target)
        return ranking_pb2.ReloadResponse(
            previous_version=swap.previous.version if swap.previous else "",
            model_version=swap.current.version,
        )

    def _authorize(self, context: grpc.ServicerContext) -> None:
        """Unauthenticated unless the metadata carries ``authorization: Bearer <token>``;
        PermissionDenied when the service has no token. The token is never logged or echoed."""
        if self._admin_token is None:
            raise PermissionDenied(
                "admin RPCs are disabled on this service: it was started without an admin "
                "token (set HOMEFEED_ADMIN_TOKEN to enable them)"
            )
        given = [v for k, v in context.invocation_metadata() or () if k == AUTHORIZATION_KEY]
        if not given:
            raise Unauthenticated(
                "Reload is an admin RPC: send metadata 'authorization: Bearer <admin token>'"
            )
        scheme, _, token = str(given[0]).partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self._admin_token
        ):
            raise Unauthenticated(
                "authorization metadata must be 'Bearer <admin token>' with the token the "
                "service was given (HOMEFEED_ADMIN_TOKEN); the one sent does not match"
            )
