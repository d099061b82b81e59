"""Retrieval: the numpy user tower, the ScaNN index, the popularity fallback and the
two-tower model trained on sim-tiny."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from contract import affinity, bundle
from contract import columns as C
from contract.ann import load_index
from contract.history import History
from contract.paths import Paths
from contract.popular import PopularityLists
from contract.timeutil import to_ns
from contract.tower import VALUE_FLOOR, InputSpec, UserTower, item_value, with_value_column
from feature_repo import schema as S
from training.evaluate import _retrieval_section
from training.retrieval import ann, popular
from training.retrieval.evaluate import (
    eval_groups,
    explain_uncomputable,
    interleave,
    recall_at_k,
    top_items,
)
from training.retrieval.features import (
    AffinitySnapshots,
    positive,
    user_features,
    user_input_spec,
)
from training.retrieval.history import MAX_ITEMS
from training.retrieval.towers import TowerConfig, export_user_tower, fit, hash_buckets
from training.retrieval.train import (
    POPULAR,
    Prepared,
    RetrievalData,
    prepare,
    train_retrieval,
)

pytestmark = pytest.mark.timeout(180)

# sim-tiny has ~2,600 training positives: small batches so that an epoch is several steps
TINY = TowerConfig(
    batch_size=256, uniform_negatives=512, max_epochs=12, patience=4, eval_groups=500
)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tiny_dataset: dict, home: Paths) -> RetrievalData:
    return RetrievalData.load(home.home, tiny_dataset["dataset"])


@pytest.fixture(scope="module")
def prepared(data: RetrievalData) -> Prepared:
    return prepare(data, TINY, seed=0)


@pytest.fixture(scope="module")
def fitted(data: RetrievalData, prepared: Prepared):
    cfg = replace(TINY, max_epochs=3)
    return fit(
        prepared.examples,
        prepared.items,
        prepared.mean,
        prepared.std,
        data.catalog.n_categories,
        cfg,
        seed=0,
        valid=prepared.valid,
    )


def _train(
    tiny_dataset: dict, home: Paths, out: Path, cfg: TowerConfig, **kw: Any
) -> tuple[Path, dict[str, Any]]:
    return out, train_retrieval(home.home, tiny_dataset["dataset"], out, seed=0, config=cfg, **kw)


@pytest.fixture(scope="module")
def trained(
    tiny_dataset: dict, home: Paths, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("retrieval_bundle")
    return _train(tiny_dataset, home, out, TINY, latency_queries=200)


@pytest.fixture(scope="module")
def taste_trained(
    tiny_dataset: dict, home: Paths, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    """The same training without the value column: the tower's taste alone."""
    out = tmp_path_factory.mktemp("taste_bundle")
    cfg = replace(TINY, value_weight=0.0)
    return _train(tiny_dataset, home, out, cfg, latency_queries=50, sweep_queries=50)


# --- numpy tower ---------------------------------------------------------------------------


def _spec() -> InputSpec:
    return InputSpec(("clicks_30d",), (("country", ("US", "GB")),), "category_affinity", 3)


def test_encode_one_gives_encodes_numbers_for_one_user():
    spec = _spec()
    rng = np.random.default_rng(0)
    for i in range(300):
        user = {
            "clicks_30d": float(rng.exponential(3)) * (i % 3 != 0) - (i % 11 == 0),
            "country": ["US", "GB", "FR", "unknown"][i % 4],
            "category_affinity": rng.dirichlet(np.ones(3)) * (i % 5 != 0),
        }
        one, batch = spec.encode_one(user), spec.encode(user)
        assert one.dtype == batch.dtype == np.float32
        np.testing.assert_array_equal(one, batch)
    with pytest.raises(ValueError, match=r"must have shape \(3,\)"):
        spec.encode_one({"clicks_30d": 1, "country": "US", "category_affinity": np.ones(4)})


