"""The retrieval service: the core on a hand-made index (no ScaNN, no Feast, no gRPC), then
the core and a real server on port 0 over the bundle ``tiny_trained`` registered and the
``tiny_dataset`` Feast store (SQLite, materialized), over real channels.

Expected candidates are computed here without ``services/``: the user's features from
``store.get_online_features`` with ``feature_repo.schema.DEFAULTS`` filled by hand, the
affinity lists bucketed by ``contract.affinity.buckets_one``, the bundle's numpy tower,
and brute-force inner products (ANN) or cosines (CONTENT) over the bundle's
``item_embeddings.npy``.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from homefeed.common.v1 import common_pb2
from homefeed.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

from contract import affinity, content
from contract import bundle as B
from contract import columns as C
from contract.catalog import Catalog
from contract.features import NEW_SELLER_DAYS
from contract.paths import REPO_ROOT, Paths
from contract.popular import PopularityLists
from contract.tower import InputSpec, UserTower, value_columns
from feature_repo import schema as S
from services.common.bundles import BundleRef
from services.common.errors import FailedPrecondition
from services.common.settings import ServerSettings, SettingsError
from services.common.users import (
    USER_VIEWS,
    ProviderUserReader,
    SqliteUserReader,
    ViewRows,
    open_user_reader,
)
from services.retrieval.index import (
    CHECKOUT,
    HOME,
    MATVEC_ROWS,
    CandidateIndex,
    Candidates,
    IdRows,
    RetrievalConfig,
    Source,
    matvec,
)
from services.retrieval.server import SERVICE_NAME, StartupError, create_server
from services.retrieval.settings import RetrievalSettings
from services.retrieval.users import (
    check_spec,
    tower_input,
)
from training.retrieval.features import user_input_spec
from training.tables import read_tables

pytestmark = pytest.mark.timeout(180)

TIMEOUT_S = 10.0
UNKNOWN_USER = 10**9
ANN, POP, CONTENT, EXPLORE, HIST, PROF = (int(s) for s in Source)


# --- the core on a hand-made index ----------------------------------------------------------

# 12 items, ids 10..21: row i < 11 at angle ANGLES[i] degrees with norm 10 - i/2, so their
# inner products with (1, 0) fall with i; row 11 (id 21) is short, at 47 degrees.
ANGLES = [0, 7, 15, 24, 33, 45, 50, 62, 71, 80, 90]
IDS = np.arange(10, 22, dtype=np.int64)
EMB = np.array(
    [
        *[
            (10 - i / 2) * np.array([math.cos(math.radians(a)), math.sin(math.radians(a))])
            for i, a in enumerate(ANGLES)
        ],
        0.5 * np.array([math.cos(math.radians(47)), math.sin(math.radians(47))]),
    ],
    dtype=np.float32,
)
USER_Q = np.array([1.0, 0.0], dtype=np.float32)
BY_DOT = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 21, 20]  # ids by inner product with USER_Q
POPULAR: dict[str, Any] = {
    "overall": [21, 20, 19, 18],
    "segments": {"US/ios": [13, 99, 12, 13, 11, 10]},  # 99: not in the bundle; 13 repeated
}
SPEC = InputSpec(("clicks_30d",), (("country", ("US", "DE")),), affinity.BUCKETS, 2)
USER = {"clicks_30d": 3, "country": "US", affinity.BUCKETS: np.array([0.5, 0.5])}
NONE = np.empty(0, dtype=np.int64)


class BruteSearcher:
    """ScaNN's ``search(q, k, reorder, leaves)`` by brute force, answering at most ``cap``."""

    def __init__(self, embeddings: np.ndarray, cap: int | None = None) -> None:
        self.embeddings = embeddings
        self.cap = cap
        self.calls: list[int] = []

    def search(self, q: np.ndarray, k: int, reorder: int, leaves: int) -> tuple[Any, Any]:
        self.calls.append(k)
        scores = self.embeddings @ q
        top = np.argsort(-scores, kind="stable")[: min(k, self.cap or k)]
        return top.astype(np.int32), scores[top]


def constant_tower(vector: np.ndarray) -> UserTower:
    """A tower whose output is ``vector`` whatever the user (zero weights, that bias)."""
    width = len(SPEC.input_names)
    return UserTower(
        spec=SPEC,
        mean=np.zeros(width),
        std=np.ones(width),
        weights=(np.zeros((width, len(vector))),),
        biases=(vector.astype(np.float64),),
    )


# The PROFILE source's catalogue: content in 2-d at these angles (degrees) for ids 10..21 and
# prices (margins 1); id 12 is not in the catalogue. Along the profile (0, 1) the scores
# 4 cos + log(price x margin) rank 15 (6.46: 4 cos 30 + 3), 10 (4.0), 21 (3.998), 11, 18, 20,
# 17, 14, 19, 16, 13; 12 would be second.
PROFILE_ANGLES = [90, 80, 85, 0, 30, 60, 10, 45, 70, 20, 50, 88]
PROFILE_PRICES = [1.0] * 5 + [math.e**3] + [1.0] * 6
PROFILE = np.array([0.0, 1.0], dtype=np.float32)
BY_PROFILE = [15, 10, 21, 11, 18, 20, 17, 14, 19, 16, 13]


def profile_catalog(content: bool = True) -> Catalog:
    listed = [i for i in range(len(IDS)) if IDS[i] != 12]
    rad = np.radians(np.array(PROFILE_ANGLES, dtype=np.float64))
    vectors = np.stack([np.cos(rad), np.sin(rad)], axis=1) * (1 + np.arange(len(IDS)))[:, None]
    return Catalog.from_columns(
        item_ids=IDS[listed],
        seller_ids=np.zeros(len(listed), np.int64),
        categories=np.zeros(len(listed), np.int64),
        prices=np.array(PROFILE_PRICES)[listed],
        margins=np.ones(len(listed)),
        content=vectors[listed].astype(np.float32) if content else None,
    )


def profile_scores(ids: list[int]) -> np.ndarray:
    """Each item's PROFILE score along PROFILE, by hand in float64."""
    rad = np.radians(np.array(PROFILE_ANGLES, dtype=np.float64))[np.array(ids) - 10]
    return 4 * np.sin(rad) + np.log(np.array(PROFILE_PRICES)[np.array(ids) - 10])


def handmade(
    pool: list[int] | None = None,
    cap: int | None = None,
    popular: dict[str, Any] = POPULAR,
    catalog: Catalog | None = None,
    embeddings: np.ndarray = EMB,
    user_q: np.ndarray = USER_Q,
    value_columns: int = 0,
    **config: Any,
) -> CandidateIndex:
    return CandidateIndex(
        item_ids=IDS,
        embeddings=embeddings,
        searcher=BruteSearcher(embeddings, cap),
        tower=constant_tower(user_q),
        popular_lists=PopularityLists.from_json(popular),
        pool_ids=np.array(pool or [], dtype=np.int64),
        reorder=4,
        version="7",
        bundle_version="handmade",
        # the PROFILE source is off by default in serving; these tests exercise it at 0.5
        config=RetrievalConfig(**{"exploration": 0, "profile_share": 0.5, **config}),
        catalog=catalog,
        value_columns=value_columns,
    )


def retrieve(
    index: CandidateIndex,
    user: dict[str, Any] | None = USER,
    n: int = 5,
    exclude: list[int] | None = None,
    surface: str = HOME,
    cart: list[int] | None = None,
    country: str = "US",
    device: str = "ios",
    seed: int = 0,
    profile: Any = None,
    user_id: int | None = None,
) -> Candidates:
    return index.retrieve(
        user,
        n,
        np.array(exclude or [], dtype=np.int64),
        surface,
        np.array(cart or [], dtype=np.int64),
        country,
        device,
        np.random.default_rng(seed),
        user_id=user_id,
        profile=profile,
    )


