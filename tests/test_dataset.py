"""Training sets: split arithmetic (by ratio and by dates), labels and the label choice,
downsampling weights, propensities, and the whole stage on the tiny preset through the real
Feast store."""

from __future__ import annotations

import itertools
import re
from typing import Any

import numpy as np
import pandas as pd
import pytest

from contract import affinity, content
from contract import columns as C
from contract.timeutil import to_ns
from feature_repo import schema as S
from training.dataset import (
    EXAMINATION,
    IPS_WEIGHT,
    LABEL,
    DatasetConfig,
    SingleClassLabelError,
    add_sampled_negatives,
    assign_split,
    build_training_sets,
    downsample,
    label_impressions,
    plan_split,
    require_periods,
    require_two_classes,
)

START = pd.Timestamp("2026-01-05", tz="UTC")


def test_split_follows_the_ratio_and_stops_a_label_window_before_the_end():
    s = plan_split(START, START + pd.Timedelta(days=81), DatasetConfig())
    assert (s.train_end - s.train_start).days == 60
    assert (s.valid_end - s.train_end).days == 7 and (s.test_end - s.valid_end).days == 7
    assert s.test_end == START + pd.Timedelta(days=74)
    with pytest.raises(ValueError, match="leaves 2 labelled days") as err:
        plan_split(START, START + pd.Timedelta(days=9), DatasetConfig())
    assert "7-day label window of purchase (--label-window-days)" in str(err.value)
    # a click label's default window is a day: the same 9 days leave 8 labelled days
    s = plan_split(START, START + pd.Timedelta(days=9), DatasetConfig(label="click"))
    assert s.test_end == START + pd.Timedelta(days=8)


def test_weekly_split_units_fall_on_whole_weeks():
    s = plan_split(START, START + pd.Timedelta(days=365), DatasetConfig(split_unit_days=7))
    bounds = (s.train_start, s.train_end, s.valid_end, s.test_end)
    for a, b in itertools.pairwise(bounds):
        assert (b - a).days % 7 == 0 and (b - a).days >= 7
    assert s.test_end <= START + pd.Timedelta(days=365 - 7)


def test_sampled_negatives_share_the_request_and_never_repeat_its_purchases():
    n_items, rows = 50, 400
    rng = np.random.default_rng(0)
    imp = pd.DataFrame(
        {
            C.IMPRESSION_ID: np.arange(rows, dtype=np.int64),
            C.REQUEST_ID: np.arange(rows, dtype=np.int64) // 4,
            C.USER_ID: np.arange(rows, dtype=np.int64) // 8,
            C.ITEM_ID: rng.integers(0, 5, rows),  # purchases concentrate on items 0..4
            C.TS: START + pd.to_timedelta(np.arange(rows), unit="min"),
            C.POLICY: C.POLICY_ORGANIC,
            C.LABEL_CLICK: np.int8(0),
            C.LABEL_ATC: np.int8(0),
            C.LABEL_PURCHASE: np.int8(1),
            C.SPLIT: "train",
        }
    )
    items = pd.DataFrame({C.ITEM_ID: np.arange(n_items, dtype=np.int64)})
    out = add_sampled_negatives(imp, items, 3, seed=1)
    neg = out[out[C.POLICY] == C.POLICY_SAMPLED]
    assert len(imp) < len(out) <= len(imp) * 4
    assert (neg[C.LABEL_PURCHASE] == 0).all() and neg[C.IMPRESSION_ID].is_unique
    assert not set(neg[C.IMPRESSION_ID]) & set(imp[C.IMPRESSION_ID])
    bought = set(zip(imp[C.REQUEST_ID], imp[C.ITEM_ID], strict=True))
    assert not bought & set(zip(neg[C.REQUEST_ID], neg[C.ITEM_ID], strict=True))
    # popularity-weighted: the five bought items are drawn far above their 10 % catalogue share
    assert neg[C.ITEM_ID].isin(range(5)).mean() > 0.5
    # a negative keeps its request's user and time
    first = imp.drop_duplicates(C.REQUEST_ID).set_index(C.REQUEST_ID)
    assert (first.loc[neg[C.REQUEST_ID], C.USER_ID].to_numpy() == neg[C.USER_ID].to_numpy()).all()
    assert add_sampled_negatives(imp, items, 0, seed=1) is imp


