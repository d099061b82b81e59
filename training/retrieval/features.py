"""The retrieval model's inputs: user features at request time and the item catalog.

User features come from the training rows (Feast's point-in-time join already put the
user_profile and user_recent_activity values, and the affinity's total, on every
impression), except the category-affinity input: the training set keeps only the
candidate's value, so the user's lists are joined here from the feature view's offline
source (``training.affinity``) by the rule Feast applies (the latest snapshot stamped at or
before the request, no older than the view's TTL; none: no engagement) and summed into the
tower's ``contract.affinity.bucket_count`` buckets, one batch of rows at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from contract import affinity
from contract import columns as C
from contract.timeutil import to_ns
from contract.tower import InputSpec
from feature_repo import schema as S
from training.affinity import AffinitySnapshots
from training.tables import vectors_to_matrix

log = logging.getLogger(__name__)

USER_VIEWS = (S.USER_PROFILE, S.USER_RECENT_ACTIVITY)
VOCABULARIES: dict[str, tuple[str, ...]] = {C.COUNTRY: C.COUNTRIES, C.DEVICE: C.DEVICES}
LABELS = (C.LABEL_CLICK, C.LABEL_ATC, C.LABEL_PURCHASE)


def user_input_spec(n_categories: int) -> InputSpec:
    """Every scalar of the user views (numeric: log1p; string: one-hot), the affinity's
    total and its bucketed lists (``contract.affinity``)."""
    numeric: list[str] = []
    categorical: list[tuple[str, tuple[str, ...]]] = []
    for view in USER_VIEWS:
        for name, kind in S.FEATURES[view].items():
            if kind == "string":
                if name not in VOCABULARIES:
                    raise ValueError(f"no vocabulary for the string feature {name!r}")
                categorical.append((name, VOCABULARIES[name]))
            else:
                numeric.append(name)
    numeric.append(S.AFFINITY_TOTAL)
    return InputSpec(
        tuple(numeric),
        tuple(categorical),
        affinity.BUCKETS,
        affinity.bucket_count(n_categories),
    )


def user_features(
    rows: pd.DataFrame, spec: InputSpec, snapshots: AffinitySnapshots
) -> dict[str, np.ndarray]:
    """The feature dict :meth:`InputSpec.encode` takes, one entry per row of ``rows``."""
    out: dict[str, np.ndarray] = {name: rows[name].to_numpy() for name in spec.numeric}
    for name, _ in spec.categorical:
        out[name] = rows[name].to_numpy()
    out[spec.vector] = snapshots.buckets_at(
        rows[C.USER_ID].to_numpy(), to_ns(rows[C.EVENT_TIMESTAMP]), spec.vector_dim
    )
    return out


def read_split(training_dir: Path, split: str, spec: InputSpec) -> pd.DataFrame:
    """The columns of one training-set split that retrieval reads."""
    keep = [C.REQUEST_ID, C.USER_ID, C.ITEM_ID, C.EVENT_TIMESTAMP, C.POLICY, *LABELS]
    keep += [name for name in spec.feature_names if name != spec.vector]
    return pd.read_parquet(training_dir / f"{split}.parquet", columns=keep)


def positive(rows: pd.DataFrame) -> np.ndarray:
    """Rows with any engagement: a click, an add-to-cart or a purchase."""
    return np.asarray((rows[list(LABELS)].to_numpy() > 0).any(axis=1), dtype=bool)


@dataclass(frozen=True)
class Catalog:
    """Every listed item, in the order of the items table (the order of the ANN rows)."""

    item_ids: np.ndarray  # int64
    content: np.ndarray  # (items, content_dim) float32
    category: np.ndarray  # int64
    price: np.ndarray  # float64
    n_categories: int
    margin: np.ndarray | None = None  # float64; None: the items table has no margin column

    @classmethod
    def from_items(cls, items: pd.DataFrame) -> Catalog:
        category = items[C.CATEGORY].to_numpy(np.int64)
        ids = items[C.ITEM_ID].to_numpy(np.int64)
        if len(np.unique(ids)) != len(ids):
            raise ValueError("the items table has duplicate item ids")
        return cls(
            item_ids=ids,
            content=vectors_to_matrix(items[C.CONTENT]),
            category=category,
            price=items[C.PRICE].to_numpy(np.float64),
            n_categories=int(category.max()) + 1 if len(category) else 1,
            margin=items[C.MARGIN].to_numpy(np.float64) if C.MARGIN in items else None,
        )

    def __len__(self) -> int:
        return len(self.item_ids)

    def rows_of(self, item_ids: np.ndarray) -> np.ndarray:
        """Catalog row of each id; -1 for an id the catalog does not list."""
        return np.asarray(pd.Index(self.item_ids).get_indexer(pd.Index(item_ids)), dtype=np.int64)