def cosine_to(item_id: int) -> np.ndarray:
    unit = EMB / np.linalg.norm(EMB, axis=1, keepdims=True)
    return unit @ unit[item_id - 10]


def assert_well_formed(found: Candidates, n: int, banned: set[int]) -> None:
    ids = found.item_ids.tolist()
    assert len(ids) <= n
    assert len(set(ids)) == len(ids)
    assert not banned & set(ids)
    assert len(found.scores) == len(found.sources) == len(found.propensities) == len(ids)


def test_a_known_user_gets_the_nearest_items_with_their_inner_products() -> None:
    found = retrieve(handmade(), n=5)
    assert found.item_ids.tolist() == BY_DOT[:5]
    np.testing.assert_allclose(found.scores, EMB[:5] @ USER_Q, rtol=1e-6)
    assert (found.sources == ANN).all() and (found.propensities == 0).all()
    assert found.known_user
    assert found.item_ids.dtype == np.int64 and found.scores.dtype == np.float32


def test_excluded_and_cart_items_never_appear_and_the_search_grows_past_them() -> None:
    index = handmade(search_margin=0)
    found = retrieve(index, n=5, exclude=[10, 11, 12, 999], cart=[13])
    assert found.item_ids.tolist() == BY_DOT[4:9]
    assert index.searcher.calls[0] == 5 and len(index.searcher.calls) > 1
    assert_well_formed(found, 5, {10, 11, 12, 13})


def test_history_comes_first_capped_by_its_share_then_the_tower_fills() -> None:
    from training.retrieval.history import build_history

    past = build_history(
        np.array([7, 7, 7, 8]), np.array([17, 16, 999, 12]), np.array([1, 2, 3, 4])
    )
    index = handmade(history_share=0.4)
    index.history = past
    found = index.retrieve(
        USER, 5, np.array([16]), HOME, np.array([], np.int64), "US", "ios",
        np.random.default_rng(0), user_id=7,
    )  # fmt: skip
    # 999 is not listed and 16 is excluded: 17 is the history; the tower fills the rest
    assert found.item_ids.tolist() == [17, *[i for i in BY_DOT if i not in (16, 17)][:4]]
    assert found.sources.tolist() == [HIST, ANN, ANN, ANN, ANN]
    np.testing.assert_allclose(found.scores[0], EMB[17 - 10] @ USER_Q, rtol=1e-6)
    capped = index.retrieve(
        USER, 5, np.array([], np.int64), HOME, np.array([], np.int64), "US", "ios",
        np.random.default_rng(0), user_id=7,
    )  # fmt: skip
    assert capped.sources.tolist().count(HIST) == 2  # ceil(0.4 x 5)
    stranger = index.retrieve(
        None, 3, np.array([], np.int64), HOME, np.array([], np.int64), "US", "ios",
        np.random.default_rng(0), user_id=8,
    )  # fmt: skip
    assert stranger.item_ids[0] == 12 and stranger.sources[0] == HIST and stranger.scores[0] == 0
    assert_well_formed(found, 5, {16})


def test_profile_candidates_follow_the_history_by_their_profile_score_then_the_tower() -> None:
    index = handmade(catalog=profile_catalog())
    assert index.profile is not None and index.profile.dim == 2
    found = retrieve(index, n=6, profile=PROFILE)
    # ceil(0.5 x 6) = 3 best by 4 cos + log value (never 12: the catalogue does not list it)
    assert found.item_ids.tolist() == [
        *BY_PROFILE[:3],
        *[i for i in BY_DOT if i not in BY_PROFILE[:3]][:3],
    ]
    assert found.sources.tolist() == [PROF] * 3 + [ANN] * 3
    np.testing.assert_allclose(found.scores[:3], profile_scores(BY_PROFILE[:3]), rtol=1e-5)
    assert (found.propensities == 0).all()
    assert_well_formed(found, 6, set())
    # the share: ceil(0.2 x 6) = 2; 0 turns the source off; 1 takes every slot it can
    catalog = profile_catalog()
    shared = retrieve(handmade(catalog=catalog, profile_share=0.2), n=6, profile=PROFILE)
    assert shared.sources.tolist() == [PROF] * 2 + [ANN] * 4
    off = retrieve(handmade(catalog=catalog, profile_share=0.0), n=6, profile=PROFILE)
    assert off.item_ids.tolist() == BY_DOT[:6]
    every = retrieve(handmade(catalog=catalog, profile_share=1.0), n=20, profile=PROFILE)
    assert every.item_ids.tolist() == [*BY_PROFILE, 12]  # all 11 listed, then the tower's 12
    assert every.sources.tolist() == [PROF] * 11 + [ANN]


def test_profile_candidates_skip_excluded_cart_out_of_stock_and_history_items() -> None:
    from training.retrieval.history import build_history

    index = handmade(catalog=profile_catalog(), history_share=0.4)
    in_stock = np.ones(index.size, dtype=bool)
    in_stock[index.rows_of(np.array([11]))] = False
    index.stock = lambda: in_stock
    index.history = build_history(np.array([7, 7]), np.array([18, 16]), np.array([2, 1]))
    found = retrieve(index, n=10, exclude=[15], cart=[10], profile=PROFILE, user_id=7)
    # history: 18, 16 (ceil(0.4 x 10) = 4 at most); profile: ceil(0.5 x 10) = 5 of
    # BY_PROFILE minus 15 (excluded), 10 (cart), 11 (out of stock), 18 (history)
    assert found.item_ids.tolist() == [18, 16, 21, 20, 17, 14, 19, 12, 13]  # 9 not blocked
    assert found.sources.tolist() == [HIST, HIST] + [PROF] * 5 + [ANN] * 2
    assert not {15, 10, 11} & set(found.item_ids.tolist())
    assert_well_formed(found, 10, {15, 10, 11})
    # history and profile together never take more than the slots there are: min(n - m -
    # placed, ceil(share x (n - m))); exploration's m slots stay free
    tight = retrieve(index, n=3, profile=PROFILE, user_id=7)  # 2 history, then 1 (not 2)
    assert tight.item_ids.tolist() == [18, 16, 15] and tight.sources.tolist() == [HIST, HIST, PROF]
    explore = handmade(catalog=profile_catalog(), pool=[17, 19], exploration=2)
    drawn = retrieve(explore, n=8, profile=PROFILE)  # ceil(0.5 x 6) = 3, then ANN to 6
    assert drawn.sources.tolist() == [PROF] * 3 + [ANN] * 3 + [EXPLORE] * 2
    assert drawn.item_ids[:6].tolist() == [*BY_PROFILE[:3], 11, 12, 13]
    assert set(drawn.item_ids[6:].tolist()) == {17, 19}


def test_no_profile_candidates_without_a_usable_profile_or_catalogue_content() -> None:
    with_content = handmade(catalog=profile_catalog())
    for unusable in (None, np.zeros(0, np.float32), np.zeros(2), np.ones(3), [np.nan, 1.0]):
        found = retrieve(with_content, n=6, profile=unusable)
        assert found.item_ids.tolist() == BY_DOT[:6] and PROF not in found.sources, unusable
    for index in (handmade(), handmade(catalog=profile_catalog(content=False))):
        assert index.profile is None
        found = retrieve(index, n=6, profile=PROFILE)
        assert found.item_ids.tolist() == BY_DOT[:6] and PROF not in found.sources
    # an unknown user with a profile: the profile's items, then their context's popularity
    stranger = retrieve(with_content, user=None, n=5, profile=PROFILE)
    assert stranger.sources.tolist() == [PROF] * 3 + [POP] * 2
    assert stranger.item_ids.tolist() == [*BY_PROFILE[:3], 13, 12]  # US/ios list minus 10
    with pytest.raises(ValueError, match=r"profile_share must be in \[0, 1\], got 1.5"):
        RetrievalConfig(profile_share=1.5)


