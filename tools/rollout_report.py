"""A report of one canary rollout: ``rollout.md`` (outcome, spec, a table of the analysis
windows, the events, the checks) and ``rollout.png`` (a timeline of weight, latency and
error rates per arm).

The input is the controller's JSON (``services/rollout/state.py``): one rollout
(``Rollout.to_json()``) or a whole state document (``RolloutState.to_json()``), of which the
current rollout is reported unless ``--id`` names another one::

    python -m tools.rollout_report state.json --out reports/

The report reads plain dicts and tolerates missing keys and ``None`` figures (a window with
too little traffic has no quantiles), so it also works on a rollout still in progress or one
that never reached its first window.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.common.rollout_stats import ARMS

if TYPE_CHECKING:
    from matplotlib.axes import Axes

MD_NAME = "rollout.md"
PNG_NAME = "rollout.png"
NONE = "–"  # how a missing figure is written

DECISION_COLORS = {
    "advance": "tab:green",
    "hold": "tab:grey",
    "failed_check": "tab:orange",
    "rollback": "tab:red",
    "promote": "tab:blue",
}
ARM_COLORS = {"stable": "#444444", "canary": "tab:purple"}
# events drawn as vertical lines on the timeline ("started" is t = 0, "weight" is the step line)
EVENT_COLORS = {
    "canary_ready": "tab:cyan",
    "promoted": "tab:blue",
    "rolled_back": "tab:red",
    "aborted": "tab:brown",
    "undone": "tab:pink",
    "controller_resumed": "tab:olive",
}
# events after which the canary arm gets no traffic
STOP_EVENTS = frozenset({"rolled_back", "aborted", "undone"})
LOG_SCALE_RATIO = 20.0  # latency panel goes log when max / min of the figures exceeds this


# --- reading the rollout -------------------------------------------------------------------


def _parse_time(value: Any) -> datetime | None:
    """An ISO 8601 timestamp as an aware UTC datetime; ``None`` if absent or unparseable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        stamp = datetime.fromisoformat(value)
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp


def _number(value: Any) -> float | None:
    """A finite float, or ``None`` for a missing, non-numeric or non-finite value."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    x = float(value)
    return x if math.isfinite(x) else None


def _origin(rollout: Mapping[str, Any]) -> datetime | None:
    """Time zero of the report: ``created_at``, else the earliest timestamp in the rollout."""
    start = _parse_time(rollout.get("created_at"))
    if start is not None:
        return start
    stamps = [_parse_time(w.get("started_at")) for w in _windows(rollout)]
    stamps += [_parse_time(e.get("at")) for e in _events(rollout)]
    known = [s for s in stamps if s is not None]
    return min(known) if known else None


def _since(origin: datetime | None, value: Any) -> float | None:
    """Seconds from ``origin`` to the timestamp ``value``."""
    stamp = _parse_time(value)
    if origin is None or stamp is None:
        return None
    return (stamp - origin).total_seconds()


def _windows(rollout: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [w for w in rollout.get("windows") or [] if isinstance(w, Mapping)]


def _events(rollout: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [e for e in rollout.get("events") or [] if isinstance(e, Mapping)]


def _arm(window: Mapping[str, Any], arm: str) -> Mapping[str, Any]:
    arms = window.get("arms") or {}
    value = arms.get(arm) if isinstance(arms, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def _mirror(window: Mapping[str, Any]) -> Mapping[str, Any]:
    mirror = window.get("mirror")
    return mirror if isinstance(mirror, Mapping) else {}


def _checks(window: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [c for c in window.get("checks") or [] if isinstance(c, Mapping)]


def _failed_checks(window: Mapping[str, Any]) -> list[str]:
    """Names of the checks that failed in the window (``passed is False``; ``None`` is "not
    enough data", not a failure)."""
    return [str(c.get("name", "?")) for c in _checks(window) if c.get("passed") is False]


def _window_time(origin: datetime | None, window: Mapping[str, Any]) -> float | None:
    """When the window's decision was taken: its end (its start if it has no end)."""
    t = _since(origin, window.get("ended_at"))
    return t if t is not None else _since(origin, window.get("started_at"))


# --- formatting ----------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    """A figure with ``digits`` significant digits (integers as they are), ``None`` as –."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    x = _number(value)
    if x is None:
        return NONE
    if x == 0:
        return "0"
    if abs(x) >= 10**digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _ms(value: Any) -> str:
    """Milliseconds: one decimal below 100 ms, whole above."""
    x = _number(value)
    if x is None:
        return NONE
    return f"{x:.1f}" if abs(x) < 100 else f"{x:,.0f}"


def _pct(value: Any) -> str:
    """A rate in [0, 1] as a percentage."""
    x = _number(value)
    if x is None:
        return NONE
    if x == 0:
        return "0 %"
    return f"{100 * x:.3g} %"


def _seconds(value: float | None) -> str:
    if value is None:
        return NONE
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}"


