"""The serving mesh end to end: the four real services on port 0, the tiny preset's Feast store
and registered bundle, real gRPC channels. What a frontend sees: pages per surface, cold
start, hard filters, exploration propensities, bad input refused, schema mismatch refused,
a refused reload that keeps the old model serving, and fallbacks when a hop is down."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest
from homefeed.common.v1 import common_pb2
from homefeed.features.v1 import features_pb2, features_pb2_grpc
from homefeed.feed.v1 import feed_pb2, feed_pb2_grpc
from homefeed.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from contract import columns as C
from feature_repo import schema as S
from training.tables import read_tables

HOME = common_pb2.SURFACE_HOME
CHECKOUT = common_pb2.SURFACE_CHECKOUT
REFRESH_S = 0.2
INVENTORY_PUSH = "item_inventory_push"
ADMIN_TOKEN = "e2e-admin-token"


@dataclass
class Mesh:
    feed: feed_pb2_grpc.FeedServiceStub
    features: features_pb2_grpc.FeaturesServiceStub
    ranking: ranking_pb2_grpc.RankingServiceStub
    ranking_admin: ranking_pb2_grpc.RankingServiceStub
    addresses: dict[str, str]
    users: pd.DataFrame
    items: pd.DataFrame
    dataset: str
    channels: list[grpc.Channel]


def _env(values: dict[str, str]) -> Callable[[], None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)

    def restore() -> None:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    return restore


@pytest.fixture(scope="module")
def mesh(tiny_trained: dict, tiny_dataset: dict, home) -> Iterator[Mesh]:
    from services.features.server import create_server as features_server
    from services.features.settings import FeaturesSettings
    from services.gateway.server import create_server as gateway_server
    from services.gateway.settings import GatewaySettings
    from services.ranking.server import create_admin_server
    from services.ranking.server import create_server as ranking_server
    from services.ranking.settings import RankingSettings
    from services.retrieval.server import create_server as retrieval_server
    from services.retrieval.settings import RetrievalSettings

    dataset = tiny_dataset["dataset"]
    restore = _env(
        {
            "HOMEFEED_DATASET": dataset,
            "HOMEFEED_FEATURES_REFRESH_S": str(REFRESH_S),
            "HOMEFEED_ADMIN_TOKEN": ADMIN_TOKEN,
        }
    )
    servers: list[Any] = []
    closers: list[Callable[[], None]] = []
    channels: list[grpc.Channel] = []
    try:
        addresses: dict[str, str] = {}
        starters: dict[str, Callable[[], tuple[Any, ...]]] = {
            "retrieval": lambda: retrieval_server(RetrievalSettings.from_env()),
            "features": lambda: features_server(FeaturesSettings.from_env()),
            "ranking": lambda: ranking_server(RankingSettings.from_env()),
        }
        for name, start in starters.items():
            built = start()
            server, port = built[0], built[1]
            server.start()
            servers.append(server)
            if hasattr(built[2], "close"):
                closers.append(built[2].close)
            addresses[name] = f"127.0.0.1:{port}"
            if name == "ranking":
                admin, admin_port = create_admin_server(RankingSettings.from_env(), built[2])
                admin.start()
                servers.append(admin)
                admin_address = f"127.0.0.1:{admin_port}"
        restore_addrs = _env(
            {f"HOMEFEED_{n.upper()}_ADDR": a for n, a in addresses.items()}
            | {"HOMEFEED_GATEWAY_EPSILON": "0.1"}
        )
        try:
            server, port, pipeline = gateway_server(GatewaySettings.from_env())
        finally:
            restore_addrs()
        server.start()
        servers.insert(0, server)
        closers.insert(0, pipeline.close)
        addresses["gateway"] = f"127.0.0.1:{port}"
        for address in (*addresses.values(), admin_address):
            channels.append(grpc.insecure_channel(address))
        tables = read_tables(home.raw(dataset), [C.USERS, C.ITEMS])
        yield Mesh(
            feed=feed_pb2_grpc.FeedServiceStub(channels[3]),
            features=features_pb2_grpc.FeaturesServiceStub(channels[1]),
            ranking=ranking_pb2_grpc.RankingServiceStub(channels[2]),
            ranking_admin=ranking_pb2_grpc.RankingServiceStub(channels[4]),
            addresses=addresses,
            users=tables[C.USERS],
            items=tables[C.ITEMS],
            dataset=dataset,
            channels=channels,
        )
    finally:
        for server in servers:
            server.stop(None)
        for close in closers:
            close()
        for channel in channels:
            channel.close()
        restore()


def _request(user_id: int, surface: int = HOME, **kw: Any) -> feed_pb2.GetFeedRequest:
    kw.setdefault("page_size", 20)
    kw.setdefault("request_id", uuid.uuid4().hex)
    return feed_pb2.GetFeedRequest(user_id=user_id, surface=surface, **kw)


def _known_user(mesh: Mesh, k: int = 0) -> int:
    return int(mesh.users[C.USER_ID].iloc[k])


def _check_page(page: feed_pb2.GetFeedResponse, size: int) -> None:
    n = len(page.item_ids)
    assert n == size
    for field in ("positions", "scores", "egmv", "reasons", "propensities"):
        assert len(getattr(page, field)) == n, field
    assert list(page.positions) == list(range(1, n + 1))
    assert len(set(page.item_ids)) == n
    assert all(0 < p <= 1 for p in page.propensities)
    assert all(r != feed_pb2.REASON_UNSPECIFIED for r in page.reasons)


def test_home_feed_end_to_end(mesh: Mesh) -> None:
    user = _known_user(mesh)
    page, call = mesh.feed.GetFeed.with_call(_request(user), timeout=5)
    _check_page(page, 20)
    assert page.model_version and page.arm == "stable" and not page.degraded
    assert page.candidates > 20
    assert np.all(np.asarray(page.egmv) >= 0) and max(page.egmv) > 0
    trailers = dict(call.trailing_metadata() or ())
    stages = dict(kv.split("=") for kv in trailers["hf-stage-ms"].split(";"))
    assert {"retrieval", "features", "ranking", "rerank", "total"} <= set(stages)
    assert all(float(v) >= 0 for v in stages.values())


def test_checkout_never_serves_the_cart(mesh: Mesh) -> None:
    user = _known_user(mesh, 1)
    first = mesh.feed.GetFeed(_request(user), timeout=5)
    cart = list(first.item_ids[:3])
    page = mesh.feed.GetFeed(_request(user, CHECKOUT, cart_item_ids=cart, page_size=10), timeout=5)
    _check_page(page, 10)
    assert not set(cart) & set(page.item_ids)
    assert not page.degraded


def test_cold_start_user_gets_a_whole_page(mesh: Mesh) -> None:
    stranger = int(mesh.users[C.USER_ID].max()) + 10_000
    context = common_pb2.RequestContext(country="DE", device="android")
    page = mesh.feed.GetFeed(_request(stranger, context=context), timeout=5)
    _check_page(page, 20)
    assert not page.degraded and page.model_version


def test_exploration_slots_carry_their_propensity(mesh: Mesh) -> None:
    from homefeed.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

    retrieval = retrieval_pb2_grpc.RetrievalServiceStub(
        grpc.insecure_channel(mesh.addresses["retrieval"])
    )
    explored = []
    for k in range(15):
        request = _request(_known_user(mesh, k), request_id=f"explore-{k}")
        page = mesh.feed.GetFeed(request, timeout=5)
        _check_page(page, 20)
        # the draw the gateway got: the same request id gives retrieval the same seed
        drawn = retrieval.Retrieve(
            retrieval_pb2.RetrieveRequest(
                request_id=request.request_id, user_id=request.user_id, n=500, surface=HOME
            ),
            timeout=5,
        )
        assert drawn.exploration_pool > 10
        for r, p in zip(page.reasons, page.propensities, strict=True):
            if r == feed_pb2.REASON_EXPLORATION:
                # P(the slot explores) / |pool|: epsilon while exploration candidates are left
                assert 0.099 <= p * drawn.exploration_pool <= 0.1 + 1e-6, p
                explored.append(p)
    assert explored, "epsilon = 0.1 over 300 slots explored nothing"
    # the same request id replays the same page (the exploration draw is seeded by it)
    again = [mesh.feed.GetFeed(_request(_known_user(mesh), request_id="same"), timeout=5)]
    again.append(mesh.feed.GetFeed(_request(_known_user(mesh), request_id="same"), timeout=5))
    assert list(again[0].item_ids) == list(again[1].item_ids)


def _push_inventory(home, dataset: str, item_id: int, in_stock: int) -> None:
    from contract.feature_store import open_store

    store = open_store(dataset, paths=home)
    now = pd.Timestamp.now(tz="UTC").as_unit("us")
    store.push(
        INVENTORY_PUSH,
        pd.DataFrame(
            {
                C.ITEM_ID: [item_id],
                S.EVENT_TIMESTAMP: [now],
                "stock": [0 if not in_stock else 100],
                "in_stock": [in_stock],
                S.CREATED: [now],
            }
        ),
    )


def test_an_item_that_runs_out_of_stock_is_never_served(mesh: Mesh, home) -> None:
    user = _known_user(mesh, 2)
    request = _request(user, request_id="stock-check")
    before = mesh.feed.GetFeed(request, timeout=5)
    gone = int(before.item_ids[0])
    _push_inventory(home, mesh.dataset, gone, in_stock=0)
    try:
        deadline = time.monotonic() + 30 * REFRESH_S
        while True:
            after = mesh.feed.GetFeed(request, timeout=5)
            if gone not in after.item_ids:
                break
            assert time.monotonic() < deadline, "an out-of-stock item is still served"
            time.sleep(REFRESH_S / 2)
        for k in range(5):  # nor on any other page
            page = mesh.feed.GetFeed(_request(_known_user(mesh, k)), timeout=5)
            assert gone not in page.item_ids
    finally:
        _push_inventory(home, mesh.dataset, gone, in_stock=1)


@pytest.mark.parametrize(
    ("request_kw", "field"),
    [
        ({"page_size": 0}, "page_size"),
        ({"page_size": 101}, "page_size"),
        ({"surface": common_pb2.SURFACE_UNSPECIFIED}, "surface"),
        ({"surface": 7}, "surface"),
        ({"cart_item_ids": list(range(101))}, "cart"),
        ({"cart_item_ids": [5, -1]}, "cart"),
        ({"user_id": -3}, "user_id"),
        ({"request_id": "x" * 500}, "request_id"),
    ],
)
def test_bad_feed_requests_are_refused_with_the_field_named(
    mesh: Mesh, request_kw: dict, field: str
) -> None:
    kw = {"user_id": _known_user(mesh), "surface": HOME, "page_size": 20} | request_kw
    with pytest.raises(grpc.RpcError) as err:
        mesh.feed.GetFeed(feed_pb2.GetFeedRequest(**kw), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.value.details() or "")


def test_a_schema_hash_mismatch_is_refused_by_features_and_ranking(mesh: Mesh) -> None:
    ids = [int(i) for i in mesh.items[C.ITEM_ID].iloc[:5]]
    with pytest.raises(grpc.RpcError) as err:
        mesh.features.GetFeatures(
            features_pb2.GetFeaturesRequest(
                user_id=_known_user(mesh), item_ids=ids, surface=HOME, schema_hash="0" * 64
            ),
            timeout=5,
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    good = mesh.features.GetFeatures(
        features_pb2.GetFeaturesRequest(user_id=_known_user(mesh), item_ids=ids, surface=HOME),
        timeout=5,
    )
    matrix = common_pb2.FloatMatrix()
    matrix.CopyFrom(good.features)
    matrix.schema_hash = "f" * 64
    with pytest.raises(grpc.RpcError) as err:
        mesh.ranking.Rank(
            ranking_pb2.RankRequest(
                user_id=_known_user(mesh), item_ids=ids, features=matrix, values=list(good.values)
            ),
            timeout=5,
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_refused_reload_keeps_the_serving_model(mesh: Mesh) -> None:
    before = mesh.feed.GetFeed(_request(_known_user(mesh)), timeout=5).model_version
    auth = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    with pytest.raises(grpc.RpcError) as err:
        mesh.ranking_admin.Reload(
            ranking_pb2.ReloadRequest(target="999"), metadata=auth, timeout=30
        )
    assert err.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
    with pytest.raises(grpc.RpcError) as err:
        mesh.ranking_admin.Reload(ranking_pb2.ReloadRequest(target="champion"), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    page = mesh.feed.GetFeed(_request(_known_user(mesh)), timeout=5)
    assert page.model_version == before and not page.degraded


def test_a_dead_hop_degrades_the_page_instead_of_failing_it(mesh: Mesh) -> None:
    from services.gateway.server import create_server
    from services.gateway.settings import GatewaySettings

    dead = "127.0.0.1:1"  # nothing listens on port 1
    restore = _env(
        {
            "HOMEFEED_RETRIEVAL_ADDR": mesh.addresses["retrieval"],
            "HOMEFEED_FEATURES_ADDR": mesh.addresses["features"],
            "HOMEFEED_RANKING_ADDR": dead,
        }
    )
    try:
        server, port, pipeline = create_server(GatewaySettings.from_env())
    finally:
        restore()
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = feed_pb2_grpc.FeedServiceStub(channel)
            page = stub.GetFeed(_request(_known_user(mesh)), timeout=5)
    finally:
        server.stop(None)
        pipeline.close()
    _check_page(page, 20)
    assert list(page.degraded) == [feed_pb2.DEGRADATION_RANKING]
    assert not page.model_version
    assert all(r != feed_pb2.REASON_RANKED for r in page.reasons)
