"""The ranking service: the scoring core without gRPC, then a real server on port 0 serving
the bundle that ``tiny_trained`` registered, over real channels.

Expected scores are computed independently of ``services/``: LightGBM's ``Booster.predict``
on the bundle's ``ranker/purchase.txt`` followed by the isotonic map of
``ranker/calibrator.json``, on feature rows that ``build_matrix`` makes from the tiny
test split.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import grpc
import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from homefeed.ranking.v1 import ranking_pb2, ranking_pb2_grpc

from contract.bundle import (
    ALIAS_CHAMPION,
    BUNDLE_MANIFEST,
    CALIBRATOR,
    CLICK_MODEL,
    CLICK_OFFSET,
    COMPILED_MODEL,
    EVIDENCE,
    LINEAR_OFFSET,
    PURCHASE_MODEL,
    file_checksums,
)
from contract.features import FEATURE_SCHEMA, build_matrix
from contract.paths import REPO_ROOT, Paths
from contract.registry import Registry
from contract.scorer import CompiledScorer
from services.common.bundles import BundleRef
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.common.matrix import to_float_matrix
from services.common.settings import ServerSettings, SettingsError
from services.ranking.scorer import LoadedModel, ModelHolder, ServedScore
from services.ranking.server import (
    SERVICE_NAME,
    StartupError,
    create_admin_server,
    create_server,
)
from services.ranking.settings import RankingSettings
from tools.chaos import other_schema_bundle

TOKEN = "test-admin-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
N_ROWS = 500
TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Rows:
    """Real candidate rows of the tiny test split and what they must score."""

    item_ids: np.ndarray
    X: np.ndarray  # float32 (n, schema width)
    values: np.ndarray  # float32 price x margin
    expected_p: np.ndarray  # LightGBM + calibrator, float64


def reference_stage(model: Path, offset: Path, X: np.ndarray) -> np.ndarray:
    """LightGBM's p of one stage [boosted from the offset file's log-odds, when it exists]."""
    booster = lgb.Booster(model_file=str(model))
    raw = np.asarray(booster.predict(X, num_threads=1), dtype=np.float64)
    if offset.exists():  # the trees were boosted from these log-odds
        lin = json.loads(offset.read_text())
        Z = (np.nan_to_num(X.astype(np.float64)) - lin["mean"]) / lin["scale"]
        margin = Z @ np.asarray(lin["coef"]) + lin["intercept"]
        margin += booster.predict(X, num_threads=1, raw_score=True)
        raw = 1.0 / (1.0 + np.exp(-margin))
    return raw


def reference_p(bundle: Path, X: np.ndarray) -> np.ndarray:
    """The calibrated purchase stage's p [x the click stage's, a two-stage bundle]."""
    raw = reference_stage(bundle / PURCHASE_MODEL, bundle / LINEAR_OFFSET, X)
    if (bundle / CLICK_MODEL).exists():
        raw = raw * reference_stage(bundle / CLICK_MODEL, bundle / CLICK_OFFSET, X)
    cal = json.loads((bundle / CALIBRATOR).read_text())
    return np.interp(raw, np.asarray(cal["x"], np.float64), np.asarray(cal["y"], np.float64))


def reference_egmv(bundle: Path, X: np.ndarray, p: np.ndarray, values: np.ndarray) -> np.ndarray:
    """p x value x (n + prior) / (n + prior + kappa), read from the bundle's evidence.json
    (written out here, not through contract.scorer)."""
    ev = json.loads((bundle / EVIDENCE).read_text())
    n = np.nan_to_num(X[:, FEATURE_SCHEMA.names.index(ev["feature"])].astype(np.float64))
    n = n + ev["prior"]
    factor = np.divide(n, n + ev["kappa"], out=np.zeros_like(n), where=n > 0)
    return p * values.astype(np.float64) * factor


@pytest.fixture(scope="module")
def rows(tiny_dataset: dict, tiny_bundle: Path, home: Paths) -> Rows:
    frame = pd.read_parquet(home.training_sets(tiny_dataset["dataset"]) / "test.parquet")
    frame = frame.iloc[np.random.default_rng(0).permutation(len(frame))[:N_ROWS]]
    X = build_matrix(frame)
    values = (frame["price"].to_numpy() * 0.3).astype(np.float32)
    values[::7] = 0.0  # a worthless item still gets its probability
    return Rows(frame["item_id"].to_numpy(), X, values, reference_p(tiny_bundle, X))


@pytest.fixture(scope="module")
def model(tiny_bundle: Path) -> LoadedModel:
    return LoadedModel.load(tiny_bundle)


def copy_bundle(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle, dest)
    return dest


def flip_bytes(path: Path, offset: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, min(offset + 64, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# --- core, without gRPC ---------------------------------------------------------------------


def test_score_is_lightgbm_then_calibrator_and_egmv_is_p_times_value(
    model: LoadedModel, rows: Rows, tiny_bundle: Path
) -> None:
    assert len(rows.X) == N_ROWS
    p, egmv = model.score(rows.X, rows.values)
    np.testing.assert_allclose(p, rows.expected_p, rtol=0, atol=1e-6)
    assert ((p >= 0) & (p <= 1)).all()
    assert p.std() > 0  # the rows are scored, not a constant
    expected = reference_egmv(tiny_bundle, rows.X, p, rows.values)
    np.testing.assert_allclose(egmv, expected, rtol=1e-6, atol=1e-12)
    assert (egmv[::7] == 0).all()
    # the shrink is on and bites: well-shown items keep most of p x value, others less
    unshrunk = p * rows.values
    factor = egmv[unshrunk > 0] / unshrunk[unshrunk > 0]
    assert model.evidence is not None and model.evidence.kappa > 0
    assert factor.min() < 0.9 * factor.max() and (factor <= 1 + 1e-6).all()
    manifest = json.loads((tiny_bundle / BUNDLE_MANIFEST).read_text())
    assert model.version == model.bundle_version == manifest["version"]  # no registry version
    assert model.schema_hash == FEATURE_SCHEMA.hash == manifest["feature_schema_hash"]
    assert model.width == rows.X.shape[1]


def test_nan_features_are_missing_values_and_score(model: LoadedModel, rows: Rows) -> None:
    X = rows.X[:50].copy()
    X[::3, ::2] = np.nan
    model.check_inputs(X, rows.values[:50])
    p, _ = model.score(X, rows.values[:50])
    np.testing.assert_allclose(p, reference_p(model.bundle_dir, X), rtol=0, atol=1e-6)


def test_schema_hash_empty_is_invalid_and_another_is_a_failed_precondition(
    model: LoadedModel,
) -> None:
    model.check_schema_hash(model.schema_hash)
    with pytest.raises(InvalidArgument, match=r"features\.schema_hash is required"):
        model.check_schema_hash("")
    other = "ab" * 32
    expected = (
        f"feature schema {other[:12]} does not match model {model.version}'s "
        f"{model.schema_hash[:12]}: "
    )
    with pytest.raises(FailedPrecondition) as err:
        model.check_schema_hash(other)
    assert str(err.value).startswith(expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda X, v: (X[:, :-1], v), r"features\.cols must be \d+"),
        (lambda X, v: (X, v[:-1]), r"values must hold one price x margin per row \(20\), got 19"),
        (lambda X, v: (X, np.where(np.arange(20) == 3, -1.0, v)), r"got -1\.0 at index 3"),
        (lambda X, v: (X, np.where(np.arange(20) == 5, np.nan, v)), r"got nan at index 5"),
        (lambda X, v: (X, np.where(np.arange(20) == 6, np.inf, v)), r"got inf at index 6"),
    ],
    ids=["cols", "values-length", "negative-value", "nan-value", "inf-value"],
)
def test_check_inputs_refuses(
    model: LoadedModel,
    rows: Rows,
    change: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    message: str,
) -> None:
    X, values = change(rows.X[:20].copy(), rows.values[:20].astype(np.float64))
    with pytest.raises(InvalidArgument, match=message):
        model.check_inputs(X, values)


def test_an_infinite_feature_is_refused_naming_row_column_and_feature(
    model: LoadedModel, rows: Rows
) -> None:
    X = rows.X[:20].copy()
    X[4, 2] = -np.inf
    X[9, 0] = np.inf
    name = model.schema.names[2]
    with pytest.raises(InvalidArgument, match=rf"got -inf at row 4, column 2 \({name}\); 2 "):
        model.check_inputs(X, rows.values[:20])


def test_holder_serves_nothing_before_the_first_load(tiny_bundle: Path, tmp_path: Path) -> None:
    holder = ModelHolder(
        default_target=str(tiny_bundle), cache_dir=tmp_path, allow_directories=True
    )
    with pytest.raises(Unavailable, match="no ranking model is loaded"):
        holder.current()
    swap = holder.reload()
    assert swap.previous is None
    assert holder.current() is swap.current
    assert swap.current.version == swap.current.bundle_version


def test_holder_refuses_a_tampered_directory_and_keeps_serving(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    holder = ModelHolder(
        default_target=str(tiny_bundle), cache_dir=tmp_path, allow_directories=True
    )
    serving = holder.reload().current
    bad = copy_bundle(tiny_bundle, tmp_path / "tampered")
    flip_bytes(bad / COMPILED_MODEL)
    with pytest.raises(FailedPrecondition) as err:
        holder.reload(str(bad))
    assert "modified ranker/purchase.so" in str(err.value)
    assert "still serving model bundle" in str(err.value)
    assert holder.current() is serving


def test_holder_refuses_a_library_that_does_not_load_even_with_matching_checksums(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """The manifest is rewritten to match, so only loading the library can catch it."""
    holder = ModelHolder(
        default_target=str(tiny_bundle), cache_dir=tmp_path, allow_directories=True
    )
    serving = holder.reload().current
    bad = copy_bundle(tiny_bundle, tmp_path / "broken-lib")
    (bad / COMPILED_MODEL).write_bytes(b"not a shared library\n")
    manifest = json.loads((bad / BUNDLE_MANIFEST).read_text())
    manifest["files"] = file_checksums(bad)
    (bad / BUNDLE_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FailedPrecondition, match=r"cannot load bundle directory .*broken-lib"):
        holder.reload(str(bad))
    assert holder.current() is serving


def test_holder_refuses_a_library_whose_warm_up_scores_are_not_probabilities(
    tiny_bundle: Path, tmp_path: Path, rows: Rows, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = ModelHolder(
        default_target=str(tiny_bundle), cache_dir=tmp_path, allow_directories=True
    )
    serving = holder.reload().current
    with monkeypatch.context() as patch:
        patch.setattr(
            CompiledScorer, "predict", lambda self, X, margin=False: np.full(len(X), np.nan)
        )
        with pytest.raises(FailedPrecondition, match="warm-up scores are not probabilities"):
            holder.reload(str(copy_bundle(tiny_bundle, tmp_path / "nan-lib")))
    assert holder.current() is serving
    p, _ = serving.score(rows.X[:10], rows.values[:10])
    np.testing.assert_allclose(p, rows.expected_p[:10], rtol=0, atol=1e-6)


def test_holder_takes_directories_only_when_serving_a_directory(tmp_path: Path) -> None:
    holder = ModelHolder(default_target=ALIAS_CHAMPION, cache_dir=tmp_path)
    with pytest.raises(InvalidArgument, match="directories are accepted only when"):
        holder.reload("/some/bundle")
    with pytest.raises(InvalidArgument, match=r"target must be a registry alias .*'bad alias'"):
        holder.reload("bad alias")


def test_served_score_knows_only_the_purchase_model() -> None:
    assert ServedScore.parse(" Purchase ") is ServedScore.PURCHASE
    with pytest.raises(ValueError, match="LambdaMART model is not served"):
        ServedScore.parse("lambdamart")
    with pytest.raises(ValueError, match="must be one of purchase, got 'ctr'"):
        ServedScore.parse("ctr")


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in (
        "HOMEFEED_RANKING_MODEL",
        "HOMEFEED_RANKING_BUNDLE_DIR",
        "HOMEFEED_RANKING_CACHE_DIR",
        "HOMEFEED_RANKING_SCORE",
        "HOMEFEED_ADMIN_TOKEN",
        "HOMEFEED_MODEL",
        "HOMEFEED_BUNDLE_DIR",
        "HOMEFEED_MODEL_CACHE",
        "MLFLOW_TRACKING_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOMEFEED_HOME", str(tmp_path))
    s = RankingSettings.from_env()
    assert (s.source.model, s.source.bundle_dir, s.admin_token, s.score) == (
        "champion",
        None,
        None,
        ServedScore.PURCHASE,
    )
    assert s.source.model_cache == tmp_path.resolve() / "artifacts" / "model_cache"
    assert s.source.registry_uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert s.default_target == "champion"

    monkeypatch.setenv("HOMEFEED_ADMIN_TOKEN", "s3cret")
    monkeypatch.setenv("HOMEFEED_RANKING_BUNDLE_DIR", str(tmp_path / "b"))
    s = RankingSettings.from_env()
    assert s.default_target == str((tmp_path / "b").resolve())
    assert "s3cret" not in repr(s)

    monkeypatch.setenv("HOMEFEED_RANKING_SCORE", "lambdamart")
    with pytest.raises(SettingsError, match="HOMEFEED_RANKING_SCORE must be one of purchase"):
        RankingSettings.from_env()


# --- the service over real channels ---------------------------------------------------------


@dataclass
class Running:
    stub: ranking_pb2_grpc.RankingServiceStub
    channel: grpc.Channel
    holder: ModelHolder
    settings: RankingSettings
    admin: ranking_pb2_grpc.RankingServiceStub  # the admin port (Reload)


@pytest.fixture(scope="module")
def registry_settings(tiny_trained: dict, home: Paths, tmp_path_factory) -> RankingSettings:
    return RankingSettings(
        server=ServerSettings(port=0, max_workers=4, drain_seconds=0),
        home=home.home,
        bundle=BundleRef(
            home.home, cache_dir=tmp_path_factory.mktemp("model_cache"), service="ranking"
        ),
        admin_token=TOKEN,
    )


def start(settings: RankingSettings) -> Generator[Running, None, None]:
    server, port, holder = create_server(settings)
    admin, admin_port = create_admin_server(settings, holder)
    server.start()
    admin.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    admin_channel = grpc.insecure_channel(f"127.0.0.1:{admin_port}")
    try:
        yield Running(
            ranking_pb2_grpc.RankingServiceStub(channel),
            channel,
            holder,
            settings,
            ranking_pb2_grpc.RankingServiceStub(admin_channel),
        )
    finally:
        channel.close()
        admin_channel.close()
        server.stop(None).wait()
        admin.stop(None).wait()


@pytest.fixture(scope="module")
def served(registry_settings: RankingSettings) -> Iterator[Running]:
    yield from start(registry_settings)


@pytest.fixture
def fresh(registry_settings: RankingSettings) -> Iterator[Running]:
    """A server of its own, for tests that change the model it serves."""
    yield from start(registry_settings)


@pytest.fixture(scope="module")
def champion(tiny_trained: dict) -> str:
    return str(tiny_trained["register"]["registry_version"])


def rank_request(rows: Rows, schema_hash: str, n: int = N_ROWS) -> ranking_pb2.RankRequest:
    return ranking_pb2.RankRequest(
        request_id="r1",
        user_id=7,
        item_ids=rows.item_ids[:n].tolist(),
        features=to_float_matrix(rows.X[:n], schema_hash),
        values=rows.values[:n].tolist(),
    )


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_health_is_serving_with_the_model_loaded(served: Running, champion: str) -> None:
    health = health_pb2_grpc.HealthStub(served.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert served.holder.current().version == champion


def test_rank_scores_real_rows_like_lightgbm_and_the_calibrator(
    served: Running, rows: Rows, champion: str, model: LoadedModel
) -> None:
    reply = served.stub.Rank(rank_request(rows, model.schema_hash), timeout=TIMEOUT_S)
    p = np.asarray(reply.p_purchase, dtype=np.float64)
    assert p.shape == (N_ROWS,)
    assert ((p >= 0) & (p <= 1)).all()
    np.testing.assert_allclose(p, rows.expected_p, rtol=0, atol=1e-6)
    egmv = np.asarray(reply.egmv, dtype=np.float64)
    expected = reference_egmv(model.bundle_dir, rows.X, p, rows.values)
    np.testing.assert_allclose(egmv, expected, rtol=1e-5, atol=1e-9)
    assert reply.model_version == champion
    assert reply.schema_hash == model.schema_hash


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: (r.ClearField("item_ids"), r.ClearField("values")), r"^item_ids must have at"),
        (lambda r: r.item_ids.extend(range(1501)), r"^item_ids must have at most 2000 ids, got"),
        (lambda r: r.item_ids.__setitem__(2, -5), r"^item_ids must be non-negative.*\[-5\]"),
        (lambda r: setattr(r.features, "rows", 499), r"^features\.rows must equal .*\(500\), got"),
        (lambda r: setattr(r.features, "cols", 3), r"^features\.cols must be \d+ .*got 3"),
        (lambda r: r.features.values.pop(), r"^features\.values must hold rows x cols"),
        (lambda r: r.values.pop(), r"^values must hold one price x margin per item_id \(500\)"),
        (lambda r: r.values.__setitem__(9, -2.0), r"^values must be finite and >= 0.*index 9"),
        (lambda r: r.values.__setitem__(4, float("nan")), r"^values must be finite.*nan at"),
        (lambda r: r.features.values.__setitem__(1, float("inf")), r"^features\.values must"),
        (lambda r: setattr(r.features, "schema_hash", ""), r"^features\.schema_hash is required"),
        (lambda r: setattr(r, "user_id", -1), r"^user_id must be 0\.\."),
    ],
    ids=[
        "no-items",
        "2001-items",
        "negative-id",
        "rows-not-ids",
        "cols",
        "matrix-size",
        "values-length",
        "negative-value",
        "nan-value",
        "inf-feature",
        "no-schema-hash",
        "negative-user",
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(
    served: Running,
    rows: Rows,
    model: LoadedModel,
    mutate: Callable[[ranking_pb2.RankRequest], object],
    message: str,
) -> None:
    request = rank_request(rows, model.schema_hash)
    mutate(request)
    err = rpc_error(lambda: served.stub.Rank(request, timeout=TIMEOUT_S))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details() is not None
    assert re.search(message, err.details()), err.details()


def test_another_feature_schema_is_a_failed_precondition(
    served: Running, rows: Rows, champion: str, model: LoadedModel
) -> None:
    err = rpc_error(lambda: served.stub.Rank(rank_request(rows, "f" * 64, 5), timeout=TIMEOUT_S))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert err.details().startswith(
        f"feature schema ffffffffffff does not match model {champion}'s {model.schema_hash[:12]}"
    )


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)],
    ids=["none", "wrong-token", "no-bearer"],
)
def test_reload_needs_the_admin_token(
    served: Running, champion: str, metadata: tuple[tuple[str, str], ...]
) -> None:
    request = ranking_pb2.ReloadRequest(target=ALIAS_CHAMPION)
    err = rpc_error(lambda: served.admin.Reload(request, metadata=metadata, timeout=TIMEOUT_S))
    assert err.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer <admin token>" in (err.details() or "")
    assert served.holder.current().version == champion


def test_reload_of_the_same_alias_echoes_the_versions(served: Running, champion: str) -> None:
    before = served.holder.current()
    for target in (ALIAS_CHAMPION, "", champion):
        reply = served.admin.Reload(
            ranking_pb2.ReloadRequest(target=target), metadata=AUTH, timeout=30
        )
        assert (reply.previous_version, reply.model_version) == (champion, champion)
    assert served.holder.current() is not before  # loaded again and swapped, same version


@pytest.mark.parametrize(
    ("target", "named"), [("no-such-alias", "'no-such-alias'"), ("9999", "version 9999")]
)
def test_reload_of_an_unknown_alias_or_version_is_not_found(
    served: Running, champion: str, target: str, named: str
) -> None:
    request = ranking_pb2.ReloadRequest(target=target)
    err = rpc_error(lambda: served.admin.Reload(request, metadata=AUTH, timeout=30))
    assert err.code() is grpc.StatusCode.NOT_FOUND, err.details()
    assert named in (err.details() or "")
    assert f"still serving model {champion}" in (err.details() or "")
    assert served.holder.current().version == champion


def register_copy(bundle: Path, dest: Path) -> tuple[int, Path]:
    """Register a copy of ``bundle`` as a new version (no alias); returns the version and
    where the registry's artifact store keeps it."""
    registry = Registry()
    version = registry.register(copy_bundle(bundle, dest), alias=None)
    source = registry.client.get_model_version(registry.name, str(version)).source
    return version, Path(urlparse(str(source)).path)


