"""``homefeed.features.v1.FeaturesService``: request checks, proto <-> numpy."""

# RPC methods carry the proto's names, as the generated base class does.
# ruff: noqa: N802

from __future__ import annotations

import grpc
from homefeed.common.v1 import common_pb2
from homefeed.features.v1 import features_pb2, features_pb2_grpc

from services.common.errors import (
    INT64_MAX,
    InvalidArgument,
    check_context,
    check_ids,
    check_range,
    check_request_id,
    check_surface,
)
from services.common.matrix import extend_packed, to_float_matrix
from services.common.users import from_proto
from services.features.assembler import (
    MAX_ITEMS,
    Assembler,
    RequestContext,
    UserFeatures,
    first_duplicate,
)

_SURFACE_NAME = {common_pb2.SURFACE_HOME: "HOME", common_pb2.SURFACE_CHECKOUT: "CHECKOUT"}


class FeaturesServicer(features_pb2_grpc.FeaturesServiceServicer):
    """GetFeatures: validate, assemble with the current item table, respond."""

    def __init__(self, assembler: Assembler, model_version: str = "") -> None:
        self.assembler = assembler
        self.model_version = model_version  # the bundle whose catalogue is served

    def GetFeatures(
        self, request: features_pb2.GetFeaturesRequest, context: grpc.ServicerContext
    ) -> features_pb2.GetFeaturesResponse:
        check_request_id(request.request_id)
        user_id = check_range("user_id", request.user_id, 0, INT64_MAX)
        item_ids = check_ids("item_ids", request.item_ids, max_len=MAX_ITEMS, min_len=1)
        repeat = first_duplicate(item_ids)
        if repeat is not None:
            item, first, again = repeat
            raise InvalidArgument(
                f"item_ids must be unique, got item {item} at positions {first} and {again}"
            )
        surface = _SURFACE_NAME[check_surface(request.surface)]
        self.assembler.check_schema_hash(request.schema_hash)
        when = check_context(request.context)
        user = (
            UserFeatures.from_rows(from_proto(request.user))
            if request.HasField("user")
            else self.assembler.read_user(user_id)
        )

        out = self.assembler.assemble(user, item_ids, RequestContext.at(when, surface))
        response = features_pb2.GetFeaturesResponse(
            features=to_float_matrix(out.matrix, self.assembler.schema_hash),
            known_user=out.known_user,
            model_version=self.model_version,
        )
        extend_packed(response, "available", out.available)
        extend_packed(response, "values", out.values)
        extend_packed(response, "prices", out.prices)
        response.categories.extend(out.categories.tolist())
        extend_packed(response, "new_seller", out.new_seller)
        extend_packed(response, "heuristic_scores", out.heuristic_scores)
        if request.include_feature_names:
            response.feature_names.extend(self.assembler.feature_names)
        return response