def test_a_short_index_answer_is_padded_with_popularity() -> None:
    found = retrieve(handmade(cap=2), n=5)
    assert found.item_ids.tolist() == [10, 11, 13, 12]  # US/ios list, 11 and 10 taken
    assert found.sources.tolist() == [ANN, ANN, POP, POP]
    np.testing.assert_allclose(found.scores[2:], -np.log1p([0, 2]), rtol=1e-6)


def test_an_unknown_user_gets_the_segment_list_with_rank_scores() -> None:
    found = retrieve(handmade(), user=None, n=4, exclude=[12])
    assert not found.known_user
    assert found.item_ids.tolist() == [13, 11, 10]  # 99 unknown, 13 once, 12 excluded
    np.testing.assert_allclose(found.scores, -np.log1p([0, 4, 5]), rtol=1e-6)
    assert found.scores[0] == 0.0 and not np.signbit(found.scores[0])
    assert (found.sources == POP).all()
    other = retrieve(handmade(), user=None, n=3, country="", device="")
    assert other.item_ids.tolist() == POPULAR["overall"][:3]


def test_the_popularity_list_is_the_segments_else_the_countrys_else_the_global_one() -> None:
    index = handmade(popular={**POPULAR, "format": 2, "countries": {"GB": [17, 16, 15]}})

    def unknown_user(country: str, device: str) -> list[int]:
        return retrieve(index, None, 3, country=country, device=device).item_ids.tolist()

    assert unknown_user("US", "ios") == [13, 12, 11]
    for device in ("ios", "unknown"):  # GB has no segment of its own: its country's list
        assert unknown_user("GB", device) == [17, 16, 15]
    for country, device in (("JP", "ios"), ("US", "web"), ("", "")):  # never seen: global
        assert unknown_user(country, device) == POPULAR["overall"][:3]


def test_popular_json_of_an_old_bundle_loads_and_a_newer_format_is_refused(tmp_path) -> None:
    # format 1 (before the dataset's own segments): no format, no countries; an empty
    # segment list (a click-only build of a purchase-only log) reads the global list
    old = tmp_path / "popular.json"
    old.write_text(json.dumps({"k": 3, "overall": [5, 6, 7], "segments": {"US/web": []}}))
    lists = PopularityLists.load(old)
    assert lists.countries == {} and lists.lookup("US", "web").tolist() == [5, 6, 7]
    with pytest.raises(ValueError, match=r"format 3; this reader understands formats 1\.\.2"):
        PopularityLists.from_json({**POPULAR, "format": 3})
    with pytest.raises(ValueError, match=r"countries\['GB'\] must be a list"):
        PopularityLists.from_json({**POPULAR, "countries": {"GB": [1, -1]}})


def test_checkout_puts_cart_similar_items_first_then_the_user_part() -> None:
    found = retrieve(handmade(), n=6, surface=CHECKOUT, cart=[15], exclude=[15])
    cos = cosine_to(15)
    content = [21, 16, 14]  # 2, 5 and 12 degrees from the cart item at 45
    assert found.item_ids.tolist() == [*content, 10, 11, 12]
    assert found.sources.tolist() == [CONTENT] * 3 + [ANN] * 3
    np.testing.assert_allclose(found.scores[:3], cos[np.array(content) - 10], rtol=1e-5)
    assert_well_formed(found, 6, {15})

    shared = retrieve(handmade(checkout_content_share=0.2), n=6, surface=CHECKOUT, cart=[15])
    assert shared.sources.tolist() == [CONTENT, CONTENT, ANN, ANN, ANN, ANN]  # ceil(1.2)
    assert 15 not in shared.item_ids  # the cart is excluded even when not listed in exclude


def test_a_value_column_moves_the_user_part_but_not_the_carts_neighbours() -> None:
    """With the bundle's value column (``contract.tower.with_value_column``) the user part
    ranks by taste + weight x log value, and the cart's neighbours by the taste's angle
    alone: the same as without the column."""
    value = np.zeros(len(IDS), dtype=np.float32)
    value[IDS == 20] = 100.0  # last by taste alone (BY_DOT), first with the value column
    emb = np.hstack([EMB, value[:, None]])
    valued_q = np.append(USER_Q, 1.0).astype(np.float32)
    index = handmade(embeddings=emb, user_q=valued_q, value_columns=1, profile_share=0.0)
    home = retrieve(index, n=3)
    assert home.item_ids.tolist() == [20, 10, 11]
    plain = retrieve(handmade(profile_share=0.0), n=6, surface=CHECKOUT, cart=[15], exclude=[15])
    valued = retrieve(index, n=6, surface=CHECKOUT, cart=[15], exclude=[15])
    assert valued.item_ids[:3].tolist() == plain.item_ids[:3].tolist() == [21, 16, 14]
    np.testing.assert_allclose(valued.scores[:3], plain.scores[:3], rtol=1e-6)
    assert valued.item_ids[3] == 20  # the user part: the valued item first
    with pytest.raises(B.BundleError, match="value columns"):
        handmade(value_columns=2)


def test_checkout_without_a_cart_and_home_with_one_serve_the_user_part() -> None:
    empty = retrieve(handmade(), n=4, surface=CHECKOUT)
    assert empty.item_ids.tolist() == BY_DOT[:4] and (empty.sources == ANN).all()
    home = retrieve(handmade(), n=4, surface=HOME, cart=[10])
    assert home.item_ids.tolist() == BY_DOT[1:5] and (home.sources == ANN).all()
    unknown = retrieve(handmade(), user=None, n=4, surface=CHECKOUT, cart=[15])
    assert unknown.sources.tolist() == [CONTENT, CONTENT, POP, POP]


def test_exploration_draws_from_the_pool_with_its_inclusion_probability() -> None:
    index = handmade(pool=[17, 18, 19, 20, 21, 999], exploration=2)
    found = retrieve(index, n=6)
    assert found.item_ids[:4].tolist() == BY_DOT[:4]
    assert found.sources.tolist() == [ANN] * 4 + [EXPLORE] * 2
    assert set(found.item_ids[4:].tolist()) <= {17, 18, 19, 20, 21}
    np.testing.assert_allclose(found.propensities, [0, 0, 0, 0, 0.4, 0.4])  # 2 of 5
    assert (found.scores[4:] == 0).all()
    assert index.exploration_pool_size == 5


def test_exploration_is_uniform_over_the_eligible_items() -> None:
    index = handmade(pool=[12, 17, 18, 19, 20, 21], exploration=2)
    runs = 4000
    counts: dict[int, int] = {}
    for seed in range(runs):
        found = retrieve(index, n=6, exclude=[20], seed=seed)
        drawn = found.item_ids[found.sources == EXPLORE].tolist()
        assert len(drawn) == 2 and len(set(found.item_ids.tolist())) == 6
        np.testing.assert_allclose(found.propensities[4:], 0.5)  # 2 of {17, 18, 19, 21}
        for item in drawn:
            counts[item] = counts.get(item, 0) + 1
    assert set(counts) == {17, 18, 19, 21}  # 12 is ranked, 20 excluded
    for item, c in counts.items():
        assert abs(c / runs - 0.5) < 0.035, (item, c / runs)


def test_the_draw_is_a_uniform_ordering_and_reports_its_pool() -> None:
    """Exploration candidates come in a uniformly random order of the eligible pool (the
    gateway takes them in that order), and the response says how large the pool was."""
    index = handmade(pool=[17, 18, 19, 20, 21], exploration=2)
    runs = 5000
    first: Counter[int] = Counter()
    for seed in range(runs):
        found = retrieve(index, n=6, seed=seed)
        assert found.exploration_pool == 5
        first[int(found.item_ids[found.sources == EXPLORE][0])] += 1
    assert set(first) == {17, 18, 19, 20, 21}
    for item, c in first.items():
        assert abs(c / runs - 0.2) < 0.03, (item, c / runs)


