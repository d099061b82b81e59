"""`homefeed train` end to end on the tiny preset: every stage, the report contract, and a
registered bundle that loads back verified."""

from __future__ import annotations

import json

import pytest

from contract import bundle as B
from training.train import STAGES

CONTRACT = {
    "policies": ["heuristic", "popularity", "logreg", "ranker", "optimal"],
    "ranking": ["ndcg_at_20", "ndcg_at_20_ips", "auc", "logloss"],
    "calibration": ["ece_before", "ece_after"],
    "retrieval": ["recall_at_500", "popularity_recall_at_500", "ann_recall_at_500_vs_exact"],
    "compiled": ["max_abs_diff", "p99_ms_500"],
    "lightgbm": ["p99_ms_500"],
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