def test_a_corrupt_registry_version_is_refused_and_the_old_one_keeps_serving(
    served: Running, rows: Rows, champion: str, model: LoadedModel, tiny_bundle: Path, tmp_path
) -> None:
    version, stored = register_copy(tiny_bundle, tmp_path / "copy")
    assert stored.is_relative_to(served.settings.home / "mlruns" / "artifacts")
    flip_bytes(stored / COMPILED_MODEL)
    assert not (served.settings.source.model_cache / Registry().name / f"v{version}").exists()

    request = ranking_pb2.ReloadRequest(target=str(version))
    err = rpc_error(lambda: served.admin.Reload(request, metadata=AUTH, timeout=60))
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION, err.details()
    details = err.details() or ""
    assert f"version {version}" in details
    assert "modified ranker/purchase.so" in details
    assert f"still serving model {champion}" in details

    reply = served.stub.Rank(rank_request(rows, model.schema_hash, 20), timeout=TIMEOUT_S)
    assert reply.model_version == champion
    np.testing.assert_allclose(reply.p_purchase, rows.expected_p[:20], rtol=0, atol=1e-6)


def test_rank_calls_during_a_reload_all_succeed(
    fresh: Running, rows: Rows, champion: str, model: LoadedModel, tiny_bundle: Path, tmp_path
) -> None:
    version, _ = register_copy(tiny_bundle, tmp_path / "copy")
    request = rank_request(rows, model.schema_hash, 200)
    seen: list[str] = []
    errors: list[BaseException] = []
    reloaded = threading.Event()

    def hammer() -> None:
        deadline = time.monotonic() + 60
        after = 0
        while after < 20 and time.monotonic() < deadline:
            try:
                reply = fresh.stub.Rank(request, timeout=TIMEOUT_S)
                seen.append(reply.model_version)
                assert len(reply.p_purchase) == 200
            except BaseException as err:
                errors.append(err)
            if reloaded.is_set():
                after += 1

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    while not seen and not errors and all(t.is_alive() for t in threads):
        time.sleep(0.005)
    try:
        before = len(seen)
        reply = fresh.admin.Reload(
            ranking_pb2.ReloadRequest(target=str(version)), metadata=AUTH, timeout=60
        )
        during = len(seen) - before
    finally:
        reloaded.set()
        for t in threads:
            t.join(timeout=90)
    assert errors == []
    assert during > 0  # Rank calls completed while the reload ran
    assert (reply.previous_version, reply.model_version) == (champion, str(version))
    assert seen[0] == champion
    assert set(seen) == {champion, str(version)}
    assert fresh.stub.Rank(request, timeout=TIMEOUT_S).model_version == str(version)


