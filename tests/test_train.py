"""`homefeed train` end to end on the tiny preset: every stage, the report contract, and a
registered bundle that loads back verified."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from contract import bundle as B
from contract import columns as C
from training.train import STAGES

CONTRACT = {
    "policies": ["heuristic", "popularity", "logreg", "ranker", "optimal"],
    "ranking": ["ndcg_at_20", "ndcg_at_20_ips", "auc", "logloss"],
    "calibration": ["ece_before", "ece_after"],
    "retrieval": ["recall_at_500", "popularity_recall_at_500", "ann_recall_at_500_vs_exact"],
    "compiled": ["max_abs_diff", "p99_ms_500"],
    "lightgbm": ["p99_ms_500"],
    "ope": ["ips", "snips", "dr", "oracle", "diagnostics", "supported"],
    "targets": ["ope_dr_relative_error", "ope_dr_covers"],
}


@pytest.fixture(scope="module")
def trained(tiny_trained):
    return tiny_trained


def test_every_stage_reports(trained):
    assert list(trained) == list(STAGES)
    assert all(r["seconds"] >= 0 for r in trained.values())


def test_eval_report_holds_the_contract(trained, home):
    report = json.loads((home.reports / "eval.json").read_text())
    assert report["bundle_version"] == trained["register"]["bundle_version"]
    assert report["preset"] == "tiny"
    for section, keys in CONTRACT.items():
        for key in keys:
            assert key in report[section], f"{section}.{key}"
    assert report["compiled"]["max_abs_diff"] <= 1e-6
    for name in ("heuristic", "popularity", "logreg", "ranker", "optimal"):
        assert report["policies"][name]["oracle_egmv_per_1k"] > 0
    best = report["policies"]["optimal"]["oracle_egmv_per_1k"]
    assert all(p["oracle_egmv_per_1k"] <= best for p in report["policies"].values())
    # the serving levers: each off alone, with the Oracle's best page over its candidates
    for lever in ("profile_candidates", "retrieval_value"):
        entry = report["ablation"][lever]
        assert entry["optimal_over_candidates"] >= entry["oracle_egmv_per_1k"] > 0
        assert entry["what"]
    markdown = (home.reports / "eval.md").read_text()
    assert markdown.startswith("# homefeed evaluation") and report["bundle_version"] in markdown
    assert (home.reports / "reliability.png").exists() and (home.reports / "policies.png").exists()


def test_registered_bundle_loads_verified_by_alias(trained, home, tmp_path):
    from contract.bundle import BundleError
    from contract.registry import Registry

    registered = trained["register"]
    registry = Registry()
    assert registry.get_version(B.ALIAS_CHALLENGER) == registered["registry_version"]
    schema = json.loads(
        (home.artifacts / "bundles" / registered["bundle_version"] / B.FEATURE_SCHEMA).read_text()
    )
    loaded = registry.load(
        B.ALIAS_CHALLENGER, tmp_path / "cache", expected_schema_hash=schema["hash"]
    )
    assert (loaded / B.COMPILED_MODEL).exists() and (loaded / B.SCANN_DIR).is_dir()
    with pytest.raises(BundleError, match="expected"):
        registry.load(B.ALIAS_CHALLENGER, tmp_path / "cache2", expected_schema_hash="0" * 64)


def test_real_data_section_quotes_purchase_recall_and_auc(tmp_path):
    from contract.paths import Paths
    from training.evaluate import real_data_section, reports_dir

    paths = Paths(tmp_path)
    out = reports_dir(paths, "completejourney", simulated=False)
    out.mkdir(parents=True)
    report = {
        "retrieval": {
            "recall_at_500": {"purchase": 0.44, "click": 0.0},
            "popularity_recall_at_500": {"purchase": 0.30, "click": 0.0},
        },
        "ranking": {"auc": 0.69, "logloss": 0.5},
    }
    (out / "eval.json").write_text(json.dumps(report))
    section = real_data_section(paths, "completejourney")
    assert section is not None
    assert (section["recall_at_500"], section["auc"]) == (0.44, 0.69)
    assert section["recall_ratio_vs_popularity"] == pytest.approx(0.44 / 0.30)
    assert real_data_section(paths, "never-ingested") is None


def test_registered_bundle_records_its_label(trained, home):
    registered = trained["register"]
    manifest = B.read_manifest(home.artifacts / "bundles" / registered["bundle_version"])
    assert manifest["label"] == {
        "kind": "purchase",
        "window_days": 7,
        "score": "expected GMV: p(purchase) x price x margin",
    }
    assert trained["rankers"]["label"] == manifest["label"]


def test_bundle_label_entry_round_trips_and_defaults_to_purchase(tmp_path):
    (tmp_path / "x.txt").write_text("x")
    label = B.label_entry("click", 1)
    written = B.write_manifest(
        tmp_path, version="v", data_snapshot="d", feature_schema_hash="h", metrics={}, label=label
    )
    assert B.label_of(B.verify_bundle(tmp_path)) == written["label"] == label
    assert label["score"] == "expected clicked value: p(click) x price x margin, not GMV"
    B.write_manifest(tmp_path, version="v", data_snapshot="d", feature_schema_hash="h", metrics={})
    assert "label" not in B.read_manifest(tmp_path)
    assert B.label_of(B.read_manifest(tmp_path))["kind"] == "purchase"
    with pytest.raises(ValueError, match="label must be one of purchase, add_to_cart, click"):
        B.label_entry("view", 1)


def write_training_sets(paths, dataset: str, train_label: list[int], label: dict | None) -> None:
    """Training sets with label columns only, enough for the label check; ``label`` None
    writes them as they were before the label was a choice (purchase, no ``label`` column)."""
    import pandas as pd

    from contract import columns as C
    from training.dataset import LABEL

    folder = paths.training_sets(dataset)
    folder.mkdir(parents=True)
    manifest: dict = {"split": {"train_start": "2026-01-05", "test_end": "2026-01-12"}}
    if label is not None:
        manifest["label"] = label
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for split in ("train", "valid", "test"):
        y = train_label if split == "train" else [0, 1, 0, 1]
        frame = pd.DataFrame(
            {
                C.REQUEST_ID: range(len(y)),
                C.LABEL_PURCHASE: [0] * len(y) if label else y,
                C.LABEL_CLICK: y,
                C.LABEL_ATC: 0,
                C.WEIGHT: 1.0,
            }
        )
        if label is not None:
            frame[LABEL] = y
        frame.to_parquet(folder / f"{split}.parquet")


def test_a_single_class_label_stops_train_before_any_study(tmp_path, monkeypatch):
    import optuna

    from contract.paths import Paths
    from training.dataset import SingleClassLabelError
    from training.ranking.train import train_rankers
    from training.train import train

    studies: list[object] = []

    def create_study(*args: object, **kwargs: object) -> None:
        studies.append(kwargs)
        raise AssertionError("an Optuna study started")

    monkeypatch.setattr(optuna, "create_study", create_study)
    paths = Paths(tmp_path)
    click = {"kind": "click", "column": "label_click", "window_days": 1}
    write_training_sets(paths, "clicks", [0, 0, 0, 0, 0], click)
    expected = (
        "the click (within 1 day) label has a single class in the train split of "
        f"{paths.training_sets('clicks')}: none of its 5 rows is positive. No model can learn"
    )
    with pytest.raises(SingleClassLabelError, match=re.escape(expected)):
        train(paths, "clicks")
    with pytest.raises(SingleClassLabelError, match=re.escape(expected)):
        train_rankers(tmp_path, "clicks")
    assert studies == []
    assert not (paths.artifacts / "staging").exists()  # no stage started

    # training sets from before the choice: their purchase label is the one checked
    write_training_sets(paths, "old", [1, 1, 1], None)
    with pytest.raises(SingleClassLabelError, match=r"purchase \(within 7 days\) .* all 3 rows"):
        train(paths, "old")
    assert studies == []


def test_a_split_sample_is_uniform_sorted_by_request_and_bounded(tiny_dataset, home) -> None:
    """What evaluate's logistic baseline fits on: the whole split when it is small enough,
    otherwise about max_rows rows of it, in read_split's order, never the split at once."""
    from training.ranking.train import read_split, read_split_sample

    dataset, root = tiny_dataset["dataset"], home.home
    whole = read_split(root, dataset, "train")
    pd.testing.assert_frame_equal(read_split_sample(root, dataset, "train", len(whole)), whole)
    sample = read_split_sample(root, dataset, "train", len(whole) // 4, seed=3)
    assert 0.15 * len(whole) < len(sample) < 0.35 * len(whole)
    assert sample[C.REQUEST_ID].is_monotonic_increasing
    assert set(sample[C.IMPRESSION_ID]) <= set(whole[C.IMPRESSION_ID])
    assert list(sample.columns) == list(whole.columns)


def test_the_levers_benchmark_scores_every_variant_on_both_candidate_sets(
    trained, tiny_dataset, home
):
    """tools.bench_levers refits its variants from the staged parameters and scores them
    with the served model on the same requests, with the PROFILE source off and on."""
    from tools.bench_levers import run

    report = run(home.home, tiny_dataset["dataset"], n_requests=20)
    variants = (
        "served", "logreg", "refit", "tower_score", "tower_crossfit", "value_capped",
        "optimal_over_candidates",
    )  # fmt: skip
    expected = {f"{v}@{share}" for v in variants for share in (0.0, 0.5)}
    assert expected <= set(report["policies"])
    # the refit is the served recipe: it reproduces the served ranker's figure
    policies = report["policies"]
    assert policies["refit@0.0"]["oracle_egmv_per_1k"] == pytest.approx(
        policies["served@0.0"]["oracle_egmv_per_1k"]
    )
    values = [p["oracle_egmv_per_1k"] for p in report["policies"].values()]
    assert all(np.isfinite(v) and v >= 0 for v in values)
    assert report["logged_max_price"] > 0


def test_the_history_oracle_benchmark_orders_its_ceilings(trained, tiny_dataset, home):
    """tools.bench_history_oracle scores the served ranker beside the history-limited
    Oracle's ceilings on the same requests: none passes the Oracle over the same candidates,
    and the Oracle over the history-limited Oracle's own top items none of its pages."""
    from tools.bench_history_oracle import run

    report = run(home.home, tiny_dataset["dataset"], n_requests=20, particles=2000)
    p = {name: row["oracle_egmv_per_1k"] for name, row in report["policies"].items()}
    # the Oracle's best over the candidates leaves a checkout cart's category term out of
    # its choice (the ceilings keep it): a little slack
    best = 1.02 * p["optimal_over_candidates"]
    for name in (
        "ranker", "history_oracle:candidates", "prior_oracle:candidates",
        "history_appeal_oracle:candidates", "history_content_oracle:candidates",
        "prior_appeal_oracle:candidates", "prior_content_oracle:candidates",
    ):  # fmt: skip
        assert 0 <= p[name] <= best, name
    assert p["history_oracle:catalogue"] <= p["optimal_over_candidates:history_oracle"] + 1e-9
    assert p["optimal_over_candidates:history_oracle"] <= p["optimal"] + 1e-9
    ess = report["posterior_ess"]
    assert 1.0 <= ess["0.05"] <= ess["0.5"] <= ess["0.95"] <= 2000 + 1e-6
    # the requests' users have logged histories, and those histories move the posterior
    assert report["history_impressions"]["0.5"] > 0 and ess["0.5"] < 2000


def test_the_user_knowledge_benchmark_never_passes_knowing_the_user(trained, tiny_dataset, home):
    """tools.bench_user_knowledge orders the ranker's candidates with the exact response
    model: the true user is its best (the Oracle's own pick), every plug-in user earns at
    most that, and the reads are reads (a taste of unit length, a budget correlated with the
    truth)."""
    from tools.bench_user_knowledge import budget_read, run

    report = run(home.home, tiny_dataset["dataset"], n_requests=30)
    p = {name: row["oracle_egmv_per_1k"] for name, row in report["policies"].items()}
    assert p["known"] > 0
    for name, value in p.items():
        if name not in ("optimal", "known", "heuristic", "popularity"):
            assert 0 <= value <= p["known"] + 1e-9, name
    assert report["policies"]["known"]["share_of_candidates_optimal"] == 1.0
    reads = report["reads"]
    assert 0 < reads["users_with_taste_read"] <= reads["users"]
    assert -1 <= reads["taste_cosine_mean"] <= 1
    # the budget read on its own: users who click dearer than they are shown read dearer
    rng = np.random.default_rng(0)
    budget = np.exp(rng.normal(np.log(45), 0.8, 300))
    users = np.repeat(np.arange(300), 40)
    items = rng.integers(0, 1000, len(users))
    log_price = rng.normal(np.log(40), 1.0, 1000)
    clicked = rng.random(len(users)) < 1 / (1 + np.exp(log_price[items] - np.log(budget[users])))
    imp = pd.DataFrame({"user_id": users, "item_id": items})
    read, fit = budget_read(imp, clicked, log_price, budget)
    assert fit["click_lift"] > 0 and fit["r_log_budget"] > 0.5
    assert read.shape == budget.shape and np.all(read > 0)


def test_the_two_stage_benchmark_refits_the_served_recipe(trained, tiny_dataset, home):
    """tools.bench_two_stage fits the one-stage model and the two-stage variants on the
    rankers stage's splits and scores them on the same requests; the click stage has more
    positives than the label, and the product of two probabilities is still one."""
    from tools.bench_two_stage import VARIANTS, run

    report = run(home.home, tiny_dataset["dataset"], seeds=[0], n_requests=20)
    rows = report["seeds"]["0"]
    assert set(rows) == set(VARIANTS)
    for row in rows.values():
        assert np.isfinite(row["oracle_egmv_per_1k"]) and row["oracle_egmv_per_1k"] >= 0
        assert 0.5 <= row["valid_auc"] <= 1 and row["valid_log_loss_calibrated"] > 0
    assert rows["one_stage"]["change_vs_one_stage"] == 0
    assert report["rows"]["train_clicked"] > report["rows"]["train_label"] > 0


def test_the_profile_benchmark_recomputes_the_served_profiles(trained, tiny_dataset, home):
    """tools.bench_profile rebuilds each sampled user's content profile from the raw tables by
    the documented rule (clicks, purchases and organic impressions, in the catalogue's
    content space) and finds the served one; its rank correlations are correlations."""
    from tools.bench_profile import run

    report = run(home.home, tiny_dataset["dataset"], n_users=60)
    assert report["users"] > 10 and report["content_space_dim"] >= 1
    assert report["served_vs_recomputed_max_abs"] < 1e-5
    rhos = report["taste_spearman"]
    for row in rhos.values():
        assert row["users"] > 0 and -1.0 <= row["mean"] <= 1.0
    assert rhos["served"] == rhos["engagement+organic, content space"]
    assert report["budget_pearson"]["mean log price of the profile's items"]["users"] > 10
    bands = report["evidence"]["bands"]  # the served weight was checked with the profile
    assert sum(b["users"] for b in bands) > 10
    assert all(np.isfinite(b["mean_slope"]) for b in bands)


def test_an_offline_benchmark_writes_its_report_into_the_home_it_is_given(
    trained, tiny_dataset, home, capsys
):
    """The benchmarks' shared command line (tools.offline_bench), through bench_profile's."""
    from tools.bench_profile import main

    out = home.reports / "profile_quality.json"
    out.unlink(missing_ok=True)
    args = ["--home", str(home.home), "--dataset", tiny_dataset["dataset"], "--users", "30"]
    assert main(args) == 0
    assert json.loads(out.read_text())["users"] > 0
    assert str(out) in capsys.readouterr().out


def test_the_ope_benchmark_draws_each_sample_anew_and_checks_the_supported_part(
    trained, tiny_dataset, home
):
    """tools.bench_ope: the same requests and seed give the same estimates (each sample is
    ranked anew, not taken from an earlier sample's cache), another seed other requests;
    the supported part is a part of the page."""
    from tools.bench_ope import parse_samples, run

    assert parse_samples("2000:0,8000:1") == [(2000, 0), (8000, 1)]
    with pytest.raises(ValueError, match="requests:seed"):
        parse_samples("2000")
    report = run(home.home, tiny_dataset["dataset"], [(60, 0), (60, 0), (60, 1)])
    first, again, other = report["rows"]
    assert first["dr"] == again["dr"] and first["supported"] == again["supported"]
    assert first["oracle"] != other["oracle"]
    for row in report["rows"]:
        part = row["supported"]
        assert 0.0 <= part["slot_share"] <= 1.0 and 0.0 <= part["oracle"] <= row["oracle"]
        assert part["ips"]["estimate"] == pytest.approx(row["ips"]["estimate"])
        assert row["largest_weight"] >= 0.0
    met = report["met"]
    assert met["samples"] == 3 and set(met["page"]) == {"dr", "dr_os", "dm", "ips"}
    assert all(0 <= n <= 3 for n in (*met["page"].values(), *met["supported"].values()))


def test_the_served_sweep_scores_every_setting_and_rebuilds_the_bundles_history(
    trained, tiny_dataset, home
):
    """tools.bench_levers --served-sweep scores the staged model under each setting on the
    same requests; at the bundle's own history cap, PROFILE share and evidence shrink it is
    the served policy, and the Oracle's best page over the candidates is never below a
    ranking of them."""
    from contract.scorer import EVIDENCE_KAPPA, EVIDENCE_PRIOR
    from contract.tower import VALUE_WEIGHT
    from tools.bench_levers import (
        HISTORY_CAPS,
        KAPPAS,
        PROFILE_SHARES,
        VALUE_WEIGHTS,
        served_sweep,
    )
    from training.retrieval.history import MAX_ITEMS

    report = served_sweep(home.home, tiny_dataset["dataset"], n_requests=20)
    policies = {name: p["oracle_egmv_per_1k"] for name, p in report["policies"].items()}
    expected = {"served", "valid:served", "unshrunk", "valid:unshrunk"}
    expected |= {
        f"{w}evidence{s}@{k:g}"
        for w in ("", "valid:")
        for s in ("", "_7d", "_total")
        for k in KAPPAS
    }
    expected |= {f"profile@{s:g}" for s in PROFILE_SHARES}
    expected |= {f"history@{c}" for c in HISTORY_CAPS}
    expected |= {f"{w}retrieval_value@{v:g}" for w in ("", "valid:") for v in VALUE_WEIGHTS}
    assert expected <= set(policies)
    # the bundle's own value weight is the served retrieval; another weight moves it
    assert VALUE_WEIGHT in VALUE_WEIGHTS
    assert policies[f"retrieval_value@{VALUE_WEIGHT:g}"] == policies["served"]
    for v in VALUE_WEIGHTS:
        best = policies[f"optimal_over_candidates:retrieval_value@{v:g}"]
        assert best >= policies[f"retrieval_value@{v:g}"]
    assert all(np.isfinite(v) and v >= 0 for v in policies.values())
    assert policies["profile@0"] == policies["served"]
    own = f"evidence_total@{EVIDENCE_KAPPA:g}" + (f"+{EVIDENCE_PRIOR:g}" if EVIDENCE_PRIOR else "")
    assert policies[own] == policies["served"]
    assert policies[f"history@{MAX_ITEMS}"] == policies["served"]
    for share in PROFILE_SHARES:
        assert policies[f"optimal_over_candidates@{share:g}"] >= policies[f"profile@{share:g}"]
