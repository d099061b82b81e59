"""`homefeed ingest --source eventlog`: a base dataset's tables with homefeed's own event log
(served feeds, the buyers' events) appended (training.ingest.ingest_eventlog_with_report)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from contract import columns as C
from contract import eventlog
from contract import events as E
from contract.paths import Paths
from training import ingest as ing
from training.tables import read_tables

BASE = "sim-tiny"
SERVED = "sim-tiny-served"
SECOND = 10**9
UNKNOWN = 10**12  # an id no base table holds


def _feed(request_id: str, user: int, ts: int, items: list[int], **more: Any) -> dict:
    n = len(items)
    return {
        "type": E.FEED, "request_id": request_id, "user_id": user, "ts": ts, "surface": "HOME",
        "items": items, "positions": list(range(1, n + 1)), "scores": [1.0] * n,
        "egmv": [0.5] * n, "propensities": [0.9] * n, "reasons": [E.REASON_RANKED] * n,
        "model_version": "16", "arm": "stable", "experiment": "exp", "experiment_arm": "treatment",
        "degraded": [], "seen_filtered": 0, "seen_items": 0, "latency_ms": 9.0, "country": "US",
        "device": "web", "categories": [], "new_seller": [], "prices": [], "features": None,
        **more,
    }  # fmt: skip


def _event(kind: str, event_id: str, ts: int, user: int, item: int, request_id: str = "",
           position: int = 0, **more: Any) -> dict:  # fmt: skip
    return {
        "type": E.EVENT, "kind": kind, "event_id": event_id, "ts": ts, "user_id": user,
        "item_id": item, "request_id": request_id, "position": position, "surface": "HOME",
        **more,
    }  # fmt: skip


def write_log(log_dir: Path, records: list[dict]) -> None:
    with eventlog.SegmentLog.open(log_dir, fsync=False) as log:
        keys = [
            E.feed_key(r["request_id"]) if r["type"] == E.FEED else r["event_id"] for r in records
        ]
        assert all(log.append(list(zip(keys, map(E.encode, records), strict=True))))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """sim-tiny as the base, a planted log over it, and the ingest of one over the other."""
    from training.stages import ingest_stage, simulate_stage

    paths = Paths(tmp_path_factory.mktemp("eventlog_home"))
    simulate_stage(paths, "tiny")
    base = read_tables(paths.raw(BASE))
    # inside the base's window (day 3 of 14), so the rows land in a training split
    t0 = pd.Timestamp("2026-01-08 12:00", tz="UTC").value
    when = pd.Timestamp(t0, tz="UTC")
    people, catalogue = base[C.USERS], base[C.ITEMS]
    users: list[int] = people.loc[people[C.SIGNUP_AT] < when, C.USER_ID].tolist()
    items: list[int] = catalogue.loc[catalogue[C.CREATED_AT] < when, C.ITEM_ID].tolist()
    u = users[:6]
    ranked, heur = items[:10], items[10:15]
    r = E.REASON_RANKED
    x = E.REASON_EXPLORATION
    feeds = [
        # slot 3 explored with ranked slots below it (the coin chose it): random; slot 10
        # explored with none below (the ranked list may have run out): stays heuristic
        _feed("r-1", u[0], t0, ranked, reasons=[r, r, x, r, r, r, r, r, r, x],
              propensities=[0.95, 0.9, 0.004, 0.85, 0.8, 0.8, 0.8, 0.8, 0.8, 0.004]),
        _feed("r-2", u[1], t0 + 60 * SECOND, heur, model_version="", experiment_arm="control",
              reasons=[E.REASON_HEURISTIC] * 5, surface="CHECKOUT"),
        _feed("r-3", u[2], t0 + 120 * SECOND, [items[20], UNKNOWN, items[21]]),
        _feed("r-4", UNKNOWN, t0 + 180 * SECOND, [items[22], items[23]]),
    ]  # fmt: skip
    at = t0 + 30 * SECOND
    p, c, a, i = E.PURCHASE, E.CLICK, E.ADD_TO_CART, E.INVENTORY
    events = [
        _event(c, "c1", at, u[0], ranked[0], "r-1", 1),
        _event(c, "c1-again", at + SECOND, u[0], ranked[0], "r-1", 1),  # second click: dropped
        _event(a, "a1", at + 2 * SECOND, u[0], ranked[0], "r-1", 1),
        _event(p, "p1", at + 3 * SECOND, u[0], ranked[0], "r-1", 1, price=12.5, quantity=2),
        _event(c, "c3", at + 4 * SECOND, u[0], ranked[2], "r-1", 3),  # the exploration slot
        _event(c, "c7", at + 5 * SECOND, u[0], ranked[6], "r-1", 5),  # position wrong: slot 7
        _event(c, "c-lost", at, u[0], ranked[1], "r-lost", 2),  # feed not in the log
        _event(c, "c-organic", at, u[0], ranked[1]),  # a click names no feed
        _event(c, "c-off", t0 + 90 * SECOND, u[1], items[30], "r-2", 1),  # not on the feed
        _event(c, "c-user", t0 + 90 * SECOND, u[2], heur[1], "r-2", 2),  # not the feed's user
        _event(c, "c-early", t0, u[1], heur[2], "r-2", 3),  # before the feed was served
        _event(c, "c-rejected", t0 + 150 * SECOND, u[2], UNKNOWN, "r-3", 2),  # unknown item
        _event(p, "p-organic", at, u[3], items[40], price=3.0, quantity=1),
        _event(p, "p-item", at, u[3], UNKNOWN, price=3.0, quantity=1),
        _event(p, "p-user", at, UNKNOWN, items[40], price=3.0, quantity=1),
        _event(i, "s1", at, -1, ranked[0], stock=7),
        _event(i, "s-unknown", at, -1, UNKNOWN, stock=7),
        _event(E.IMPRESSION, "imp1", at, u[0], ranked[0], "r-1", 1),
    ]  # fmt: skip
    log_dir = paths.home / "eventlog"
    write_log(log_dir, [*feeds, *events])
    summary = ingest_stage(paths, "eventlog", SERVED, str(log_dir), base=BASE, home=paths)
    return {
        "paths": paths, "base": base, "log": log_dir, "summary": summary, "t0": t0,
        "users": u, "ranked": ranked, "heur": heur, "items": items,
        "tables": read_tables(paths.raw(SERVED)),
    }  # fmt: skip


def _rejected(summary: dict, table: str, column: str, rule: str) -> int:
    rows = [r["rows"] for r in summary["ingest"]["rejected"]
            if (r["table"], r["column"], r["rule"]) == (table, column, rule)]  # fmt: skip
    return sum(rows)


def _log_rows(frame: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    return frame.iloc[len(base) :]


def test_every_served_item_is_an_impression_and_the_base_is_kept(world: dict) -> None:
    base, tables = world["base"], world["tables"]
    imp = tables[C.IMPRESSIONS]
    # 10 + 5 + 3 + 2 served; r-3's unknown item and r-4's unknown user rejected; 1 organic
    assert world["summary"]["ingest"]["event_log"]["served_items"] == 20
    log_rows = _log_rows(imp, base[C.IMPRESSIONS])
    assert len(log_rows) == 20 - 1 - 2 + 1
    pd.testing.assert_frame_equal(
        imp.iloc[: len(base[C.IMPRESSIONS])][list(C.TABLES[C.IMPRESSIONS])],
        base[C.IMPRESSIONS][list(C.TABLES[C.IMPRESSIONS])],
    )
    for name in C.ENTITY_TABLES:
        assert len(tables[name]) == len(base[name])
    r1 = log_rows[log_rows["request_id_source"] == "r-1"].sort_values(C.POSITION)
    assert r1[C.IMPRESSION_ID].tolist() == [ing.stable_id(f"feed|r-1|{k}") for k in range(1, 11)]
    assert set(r1[C.REQUEST_ID]) == {ing.stable_id("r-1")}
    assert r1[C.ITEM_ID].tolist() == world["ranked"]
    assert r1[C.TS].iloc[0] == pd.Timestamp(world["t0"], tz="UTC")
    assert str(imp[C.TS].dtype) == "datetime64[ns, UTC]"
    assert set(r1[ing.SERVED_POLICY]) == {"model:16"}
    assert set(r1[ing.EXPERIMENT_ARM]) == {"treatment"}
    r2 = log_rows[log_rows["request_id_source"] == "r-2"]
    assert set(r2[ing.SERVED_POLICY]) == {"heuristic"} and set(r2[C.SURFACE]) == {"CHECKOUT"}
    assert set(r2[ing.EXPERIMENT_ARM]) == {"control"}
    # the base's rows carry no log provenance
    assert imp.iloc[: len(base[C.IMPRESSIONS])][ing.SERVED_POLICY].isna().all()


def test_exploration_slots_the_coin_chose_are_random_the_trailing_one_heuristic(
    world: dict,
) -> None:
    imp = _log_rows(world["tables"][C.IMPRESSIONS], world["base"][C.IMPRESSIONS])
    r1 = imp[imp["request_id_source"] == "r-1"].set_index(C.POSITION)
    assert r1.loc[3, C.POLICY] == C.POLICY_RANDOM
    assert r1.loc[10, C.POLICY] == C.POLICY_HEURISTIC
    assert r1.loc[10, ing.SERVED_REASON] == r1.loc[3, ing.SERVED_REASON] == "exploration"
    assert (r1.drop(index=[3])[C.POLICY] == C.POLICY_HEURISTIC).all()
    assert r1.loc[3, C.PROPENSITY] == pytest.approx(0.004)
    counts = world["summary"]["ingest"]["event_log"]
    assert counts["exploration_slots_kept_heuristic"] == 1
    assert counts["policies"] == {"heuristic": 16, "random": 1, "organic": 1}


def test_feed_policies_only_randomize_slots_with_a_ranked_slot_below() -> None:
    x, r = E.REASON_EXPLORATION, E.REASON_RANKED
    feed = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
    position = np.array([1, 2, 3, 4, 1, 2, 3, 1, 2])
    reason = np.array([x, r, x, x, r, r, r, x, x])
    policy, kept = ing._feed_policies(feed, position, reason)
    assert policy.tolist() == [C.POLICY_RANDOM] + [C.POLICY_HEURISTIC] * 8
    assert kept.tolist() == [False, False, True, True, False, False, False, True, True]


def test_outcomes_land_on_the_impression_of_their_feed_and_slot(world: dict) -> None:
    tables, base = world["tables"], world["base"]
    slot1, slot3, slot7 = (ing.stable_id(f"feed|r-1|{k}") for k in (1, 3, 7))
    clicks = _log_rows(tables[C.CLICKS], base[C.CLICKS])
    assert sorted(clicks[C.IMPRESSION_ID]) == sorted([slot1, slot3, slot7])
    first = clicks.set_index(C.IMPRESSION_ID).loc[slot1, C.TS]
    assert first == pd.Timestamp(world["t0"] + 30 * SECOND, tz="UTC")  # the first click kept
    carts = _log_rows(tables[C.ADD_TO_CARTS], base[C.ADD_TO_CARTS])
    assert carts[C.IMPRESSION_ID].tolist() == [slot1]
    buys = _log_rows(tables[C.PURCHASES], base[C.PURCHASES])
    fed = buys[buys[C.IMPRESSION_ID] == slot1]
    assert fed[[C.PRICE, C.QUANTITY]].values.tolist() == [[12.5, 2]]
    imp = tables[C.IMPRESSIONS].set_index(C.IMPRESSION_ID)
    assert imp.loc[slot1, C.ITEM_ID] == world["ranked"][0]
    assert imp.loc[slot1, C.USER_ID] == world["users"][0]
    # the purchase no feed led to: an organic impression of its own
    organic = imp.loc[buys.loc[buys[C.IMPRESSION_ID] != slot1, C.IMPRESSION_ID]]
    assert organic[C.POLICY].tolist() == [C.POLICY_ORGANIC]
    assert organic[C.POSITION].tolist() == [0] and organic[C.PROPENSITY].isna().all()
    assert organic[C.ITEM_ID].tolist() == [world["items"][40]]
    assert world["summary"]["ingest"]["organic_impressions"] == 1
    inventory = _log_rows(tables[C.INVENTORY], base[C.INVENTORY])
    assert inventory[[C.ITEM_ID, C.STOCK]].values.tolist() == [[world["ranked"][0], 7]]


def test_what_cannot_be_placed_is_counted_with_table_column_and_rule(world: dict) -> None:
    s = world["summary"]
    expected = {
        (C.IMPRESSIONS, C.ITEM_ID, "not_in_base"): 1,
        (C.IMPRESSIONS, C.USER_ID, "not_in_base"): 2,
        (C.CLICKS, C.REQUEST_ID, "feed_not_in_log"): 1,
        (C.CLICKS, C.REQUEST_ID, "no_feed"): 1,
        (C.CLICKS, C.ITEM_ID, "not_on_feed"): 1,
        (C.CLICKS, C.USER_ID, "user_mismatch"): 1,
        (C.CLICKS, C.TS, "after_impression"): 1,
        (C.CLICKS, C.IMPRESSION_ID, "impression_rejected"): 1,
        (C.CLICKS, C.IMPRESSION_ID, "unique"): 1,
        (C.PURCHASES, C.ITEM_ID, "not_in_base"): 1,
        (C.PURCHASES, C.USER_ID, "not_in_base"): 1,
        (C.INVENTORY, C.ITEM_ID, "not_in_base"): 1,
    }
    for key, rows in expected.items():
        assert _rejected(s, *key) == rows, key
    assert sum(r["rows"] for r in s["ingest"]["rejected"]) == sum(expected.values())
    lost = next(r for r in s["ingest"]["rejected"] if r["rule"] == "feed_not_in_log")
    assert lost["examples"] == ["r-lost"] and "not in the log" in lost["why"]
    counts = s["ingest"]["event_log"]
    assert counts["outcomes_moved_to_their_item_slot"] == 1  # c7 named slot 5
    assert counts["impression_events_ignored"] == 1
    assert counts["appended"] == {"impressions": 18, "clicks": 3, "add_to_carts": 1,
                                  "purchases": 2, "inventory": 1}  # fmt: skip
    json.dumps(s, default=str)  # the summary the CLI prints


def test_the_result_validates_and_builds_training_sets(world: dict) -> None:
    from training.stages import dataset_stage, features_stage, load_raw, read_meta, validate

    paths = world["paths"]
    assert world["summary"]["rows"][C.IMPRESSIONS] == len(world["tables"][C.IMPRESSIONS])
    validate(load_raw(paths, SERVED), read_meta(paths, SERVED))  # `homefeed validate`
    features_stage(paths, SERVED, ("build", "apply"))
    manifest = dataset_stage(paths, SERVED)
    assert manifest["rows"]["train"] > 0
    curve = manifest["position_curve"]
    assert curve is not None
    train = pd.read_parquet(paths.training_sets(SERVED) / "train.parquet")
    slot1 = train[train[C.IMPRESSION_ID] == ing.stable_id("feed|r-1|1")]
    assert len(slot1) == 1
    assert slot1[C.LABEL_PURCHASE].item() == 1 and slot1[C.LABEL_CLICK].item() == 1


def test_a_log_ingested_twice_is_refused(world: dict) -> None:
    with pytest.raises(ing.IngestError, match="already ingested into the base"):
        ing.ingest_eventlog_with_report(world["log"], SERVED, home=world["paths"])


def test_bad_bases_and_logs_are_clear_errors(world: dict, tmp_path: Path) -> None:
    paths = world["paths"]
    with pytest.raises(ing.IngestError, match="needs a base dataset"):
        ing.ingest_with_report("eventlog", str(world["log"]))
    with pytest.raises(ing.IngestError, match="base dataset 'nope' not found"):
        ing.ingest_eventlog_with_report(world["log"], "nope", home=paths)
    with pytest.raises(ing.IngestError, match="cannot be read: no event log"):
        ing.ingest_eventlog_with_report(tmp_path / "none", BASE, home=paths)
    write_log(tmp_path / "empty", [])
    with pytest.raises(ing.IngestError, match="no records"):
        ing.ingest_eventlog_with_report(tmp_path / "empty", BASE, home=paths)
    with pytest.raises(ing.IngestError, match=r"\['base'\] apply to the eventlog source only"):
        ing.ingest_with_report("generic", str(tmp_path), base=BASE)


def test_the_cli_ingests_a_log_over_a_base(
    world: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tools.cli import main

    paths = world["paths"]
    monkeypatch.setenv("HOMEFEED_HOME", str(paths.home))
    argv = ["ingest", "--source", "eventlog", "--path", str(world["log"]), "--base", BASE]
    assert main([*argv, "--dataset", "cli-served"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["source"] == "eventlog" and summary["ingest"]["event_log"]["feeds"] == 4
    assert summary["rows"] == world["summary"]["rows"]
    assert main(["validate", "--dataset", "cli-served"]) == 0
    capsys.readouterr()
    assert main([*argv, "--dataset", BASE]) == 2
    assert "the base stays as it is" in capsys.readouterr().err
    assert main(["ingest", "--source", "generic", "--path", "x", "--base", BASE,
                 "--dataset", "other"]) == 2  # fmt: skip
    assert "--base applies to the eventlog source only" in capsys.readouterr().err


def test_random_slots_give_the_position_curve_where_every_exploration_slot_would_not() -> None:
    """The gateway's own exploration (services/gateway/rerank.py) over 60k pages, 5 % of
    them from requests whose ranked list runs out at 8 items (so their lower slots explore
    for certain) and whose exploration pools are worse: the slots ``_feed_policies`` calls
    random recover e(k)/e(1); all exploration slots together would not."""
    from services.gateway.rerank import explore
    from training.propensity import estimate_position_curve

    rng = np.random.default_rng(0)
    exam = (1 + np.arange(20) / 3.0) ** -1.0  # the simulator's examination, kappa 3
    parts: list[list[np.ndarray]] = [[], [], [], []]
    for feed in range(60_000):
        short = rng.random() < 0.05
        ranked = np.arange(8 if short else 200)
        items, explored, _ = explore(ranked, np.arange(1000, 1010), 500, 20, 0.05, rng)
        k = len(items)
        for part, values in zip(
            parts,
            (np.full(k, feed), np.arange(1, k + 1),
             np.where(explored, E.REASON_EXPLORATION, E.REASON_RANKED),
             np.full(k, 0.05 if short else 0.3)),
            strict=True,
        ):  # fmt: skip
            part.append(values)
    feed_row, position, reason, relevance = (np.concatenate(p) for p in parts)
    p_click = exam[position - 1] * relevance * rng.uniform(0.5, 1.5, len(position))
    clicked = rng.random(len(position)) < p_click
    policy, _ = ing._feed_policies(feed_row, position, reason)
    imp = pd.DataFrame({C.IMPRESSION_ID: np.arange(len(position)), C.POSITION: position,
                        C.POLICY: policy})  # fmt: skip
    clicks = imp.loc[clicked, [C.IMPRESSION_ID]]

    def mean_error(frame: pd.DataFrame) -> float:
        with np.errstate(invalid="ignore"):
            curve = estimate_position_curve(frame, clicks, 20)
        return float(np.abs(curve.raw[:16] / exam[:16] - 1).mean())

    assert mean_error(imp) < 0.1
    every = imp[reason == E.REASON_EXPLORATION].assign(**{C.POLICY: C.POLICY_RANDOM})
    assert mean_error(every) > 0.15


def test_a_redis_stream_log_ingests_as_the_segment_directory_does(
    world: dict, redis_server: str
) -> None:
    url = f"redis://{redis_server}/0"
    with eventlog.RedisStreamLog.open(url) as stream:
        records = [(event_id, payload) for _, event_id, payload in eventlog.read(world["log"])]
        assert all(stream.append(records))
    tables, report = ing.ingest_eventlog_with_report(url, BASE, home=world["paths"])
    assert report.event_log["location"] == url
    for name in C.EVENT_TABLES:
        got, want = tables[name], world["tables"][name]
        assert got[list(C.TABLES[name])].equals(want[list(C.TABLES[name])]), name
