"""The model bundle: one immutable, versioned directory holding everything serving loads,
and how a reader checks that it is intact before trusting any of it.

Layout (paths relative to the bundle root; every file is listed with its sha256 in
``bundle.json``, which serving verifies before it loads anything):

    bundle.json                  manifest: version, created_at, data snapshot, feature schema
                                 hash, label (what p is the probability of), metrics,
                                 files -> sha256
    feature_schema.json          ordered feature names, dtypes, hash (FeatureSchema)
    ranker/purchase.txt          LightGBM purchase-probability model (source of truth)
    ranker/lambdamart.txt        LightGBM LambdaMART model
    ranker/purchase.so           TL2cgen-compiled purchase model (the served scorer)
    ranker/compile.json          compile parameters, parity (max |diff|), latency figures
    ranker/calibrator.json       isotonic calibration: x / y breakpoints
    ranker/linear_offset.json    optional: the logistic log-odds the purchase trees were
                                 boosted from (contract.scorer.LinearOffset)
    ranker/evidence.json         optional: the E[GMV] shrink by the item's logged impressions
                                 (contract.scorer.EvidenceShrink)
    retrieval/user_tower.npz     user-tower weights for numpy inference
    retrieval/item_ids.npy       item id of each ANN row
    retrieval/item_embeddings.npy
    retrieval/scann/             ScaNN index (serialized)
    retrieval/config.json        tower and index parameters
    retrieval/popular.json       popularity lists by (country, device): cold start, fallback
    retrieval/history.npz        each user's engaged items before the test period (history source)
    catalog.npz                  the catalogue it was built for: item id, seller, category,
                                 price, margin, listing and seller-join times (contract.catalog)
    heuristic.json               the production heuristic's parameters (contract.heuristic)
    eval/                        eval.json, eval.md and plots of the run that made it

Serving reads everything it needs from here and the online store; never a dataset's raw
tables and never the simulator's configuration.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
_CHUNK = 1 << 20

BUNDLE_MANIFEST = "bundle.json"
FEATURE_SCHEMA = "feature_schema.json"
PURCHASE_MODEL = "ranker/purchase.txt"
LAMBDAMART_MODEL = "ranker/lambdamart.txt"
COMPILED_MODEL = "ranker/purchase.so"
COMPILE_REPORT = "ranker/compile.json"
CALIBRATOR = "ranker/calibrator.json"
LINEAR_OFFSET = "ranker/linear_offset.json"
# the two-stage purchase model's click stage (absent: the purchase model is one stage):
# served p = p(click) from these x p(label | click) from the purchase files above
CLICK_MODEL = "ranker/click.txt"
CLICK_COMPILED = "ranker/click.so"
CLICK_OFFSET = "ranker/click_offset.json"
EVIDENCE = "ranker/evidence.json"
USER_TOWER = "retrieval/user_tower.npz"
ITEM_IDS = "retrieval/item_ids.npy"
ITEM_EMBEDDINGS = "retrieval/item_embeddings.npy"
SCANN_DIR = "retrieval/scann"
RETRIEVAL_CONFIG = "retrieval/config.json"
POPULAR = "retrieval/popular.json"
HISTORY = "retrieval/history.npz"
CATALOG = "catalog.npz"
HEURISTIC = "heuristic.json"
EVAL_DIR = "eval"

# The outcome the ranker's probability is of (the training set's label, `homefeed dataset
# --label`), recorded in bundle.json as ``label`` so serving can say what its score means:
# p x price x margin is an expected GMV only when p is p(purchase).
LABEL_PURCHASE = "purchase"
LABEL_ADD_TO_CART = "add_to_cart"
LABEL_CLICK = "click"
LABEL_KINDS = (LABEL_PURCHASE, LABEL_ADD_TO_CART, LABEL_CLICK)
# what a bundle without a ``label`` entry was trained on (every bundle before the choice)
DEFAULT_LABEL_WINDOW_DAYS = 7

REGISTERED_MODEL = "homefeed-ranker"
ALIAS_CHAMPION = "champion"
ALIAS_CHALLENGER = "challenger"


class BundleError(ValueError):
    """A bundle that must not be loaded: not intact, or built for another feature schema."""

    grpc_status_name: ClassVar[str] = "FAILED_PRECONDITION"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_checksums(bundle_dir: Path) -> dict[str, str]:
    """sha256 of every file under ``bundle_dir`` except the manifest, by relative POSIX path
    in sorted order."""
    bundle_dir = Path(bundle_dir)
    found = sorted(
        p.relative_to(bundle_dir).as_posix()
        for p in bundle_dir.rglob("*")
        if p.is_file() or p.is_symlink()
    )
    return {rel: sha256_file(bundle_dir / rel) for rel in found if rel != BUNDLE_MANIFEST}


def score_meaning(kind: str) -> str:
    """What the served score ``p x price x margin`` is when p is p(``kind``)."""
    if kind == LABEL_PURCHASE:
        return "expected GMV: p(purchase) x price x margin"
    if kind == LABEL_ADD_TO_CART:
        return "expected carted value: p(add_to_cart) x price x margin, not GMV"
    if kind == LABEL_CLICK:
        return "expected clicked value: p(click) x price x margin, not GMV"
    raise ValueError(f"label must be one of {', '.join(LABEL_KINDS)}, got {kind!r}")


def label_entry(kind: str, window_days: int) -> dict[str, Any]:
    """bundle.json's ``label``: the outcome, the days after an impression it may come in, and
    what the served score then means."""
    return {"kind": kind, "window_days": int(window_days), "score": score_meaning(kind)}


def label_of(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest's ``label`` entry; purchase within 7 days for a bundle that predates it."""
    label = manifest.get("label")
    if isinstance(label, Mapping) and label.get("kind") in LABEL_KINDS:
        return label_entry(str(label["kind"]), int(label.get("window_days", 0)))
    return label_entry(LABEL_PURCHASE, DEFAULT_LABEL_WINDOW_DAYS)


