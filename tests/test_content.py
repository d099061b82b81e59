"""contract.content, the content-profile rule training and serving share: the ranker's
``content_affinity_for_item`` (one user, and many rows at once) and the PROFILE source's
ranking, on hand-made vectors with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from contract import content

# four items in 2-d: along x, at 45 degrees, along y, and one without content
CONTENT = np.array([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0], [0.0, 0.0]], dtype=np.float32)
X = np.array([1.0, 0.0], dtype=np.float32)


def test_unit_rows_scales_rows_to_unit_length_and_keeps_zero_rows() -> None:
    unit = content.unit_rows(CONTENT)
    assert unit.dtype == np.float32 and unit.shape == (4, 2)
    np.testing.assert_allclose(np.linalg.norm(unit[:3], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(unit[1], [math.sqrt(0.5)] * 2, rtol=1e-6)
    assert (unit[3] == 0).all()
    assert content.unit_rows(np.zeros((3, 0))).shape == (3, 0)
    with pytest.raises(ValueError, match=r"must be \(items, dim\)"):
        content.unit_rows(np.ones(3))


def test_profile_of_is_the_unit_weighted_sum_and_empty_when_zero() -> None:
    unit = content.unit_rows(CONTENT)
    p = content.profile_of(unit[:3], np.array([1.0, 0.0, 1.0]))
    np.testing.assert_allclose(p, [math.sqrt(0.5)] * 2, rtol=1e-6)
    assert content.profile_of(unit[:1], np.zeros(1)).shape == (0,)


def test_similarity_is_the_cosine_and_zero_without_a_usable_profile() -> None:
    unit = content.unit_rows(CONTENT)
    got = content.similarity(X, unit)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [1.0, math.sqrt(0.5), 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(content.similarity([0.0, -1.0], unit)[2], -1.0, rtol=1e-6)
    for none in (None, [], [1.0, 0.0, 0.0], [0.0, 0.0], [math.nan, 1.0], np.ones((1, 2))):
        assert (content.similarity(none, unit) == 0).all(), none
    assert content.as_profile([1.0, 0.0, 0.0], 2) is None  # another catalogue's width
    assert content.similarity(X, unit[:0]).shape == (0,)


def test_evidence_shrink_rises_from_zero_to_one_with_the_profiles_weight() -> None:
    half = content.PROFILE_EVIDENCE_HALF
    got = content.evidence_shrink(np.array([0.0, half, 3 * half, 1e9, -5.0]))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [0.0, 0.5, 0.75, 1.0, 0.0], rtol=1e-6)


def test_the_expected_content_affinity_is_the_cosine_shrunk_by_the_evidence() -> None:
    from contract.features import CONTENT_AFFINITY_EXPECTED, FEATURE_SCHEMA, build_matrix
    from feature_repo import schema as S

    rng = np.random.default_rng(5)
    n = 6
    columns: dict[str, object] = {name: np.zeros(n) for name in S.training_columns()}
    columns.update(
        {
            "country": "DE",
            "device": "ios",
            "price": np.full(n, 10.0),
            "hour_of_day": 3,
            "day_of_week": 1,
            "surface": "home",
        }
    )
    cosine = rng.uniform(-1, 1, n).astype(np.float32)
    weight = np.array([0.0, 1.0, 8.0, 24.0, 100.0, 3.5], np.float32)
    columns[S.CONTENT_AFFINITY_FOR_ITEM] = cosine
    columns[S.CONTENT_PROFILE_WEIGHT] = weight
    x = build_matrix(columns)
    got = x[:, FEATURE_SCHEMA.index(CONTENT_AFFINITY_EXPECTED)]
    np.testing.assert_array_equal(got, cosine * content.evidence_shrink(weight))
    assert got[0] == 0 and got[2] == pytest.approx(cosine[2] / 2, rel=1e-6)
    # the user's scalar weight broadcast to every row gives the same column
    columns[S.CONTENT_PROFILE_WEIGHT] = np.float32(8.0)
    np.testing.assert_array_equal(
        build_matrix(columns)[:, FEATURE_SCHEMA.index(CONTENT_AFFINITY_EXPECTED)],
        cosine * np.float32(0.5),
    )


def test_similarity_rows_equals_similarity_row_by_row() -> None:
    rng = np.random.default_rng(3)
    dim, n_users, n_rows = 5, 6, 200
    unit = content.unit_rows(rng.normal(size=(40, dim)).astype(np.float32))
    unit[7] = 0  # an item without content
    profiles = [content.unit_rows(rng.normal(size=(1, dim)))[0] for _ in range(n_users)]
    profiles[2] = np.zeros(0, np.float32)  # no engagement: empty list
    profiles[4] = np.ones(dim + 1, np.float32) / math.sqrt(dim + 1)  # another width
    profiles[5] = np.full(dim, np.nan, np.float32)  # not finite: no profile
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in profiles])])
    values = np.concatenate(profiles).astype(np.float32)
    user = rng.integers(0, n_users, n_rows)
    item = rng.integers(0, len(unit), n_rows)
    starts, lengths = offsets[user], np.diff(offsets)[user]
    got = content.similarity_rows(starts, lengths, values, unit[item])
    want = np.array(
        [
            content.similarity(profiles[u], unit[i : i + 1])[0]
            for u, i in zip(user, item, strict=True)
        ]
    )
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert (got[np.isin(user, [2, 4, 5])] == 0).all()
    assert (got[item == 7] == 0).all()
    assert np.abs(got).max() > 0.5  # the rest are real cosines
    # each row alone gives the same bits as in the batch (serving computes 500 rows at once,
    # training millions): unlike a BLAS product, whose rounding follows the batch's shape
    alone = [
        content.similarity_rows(
            starts[j : j + 1], lengths[j : j + 1], values, unit[item[j : j + 1]]
        )
        for j in range(n_rows)
    ]
    np.testing.assert_array_equal(got, np.concatenate(alone))
    none = content.similarity_rows(np.zeros(3, np.int64), np.zeros(3, np.int64), values, unit[:3])
    assert (none == 0).all()


# prices x margins: 1, e, 1, e^2 (log values 0, 1, 0, 2)
PRICES = np.array([1.0, math.e, 2.0, math.e**2])
MARGINS = np.array([1.0, 1.0, 0.5, 1.0])


def test_profile_index_scores_four_cosines_plus_log_value() -> None:
    index = content.ProfileIndex(CONTENT, PRICES, MARGINS)
    assert index.dim == 2
    scores = index.scores(X)
    assert scores is not None
    cos = np.array([1.0, math.sqrt(0.5), 0.0, 0.0])
    np.testing.assert_allclose(scores, 4 * cos + [0, 1, 0, 2], rtol=1e-6)
    assert index.scores(None) is None and index.scores([1.0, 0.0, 0.0]) is None
    # a worthless item's log value is floored, not -inf
    free = content.ProfileIndex(CONTENT[:1], np.zeros(1), np.full(1, 0.3))
    assert free.log_value[0] == pytest.approx(math.log(content.VALUE_FLOOR), rel=1e-6)
    with pytest.raises(ValueError, match="content has 4 rows, prices and margins 2"):
        content.ProfileIndex(CONTENT, PRICES[:2], MARGINS[:2])


def test_profile_index_top_orders_by_score_skips_blocked_and_caps_k() -> None:
    index = content.ProfileIndex(CONTENT, PRICES, MARGINS)
    # scores along x: 4, 1 + 2.83, 0, 2 -> rows 0, 1, 3, 2
    rows, scores = index.top(X, 4)
    assert rows.tolist() == [0, 1, 3, 2] and rows.dtype == np.int64
    assert scores.dtype == np.float32 and (np.diff(scores) <= 0).all()
    assert index.top(X, 2)[0].tolist() == [0, 1]
    blocked = np.array([True, False, False, True])
    assert index.top(X, 3, blocked)[0].tolist() == [1, 2]
    assert index.top(X, 10, blocked)[0].tolist() == [1, 2]  # k beyond the eligible rows
    assert len(index.top(X, 3, np.ones(4, bool))[0]) == 0
    assert len(index.top(X, 0)[0]) == 0
    assert len(index.top(None, 3)[0]) == 0 and len(index.top([], 3)[0]) == 0
    # along y the tall item wins; ties go to the lower row
    assert index.top([0.0, 1.0], 1)[0].tolist() == [2]
    tied = content.ProfileIndex(np.ones((3, 2)), np.ones(3), np.ones(3))
    assert tied.top(X, 3)[0].tolist() == [0, 1, 2]


def _simulated_content(rng, n=6000, latent_dim=4, content_dim=12, noise=0.15):
    """Content as the simulator makes it: a random linear image of unit latent vectors plus
    noise (``training.simulate.world``)."""
    latent = rng.normal(size=(n, latent_dim))
    latent /= np.linalg.norm(latent, axis=1, keepdims=True)
    mixing = rng.normal(0.0, 1.0 / np.sqrt(latent_dim), size=(latent_dim, content_dim))
    return latent, (latent @ mixing + noise * rng.normal(size=(n, content_dim))).astype(np.float32)


def test_the_content_space_keeps_the_taste_directions_and_compares_taste_better() -> None:
    """On simulator-like content the space keeps the latent dimensions, not the noise ones,
    and a taste vector's cosine in it ranks items closer to the true affinity than the raw
    cosine does."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(5)
    latent, rows = _simulated_content(rng)
    ids = np.arange(len(rows)) * 7 + 3
    space = content.similarity_space(ids, rows)
    assert space.dim == latent.shape[1]
    unit = space.unit(rows)
    assert unit.shape == (len(rows), space.dim) and unit.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
    raw = content.unit_rows(rows)
    gains = []
    for _ in range(20):  # a user's profile: the sum of 30 liked items' rows
        taste = rng.normal(size=latent.shape[1])
        liked = np.argsort(-(latent @ taste))[:30]
        truth = latent @ taste
        in_space = spearmanr(unit @ unit[liked].sum(axis=0), truth)[0]
        in_raw = spearmanr(raw @ raw[liked].sum(axis=0), truth)[0]
        gains.append(in_space - in_raw)
    assert np.mean(gains) > 0.01, gains