def test_purchase_label_needs_the_purchase_within_the_window(tables):
    tables[C.PURCHASES] = pd.DataFrame(
        {
            C.IMPRESSION_ID: [0, 2],
            C.TS: [
                tables[C.IMPRESSIONS][C.TS][0] + pd.Timedelta(days=8),  # too late
                tables[C.IMPRESSIONS][C.TS][2] + pd.Timedelta(days=6, hours=23),
            ],
            C.PRICE: [10.0, 10.0],
            C.QUANTITY: [1, 1],
        }
    )
    labelled = label_impressions(tables, 7).set_index(C.IMPRESSION_ID)
    assert labelled[C.LABEL_PURCHASE].to_dict() == {0: 0, 1: 0, 2: 1, 3: 0}
    assert labelled[C.LABEL_CLICK].to_dict() == {0: 1, 1: 0, 2: 1, 3: 0}
    assert labelled[C.LABEL_ATC].to_dict() == {0: 0, 1: 0, 2: 1, 3: 0}


def test_downsampling_keeps_positives_and_reweights_negatives():
    n = 20_000
    frame = pd.DataFrame(
        {
            C.LABEL_CLICK: (np.arange(n) % 10 == 0).astype(np.int8),
            C.LABEL_ATC: 0,
            C.LABEL_PURCHASE: 0,
            C.SPLIT: np.where(np.arange(n) < 15_000, "train", "test"),
        }
    )
    kept = downsample(frame, DatasetConfig(negative_rate=0.2, eval_negative_rate=1.0))
    train = kept[kept[C.SPLIT] == "train"]
    assert train[C.LABEL_CLICK].sum() == 1_500  # every positive
    negatives = train[train[C.LABEL_CLICK] == 0]
    assert (negatives[C.WEIGHT] == 5.0).all()
    assert abs(negatives[C.WEIGHT].sum() - 13_500) < 4 * np.sqrt(13_500 * 0.8 / 0.2)
    assert (kept[C.SPLIT] == "test").sum() == 5_000  # eval splits whole


def test_tiny_training_sets(tiny_dataset, home):
    manifest = tiny_dataset["manifest"]
    folder = home.training_sets(tiny_dataset["dataset"])
    parts = {name: pd.read_parquet(folder / f"{name}.parquet") for name in C.SPLITS}
    split = {k: pd.Timestamp(v) for k, v in manifest["split"].items()}
    for name, (lo, hi) in {
        "train": ("train_start", "train_end"),
        "valid": ("train_end", "valid_end"),
        "test": ("valid_end", "test_end"),
    }.items():
        ts = parts[name][C.EVENT_TIMESTAMP]
        assert len(ts) == manifest["rows"][name] > 0
        assert ts.min() >= split[lo] and ts.max() < split[hi], name
    assert manifest["impressions_censored"] > 0  # the last label window is dropped, not negative
    train = parts["train"]
    for column in S.training_columns():
        assert column in train and not train[column].isna().any(), column
    for_item = train[S.AFFINITY_FOR_ITEM]
    assert for_item.between(0, 1).all() and for_item.nunique() > 10
    assert {EXAMINATION, IPS_WEIGHT, C.POSITION, C.PROPENSITY, C.WEIGHT} <= set(train.columns)
    assert (train[IPS_WEIGHT] >= 1.0).all() and (train[IPS_WEIGHT] <= 20.0).all()
    # labels agree with the raw logs
    raw_buys = pd.read_parquet(home.raw(tiny_dataset["dataset"]) / "purchases.parquet")
    bought = set(raw_buys[C.IMPRESSION_ID])
    positives = train[train[C.LABEL_PURCHASE] == 1][C.IMPRESSION_ID]
    assert positives.isin(bought).all() and len(positives) > 0


