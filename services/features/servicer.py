"""``homefeed.features.v1.FeaturesService``: request checks, proto <-> numpy."""

# RPC methods carry the proto's names, as the generated base class does.
# ruff: noqa: N802

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
import numpy as np
from homefeed.common.v1 import common_pb2
from homefeed.events.v1 import events_pb2, events_pb2_grpc
from homefeed.features.v1 import features_pb2, features_pb2_grpc

from contract import events as E
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
from services.features.events import MAX_EVENTS, MAX_FEEDS, EventIngestor, RecentPurchases

_SURFACE_NAME = {common_pb2.SURFACE_HOME: "HOME", common_pb2.SURFACE_CHECKOUT: "CHECKOUT"}


class FeaturesServicer(features_pb2_grpc.FeaturesServiceServicer):
    """GetFeatures: validate, assemble with the current item table, respond."""

    def __init__(
        self,
        assembler: Assembler,
        model_version: str = "",
        purchases: RecentPurchases | None = None,
    ) -> None:
        self.assembler = assembler
        self.model_version = model_version  # the bundle whose catalogue is served
        self.purchases = purchases  # items a user just bought are not available to them

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
            else self.assembler.read_user(user_id, when)
        )

        out = self.assembler.assemble(user, item_ids, RequestContext.at(when, surface))
        if self.purchases is not None:
            bought = self.purchases.items(user_id, _ns(when))
            if len(bought):
                out.available[np.isin(item_ids, bought)] = False
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


def _ns(when: datetime | None) -> int:
    moment = when if when is not None else datetime.now(UTC)
    return int(moment.timestamp() * 1e9)


_SURFACE_OF = {0: "", **_SURFACE_NAME}
_KIND_OF = {
    events_pb2.EVENT_KIND_IMPRESSION: E.IMPRESSION,
    events_pb2.EVENT_KIND_CLICK: E.CLICK,
    events_pb2.EVENT_KIND_ADD_TO_CART: E.ADD_TO_CART,
    events_pb2.EVENT_KIND_PURCHASE: E.PURCHASE,
    events_pb2.EVENT_KIND_INVENTORY: E.INVENTORY,
}


def event_record(event: events_pb2.Event) -> dict[str, Any]:
    """An Event as its log record (contract.events); validated by the ingestor."""
    kind = _KIND_OF.get(event.kind, str(event.kind))
    record: dict[str, Any] = {
        "type": E.EVENT,
        "kind": kind,
        "event_id": event.event_id,
        "ts": event.time.ToNanoseconds() if event.HasField("time") else 0,
        "user_id": event.user_id if kind != E.INVENTORY else -1,
        "item_id": event.item_id,
        "request_id": event.request_id,
        "position": event.position,
        "surface": _SURFACE_OF.get(event.surface, "?"),
    }
    if kind == E.PURCHASE:
        record["price"] = event.price
        record["quantity"] = event.quantity
    if kind == E.INVENTORY:
        record["stock"] = event.stock
    return record


def feed_record(feed: events_pb2.ServedFeed) -> dict[str, Any]:
    """A ServedFeed as its log record (contract.events); validated by the ingestor."""
    record: dict[str, Any] = {
        "type": E.FEED,
        "request_id": feed.request_id,
        "user_id": feed.user_id,
        "ts": feed.time.ToNanoseconds() if feed.HasField("time") else 0,
        "surface": _SURFACE_OF.get(feed.surface, "?"),
        "items": list(feed.item_ids),
        "positions": list(feed.positions),
        "scores": list(feed.scores),
        "egmv": list(feed.egmv),
        "propensities": list(feed.propensities),
        "reasons": list(feed.reasons),
        "model_version": feed.model_version,
        "arm": feed.arm,
        "experiment": feed.experiment,
        "experiment_arm": feed.experiment_arm,
        "degraded": list(feed.degraded),
        "seen_filtered": feed.seen_filtered,
        "seen_items": feed.seen_items,
        "latency_ms": feed.latency_ms,
        "country": feed.country,
        "device": feed.device,
        "categories": list(feed.categories),
        "new_seller": list(feed.new_seller),
        "prices": list(feed.prices),
        "features": None,
    }
    if feed.HasField("features"):
        m = feed.features
        record["features"] = {
            "schema_hash": m.schema_hash,
            "cols": m.cols,
            "values": list(m.values),
        }
    return record


class EventsServicer(events_pb2_grpc.EventsServiceServicer):
    """LogEvents: bounded batch, per-entry validation by the ingestor, durable append."""

    def __init__(self, ingestor: EventIngestor) -> None:
        self.ingestor = ingestor

    def LogEvents(
        self, request: events_pb2.LogEventsRequest, context: grpc.ServicerContext
    ) -> events_pb2.LogEventsResponse:
        check_range("len(events)", len(request.events), 0, MAX_EVENTS)
        check_range("len(feeds)", len(request.feeds), 0, MAX_FEEDS)
        result = self.ingestor.ingest(
            [event_record(e) for e in request.events], [feed_record(f) for f in request.feeds]
        )
        response = events_pb2.LogEventsResponse(
            accepted=result.accepted, duplicates=result.duplicates
        )
        for rejected in result.rejected:
            response.rejected.add(
                field=rejected.field, index=rejected.index, reason=rejected.reason
            )
        return response
