"""The rollout report (``tools/rollout_report.py``) on synthetic rollouts: a promoted one, a
failed one rolled back after failed checks, and one with no analysis window yet."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tools.rollout_report import main, render_markdown, select_rollout, write_report

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
SPEC = {
    "version": "7",
    "steps": [5, 25, 50, 100],
    "interval_s": 60.0,
    "threshold": 3,
    "mirror_share": 0.05,
    "min_feeds": 20,
}


def _at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


def _arm(
    feeds: int,
    p99: float | None,
    errors: int = 0,
    error_rate: float | None = 0.0,
    fallback_rate: float | None = 0.0,
) -> dict[str, Any]:
    return {
        "feeds": feeds,
        "degraded": 0,
        "ranking_calls": feeds,
        "ranking_errors": errors,
        "error_rate": error_rate,
        "fallback_rate": fallback_rate,
        "ranking_p95_ms": None if p99 is None else 0.8 * p99,
        "ranking_p99_ms": p99,
        "feed_p95_ms": None if p99 is None else 3 * p99,
        "feed_p99_ms": None if p99 is None else 4 * p99,
        "scored": 50 * feeds,
        "non_finite": 0,
        "out_of_range": 0,
        "constant": 0,
    }


def _check(name: str, passed: bool | None, value: float | None, limit: str) -> dict[str, Any]:
    return {"name": name, "passed": passed, "value": value, "limit": limit, "detail": ""}


def _window(
    k: int,
    weight: int,
    decision: str,
    stable: dict[str, Any],
    canary: dict[str, Any],
    checks: list[dict[str, Any]],
    psi: float | None = 0.01,
) -> dict[str, Any]:
    start = 10 + 60 * k
    return {
        "started_at": _at(start),
        "ended_at": _at(start + 60),
        "seconds": 60.0,
        "step": k,
        "weight": weight,
        "replicas": 2,
        "arms": {"stable": stable, "canary": canary},
        "mirror": {
            "mirrored": 40,
            "errors": 0,
            "dropped": 0,
            "rank_correlation": 0.93,
            "top20_overlap": 0.85,
            "p_diff": 0.002,
        },
        "psi": psi,
        "checks": checks,
        "decision": decision,
        "message": f"{decision} at {weight} %",
    }


def _rollout(
    phase: str, windows: list[dict[str, Any]], events: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "id": f"r20250301T120000-v7-{phase.lower()}",
        "spec": SPEC,
        "salt": "0123456789abcdef",
        "phase": phase,
        "step": max((w["step"] for w in windows), default=0),
        "weight": windows[-1]["weight"] if windows else 0,
        "failed_checks": 0,
        "reason": "",
        "message": "",
        "created_at": _at(0),
        "updated_at": _at(10 + 60 * (len(windows) + 1)),
        "previous_champion": "",
        "baseline": {},
        "windows": windows,
        "events": events,
    }


def _ok_checks(p99_ratio: float = 1.05) -> list[dict[str, Any]]:
    return [
        _check("error_rate", True, 0.0, "canary ≤ stable + 0.5 %"),
        _check("ranking_p99", True, p99_ratio, "canary ≤ 1.5 × stable"),
        _check("psi", True, 0.01, "≤ 0.2"),
    ]


@pytest.fixture
def promoted() -> dict[str, Any]:
    weights = [5, 25, 50, 100]
    decisions = ["advance", "advance", "advance", "promote"]
    windows = [
        _window(k, w, d, _arm(400 - 3 * w, 4.0), _arm(max(20, 4 * w), 4.2), _ok_checks())
        for k, (w, d) in enumerate(zip(weights, decisions, strict=True))
    ]
    # the 100 % window has no stable traffic: its figures are None
    windows[-1]["arms"]["stable"] = _arm(0, None, error_rate=None, fallback_rate=None)
    events: list[dict[str, Any]] = [
        {"at": _at(0), "event": "started", "version": "7"},
        {"at": _at(8), "event": "canary_ready"},
        *({"at": _at(10 + 60 * k), "event": "weight", "weight": w} for k, w in enumerate(weights)),
        {"at": _at(250), "event": "promoted", "previous_champion": "6"},
    ]
    rollout = _rollout("PROMOTED", windows, events)
    rollout.update(reason="all steps passed", previous_champion="6")
    return rollout


@pytest.fixture
def failed() -> dict[str, Any]:
    slow = [
        _check("error_rate", True, 0.0, "canary ≤ stable + 0.5 %"),
        _check("ranking_p99", False, 3.1, "canary ≤ 1.5 × stable"),
        _check("psi", None, None, "≤ 0.2"),
    ]
    windows = [
        _window(0, 5, "advance", _arm(380, 4.0), _arm(20, 4.1), _ok_checks()),
        _window(1, 25, "failed_check", _arm(300, 4.0), _arm(100, 12.4), slow),
        _window(2, 25, "failed_check", _arm(300, 4.1), _arm(100, 13.0), slow, psi=None),
        _window(
            3,
            25,
            "rollback",
            _arm(300, 4.0),
            _arm(100, 250.0, errors=7, error_rate=0.07, fallback_rate=0.07),
            slow,
        ),
    ]
    events: list[dict[str, Any]] = [
        {"at": _at(0), "event": "started", "version": "7"},
        {"at": _at(8), "event": "canary_ready"},
        {"at": _at(130), "event": "controller_resumed", "step": 1},
        {"at": _at(250), "event": "rolled_back", "reason": "3 failed checks: ranking_p99"},
    ]
    rollout = _rollout("FAILED", windows, events)
    rollout.update(
        weight=0,
        failed_checks=3,
        reason="failed checks",
        message="ranking_p99 failed 3 times",
    )
    return rollout


@pytest.fixture
def empty() -> dict[str, Any]:
    return _rollout("STARTING", [], [{"at": _at(0), "event": "started", "version": "7"}])


def _assert_png(path: Path) -> None:
    assert path.is_file()
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000


def test_promoted_report(tmp_path: Path, promoted: dict[str, Any]) -> None:
    md_path, png_path = write_report(promoted, tmp_path / "out" / "promoted")
    assert md_path == tmp_path / "out" / "promoted" / "rollout.md"
    assert png_path == tmp_path / "out" / "promoted" / "rollout.png"
    _assert_png(png_path)
    md = md_path.read_text()
    assert "# Rollout r20250301T120000-v7-promoted: model v7" in md
    assert "PROMOTED (all steps passed)" in md
    assert "![timeline](rollout.png)" in md
    assert "5 → 25 → 50 → 100 %" in md
    table = [line for line in md.splitlines() if line.startswith("| ") and "**" in line]
    assert len(table) == 4
    assert [row.split(" | ")[2] for row in table] == ["5", "25", "50", "100"]
    assert md.count("**advance**") == 3 and md.count("**promote**") == 1
    assert "**promoted**" in md and "previous_champion=6" in md
    assert "`ranking_p99`" in md and "canary ≤ 1.5 × stable" in md
    # the 100 % window's stable arm has no figures: shown as –, not "None"
    assert "None" not in md and "nan" not in md
    assert "– / 16.8" in md  # feed p99: stable none, canary 4 × 4.2 ms


def test_failed_report(tmp_path: Path, failed: dict[str, Any]) -> None:
    md_path, png_path = write_report(failed, tmp_path)
    _assert_png(png_path)
    md = md_path.read_text()
    assert "FAILED (failed checks)" in md
    assert "ranking_p99 failed 3 times" in md
    for decision in ("advance", "failed_check", "rollback"):
        assert f"**{decision}**" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "**" in line]
    assert [row.split(" | ")[-2] for row in rows] == ["–"] + ["ranking_p99"] * 3
    assert "7 %" in md  # the canary's error rate in the rollback window
    assert "**rolled_back**" in md and "3 failed checks: ranking_p99" in md
    # check summary: ranking_p99 passed once, failed three times; psi had no data thrice
    assert "| `ranking_p99` | canary ≤ 1.5 × stable | 1 | 3 | 0 |" in md
    assert "| `psi` | ≤ 0.2 | 1 | 0 | 3 |" in md


def test_empty_report(tmp_path: Path, empty: dict[str, Any]) -> None:
    md_path, png_path = write_report(empty, tmp_path / "empty")
    _assert_png(png_path)
    md = md_path.read_text()
    assert "STARTING" in md
    assert "No analysis window yet." in md
    assert "No check evaluated yet." in md
    assert "**started**" in md


def test_single_window_and_missing_fields(tmp_path: Path) -> None:
    """One window with almost nothing in it, no created_at: still a report."""
    rollout = {
        "id": "r-min",
        "spec": {"version": "3"},
        "phase": "PROGRESSING",
        "windows": [{"started_at": _at(5), "ended_at": _at(65), "weight": 5, "decision": "hold"}],
        "events": [],
    }
    md_path, png_path = write_report(rollout, tmp_path)
    _assert_png(png_path)
    md = md_path.read_text()
    assert "**hold**" in md
    assert "| 1 | 60.0 | 5 | – / – |" in md  # t from the earliest timestamp


def test_main_on_state_document(
    tmp_path: Path,
    promoted: dict[str, Any],
    failed: dict[str, Any],
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = {"version": 1, "current": failed, "history": [promoted]}
    path = tmp_path / "state.json"
    path.write_text(json.dumps(state))
    out = tmp_path / "reports"
    assert main([str(path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out / "rollout.md"), str(out / "rollout.png")]
    _assert_png(out / "rollout.png")
    assert "FAILED" in (out / "rollout.md").read_text()

    # a rollout of the history, by id
    older = tmp_path / "older"
    assert main([str(path), "--out", str(older), "--id", promoted["id"]]) == 0
    assert "PROMOTED" in (older / "rollout.md").read_text()

    # a file holding a single rollout
    single = tmp_path / "rollout.json"
    single.write_text(json.dumps(promoted))
    assert main([str(single), "--out", str(tmp_path / "single")]) == 0
    assert (tmp_path / "single" / "rollout.md").is_file()


def test_main_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    no_current = tmp_path / "state.json"
    no_current.write_text(json.dumps({"version": 1, "current": None, "history": []}))
    assert main([str(no_current), "--out", str(tmp_path / "x")]) == 2
    assert "no current rollout" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.json")]) == 2
    assert not (tmp_path / "x").exists()


def test_select_rollout(promoted: dict[str, Any], failed: dict[str, Any]) -> None:
    state = {"version": 1, "current": failed, "history": [promoted]}
    assert select_rollout(state)["id"] == failed["id"]
    assert select_rollout(state, promoted["id"])["phase"] == "PROMOTED"
    assert select_rollout(promoted)["id"] == promoted["id"]
    with pytest.raises(ValueError, match="no rollout"):
        select_rollout(state, "r-unknown")
    with pytest.raises(ValueError, match="not a rollout"):
        select_rollout({"foo": 1})


def test_markdown_is_pure(promoted: dict[str, Any]) -> None:
    """Rendering does not touch the input and does not need matplotlib."""
    before = json.dumps(promoted, sort_keys=True)
    md = render_markdown(promoted, png_name="x.png")
    assert "![timeline](x.png)" in md
    assert json.dumps(promoted, sort_keys=True) == before


def test_weight_line_drops_after_rollback(failed: dict[str, Any]) -> None:
    from tools.rollout_report import _origin, _weight_steps

    xs, ys = _weight_steps(failed, _origin(failed), x_end=400.0)
    assert xs[0] == 0.0 and ys[0] == 0.0
    assert max(ys) == 25.0
    assert (xs[-2], ys[-2]) == (250.0, 0.0)  # the rolled_back event
    assert (xs[-1], ys[-1]) == (400.0, 0.0)
