"""``homefeed.features.v1.FeaturesService``: request checks, proto <-> numpy."""

# RPC methods carry the proto's names, as the generated base class does.
# ruff: noqa: N802

from __future__ import annotations

import re
from datetime import UTC, datetime

import grpc
import numpy as np
from homefeed.common.v1 import common_pb2
from homefeed.features.v1 import features_pb2, features_pb2_grpc

from services.common.errors import InvalidArgument, check_ids, check_range, check_surface
from services.common.matrix import to_float_matrix
from services.features.assembler import MAX_ITEMS, Assembler, RequestContext, first_duplicate
from training import columns as C

_INT64_MAX = int(np.iinfo(np.int64).max)
_MAX_REQUEST_ID = 128
_COUNTRY = re.compile(r"[A-Z]{2}")
_DEVICES = ("", *C.DEVICES)
_SURFACE_NAME = {common_pb2.SURFACE_HOME: "HOME", common_pb2.SURFACE_CHECKOUT: "CHECKOUT"}
# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799


def request_time(context: common_pb2.RequestContext) -> datetime | None:
    """The context's time (UTC), None when unset; InvalidArgument when out of range."""
    if not context.HasField("time"):
        return None
    ts = context.time
    check_range("context.time.seconds", ts.seconds, _MIN_SECONDS, _MAX_SECONDS)
    check_range("context.time.nanos", ts.nanos, 0, 999_999_999)
    return ts.ToDatetime(tzinfo=UTC)


def check_context(context: common_pb2.RequestContext) -> None:
    """country: empty or ISO 3166-1 alpha-2 in upper case; device: empty, ios, android, web."""
    if context.country and not _COUNTRY.fullmatch(context.country):
        raise InvalidArgument(
            "context.country must be empty or an ISO 3166-1 alpha-2 code in upper case "
            f'("US", "DE"), got {context.country!r}'
        )
    if context.device not in _DEVICES:
        raise InvalidArgument(
            f"context.device must be empty or one of {', '.join(C.DEVICES)}, got {context.device!r}"
        )


class FeaturesServicer(features_pb2_grpc.FeaturesServiceServicer):
    """GetFeatures: validate, assemble with the current item table, respond."""

    def __init__(self, assembler: Assembler) -> None:
        self.assembler = assembler

    def GetFeatures(
        self, request: features_pb2.GetFeaturesRequest, context: grpc.ServicerContext
    ) -> features_pb2.GetFeaturesResponse:
        if len(request.request_id) > _MAX_REQUEST_ID:
            raise InvalidArgument(
                f"request_id must be at most {_MAX_REQUEST_ID} characters, "
                f"got {len(request.request_id)}"
            )
        user_id = check_range("user_id", request.user_id, 0, _INT64_MAX)
        item_ids = check_ids("item_ids", request.item_ids, max_len=MAX_ITEMS, min_len=1)
        repeat = first_duplicate(item_ids)
        if repeat is not None:
            item, first, again = repeat
            raise InvalidArgument(
                f"item_ids must be unique, got item {item} at positions {first} and {again}"
            )
        surface = _SURFACE_NAME[check_surface(request.surface)]
        self.assembler.check_schema_hash(request.schema_hash)
        check_context(request.context)
        when = request_time(request.context)

        out = self.assembler.assemble(user_id, item_ids, RequestContext.at(when, surface))
        response = features_pb2.GetFeaturesResponse(
            features=to_float_matrix(out.matrix, self.assembler.schema_hash),
            known_user=out.known_user,
        )
        response.available.extend(out.available.tolist())
        response.values.extend(out.values.tolist())
        response.prices.extend(out.prices.tolist())
        response.categories.extend(out.categories.tolist())
        response.new_seller.extend(out.new_seller.tolist())
        response.heuristic_scores.extend(out.heuristic_scores.tolist())
        response.feature_names.extend(self.assembler.feature_names)
        return response