def test_out_of_stock_items_are_never_retrieved_nor_drawn() -> None:
    index = handmade(pool=[17, 18, 19, 20, 21], exploration=2)
    in_stock = np.ones(index.size, dtype=bool)
    out = [BY_DOT[0], 18, 19]
    in_stock[index.rows_of(np.array(out))] = False
    index.stock = lambda: in_stock
    for seed in range(200):
        found = retrieve(index, n=6, seed=seed)
        assert not set(out) & set(found.item_ids.tolist())
        assert found.exploration_pool == 3  # 17, 20, 21
    assert retrieve(index, n=6).item_ids[:4].tolist() == BY_DOT[1:5]


def test_a_small_pool_gives_its_slots_back_to_the_ranked_candidates() -> None:
    index = handmade(pool=[17], exploration=2)  # 17 is ranked 8th: a reserve candidate
    found = retrieve(index, n=8)
    assert found.item_ids.tolist() == [*BY_DOT[:7], 17]
    assert found.sources.tolist() == [ANN] * 7 + [EXPLORE]
    assert found.propensities[-1] == 1.0
    inside = retrieve(handmade(pool=[10], exploration=2), n=8)  # ranked among the first 6
    assert inside.item_ids.tolist() == BY_DOT[:8] and (inside.propensities == 0).all()
    one = retrieve(handmade(pool=[17, 18], exploration=2), n=1)  # at most half of n
    assert one.item_ids.tolist() == [10] and one.sources.tolist() == [ANN]


def test_n_beyond_the_catalog_returns_every_listed_item_once() -> None:
    found = retrieve(handmade(pool=[20, 21], exploration=3), n=50, exclude=[11])
    assert sorted(found.item_ids.tolist()) == sorted(set(IDS.tolist()) - {11})
    assert (found.sources == ANN).all()  # the pool's items were all ranked already


def test_matvec_in_blocks_equals_the_product() -> None:
    rng = np.random.default_rng(1)
    matrix = rng.normal(size=(2 * MATVEC_ROWS + 5, 4)).astype(np.float32)
    vector = rng.normal(size=4).astype(np.float32)
    got = matvec(matrix, vector)
    assert got.dtype == np.float32 and got.shape == (len(matrix),)
    np.testing.assert_allclose(got, matrix @ vector, rtol=1e-5, atol=1e-6)


def test_id_rows_maps_dense_and_sparse_ids() -> None:
    dense = IdRows(np.array([4, 2, 0, 9], dtype=np.int64))
    sparse = IdRows(np.array([10**12, 5, 10**15], dtype=np.int64))
    assert dense.table is not None and sparse.table is None
    query = np.array([9, 0, 3, -1, 10**6, 2], dtype=np.int64)
    assert dense(query).tolist() == [3, 2, -1, -1, -1, 1]
    query = np.array([10**15, 6, 5, 10**12, 10**16], dtype=np.int64)
    assert sparse(query).tolist() == [2, -1, 1, 0, -1]
    with pytest.raises(ValueError, match="unique"):
        IdRows(np.array([3, 1, 3], dtype=np.int64))


def test_tower_input_fills_training_defaults_and_knows_unknown_users() -> None:
    spec = user_input_spec(3)
    check_spec(spec, n_categories=3)  # training's spec is what serving takes
    assert spec.vector == affinity.BUCKETS and S.AFFINITY_TOTAL in spec.numeric
    assert (
        tower_input({S.USER_PROFILE: None, S.USER_RECENT_ACTIVITY: {"views_24h": 2}}, spec) is None
    )
    got = tower_input(
        {
            S.USER_PROFILE: {"country": "DE", "clicks_30d": 4, "recency_days": None},
            S.USER_CATEGORY_AFFINITY: None,
            S.USER_RECENT_ACTIVITY: None,
        },
        spec,
    )
    assert got is not None
    assert set(got) == set(spec.feature_names)
    assert (got["country"], got["device"], got["clicks_30d"]) == ("DE", "unknown", 4)
    assert got["recency_days"] == 365.0 and got["views_24h"] == 0
    assert got[S.AFFINITY_TOTAL] == 0  # no affinity row: no engagement
    np.testing.assert_allclose(got[affinity.BUCKETS], [1 / 3] * 3, rtol=1e-6)
    spec.encode_one(got)  # the tower takes it


def test_tower_input_buckets_the_users_affinity_lists() -> None:
    s = affinity.PRIOR_STRENGTH
    rows: dict[str, dict[str, Any] | None] = {
        S.USER_PROFILE: {"country": "US"},
        S.USER_CATEGORY_AFFINITY: {
            S.AFFINITY_CATEGORIES: [2, 0],
            S.AFFINITY_WEIGHTS: [5.0, 1.0],
            S.AFFINITY_TOTAL: 8.0,  # 2 more on categories beyond the lists
        },
    }
    got = tower_input(rows, user_input_spec(3))
    assert got is not None and got[S.AFFINITY_TOTAL] == 8.0
    want = [(1 + s / 3) / (8 + s), (s / 3) / (8 + s), (5 + s / 3) / (8 + s)]
    np.testing.assert_allclose(got[affinity.BUCKETS], want, rtol=1e-6)
    # a catalog wider than MAX_BUCKETS: category c goes to bucket c % MAX_BUCKETS
    wide = user_input_spec(affinity.MAX_BUCKETS + 10)
    assert wide.vector_dim == affinity.MAX_BUCKETS
    rows[S.USER_CATEGORY_AFFINITY] = {
        S.AFFINITY_CATEGORIES: [affinity.MAX_BUCKETS + 3, 3, 7],
        S.AFFINITY_WEIGHTS: [2.0, 1.0, 4.0],
        S.AFFINITY_TOTAL: 7.0,
    }
    got = tower_input(rows, wide)
    assert got is not None and got[affinity.BUCKETS].shape == (affinity.MAX_BUCKETS,)
    prior = s / affinity.MAX_BUCKETS
    assert got[affinity.BUCKETS][3] == pytest.approx((3 + prior) / (7 + s), rel=1e-6)
    assert got[affinity.BUCKETS][7] == pytest.approx((4 + prior) / (7 + s), rel=1e-6)
    assert got[affinity.BUCKETS][0] == pytest.approx(prior / (7 + s), rel=1e-6)
    # lists with nulls for a total (Redis's row of nulls) read as no engagement
    rows[S.USER_CATEGORY_AFFINITY] = dict.fromkeys(S.FEATURES[S.USER_CATEGORY_AFFINITY])
    got = tower_input(rows, user_input_spec(3))
    assert got is not None
    np.testing.assert_allclose(got[affinity.BUCKETS], [1 / 3] * 3, rtol=1e-6)
    rows[S.USER_CATEGORY_AFFINITY] = {S.AFFINITY_CATEGORIES: [1, 2], S.AFFINITY_WEIGHTS: [1.0]}
    with pytest.raises(FailedPrecondition, match=r"not aligned: 2 categories, 1 weights"):
        tower_input(rows, user_input_spec(3))


