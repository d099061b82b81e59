"""The rankers on sim-tiny: feature matrix layout, schema hash, calibration, pruning and the
deadline, and the whole stage fit -> save -> load -> predict."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest

from contract import bundle
from contract import columns as C
from contract import features as F
from contract.calibration import Calibrator
from contract.features import DAY_OF_WEEK, FEATURE_SCHEMA, HOUR
from feature_repo import schema as S
from training.ranking import baselines as B
from training.ranking.calibration import fit_isotonic
from training.ranking.models import (
    RankerBudget,
    RankingData,
    decreasing_offset,
    fit_purchase,
    lambdamart_weights,
    offset_probability,
    purchase_datasets,
    relevance,
    tune,
    with_offset,
)
from training.ranking.train import (
    RankerResult,
    load,
    ranking_data,
    read_split,
    save,
    train_rankers,
)

SMALL_BUDGET = RankerBudget(
    trials=3,
    seconds=30,
    max_rounds=60,
    early_stopping_rounds=15,
    pruning_warmup_rounds=5,
    progress=False,
)


def handmade_columns(n: int = 3) -> dict[str, np.ndarray]:
    """Every input column, numeric ones holding 100 * (their schema position) + row."""
    cols: dict[str, np.ndarray] = {
        name: np.arange(n, dtype=np.float64) + 100 * j for j, name in enumerate(F.NUMERIC_COLUMNS)
    }
    cols["spend_band"] = np.array([0, 1, 4][:n])
    cols["avg_price_paid_30d"] = np.array([0.0, 20.0, 50.0][:n])
    cols[C.PRICE] = np.array([10.0, 40.0, 100.0][:n])
    cols[C.COUNTRY] = np.array(["DE", "unknown", None][:n], dtype=object)
    cols[C.DEVICE] = np.array(["web", "ios", "android"][:n], dtype=object)
    cols[C.SURFACE] = np.array(["CHECKOUT", "HOME", "HOME"][:n], dtype=object)
    cols[HOUR] = np.array([0, 13, 23][:n])
    cols[DAY_OF_WEEK] = np.array([6, 0, 3][:n])
    return cols


def test_build_matrix_columns_follow_the_schema_order():
    cols = handmade_columns()
    X = F.build_matrix(cols)
    schema = F.feature_schema()
    assert X.shape == (3, len(schema)) and X.dtype == np.float32 and X.flags.c_contiguous
    for name in F.NUMERIC_COLUMNS:
        np.testing.assert_array_equal(X[:, schema.index(name)], cols[name].astype(np.float32))

    def column(name: str) -> np.ndarray:
        return X[:, schema.index(name)]

    np.testing.assert_allclose(column(F.LOG_PRICE), np.log([10.0, 40.0, 100.0]), rtol=1e-6)
    np.testing.assert_allclose(column(F.PRICE_TO_AVG_PAID), [0.0, 2.0, 2.0])
    np.testing.assert_allclose(column(F.PRICE_TO_SPEND_BAND), [0.0, 40.0 / 12.5, 100.0 / 200.0])
    assert column(F.COUNTRY_CODE).tolist() == [C.COUNTRIES.index("DE"), 5, 5]  # unknown = len
    assert column(F.DEVICE_CODE).tolist() == [2, 0, 1]
    assert column(F.SURFACE_CODE).tolist() == [1, 0, 0]
    assert column(HOUR).tolist() == [0, 13, 23] and column(DAY_OF_WEEK).tolist() == [6, 0, 3]


def test_build_matrix_is_the_same_from_a_frame_from_arrays_and_with_scalars(tiny_dataset, home):
    frame = read_split(home.home, tiny_dataset["dataset"], "valid").iloc[:500]
    from_frame = F.build_matrix(frame)
    arrays = {c: frame[c].to_numpy() for c in F.INPUT_COLUMNS + F.OPTIONAL_COLUMNS}
    np.testing.assert_array_equal(F.build_matrix(arrays), from_frame)
    one_request = frame[frame[C.REQUEST_ID] == frame[C.REQUEST_ID].iloc[0]]
    per_row = {c: one_request[c].to_numpy() for c in F.INPUT_COLUMNS + F.OPTIONAL_COLUMNS}
    shared = {**per_row, C.COUNTRY: per_row[C.COUNTRY][0], HOUR: int(per_row[HOUR][0])}
    np.testing.assert_array_equal(F.build_matrix(shared), F.build_matrix(per_row))
    fixed = {c: np.asarray(v).astype(str) if c == C.DEVICE else v for c, v in arrays.items()}
    np.testing.assert_array_equal(F.build_matrix(fixed), from_frame)  # numpy str dtype


def test_organic_context_is_one_on_rows_no_feed_chose_and_zero_at_serving():
    cols = handmade_columns()
    j = F.FEATURE_SCHEMA.index(F.ORGANIC_CONTEXT)
    assert F.build_matrix(cols)[:, j].tolist() == [0, 0, 0]  # no policy column: serving
    cols[C.POLICY] = np.array([C.POLICY_ORGANIC, C.POLICY_HEURISTIC, C.POLICY_SAMPLED], object)
    assert F.build_matrix(cols)[:, j].tolist() == [1, 0, 1]
    cols[C.POLICY] = np.array(C.POLICY_RANDOM, object)  # 0-d: broadcast like a scalar column
    assert F.build_matrix(cols)[:, j].tolist() == [0, 0, 0]


def test_build_matrix_names_a_missing_column_and_refuses_another_schema():
    cols = handmade_columns()
    del cols[C.PRICE]
    with pytest.raises(KeyError, match="price"):
        F.build_matrix(cols)
    other = F.FeatureSchema(F.FEATURE_SCHEMA.names[:-1], F.FEATURE_SCHEMA.dtypes[:-1])
    with pytest.raises(ValueError, match="does not match"):
        F.build_matrix(handmade_columns(), schema=other)


def test_schema_hash_changes_when_a_feature_is_added_and_survives_a_round_trip():
    schema = F.feature_schema()
    added = F.FeatureSchema((*schema.names, "new_feature"), (*schema.dtypes, "float32"))
    assert added.hash != schema.hash and added != schema
    retyped = F.FeatureSchema(schema.names, ("int64", *schema.dtypes[1:]))
    assert retyped.hash != schema.hash
    assert F.FeatureSchema.from_dict(schema.to_dict()) == schema
    tampered = {**schema.to_dict(), "names": list(reversed(schema.names))}
    with pytest.raises(ValueError, match="hash"):
        F.FeatureSchema.from_dict(tampered)
    with pytest.raises(ValueError, match="unique"):
        F.FeatureSchema(("a", "a"), ("float32", "float32"))


def test_calibrator_leaves_calibrated_probabilities_alone_and_round_trips():
    rng = np.random.default_rng(5)
    p = rng.beta(0.5, 20, 200_000)
    y = (rng.random(len(p)) < p).astype(np.int8)
    cal = fit_isotonic(p, y)
    assert np.mean(np.abs(cal.apply(p) - p)) < 0.003
    assert Calibrator.from_dict(cal.to_dict()) == cal
    assert np.all(np.diff(cal.apply(np.linspace(0, 1, 101))) >= 0)
    assert cal.apply(np.array([-1.0, 2.0])).tolist() == [cal.y[0], cal.y[-1]]  # clipped
    skewed = fit_isotonic(np.minimum(4 * p, 1.0), y)
    assert np.mean(np.abs(skewed.apply(np.minimum(4 * p, 1.0)) - p)) < 0.003


def test_relevance_grades_and_ips_weights_only_on_relevant_rows():
    labels = pd.DataFrame(
        {C.LABEL_CLICK: [0, 1, 1, 1], C.LABEL_ATC: [0, 0, 1, 1], C.LABEL_PURCHASE: [0, 0, 0, 1]}
    )
    rel = relevance(labels)
    assert rel.tolist() == [0, 1, 2, 3]
    assert lambdamart_weights(rel, np.array([5.0, 2.0, 3.0, 4.0])).tolist() == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def tiny_data(tiny_dataset, home):
    return {s: ranking_data(read_split(home.home, tiny_dataset["dataset"], s)) for s in C.SPLITS}


def test_a_trial_reporting_a_bad_metric_is_pruned(tiny_data):
    dtrain, dvalid = purchase_datasets(tiny_data["train"], tiny_data["valid"], SMALL_BUDGET)
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=1e-6))
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned):
        fit_purchase(dtrain, dvalid, {"num_leaves": 7}, SMALL_BUDGET, trial=trial)
    assert list(study.trials[0].intermediate_values) == [0]  # pruned after its first report


def test_a_passed_deadline_stops_training_with_the_best_round(tiny_data):
    dtrain, dvalid = purchase_datasets(tiny_data["train"], tiny_data["valid"], SMALL_BUDGET)
    fit = fit_purchase(
        dtrain, dvalid, {"num_leaves": 7}, SMALL_BUDGET, deadline=time.monotonic() - 1
    )
    assert fit.best_iteration == 1 and fit.booster.num_trees() == 1


def test_the_same_seed_gives_the_same_model_however_slow_the_machine(tiny_data, caplog):
    """The budget is trials: a search slowed down (each fit sleeps) ends with the same best
    trial and the same trees. The wall-clock safety net, when it fires, is reported."""
    dtrain, dvalid = purchase_datasets(tiny_data["train"], tiny_data["valid"], SMALL_BUDGET)

    def search(pause_s: float, budget: RankerBudget = SMALL_BUDGET):
        def fit(params, trial, deadline):
            time.sleep(pause_s)
            return fit_purchase(dtrain, dvalid, params, budget, 0, trial, deadline)

        return tune("purchase", fit, "minimize", budget, seed=0)

    quick, slow = search(0.0), search(0.5)
    assert quick.trials_run == slow.trials_run == SMALL_BUDGET.trials
    assert not quick.hit_deadline and not slow.hit_deadline
    assert quick.values == slow.values and quick.best.params == slow.best.params
    assert quick.best.booster.model_to_string() == slow.best.booster.model_to_string()
    with caplog.at_level("WARNING"):
        capped = search(0.3, replace(SMALL_BUDGET, seconds=0.2))
    assert capped.hit_deadline and capped.trials_run < SMALL_BUDGET.trials
    assert capped.summary()["deadline_reached"] is True
    assert "safety net stopped the search" in caplog.text


@pytest.fixture(scope="module")
def tiny_result(tiny_dataset, home) -> RankerResult:
    return train_rankers(home.home, tiny_dataset["dataset"], seed=0, budget=SMALL_BUDGET)


def test_fit_save_load_predicts_the_same(tiny_result, tiny_data, tmp_path: Path):
    # what an earlier one-stage run left in the folder must not be read with these trees
    (tmp_path / "ranker").mkdir()
    (tmp_path / bundle.LINEAR_OFFSET).write_text("{}")
    paths = save(tiny_result, tmp_path)
    assert not (tmp_path / bundle.LINEAR_OFFSET).exists()
    assert {p.relative_to(tmp_path).as_posix() for p in paths.values()} == {
        bundle.PURCHASE_MODEL,  # two stages: p(purchase | click), boosted from 0
        bundle.LAMBDAMART_MODEL,
        bundle.CALIBRATOR,
        bundle.FEATURE_SCHEMA,
        bundle.EVIDENCE,  # the served E[GMV]'s shrink by the item's logged impressions
        bundle.CLICK_MODEL,  # the click stage, boosted from ...
        bundle.CLICK_OFFSET,  # ... the click label's logistic log-odds
    }
    loaded = load(tmp_path)
    assert loaded.evidence == tiny_result.models.evidence
    assert loaded.evidence is not None and loaded.evidence.feature == "impressions_total"
    X = tiny_data["test"].X
    assert loaded.schema == tiny_result.schema == F.feature_schema()
    assert loaded.calibrator == tiny_result.calibrator
    assert loaded.offset is None and tiny_result.models.offset is None
    assert loaded.click is not None and tiny_result.models.click is not None
    assert loaded.click_offset is not None and tiny_result.models.click_offset is not None
    np.testing.assert_array_equal(
        loaded.click_offset.margin(X), tiny_result.models.click_offset.margin(X)
    )
    np.testing.assert_array_equal(
        loaded.purchase_probability(X), tiny_result.models.purchase_probability(X)
    )
    np.testing.assert_array_equal(loaded.rank_score(X), tiny_result.models.rank_score(X))
    np.testing.assert_array_equal(loaded.purchase.predict(X), tiny_result.purchase.predict(X))


def test_the_purchase_model_is_two_stages_only_where_the_log_allows_it():
    """two_stage_reason: two stages need a click label that is not the label, a label never
    logged without a click, and both classes in each stage; click_stage and
    conversion_stage are every row by its click and the clicked rows by their label."""
    from training.ranking.models import click_stage, conversion_stage, two_stage_reason

    def data(clicked, label):
        n = len(label)
        return RankingData(
            X=np.arange(n, dtype=np.float32)[:, None],
            request_id=np.zeros(n, dtype=np.int64),
            relevance=np.asarray(label),
            label=np.asarray(label),
            sample_weight=np.ones(n),
            ips_weight=np.ones(n),
            feature_names=["x"],
            clicked=None if clicked is None else np.asarray(clicked),
        )

    ok = data([1, 1, 1, 0, 0], [1, 0, 0, 0, 0])
    budget = RankerBudget()
    assert two_stage_reason(ok, ok, budget) is None
    off = RankerBudget(two_stage=False)
    assert "switched off" in str(two_stage_reason(ok, ok, off))
    assert "no click label" in str(two_stage_reason(data(None, [1, 0]), ok, budget))
    same = data([1, 0, 0], [1, 0, 0])
    assert two_stage_reason(ok, same, budget) == "the label is the click"
    bought_unclicked = data([1, 0, 0], [0, 1, 0])
    assert (
        two_stage_reason(bought_unclicked, ok, budget)
        == "1 train rows have the label without a click"
    )
    every_click_buys = data([1, 1, 0], [1, 1, 0])  # the label is the click again
    assert two_stage_reason(ok, every_click_buys, budget) == "the label is the click"
    no_click_buys = data([1, 1, 0], [0, 0, 0])
    assert "single class" in str(two_stage_reason(ok, no_click_buys, budget))
    first, second = click_stage(ok), conversion_stage(ok)
    np.testing.assert_array_equal(first.label, [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(second.X[:, 0], [0, 1, 2])
    np.testing.assert_array_equal(second.label, [1, 0, 0])


def test_the_served_model_is_two_stages_and_the_ablation_weighs_one(tiny_result, tiny_data):
    """On tiny (clicks and purchases logged) the purchase model is p(click) x p(purchase |
    click); the ablation's two_stage lever is the one-stage model of its own search; both
    stages' searches are reported."""
    m = tiny_result.metrics
    assert m["two_stage"] == {"on": True, "why_not": None}
    assert set(m["search"]) == {"purchase", "lambdamart", "click"}
    models = tiny_result.models
    X = tiny_data["test"].X
    np.testing.assert_allclose(
        models.raw_purchase_probability(X),
        offset_probability(models.purchase, None, X)
        * offset_probability(models.click, models.click_offset, X),
    )
    one = tiny_result.ablations["two_stage"]
    assert one.click is None and one.offset is not None
    assert all(a.click is not None for k, a in tiny_result.ablations.items() if k != "two_stage")


