"""``homefeed.feed.v1.FeedService``: request checks, proto <-> pipeline, stage trailer."""

# RPC methods carry the proto's names, as the generated base class does.
# ruff: noqa: N802

from __future__ import annotations

import time
import uuid

import grpc
import numpy as np
from homefeed.feed.v1 import feed_pb2, feed_pb2_grpc

from services.common.context import remaining_seconds
from services.common.errors import (
    INT64_MAX,
    InvalidArgument,
    check_context,
    check_ids,
    check_range,
    check_surface,
)
from services.common.matrix import extend_packed
from services.gateway.clients import FeedRequest
from services.gateway.pipeline import FeedPage, FeedPipeline

STAGE_METADATA_KEY = "hf-stage-ms"
MAX_PAGE_SIZE = 100
MAX_CART = 100
MAX_REQUEST_ID = 128


def parse_request(request: feed_pb2.GetFeedRequest) -> FeedRequest:
    """The request as the pipeline takes it; InvalidArgument naming the first bad field."""
    if len(request.request_id) > MAX_REQUEST_ID:
        raise InvalidArgument(
            f"request_id must be at most {MAX_REQUEST_ID} characters (empty: one is "
            f"generated), got {len(request.request_id)}"
        )
    check_range("page_size", request.page_size, 1, MAX_PAGE_SIZE)
    surface = check_surface(request.surface)
    user_id = check_range("user_id", request.user_id, 0, INT64_MAX)
    cart = check_ids("cart_item_ids", request.cart_item_ids, max_len=MAX_CART)
    check_context(request.context)
    return FeedRequest(
        request_id=request.request_id or uuid.uuid4().hex,
        user_id=user_id,
        surface=surface,
        cart_item_ids=cart,
        page_size=request.page_size,
        context=request.context,
    )


def to_response(page: FeedPage) -> feed_pb2.GetFeedResponse:
    response = feed_pb2.GetFeedResponse(
        request_id=page.request_id,
        model_version=page.model_version,
        arm=page.arm,
        candidates=page.candidates,
        version_skew=page.version_skew,
    )
    response.item_ids.extend(page.item_ids.tolist())
    extend_packed(response, "positions", np.arange(1, len(page.item_ids) + 1))
    extend_packed(response, "scores", page.scores)
    extend_packed(response, "egmv", page.egmv)
    extend_packed(response, "reasons", page.reasons)
    extend_packed(response, "propensities", page.propensities)
    response.degraded.extend(page.degraded)
    return response


class FeedServicer(feed_pb2_grpc.FeedServiceServicer):
    """GetFeed: validate, run the pipeline within the caller's deadline, respond with the
    stage times in the ``hf-stage-ms`` trailer."""

    def __init__(self, pipeline: FeedPipeline) -> None:
        self.pipeline = pipeline

    def GetFeed(
        self, request: feed_pb2.GetFeedRequest, context: grpc.ServicerContext
    ) -> feed_pb2.GetFeedResponse:
        started = time.perf_counter()
        feed_request = parse_request(request)
        page = self.pipeline.run(feed_request, remaining_seconds(context))
        response = to_response(page)
        page.times.total = (time.perf_counter() - started) * 1e3
        self.pipeline.timers.record(page.times)
        context.set_trailing_metadata(((STAGE_METADATA_KEY, page.times.format()),))
        return response
