"""services.common.users' wire form: one user's online rows as ``common.v1.UserFeatures`` and
back, with the sparse category affinity (``affinity_categories`` / ``affinity_weights``
lists, ``affinity_total`` a number feature) and the content profile, and the edge's refusal
of malformed lists; then both readers over a hand-made SQLite online store, past and within
the views' TTLs."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from homefeed.common.v1 import common_pb2

from feature_repo import schema as S
from services.common.errors import InvalidArgument
from services.common.users import (
    KIND_OF,
    LISTS,
    MAX_LIST,
    SCALARS,
    USER_VIEWS,
    VIEW_OF,
    ProviderUserReader,
    SqliteUserReader,
    from_proto,
    to_proto,
)
from services.features.assembler import UserFeatures

ROWS: dict[str, dict[str, Any] | None] = {
    S.USER_PROFILE: {"country": "DE", "device": "ios", "clicks_30d": 7, "spend_30d": 12.5},
    S.USER_CATEGORY_AFFINITY: {
        S.AFFINITY_CATEGORIES: [4, 11, 0],
        S.AFFINITY_WEIGHTS: [6.0, 3.0, 1.0],
        S.AFFINITY_TOTAL: 12.0,
    },
    S.USER_SELLER_RECENCY: {S.RECENT_SELLERS: [9, 2], S.RECENT_SELLER_DAYS: [0.5, 3.0]},
    S.USER_CONTENT_PROFILE: {S.CONTENT_PROFILE: [0.6, 0.0, -0.8], S.CONTENT_PROFILE_WEIGHT: 7.0},
    S.USER_RECENT_ACTIVITY: {"views_24h": 2, "carts_24h": 0},
}


def round_trip(rows: Any) -> Any:
    wire = to_proto(rows).SerializeToString()
    return from_proto(common_pb2.UserFeatures.FromString(wire))


def test_the_new_affinity_names_are_user_features_of_their_kind() -> None:
    assert S.AFFINITY_TOTAL in SCALARS and KIND_OF[S.AFFINITY_TOTAL] == "float32"
    assert VIEW_OF[S.AFFINITY_TOTAL] == S.USER_CATEGORY_AFFINITY
    assert {S.AFFINITY_CATEGORIES, S.AFFINITY_WEIGHTS} <= set(LISTS)
    assert KIND_OF[S.AFFINITY_CATEGORIES] == "int64[]"
    assert KIND_OF[S.AFFINITY_WEIGHTS] == "float32[]"
    assert not {S.AFFINITY_CATEGORIES, S.AFFINITY_WEIGHTS} & set(SCALARS)


def test_the_affinity_travels_as_lists_and_a_number() -> None:
    msg = to_proto(ROWS)
    assert msg.known
    assert list(msg.affinity_categories) == [4, 11, 0]
    assert list(msg.affinity_weights) == [6.0, 3.0, 1.0]
    numbers = dict(zip(msg.number_names, msg.number_values, strict=True))
    assert numbers[S.AFFINITY_TOTAL] == 12.0
    assert not {S.AFFINITY_CATEGORIES, S.AFFINITY_WEIGHTS} & set(msg.number_names)

    back = round_trip(ROWS)
    affinity = back[S.USER_CATEGORY_AFFINITY]
    assert affinity[S.AFFINITY_TOTAL] == 12.0  # in its own view, not the profile's
    assert S.AFFINITY_TOTAL not in back[S.USER_PROFILE]
    assert affinity[S.AFFINITY_CATEGORIES].dtype == np.int64
    assert affinity[S.AFFINITY_CATEGORIES].tolist() == [4, 11, 0]
    assert affinity[S.AFFINITY_WEIGHTS].dtype == np.float32
    np.testing.assert_array_equal(affinity[S.AFFINITY_WEIGHTS], [6.0, 3.0, 1.0])
    assert back[S.USER_PROFILE] == ROWS[S.USER_PROFILE]
    assert back[S.USER_RECENT_ACTIVITY] == ROWS[S.USER_RECENT_ACTIVITY]
    assert back[S.USER_SELLER_RECENCY][S.RECENT_SELLERS].tolist() == [9, 2]

    # what the features service makes of it is what it makes of the store's rows
    a, b = UserFeatures.from_rows(ROWS), UserFeatures.from_rows(back)
    assert a.known == b.known and a.values == b.values
    assert b.affinity_total == 12.0
    for name in ("affinity_categories", "affinity_weights", "recent_sellers", "content_profile"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)

    # rows that went through the wire once hold numpy arrays: they go again unchanged
    again = to_proto(back)
    assert again.SerializeToString() == to_proto(ROWS).SerializeToString()


def test_no_lists_and_no_total_is_no_affinity_row() -> None:
    for affinity in (None, {}, dict.fromkeys(S.FEATURES[S.USER_CATEGORY_AFFINITY])):
        rows = {**ROWS, S.USER_CATEGORY_AFFINITY: affinity}
        msg = to_proto(rows)
        assert len(msg.affinity_categories) == len(msg.affinity_weights) == 0
        assert S.AFFINITY_TOTAL not in msg.number_names
        assert round_trip(rows)[S.USER_CATEGORY_AFFINITY] is None
    # a row without engagement: empty lists, a total of 0 -- the total is kept
    idle = {S.AFFINITY_CATEGORIES: [], S.AFFINITY_WEIGHTS: [], S.AFFINITY_TOTAL: 0.0}
    back = round_trip({**ROWS, S.USER_CATEGORY_AFFINITY: idle})
    assert back[S.USER_CATEGORY_AFFINITY] == {S.AFFINITY_TOTAL: 0.0}
    user = UserFeatures.from_rows(back)
    assert user.affinity_total == 0.0 and len(user.affinity_categories) == 0
    # the total alone (a caller that sends only numbers)
    only = common_pb2.UserFeatures(known=True, number_names=["affinity_total"], number_values=[5])
    assert from_proto(only)[S.USER_CATEGORY_AFFINITY] == {S.AFFINITY_TOTAL: 5.0}


def test_the_content_profile_travels_as_a_float_list_and_is_absent_without_one() -> None:
    assert KIND_OF[S.CONTENT_PROFILE] == "float32[]" and S.CONTENT_PROFILE in LISTS
    assert VIEW_OF[S.CONTENT_PROFILE] == S.USER_CONTENT_PROFILE
    assert S.CONTENT_PROFILE not in SCALARS
    msg = to_proto(ROWS)
    np.testing.assert_array_equal(msg.content_profile, np.array([0.6, 0.0, -0.8], np.float32))
    assert S.CONTENT_PROFILE not in msg.number_names
    numbers = dict(zip(msg.number_names, msg.number_values, strict=True))
    assert numbers[S.CONTENT_PROFILE_WEIGHT] == 7.0
    back = round_trip(ROWS)[S.USER_CONTENT_PROFILE]
    assert back is not None and back[S.CONTENT_PROFILE].dtype == np.float32
    np.testing.assert_array_equal(back[S.CONTENT_PROFILE], np.array([0.6, 0.0, -0.8], np.float32))
    assert back[S.CONTENT_PROFILE_WEIGHT] == 7.0
    user = UserFeatures.from_rows(round_trip(ROWS))
    np.testing.assert_array_equal(user.content_profile, np.array([0.6, 0.0, -0.8], np.float32))
    assert user.values[S.CONTENT_PROFILE_WEIGHT] == 7.0
    # no row, a row of nulls (Redis), an empty list (no engagement): nothing travels
    row: dict[str, Any] | None
    for row in (
        None,
        {S.CONTENT_PROFILE: None, S.CONTENT_PROFILE_WEIGHT: None},
        {S.CONTENT_PROFILE: []},
    ):
        rows: dict[str, Any] = {**ROWS, S.USER_CONTENT_PROFILE: row}
        assert len(to_proto(rows).content_profile) == 0
        assert round_trip(rows)[S.USER_CONTENT_PROFILE] is None
        assert len(UserFeatures.from_rows(rows).content_profile) == 0
        assert UserFeatures.from_rows(rows).values[S.CONTENT_PROFILE_WEIGHT] == 0.0
    # the weight alone (no engagement in the window: an empty list and a weight of 0)
    idle = {S.CONTENT_PROFILE: [], S.CONTENT_PROFILE_WEIGHT: 0.0}
    assert round_trip({**ROWS, S.USER_CONTENT_PROFILE: idle})[S.USER_CONTENT_PROFILE] == {
        S.CONTENT_PROFILE_WEIGHT: 0.0
    }
    assert UserFeatures.unknown().content_profile.shape == (0,)


def _msg(**fields: Any) -> common_pb2.UserFeatures:
    base: dict[str, Any] = {
        "known": True,
        "affinity_categories": [1, 2, 3],
        "affinity_weights": [3.0, 2.0, 1.0],
        "number_names": ["affinity_total"],
        "number_values": [9.0],
    }
    return common_pb2.UserFeatures(**{**base, **fields})


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: _msg(affinity_weights=[3.0, 2.0]),
            "user.affinity_weights must align with user.affinity_categories, got 2 entries for 3",
        ),
        (
            lambda: _msg(affinity_categories=[1, 2]),
            "user.affinity_weights must align with user.affinity_categories, got 3 entries for 2",
        ),
        (
            lambda: _msg(affinity_weights=[3.0, -0.5, 1.0]),
            "user.affinity_weights must be finite and non-negative, got -0.5 at position 1",
        ),
        (
            lambda: _msg(affinity_weights=[3.0, 2.0, math.nan]),
            "user.affinity_weights must be finite and non-negative, got nan at position 2",
        ),
        (
            lambda: _msg(affinity_weights=[math.inf, 2.0, 1.0]),
            "user.affinity_weights must be finite and non-negative, got inf at position 0",
        ),
        (
            lambda: _msg(affinity_categories=[1, -4, 3]),
            "user.affinity_categories must be non-negative, got -4 at position 1",
        ),
        (
            lambda: _msg(
                affinity_categories=list(range(MAX_LIST + 1)),
                affinity_weights=[1.0] * (MAX_LIST + 1),
            ),
            f"user.affinity_categories must have at most {MAX_LIST} entries, got {MAX_LIST + 1}",
        ),
        (
            lambda: _msg(affinity_categories=[], affinity_weights=[1.0] * (MAX_LIST + 1)),
            f"user.affinity_weights must have at most {MAX_LIST} entries, got {MAX_LIST + 1}",
        ),
        (
            lambda: _msg(number_values=[-1.0]),
            "user.number_values: affinity_total must be >= 0, got -1.0",
        ),
        (
            lambda: _msg(number_names=["content_profile_weight"], number_values=[-2.0]),
            "user.number_values: content_profile_weight must be >= 0, got -2.0",
        ),
        (lambda: _msg(number_values=[math.inf]), "user.number_values must be finite, got inf"),
        (
            lambda: _msg(string_names=["affinity_total"], string_values=["9"]),
            "user.string_names must be string user features, got 'affinity_total'",
        ),
        (
            lambda: _msg(number_names=["affinity_weights"]),
            "user.number_names must be number user features, got 'affinity_weights'",
        ),
        (
            lambda: _msg(recent_sellers=[4, 5], recent_seller_days=[1.0]),
            "user.recent_seller_days must align with user.recent_sellers, got 1 entries for 2",
        ),
        (
            lambda: _msg(recent_sellers=[4], recent_seller_days=[math.nan]),
            "user.recent_seller_days must be finite, got nan at position 0",
        ),
        (
            lambda: _msg(content_profile=[0.6, math.inf]),
            "user.content_profile must be finite, got inf at position 1",
        ),
        (
            lambda: _msg(content_profile=[0.0] * (MAX_LIST + 1)),
            f"user.content_profile must have at most {MAX_LIST} entries, got {MAX_LIST + 1}",
        ),
    ],
    ids=[
        "fewer-weights",
        "fewer-categories",
        "negative-weight",
        "nan-weight",
        "inf-weight",
        "negative-category",
        "too-many-categories",
        "too-many-weights",
        "negative-total",
        "negative-profile-weight",
        "inf-total",
        "total-as-string",
        "list-as-number",
        "misaligned-sellers",
        "nan-seller-days",
        "inf-profile",
        "too-long-profile",
    ],
)
def test_malformed_user_features_are_invalid_argument_naming_the_field(
    make: Callable[[], common_pb2.UserFeatures], message: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        from_proto(make())
    assert str(info.value) == message
    assert len(str(info.value)) < 200  # bounded, whatever the lists' length


def test_the_field_prefix_is_the_callers() -> None:
    with pytest.raises(InvalidArgument, match=r"^request\.user\.affinity_weights must align"):
        from_proto(_msg(affinity_weights=[1.0]), field="request.user")


def test_well_formed_edges_are_accepted() -> None:
    zero = from_proto(_msg(affinity_weights=[0.0, 0.0, 0.0], number_values=[0.0]))
    affinity = zero[S.USER_CATEGORY_AFFINITY]
    assert affinity is not None and affinity[S.AFFINITY_TOTAL] == 0.0
    assert affinity[S.AFFINITY_WEIGHTS].tolist() == [0.0, 0.0, 0.0]
    many = MAX_LIST
    full = from_proto(_msg(affinity_categories=list(range(many)), affinity_weights=[1.0] * many))
    affinity = full[S.USER_CATEGORY_AFFINITY]
    assert affinity is not None and len(affinity[S.AFFINITY_CATEGORIES]) == many


# --- the readers over a hand-made SQLite online store ----------------------------------------

PROJECT = "hf"
KEY_VERSION = 3
SNAPSHOT = datetime(2026, 1, 10, tzinfo=UTC)
SNAPSHOT_S = int(SNAPSHOT.timestamp())
# one user's rows, one stamp per view: the batch views at the snapshot, recent activity an
# hour after it
STORED: dict[str, dict[str, Any]] = {
    S.USER_PROFILE: {"country": "DE", "clicks_30d": 7},
    S.USER_CONTENT_PROFILE: {S.CONTENT_PROFILE: [0.6, 0.0, -0.8], S.CONTENT_PROFILE_WEIGHT: 7.0},
    S.USER_RECENT_ACTIVITY: {"views_24h": 2},
}
STAMP_S = {S.USER_PROFILE: SNAPSHOT_S, S.USER_CONTENT_PROFILE: SNAPSHOT_S}
STAMP_S[S.USER_RECENT_ACTIVITY] = SNAPSHOT_S + 3600
USER = 42


def _value(name: str, value: Any) -> Any:
    from feast.protos.feast.types.Value_pb2 import FloatList, Value

    kind = KIND_OF[name]
    if kind == "float32[]":
        return Value(float_list_val=FloatList(val=value))
    if kind == "string":
        return Value(string_val=value)
    return Value(int64_val=value) if kind == "int64" else Value(float_val=value)


def _key(user_id: int) -> Any:
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    return EntityKey(join_keys=["user_id"], entity_values=[Value(int64_val=user_id)])


def _online_db(path: Path) -> Path:
    """Feast's SQLite layout: a table per view, a row per (entity, feature)."""
    from feast.infra.key_encoding_utils import serialize_entity_key

    key = serialize_entity_key(_key(USER), entity_key_serialization_version=KEY_VERSION)
    with sqlite3.connect(path) as con:
        for view in USER_VIEWS:
            con.execute(
                f'CREATE TABLE "{PROJECT}_{view}" (entity_key BLOB, feature_name TEXT, '
                "value BLOB, event_ts timestamp, created_ts timestamp)"
            )
            stamp = datetime.fromtimestamp(STAMP_S.get(view, 0), UTC).replace(tzinfo=None)
            for name, value in STORED.get(view, {}).items():
                con.execute(
                    f'INSERT INTO "{PROJECT}_{view}" VALUES (?, ?, ?, ?, ?)',
                    (key, name, _value(name, value).SerializeToString(), str(stamp), str(stamp)),
                )
    return path