def test_lambdamart_beats_a_random_order_on_validation(tiny_result):
    valid = tiny_result.metrics["valid"]
    for metric in ("ndcg@20", "ndcg@20_ips_total"):
        assert valid["lambdamart"][metric] > valid["random"][metric] + 0.03


def test_the_search_stays_within_its_budget_and_reports_every_figure(tiny_result):
    m = tiny_result.metrics
    for model in ("purchase", "lambdamart"):
        search = m["search"][model]
        assert 1 <= search["trials_run"] <= SMALL_BUDGET.trials
        assert search["trials_complete"] + search["trials_pruned"] == search["trials_run"]
        assert 1 <= search["best_rounds"] <= SMALL_BUDGET.max_rounds
        assert set(m["best_params"][model]) >= {"num_leaves", "learning_rate", "lambda_l2"}
    for split in ("valid", "test"):
        purchase = m[split]["purchase"]
        for key in ("auc", "log_loss", "pr_auc", "ece", "ece_calibrated"):
            assert np.isfinite(purchase[key]), (split, key)
        assert 0.5 < purchase["auc"] <= 1.0
        low, high = purchase["auc_calibrated_ci_low"], purchase["auc_calibrated_ci_high"]
        assert low < purchase["auc_calibrated"] < high and high - low < 0.5
    assert m["features"] == list(F.feature_schema().names)
    assert np.isfinite(m["purchase_auc_gap"])