def write_manifest(
    bundle_dir: Path,
    *,
    version: str,
    data_snapshot: str,
    feature_schema_hash: str,
    metrics: Mapping[str, Any],
    label: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Checksum every file of ``bundle_dir`` and write ``bundle.json``; returns the manifest.

    ``label`` is :func:`label_entry`'s; without it the entry is left out (readers take
    :func:`label_of`'s default). Call it last, once every other file is in place: a file added
    later makes the bundle fail verification as "extra".
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise FileNotFoundError(f"bundle directory not found: {bundle_dir}")
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "data_snapshot": data_snapshot,
        "feature_schema_hash": feature_schema_hash,
        **({"label": dict(label)} if label is not None else {}),
        "metrics": dict(metrics),
        "files": file_checksums(bundle_dir),
    }
    tmp = bundle_dir / f".{BUNDLE_MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    tmp.replace(bundle_dir / BUNDLE_MANIFEST)
    log.info("wrote manifest of bundle %s: %d files", version, len(manifest["files"]))
    return manifest


def read_manifest(bundle_dir: Path) -> dict[str, Any]:
    path = Path(bundle_dir) / BUNDLE_MANIFEST
    if not path.is_file():
        raise BundleError(f"{path} is missing: not a bundle, or an incomplete one")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BundleError(f"{path} has no 'files' table of checksums")
    return manifest


def verify_bundle(bundle_dir: Path, expected_schema_hash: str | None = None) -> dict[str, Any]:
    """Recompute every checksum and compare with ``bundle.json``; returns the manifest.

    Raises ``BundleError`` naming every missing, extra and modified file, or both schema
    hashes when ``expected_schema_hash`` is given and differs from the bundle's.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    _check_files(bundle_dir, manifest)
    check_schema(bundle_dir, manifest, expected_schema_hash)
    return manifest


def _check_files(bundle_dir: Path, manifest: Mapping[str, Any]) -> None:
    listed: dict[str, str] = manifest["files"]
    actual = file_checksums(bundle_dir)
    problems = [f"missing {p}" for p in sorted(listed.keys() - actual.keys())]
    problems += [f"extra {p}" for p in sorted(actual.keys() - listed.keys())]
    problems += [
        f"modified {p} (sha256 {actual[p][:12]}..., manifest says {listed[p][:12]}...)"
        for p in sorted(listed.keys() & actual.keys())
        if actual[p] != listed[p]
    ]
    if problems:
        raise BundleError(
            f"bundle {manifest.get('version', '?')} at {bundle_dir} does not match its "
            f"{BUNDLE_MANIFEST}: " + "; ".join(problems)
        )


def check_schema(bundle_dir: Path, manifest: Mapping[str, Any], expected: str | None) -> None:
    got = manifest.get("feature_schema_hash")
    schema_file = bundle_dir / FEATURE_SCHEMA
    if schema_file.exists():  # the schema shipped must be the one the manifest names
        shipped = json.loads(schema_file.read_text()).get("hash")
        if shipped != got:
            raise BundleError(
                f"bundle {manifest.get('version', '?')} at {bundle_dir}: {FEATURE_SCHEMA} has "
                f"hash {shipped}, {BUNDLE_MANIFEST} says {got}"
            )
    if expected is None:
        return
    if got != expected:
        raise BundleError(
            f"bundle {manifest.get('version', '?')} at {bundle_dir} was built for feature "
            f"schema {got}, expected {expected}"
        )
