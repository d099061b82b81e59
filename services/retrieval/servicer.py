"""``homefeed.retrieval.v1.RetrievalService``: request checks, proto <-> numpy."""

# RPC methods carry the proto's names, as the generated base class does.
# ruff: noqa: N802

from __future__ import annotations

import hashlib
import itertools
import logging
from typing import Any

import grpc
import numpy as np
from homefeed.common.v1 import common_pb2
from homefeed.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from services.common.errors import (
    INT64_MAX,
    Unavailable,
    check_context,
    check_ids,
    check_range,
    check_request_id,
    check_surface,
)
from services.common.matrix import extend_packed
from services.common.online import ttl_time
from services.common.users import UserReader, ViewRows, to_proto
from services.retrieval.index import (
    CHECKOUT,
    HOME,
    MAX_CART,
    MAX_EXCLUDE,
    MAX_N,
    CandidateIndex,
    Source,
)
from services.retrieval.users import content_profile, tower_input

log = logging.getLogger(__name__)

_SURFACE_NAME = {common_pb2.SURFACE_HOME: HOME, common_pb2.SURFACE_CHECKOUT: CHECKOUT}
_WARM_UP_USER = 0

for _source in Source:
    if retrieval_pb2.CandidateSource.Value(f"CANDIDATE_SOURCE_{_source.name}") != _source.value:
        raise ImportError(f"index.Source.{_source.name} no longer matches retrieval.proto")


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServiceServicer):
    """Retrieve: validate, read the user's online features, ask the index, respond.

    The exploration draw of a request is seeded from ``(seed, request_id)``, so a request
    id always gets the same candidates (replays and retries agree); requests without an id
    take successive seeds.
    """

    def __init__(self, index: CandidateIndex, users: UserReader, seed: int = 0) -> None:
        self.index = index
        self.users = users
        self.seed = seed
        self._anonymous = itertools.count()

    def rng(self, request_id: str) -> np.random.Generator:
        if request_id:
            digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
            return np.random.default_rng([self.seed, 1, int.from_bytes(digest, "little")])
        return np.random.default_rng([self.seed, 0, next(self._anonymous)])

    def read_user(
        self, user_id: int, at_s: float | None = None
    ) -> tuple[ViewRows, dict[str, Any] | None]:
        """The user's online rows as of ``at_s`` (the request's time, seconds since 1970;
        None: no TTL check; rows past their view's TTL read as missing, as training's join
        reads them) and the tower's input (None for an unknown user); Unavailable when the online
        store cannot be read."""
        try:
            rows = self.users.read(user_id, at_s)
        except Exception as err:
            raise Unavailable(
                f"the online store failed to read user {user_id}: {type(err).__name__}: {err}"
            ) from err
        return rows, tower_input(rows, self.index.tower.spec)

    def warm_up(self) -> None:
        """One read and a few retrievals, so the first request pays no lazy set-up."""
        rows, user = self.read_user(_WARM_UP_USER)
        profile = content_profile(rows)
        cart = self.index.item_ids[:2]
        empty = np.empty(0, dtype=np.int64)
        for who, surface, items in ((user, HOME, empty), (None, CHECKOUT, cart)):
            self.index.retrieve(
                who, 50, items, surface, items, "", "", self.rng("warm-up"), profile=profile
            )

    def Retrieve(
        self, request: retrieval_pb2.RetrieveRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.RetrieveResponse:
        check_request_id(request.request_id)
        user_id = check_range("user_id", request.user_id, 0, INT64_MAX)
        n = check_range("n", request.n, 1, MAX_N)
        exclude = check_ids("exclude_item_ids", request.exclude_item_ids, max_len=MAX_EXCLUDE)
        cart = check_ids("cart_item_ids", request.cart_item_ids, max_len=MAX_CART)
        surface = _SURFACE_NAME[check_surface(request.surface)]
        when = check_context(request.context)

        rows, user = self.read_user(user_id, ttl_time(when))
        found = self.index.retrieve(
            user,
            n,
            exclude,
            surface,
            cart,
            request.context.country,
            request.context.device,
            self.rng(request.request_id),
            user_id=user_id,
            profile=content_profile(rows),
        )
        response = retrieval_pb2.RetrieveResponse(
            known_user=found.known_user,
            model_version=self.index.version,
            exploration_pool=found.exploration_pool,
        )
        response.item_ids.extend(found.item_ids.tolist())
        extend_packed(response, "scores", found.scores)
        extend_packed(response, "sources", found.sources)
        extend_packed(response, "propensities", found.propensities)
        if request.include_user_features:
            response.user.CopyFrom(to_proto(rows))
        return response