def _pair(window: Mapping[str, Any], key: str, fmt: Any) -> str:
    """``stable / canary`` of one arm figure."""
    return " / ".join(fmt(_arm(window, arm).get(key)) for arm in ARMS)


def _cell(text: Any) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ").strip() or NONE


# --- markdown ------------------------------------------------------------------------------


def _spec_line(spec: Mapping[str, Any]) -> str:
    steps = spec.get("steps") or []
    parts = [
        "steps " + (" → ".join(str(s) for s in steps) + " %" if steps else NONE),
        f"interval {_fmt(spec.get('interval_s'))} s",
        f"rollback after {_fmt(spec.get('threshold'))} failed checks",
        f"mirror share {_pct(spec.get('mirror_share'))}",
        f"min feeds per arm {_fmt(spec.get('min_feeds'))}",
    ]
    return ", ".join(parts)


def _outcome_lines(rollout: Mapping[str, Any], origin: datetime | None) -> list[str]:
    phase = rollout.get("phase") or "?"
    lines = [
        f"- **Outcome:** {phase}" + (f" ({rollout['reason']})" if rollout.get("reason") else "")
    ]
    if rollout.get("message"):
        lines.append(f"- **Message:** {rollout['message']}")
    lines.append(
        f"- **At:** step {_fmt(rollout.get('step'))}, weight {_fmt(rollout.get('weight'))} %, "
        f"{_fmt(rollout.get('failed_checks'))} failed checks"
    )
    duration = _since(origin, rollout.get("updated_at"))
    lines.append(
        f"- **Created:** {rollout.get('created_at') or NONE}; "
        f"**updated:** {rollout.get('updated_at') or NONE}"
        + (f" ({_seconds(duration)} s later)" if duration is not None else "")
    )
    if rollout.get("previous_champion"):
        lines.append(f"- **Previous champion:** v{rollout['previous_champion']}")
    return lines


def _window_table(rollout: Mapping[str, Any], origin: datetime | None) -> list[str]:
    windows = _windows(rollout)
    if not windows:
        return ["No analysis window yet."]
    header = [
        "#",
        "t (s)",
        "weight %",
        "feeds s / c",
        "ranking p99 ms s / c",
        "feed p99 ms s / c",
        "errors s / c",
        "fallbacks s / c",
        "PSI",
        "rank corr",
        "top-20 overlap",
        "failed checks",
        "decision",
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if k < 11 else ":---" for k in range(len(header))) + "|",
    ]
    for k, window in enumerate(windows, start=1):
        mirror = _mirror(window)
        row = [
            str(k),
            _seconds(_window_time(origin, window)),
            _fmt(window.get("weight")),
            _pair(window, "feeds", _fmt),
            _pair(window, "ranking_p99_ms", _ms),
            _pair(window, "feed_p99_ms", _ms),
            _pair(window, "error_rate", _pct),
            _pair(window, "fallback_rate", _pct),
            _fmt(window.get("psi")),
            _fmt(mirror.get("rank_correlation")),
            _pct(mirror.get("top20_overlap")),
            ", ".join(_failed_checks(window)) or NONE,
            f"**{window['decision']}**" if window.get("decision") else NONE,
        ]
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    lines += ["", "s / c: stable / canary arm; t: end of the window, from the rollout's start."]
    messages = [(k, w.get("message")) for k, w in enumerate(windows, start=1) if w.get("message")]
    if messages:
        lines += ["", "Window messages:", ""]
        lines += [f"- window {k}: {msg}" for k, msg in messages]
    return lines


