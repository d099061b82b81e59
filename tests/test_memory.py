"""Peak memory per stage and the estimate that stops a stage before it allocates."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from contract import columns as C
from contract.paths import Paths
from training import memory
from training.memory import MemoryEstimateError, StagePeaks, require_fits

linux = pytest.mark.skipif(sys.platform != "linux", reason="VmHWM and clear_refs are Linux's")


@linux
def test_each_stage_reports_its_own_peak_not_the_process_peak_so_far() -> None:
    peaks = StagePeaks()
    with peaks.measure("big"):
        block = np.ones(300 * memory.MB // 8)  # 300 MB, touched
        del block
    with peaks.measure("small"):
        np.ones(10 * memory.MB // 8)
    assert peaks.peaks["big"] >= peaks.peaks["small"] + 250
    assert not peaks.process_wide  # the high-water mark was reset for each stage
    assert peaks.report() == {"peak_rss_mb": peaks.peaks}


def test_a_stage_that_raises_still_reports_its_peak() -> None:
    peaks = StagePeaks()
    with pytest.raises(RuntimeError), peaks.measure("failing"):
        raise RuntimeError("boom")
    assert peaks.peaks["failing"] > 0


def test_an_estimate_beyond_the_machine_stops_with_the_figures_and_the_remedy() -> None:
    parts = {"category affinity": 30e9, "item views": 2e9, "events": 1e9}
    with pytest.raises(MemoryEstimateError) as info:
        require_fits("features build", parts, "Use --max-categories.", available=16_000)
    message = str(info.value)
    assert "features build needs an estimated 31,471 MB" in message
    assert "category affinity 28,610 MB" in message  # the biggest part first
    assert "16,000 MB are available" in message
    assert message.endswith("Use --max-categories.")
    assert require_fits("features build", {"x": 1e9}, "", available=16_000) == pytest.approx(
        953.7, abs=0.1
    )


def test_the_limit_can_be_set_for_a_container(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(memory.LIMIT_ENV, "512")
    assert memory.available_mb() == 512
    monkeypatch.setenv(memory.LIMIT_ENV, "lots")
    with pytest.raises(ValueError, match="HOMEFEED_MEMORY_LIMIT_MB must be a number"):
        memory.available_mb()


def test_stages_report_their_peaks(tiny_dataset: dict) -> None:
    assert tiny_dataset["features"]["peak_rss_mb"]["features_build"] > 0
    assert tiny_dataset["manifest"]["peak_rss_mb"]["dataset"] > 0


def test_the_features_estimate_grows_with_engagement_not_users_times_categories() -> None:
    def estimate(categories: int, engagements: int, items: int = 300) -> dict[str, float]:
        return memory.features_build_bytes(
            10_000, items, 100, categories, 14, 15, 10**6, engagements
        )

    lists = "the largest view, per-user lists (engaged user x category or seller x snapshot cells)"
    small, wide, busy = estimate(10, 20_000), estimate(1000, 20_000), estimate(10, 200_000)
    assert lists in small and lists in busy
    assert small[lists] == wide[lists]  # a hundred times the categories: the same lists
    assert busy[lists] > 5 * small[lists]
    assert sum(wide.values()) < 1.1 * sum(small.values())
    # the build holds one view at a time: only the largest one counts
    many_items = estimate(10, 20_000, items=10**6)
    assert "the largest view, item views (items x snapshots)" in many_items
    assert lists not in many_items
    # the content profile: one short vector per (user, snapshot), whatever the categories
    profiles = "the largest view, content profiles (users x snapshots x content width)"
    narrow, wide_content = (
        memory.features_build_bytes(10_000, 300, 100, 10, 14, 15, 10**6, 20_000, content_dim=d)
        for d in (16, 64)
    )
    assert profiles in narrow and profiles in wide_content
    assert wide_content[profiles] > 2 * narrow[profiles]


@linux
def test_features_stop_before_allocating_when_the_estimate_exceeds_the_limit(
    tiny_dataset: dict, home: Paths, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from training.features import build_estimate
    from training.stages import features_stage, load_raw

    paths, dataset = home, tiny_dataset["dataset"]
    estimate_mb = sum(build_estimate(load_raw(paths, dataset)).values()) / memory.MB
    monkeypatch.setenv(memory.LIMIT_ENV, str(estimate_mb / 2))
    out = tmp_path / "features"
    monkeypatch.setattr(type(paths), "features", lambda self, name: out)
    with pytest.raises(MemoryEstimateError, match="ingest a shorter window"):
        features_stage(paths, dataset, ("build",))
    assert not out.exists()  # nothing written


_BUILD = """
import json, sys
from pathlib import Path
from training import memory
from training.features import COLUMNS, build_estimate, build_feature_tables
from training.tables import read_tables
tables = read_tables(sys.argv[1], columns=COLUMNS)
estimate_mb = sum(build_estimate(tables).values()) / memory.MB
peaks = memory.StagePeaks()
before = memory.rss_mb()
with peaks.measure("build"):
    build_feature_tables(tables, Path(sys.argv[2]))