def test_check_spec_refuses_unknown_features_and_a_dense_affinity_bundle() -> None:
    spec = user_input_spec(3)
    with pytest.raises(FailedPrecondition, match=r"reads \['shoe_size'\]"):
        check_spec(replace(spec, numeric=(*spec.numeric, "shoe_size")))
    # a list is no scalar input
    with pytest.raises(FailedPrecondition, match=r"reads \['affinity_weights'\]"):
        check_spec(replace(spec, numeric=(*spec.numeric, S.AFFINITY_WEIGHTS)))
    # a bundle trained on the dense vector (one entry per category)
    old = replace(spec, vector="category_affinity")
    with pytest.raises(FailedPrecondition, match=r"reads the vector 'category_affinity'.*retrain"):
        check_spec(old)
    with pytest.raises(FailedPrecondition, match=r"reads the vector 'affinity_total'"):
        check_spec(replace(spec, vector=S.AFFINITY_TOTAL))
    with pytest.raises(FailedPrecondition, match=r"has 3 entries, expected 5"):
        check_spec(spec, n_categories=5)
    with pytest.raises(FailedPrecondition, match=r"has 300 entries, expected 1\.\.256"):
        check_spec(replace(spec, vector_dim=300))
    check_spec(user_input_spec(1000), n_categories=1000)  # 256 buckets


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("HOMEFEED_RETRIEVAL_") or name in (
            "HOMEFEED_DATASET",
            "HOMEFEED_ONLINE_STORE",
            "HOMEFEED_REDIS",
            "HOMEFEED_MODEL",
            "HOMEFEED_BUNDLE_DIR",
            "HOMEFEED_MODEL_CACHE",
            "MLFLOW_TRACKING_URI",
        ):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOMEFEED_HOME", str(tmp_path))
    s = RetrievalSettings.from_env()
    assert (s.dataset, s.online_store, s.source.model, s.source.bundle_dir) == (
        "sim-small",
        "sqlite",
        "champion",
        None,
    )
    assert (s.exploration, s.checkout_content_share, s.seed) == (10, 0.5, 0)
    assert (s.config.history_share, s.config.profile_share) == (0.4, 0.0)  # profile: off
    assert s.source.model_cache == tmp_path.resolve() / "artifacts" / "model_cache"
    assert "HOMEFEED_RETRIEVAL_MODEL" in s.source.describe()

    monkeypatch.setenv("HOMEFEED_RETRIEVAL_BUNDLE_DIR", str(tmp_path / "b"))
    monkeypatch.setenv("HOMEFEED_RETRIEVAL_EXPLORATION", "0")
    monkeypatch.setenv("HOMEFEED_RETRIEVAL_PROFILE_SHARE", "0.25")
    s = RetrievalSettings.from_env()
    assert s.source.bundle_dir == (tmp_path / "b").resolve() and s.config.exploration == 0
    assert s.config.profile_share == 0.25

    for name, value, message in [
        ("HOMEFEED_RETRIEVAL_EXPLORATION", "-1", "HOMEFEED_RETRIEVAL_EXPLORATION must be 0..1000"),
        ("HOMEFEED_RETRIEVAL_EXPLORATION", "ten", "HOMEFEED_RETRIEVAL_EXPLORATION must be an int"),
        ("HOMEFEED_RETRIEVAL_CHECKOUT_CONTENT_SHARE", "1.5", "CHECKOUT_CONTENT_SHARE must be in"),
        ("HOMEFEED_RETRIEVAL_PROFILE_SHARE", "-0.1", "PROFILE_SHARE must be in \\[0, 1\\]"),
        ("HOMEFEED_ONLINE_STORE", "redis", "HOMEFEED_REDIS is required"),
        ("HOMEFEED_ONLINE_STORE", "dynamo", "HOMEFEED_ONLINE_STORE must be one of sqlite, redis"),
    ]:
        with monkeypatch.context() as patch:
            patch.setenv(name, value)
            with pytest.raises(SettingsError, match=message):
                RetrievalSettings.from_env()


# --- the real bundle and Feast store ---------------------------------------------------------


@dataclass(frozen=True)
class Truth:
    """What the tests compare with, built without ``services/``."""

    store: Any  # feast.FeatureStore
    tower: UserTower
    item_ids: np.ndarray
    embeddings: np.ndarray
    popular: dict[str, Any]
    known_users: list[int]
    items: pd.DataFrame  # raw catalog, indexed by item id
    sellers: pd.DataFrame
    value_columns: int  # the embeddings' last columns that hold the value (contract.tower)

    @property
    def taste(self) -> np.ndarray:
        """The embeddings without the value column: what a cart's neighbours are by."""
        return self.embeddings[:, : self.embeddings.shape[1] - self.value_columns]

    def query(self, user_id: int) -> np.ndarray:
        """The user's tower vector from ``get_online_features`` with defaults filled here."""
        got = self.store.get_online_features(
            features=S.feature_refs(USER_VIEWS), entity_rows=[{"user_id": user_id}]
        ).to_dict()
        spec = self.tower.spec
        features: dict[str, Any] = {}
        for name in spec.numeric:
            value = got[name][0]
            features[name] = S.DEFAULTS.get(name, 0) if value is None else value
        for name, _ in spec.categorical:
            value = got[name][0]
            features[name] = S.DEFAULTS.get(name, "unknown") if value is None else value
        assert spec.vector == affinity.BUCKETS
        total = got[S.AFFINITY_TOTAL][0]
        features[spec.vector] = affinity.buckets_one(
            got[S.AFFINITY_CATEGORIES][0],
            got[S.AFFINITY_WEIGHTS][0],
            0.0 if total is None else total,
            spec.vector_dim,
        )
        return self.tower.embed(features)[0]

    def in_stock(self, item_ids: list[int]) -> list[int]:
        """Those of ``item_ids`` the online store has in stock, in their order (retrieval
        never serves the others)."""
        got = self.store.get_online_features(
            features=["item_inventory:in_stock"], entity_rows=[{"item_id": i} for i in item_ids]
        ).to_dict()
        return [i for i, ok in zip(item_ids, got["in_stock"], strict=True) if ok]

    def exact(
        self, query: np.ndarray, k: int, banned: np.ndarray, cosine: bool = False
    ) -> list[int]:
        e = self.embeddings.astype(np.float64)
        if cosine:
            e = self.taste.astype(np.float64)
            e = e / np.linalg.norm(e, axis=1, keepdims=True)
        scores = e @ query.astype(np.float64)
        scores[np.isin(self.item_ids, banned)] = -np.inf
        return self.item_ids[np.argsort(-scores, kind="stable")[:k]].tolist()


@pytest.fixture(scope="module")
def truth(tiny_dataset: dict, tiny_bundle: Path, home: Paths) -> Truth:
    from contract.feature_store import open_store

    dataset = tiny_dataset["dataset"]
    store = open_store(dataset, paths=home)
    tables = read_tables(home.raw(dataset), [C.ITEMS, C.SELLERS, C.USERS])
    users = tables[C.USERS][C.USER_ID].to_numpy()[:300].tolist()
    profile = store.get_online_features(
        features=[f"{S.USER_PROFILE}:country"], entity_rows=[{"user_id": u} for u in users]
    ).to_dict()
    known = [u for u, country in zip(users, profile["country"], strict=True) if country]
    assert len(known) >= 20, "the tiny store should have profiles for most early users"
    return Truth(
        store=store,
        tower=UserTower.load(tiny_bundle / B.USER_TOWER),
        item_ids=np.load(tiny_bundle / B.ITEM_IDS),
        embeddings=np.load(tiny_bundle / B.ITEM_EMBEDDINGS),
        popular=json.loads((tiny_bundle / B.POPULAR).read_text()),
        known_users=known[:20],
        items=tables[C.ITEMS].set_index(C.ITEM_ID),
        sellers=tables[C.SELLERS].set_index(C.SELLER_ID),
        value_columns=value_columns(json.loads((tiny_bundle / B.RETRIEVAL_CONFIG).read_text())),
    )


@pytest.fixture(scope="module")
def real_index(tiny_bundle: Path) -> CandidateIndex:
    return CandidateIndex.load(tiny_bundle, pool_ids=NONE, config=RetrievalConfig(exploration=0))


def rows_of(item_ids: np.ndarray, ids: list[int]) -> np.ndarray:
    rows = pd.Index(item_ids).get_indexer(pd.Index(ids))
    assert (rows >= 0).all()
    return np.asarray(rows)


def overlap(got: list[int], want: list[int]) -> float:
    return len(set(got) & set(want)) / len(want)


