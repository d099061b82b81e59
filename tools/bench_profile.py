"""Issue 13: how well do the user features read the hidden user? Scored against the simulator.

``python -m tools.bench_profile [--dataset sim-small] [--users 1500]`` (after ``make demo``)
takes the user features as of the test period's first day (the training sets' manifest
``split.valid_end``) for a sample of the users with a content profile then (seed 0), and
compares them with the ground truth's hidden user:

- **taste**: per user, the Spearman rank correlation, over a fixed random probe of
  :data:`PROBE` catalogue items, between a profile's cosine with each item's unit content
  and the true affinity (the user's taste . the item's latent vector), for:

  - ``served``: the ``user_content_profile`` row the feature build wrote, against the
    items' unit rows in the catalogue's content space (what the ranker's
    ``content_affinity_for_item`` and the PROFILE source read);
  - ``engagement``: the profile of clicks (1) and purchases (``PURCHASE_WEIGHT``) alone, in
    the raw content (the rule before the eighth stop);
  - ``engagement+organic``: plus every organic impression (``content.ORGANIC_WEIGHT``),
    still in the raw content;
  - ``engagement+organic, content space``: the same items in the catalogue's
    ``contract.content.ContentSpace``: the served rule, recomputed here from the raw tables
    (``served`` must equal it).

- **budget**: the Pearson correlation, over the sampled users with a value, between the
  user's log budget and ``log(avg_price_paid_30d)`` (the served feature: purchases only),
  and the mean log price of the profile's items weighted as the profile weighs them
  (clicks, purchases and organic impressions; a measured signal, not a feature: as a
  ranker feature it cost 7 % of E[GMV] on sim-small, docs/models.md).

- **evidence**: how far the served cosine can be trusted as the profile's evidence grows:
  per user, the slope of the true affinity on the served cosine over the probe, averaged
  per band of ``content_profile_weight``, and the fit of ``a x w / (w + half)`` to the
  slopes: the curve ``contract.content.evidence_shrink`` gives the ranker's
  ``content_affinity_expected`` (the served weight is checked against the recomputed one
  too).

Writes ``reports/profile_quality.json`` and prints a table. Figures are means and medians
over users; there is no model in them, only how much of the user the features hold.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from scipy import optimize, stats

from contract import affinity, content
from contract import columns as C
from contract.timeutil import to_ns
from feature_repo import schema as S
from tools.offline_bench import arguments, paths_of, write_report
from training.stages import Paths, held_out_period, read_manifest

PROBE = 2000  # catalogue items each user's rank correlation is taken over
WEIGHT_BANDS = (0.0, 10.0, 20.0, 40.0, 80.0, float("inf"))  # content_profile_weight bands


def _events(raw: Path, start: pd.Timestamp, at: pd.Timestamp) -> pd.DataFrame:
    """(user_id, item_id, engagement weight, organic) of every impression in [start, at)
    with a click or purchase in [start, at), or organic."""
    imp = pd.read_parquet(
        raw / f"{C.IMPRESSIONS}.parquet",
        columns=[C.IMPRESSION_ID, C.USER_ID, C.ITEM_ID, C.POLICY, C.TS],
    ).set_index(C.IMPRESSION_ID)
    parts = []
    for table, weight in ((C.CLICKS, 1.0), (C.PURCHASES, affinity.PURCHASE_WEIGHT)):
        df = pd.read_parquet(raw / f"{table}.parquet", columns=[C.IMPRESSION_ID, C.TS])
        df = df[(df[C.TS] >= start) & (df[C.TS] < at)]
        parts.append(
            imp.loc[df[C.IMPRESSION_ID].to_numpy(), [C.USER_ID, C.ITEM_ID]].assign(
                engaged=weight, organic=0.0
            )
        )
    ts = to_ns(imp[C.TS])
    in_window = (ts >= start.value) & (ts < at.value)
    organic = imp[in_window & (imp[C.POLICY] == C.POLICY_ORGANIC).to_numpy()]
    parts.append(organic[[C.USER_ID, C.ITEM_ID]].assign(engaged=0.0, organic=1.0))
    return pd.concat(parts, ignore_index=True)


def _served(
    features: Path, at: pd.Timestamp
) -> tuple[dict[int, tuple[np.ndarray, float]], pd.DataFrame]:
    """The content profiles (with their ``content_profile_weight``) and user profile rows of
    the snapshot at ``at``."""
    table = pq.read_table(
        features / f"{S.USER_CONTENT_PROFILE}.parquet",
        filters=[(S.EVENT_TIMESTAMP, "==", at)],
        columns=[C.USER_ID, S.CONTENT_PROFILE, S.CONTENT_PROFILE_WEIGHT],
    ).to_pandas()
    profiles = {
        int(u): (np.asarray(p, np.float32), float(w))
        for u, p, w in zip(
            table[C.USER_ID],
            table[S.CONTENT_PROFILE],
            table[S.CONTENT_PROFILE_WEIGHT],
            strict=True,
        )
        if p is not None and len(p)
    }
    users = pd.read_parquet(
        features / f"{S.USER_PROFILE}.parquet", filters=[(S.EVENT_TIMESTAMP, "==", at)]
    ).set_index(C.USER_ID)
    return profiles, users


def _evidence(slopes: list[tuple[float, float]]) -> dict[str, Any]:
    """How far the served cosine can be trusted as the profile's evidence grows: the mean
    per-user slope of the true affinity on the cosine per band of ``content_profile_weight``,
    and the least-squares fit of ``a x w / (w + half)`` to the users' slopes
    (``contract.content.evidence_shrink`` uses ``PROFILE_EVIDENCE_HALF``)."""
    if len(slopes) < 10:
        return {}
    weight, slope = (np.array(v) for v in zip(*slopes, strict=True))
    bands = []
    for lo, hi in itertools.pairwise(WEIGHT_BANDS):
        mine = (weight > lo) & (weight <= hi)
        if mine.any():
            bands.append(
                {
                    "weight_above": lo,
                    "weight_to": hi,
                    "users": int(mine.sum()),
                    "mean_slope": float(slope[mine].mean()),
                }
            )
    try:
        (a, half), _ = optimize.curve_fit(
            lambda w, a, h: a * w / (w + h),
            weight,
            slope,
            p0=(1.0, content.PROFILE_EVIDENCE_HALF),
        )
    except (RuntimeError, ValueError):  # too few or too flat slopes to fit the curve
        a = half = float("nan")
    return {
        "bands": bands,
        "fit_scale": None if np.isnan(a) else float(a),
        "fit_half": None if np.isnan(half) else float(half),
        "served_half": content.PROFILE_EVIDENCE_HALF,
    }


def run(home: Path, dataset: str, n_users: int, seed: int = 0) -> dict[str, Any]:
    t0 = time.perf_counter()
    paths = Paths(home)
    npz = np.load(paths.ground_truth(dataset) / "ground_truth.npz")
    taste, latent, budget = npz["user_taste"], npz["item_latent"], npz["user_budget"]
    items = pd.read_parquet(paths.raw(dataset) / f"{C.ITEMS}.parquet")
    rows = content.table_content(items)
    if rows.shape[1] == 0:
        raise SystemExit(f"{dataset}'s items have no content: no profile to score")
    unit = content.unit_rows(rows)
    space = content.similarity_space(items[C.ITEM_ID].to_numpy(), rows)
    in_space = space.unit(rows)
    item_row = pd.Index(items[C.ITEM_ID].to_numpy())
    at, _ = held_out_period(read_manifest(paths, dataset))
    start = at - pd.Timedelta(days=content.WINDOW_DAYS)
    events = _events(paths.raw(dataset), start, at)
    served, users = _served(paths.features(dataset), at)
    rng = np.random.default_rng(seed)
    ids = np.array(sorted(served))
    sample = rng.choice(ids, size=min(n_users, len(ids)), replace=False)
    probe = rng.choice(len(items), size=min(PROBE, len(items)), replace=False)
    by_user = events[events[C.USER_ID].isin(sample)].groupby(C.USER_ID)
    served_rule = "engagement+organic, content space"
    rhos: dict[str, list[float]] = {
        "served": [],
        "engagement": [],
        "engagement+organic": [],
        served_rule: [],
    }
    mismatch = 0.0
    slopes: list[tuple[float, float]] = []  # (served weight, slope of truth on the cosine)
    log_price = np.log(items[C.PRICE].to_numpy(np.float64))
    typical: dict[int, float] = {}
    for key, mine in by_user:
        user = int(key)  # type: ignore[arg-type]
        at_items = item_row.get_indexer(pd.Index(mine[C.ITEM_ID].to_numpy()))
        truth = latent[probe] @ taste[user]
        engaged = mine["engaged"].to_numpy()
        both = engaged + content.ORGANIC_WEIGHT * mine["organic"].to_numpy()
        served_profile, served_weight = served[user]
        profiles = {
            "served": (served_profile, in_space),
            "engagement": (content.profile_of(unit[at_items], engaged), unit),
            "engagement+organic": (content.profile_of(unit[at_items], both), unit),
            served_rule: (content.profile_of(in_space[at_items], both), in_space),
        }
        got, want = profiles["served"][0], profiles[served_rule][0]
        gap = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
        mismatch = max(mismatch, gap, abs(served_weight - float(both.sum())))
        cosine = in_space[probe] @ served_profile
        if cosine.var() > 0:
            slopes.append((served_weight, float(np.cov(cosine, truth)[0, 1] / cosine.var())))
        for name, (profile, vectors) in profiles.items():
            if len(profile) == vectors.shape[1] and np.any(profile):
                rhos[name].append(float(stats.spearmanr(vectors[probe] @ profile, truth)[0]))
        typical[user] = float(both @ log_price[at_items] / both.sum())
    log_budget = pd.Series(np.log(budget[users.index.to_numpy()]), index=users.index)
    budget_corr = {}
    for name, values in (
        ("log(avg_price_paid_30d)", np.log(users["avg_price_paid_30d"].where(lambda v: v > 0))),
        ("mean log price of the profile's items", pd.Series(typical, dtype=float)),
    ):
        v = values.dropna()
        both_idx = v.index.intersection(pd.Index(sample))
        budget_corr[name] = {
            "users": len(both_idx),
            "pearson": float(stats.pearsonr(v[both_idx], log_budget[both_idx])[0])
            if len(both_idx) > 2
            else None,
        }
    return {
        "evidence": _evidence(slopes),
        "dataset": dataset,
        "snapshot": at.isoformat(),
        "users": len(sample),
        "probe_items": len(probe),
        "content_space_dim": space.dim,
        "served_vs_recomputed_max_abs": mismatch,
        "taste_spearman": {
            name: {
                "users": len(v),
                "mean": float(np.mean(v)) if v else None,
                "median": float(np.median(v)) if v else None,
            }
            for name, v in rhos.items()
        },
        "budget_pearson": budget_corr,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--users", type=int, default=1500)
    args = parser.parse_args(argv)
    paths = paths_of(args)
    report = run(paths.home, args.dataset, args.users)
    out = write_report(paths, "profile_quality.json", report)
    head = "taste: per-user Spearman vs true affinity"
    print(f"{head:46s} {'users':>6s} {'mean':>6s} {'median':>7s}")
    for name, row in report["taste_spearman"].items():
        if row["mean"] is not None:
            print(f"  {name:44s} {row['users']:6d} {row['mean']:6.3f} {row['median']:7.3f}")
    print(f"{'budget: Pearson with log budget':46s} {'users':>6s} {'r':>6s}")
    for name, row in report["budget_pearson"].items():
        r = "-" if row["pearson"] is None else f"{row['pearson']:.3f}"
        print(f"  {name:44s} {row['users']:6d} {r:>6s}")
    evidence = report["evidence"]
    if evidence:
        print(f"{'evidence: slope of true affinity on the cosine':46s} {'users':>6s} {'slope':>6s}")
        for band in evidence["bands"]:
            name = f"content_profile_weight in ({band['weight_above']:g}, {band['weight_to']:g}]"
            print(f"  {name:44s} {band['users']:6d} {band['mean_slope']:6.3f}")
        if evidence["fit_half"] is not None:
            print(
                f"  fit a * w / (w + half): a {evidence['fit_scale']:.2f}, half "
                f"{evidence['fit_half']:.1f} (served half {evidence['served_half']:g})"
            )
    print(
        f"served profile vs recomputed: max |diff| {report['served_vs_recomputed_max_abs']:.2e}; "
        f"content space {report['content_space_dim']}-d; {report['seconds']:.1f} s -> {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