# --- start-up -----------------------------------------------------------------------------


def test_start_up_fails_naming_an_unknown_alias(registry_settings: RankingSettings) -> None:
    settings = replace(
        registry_settings, bundle=replace(registry_settings.source, model="no-such-alias")
    )
    with pytest.raises(StartupError, match=r"registry model 'no-such-alias' \(HOMEFEED_RANKING"):
        create_server(settings)
    with pytest.raises(NotFound):  # the cause, as Reload would report it
        ModelHolder(default_target="no-such-alias", cache_dir=settings.source.model_cache).reload()


def reload_error(
    served: Running, request: ranking_pb2.ReloadRequest, metadata: tuple[tuple[str, str], ...]
) -> grpc.RpcError:
    return rpc_error(lambda: served.admin.Reload(request, metadata=metadata, timeout=30))


def test_admin_rpcs_are_served_on_the_admin_port_only(served: Running, rows: Rows) -> None:
    request = ranking_pb2.ReloadRequest(target=ALIAS_CHAMPION)
    err = rpc_error(lambda: served.stub.Reload(request, metadata=AUTH, timeout=30))
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "admin port" in (err.details() or "")
    rank = rank_request(rows, served.holder.current().schema_hash, 5)
    err = rpc_error(lambda: served.admin.Rank(rank, timeout=TIMEOUT_S))
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert len(served.stub.Rank(rank, timeout=TIMEOUT_S).p_purchase) == 5