class OnlineFeaturesReader:
    """The user views through ``get_online_features``: Feast's public API, the reference."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def read(self, user_id: int, at_s: float | None = None) -> ViewRows:
        got = self.store.get_online_features(
            features=S.feature_refs(USER_VIEWS), entity_rows=[{"user_id": user_id}]
        ).to_dict()
        rows: dict[str, dict[str, Any] | None] = {}
        for view in USER_VIEWS:
            values = {name: got[name][0] for name in S.FEATURES[view]}
            rows[view] = values if any(v is not None for v in values.values()) else None
        return rows


def test_user_readers_match_get_online_features(truth: Truth, real_index: CandidateIndex) -> None:
    public = OnlineFeaturesReader(truth.store)
    fast = open_user_reader(truth.store, truth.known_users)
    assert isinstance(fast, SqliteUserReader)  # the SQLite store takes the fast path
    provider = ProviderUserReader(truth.store)
    for user in truth.known_users[:5]:
        assert fast.read(user) == provider.read(user)
    spec = real_index.tower.spec
    for user in [*truth.known_users[:5], UNKNOWN_USER]:
        a, b = tower_input(fast.read(user), spec), tower_input(public.read(user), spec)
        assert fast.read(user) == provider.read(user)
        if user == UNKNOWN_USER:
            assert a is None and b is None
            continue
        assert a is not None and b is not None
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        np.testing.assert_allclose(real_index.user_vector(a), truth.query(user), rtol=1e-5)


def test_user_readers_expire_rows_past_their_ttl(truth: Truth) -> None:
    """A row past its view's TTL at the request's time reads as no row, as training's
    point-in-time join reads it; both readers agree, and a time within the TTL changes
    nothing."""
    import sqlite3

    fast = open_user_reader(truth.store, truth.known_users)
    assert isinstance(fast, SqliteUserReader)
    provider = ProviderUserReader(truth.store)
    online = truth.store.config.online_store
    with sqlite3.connect(online.path) as con:
        snapshot_s = con.execute(
            f'SELECT max(event_ts) FROM "{truth.store.project}_{S.USER_PROFILE}"'
        ).fetchone()[0]
    ttl = S.TTL_SECONDS[S.USER_PROFILE]
    for user in truth.known_users[:5]:
        now = fast.read(user)
        assert now[S.USER_PROFILE] is not None
        within = snapshot_s + ttl - 1
        assert fast.read(user, within) == provider.read(user, within)
        assert fast.read(user, within)[S.USER_PROFILE] == now[S.USER_PROFILE]
        late = snapshot_s + ttl + 1
        for reader in (fast, provider):
            rows = reader.read(user, late)
            assert rows[S.USER_PROFILE] is None
            assert rows[S.USER_CONTENT_PROFILE] is None  # the same snapshot TTL
            assert rows[S.USER_RECENT_ACTIVITY] is None  # 24 h TTL, long past
    assert S.expired(S.ITEM_INVENTORY, 0, 1e12) is False  # no TTL: the last row stays true


@pytest.mark.redis
def test_the_reader_on_redis_knows_the_same_users(
    truth: Truth, real_index: CandidateIndex, tiny_dataset: dict, home: Paths, redis_server: str
) -> None:
    """A few users' rows copied from the SQLite store into a Redis one (no registry write):
    the same values come back, and a user Redis has no row for is unknown (Redis answers
    with a null per feature, not with no row)."""
    from contract.feature_store import open_store

    redis_store = open_store(
        tiny_dataset["dataset"], paths=home, online="redis", redis=redis_server
    )
    sqlite, redis = ProviderUserReader(truth.store), ProviderUserReader(redis_store)
    users = truth.known_users[:3]
    now = pd.Timestamp.now(tz="UTC")
    for view in USER_VIEWS:
        rows = [
            {"user_id": u, S.EVENT_TIMESTAMP: now, S.CREATED: now, **values}
            for u in users
            if (values := sqlite.read(u)[view]) is not None
        ]
        redis_store.write_to_online_store(view, pd.DataFrame(rows))
    spec = real_index.tower.spec
    for user in users:
        assert redis.read(user) == sqlite.read(user)
    never = truth.known_users[3]  # known to SQLite, not written to Redis
    assert redis.read(never) == dict.fromkeys(USER_VIEWS)
    assert tower_input(redis.read(never), spec) is None
    assert tower_input(redis.read(UNKNOWN_USER), spec) is None


def test_core_ann_matches_its_exact_top_k(truth: Truth, real_index: CandidateIndex) -> None:
    reader = ProviderUserReader(truth.store)
    shares = []
    for user in truth.known_users:
        features = tower_input(reader.read(user), real_index.tower.spec)
        assert features is not None
        found = real_index.retrieve(
            features, 300, NONE, HOME, NONE, "US", "ios", np.random.default_rng(0)
        )
        assert len(found) == 300 and (found.sources == ANN).all()
        exact = real_index.item_ids[real_index.exact_top_k(real_index.user_vector(features), 300)]
        shares.append(overlap(found.item_ids.tolist(), exact.tolist()))
    assert np.mean(shares) >= 0.9 and min(shares) >= 0.8, shares


# --- the server ------------------------------------------------------------------------------


@dataclass
class Running:
    stub: retrieval_pb2_grpc.RetrievalServiceStub
    channel: grpc.Channel
    index: CandidateIndex
    settings: RetrievalSettings


@pytest.fixture(scope="module")
def settings(
    tiny_trained: dict, tiny_dataset: dict, home: Paths, tmp_path_factory
) -> RetrievalSettings:
    return RetrievalSettings(
        server=ServerSettings(port=0, max_workers=4, drain_seconds=0),
        home=home.home,
        dataset=tiny_dataset["dataset"],
        bundle=BundleRef(
            home.home,
            cache_dir=tmp_path_factory.mktemp("model_cache"),
            tracking_uri=f"sqlite:///{home.home / 'mlruns' / 'mlflow.db'}",
            service="retrieval",
        ),
        history_share=0.0,  # the assertions below are about the tower; history has its own
        profile_share=0.0,  # and so has the profile (set per test)
    )


@pytest.fixture(scope="module")
def served(settings: RetrievalSettings) -> Iterator[Running]:
    server, port, servicer = create_server(settings)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        yield Running(stub, channel, servicer.index, settings)
    finally:
        channel.close()
        server.stop(None).wait()


def request(
    user_id: int,
    n: int = 200,
    exclude: list[int] | None = None,
    cart: list[int] | None = None,
    surface: int = common_pb2.SURFACE_HOME,
    country: str = "US",
    device: str = "ios",
    request_id: str = "r1",
) -> retrieval_pb2.RetrieveRequest:
    return retrieval_pb2.RetrieveRequest(
        request_id=request_id,
        user_id=user_id,
        n=n,
        exclude_item_ids=exclude or [],
        cart_item_ids=cart or [],
        surface=surface,
        context=common_pb2.RequestContext(country=country, device=device),
    )


@dataclass(frozen=True)
class Reply:
    ids: np.ndarray
    scores: np.ndarray
    sources: np.ndarray
    propensities: np.ndarray
    known_user: bool
    model_version: str
    exploration_pool: int = 0

    @classmethod
    def of(cls, r: retrieval_pb2.RetrieveResponse) -> Reply:
        lengths = {len(r.item_ids), len(r.scores), len(r.sources), len(r.propensities)}
        assert len(lengths) == 1, "the repeated fields must be parallel"
        return cls(
            np.array(r.item_ids, np.int64),
            np.array(r.scores, np.float64),
            np.array(r.sources, np.int64),
            np.array(r.propensities, np.float64),
            r.known_user,
            r.model_version,
            r.exploration_pool,
        )

    def of_source(self, source: int) -> list[int]:
        return self.ids[self.sources == source].tolist()


def call(served: Running, req: retrieval_pb2.RetrieveRequest) -> Reply:
    reply = Reply.of(served.stub.Retrieve(req, timeout=TIMEOUT_S))
    banned = set(req.exclude_item_ids) | set(req.cart_item_ids)
    assert len(reply.ids) <= req.n
    assert len(set(reply.ids.tolist())) == len(reply.ids), "duplicates"
    assert not banned & set(reply.ids.tolist()), "an excluded or cart item came back"
    return reply


def test_health_is_serving_with_the_champion(served: Running, tiny_trained: dict) -> None:
    health = health_pb2_grpc.HealthStub(served.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert served.index.version == str(tiny_trained["register"]["registry_version"])


def test_a_known_user_gets_the_exact_nearest_items(served: Running, truth: Truth) -> None:
    shares = []
    for user in truth.known_users[:10]:
        q = truth.query(user)
        top = truth.exact(q, 5, NONE)
        exclude = [*top, *truth.item_ids[::97].tolist()]  # the user's 5 best among them
        reply = call(served, request(user, n=200, exclude=exclude))
        assert reply.known_user and reply.model_version == served.index.version
        ann = reply.of_source(ANN)
        assert reply.sources[: len(ann)].tolist() == [ANN] * len(ann)
        assert len(ann) == 200 - served.settings.exploration
        want = truth.exact(q, len(ann), np.array(exclude))
        shares.append(overlap(ann, want))
        rows = rows_of(truth.item_ids, ann)
        inner = truth.embeddings[rows].astype(np.float64) @ q.astype(np.float64)
        np.testing.assert_allclose(reply.scores[: len(ann)], inner, rtol=1e-4, atol=1e-4)
        assert (np.diff(reply.scores[: len(ann)]) <= 1e-4).all(), "best first"
    assert np.mean(shares) >= 0.9 and min(shares) >= 0.8, shares


def test_a_user_with_a_content_profile_gets_the_best_items_by_profile_score(
    served: Running, truth: Truth, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user's online ``content_profile`` against the items table's content (in the
    catalogue's content space), prices and margins, by hand: ceil(0.5 x (n - m)) PROFILE
    candidates, best first, before the tower's."""
    monkeypatch.setattr(served.index, "config", replace(served.index.config, profile_share=0.5))
    got = truth.store.get_online_features(
        features=[f"{S.USER_CONTENT_PROFILE}:{S.CONTENT_PROFILE}"],
        entity_rows=[{"user_id": u} for u in truth.known_users],
    ).to_dict()[S.CONTENT_PROFILE]
    users = [(u, np.array(p)) for u, p in zip(truth.known_users, got, strict=True) if p]
    assert len(users) >= 3, "most known users of sim-tiny engaged in 30 days"
    items = truth.items.reindex(truth.item_ids)
    listed = items[C.PRICE].notna().to_numpy()
    assert listed.any() and C.CONTENT in items.columns
    # the catalogue's content space, fitted on the whole items table
    space = content.similarity_space(
        truth.items.index.to_numpy(), content.table_content(truth.items)
    )
    assert len(users[0][1]) == space.dim
    raw = np.stack(
        [
            np.asarray(v, np.float64) if ok else np.zeros(len(space.mean))
            for v, ok in zip(items[C.CONTENT], listed, strict=True)
        ]
    )
    unit = space.unit(raw).astype(np.float64)
    value = (items[C.PRICE] * items[C.MARGIN]).fillna(0).to_numpy(np.float64)
    log_value = np.log(np.maximum(value, 1e-3))
    out_of_stock = ~np.isin(truth.item_ids, truth.in_stock(truth.item_ids.tolist()))
    n = 200
    cap = math.ceil(0.5 * (n - served.settings.exploration))
    for user, profile in users[:5]:
        scores = 4 * unit @ profile + log_value
        scores[~listed | out_of_stock] = -np.inf
        best = truth.item_ids[np.argsort(-scores, kind="stable")]
        exclude = best[:3].tolist()  # the user's three best: never returned
        reply = call(served, request(user, n=n, exclude=exclude))
        chosen = reply.of_source(PROF)
        assert reply.sources[:cap].tolist() == [PROF] * cap and len(chosen) == cap
        assert reply.of_source(ANN), "the tower fills the rest"
        assert overlap(chosen, best[3 : 3 + cap].tolist()) >= 0.97
        by_hand = scores[rows_of(truth.item_ids, chosen)]
        np.testing.assert_allclose(reply.scores[:cap], by_hand, rtol=1e-4, atol=1e-4)
        assert (np.diff(reply.scores[:cap]) <= 1e-5).all(), "best first"


