"""Training sets: split arithmetic, labels, downsampling weights, propensities, and the whole
stage on the tiny preset through the real Feast store."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from contract import columns as C
from contract.timeutil import to_ns
from feature_repo import schema as S
from training.dataset import (
    EXAMINATION,
    IPS_WEIGHT,
    DatasetConfig,
    add_sampled_negatives,
    downsample,
    label_impressions,
    plan_split,
)

START = pd.Timestamp("2026-01-05", tz="UTC")


def test_split_follows_the_ratio_and_stops_a_label_window_before_the_end():
    s = plan_split(START, START + pd.Timedelta(days=81), DatasetConfig())
    assert (s.train_end - s.train_start).days == 60
    assert (s.valid_end - s.train_end).days == 7 and (s.test_end - s.valid_end).days == 7
    assert s.test_end == START + pd.Timedelta(days=74)
    with pytest.raises(ValueError, match="leaves 2 labelled days"):
        plan_split(START, START + pd.Timedelta(days=9), DatasetConfig())


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
    affinity = train[S.AFFINITY_FOR_ITEM]
    assert affinity.between(0, 1).all() and affinity.nunique() > 10
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


def test_affinity_for_items_reads_the_candidates_category_and_priors_missing_users():
    import pyarrow as pa

    from training.dataset import affinity_for_items

    vectors = pa.chunked_array(
        [
            pa.array([[0.1, 0.2, 0.7], None], pa.list_(pa.float32())),
            pa.array([[0.5, 0.25, 0.25]], pa.list_(pa.float32())),
        ]
    )
    out = affinity_for_items(vectors, np.array([2, 1, 0]), 3)
    np.testing.assert_allclose(out, [0.7, 1 / 3, 0.5], rtol=1e-6)
    unknown_category = affinity_for_items(vectors, np.array([-1, 0, 5]), 3)
    np.testing.assert_allclose(unknown_category, [1 / 3, 1 / 3, 1 / 3], rtol=1e-6)
