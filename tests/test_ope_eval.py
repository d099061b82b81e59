"""Off-policy evaluation against a known truth: the logging policy's replay and item-in-slot
probabilities, rewards, the direct method, the ranker's OPE on a simulated log, the Open
Bandit form on a synthetic sample, and the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from contract import columns as C
from tests.test_ope import _exact_slot_probabilities as _exact
from training import ope_eval as OE
from training.policy_eval import Marketplace, request_rows
from training.report import write_report

SLOTS = 20


def test_item_in_slot_probabilities_match_enumeration_where_the_logged_factor_does_not():
    weights = np.array([5.0, 3.0, 1.0, 0.5, 0.5, 0.0])  # the last item is never shown
    exact = _exact(weights[:5], 3)
    items = np.repeat(np.arange(6), 3)
    slots = np.tile(np.arange(1, 4), 6)
    got = OE.slot_probabilities(weights, items, slots, np.random.default_rng(0), samples=4000)
    got = got.reshape(6, 3)
    assert got[5].tolist() == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(got[:, 0], weights / weights.sum())  # slot 1 is exact
    np.testing.assert_allclose(got[:5], exact, atol=0.01)
    # the slot-2 factor given the item above, what the log records, is another number: for
    # the favourite item it is the probability *given* it was not drawn first
    assert weights[0] / (weights.sum() - weights[1]) > exact[0, 1] + 0.1


def test_rewards_are_margin_gmv_within_the_window_and_late_purchases_scale_them():
    day = pd.Timedelta(days=1)
    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    impressions = pd.DataFrame(
        {
            C.IMPRESSION_ID: [1, 2, 3, 4],
            C.ITEM_ID: [10, 10, 11, 11],
            C.TS: [t0, t0, t0, t0 + 30 * day],  # the last one is too recent to follow
        }
    )
    purchases = pd.DataFrame(
        {
            C.IMPRESSION_ID: [1, 2, 3, 4],
            C.TS: [t0 + day, t0 + 10 * day, t0 + 2 * day, t0 + 31 * day],
            C.PRICE: [100.0, 100.0, 20.0, 20.0],
            C.QUANTITY: [1, 1, 2, 1],
        }
    )
    items = pd.DataFrame({C.ITEM_ID: [10, 11], C.MARGIN: [0.2, 0.5]})
    rewards = OE.impression_rewards(impressions, purchases, items)
    # followed impressions: 20 + 20 within 7 days, 20 more after 10 days
    assert rewards.late_factor == pytest.approx(60 / 40)
    got = rewards.of(np.array([1, 2, 3, 4, 99]))
    np.testing.assert_allclose(got, np.array([20.0, 0.0, 20.0, 10.0, 0.0]) * 1.5)


def test_the_direct_method_recovers_a_known_recalibration():
    rng = np.random.default_rng(1)
    egmv = rng.uniform(0.01, 4, 20_000)
    exam = rng.choice([1.0, 0.5, 0.25], 20_000)
    # what a purchase earns per examination: 0.5 x E[GMV]^0.8 (the model is over-dispersed)
    rewards = rng.poisson(exam * 0.5 * egmv**0.8).astype(float)
    dm = OE.fit_direct_method(egmv, exam, rewards, np.ones(20_000))
    assert dm.scale == pytest.approx(0.5, rel=0.05) and dm.power == pytest.approx(0.8, abs=0.03)
    assert dm(np.array([2.0]), np.array([0.5]))[0] == pytest.approx(0.25 * 2**dm.power, rel=0.05)
    assert dm(np.zeros(1), np.ones(1))[0] == 0.0 and dm.egmv_max == pytest.approx(egmv.max())
    top = dm(np.array([egmv.max()]), np.ones(1))[0]
    assert dm(np.array([40.0]), np.ones(1))[0] == pytest.approx(top)  # flat past its range
    # the fit's total is the realised total, whatever the weights
    weights = rng.uniform(1, 10, 20_000)
    weighted = OE.fit_direct_method(egmv, exam, rewards, weights)
    assert (weights * weighted(egmv, exam)).sum() == pytest.approx((weights * rewards).sum(), 1e-4)
    with pytest.raises(ValueError, match="no logged rows"):
        OE.fit_direct_method(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0))


# --- the ranker's OPE on a simulated log -------------------------------------------------------
@pytest.fixture(scope="module")
def sim():
    from training.simulate import load_config, simulate

    return simulate(load_config("tiny", days=16))  # days 7-8: a real 7-day click window


def _simulator_logs(sim) -> OE.SimulatorLogs:
    tables = {k: v for k, v in sim.tables.items() if k in C.ALL_TABLES}
    carts = sim.tables["checkout_carts"]
    market = Marketplace(tables, carts)
    cfg = sim.config
    policy = OE.LoggingPolicy(cfg.pool_size, cfg.policy_temperature, cfg.recency_days)
    imp = tables[C.IMPRESSIONS]
    start = pd.Timestamp(cfg.start) + pd.Timedelta(days=7)
    logged = imp[(imp[C.TS] >= start) & (imp[C.TS] < start + pd.Timedelta(days=1))]
    # a perfect reward model: the scores below are the Oracle's per-examination values
    identity = OE.DirectMethod(scale=1.0, power=1.0, rows=0)
    return OE.SimulatorLogs(
        market=market,
        replay=OE.HeuristicReplay(market, imp, tables[C.CLICKS], policy),
        impressions=imp,
        rewards=OE.impression_rewards(imp, tables[C.PURCHASES], tables[C.ITEMS]),
        logged=logged,
        checkout_carts=carts,
        examination=sim.oracle.truth.examination(np.arange(1, SLOTS + 1)),
        direct_method=identity,
    )


def _heuristic_mode(logs: OE.SimulatorLogs, oracle, scored: OE.Scored):
    """A policy ranking the heuristic's most likely page, each item scored by the Oracle's
    value per examination (what a perfect reward model would say)."""
    market = logs.market

    def policy(requests: pd.DataFrame, state) -> list[np.ndarray]:
        pages = market.heuristic(requests, state, SLOTS)
        for row, items in zip(request_rows(requests), pages, strict=True):
            cart = market.cart_of(row.request_id)
            value = oracle.item_values(row.user_id, items, row.ts, cart if len(cart) else None)
            scored[row.request_id] = (items, value["margin"])
        return pages

    return policy


def test_the_ranker_ope_replays_the_log_exactly_and_a_perfect_model_makes_dr_cover(sim):
    logs = _simulator_logs(sim)
    oracle = sim.oracle
    scored: OE.Scored = {}
    policy = _heuristic_mode(logs, oracle, scored)
    out = OE.ranker_ope(logs, policy, scored, oracle, k=SLOTS, n_requests=150, seed=0)
    d = out["diagnostics"]
    assert d["requests"] == 150 and len(scored) == 150
    assert d["replay_check"]["share_within_1e-6"] == 1.0  # the logged slot-1 propensities
    assert d["support_share"] > 0.9  # the heuristic's own mode: nearly all reachable
    # 128 of 150 requests' slots on tiny with the organic channel (organic clicks flatten the
    # pool's popularity, so the logged pages stray further from the heuristic's mode); >150
    # without it
    assert d["matched_slots"] > 100
    assert out["dm"]["relative_error"] == pytest.approx(0.0, abs=1e-9)
    assert out["dr"]["covers"] and out["dr"]["oracle"] == out["oracle"] > 0
    assert sum(s["oracle"] for s in out["by_slot"]) == pytest.approx(out["oracle"])
    for name in OE.ESTIMATORS:
        assert set(out[name]) >= {"estimate", "ci_low", "ci_high", "ess", "relative_error"}
    assert OE.ope_targets(out) == {
        "ope_dr_relative_error": out["dr"]["relative_error"],
        "ope_dr_covers": True,
        "ope_dr_relative_error_target": OE.TARGET_DR_RELATIVE_ERROR,
        "ope_dr_os_relative_error": out["dr_os"]["relative_error"],
        "ope_dr_os_covers": True,
    }
    # with the exact reward model, shrinking the correction only takes noise out
    assert abs(out["dr_os"]["relative_error"]) <= abs(out["dr"]["relative_error"])
    assert out["dr_os"]["shrinkage_lambda"] < float("inf")
    # the part the log can check: the supported slots' truth, the model exact there too
    part = out["supported"]
    assert part["slot_share"] == pytest.approx(d["support_share"], rel=1e-12)
    assert part["oracle"] == pytest.approx(
        d["dm_vs_oracle_per_1k"]["supported"]["oracle"], rel=1e-12
    )
    assert 0.9 < part["oracle_share"] <= 1.0 and part["oracle"] <= out["oracle"]
    assert part["dm"]["relative_error"] == pytest.approx(0.0, abs=1e-9)
    assert part["ips"]["estimate"] == pytest.approx(out["ips"]["estimate"], rel=1e-12)
    assert part["dr"]["covers"]


def test_dr_takes_a_wrong_models_error_out_where_the_log_supports_the_ranker(sim):
    """The same pages valued with the exact model and with one three times the truth: on the
    supported slots the direct method moves by twice the truth, DR by a small part of that
    (its correction is unbiased whatever the model) and IPS not at all."""
    from dataclasses import replace

    oracle = sim.oracle
    parts = []
    for scale in (1.0, 3.0):
        logs = replace(_simulator_logs(sim), direct_method=OE.DirectMethod(scale, 1.0, rows=0))
        scored: OE.Scored = {}
        policy = _heuristic_mode(logs, oracle, scored)
        out = OE.ranker_ope(logs, policy, scored, oracle, k=SLOTS, n_requests=150, seed=0)
        parts.append({name: out["supported"][name]["estimate"] for name in ("ips", "dr", "dm")})
    exact, wrong = parts
    truth = exact["dm"]  # the exact model's value of the supported slots is their truth
    assert wrong["dm"] - exact["dm"] == pytest.approx(2.0 * truth, rel=1e-9)
    assert abs(wrong["dr"] - exact["dr"]) < 0.2 * (wrong["dm"] - exact["dm"])  # 0.05 measured
    assert wrong["ips"] == exact["ips"]


def test_a_request_without_a_complete_reward_window_is_not_evaluated(sim):
    logs = _simulator_logs(sim)
    imp = logs.impressions
    logs.logged = imp[imp[C.TS] >= imp[C.TS].max() - pd.Timedelta(days=1)]
    out = OE.ranker_ope(logs, lambda r, s: [], {}, sim.oracle, k=SLOTS)
    assert "reward window" in out["skipped"] and OE.ope_targets(out) == {}


# --- Open Bandit ---------------------------------------------------------------------------------
CTR = np.array([[0.10, 0.08, 0.06], [0.30, 0.25, 0.20], [0.05, 0.04, 0.03], [0.20, 0.15, 0.10]])
TS_POLICY = np.array([0.10, 0.60, 0.05, 0.25])  # per position, context-free


def _obd_folder(root: Path, n: int = 30_000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for folder, probs in (("random", np.full(4, 0.25)), ("bts", TS_POLICY)):
        item = rng.choice(4, size=n, p=probs)
        position = rng.integers(1, 4, size=n)
        frame = pd.DataFrame(
            {
                "timestamp": "2019-11-24 00:00:00+00:00",
                "item_id": item,
                "position": position,
                "click": (rng.random(n) < CTR[item, position - 1]).astype(int),
                "propensity_score": probs[item] * rng.uniform(0.5, 1.5, n)
                if folder == "bts"
                else 0.25,  # TS's logged probabilities drift; Random's are exact
                "user_feature_0": "u",
            }
        )
        (root / folder / "all").mkdir(parents=True)
        frame.to_csv(root / folder / "all" / "all.csv")
    return root


def test_open_bandit_ope_estimates_the_policy_rate_from_the_random_logs(tmp_path):
    truth = float((TS_POLICY @ CTR).mean())
    out = OE.open_bandit_ope(_obd_folder(tmp_path))
    assert out["random_rows"] == out["ts_rows"] == 30_000
    for name in OE.ESTIMATORS:
        e = out[name]
        assert abs(e["estimate"] - truth) / truth < 0.05, name
        assert e["oracle_ci_low"] < e["oracle"] < e["oracle_ci_high"]
        assert abs(e["oracle"] - truth) / truth < 0.05
        assert e["relative_error"] == pytest.approx((e["estimate"] - e["oracle"]) / e["oracle"])
    assert out["dr"]["stderr"] < out["ips"]["stderr"]  # the click model takes variance out
    assert set(out["by_position"]) == {1, 2, 3}
    for p, section in out["by_position"].items():
        assert abs(section["ips"]["estimate"] - TS_POLICY @ CTR[:, p - 1]) < 0.02


def test_the_policy_is_its_own_log_frequencies_not_its_logged_probabilities():
    log = pd.DataFrame({"item_id": [0, 0, 1, 2], "position": [1, 1, 1, 2]})
    policy = OE.obd_policy(log, 3, np.array([1, 2]))
    np.testing.assert_allclose(policy, np.array([[2 / 3, 0], [1 / 3, 0], [0, 1]]))


def test_the_open_bandit_tool_writes_its_report_and_a_table(tmp_path, capsys):
    from tools.ope_obd import main

    out = tmp_path / "ope.json"
    assert main(["--path", str(_obd_folder(tmp_path / "obd", n=3000)), "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["dr"]["estimate"] > 0 and "by_position" in written
    printed = capsys.readouterr().out
    assert "slot 3" in printed and "covers" in printed
    assert OE.cached_open_bandit(tmp_path) == tmp_path / "obd"
    assert OE.cached_open_bandit(tmp_path / "nowhere") is None


def test_the_report_shows_the_off_policy_tables(tmp_path):
    estimate = {
        "estimate": 250.0,
        "ci_low": 200.0,
        "ci_high": 300.0,
        "ess": 12.0,
        "oracle": 264.0,
        "relative_error": -14 / 264,
        "covers": True,
    }
    report = {
        "ope": {
            **{name: estimate for name in (*OE.ESTIMATORS, "dm")},
            "diagnostics": {"requests": 10, "slots": 20, "matched_slots": 3},
            "supported": {
                "slot_share": 0.25,
                "oracle": 66.0,
                "oracle_share": 0.25,
                **{
                    name: {**estimate, "oracle": 66.0, "relative_error": 0.5, "covers": False}
                    for name in ("ips", "dr", "dm")
                },
            },
        }
    }
    write_report(report, tmp_path)
    md = (tmp_path / "eval.md").read_text()
    assert "Off-policy evaluation of the ranker" in md
    assert "| dr | 250 | 200 .. 300 | 12 | 264 | -5.3% | yes |" in md
    assert "(0.25 of the slots, 0.25 of the Oracle's value)" in md
    assert "| dr | 250 | 200 .. 300 | 12 | 66 | +50.0% | no |" in md