def _event_lines(rollout: Mapping[str, Any], origin: datetime | None) -> list[str]:
    events = _events(rollout)
    if not events:
        return ["No event recorded."]
    lines = []
    for event in events:
        t = _since(origin, event.get("at"))
        detail = ", ".join(
            f"{key}={json.dumps(value, default=str) if not isinstance(value, str) else value}"
            for key, value in event.items()
            if key not in ("at", "event")
        )
        when = f"+{_seconds(t)} s" if t is not None else NONE
        lines.append(
            f"- `{when}` {event.get('at') or NONE} **{event.get('event') or '?'}**"
            + (f": {detail}" if detail else "")
        )
    return lines


def _check_lines(rollout: Mapping[str, Any]) -> list[str]:
    """One row per check name seen in any window: its limit(s) and how often it passed,
    failed or had too little data."""
    seen: dict[str, dict[str, Any]] = {}
    for window in _windows(rollout):
        for check in _checks(window):
            name = str(check.get("name", "?"))
            entry = seen.setdefault(name, {"limits": [], "passed": 0, "failed": 0, "no_data": 0})
            limit = str(check.get("limit") or "").strip()
            if limit and limit not in entry["limits"]:
                entry["limits"].append(limit)
            passed = check.get("passed")
            entry["passed" if passed is True else "failed" if passed is False else "no_data"] += 1
    if not seen:
        return ["No check evaluated yet."]
    lines = [
        "| check | limit | passed | failed | not enough data |",
        "|:---|:---|---:|---:|---:|",
    ]
    for name, entry in seen.items():
        limits = "; ".join(entry["limits"]) or NONE
        row = [f"`{name}`", limits, entry["passed"], entry["failed"], entry["no_data"]]
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    lines += [
        "",
        "Not enough data: the check's `passed` was null in that window (too little traffic "
        "or too few mirrored pairs to judge), so it neither passed nor failed.",
    ]
    return lines


def render_markdown(rollout: Mapping[str, Any], png_name: str = PNG_NAME) -> str:
    """The markdown report of ``rollout`` (a ``Rollout.to_json()`` dict), linking the
    timeline image ``png_name``."""
    spec = rollout.get("spec") or {}
    origin = _origin(rollout)
    title = f"# Rollout {rollout.get('id') or '?'}: model v{spec.get('version') or '?'}"
    parts = [
        title,
        "",
        *_outcome_lines(rollout, origin),
        f"- **Spec:** {_spec_line(spec)}",
        "",
        f"![timeline]({png_name})",
        "",
        "## Analysis windows",
        "",
        *_window_table(rollout, origin),
        "",
        "## Events",
        "",
        *_event_lines(rollout, origin),
        "",
        "## Checks",
        "",
        *_check_lines(rollout),
        "",
    ]
    return "\n".join(parts)


# --- the timeline plot ---------------------------------------------------------------------


def _plt() -> Any:  # matplotlib is slow to import and needs a headless backend
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(
    origin: datetime | None, windows: Sequence[Mapping[str, Any]], arm: str, key: str
) -> tuple[list[float], list[float]]:
    """(t, value) of one arm figure over the windows; ``None`` becomes NaN (a gap)."""
    xs: list[float] = []
    ys: list[float] = []
    for window in windows:
        t = _window_time(origin, window)
        if t is None:
            continue
        value = _number(_arm(window, arm).get(key))
        xs.append(t)
        ys.append(value if value is not None else math.nan)
    return xs, ys


def _weight_steps(
    rollout: Mapping[str, Any], origin: datetime | None, x_end: float
) -> tuple[list[float], list[float]]:
    """The canary weight over time as the points of a post-step line: 0 % at the start, the
    weight of each window from its start, any ``weight`` carried by an event from its time,
    0 % from a rollback, abort or undo (the canary serves nobody after it), held to
    ``x_end``."""
    points: list[tuple[float, float]] = [(0.0, 0.0)]
    for window in _windows(rollout):
        t = _since(origin, window.get("started_at"))
        weight = _number(window.get("weight"))
        if t is not None and weight is not None:
            points.append((t, weight))
    for event in _events(rollout):
        t = _since(origin, event.get("at"))
        weight = _number(event.get("weight"))
        if weight is None and event.get("event") in STOP_EVENTS:
            weight = 0.0
        if t is not None and weight is not None:
            points.append((t, weight))
    points.sort(key=lambda p: p[0])
    xs = [p[0] for p in points] + [max(x_end, points[-1][0])]
    ys = [p[1] for p in points] + [points[-1][1]]
    return xs, ys


