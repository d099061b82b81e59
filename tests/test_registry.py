"""Bundle manifests and the MLflow registry: verify refuses what changed, register -> load
by alias gives back the same bytes, aliases move, versions count up.

One SQLite registry per module (creating its tables takes ~2 s); each test that needs
fresh version numbers registers under its own model name.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import lightgbm as lgb
import numpy as np
import pytest

from contract.bundle import (
    ALIAS_CHALLENGER,
    ALIAS_CHAMPION,
    BUNDLE_MANIFEST,
    FEATURE_SCHEMA,
    PURCHASE_MODEL,
    BundleError,
    file_checksums,
    verify_bundle,
    write_manifest,
)
from contract.registry import Registry, default_tracking_uri

SCHEMA_HASH = "schema-aaaa"


@pytest.fixture(scope="module")
def model_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real LightGBM purchase model (2,000 rows x 20 features, 30 trees) as text."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2_000, 20)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] * X[:, 2] + rng.normal(size=2_000) > 0).astype(np.int32)
    params = {"objective": "binary", "num_leaves": 7, "verbose": -1, "num_threads": 1}
    booster = lgb.train(params, lgb.Dataset(X, y), num_boost_round=30)
    text: str = booster.model_to_string()
    return text


def make_bundle(root: Path, model_text: str, version: str = "b1") -> Path:
    bundle = root / version
    (bundle / "ranker").mkdir(parents=True)
    (bundle / "eval").mkdir()
    (bundle / PURCHASE_MODEL).write_text(model_text)
    (bundle / FEATURE_SCHEMA).write_text(json.dumps({"names": ["f0"], "hash": SCHEMA_HASH}))
    (bundle / "eval" / "eval.json").write_text(json.dumps({"auc": 0.71}))
    write_manifest(
        bundle,
        version=version,
        data_snapshot="sim-tiny@2024-01-31",
        feature_schema_hash=SCHEMA_HASH,
        metrics={"auc": 0.71, "ndcg": {"at10": 0.42}, "note": "not a number"},
    )
    return bundle


@pytest.fixture
def bundle(tmp_path: Path, model_text: str) -> Path:
    return make_bundle(tmp_path / "bundles", model_text)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("registry_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOMEFEED_HOME", str(root))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield root


@pytest.fixture
def registry(home: Path, request: pytest.FixtureRequest) -> Registry:
    """The home's default registry, with a model name of this test's own."""
    return Registry(name=f"ranker-{request.node.name}".replace("[", "-").replace("]", ""))


# --- manifest --------------------------------------------------------------------------


def test_manifest_lists_every_other_file_with_its_sha256(bundle: Path) -> None:
    manifest = json.loads((bundle / BUNDLE_MANIFEST).read_text())
    assert list(manifest["files"]) == ["eval/eval.json", FEATURE_SCHEMA, PURCHASE_MODEL]
    digest = hashlib.sha256((bundle / PURCHASE_MODEL).read_bytes()).hexdigest()
    assert manifest["files"][PURCHASE_MODEL] == digest
    assert manifest["version"] == "b1"
    assert manifest["feature_schema_hash"] == SCHEMA_HASH
    assert manifest["created_at"].endswith("+00:00")
    assert verify_bundle(bundle, SCHEMA_HASH) == manifest


def test_a_modified_file_is_refused_by_name(bundle: Path) -> None:
    with (bundle / PURCHASE_MODEL).open("a") as f:
        f.write("\n")
    with pytest.raises(BundleError, match=r"modified ranker/purchase\.txt \(sha256"):
        verify_bundle(bundle)


def test_an_extra_file_is_refused_by_name(bundle: Path) -> None:
    (bundle / "eval" / "notes.txt").write_text("added after the manifest")
    with pytest.raises(BundleError, match=r"extra eval/notes\.txt"):
        verify_bundle(bundle)


def test_a_missing_file_is_refused_by_name(bundle: Path) -> None:
    (bundle / FEATURE_SCHEMA).unlink()
    with pytest.raises(BundleError, match=r"missing feature_schema\.json"):
        verify_bundle(bundle)


def test_a_bundle_without_manifest_is_refused(bundle: Path) -> None:
    (bundle / BUNDLE_MANIFEST).unlink()
    with pytest.raises(BundleError, match=r"bundle\.json is missing"):
        verify_bundle(bundle)


def test_another_schema_hash_is_refused_naming_both(bundle: Path) -> None:
    with pytest.raises(BundleError, match="built for feature schema schema-aaaa, expected bbbb"):
        verify_bundle(bundle, expected_schema_hash="bbbb")


def test_bundle_error_is_a_value_error() -> None:
    assert issubclass(BundleError, ValueError)
    assert BundleError.grpc_status_name == "FAILED_PRECONDITION"


# --- registry ----------------------------------------------------------------------------


def stored_bundle(registry: Registry, version: int) -> Path:
    """Where the registry's file artifact store keeps a version's bundle."""
    source = registry.client.get_model_version(registry.name, str(version)).source
    return Path(urlparse(str(source)).path)


def test_default_backend_is_sqlite_under_home_and_env_overrides(
    home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOMEFEED_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri() == f"sqlite:///{home.resolve()}/mlruns/mlflow.db"
    assert Registry().artifact_root == home.resolve() / "mlruns" / "artifacts"
    other = f"sqlite:///{tmp_path}/elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    assert Registry().tracking_uri == other
    assert Registry("http://mlflow:5000").artifact_root is None


def test_register_then_load_by_alias_gives_the_same_files(
    registry: Registry, bundle: Path, tmp_path: Path, home: Path
) -> None:
    version = registry.register(bundle, metrics={"extra": 1.5}, params={"trees": 30})
    assert version == 1
    assert registry.get_version(ALIAS_CHALLENGER) == 1
    loaded = registry.load(ALIAS_CHALLENGER, tmp_path / "cache")
    assert loaded == tmp_path / "cache" / registry.name / "v1"
    assert file_checksums(loaded) == file_checksums(bundle)
    assert (loaded / BUNDLE_MANIFEST).read_bytes() == (bundle / BUNDLE_MANIFEST).read_bytes()
    assert verify_bundle(loaded, SCHEMA_HASH)["version"] == "b1"

    assert stored_bundle(registry, 1).is_relative_to(home.resolve() / "mlruns" / "artifacts")
    run_id = registry.client.get_model_version(registry.name, "1").run_id
    assert run_id is not None
    run = registry.client.get_run(run_id)
    assert run.data.params["trees"] == "30"
    assert run.data.params["feature_schema_hash"] == SCHEMA_HASH
    assert run.data.metrics == {"auc": 0.71, "ndcg.at10": 0.42, "extra": 1.5}


def test_two_registrations_give_versions_1_and_2(
    registry: Registry, tmp_path: Path, model_text: str
) -> None:
    first = registry.register(make_bundle(tmp_path, model_text, "b1"))
    second = registry.register(make_bundle(tmp_path, model_text, "b2"))
    assert (first, second) == (1, 2)
    assert registry.get_version(ALIAS_CHALLENGER) == 2
    loaded = registry.load(1, tmp_path / "cache")
    assert json.loads((loaded / BUNDLE_MANIFEST).read_text())["version"] == "b1"


def test_moving_the_champion_alias(registry: Registry, tmp_path: Path, model_text: str) -> None:
    v1 = registry.register(make_bundle(tmp_path, model_text, "b1"), alias=ALIAS_CHAMPION)
    v2 = registry.register(make_bundle(tmp_path, model_text, "b2"), alias=None)
    assert registry.get_version(ALIAS_CHAMPION) == v1
    registry.set_alias(v2, ALIAS_CHAMPION)
    assert registry.get_version(ALIAS_CHAMPION) == v2
    loaded = registry.load(ALIAS_CHAMPION, tmp_path / "cache")
    assert json.loads((loaded / BUNDLE_MANIFEST).read_text())["version"] == "b2"
    registry.set_alias(v1, ALIAS_CHAMPION)  # rollback
    assert registry.get_version(ALIAS_CHAMPION) == v1


def test_load_refuses_a_registered_bundle_tampered_in_the_store(
    registry: Registry, bundle: Path, tmp_path: Path
) -> None:
    version = registry.register(bundle)
    (stored_bundle(registry, version) / PURCHASE_MODEL).write_text("tree=0\n")
    cache = tmp_path / "cache"
    with pytest.raises(BundleError, match=r"modified ranker/purchase\.txt"):
        registry.load(version, cache)
    assert list((cache / registry.name).iterdir()) == []  # nothing half-verified left behind


def test_a_tampered_cache_is_fetched_again(
    registry: Registry, bundle: Path, tmp_path: Path
) -> None:
    registry.register(bundle)
    cache = tmp_path / "cache"
    loaded = registry.load(ALIAS_CHALLENGER, cache)
    original = (loaded / PURCHASE_MODEL).read_bytes()
    (loaded / PURCHASE_MODEL).write_text("tree=0\n")
    (loaded / "eval" / "stray.txt").write_text("x")
    again = registry.load(ALIAS_CHALLENGER, cache)
    assert again == loaded
    assert (again / PURCHASE_MODEL).read_bytes() == original
    assert not (again / "eval" / "stray.txt").exists()


def test_load_refuses_another_schema(registry: Registry, bundle: Path, tmp_path: Path) -> None:
    registry.register(bundle)
    with pytest.raises(BundleError, match="built for feature schema schema-aaaa, expected zzzz"):
        registry.load(ALIAS_CHALLENGER, tmp_path / "cache", expected_schema_hash="zzzz")
    assert registry.load(ALIAS_CHALLENGER, tmp_path / "cache", SCHEMA_HASH).is_dir()


def test_an_unverifiable_bundle_is_never_registered(registry: Registry, bundle: Path) -> None:
    shutil.copy(bundle / PURCHASE_MODEL, bundle / "ranker" / "copy.txt")
    with pytest.raises(BundleError, match=r"extra ranker/copy\.txt"):
        registry.register(bundle)
    assert registry.client.search_model_versions(f"name='{registry.name}'") == []


def test_a_shipped_schema_that_disagrees_with_the_manifest_is_refused(tmp_path):
    import json

    from contract.bundle import BundleError, verify_bundle, write_manifest

    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "feature_schema.json").write_text(json.dumps({"names": ["a"], "hash": "abc"}))
    write_manifest(bundle, version="v", data_snapshot="d", feature_schema_hash="abc", metrics={})
    verify_bundle(bundle, expected_schema_hash="abc")
    write_manifest(bundle, version="v", data_snapshot="d", feature_schema_hash="xyz", metrics={})
    with pytest.raises(BundleError, match=r"feature_schema\.json has hash abc"):
        verify_bundle(bundle)