def test_training_features_match_an_independent_point_in_time_lookup(tiny_dataset, home):
    """item_stats in the training set equal the feature table's latest snapshot at or before
    each impression, looked up with pandas instead of Feast."""
    train = pd.read_parquet(home.training_sets(tiny_dataset["dataset"]) / "train.parquet")
    sample = train.sample(300, random_state=1).sort_values(C.EVENT_TIMESTAMP)
    stats = pd.read_parquet(home.features(tiny_dataset["dataset"]) / f"{S.ITEM_STATS}.parquet")
    stats = stats.sort_values(S.EVENT_TIMESTAMP)
    expected = pd.merge_asof(
        sample[[C.EVENT_TIMESTAMP, C.ITEM_ID]].assign(
            **{C.EVENT_TIMESTAMP: sample[C.EVENT_TIMESTAMP].dt.as_unit("us")}
        ),
        stats[[S.EVENT_TIMESTAMP, C.ITEM_ID, "clicks_7d", "ctr_7d"]],
        on=S.EVENT_TIMESTAMP,
        by=C.ITEM_ID,
        direction="backward",
    )
    np.testing.assert_array_equal(expected["clicks_7d"].to_numpy(), sample["clicks_7d"].to_numpy())
    np.testing.assert_allclose(
        expected["ctr_7d"].to_numpy(), sample["ctr_7d"].to_numpy(), rtol=1e-6
    )
    assert (to_ns(sample[C.EVENT_TIMESTAMP]) > 0).all()