def test_a_schema_mismatch_is_caught_on_load(tiny_result, tmp_path: Path):
    save(tiny_result, tmp_path)
    shorter = replace(
        tiny_result.models,
        schema=F.FeatureSchema(F.FEATURE_SCHEMA.names[:-1], F.FEATURE_SCHEMA.dtypes[:-1]),
    )
    save(shorter, tmp_path)
    with pytest.raises(ValueError, match="features"):
        load(tmp_path)


def test_the_purchase_model_never_rises_with_price(tiny_data):
    """With the monotone constraint (the default), raising an item's price and log price,
    all else held, never raises p, even on labels rigged to rise with price; without it
    those labels give a model that does (the check can fail)."""
    from training.ranking.models import MONOTONE_DECREASING, monotone_constraints

    names = list(FEATURE_SCHEMA.names)
    assert [n for n, m in zip(names, monotone_constraints(names), strict=True) if m] == list(
        MONOTONE_DECREASING
    )
    train, valid = tiny_data["train"], tiny_data["valid"]
    X = valid.X[:200].copy()
    price, log_price = FEATURE_SCHEMA.index("price"), FEATURE_SCHEMA.index("log_price")
    params = {"num_leaves": 15, "min_data_in_leaf": 5, "learning_rate": 0.2}

    def rigged(data):  # buys rise with price: 1 above the median price, at random below
        rng = np.random.default_rng(0)
        high = data.X[:, price] > np.median(data.X[:, price])
        label = (high & (rng.random(len(high)) < 0.5)) | (rng.random(len(high)) < 0.02)
        return replace(data, label=label.astype(np.int64))

    def rises(budget: RankerBudget, train=train, valid=valid, offset=None) -> float:
        train, valid = with_offset(train, offset), with_offset(valid, offset)
        dtrain, dvalid = purchase_datasets(train, valid, budget)
        booster = fit_purchase(dtrain, dvalid, params, budget).booster
        preds = []
        for p in np.geomspace(1.0, 5000.0, 25):
            X[:, price], X[:, log_price] = p, np.log(p)
            preds.append(offset_probability(booster, offset, X))
        return float(np.diff(np.stack(preds), axis=0).max())

    assert rises(replace(SMALL_BUDGET, monotone_price=True)) <= 1e-12
    up_train, up_valid = rigged(train), rigged(valid)
    assert rises(replace(SMALL_BUDGET, monotone_price=True), up_train, up_valid) <= 1e-12
    assert rises(replace(SMALL_BUDGET, monotone_price=False), up_train, up_valid) > 0
    # boosted from a linear offset: the rigged logistic regression's price slope is positive;
    # cut to 0, the served p (offset + trees) still never rises
    raw = B.LogisticBaseline.fit(up_train.X, up_train.label, up_train.sample_weight).offset()
    assert max(raw.coef[price], raw.coef[log_price]) > 0
    cut = decreasing_offset(raw, names)
    assert cut.coef[price] <= 0 and cut.coef[log_price] <= 0
    assert rises(replace(SMALL_BUDGET, monotone_price=True), up_train, up_valid, cut) <= 1e-12
    assert rises(replace(SMALL_BUDGET, monotone_price=True), up_train, up_valid, raw) > 0