class _Provider:
    """Feast's provider ``online_read`` over the same rows (a datetime stamp per view)."""

    def online_read(self, config: Any, table: Any, entity_keys: list[Any]) -> list[Any]:
        (key,) = entity_keys
        values = STORED.get(table, {}) if key == _key(USER) else {}
        stamp = datetime.fromtimestamp(STAMP_S[table], UTC) if values else None
        return [(stamp, {n: _value(n, v) for n, v in values.items()} or None)]


class _Store:
    config = None

    def _get_provider(self) -> _Provider:
        return _Provider()

    def get_feature_view(self, name: str, allow_registry_cache: bool = False) -> str:
        return name


def test_both_readers_expire_the_content_profile_with_the_snapshot_views(tmp_path: Path) -> None:
    fast = SqliteUserReader(_online_db(tmp_path / "online.db"), PROJECT, KEY_VERSION)
    provider = ProviderUserReader(_Store())  # type: ignore[arg-type]
    ttl = S.TTL_SECONDS[S.USER_CONTENT_PROFILE]
    assert ttl == S.TTL_SECONDS[S.USER_PROFILE] == S.SNAPSHOT_TTL_DAYS * 86_400
    for reader in (fast, provider):
        rows = reader.read(USER)  # no time: no TTL check
        assert rows[S.USER_CATEGORY_AFFINITY] is None and rows[S.USER_SELLER_RECENCY] is None
        profile = rows[S.USER_CONTENT_PROFILE]
        assert profile is not None
        np.testing.assert_allclose(profile[S.CONTENT_PROFILE], [0.6, 0.0, -0.8], rtol=1e-6)
        within = reader.read(USER, SNAPSHOT_S + ttl)  # the last second inside the TTL
        assert within[S.USER_CONTENT_PROFILE] == profile
        assert within[S.USER_PROFILE] is not None
        assert within[S.USER_RECENT_ACTIVITY] is None  # 24 h, long past
        late = reader.read(USER, SNAPSHOT_S + ttl + 1)
        assert late[S.USER_CONTENT_PROFILE] is None and late[S.USER_PROFILE] is None
        assert len(UserFeatures.from_rows(late).content_profile) == 0
        assert reader.read(USER + 1, SNAPSHOT_S) == dict.fromkeys(USER_VIEWS)
    fast.close()