def test_a_server_without_admin_token_refuses_reload_and_keeps_serving(
    tiny_bundle: Path, rows: Rows, model: LoadedModel, tmp_path: Path, caplog
) -> None:
    settings = RankingSettings(
        server=ServerSettings(port=0, drain_seconds=0, lame_duck_seconds=0),
        home=tmp_path,
        bundle=BundleRef(tmp_path, bundle_dir=tiny_bundle),
    )
    with caplog.at_level(logging.WARNING, logger="services.ranking.server"):
        running = start(settings)
        served = next(running)
    try:
        assert "admin RPCs (Reload) are refused" in caplog.text
        copy = copy_bundle(tiny_bundle, tmp_path / "again")
        for metadata in ((), AUTH, (("authorization", "Bearer "),)):
            err = reload_error(served, ranking_pb2.ReloadRequest(target=str(copy)), metadata)
            assert err.code() is grpc.StatusCode.PERMISSION_DENIED, err.details()
            assert "without an admin token" in (err.details() or "")
        assert served.holder.current().bundle_dir == tiny_bundle
        ranked = served.stub.Rank(rank_request(rows, model.schema_hash, 10), timeout=TIMEOUT_S)
        np.testing.assert_allclose(ranked.p_purchase, rows.expected_p[:10], rtol=0, atol=1e-6)
    finally:
        running.close()


