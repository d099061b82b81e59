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
    check_context,
    check_ids,
    check_range,
    check_request_id,
    check_surface,
)
from services.common.matrix import extend_packed
from services.gateway.admission import RETRY_AFTER_KEY, Admission, Shed
from services.gateway.clients import FeedRequest
from services.gateway.pipeline import FeedPage, FeedPipeline

STAGE_METADATA_KEY = "hf-stage-ms"
MAX_PAGE_SIZE = 100
MAX_CART = 100
MAX_SEEN = 1000


def parse_request(request: feed_pb2.GetFeedRequest) -> FeedRequest:
    """The request as the pipeline takes it; InvalidArgument naming the first bad field."""
    check_request_id(request.request_id, " (empty: one is generated)")
    check_range("page_size", request.page_size, 1, MAX_PAGE_SIZE)
    surface = check_surface(request.surface)
    user_id = check_range("user_id", request.user_id, 0, INT64_MAX)
    cart = check_ids("cart_item_ids", request.cart_item_ids, max_len=MAX_CART)
    seen = check_ids("seen_item_ids", request.seen_item_ids, max_len=MAX_SEEN)
    check_context(request.context)
    return FeedRequest(
        request_id=request.request_id or uuid.uuid4().hex,
        user_id=user_id,
        surface=surface,
        cart_item_ids=cart,
        page_size=request.page_size,
        context=request.context,
        seen_item_ids=seen,
    )


def to_response(page: FeedPage) -> feed_pb2.GetFeedResponse:
    response = feed_pb2.GetFeedResponse(
        request_id=page.request_id,
        model_version=page.model_version,
        arm=page.arm,
        candidates=page.candidates,
        version_skew=page.version_skew,
        experiment=page.experiment,
        experiment_arm=page.experiment_arm,
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

    def __init__(self, pipeline: FeedPipeline, admission: Admission | None = None) -> None:
        self.pipeline = pipeline
        self.admission = admission if admission is not None else Admission()

    def GetFeed(
        self, request: feed_pb2.GetFeedRequest, context: grpc.ServicerContext
    ) -> feed_pb2.GetFeedResponse:
        started = time.perf_counter()
        remaining = remaining_seconds(context)
        try:
            self.admission.admit(remaining)
        except Shed as err:
            context.set_trailing_metadata(((RETRY_AFTER_KEY, str(err.retry_after_ms)),))
            raise
        try:
            return self._feed(request, context, started, remaining)
        finally:
            self.admission.release()

    def _feed(
        self,
        request: feed_pb2.GetFeedRequest,
        context: grpc.ServicerContext,
        started: float,
        remaining: float | None,
    ) -> feed_pb2.GetFeedResponse:
        feed_request = parse_request(request)
        page = self.pipeline.run(feed_request, remaining)
        response = to_response(page)
        page.times.total = (time.perf_counter() - started) * 1e3
        self.pipeline.observe(page)
        context.set_trailing_metadata(((STAGE_METADATA_KEY, page.times.format()),))
        return response