def test_ablations_refit_without_their_lever_and_round_trip(tiny_data, tmp_path: Path):
    from training.ranking import ablation

    train, valid = tiny_data["train"], tiny_data["valid"]
    params = {"num_leaves": 15, "min_data_in_leaf": 5, "learning_rate": 0.2}
    lever: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
        "no_category_affinity": ((S.AFFINITY_FOR_ITEM,), {}),
        "free_price": ((), {}),
        "linear_offset": ((), {"linear_offset": False}),
    }
    models = ablation.train_ablations(train, valid, params, SMALL_BUDGET, 0, lever)
    # each lever's trees start from its own logistic log-odds; a zeroed column's weight is 0
    no_affinity = models["no_category_affinity"].offset
    assert no_affinity is not None and models["linear_offset"].offset is None
    assert no_affinity.coef[FEATURE_SCHEMA.index(S.AFFINITY_FOR_ITEM)] == 0
    assert models["free_price"].offset is not None
    gain = dict(
        zip(
            models["no_category_affinity"].booster.feature_name(),
            models["no_category_affinity"].booster.feature_importance("gain"),
            strict=True,
        )
    )
    assert gain[S.AFFINITY_FOR_ITEM] == 0 and sum(gain.values()) > 0
    ablation.save(models, tmp_path)
    loaded = ablation.load(tmp_path)
    assert set(loaded) == set(lever)
    for name, model in models.items():
        np.testing.assert_array_equal(
            loaded[name].egmv_probability(valid.X), model.egmv_probability(valid.X)
        )