def test_an_unknown_user_gets_the_popularity_of_their_context(
    served: Running, truth: Truth
) -> None:
    segment = truth.popular["segments"]["GB/android"]
    exclude = segment[:3] + segment[10:12]
    reply = call(
        served, request(UNKNOWN_USER, n=120, exclude=exclude, country="GB", device="android")
    )
    assert not reply.known_user
    popular = reply.of_source(POP)
    assert set(reply.sources.tolist()) == {POP, EXPLORE}
    want = truth.in_stock([i for i in segment if i not in exclude])[: len(popular)]
    assert popular == want and len(popular) == 120 - served.settings.exploration
    ranks = np.array([segment.index(i) for i in popular])
    np.testing.assert_allclose(reply.scores[: len(popular)], -np.log1p(ranks), rtol=1e-6)

    overall = truth.in_stock(truth.popular["overall"])
    for country, device in (("", ""), ("JP", "ios")):  # no context, a country never seen
        anywhere = call(served, request(UNKNOWN_USER, n=50, country=country, device=device))
        assert anywhere.of_source(POP) == overall[: 50 - served.settings.exploration]


def cart_of_one_category(truth: Truth, size: int = 3) -> tuple[list[int], int]:
    category = int(truth.items[C.CATEGORY].value_counts().index[0])
    ids = truth.items.index[truth.items[C.CATEGORY] == category].to_numpy()
    return np.random.default_rng(3).choice(ids, size, replace=False).tolist(), category


def test_checkout_returns_items_close_to_the_cart_then_the_users(
    served: Running, truth: Truth
) -> None:
    user = truth.known_users[0]
    cart, category = cart_of_one_category(truth)
    exclude = [*cart, *truth.item_ids[5:40].tolist()]
    n, m = 100, served.settings.exploration
    reply = call(
        served, request(user, n=n, exclude=exclude, cart=cart, surface=common_pb2.SURFACE_CHECKOUT)
    )
    content = reply.of_source(CONTENT)
    share = math.ceil(served.settings.checkout_content_share * (n - m))
    assert len(content) == share
    assert reply.sources.tolist() == [CONTENT] * share + [ANN] * (n - m - share) + [EXPLORE] * m

    assert truth.value_columns == 1  # the bundle's default: the cosine leaves it out
    unit = truth.taste / np.linalg.norm(truth.taste, axis=1, keepdims=True)
    rows = rows_of(truth.item_ids, cart)
    query = unit[rows].mean(axis=0)
    query /= np.linalg.norm(query)
    want = truth.exact(query, share, np.array(exclude), cosine=True)
    assert overlap(content, want) >= 0.95
    cosine = unit[rows_of(truth.item_ids, content)] @ query
    np.testing.assert_allclose(reply.scores[:share], cosine, rtol=1e-4, atol=1e-5)
    same = (truth.items.loc[content, C.CATEGORY] == category).mean()
    base = (truth.items[C.CATEGORY] == category).mean()
    assert same >= 2 * base, (same, base)
    assert set(reply.of_source(ANN)).isdisjoint(content)