def test_a_bundle_of_another_feature_schema_is_refused_at_reload_and_at_start(
    tiny_bundle: Path, rows: Rows, model: LoadedModel, tmp_path: Path
) -> None:
    other = other_schema_bundle(tiny_bundle, tmp_path / "other")
    other_hash = json.loads((other / BUNDLE_MANIFEST).read_text())["feature_schema_hash"]
    settings = RankingSettings(
        server=ServerSettings(port=0, drain_seconds=0, lame_duck_seconds=0),
        home=tmp_path,
        bundle=BundleRef(tmp_path, bundle_dir=tiny_bundle),
        admin_token=TOKEN,
    )
    running = start(settings)
    served = next(running)
    try:
        request = ranking_pb2.ReloadRequest(target=str(other))
        err = rpc_error(lambda: served.admin.Reload(request, metadata=AUTH, timeout=30))
        assert err.code() is grpc.StatusCode.FAILED_PRECONDITION, err.details()
        details = err.details() or ""
        assert f"built for feature schema {other_hash[:12]}" in details
        assert FEATURE_SCHEMA.hash[:12] in details and "still serving" in details
        ranked = served.stub.Rank(rank_request(rows, model.schema_hash, 10), timeout=TIMEOUT_S)
        np.testing.assert_allclose(ranked.p_purchase, rows.expected_p[:10], rtol=0, atol=1e-6)
        copy = copy_bundle(tiny_bundle, tmp_path / "same")  # the same schema still reloads
        reply = served.admin.Reload(ranking_pb2.ReloadRequest(target=str(copy)), metadata=AUTH)
        assert reply.model_version == model.bundle_version
    finally:
        running.close()
    with pytest.raises(StartupError, match="built for feature schema"):
        create_server(replace(settings, bundle=BundleRef(tmp_path, bundle_dir=other)))