def test_the_content_space_is_the_same_bits_in_any_row_order_and_batch() -> None:
    rng = np.random.default_rng(6)
    _, rows = _simulated_content(rng, n=3000)
    rows[7] = 0.0  # an item without content stays a zero row
    ids = rng.permutation(10_000)[: len(rows)]
    space = content.similarity_space(ids, rows)
    order = rng.permutation(len(rows))
    shuffled = content.similarity_space(ids[order], rows[order])
    assert np.array_equal(space.mean, shuffled.mean)
    assert np.array_equal(space.projection, shuffled.projection)
    unit = space.unit(rows)
    assert not unit[7].any()
    for i in (0, 7, 2999):
        assert np.array_equal(space.unit(rows[i : i + 1])[0], unit[i])
    with pytest.raises(ValueError, match=r"content must be \(items, 12\)"):
        space.unit(rows[:, :3])


def test_narrow_or_noiseless_content_is_compared_as_it_is() -> None:
    narrow = content.similarity_space(np.arange(4), CONTENT)
    assert narrow.dim == 2 and not narrow.mean.any()
    np.testing.assert_array_equal(narrow.unit(CONTENT), content.unit_rows(CONTENT))
    iso = np.random.default_rng(7).normal(size=(5000, 10)).astype(np.float32)
    flat = content.similarity_space(np.arange(5000), iso)  # no component stands out
    np.testing.assert_array_equal(flat.projection, np.eye(10))
    assert content.similarity_space(np.arange(3), np.zeros((3, 0))).dim == 0


def test_the_catalogue_and_the_items_table_share_the_space() -> None:
    """Serving's catalogue (rows by item id) and training's items table (table order) give
    every item the same unit row bits."""
    import pandas as pd

    from contract import columns as C
    from contract.catalog import Catalog

    rng = np.random.default_rng(8)
    _, rows = _simulated_content(rng, n=500)
    ids = rng.permutation(500) + 10
    items = pd.DataFrame(
        {
            C.ITEM_ID: ids,
            C.SELLER_ID: 1,
            C.CATEGORY: 0,
            C.PRICE: 10.0,
            C.MARGIN: 0.2,
            C.CREATED_AT: pd.Timestamp("2026-01-01", tz="UTC"),
            C.CONTENT: list(rows),
        }
    )
    sellers = pd.DataFrame({C.SELLER_ID: [1], C.CREATED_AT: [pd.Timestamp("2025-01-01", tz="UTC")]})
    catalog = Catalog.from_tables(items, sellers)
    table = content.table_unit(items)
    at = np.searchsorted(catalog.item_ids, ids)
    assert np.array_equal(catalog.unit_content[at], table)
