"""TL2cgen compilation of a LightGBM binary model: parity with LightGBM, reload, input checks.

The models are compiled once per module (a compile takes seconds); every test reads them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from contract.bundle import COMPILE_REPORT, COMPILED_MODEL
from contract.scorer import CompiledScorer, EvidenceShrink
from training.ranking.compile import (
    PARITY_TOLERANCE,
    CompileReport,
    benchmark_scoring,
    compile_for_bundle,
    compile_model,
    parity,
    size_tradeoff,
)

N_FEATURES = 20


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows with a non-linear signal, so the trees split on many features and thresholds."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    logit = X[:, 0] - 0.8 * X[:, 1] + X[:, 2] * X[:, 3] + 0.5 * np.sin(3 * X[:, 4])
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int32)
    return X, y


@dataclass(frozen=True)
class Compiled:
    model: Path
    plain: Path
    quantized: Path
    annotated: Path
    reports: dict[str, CompileReport]
    X: np.ndarray


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    root = tmp_path_factory.mktemp("compile")
    X, y = synthetic(2_000, seed=0)
    params = {"objective": "binary", "num_leaves": 15, "verbose": -1, "num_threads": 1}
    booster = lgb.train(params, lgb.Dataset(X, y), num_boost_round=30)
    model = root / "purchase.txt"
    booster.save_model(str(model))
    reports = {
        "plain": compile_model(model, root / "plain.so", quantize=False, parallel_comp=1),
        "quantized": compile_model(model, root / "quantized.so", quantize=True, parallel_comp=1),
        "annotated": compile_model(
            model, root / "annotated.so", quantize=True, annotate_with=X, parallel_comp=1
        ),
    }
    X_test, _ = synthetic(1_000, seed=1)
    X_test[::9, 2] = np.nan  # LightGBM's missing values take the default branch
    return Compiled(
        model=model,
        plain=root / "plain.so",
        quantized=root / "quantized.so",
        annotated=root / "annotated.so",
        reports=reports,
        X=X_test,
    )


@pytest.mark.parametrize("variant", ["plain", "quantized", "annotated"])
def test_compiled_matches_lightgbm(compiled: Compiled, variant: str) -> None:
    lib = getattr(compiled, variant)
    assert parity(compiled.model, lib, compiled.X) <= PARITY_TOLERANCE


def test_scorer_returns_probabilities_like_booster_predict(compiled: Compiled) -> None:
    expected = lgb.Booster(model_file=str(compiled.model)).predict(compiled.X)
    got = CompiledScorer(compiled.quantized).predict(compiled.X)
    assert got.shape == (len(compiled.X),)
    assert np.all((got > 0) & (got < 1))
    np.testing.assert_allclose(got, expected, rtol=0, atol=PARITY_TOLERANCE)


def test_saved_library_predicts_the_same_after_reload(compiled: Compiled, tmp_path: Path) -> None:
    before = CompiledScorer(compiled.quantized).predict(compiled.X)
    moved = tmp_path / "bundle" / "ranker" / "purchase.so"
    moved.parent.mkdir(parents=True)
    shutil.copy2(compiled.quantized, moved)
    after = CompiledScorer(moved).predict(compiled.X)
    np.testing.assert_array_equal(after, before)


def test_float64_input_scores_like_float32(compiled: Compiled) -> None:
    scorer = CompiledScorer(compiled.quantized)
    np.testing.assert_array_equal(
        scorer.predict(compiled.X.astype(np.float64)), scorer.predict(compiled.X)
    )


def test_report_describes_the_compile(compiled: Compiled) -> None:
    plain, quantized = compiled.reports["plain"], compiled.reports["quantized"]
    assert (plain.num_trees, plain.num_features) == (30, N_FEATURES)
    assert (plain.quantize, quantized.quantize) == (False, True)
    assert compiled.reports["annotated"].annotated and not quantized.annotated
    assert quantized.lib_bytes == compiled.quantized.stat().st_size > 0


def test_wrong_width_is_refused_with_the_expected_shape(compiled: Compiled) -> None:
    scorer = CompiledScorer(compiled.quantized)
    with pytest.raises(ValueError, match=r"shape \(n, 20\), got \(5, 19\)"):
        scorer.predict(compiled.X[:5, :19])


def test_no_rows_give_no_scores(compiled: Compiled) -> None:
    scorer = CompiledScorer(compiled.quantized)
    assert scorer.predict(np.zeros((0, N_FEATURES), dtype=np.float32)).shape == (0,)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        compile_model(tmp_path / "nope.txt", tmp_path / "x.so")
    with pytest.raises(FileNotFoundError, match=r"nope\.so"):
        CompiledScorer(tmp_path / "nope.so")


def test_benchmark_times_every_library_against_lightgbm(compiled: Compiled) -> None:
    result = benchmark_scoring(
        compiled.model, [compiled.plain, compiled.quantized], compiled.X[:500], repeats=5, warmup=1
    )
    assert (result["rows"], result["features"], result["repeats"]) == (500, N_FEATURES, 5)
    lightgbm = result["lightgbm"]
    for key in ("compiled[plain.so]", "compiled[quantized.so]"):
        figures = result[key]
        # the speed-ups are the ratios of the timed figures (the report's arithmetic)
        assert figures["speedup_p50"] == pytest.approx(
            lightgbm["p50_ms"] / figures["p50_ms"], rel=1e-2, abs=2e-3
        )
        assert figures["speedup_p99"] == pytest.approx(
            lightgbm["p99_ms"] / figures["p99_ms"], rel=1e-2, abs=2e-3
        )


def test_size_tradeoff_rows_have_quality_parity_and_latency(tmp_path: Path) -> None:
    X, y = synthetic(2_000, seed=2)
    Xv, yv = synthetic(1_000, seed=3)
    rows = size_tradeoff(X, y, Xv, yv, grid=[(5, 4), (20, 15)], workdir=tmp_path, repeats=3)
    assert [(r["num_trees"], r["num_leaves"]) for r in rows] == [(5, 4), (20, 15)]
    for row in rows:
        assert 0.6 < row["auc"] <= 1.0  # the synthetic signal is easy to find
        assert row["parity"] <= PARITY_TOLERANCE
        assert row["compiled_p50_ms"] > 0
    assert rows[1]["log_loss"] < rows[0]["log_loss"]  # 5 shallow trees underfit
    assert (tmp_path / "gbm_20x15.so").is_file()


def test_compile_for_bundle_writes_the_library_and_its_report(
    compiled: Compiled, tmp_path: Path
) -> None:
    summary = compile_for_bundle(compiled.model, tmp_path, compiled.X, parallel_comp=1, repeats=3)
    assert json.loads((tmp_path / COMPILE_REPORT).read_text()) == summary
    assert summary["lib_path"] == COMPILED_MODEL
    assert summary["parity_max_abs_diff"] <= PARITY_TOLERANCE
    assert summary["latency_500"]["rows"] == 500
    scores = CompiledScorer(tmp_path / COMPILED_MODEL).predict(compiled.X)
    np.testing.assert_array_equal(scores, CompiledScorer(compiled.quantized).predict(compiled.X))


def test_trees_boosted_from_a_linear_offset_score_the_same_compiled(tmp_path: Path) -> None:
    """PurchaseModel = sigmoid(offset + compiled margin) is what training computes from
    LightGBM (offset_probability), and the offset is what the trees were boosted from."""
    from contract.scorer import LinearOffset, PurchaseModel
    from training.ranking.baselines import LogisticBaseline
    from training.ranking.models import offset_probability

    X, y = synthetic(2_000, seed=2)
    logreg = LogisticBaseline.fit(X, y)
    offset = logreg.offset()
    X_test, _ = synthetic(500, seed=3)
    X_test[::7, 0] = np.nan  # missing: 0 for the linear part, the default branch for trees
    np.testing.assert_allclose(
        1 / (1 + np.exp(-offset.margin(X_test[1::7]))), logreg.predict(X_test[1::7]), atol=1e-12
    )
    params = {"objective": "binary", "num_leaves": 7, "verbose": -1, "num_threads": 1}
    data = lgb.Dataset(X, y, init_score=offset.margin(X))
    booster = lgb.train(params, data, num_boost_round=20)
    booster.save_model(str(tmp_path / "purchase.txt"))
    compile_model(tmp_path / "purchase.txt", tmp_path / "p.so", quantize=True, parallel_comp=1)
    served = PurchaseModel(CompiledScorer(tmp_path / "p.so"), offset)
    expected = offset_probability(booster, offset, X_test)
    assert np.max(np.abs(served.predict(X_test) - expected)) <= PARITY_TOLERANCE
    # the trees alone are a correction to the offset, not a model of their own
    alone = CompiledScorer(tmp_path / "p.so").predict(X_test)
    assert np.max(np.abs(alone - expected)) > 0.05
    again = LinearOffset.from_dict(json.loads(json.dumps(offset.to_dict())))
    np.testing.assert_array_equal(again.margin(X_test), offset.margin(X_test))
    with pytest.raises(ValueError, match="one entry per feature"):
        LinearOffset.from_standardized([0.0], [1.0, 1.0], [1.0], 0.0)
    with pytest.raises(ValueError, match="scale <= 0"):
        LinearOffset.from_standardized([0.0], [0.0], [1.0], 0.0)
    with pytest.raises(ValueError, match="linear offset has 1 features"):
        PurchaseModel(
            CompiledScorer(tmp_path / "p.so"),
            LinearOffset.from_standardized([0.0], [1.0], [1.0], 0.0),
        )


def test_a_two_stage_bundle_serves_the_product_of_its_compiled_stages(tmp_path: Path) -> None:
    """load_purchase_model reads ranker/click.so (+ click_offset.json) beside purchase.so:
    the served p is the click stage's p times the conversion stage's, as training computes
    it from LightGBM (two_stage_probability); compile_for_bundle compiles and checks both,
    and a one-stage compile into the same folder drops the old click stage."""
    from contract.bundle import CLICK_COMPILED, CLICK_OFFSET, LINEAR_OFFSET
    from contract.scorer import PurchaseModel, load_purchase_model
    from training.ranking.baselines import LogisticBaseline
    from training.ranking.compile import compile_for_bundle
    from training.ranking.models import two_stage_probability

    X, y_click = synthetic(2_000, seed=4)
    _, y_buy = synthetic(2_000, seed=5)
    offset = LogisticBaseline.fit(X, y_click).offset()
    params = {"objective": "binary", "num_leaves": 7, "verbose": -1, "num_threads": 1}
    click = lgb.train(params, lgb.Dataset(X, y_click, init_score=offset.margin(X)), 15)
    conversion = lgb.train(params, lgb.Dataset(X, y_buy), 10)
    (tmp_path / "ranker").mkdir()
    click.save_model(str(tmp_path / "click.txt"))
    conversion.save_model(str(tmp_path / "purchase.txt"))
    (tmp_path / CLICK_OFFSET).write_text(json.dumps(offset.to_dict()))
    X_test, _ = synthetic(500, seed=6)
    summary = compile_for_bundle(
        tmp_path / "purchase.txt",
        tmp_path,
        X_test,
        parallel_comp=1,
        repeats=5,
        click_model_path=tmp_path / "click.txt",
    )
    assert summary["click"]["parity_max_abs_diff"] <= PARITY_TOLERANCE
    assert summary["latency_500_served"]["stages"] == 2
    assert summary["latency_500_served"]["num_trees"] == 25
    served = load_purchase_model(tmp_path)
    assert served.click is not None and served.offset is None
    expected = two_stage_probability(conversion, None, click, offset, X_test)
    assert np.max(np.abs(served.predict(X_test) - expected)) <= 2 * PARITY_TOLERANCE
    # the product, not either stage
    assert np.max(np.abs(served.predict(X_test) - conversion.predict(X_test))) > 0.05
    with pytest.raises(ValueError, match="click stage takes 3 features"):
        other = lgb.train(params, lgb.Dataset(X[:, :3], y_click), 2)
        other.save_model(str(tmp_path / "narrow.txt"))
        compile_model(tmp_path / "narrow.txt", tmp_path / "narrow.so", quantize=True)
        PurchaseModel(served.compiled, None, PurchaseModel(CompiledScorer(tmp_path / "narrow.so")))
    # a one-stage compile into the same folder ships no click stage
    compile_for_bundle(tmp_path / "purchase.txt", tmp_path, X_test, parallel_comp=1, repeats=5)
    assert not (tmp_path / CLICK_COMPILED).exists()
    assert load_purchase_model(tmp_path).click is None
    assert not (tmp_path / LINEAR_OFFSET).exists()


def test_the_evidence_shrink_discounts_items_by_their_logged_impressions(tmp_path: Path) -> None:
    """E[GMV] x (n + prior) / (n + prior + kappa): an item never shown (or whose count is
    missing) scores 0 without a prior, a much-shown one keeps nearly all; kappa 0 is no
    shrink; the file round-trips, and a bundle without it has none."""

    names = ("price", "impressions_total", "ctr_7d")
    shrink = EvidenceShrink.for_schema(names, kappa=2.0, prior=0.0)
    assert shrink.column == 1
    X = np.array([[1, 0, 0], [1, 2, 0], [1, 198, 0], [1, np.nan, 0], [1, -3, 0]], np.float32)
    egmv = np.full(5, 10.0)
    np.testing.assert_allclose(shrink.apply(X, egmv), [0.0, 5.0, 9.9, 0.0, 0.0])
    with_prior = EvidenceShrink.for_schema(names, kappa=2.0, prior=2.0)
    np.testing.assert_allclose(with_prior.factor(X), [0.5, 2 / 3, 200 / 202, 0.5, 0.5])
    np.testing.assert_array_equal(EvidenceShrink.for_schema(names, 0.0).apply(X, egmv), egmv)

    path = tmp_path / "evidence.json"
    path.write_text(json.dumps(with_prior.to_dict()))
    assert EvidenceShrink.read(path, names) == with_prior
    assert EvidenceShrink.read(tmp_path / "absent.json", names) is None
    with pytest.raises(ValueError, match="impressions_total"):
        EvidenceShrink.read(path, ("price", "ctr_7d"))
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="kappa"):
            EvidenceShrink.for_schema(names, kappa=bad)
