"""One user's online features (``services.common.users``), turned into the user tower's
input exactly as training did.

Training rows carry the user views' scalars through Feast's point-in-time join, with missing
values filled by ``training.dataset.fill_defaults`` (``feature_repo.schema.DEFAULTS``, else
0 or "unknown"); ``affinity_total`` is one of those scalars. The tower's vector input,
``contract.affinity.BUCKETS``, is not a view feature: it is derived from the sparse
``user_category_affinity`` row (``affinity_categories``, ``affinity_weights``,
``affinity_total``) by ``contract.affinity.buckets`` in training and
:func:`contract.affinity.buckets_one` here; a user without a row (empty lists, total 0)
reads the uniform vector. :func:`tower_input` applies the same rules to the online row. A
user is *unknown* when ``user_profile`` has no row: the tower never saw such a user's
profile, so retrieval serves context popularity instead.

The PROFILE source reads the ``user_content_profile`` row as it is (:func:`content_profile`);
``contract.content`` decides whether it is usable.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from contract import affinity
from contract.tower import InputSpec
from feature_repo import schema as S
from services.common.errors import FailedPrecondition
from services.common.online import default_value
from services.common.users import KIND_OF, SCALARS, USER_VIEWS, ViewRows


def check_spec(spec: InputSpec, n_categories: int | None = None) -> None:
    """FailedPrecondition when the tower reads a scalar the user views do not have, a vector
    other than ``contract.affinity.BUCKETS`` (a bundle trained on the dense affinity vector),
    or a vector whose width is not ``bucket_count(n_categories)`` (when given)."""
    if spec.vector != affinity.BUCKETS:
        raise FailedPrecondition(
            f"the user tower reads the vector {spec.vector[:60]!r}, this service builds "
            f"{affinity.BUCKETS!r} from the sparse category affinity: the bundle was trained "
            "before the affinity became sparse; retrain it"
        )
    scalars = (*spec.numeric, *(name for name, _ in spec.categorical))
    unknown = [name for name in scalars if name not in SCALARS]
    if unknown:
        raise FailedPrecondition(
            f"the user tower reads {unknown[:5]}, which no user view "
            f"({', '.join(USER_VIEWS)}) defines as a scalar: the bundle and "
            "feature_repo/schema.py differ"
        )
    want = affinity.bucket_count(n_categories) if n_categories is not None else None
    if not 1 <= spec.vector_dim <= affinity.MAX_BUCKETS or (
        want is not None and spec.vector_dim != want
    ):
        expected = f"{want}" if want is not None else f"1..{affinity.MAX_BUCKETS}"
        raise FailedPrecondition(
            f"the user tower's {affinity.BUCKETS} has {spec.vector_dim} entries, expected "
            f"{expected}: the bundle's tower and catalog differ"
        )


# what training fills for a missing value of each user feature, worked out once
_DEFAULTS = {name: default_value(name, kind) for name, kind in KIND_OF.items()}
_NO_CATEGORIES = np.empty(0, dtype=np.int64)
_NO_WEIGHTS = np.empty(0, dtype=np.float64)


def tower_input(rows: ViewRows, spec: InputSpec) -> dict[str, Any] | None:
    """The tower's feature dict of one user, or None for an unknown user (no profile row)."""
    if not rows.get(S.USER_PROFILE):
        return None
    values: dict[str, Any] = {}
    for view in USER_VIEWS:
        values.update({k: v for k, v in (rows.get(view) or {}).items() if v is not None})
    out = {
        name: values.get(name, _DEFAULTS[name])
        for name in (*spec.numeric, *(name for name, _ in spec.categorical))
    }
    categories = values.get(S.AFFINITY_CATEGORIES)
    weights = values.get(S.AFFINITY_WEIGHTS)
    categories = _NO_CATEGORIES if categories is None else categories
    weights = _NO_WEIGHTS if weights is None else weights
    if len(categories) != len(weights):
        raise FailedPrecondition(
            f"the online store's {S.AFFINITY_CATEGORIES} and {S.AFFINITY_WEIGHTS} are not "
            f"aligned: {len(categories)} categories, {len(weights)} weights"
        )
    total = values.get(S.AFFINITY_TOTAL, _DEFAULTS[S.AFFINITY_TOTAL])
    out[spec.vector] = affinity.buckets_one(categories, weights, total, spec.vector_dim)
    return out


def content_profile(rows: ViewRows) -> np.ndarray | None:
    """The user's ``content_profile`` (float32), None without a row or with an empty list."""
    profile = (rows.get(S.USER_CONTENT_PROFILE) or {}).get(S.CONTENT_PROFILE)
    if profile is None or not len(profile):
        return None
    return np.asarray(profile, dtype=np.float32)
