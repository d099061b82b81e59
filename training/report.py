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


def json_default(x: Any) -> Any:
    """numpy scalars and arrays as plain JSON values; anything else as its str."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