print(json.dumps({"estimate_mb": estimate_mb, "added_mb": peaks.peaks["build"] - before}))
"""


@linux
def test_the_features_estimate_covers_the_measured_peak(
    tiny_dataset: dict, home: Paths, tmp_path: Path
) -> None:
    """The estimate is of what the build adds to a process holding the tables (measured in
    a fresh one: a process that already freed memory would reuse it); on tiny it must not
    undershoot the measured increase by more than a third (it is what refuses a run), nor
    exceed it tenfold (it would refuse runs that fit)."""
    import json
    import subprocess

    raw = home.raw(tiny_dataset["dataset"])
    done = subprocess.run(
        [sys.executable, "-c", _BUILD, str(raw), str(tmp_path / "features")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    estimate_mb, added = got["estimate_mb"], got["added_mb"]
    assert added > 0
    assert estimate_mb >= added / 1.5, (estimate_mb, added)
    assert estimate_mb <= 10 * max(added, 20), (estimate_mb, added)


# --- collapsing a long-tailed taxonomy (homefeed ingest --max-categories) -----------------


def _catalogue() -> dict[str, pd.DataFrame]:
    """Six items in categories 10..15; category 15's item was bought three times, 12's
    clicked once; nobody engaged with the others."""
    items = pd.DataFrame({C.ITEM_ID: np.arange(6), C.CATEGORY: np.arange(10, 16)})
    impressions = pd.DataFrame({C.IMPRESSION_ID: [1, 2, 3, 4], C.ITEM_ID: [5, 5, 5, 2]})
    return {
        C.ITEMS: items,
        C.IMPRESSIONS: impressions,
        C.PURCHASES: pd.DataFrame({C.IMPRESSION_ID: [1, 2, 3]}),
        C.CLICKS: pd.DataFrame({C.IMPRESSION_ID: [4]}),
        C.ADD_TO_CARTS: pd.DataFrame({C.IMPRESSION_ID: pd.Series([], dtype=np.int64)}),
    }


def test_the_most_engaged_categories_are_kept_and_the_rest_merged() -> None:
    from training.categories import SOURCE_COLUMN, collapse_categories

    tables, summary = collapse_categories(_catalogue(), 3)
    items = tables[C.ITEMS]
    # 15 (three purchases) -> 0, 12 (one click) -> 1, everything else -> "other" (2)
    assert items[C.CATEGORY].tolist() == [2, 2, 1, 2, 2, 0]
    assert items[SOURCE_COLUMN].tolist() == [10, 11, 12, 13, 14, 15]
    assert summary == {"categories": 6, "kept": 3, "items_moved": 4}
    assert _catalogue()[C.ITEMS][C.CATEGORY].tolist() == list(range(10, 16))  # input untouched


def test_a_taxonomy_within_the_limit_is_left_alone_and_a_limit_below_two_refused() -> None:
    from training.categories import collapse_categories

    tables, summary = collapse_categories(_catalogue(), 6)
    assert tables[C.ITEMS][C.CATEGORY].tolist() == list(range(10, 16))
    assert summary["items_moved"] == 0
    with pytest.raises(ValueError, match="--max-categories must be at least 2"):
        collapse_categories(_catalogue(), 1)


def test_the_cli_prints_the_refusal_without_a_traceback(
    tiny_dataset: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tools.cli import main

    monkeypatch.setenv(memory.LIMIT_ENV, "1")
    code = main(["features", "build", "--dataset", tiny_dataset["dataset"]])
    err = capsys.readouterr().err
    assert code == 3
    assert err.startswith("homefeed features: features build needs an estimated")
    assert "Traceback" not in err


@linux
def test_the_dataset_stage_stops_before_its_feast_join_when_it_would_not_fit(
    tiny_dataset: dict, home: Paths, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from training import stages
    from training.stages import dataset_stage

    out = tmp_path / "training"
    monkeypatch.setattr(type(home), "training_sets", lambda self, name: out)
    monkeypatch.setattr(stages, "_prepare_fits", lambda *a: None)  # the first check passes
    monkeypatch.setenv(memory.LIMIT_ENV, "100")  # the join's fixed part alone is ~300 MB
    with pytest.raises(MemoryEstimateError, match=r"dataset \(the Feast join\) needs") as info:
        dataset_stage(home, tiny_dataset["dataset"])
    assert "--join-chunk-rows" in str(info.value)
    assert not out.exists()


def test_the_join_estimate_grows_with_the_lists_not_the_categories() -> None:
    narrow = memory.dataset_join_bytes(1000, 100, 200)
    chunked = memory.dataset_join_bytes(10**7, 100, 200, chunk_rows=500_000)
    whole = memory.dataset_join_bytes(10**7, 100, 200)
    assert sum(chunked.values()) < 0.5 * sum(whole.values())
    long = memory.dataset_join_bytes(1000, 100, 2000)
    key = "affinity snapshots (flat lists)"
    assert long[key] - narrow[key] == pytest.approx(2 * 1800 * 12)
    assert (
        long["joined rows (Feast, DuckDB, Arrow)"] == narrow["joined rows (Feast, DuckDB, Arrow)"]
    )


_PEAKS = """
import json, sys
from pathlib import Path
from contract.paths import Paths
from training.stages import dataset_stage, features_stage, simulate_stage
home = Paths(Path(sys.argv[2]))
sim = simulate_stage(home, "tiny", categories=int(sys.argv[1]))
features = features_stage(home, sim["dataset"])["peak_rss_mb"]
dataset = dataset_stage(home, sim["dataset"])["peak_rss_mb"]
print(json.dumps({**features, **dataset}))
"""


@linux
def test_a_thousand_categories_cost_the_features_and_dataset_stages_little_more_than_ten(
    tmp_path: Path,
) -> None:
    """Each run in its own process, so a peak is that run's: the category affinity is
    sparse, so 100x the categories must stay within 1.5x the peak of every stage."""
    import json
    import subprocess

    peaks = {}
    for categories in (10, 1000):
        done = subprocess.run(
            [sys.executable, "-c", _PEAKS, str(categories), str(tmp_path / str(categories))],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[categories] = json.loads(done.stdout.strip().splitlines()[-1])
    for stage in ("features_build", "features_materialize", "dataset"):
        assert peaks[1000][stage] <= 1.5 * peaks[10][stage], (stage, peaks)


def test_the_dataset_stage_refuses_before_loading_when_its_labels_would_not_fit(
    tiny_dataset: dict, home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The labelling phase holds the impressions and a chunk of them labelled: estimated
    from the Parquet row counts before a table loads."""
    from training import stages

    loaded = []
    monkeypatch.setattr(stages, "load_raw", lambda *a, **k: loaded.append(1))
    monkeypatch.setenv(memory.LIMIT_ENV, "50")
    with pytest.raises(MemoryEstimateError, match=r"dataset \(labels and split\) needs") as info:
        stages.dataset_stage(home, tiny_dataset["dataset"])
    assert "one chunk labelled and split" in str(info.value) and not loaded
    large = sum(memory.dataset_prepare_bytes(55_120_930, 4_000_000).values()) / memory.MB
    assert 8_300 < large < 16_000  # the large preset: above its measured 8.3 GB, fits 16 GB
    # the labelling is chunked: ten times the impressions cost less than ten times the memory
    small = sum(memory.dataset_prepare_bytes(5_512_093, 400_000).values()) / memory.MB
    assert large < 7 * small


def test_the_rankers_stage_refuses_before_reading_a_split_that_would_not_fit(
    tiny_dataset: dict, home: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Estimated from the splits' Parquet metadata; the message names the dataset options
    that shrink the training sets."""
    from training import train as train_module
    from training.staging import TrainConfig

    read = []
    monkeypatch.setattr("training.ranking.train.read_split", lambda *a: read.append(a))
    monkeypatch.setenv(memory.LIMIT_ENV, "300")  # the libraries alone are ~400 MB
    with pytest.raises(MemoryEstimateError, match=r"^rankers needs an estimated") as info:
        train_module.stage_rankers(home, tiny_dataset["dataset"], TrainConfig())
    assert "--negative-rate" in str(info.value) and "--eval-max-rows" in str(info.value)
    assert not read
    # the large preset's 9.5 M rows of 52 columns: more than sim-small's 1.26 M, under 16 GB
    large = sum(memory.rankers_bytes(9_545_997, 52, 39).values()) / memory.MB
    small = sum(memory.rankers_bytes(1_257_544, 52, 39).values()) / memory.MB
    assert small < 2_500 and large < 16_000 * memory.HEADROOM
