"""The evaluation report: ``reports/eval.json`` (the record), ``eval.md`` and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _plt():  # matplotlib is slow to import and needs a headless backend
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability_plot(curves: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Predicted vs observed purchase rate per bin, one line per curve (before/after)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    top = 0.0
    for name, c in curves.items():
        ax.plot(c["predicted"], c["observed"], marker="o", label=name)
        top = max(top, *c["predicted"], *c["observed"])
    ax.plot([0, top], [0, top], linestyle="--", color="grey", label="perfect")
    ax.set_xlabel("predicted p(purchase)")
    ax.set_ylabel("observed purchase rate")
    ax.set_title("Reliability on the test days")
    ax.tick_params(axis="x", labelrotation=30)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def policy_plot(policies: dict[str, dict[str, float]], path: Path) -> None:
    plt = _plt()
    names = list(policies)
    values = [policies[n]["oracle_egmv_per_1k"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    bars = ax.bar(names, values, color=["#888" if n != "ranker" else "#2a7" for n in names])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("Oracle E[GMV] per 1,000 impressions")
    ax.set_title("Policies on the test days (top 20)")
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ablation_plot(ablation: dict[str, dict[str, Any]], served: float, path: Path) -> None:
    """One bar per lever switched off alone, beside the served ranker."""
    plt = _plt()
    names = ["served ranker", *ablation]
    values = [served, *(a.get("oracle_egmv_per_1k", float("nan")) for a in ablation.values())]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    bars = ax.barh(names[::-1], values[::-1], color=["#888"] * len(ablation) + ["#2a7"])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_xlabel("Oracle E[GMV] per 1,000 impressions")
    ax.set_title("Ablation: each lever switched off alone, same requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ablation_lines(report: dict[str, Any]) -> list[str]:
    ablation = report.get("ablation")
    if not isinstance(ablation, dict) or not ablation:
        return []
    served = report.get("policies", {}).get("ranker", {}).get("oracle_egmv_per_1k")
    lines = [
        "## Ablation (Oracle, same requests, each lever switched off alone)",
        "",
        f"Served ranker: {_fmt(served)} E[GMV]/1k. ![ablation](ablation.png)",
        "",
        "| lever | what | E[GMV]/1k | change vs served | Oracle's best of those candidates |",
        "|---|---|---:|---:|---:|",
    ]
    for lever, a in ablation.items():
        change = a.get("change_vs_served")
        best = a.get("optimal_over_candidates")
        lines.append(
            f"| {lever} | {a.get('what', '')} | {_fmt(a.get('oracle_egmv_per_1k'))} | "
            f"{'n/a' if change is None else f'{change:+.1%}'} | "
            f"{'' if best is None else _fmt(best)} |"
        )
    return [*lines, ""]


def _fmt(x: Any) -> str:
    if x is None:  # not computable; the section's ``skipped`` entry says why
        return "n/a"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """eval.json plus eval.md (tables of the main figures) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2, default=json_default))
    lines = [
        f"# homefeed evaluation — preset {report.get('preset')}, bundle "
        f"{report.get('bundle_version')}",
        "",
    ]
    policies = report.get("policies", {})
    if policies:
        lines += [
            "## Policies (Oracle, test days, top 20)",
            "",
            "| policy | E[GMV]/1k | GMV/1k | purchases/1k | clicks/1k | new-seller share "
            "| categories in top 20 | personalisation | top item's page share |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, p in policies.items():
            lines.append(
                f"| {name} | {p['oracle_egmv_per_1k']:.1f} | {p['oracle_gmv_per_1k']:.1f} | "
                f"{p['oracle_purchases_per_1k']:.2f} | {p['oracle_clicks_per_1k']:.1f} | "
                f"{p['new_seller_share']:.3f} | {p['categories_in_top']:.2f} | "
                f"{p.get('personalisation', float('nan')):.3f} | "
                f"{p.get('top_item_page_share', float('nan')):.2f} |"
            )
        lines += [
            "",
            "Personalisation: 1 - the mean pairwise Jaccard overlap of the users' top-20 pages "
            "(one page per sampled user); top item's page share: the share of those pages "
            "holding the most common item.",
        ]
        lines.append("")
    lines += _ablation_lines(report)
    lines += _ope_lines(report.get("ope"), report.get("ope_open_bandit"))
    for section in (
        "targets",
        "ranking",
        "calibration",
        "retrieval",
        "compiled",
        "lightgbm",
        "segments",
        "complete_journey",
        "peak_rss_mb",
    ):
        block = report.get(section)
        if not isinstance(block, dict) or not block:
            continue
        lines += [
            f"## {section.replace('_', ' ').capitalize()}",
            "",
            "| key | value |",
            "|---|---|",
        ]
        for key, value in block.items():
            if isinstance(value, dict | list):
                value = json.dumps(value, default=json_default)[:200]
            lines.append(f"| {key} | {_fmt(value)} |")
        lines.append("")
    (out_dir / "eval.md").write_text("\n".join(lines))


OPE_ROWS = ("ips", "snips", "dr", "dr_os", "dm")


def _ope_table(section: dict[str, Any], header: str) -> list[str]:
    lines = [
        f"| {header} | estimate | 95 % interval | ESS | truth | relative error | covers |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in OPE_ROWS:
        e = section.get(name)
        if not isinstance(e, dict):
            continue
        lines.append(
            f"| {name} | {_fmt(e['estimate'])} | {_fmt(e['ci_low'])} .. {_fmt(e['ci_high'])} | "
            f"{_fmt(e['ess'])} | {_fmt(e['oracle'])} | {e['relative_error']:+.1%} | "
            f"{'yes' if e['covers'] else 'no'} |"
        )
    return [*lines, ""]


def _ope_lines(ope: dict[str, Any] | None, obd: dict[str, Any] | None) -> list[str]:
    """The off-policy estimates against the truth (``training.ope_eval``)."""
    lines: list[str] = []
    if isinstance(ope, dict) and "dr" in ope:
        d = ope.get("diagnostics", {})
        lines += [
            "## Off-policy evaluation of the ranker from the heuristic's logs",
            "",
            f"E[margin-GMV] per 1,000 impressions (top {d.get('slots')}) on "
            f"{d.get('requests')} logged test-day requests; truth = the Oracle's value of the "
            "ranker's pages for the same requests. Position-based (independent) weights; "
            "dm = DR's reward model alone.",
            "",
            *_ope_table(ope, "estimator"),
            f"Matched slots {d.get('matched_slots')} ({d.get('matched_slots_with_reward')} "
            f"with a purchase); the heuristic could have shown the ranker's item in its slot "
            f"for {_fmt(d.get('support_share'))} of the slots "
            f"({_fmt(d.get('support_value_share'))} of the direct method's value).",
            "",
        ]
        part = ope.get("supported")
        if isinstance(part, dict):
            lines += [
                "Where the log can check the estimators: the ranker's slots the heuristic "
                f"could have filled with the same item ({_fmt(part['slot_share'])} of the slots, "
                f"{_fmt(part['oracle_share'])} of the Oracle's value). There IPS and DR are "
                "unbiased whatever the direct method; on the other slots DR is the direct "
                "method.",
                "",
                *_ope_table(part, "estimator (supported slots)"),
            ]
    if isinstance(obd, dict) and "dr" in obd:
        lines += [
            "## Off-policy evaluation on the Open Bandit sample",
            "",
            f"Bernoulli TS's click rate from the Random policy's {obd.get('random_rows')} rows "
            f"({obd.get('random_clicks')} clicks); truth = TS's logged click rate "
            f"({obd.get('ts_clicks')} clicks in {obd.get('ts_rows')} rows).",
            "",
            *_ope_table(obd, "estimator"),
        ]
    return lines


def json_default(x: Any) -> Any:
    """numpy scalars and arrays as plain JSON values; anything else as its str."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