def _service_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOMEFEED_RANKING_")}
    env.update(extra)
    return env


def test_the_module_exits_with_the_reason_when_the_bundle_dir_is_missing(tmp_path: Path) -> None:
    missing = tmp_path / "no-bundle"
    proc = subprocess.run(
        [sys.executable, "-m", "services.ranking"],
        cwd=REPO_ROOT,
        env=_service_env(HOMEFEED_HOME=str(tmp_path), HOMEFEED_RANKING_BUNDLE_DIR=str(missing)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"ranking: cannot load bundle directory {missing}" in proc.stderr
    assert "bundle.json is missing" in proc.stderr
    assert "HOMEFEED_READY" not in proc.stdout


def test_the_module_serves_until_sigterm(
    tiny_bundle: Path, rows: Rows, model: LoadedModel, tmp_path: Path
) -> None:
    env = _service_env(
        HOMEFEED_HOME=str(tmp_path),
        HOMEFEED_RANKING_BUNDLE_DIR=str(tiny_bundle),
        HOMEFEED_RANKING_PORT="0",
        HOMEFEED_RANKING_DRAIN_SECONDS="1",
        HOMEFEED_ADMIN_TOKEN=TOKEN,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.ranking"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        admin = proc.stdout.readline()  # the admin port first, then the serving port
        assert admin.startswith("HOMEFEED_ADMIN port="), proc.stderr.read() if proc.stderr else ""
        ready = proc.stdout.readline()  # the server prints it once listening, or exits
        assert ready.startswith("HOMEFEED_READY port="), proc.stderr.read() if proc.stderr else ""
        port = int(ready.strip().split("=", 1)[1])
        admin_port = int(admin.strip().split("=", 1)[1])
        assert admin_port != port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ranking_pb2_grpc.RankingServiceStub(channel)
            reply = stub.Rank(rank_request(rows, model.schema_hash, 10), timeout=TIMEOUT_S)
        assert reply.model_version == model.bundle_version
        with grpc.insecure_channel(f"127.0.0.1:{admin_port}") as channel:
            admin_stub = ranking_pb2_grpc.RankingServiceStub(channel)
            reloaded = admin_stub.Reload(ranking_pb2.ReloadRequest(), metadata=AUTH, timeout=60)
        assert reloaded.model_version == model.bundle_version
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.stderr is not None
    logs = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    assert {"ranking ready", "stopped"} <= {entry["msg"] for entry in logs}
    assert all(entry["service"] == "ranking" for entry in logs)