def test_an_ablation_of_a_feature_that_never_varies_is_skipped(tiny_data):
    """Setting a constant column to 0 changes no model: all 0 (no organic rows) or all 1
    (Complete Journey, where every row is organic or a sampled negative) alike."""
    from training.ranking import ablation

    column = FEATURE_SCHEMA.index(F.ORGANIC_CONTEXT)
    for value in (0.0, 1.0):
        train, valid = (replace(tiny_data[s], X=tiny_data[s].X.copy()) for s in ("train", "valid"))
        train.X[:, column] = value
        valid.X[:, column] = value
        levers: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
            "organic": ((F.ORGANIC_CONTEXT,), {})
        }
        assert ablation.train_ablations(train, valid, {}, SMALL_BUDGET, 0, levers) == {}


def test_the_linear_offset_reads_price_through_log_price_alone(tiny_data):
    """The offset leaves out the raw price and the price ratios (OFFSET_EXCLUDED): their
    coefficients are 0, so two items that differ only in those columns get the same offset,
    and its price response is a power of the price (log_price), never exponential in it."""
    from training.ranking.models import OFFSET_EXCLUDED, offset_columns, purchase_offset

    train = tiny_data["train"]
    names = list(train.feature_names)
    excluded = offset_columns(names)
    assert sorted(names[i] for i in excluded) == sorted(OFFSET_EXCLUDED)
    offset = purchase_offset(train, SMALL_BUDGET)
    assert offset is not None
    assert np.all(offset.coef[excluded] == 0.0)
    assert offset.coef[names.index("log_price")] < 0  # the data's demand still falls
    X = np.nan_to_num(train.X[:50]).copy()
    moved = X.copy()
    moved[:, excluded] = moved[:, excluded] * 7.0 + 100.0
    np.testing.assert_array_equal(offset.margin(X), offset.margin(moved))
    assert purchase_offset(train, replace(SMALL_BUDGET, linear_offset=False)) is None