def _draw_events(axes: Sequence[Axes], rollout: Mapping[str, Any], origin: datetime | None) -> None:
    """A vertical line per notable event on every panel, labelled on the top one."""
    top = axes[0]
    for event in _events(rollout):
        name = str(event.get("event") or "")
        t = _since(origin, event.get("at"))
        if name not in EVENT_COLORS or t is None:
            continue
        for ax in axes:
            ax.axvline(t, color=EVENT_COLORS[name], linestyle=":", linewidth=1.2, alpha=0.9)
        top.annotate(
            name,
            xy=(t, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, -2),
            textcoords="offset points",
            rotation=90,
            va="top",
            ha="left",
            fontsize=7,
            color=EVENT_COLORS[name],
        )


def _latency_scale(ax: Axes, values: Sequence[float]) -> None:
    positive = [v for v in values if math.isfinite(v) and v > 0]
    if positive and max(positive) / min(positive) > LOG_SCALE_RATIO:
        ax.set_yscale("log")


def write_timeline(rollout: Mapping[str, Any], path: Path) -> Path:
    """Draw the rollout's timeline to ``path`` (PNG): canary weight and decisions, p99
    latencies per arm, error and fallback rates per arm, over seconds since the start."""
    plt = _plt()
    from matplotlib.lines import Line2D

    spec = rollout.get("spec") or {}
    origin = _origin(rollout)
    windows = _windows(rollout)
    times = [t for t in (_window_time(origin, w) for w in windows) if t is not None]
    times += [t for t in (_since(origin, e.get("at")) for e in _events(rollout)) if t is not None]
    updated = _since(origin, rollout.get("updated_at"))
    x_end = max([*times, updated if updated is not None else 0.0, 1.0])

    fig, axes = plt.subplots(3, 1, figsize=(10, 8.5), sharex=True)
    ax_weight, ax_latency, ax_rates = axes

    # (1) weight and decisions
    wx, wy = _weight_steps(rollout, origin, x_end)
    ax_weight.step(wx, wy, where="post", color="black", linewidth=1.5, label="canary weight")
    handles: list[Any] = [Line2D([], [], color="black", linewidth=1.5, label="canary weight")]
    seen_decisions: set[str] = set()
    for window in windows:
        t = _window_time(origin, window)
        weight = _number(window.get("weight"))
        if t is None or weight is None:
            continue
        decision = str(window.get("decision") or "")
        color = DECISION_COLORS.get(decision, "black")
        ax_weight.scatter([t], [weight], color=color, s=45, zorder=3, edgecolors="white")
        if decision not in seen_decisions:
            seen_decisions.add(decision)
            handles.append(
                Line2D([], [], marker="o", linestyle="", color=color, label=decision or "?")
            )
    ax_weight.set_ylim(-5, 110)
    ax_weight.set_yticks([0, 25, 50, 75, 100])
    ax_weight.set_ylabel("canary weight (%)")
    ax_weight.legend(handles=handles, loc="center right", fontsize=8)
    if not windows:
        ax_weight.text(
            0.5,
            0.5,
            "no analysis window yet",
            transform=ax_weight.transAxes,
            ha="center",
            va="center",
            fontsize=12,
            color="grey",
        )

    # (2) p99 latencies
    latency_values: list[float] = []
    for key, style, what in (
        ("ranking_p99_ms", "-", "ranking p99"),
        ("feed_p99_ms", "--", "feed p99"),
    ):
        for arm in ARMS:
            xs, ys = _series(origin, windows, arm, key)
            if not any(math.isfinite(y) for y in ys):
                continue
            latency_values += ys
            ax_latency.plot(
                xs,
                ys,
                style,
                marker="o",
                markersize=3,
                color=ARM_COLORS[arm],
                label=f"{what} {arm}",
            )
    _latency_scale(ax_latency, latency_values)
    ax_latency.set_ylabel("p99 (ms)")
    if latency_values:
        ax_latency.legend(fontsize=8, loc="upper left")

    # (3) error and fallback rates
    plotted_rates = False
    for key, style, what in (
        ("error_rate", "-", "ranking errors"),
        ("fallback_rate", "--", "fallbacks"),
    ):
        for arm in ARMS:
            xs, ys = _series(origin, windows, arm, key)
            if not any(math.isfinite(y) for y in ys):
                continue
            plotted_rates = True
            ax_rates.plot(
                xs,
                [100 * y for y in ys],
                style,
                marker="o",
                markersize=3,
                color=ARM_COLORS[arm],
                label=f"{what} {arm}",
            )
    ax_rates.set_ylabel("rate (%)")
    ax_rates.set_ylim(bottom=0)
    if plotted_rates:
        ax_rates.legend(fontsize=8, loc="upper left")
    ax_rates.set_xlabel("seconds since the rollout started")
    ax_rates.set_xlim(-0.02 * x_end, 1.04 * x_end)

    _draw_events(axes, rollout, origin)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle(
        f"Rollout {rollout.get('id') or '?'}: model v{spec.get('version') or '?'} "
        f"→ {rollout.get('phase') or '?'}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- entry points --------------------------------------------------------------------------


def write_report(rollout: Mapping[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``out_dir/rollout.md`` and ``out_dir/rollout.png`` for ``rollout`` (a
    ``Rollout.to_json()`` dict), creating ``out_dir``; returns (markdown path, PNG path)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path = out_dir / MD_NAME
    png_path = out_dir / PNG_NAME
    write_timeline(rollout, png_path)
    md_path.write_text(render_markdown(rollout, png_name=PNG_NAME), encoding="utf-8")
    return md_path, png_path


def select_rollout(document: Mapping[str, Any], rollout_id: str | None = None) -> dict[str, Any]:
    """The rollout to report from a loaded JSON document: the document itself when it is one
    rollout; from a state document (``{"version", "current", "history"}``) the current one,
    or the one with id ``rollout_id`` (current or history). Raises ``ValueError`` if none."""
    if "current" in document or "history" in document:
        candidates = [document.get("current"), *(document.get("history") or [])]
        rollouts = [r for r in candidates if isinstance(r, Mapping)]
        if rollout_id is not None:
            for rollout in rollouts:
                if rollout.get("id") == rollout_id:
                    return dict(rollout)
            known = ", ".join(str(r.get("id")) for r in rollouts) or "none"
            raise ValueError(f"no rollout {rollout_id!r} in the state (known: {known})")
        current = document.get("current")
        if not isinstance(current, Mapping):
            raise ValueError("the state has no current rollout (pass --id to pick one)")
        return dict(current)
    if "windows" not in document and "spec" not in document:
        raise ValueError("not a rollout nor a rollout state document")
    if rollout_id is not None and document.get("id") != rollout_id:
        raise ValueError(f"the file holds rollout {document.get('id')!r}, not {rollout_id!r}")
    return dict(document)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tools.rollout_report STATE.json [--out DIR] [--id ROLLOUT]``."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.rollout_report",
        description="Write rollout.md and rollout.png for a canary rollout.",
    )
    parser.add_argument("state", type=Path, help="a rollout JSON or the controller's state JSON")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="output folder")
    parser.add_argument("--id", dest="rollout_id", help="report this rollout of the state")
    args = parser.parse_args(argv)
    try:
        document = json.loads(args.state.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        print(f"cannot read {args.state}: {exc}", file=sys.stderr)
        return 2
    if not isinstance(document, Mapping):
        print(f"{args.state}: expected a JSON object", file=sys.stderr)
        return 2
    try:
        rollout = select_rollout(document, args.rollout_id)
    except ValueError as exc:
        print(f"{args.state}: {exc}", file=sys.stderr)
        return 2
    md_path, png_path = write_report(rollout, args.out)
    print(md_path)
    print(png_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