def test_encode_applies_log1p_one_hot_with_other_and_log_affinity():
    x = _spec().encode(
        {
            "clicks_30d": np.array([0, np.e - 1]),
            "country": np.array(["GB", "unknown"]),
            "category_affinity": np.array([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]]),
        }
    )
    assert _spec().input_names == [
        "clicks_30d",
        "country=US",
        "country=GB",
        "country=other",
        "category_affinity[0]",
        "category_affinity[1]",
        "category_affinity[2]",
    ]
    np.testing.assert_allclose(x[:, 0], [0.0, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(x[:, 1:4], [[0, 1, 0], [0, 0, 1]])
    np.testing.assert_allclose(x[0, 4:], np.log([0.5, 0.25, 0.25]), rtol=1e-6)
    np.testing.assert_allclose(x[1, 5:], np.log(1e-6), rtol=1e-6)  # floored, not -inf


def test_encode_names_missing_features_and_rejects_non_finite_values():
    with pytest.raises(ValueError, match=r"missing: \['country'\]"):
        _spec().encode({"clicks_30d": 1.0, "category_affinity": np.ones(3) / 3})
    with pytest.raises(ValueError, match="not finite"):
        _spec().encode({"clicks_30d": np.nan, "country": "US", "category_affinity": np.ones(3) / 3})


def test_numpy_tower_matches_torch(fitted, data: RetrievalData):
    test = data.splits["test"].iloc[:500]
    features = user_features(test, data.spec, data.affinity)
    tower = export_user_tower(fitted.user_net, data.spec)
    with torch.no_grad():
        reference = fitted.user_net(torch.from_numpy(data.spec.encode(features))).numpy()
    np.testing.assert_allclose(tower.embed(features), reference, rtol=1e-5, atol=1e-5)
    one = {name: values[7] for name, values in features.items()}  # one user, Feast-style
    np.testing.assert_allclose(tower.embed(one)[0], reference[7], rtol=1e-5, atol=1e-5)


def test_numpy_tower_imports_neither_torch_nor_pandas():
    code = (
        "import sys, contract.tower; sys.exit(sorted({'torch', 'pandas'} & set(sys.modules)) or 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_user_tower_survives_save_and_load(fitted, data: RetrievalData, tmp_path: Path):
    tower = export_user_tower(fitted.user_net, data.spec)
    tower.save(tmp_path / "user_tower.npz")
    loaded = UserTower.load(tmp_path / "user_tower.npz")
    x = data.encode(data.splits["valid"].iloc[:200])
    assert loaded.spec == tower.spec
    np.testing.assert_array_equal(loaded.embed(x), tower.embed(x))


# --- features --------------------------------------------------------------------------------


def test_affinity_join_agrees_with_feasts_training_rows(
    data: RetrievalData, tiny_dataset: dict, home: Paths
):
    """Our point-in-time lists, reduced at the row's item category with the row's
    category_share, are the training set's category_affinity_for_item, and their total is
    its affinity_total."""
    rows = pd.read_parquet(
        home.training_sets(tiny_dataset["dataset"]) / "train.parquet",
        columns=[
            C.USER_ID, C.EVENT_TIMESTAMP, C.ITEM_ID, "category", "category_share",
            S.AFFINITY_FOR_ITEM, S.AFFINITY_TOTAL,
        ],
    )  # fmt: skip
    users, when = rows[C.USER_ID].to_numpy(), to_ns(rows[C.EVENT_TIMESTAMP])
    ours = data.affinity.at_categories(
        users,
        when,
        rows["category"].to_numpy(),
        rows["category_share"].to_numpy(),
        data.catalog.n_categories,
    )
    np.testing.assert_allclose(ours, rows[S.AFFINITY_FOR_ITEM].to_numpy(), rtol=1e-6)
    totals = data.affinity.totals_at(users, when)
    np.testing.assert_allclose(totals, rows[S.AFFINITY_TOTAL].to_numpy())
    assert (totals > 0).any() and (totals == 0).any()


def _snapshots(day: int) -> AffinitySnapshots:
    """User 1: category 0 (weight 2) at day 0; categories 1 and 3 (weights 3, 1) at day 2."""
    return AffinitySnapshots(
        user_id=np.array([1, 1]),
        ts_ns=np.array([0, 2 * day]),
        offsets=np.array([0, 1, 3]),
        categories=np.array([0, 1, 3]),
        weights=np.array([2.0, 3.0, 1.0], dtype=np.float32),
        totals=np.array([2.0, 4.0]),
    )


def test_affinity_lookup_is_point_in_time_with_a_ttl():
    day = 86_400 * 10**9
    snaps = _snapshots(day)
    users = np.array([1, 1, 1, 1, 2])
    when = np.array([0, day, 2 * day, 11 * day, day])  # stale after 8 days: no engagement
    np.testing.assert_array_equal(snaps.totals_at(users, when), [2, 2, 4, 0, 0])
    s = affinity.PRIOR_STRENGTH
    got = snaps.at_categories(users, when, np.array([0, 1, 1, 1, 1]), np.full(5, 0.25), 4)
    np.testing.assert_allclose(
        got, [(2 + s / 4) / (2 + s), (s / 4) / (2 + s), (3 + s / 4) / (4 + s), 0.25, 0.25]
    )
    # an item without an item_stats row (category -1) reads uniform whatever the user
    assert snaps.at_categories(users[:1], when[:1], np.array([-1]), np.ones(1), 4)[0] == 0.25
    # the tower's buckets: 2 buckets over 4 categories (c % 2): {0, 2} and {1, 3}
    buckets = snaps.buckets_at(users, when, 2)
    np.testing.assert_allclose(
        buckets,
        [
            [(2 + s / 2) / (2 + s), (s / 2) / (2 + s)],
            [(2 + s / 2) / (2 + s), (s / 2) / (2 + s)],
            [(s / 2) / (4 + s), (4 + s / 2) / (4 + s)],
            [0.5, 0.5],
            [0.5, 0.5],
        ],
        rtol=1e-6,
    )
    one = affinity.buckets_one(np.array([1, 3]), np.array([3.0, 1.0]), 4.0, 2)
    np.testing.assert_allclose(one, buckets[2], rtol=1e-6)


def test_user_input_spec_covers_the_user_views():
    spec = user_input_spec(24)
    assert set(spec.feature_names) == {
        *S.FEATURES[S.USER_PROFILE],
        *S.FEATURES[S.USER_RECENT_ACTIVITY],
        S.AFFINITY_TOTAL,
        affinity.BUCKETS,
    }
    assert len(spec.input_names) == 10 + 6 + 4 + 24
    # the input stays bounded however many categories the catalog has
    assert user_input_spec(5000).vector_dim == affinity.MAX_BUCKETS


# --- item tower ------------------------------------------------------------------------------


def test_a_new_item_is_embedded_from_its_content_alone(fitted, prepared: Prepared, data):
    catalog = data.catalog
    row = int(np.flatnonzero(prepared.known)[0])  # an item the training rows showed
    new_ids = np.array([catalog.item_ids.max() + 1, catalog.item_ids.max() + 12345])
    take = np.array([row, row])

    def embed(ids: np.ndarray, known: bool, content: np.ndarray | None = None) -> np.ndarray:
        inputs = prepared.encoder.encode(
            catalog.content[take] if content is None else content,
            catalog.category[take],
            catalog.price[take],
            ids,
            np.full(len(ids), known),
        )
        return fitted.item_net.embed(inputs)

    fresh = embed(new_ids, known=False)
    assert np.isfinite(fresh).all() and np.abs(fresh).max() > 0
    np.testing.assert_array_equal(fresh[0], fresh[1])  # the unseen id plays no part
    np.testing.assert_array_equal(fresh, embed(catalog.item_ids[take], known=False))
    assert not np.allclose(fresh[0], embed(catalog.item_ids[take], known=True)[0])
    other = embed(new_ids, known=False, content=catalog.content[take] + 1.0)
    assert not np.allclose(fresh, other)


def test_hash_buckets_are_stable_in_range_and_tell_neighbours_apart():
    ids = np.arange(10_000)
    b = hash_buckets(ids, 1 << 15)
    assert b.shape == (10_000, 2) and b.min() >= 0 and b.max() < 1 << 15
    np.testing.assert_array_equal(b, hash_buckets(ids, 1 << 15))
    assert len({tuple(r) for r in b}) == len(ids)


def test_training_is_deterministic_given_the_seed(data: RetrievalData, prepared: Prepared):
    cfg = replace(TINY, max_epochs=1)
    args = (prepared.examples, prepared.items, prepared.mean, prepared.std)
    runs = [fit(*args, data.catalog.n_categories, cfg, seed=s) for s in (3, 3, 4)]
    same = [r.item_net.embed(prepared.items) for r in runs]
    np.testing.assert_array_equal(same[0], same[1])
    assert not np.array_equal(same[0], same[2])


def test_the_time_budget_is_a_safety_net_that_says_when_it_fires(
    data: RetrievalData, prepared: Prepared, caplog
):
    args = (prepared.examples, prepared.items, prepared.mean, prepared.std)
    cut = fit(*args, data.catalog.n_categories, replace(TINY, max_epochs=3, max_train_seconds=0))
    assert cut.stopped_at_time_budget and len(cut.history) == 1
    assert "time budget" in caplog.text
    # the last epoch ends training anyway: the budget did not stop it
    whole = fit(*args, data.catalog.n_categories, replace(TINY, max_epochs=1, max_train_seconds=0))
    assert not whole.stopped_at_time_budget and len(whole.history) == 1


# --- ANN ---------------------------------------------------------------------------------------


def test_exact_top_k_and_overlap_recall_known_values():
    items = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [-1.0, 0.0]], dtype=np.float32)
    top = ann.exact_top_k(np.array([[1.0, 0.1]], dtype=np.float32), items, 2)
    np.testing.assert_array_equal(top, [[0, 2]])
    assert ann.overlap_recall(top, top) == 1.0
    assert ann.overlap_recall(np.array([[3, -1]]), top) == 0.0


def test_choose_takes_the_least_work_meeting_the_target_whatever_the_clock():
    def row(leaves, searched, reorder, recall, p50):
        return {
            "num_leaves": leaves,
            "leaves_to_search": searched,
            "reorder": reorder,
            "recall": recall,
            "p50_ms": p50,
            "p99_ms": 2 * p50,
        }

    n, dim = 50_000, 64
    rows = [
        row(447, 313, 2000, 0.999, 0.12),
        row(447, 179, 2000, 0.9973, 0.0985),
        row(112, 78, 2000, 0.990, 0.1021),
        row(112, 11, 1000, 0.96, 0.05),
        row(112, 6, 500, 0.5, 0.01),
    ]
    # the work per query, in AH lookups: centroids, searched codes, reordered items
    assert ann.search_cost(rows[1], n, dim) == pytest.approx(
        4 * 447 * 64 + 179 / 447 * n * 32 + 2 * 2000 * 64
    )
    chosen = ann.choose(rows, n, dim, 0.95, 0.99)
    assert chosen is rows[1]
    # the clock never decides: another run's latencies, the other way round, choose the same
    timed_again = [{**r, "p50_ms": 1.0 / r["p50_ms"]} for r in rows]
    assert ann.choose(timed_again, n, dim, 0.95, 0.99) == {**chosen, "p50_ms": 1 / 0.0985}
    assert ann.choose(rows[3:], n, dim, 0.95, 0.99) is rows[3]  # only min_recall is met
    assert ann.choose(rows[4:], n, dim, 0.95, 0.99) is rows[4]  # none: the most accurate
    with pytest.raises(ValueError, match="empty"):
        ann.choose([], n, dim)


def test_serialized_index_returns_the_same_neighbours_after_load(trained, tmp_path: Path):
    out, _ = trained
    emb = np.load(out / bundle.ITEM_EMBEDDINGS)
    queries = emb[:: max(1, len(emb) // 50)][:50] * 0.5
    k = 100
    built = ann.build_index(emb, ann.IndexParams(20, 5, 200, k))
    before = ann.search(built, queries, k)
    ann.save_index(built, tmp_path / "index")
    moved = tmp_path / "moved" / "scann"
    shutil.copytree(tmp_path / "index", moved)  # relative asset paths: the bundle can move
    shutil.rmtree(tmp_path / "index")
    np.testing.assert_array_equal(ann.search(load_index(moved), queries, k), before)


def test_ann_recall_against_exact_search_on_the_tiny_catalog(trained, data: RetrievalData):
    out, report = trained
    emb = np.load(out / bundle.ITEM_EMBEDDINGS)
    tower = UserTower.load(out / bundle.USER_TOWER)
    queries = tower.embed(data.encode(data.splits["test"].drop_duplicates(C.REQUEST_ID)))
    k = report["k"]
    found = ann.search(load_index(out / bundle.SCANN_DIR), queries, k)
    assert ann.overlap_recall(found, ann.exact_top_k(queries, emb, k)) >= 0.95
    assert report[f"ann_recall_at_{k}_vs_exact"] >= 0.95
    chosen = report["params"]["index"]
    assert chosen["recall"] >= 0.95 and chosen in report["sweep"]


# --- the bundle files and the report ------------------------------------------------------------


def test_bundle_files_and_report(trained, data: RetrievalData):
    out, report = trained
    ids = np.load(out / bundle.ITEM_IDS)
    emb = np.load(out / bundle.ITEM_EMBEDDINGS)
    np.testing.assert_array_equal(ids, data.catalog.item_ids)
    assert TINY.value_weight > 0
    assert emb.dtype == np.float32 and emb.shape == (len(ids), TINY.embedding_dim + 1)
    assert np.isfinite(emb).all()
    # the value column: log(price x margin) on items, the weight on every user
    assert data.catalog.margin is not None
    np.testing.assert_array_equal(
        emb[:, -1], np.log(data.catalog.price * data.catalog.margin).astype(np.float32)
    )
    tower = UserTower.load(out / bundle.USER_TOWER)
    users = tower.embed(data.encode(data.splits["test"].head(50)))
    assert users.shape == (50, TINY.embedding_dim + 1)
    assert np.all(users[:, -1] == np.float32(TINY.value_weight))
    config = json.loads((out / bundle.RETRIEVAL_CONFIG).read_text())
    assert config["embeddings"]["l2_normalized"] is False
    assert config["embeddings"]["value_columns"] == 1
    assert config["embeddings"]["value_weight"] == TINY.value_weight
    assert config["user_input"]["input_names"] == data.spec.input_names
    assert report["numpy_parity_max_abs_diff"] < 1e-5
    assert report["stopped_at_time_budget"] is False
    # the index is the sweep's least-work row meeting the recall target, whatever the clock
    index = report["params"]["index"]
    assert index == ann.choose(report["sweep"], *emb.shape)
    assert index["recall"] >= 0.99 or all(r["recall"] < 0.99 for r in report["sweep"])
    for key in (
        "recall_at_500",
        "popularity_recall_at_500",
        "value_recall_at_500",
        "popularity_value_recall_at_500",
    ):
        assert set(report[key]) == {"purchase", "click"}
        assert all(0.0 <= v <= 1.0 for v in report[key].values())


def test_value_weight_zero_exports_the_taste_alone(trained, taste_trained, data):
    """Without the value column the exported tower and embeddings are the fitted tower's
    own (the same seed gives the same taste columns), and the config says so."""
    out, _ = taste_trained
    emb = np.load(out / bundle.ITEM_EMBEDDINGS)
    assert emb.shape == (len(data.catalog), TINY.embedding_dim)
    np.testing.assert_array_equal(emb, np.load(trained[0] / bundle.ITEM_EMBEDDINGS)[:, :-1])
    config = json.loads((out / bundle.RETRIEVAL_CONFIG).read_text())
    assert config["embeddings"]["value_columns"] == 0


def test_history_and_popularity_are_as_of_the_start_of_the_test_period(trained, data):
    """The bundle serves the test period, so its history holds every engagement of the
    train and validation splits and nothing of the test split's; the fallback's window
    ends where the test period begins."""
    out, _ = trained
    history = History.load(out / bundle.HISTORY)
    stored = {(int(u), int(i)) for u in history.user_ids for i in history.items_of(int(u))}

    def pairs(split: str) -> set[tuple[int, int]]:
        rows = data.splits[split]
        engaged = positive(rows)
        users = rows[C.USER_ID].to_numpy(np.int64)[engaged]
        items = rows[C.ITEM_ID].to_numpy(np.int64)[engaged]
        return set(zip(users.tolist(), items.tolist(), strict=True))

    before = pairs("train") | pairs("valid")
    capped = {u for u in history.user_ids if len(history.items_of(int(u))) == MAX_ITEMS}
    assert pairs("valid") - pairs("train"), "the tiny dataset must engage new items in valid"
    assert set(history.user_ids.tolist()) - capped, "every user at the cap: nothing to check"
    assert stored <= before
    assert {p for p in before if p[0] not in capped} <= stored
    assert not {p for p in pairs("test") - before if p[0] not in capped} & stored
    lists = json.loads((out / POPULAR).read_text())
    assert pd.Timestamp(lists["window"]["end"]) == data.split_times["valid_end"]


def test_model_retrieves_test_clicks_far_above_chance_and_near_popularity(taste_trained, data):
    """A weaker property than beating popularity, which sim-tiny cannot show: its feeds
    come from a 600-item pool and popularity's top 500 holds ~98 % of the test clicks
    (the real comparison is measured on sim-small and reported). Here the tower's taste
    (no value column, which trades click recall for value by design) must retrieve test
    clicks far above chance and within 10 % of popularity at K = 50."""
    _, report = taste_trained
    curve = report["recall_curve"]["click"]
    chance = 50 / len(data.catalog)
    assert curve["model"][50] >= 20 * chance
    assert curve["model"][50] >= 0.9 * curve["popularity"][50]


def test_popular_json_has_the_datasets_own_segments_with_full_lists(trained, data: RetrievalData):
    out, report = trained
    lists = json.loads((out / POPULAR).read_text())
    assert lists["k"] == report["k"] and lists["format"] == 2
    # the segments and countries the dataset's users have, those with enough support
    users = data.users
    pairs = zip(users[C.COUNTRY], users[C.DEVICE], strict=True)
    own = {popular.segment_key(c, d) for c, d in pairs}
    assert lists["segments"] and set(lists["segments"]) <= own
    assert lists["countries"] and set(lists["countries"]) <= set(users[C.COUNTRY])
    for level in ("segments", "countries"):
        for key, n in lists["support"][level].items():
            enough = n["users"] >= popular.MIN_USERS and n["events"] >= popular.MIN_EVENTS
            assert (key in lists[level]) == enough, key
    listed = set(data.catalog.item_ids.tolist())
    every = [lists["overall"], *lists["countries"].values(), *lists["segments"].values()]
    for items in every:
        assert len(items) == len(set(items)) == min(lists["k"], len(lists["overall"]))
        assert set(items) <= listed
    assert popular.lookup(lists, "unknown", "ios") == lists["overall"]


# --- metrics and the fallback on hand-made data ---------------------------------------------------

T = pd.Timestamp("2026-01-10", tz="UTC")
WINDOW = (T - pd.Timedelta(days=7), T + pd.Timedelta(days=1))


def engagements(rows: list[tuple[int, int, str, int]]) -> pd.DataFrame:
    """(user, item, what, days before T) -> rows with the label columns of a training split;
    ``what`` is "click", "cart" or "purchase" (a purchase also clicked and carted)."""
    depth = {"click": 1, "cart": 2, "purchase": 3}
    return pd.DataFrame(
        {
            C.USER_ID: [r[0] for r in rows],
            C.ITEM_ID: [r[1] for r in rows],
            C.EVENT_TIMESTAMP: [T - pd.Timedelta(days=r[3]) for r in rows],
            C.LABEL_CLICK: [int(depth[r[2]] >= 1) for r in rows],
            C.LABEL_ATC: [int(depth[r[2]] >= 2) for r in rows],
            C.LABEL_PURCHASE: [int(depth[r[2]] >= 3) for r in rows],
        }
    )


def test_popular_items_weighs_the_deepest_engagement_in_the_window_per_segment():
    events = engagements(
        [(1, 10, "click", 0), (1, 10, "click", 0), (1, 10, "click", 0),  # 3 x 1
         (2, 20, "purchase", 0),  # 4, not 1 + 2 + 4
         (2, 30, "cart", 0), (1, 30, "click", 0),  # 2 + 1
         (1, 99, "purchase", 9), (1, 98, "click", 9)]  # before the window: padding only
    )  # fmt: skip
    users = pd.DataFrame({C.USER_ID: [1, 2], C.COUNTRY: ["US", "GB"], C.DEVICE: ["ios", "web"]})
    out = popular.popular_items(events, users, *WINDOW, k=5, min_users=1, min_events=1)
    assert out["overall"] == [20, 10, 30, 99, 98]  # 4, 3, 3 (tie: lower id), then the padding
    assert out["countries"]["GB"] == [20, 30, 10, 99, 98]  # own (4, 2), then the global list
    assert out["segments"]["US/ios"] == [10, 30, 20, 99, 98]  # own (3, 1), then US's
    assert out["support"]["segments"]["GB/web"] == {"users": 1, "events": 2}
    assert out["weights"] == {C.LABEL_CLICK: 1.0, C.LABEL_ATC: 2.0, C.LABEL_PURCHASE: 4.0}


def test_a_purchase_only_log_gets_full_lists():
    rows = [(u, 10 + (u * i) % 7, "purchase", i) for u in range(30) for i in range(5)]
    events = engagements(rows).drop(columns=[C.LABEL_CLICK, C.LABEL_ATC])  # no click, no cart
    users = pd.DataFrame({C.USER_ID: range(30), C.COUNTRY: "GB", C.DEVICE: "unknown"})
    out = popular.popular_items(events, users, *WINDOW, k=5)
    assert len(out["overall"]) == len(out["countries"]["GB"]) == 5
    assert out["segments"] == {"GB/unknown": out["countries"]["GB"]}
    # the same log with its click and cart columns all zero: the same lists
    zeros = engagements(rows).assign(**{C.LABEL_CLICK: 0, C.LABEL_ATC: 0})
    assert popular.popular_items(zeros, users, *WINDOW, k=5)["overall"] == out["overall"]
    with pytest.raises(ValueError, match="at least one engagement label column"):
        popular.popular_items(events.drop(columns=[C.LABEL_PURCHASE]), users, *WINDOW)


def test_segments_are_the_datasets_own_and_fall_back_below_support():
    """GB/unknown has the support for a list of its own; GB/ios (2 users) falls back to GB;
    FR (1 user) has no list at all and reads the global one, like a country never seen."""
    rows = [(u, 10, "purchase", 0) for u in range(3)]  # GB/unknown: 3 x 4
    rows += [(u, 20, "click", 0) for u in range(3, 6)]  # GB/ios (user 5: no device): 3 x 1
    rows += [(6, 30, "click", 0)] * 5  # FR/web: 5 x 1
    users = pd.DataFrame(
        {
            C.USER_ID: range(7),
            C.COUNTRY: ["GB"] * 6 + ["FR"],
            C.DEVICE: ["unknown"] * 3 + ["ios"] * 2 + [None, "web"],
        }
    )
    out = popular.popular_items(engagements(rows), users, *WINDOW, k=3, min_users=3, min_events=3)
    assert set(out["segments"]) == {"GB/unknown"} and set(out["countries"]) == {"GB"}
    assert out["support"]["segments"]["GB/ios"] == {"users": 2, "events": 2}
    assert out["support"]["countries"] == {
        "FR": {"users": 1, "events": 5},
        "GB": {"users": 6, "events": 6},
    }
    assert out["overall"] == [10, 30, 20]
    assert popular.lookup(out, "GB", "unknown") == [10, 20, 30]
    assert popular.lookup(out, "GB", "ios") == out["countries"]["GB"] == [10, 20, 30]
    for country, device in (("FR", "web"), ("JP", "ios"), ("", "")):
        assert popular.lookup(out, country, device) == out["overall"]
    served = PopularityLists.from_json(json.loads(json.dumps(out)))
    assert served.resolve("GB", "ios") == ("country", "GB")
    assert served.lookup("JP", "web").tolist() == out["overall"]


def test_an_uncomputable_report_figure_is_null_with_its_reason(tmp_path: Path):
    report = {
        "recall_at_500": {"purchase": 0.44, "click": 0.0},
        "fallback_recall_at_500": {"purchase": 0.0, "click": 0.0},
        "ann_recall_at_500_vs_exact": 0.99,
        "recall_curve": {"purchase": {"model": {500: 0.3}, "fallback": {500: 0.0}}, "click": {}},
        "user_tower_p50_ms": 0.0,
        "groups": {"purchase": 3011, "click": 0},
    }
    out = explain_uncomputable(report, {"overall": [], "segments": {}})
    assert out["recall_at_500"] == {"purchase": 0.44, "click": None}
    assert out["fallback_recall_at_500"] == {"purchase": None, "click": None}
    assert out["recall_curve"]["purchase"] == {"model": {500: 0.3}, "fallback": None}
    assert out["recall_curve"]["click"] is None
    assert out["user_tower_p50_ms"] is None and out["ann_recall_at_500_vs_exact"] == 0.99
    why = out["skipped"]
    assert "no 'click' group" in why["recall_at_500.click"]
    assert "popularity lists (popular.json) are empty" in why["fallback_recall_at_500.purchase"]
    assert "click groups" in why["user_tower_p50_ms"]
    assert set(why) == {
        "recall_at_500.click",
        "fallback_recall_at_500.purchase",
        "fallback_recall_at_500.click",
        "recall_curve.purchase.fallback",
        "recall_curve.click",
        "user_tower_p50_ms",
    }
    # measured figures are left alone; the evaluation stage reads the staged popular.json
    full = {**report, "groups": {"purchase": 3011, "click": 7445}, "user_tower_p50_ms": 0.03}
    (tmp_path / bundle.POPULAR).parent.mkdir(parents=True)
    (tmp_path / bundle.POPULAR).write_text(json.dumps({"overall": [1], "segments": {}}))
    assert _retrieval_section(full, tmp_path) == full


def test_recall_groups_by_user_day_and_queries_the_first_request():
    t = pd.Timestamp("2026-01-10 08:00", tz="UTC")
    rows = pd.DataFrame(
        {
            C.USER_ID: [1, 1, 1, 2, 1],
            C.EVENT_TIMESTAMP: [t, t + pd.Timedelta(hours=1), t, t, t + pd.Timedelta(days=1)],
            C.ITEM_ID: [5, 6, 7, 5, 8],
        }
    )
    engaged = np.array([False, True, True, True, True])
    groups = eval_groups(rows, engaged, rows[C.ITEM_ID].to_numpy())
    assert groups.user_id.tolist() == [1, 1, 2]
    assert groups.query_row.tolist() == [0, 4, 3]  # the first request of the user's day
    assert np.split(groups.items, groups.indptr[1:-1])[0].tolist() == [6, 7]
    perfect = np.array([[6, 7], [8, -1], [5, -1]])
    assert recall_at_k(perfect, groups) == 1.0
    assert recall_at_k(np.array([[0, 1], [2, 3], [4, 9]]), groups) == 0.0
    assert recall_at_k(np.array([6, 8]), groups) == pytest.approx((0.5 + 1 + 0) / 3)
    assert top_items(np.array([3, 3, 1, 2, 2]), 2, 5).tolist() == [2, 3]
    # the value recall: each group's share of its items' weight (item 7 weighs 3x item 6)
    weight = np.zeros(10)
    weight[[5, 6, 7, 8]] = [2.0, 1.0, 3.0, 4.0]
    assert recall_at_k(np.array([6, 8]), groups, weight) == pytest.approx((1 / 4 + 1 + 0) / 3)
    assert recall_at_k(np.array([7, 5]), groups, weight) == pytest.approx((3 / 4 + 0 + 1) / 3)
    assert recall_at_k(perfect, groups, weight) == 1.0
    weight[8] = 0.0  # a group worth nothing counts as retrieved nothing
    assert recall_at_k(perfect, groups, weight) == pytest.approx(2 / 3)


def test_interleave_alternates_and_drops_duplicates():
    merged = interleave(np.array([[1, 2, 3]]), np.array([[2, 9, -1]]), 4)
    assert merged.tolist() == [[1, 2, 9, 3]]


def test_history_orders_by_count_then_recency_and_caps():
    from training.retrieval.history import build_history, history_first

    user = np.array([7, 7, 7, 7, 3, 7])
    item = np.array([10, 11, 11, 12, 10, 13])
    ts = np.array([1, 2, 3, 9, 5, 4])
    h = build_history(user, item, ts, max_items=3)
    assert h.items_of(7).tolist() == [11, 12, 13]  # 11 twice; then the latest of the singles
    assert h.items_of(3).tolist() == [10]
    assert h.items_of(5).tolist() == [] and h.items_of(99).tolist() == []
    merged = history_first(np.array([[4, 2, -1]]), np.array([[2, 5, 6, 7]]), 4)
    assert merged.tolist() == [[4, 2, 5, 6]]
    assert history_first(np.array([[-1]]), np.array([[1, -1]]), 3).tolist() == [[1, -1, -1]]


def test_history_round_trips(tmp_path):
    from contract.history import History
    from training.retrieval.history import build_history

    h = build_history(np.array([1, 2, 2]), np.array([5, 6, 7]), np.array([1, 2, 3]))
    h.save(tmp_path / "h.npz")
    loaded = History.load(tmp_path / "h.npz")
    assert [loaded.items_of(u).tolist() for u in (1, 2)] == [[5], [7, 6]]


def test_encoded_rows_in_batches_are_the_whole_encoding(data: RetrievalData):
    from training.retrieval.train import EncodedRows, first_of_request

    rows = data.splits["train"].head(500)
    needed = first_of_request(rows) | positive(rows)
    whole = data.encode(rows[needed])
    batched = EncodedRows.of(data, rows, needed, batch=7)
    np.testing.assert_array_equal(batched.x, whole)
    np.testing.assert_array_equal(batched.take(needed), whole)
    with pytest.raises(ValueError, match="were not encoded"):
        batched.take(~needed)


def test_value_column_adds_the_weighted_log_value_to_every_inner_product():
    rng = np.random.default_rng(0)
    spec = _spec()
    tower = UserTower(
        spec,
        np.zeros(len(spec.input_names)),
        np.ones(len(spec.input_names)),
        (rng.normal(size=(len(spec.input_names), 4)),),
        (rng.normal(size=4),),
    )
    valued = with_value_column(tower, 1.5)
    x = rng.normal(size=(6, len(spec.input_names)))
    taste = tower.embed(x)
    users = valued.embed(x)
    np.testing.assert_array_equal(users[:, :-1], taste)
    assert np.all(users[:, -1] == np.float32(1.5))
    price, margin = np.array([10.0, 50.0, 0.0, np.nan]), np.array([0.2, 0.1, 0.3, 0.2])
    value = item_value(price, margin)
    np.testing.assert_allclose(value[:2], np.log([2.0, 5.0]), rtol=1e-6)
    assert value[2] == value[3] == np.float32(np.log(VALUE_FLOOR))  # floored, never -inf
    items = rng.normal(size=(4, 4)).astype(np.float32)
    scores = users @ np.hstack([items, value[:, None]]).T
    np.testing.assert_allclose(scores, taste @ items.T + 1.5 * value, rtol=1e-5, atol=1e-5)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="value weight"):
            with_value_column(tower, bad)


def test_a_tower_config_survives_its_report_and_unknown_keys_are_refused():
    assert TowerConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="unknown tower config keys"):
        TowerConfig.from_dict({**TINY.to_dict(), "layers": 3})