def test_the_affinity_join_gives_what_feasts_point_in_time_join_gives(tiny_dataset, home):
    """historical_features joins the affinity view itself (to keep per-row lists out of
    memory); on every training row it must equal Feast's own join of that view, reduced to
    the item's category by contract.affinity.for_items one row at a time, including rows
    with no snapshot in the TTL (no engagement) and the total."""
    from contract.feature_store import open_store
    from training.dataset import ItemContent, historical_features
    from training.stages import load_raw

    dataset = tiny_dataset["dataset"]
    store = open_store(dataset, paths=home)
    rows = pd.concat(
        pd.read_parquet(home.training_sets(dataset) / f"{name}.parquet") for name in C.SPLITS
    )
    entity = rows[[C.USER_ID, C.ITEM_ID, C.SELLER_ID, C.EVENT_TIMESTAMP]].reset_index(drop=True)
    entity[C.EVENT_TIMESTAMP] = entity[C.EVENT_TIMESTAMP].dt.as_unit("us")
    entity["row"] = np.arange(len(entity))
    items = load_raw(home, dataset)[C.ITEMS]
    n_cat = int(items[C.CATEGORY].max()) + 1
    ours = historical_features(store, entity, n_cat, ItemContent(items)).sort_values("row")
    view = S.USER_CATEGORY_AFFINITY
    feast = (
        store.get_historical_features(
            entity_df=entity,
            features=[
                f"{view}:{S.AFFINITY_CATEGORIES}",
                f"{view}:{S.AFFINITY_WEIGHTS}",
                f"{view}:{S.AFFINITY_TOTAL}",
                f"{S.ITEM_STATS}:category",
                f"{S.ITEM_STATS}:category_share",
                f"{S.USER_CONTENT_PROFILE}:{S.CONTENT_PROFILE}",
            ],
        )
        .to_df()
        .sort_values("row")
    )
    expected = np.array(
        [
            affinity.for_items(
                None if not isinstance(cats, np.ndarray | list) else np.asarray(cats),
                None if not isinstance(weights, np.ndarray | list) else np.asarray(weights),
                0.0 if pd.isna(total) else total,
                np.array([-1 if pd.isna(cat) else int(cat)]),
                np.array([0.0 if pd.isna(share) else share]),
                n_cat,
            )[0]
            for cats, weights, total, cat, share in zip(
                feast[S.AFFINITY_CATEGORIES],
                feast[S.AFFINITY_WEIGHTS],
                feast[S.AFFINITY_TOTAL],
                feast["category"],
                feast["category_share"],
                strict=True,
            )
        ],
        dtype=np.float32,
    )
    engaged = feast[S.AFFINITY_TOTAL].fillna(0).to_numpy() > 0
    assert engaged.any() and (~engaged).any()
    np.testing.assert_allclose(ours[S.AFFINITY_FOR_ITEM].to_numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(
        ours[S.AFFINITY_TOTAL].to_numpy(), feast[S.AFFINITY_TOTAL].fillna(0).to_numpy()
    )
    # the content profile, reduced one row at a time by the rule serving uses
    unit = content.table_unit(items)
    row_of = pd.Index(items[C.ITEM_ID])
    profile = [
        p if isinstance(p, np.ndarray | list) and len(p) else None for p in feast[S.CONTENT_PROFILE]
    ]
    cosine = np.array(
        [
            content.similarity(p, unit[[row_of.get_loc(int(i))]])[0]
            for p, i in zip(profile, feast[C.ITEM_ID], strict=True)
        ],
        dtype=np.float32,
    )
    has = np.array([p is not None for p in profile])
    assert has.any() and (~has).any() and (cosine[has] != 0).all()
    np.testing.assert_array_equal(ours[S.CONTENT_AFFINITY_FOR_ITEM].to_numpy(), cosine)


PERIODS = {
    "train": ("train_start", "train_end"),
    "valid": ("train_end", "valid_end"),
    "test": ("valid_end", "test_end"),
}


def day(n: int) -> pd.Timestamp:
    return START + pd.Timedelta(days=n)


def dates(
    train: int | None, valid: int | None, test: int | None
) -> tuple[str | None, str | None, str | None]:
    """``split_dates`` from day numbers."""
    train_end, valid_end, test_end = (
        None if d is None else day(d).date().isoformat() for d in (train, valid, test)
    )
    return train_end, valid_end, test_end


def test_a_date_split_is_honoured_and_the_test_end_defaults_to_the_last_labelled_day():
    cfg = DatasetConfig(split_dates=dates(40, 50, 60))
    s = plan_split(START + pd.Timedelta(hours=5), day(81), cfg)
    assert (s.train_start, s.train_end, s.valid_end, s.test_end) == (
        day(0),
        day(40),
        day(50),
        day(60),
    )
    s = plan_split(START, day(81), DatasetConfig(split_dates=dates(40, 50, None)))
    assert s.test_end == day(74)  # 81 days, less the 7-day purchase window
    s = plan_split(START, day(81), DatasetConfig(label="click", split_dates=dates(40, 50, None)))
    assert s.test_end == day(80)


@pytest.mark.parametrize(
    ("split_days", "message"),
    [
        ((50, 40, 60), "split dates must increase, so that no period is left empty"),
        ((40, 40, 60), "split dates must increase"),  # an empty valid period
        ((40, 50, 50), "got 2026-02-14, 2026-02-24, 2026-02-24"),
        ((0, 50, 60), "--train-end 2026-01-05 leaves the train period empty"),
        ((-3, 50, 60), "leaves the train period empty: the data covers 2026-01-05..2026-03-27"),
        ((40, 50, 78), "--test-end 2026-03-24 is past the last labelled day"),
        ((40, 76, None), "--test-end defaults to 2026-03-20"),
    ],
)
def test_a_date_split_that_leaves_a_period_empty_or_leaves_the_data_is_refused(split_days, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        plan_split(START, day(81), DatasetConfig(split_dates=dates(*split_days)))


def test_the_label_and_split_options_are_checked_when_set():
    with pytest.raises(ValueError, match="label \\(--label\\) must be one of purchase, "):
        DatasetConfig(label="view")
    with pytest.raises(ValueError, match="--label-window-days\\) must be at least 1 day, got 0"):
        DatasetConfig(label_window_days=0)
    with pytest.raises(ValueError, match=r"by ratio \(--split-ratio\) or by dates .*not both"):
        DatasetConfig(split_ratio=(8, 1, 1), split_dates=dates(40, 50, 60))
    with pytest.raises(ValueError, match="--split-ratio\\) must be three positive numbers"):
        DatasetConfig(split_ratio=(8, 0, 1))
    with pytest.raises(ValueError, match="--valid-end missing"):
        DatasetConfig(split_dates=dates(40, None, 60))
    with pytest.raises(ValueError, match="--train-end expects a UTC date YYYY-MM-DD"):
        plan_split(START, day(81), DatasetConfig(split_dates=("soon", "2026-02-01", None)))
    assert DatasetConfig(label="add_to_cart").window_days == 1
    assert DatasetConfig(label="add_to_cart", label_window_days=3).window_days == 3


def test_the_window_bounds_every_outcome(tables):
    tables[C.CLICKS] = pd.DataFrame(
        {
            C.IMPRESSION_ID: [0, 2],
            C.TS: [ts + pd.Timedelta(days=2) for ts in tables[C.IMPRESSIONS][C.TS][[0, 2]]],
        }
    )
    one_day = label_impressions(tables, 1).set_index(C.IMPRESSION_ID)
    assert one_day[C.LABEL_CLICK].sum() == 0  # both clicks came two days after the impression
    assert one_day[C.LABEL_PURCHASE].to_dict() == {0: 0, 1: 0, 2: 1, 3: 0}  # 0.7 days
    assert label_impressions(tables, 2).set_index(C.IMPRESSION_ID)[C.LABEL_CLICK].sum() == 2


def test_a_period_without_impressions_is_refused():
    imp = pd.DataFrame({C.TS: [day(1), day(2), day(9)]})
    split = plan_split(START, day(20), DatasetConfig(split_dates=dates(5, 8, 12)))
    imp[C.SPLIT] = assign_split(imp, split)
    with pytest.raises(ValueError, match=r"the valid period 2026-01-10\.\.2026-01-13 holds no"):
        require_periods({str(k): int(v) for k, v in imp[C.SPLIT].value_counts().items()}, split)


def test_a_single_class_label_names_label_split_rows_and_the_way_out():
    frame = pd.DataFrame(
        {
            C.LABEL_PURCHASE: np.zeros(1200, np.int8),
            C.LABEL_CLICK: (np.arange(1200) % 3 == 0).astype(np.int8),
            C.LABEL_ATC: np.zeros(1200, np.int8),
        }
    )
    with pytest.raises(SingleClassLabelError) as err:
        require_two_classes(frame, C.LABEL_PURCHASE, "the valid split", "purchase", 7)
    message = str(err.value)
    assert message.startswith(
        "the purchase (within 7 days) label has a single class in the valid split: none of "
        "its 1,200 rows is positive"
    )
    assert (
        "pick another --label (positive rows of the others there: add_to_cart 0, click 400)"
        in message
    )
    assert "or a longer --label-window-days if purchase comes later than 7 day(s)" in message
    with pytest.raises(SingleClassLabelError, match="all 1,200 rows are positive"):
        require_two_classes(frame.assign(x=1), "x", "the train split", "click", 1)
    require_two_classes(frame, C.LABEL_CLICK, "the train split", "click", 1)  # two classes: passes


class NoStore:
    """A feature store that fails the test when reached: the label check comes before Feast."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the Feast join started (store.{name}) before the label check")


def click_only(tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """The tables as a click log such as the Open Bandit sample: no cart, no purchase."""
    out = dict(tables)
    out[C.ADD_TO_CARTS] = tables[C.ADD_TO_CARTS].iloc[0:0]
    out[C.PURCHASES] = tables[C.PURCHASES].iloc[0:0]
    return out


@pytest.fixture(scope="module")
def tiny_tables(tiny_dataset, home):
    from training.stages import load_raw

    return load_raw(home, tiny_dataset["dataset"])


def test_a_label_without_positives_stops_the_stage_before_the_feast_join(tiny_tables, tmp_path):
    store: Any = NoStore()
    with pytest.raises(SingleClassLabelError) as err:
        build_training_sets(click_only(tiny_tables), store, tmp_path, DatasetConfig())
    message = str(err.value)
    assert "the purchase (within 7 days) label has a single class in the log: none of" in message
    assert (
        "pick another --label (positive rows of the others there: add_to_cart 0, click " in message
    )

    # purchases logged only from the valid period on: the train split has none
    tables = dict(tiny_tables)
    shown = tables[C.IMPRESSIONS].set_index(C.IMPRESSION_ID)[C.TS]
    buys = tables[C.PURCHASES]
    late = shown.reindex(buys[C.IMPRESSION_ID]).to_numpy() >= pd.Timestamp("2026-01-10", tz="UTC")
    tables[C.PURCHASES] = buys[late]
    with pytest.raises(SingleClassLabelError, match="single class in the train split: none of"):
        build_training_sets(tables, store, tmp_path, DatasetConfig())
    assert not any(tmp_path.iterdir())  # nothing written


def test_click_label_and_date_split_on_a_click_log(tiny_dataset, tiny_tables, home, tmp_path):
    from contract.feature_store import open_store

    store = open_store(tiny_dataset["dataset"], paths=home)
    end = pd.Timestamp(tiny_dataset["sim"]["window_end"])
    cfg = DatasetConfig(label="click", split_dates=("2026-01-12", "2026-01-15", None))
    manifest = build_training_sets(click_only(tiny_tables), store, tmp_path, cfg, data_end=end)

    assert manifest["label"] == {
        "kind": "click",
        "column": C.LABEL_CLICK,
        "window_days": 1,
        "score": "expected clicked value: p(click) x price x margin, not GMV",
        "positive_rows": manifest["label"]["positive_rows"],
    }
    assert manifest["split_by"] == "dates"
    assert manifest["config"]["split_dates"] == ["2026-01-12", "2026-01-15", None]
    assert manifest["config"]["split_ratio"] is None
    assert manifest["split"] == {
        "train_start": "2026-01-05T00:00:00+00:00",
        "train_end": "2026-01-12T00:00:00+00:00",
        "valid_end": "2026-01-15T00:00:00+00:00",
        "test_end": "2026-01-18T00:00:00+00:00",  # the 14-day log less the 1-day window
    }
    for name in C.SPLITS:
        part = pd.read_parquet(tmp_path / f"{name}.parquet")
        assert (part[LABEL] == part[C.LABEL_CLICK]).all() and part[C.LABEL_PURCHASE].eq(0).all()
        assert manifest["label"]["positive_rows"][name] == part[LABEL].sum() > 0
        assert 0 < part[LABEL].mean() < 1
        lo, hi = (pd.Timestamp(manifest["split"][k]) for k in PERIODS[name])
        assert part[C.EVENT_TIMESTAMP].between(lo, hi, inclusive="left").all(), name


def test_the_default_manifest_records_purchase_and_the_ratio(tiny_dataset):
    manifest = tiny_dataset["manifest"]
    assert manifest["label"]["kind"] == "purchase" and manifest["label"]["window_days"] == 7
    assert manifest["split_by"] == "ratio" and manifest["config"]["split_ratio"] == [60, 7, 7]
    assert manifest["config"]["label_window_days"] == 7 and "purchase_7d" in manifest["label_rates"]


def test_the_cli_passes_label_and_split_and_refuses_both_splits(monkeypatch, capsys):
    from tools.cli import main

    seen: dict[str, Any] = {}

    def fake_stage(paths, dataset, **kw):
        seen.update(kw, dataset=dataset)
        return {"rows": {}}

    monkeypatch.setattr("training.stages.dataset_stage", fake_stage)
    argv = ["dataset", "--dataset", "obd", "--label", "click", "--label-window-days", "2"]
    assert main([*argv, "--train-end", "2019-11-27", "--valid-end", "2019-11-29"]) == 0
    assert seen == {
        "dataset": "obd",
        "label": "click",
        "label_window_days": 2,
        "split_dates": ("2019-11-27", "2019-11-29", None),
    }
    seen.clear()
    assert main(["dataset", "--split-ratio", "8,1,1", "--eval-max-rows", "5000"]) == 0
    assert seen["split_ratio"] == (8.0, 1.0, 1.0) and seen["label"] == "purchase"
    assert seen["eval_max_rows"] == 5000
    assert "label_window_days" not in seen and "split_dates" not in seen

    monkeypatch.undo()
    capsys.readouterr()
    assert main(["dataset", "--split-ratio", "8,1,1", "--train-end", "2019-11-27"]) == 2
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["dataset", "--train-end", "27/11/2019"])
    assert "expects a UTC date YYYY-MM-DD, got '27/11/2019'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["dataset", "--label-window-days", "0"])
    with pytest.raises(SystemExit):
        main(["dataset", "--split-ratio", "8,1"])
    assert "expects three positive numbers train,valid,test" in capsys.readouterr().err


def test_joining_in_chunks_gives_the_same_rows_as_one_join(tiny_dataset, home):
    """The dataset stage joins at most join_chunk_rows entity rows at a time (its memory's
    bound); every joined value must be what one whole join gives."""
    from contract.feature_store import open_store
    from training.dataset import ItemContent, join_in_chunks
    from training.stages import load_raw

    dataset = tiny_dataset["dataset"]
    store = open_store(dataset, paths=home)
    rows = pd.read_parquet(home.training_sets(dataset) / "valid.parquet").head(3000)
    entity = rows[[C.USER_ID, C.ITEM_ID, C.SELLER_ID, C.EVENT_TIMESTAMP]].reset_index(drop=True)
    entity[C.EVENT_TIMESTAMP] = entity[C.EVENT_TIMESTAMP].dt.as_unit("us")
    entity["row"] = np.arange(len(entity))
    items = load_raw(home, dataset)[C.ITEMS]
    n_cat, item_content = int(items[C.CATEGORY].max()) + 1, ItemContent(items)
    whole = join_in_chunks(store, entity, n_cat, item_content, chunk_rows=len(entity))
    chunked = join_in_chunks(store, entity, n_cat, item_content, chunk_rows=700)
    whole, chunked = (f.sort_values("row").reset_index(drop=True) for f in (whole, chunked))
    assert len(chunked) == len(entity)
    pd.testing.assert_frame_equal(chunked[whole.columns], whole)


def test_chunked_preparation_and_joins_write_what_one_pass_writes(tiny_dataset, tiny_tables, home):
    """Impressions are labelled, split and downsampled prepare_chunk_rows at a time and the
    join's chunks are appended to the files as they come: the training sets must be the ones
    a single pass writes, row for row and in order."""
    from contract.feature_store import open_store

    store = open_store(tiny_dataset["dataset"], paths=home)
    end = pd.Timestamp(tiny_dataset["sim"]["window_end"])
    n = len(tiny_tables[C.IMPRESSIONS])
    out = {}
    for name, cfg in {
        "one": DatasetConfig(prepare_chunk_rows=n, join_chunk_rows=10**9),
        "chunked": DatasetConfig(prepare_chunk_rows=n // 7 + 3, join_chunk_rows=5_000),
    }.items():
        folder = home.home / "chunked-test" / name
        manifest = build_training_sets(dict(tiny_tables), store, folder, cfg, data_end=end)
        out[name] = (manifest, {s: pd.read_parquet(folder / f"{s}.parquet") for s in C.SPLITS})
    (one, one_sets), (chunked, chunked_sets) = out["one"], out["chunked"]
    for split in C.SPLITS:
        a, b = one_sets[split], chunked_sets[split]
        assert len(a) > 1000
        pd.testing.assert_frame_equal(a, b)
        keys = list(zip(a[C.EVENT_TIMESTAMP], a[C.IMPRESSION_ID], strict=True))
        assert keys == sorted(keys)
    for key in ("rows", "label_rates", "impressions_labelled", "impressions_censored"):
        assert one[key] == chunked[key], key
    for split, rates in one["label_rates_by_split_weighted"].items():
        assert rates == pytest.approx(chunked["label_rates_by_split_weighted"][split])
    assert one["eval_request_share"] == {"valid": 1.0, "test": 1.0}


def test_large_eval_splits_keep_a_sample_of_whole_requests(tiny_dataset, tiny_tables, home):
    """Past eval_max_rows, valid and test keep a uniform sample of their requests, each one
    whole (per-request ranking metrics stay unbiased); train is untouched."""
    from contract.feature_store import open_store

    dataset = tiny_dataset["dataset"]
    store = open_store(dataset, paths=home)
    end = pd.Timestamp(tiny_dataset["sim"]["window_end"])
    full = {s: pd.read_parquet(home.training_sets(dataset) / f"{s}.parquet") for s in C.SPLITS}
    cap = len(full["valid"]) // 3
    folder = home.home / "eval-sample-test"
    manifest = build_training_sets(
        dict(tiny_tables), store, folder, DatasetConfig(eval_max_rows=cap), data_end=end
    )
    sampled = {s: pd.read_parquet(folder / f"{s}.parquet") for s in C.SPLITS}
    pd.testing.assert_frame_equal(sampled["train"], full["train"])
    for split in ("valid", "test"):
        share = manifest["eval_request_share"][split]
        assert 0.2 < share < 0.5
        assert 0.5 * cap < len(sampled[split]) < 1.5 * cap
        per_request = full[split].groupby(C.REQUEST_ID).size()
        kept = sampled[split].groupby(C.REQUEST_ID).size()
        assert kept.equals(per_request.reindex(kept.index))  # whole requests
        assert len(kept) < 0.6 * len(per_request)
    assert manifest["config"]["eval_max_rows"] == cap