def test_exploration_candidates_carry_their_inclusion_probability(
    served: Running, truth: Truth
) -> None:
    as_of = max(truth.items[C.CREATED_AT].max(), truth.sellers[C.CREATED_AT].max())
    seller_joined = (
        truth.sellers[C.CREATED_AT]
        .reindex(truth.items[C.SELLER_ID].to_numpy())
        .set_axis(truth.items.index)
    )
    pool = truth.items.index[
        (truth.items[C.CREATED_AT] > as_of - pd.Timedelta(days=served.settings.new_item_days))
        | (seller_joined > as_of - pd.Timedelta(days=NEW_SELLER_DAYS))
    ]
    pool = set(pool.tolist()) & set(truth.item_ids.tolist())
    assert served.index.exploration_pool_size == len(pool)

    user = truth.known_users[1]
    exclude = sorted(pool)[:25]
    n, m = 200, served.settings.exploration
    reply = call(served, request(user, n=n, exclude=exclude))
    explored = reply.of_source(EXPLORE)
    assert len(explored) == m and set(explored) <= pool
    eligible = pool - set(exclude) - set(reply.ids[: n - m].tolist())
    is_explored = reply.sources == EXPLORE
    np.testing.assert_allclose(reply.propensities[is_explored], m / len(eligible), rtol=1e-6)
    assert reply.exploration_pool == len(eligible)  # the gateway's propensities divide by it
    assert (reply.propensities[~is_explored] == 0).all()
    assert (reply.scores[is_explored] == 0).all()

    again = call(served, request(user, n=n, exclude=exclude))
    assert again.ids.tolist() == reply.ids.tolist()  # the draw is seeded by the request id
    other = call(served, request(user, n=n, exclude=exclude, request_id="r2"))
    assert other.of_source(EXPLORE) != explored
    assert other.ids[: n - m].tolist() == reply.ids[: n - m].tolist()


def rpc_error(thunk: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        thunk()
    return err.value


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: setattr(r, "n", 0), r"^n must be 1\.\.2000, got 0"),
        (lambda r: setattr(r, "n", 2001), r"^n must be 1\.\.2000, got 2001"),
        (lambda r: setattr(r, "user_id", -1), r"^user_id must be 0\.\.\d+, got -1"),
        (
            lambda r: r.exclude_item_ids.extend(range(5001)),
            r"^exclude_item_ids must have at most 5000",
        ),
        (
            lambda r: r.exclude_item_ids.append(-3),
            r"^exclude_item_ids must be non-negative.*\[-3\]",
        ),
        (lambda r: r.cart_item_ids.extend(range(101)), r"^cart_item_ids must have at most 100 ids"),
        (lambda r: r.cart_item_ids.append(-7), r"^cart_item_ids must be non-negative.*\[-7\]"),
        (
            lambda r: setattr(r, "surface", 0),
            r"^surface must be one of SURFACE_HOME, SURFACE_CHECKOUT, got SURFACE_UNSPECIFIED",
        ),
        (lambda r: setattr(r, "surface", 9), r"^surface must be one of .*, got 9"),
        (
            lambda r: setattr(r.context, "country", "usa"),
            r"^context\.country must be empty or an ISO",
        ),
        (
            lambda r: setattr(r.context, "device", "tv"),
            r"^context\.device must be empty or one of ios",
        ),
        (
            lambda r: setattr(r, "request_id", "x" * 129),
            r"^request_id must be at most 128 characters",
        ),
    ],
    ids=[
        "n-0",
        "n-2001",
        "negative-user",
        "5001-excluded",
        "negative-excluded",
        "101-in-cart",
        "negative-cart",
        "surface-unspecified",
        "surface-unknown",
        "country",
        "device",
        "request-id",
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(
    served: Running, mutate: Callable[[retrieval_pb2.RetrieveRequest], object], message: str
) -> None:
    req = request(0, n=10)
    mutate(req)
    err = rpc_error(lambda: served.stub.Retrieve(req, timeout=TIMEOUT_S))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert re.search(message, err.details() or ""), err.details()


def test_limits_are_accepted(served: Running, truth: Truth) -> None:
    assert truth.item_ids.max() < 5000  # so excluding 0..4999 excludes the whole catalog
    req = request(truth.known_users[2], n=2000, exclude=list(range(5000)), cart=list(range(100)))
    assert len(call(served, req).ids) == 0
    small = call(served, request(truth.known_users[2], n=1, surface=common_pb2.SURFACE_CHECKOUT))
    assert small.sources.tolist() == [ANN]


# --- start-up --------------------------------------------------------------------------------


def test_start_up_fails_naming_an_unknown_alias(settings: RetrievalSettings) -> None:
    with pytest.raises(
        StartupError, match=r"registry model 'no-such-alias' \(HOMEFEED_RETRIEVAL_MODEL or"
    ):
        create_server(replace(settings, bundle=replace(settings.source, model="no-such-alias")))


def test_start_up_refuses_a_tampered_bundle(
    settings: RetrievalSettings, tiny_bundle: Path, tmp_path: Path
) -> None:
    import shutil

    copy = Path(shutil.copytree(tiny_bundle, tmp_path / "tampered"))
    data = bytearray((copy / B.USER_TOWER).read_bytes())
    data[-40] ^= 0xFF
    (copy / B.USER_TOWER).write_bytes(bytes(data))
    with pytest.raises(
        StartupError, match=r"bundle directory .*tampered.*modified retrieval/user_tower\.npz"
    ):
        create_server(replace(settings, bundle=replace(settings.source, bundle_dir=copy)))


def test_start_up_fails_naming_a_bundle_without_a_catalog(
    settings: RetrievalSettings, tiny_bundle: Path, tmp_path: Path
) -> None:
    import shutil

    from contract.bundle import read_manifest, write_manifest

    copy = Path(shutil.copytree(tiny_bundle, tmp_path / "old"))
    manifest = read_manifest(copy)
    (copy / B.CATALOG).unlink()
    write_manifest(
        copy,
        version=manifest["version"],
        data_snapshot=manifest["data_snapshot"],
        feature_schema_hash=manifest["feature_schema_hash"],
        metrics={},
    )
    with pytest.raises(StartupError, match=r"bundle directory .*old.*catalog\.npz"):
        create_server(replace(settings, bundle=replace(settings.source, bundle_dir=copy)))


def _service_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOMEFEED_RETRIEVAL_")}
    env.update(extra)
    return env


def test_the_module_exits_with_the_reason_when_the_bundle_dir_is_missing(tmp_path: Path) -> None:
    missing = tmp_path / "no-bundle"
    proc = subprocess.run(
        [sys.executable, "-m", "services.retrieval"],
        cwd=REPO_ROOT,
        env=_service_env(HOMEFEED_HOME=str(tmp_path), HOMEFEED_RETRIEVAL_BUNDLE_DIR=str(missing)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"retrieval: cannot load bundle directory {missing}" in proc.stderr
    assert "bundle.json is missing" in proc.stderr
    assert "HOMEFEED_READY" not in proc.stdout


def test_the_module_serves_until_sigterm(
    tiny_bundle: Path, tiny_dataset: dict, home: Paths, truth: Truth, tmp_path: Path
) -> None:
    env = _service_env(
        HOMEFEED_HOME=str(home.home),
        HOMEFEED_DATASET=tiny_dataset["dataset"],
        HOMEFEED_RETRIEVAL_BUNDLE_DIR=str(tiny_bundle),
        HOMEFEED_RETRIEVAL_PORT="0",
        HOMEFEED_RETRIEVAL_DRAIN_SECONDS="1",
    )
    log_path = tmp_path / "stderr.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.retrieval"],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
        try:
            assert proc.stdout is not None
            ready = proc.stdout.readline()  # printed once listening, or the process exits
            assert ready.startswith("HOMEFEED_READY port="), log_path.read_text()[-2000:]
            port = int(ready.strip().split("=", 1)[1])
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
                reply = stub.Retrieve(request(truth.known_users[0], n=30), timeout=TIMEOUT_S)
            assert reply.known_user and len(reply.item_ids) == 30
            proc.send_signal(signal.SIGTERM)
            # a stuck stop exits 1 with every thread's stack in the log (STOP_OVERDUE_SECONDS)
            assert proc.wait(timeout=30) == 0, log_path.read_text()[-6000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    logs = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert {"retrieval ready", "stopped"} <= {entry["msg"] for entry in logs}
    assert all(entry["service"] == "retrieval" for entry in logs)
