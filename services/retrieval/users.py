"""One user's online features (``services.common.users``), turned into the user tower's
input exactly as training did.

Training rows carry the user views through Feast's point-in-time join, with missing values
filled by ``training.dataset.fill_defaults`` (``feature_repo.schema.DEFAULTS``, else 0 or
"unknown") and a missing affinity vector read as the uniform ``1 / n_categories``
(``training.retrieval.features.AffinitySnapshots.at``); :func:`tower_input` applies the
same rules to the online row. A user is *unknown* when ``user_profile`` has no row: the
tower never saw such a user's profile, so retrieval serves context popularity instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from contract.tower import InputSpec
from feature_repo import schema as S
from services.common.errors import FailedPrecondition
from services.common.online import default_value
from services.common.users import KIND_OF, USER_VIEWS, ViewRows


def check_spec(spec: InputSpec) -> None:
    """FailedPrecondition when the tower reads a feature the user views do not have."""
    unknown = [name for name in spec.feature_names if name not in KIND_OF]
    if unknown:
        raise FailedPrecondition(
            f"the user tower reads {unknown}, which no user view "
            f"({', '.join(USER_VIEWS)}) defines: the bundle and feature_repo/schema.py differ"
        )


# what training fills for a missing value of each user feature, worked out once
_DEFAULTS = {name: default_value(name, kind) for name, kind in KIND_OF.items()}


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
    vector = values.get(spec.vector)
    if vector is None or len(vector) == 0:
        out[spec.vector] = np.full(spec.vector_dim, 1.0 / spec.vector_dim, dtype=np.float32)
    elif len(vector) != spec.vector_dim:
        raise FailedPrecondition(
            f"the online store's {spec.vector} has {len(vector)} entries, the user tower "
            f"takes {spec.vector_dim}: the bundle was trained on another catalog"
        )
    else:
        out[spec.vector] = np.asarray(vector, dtype=np.float32)
    return out
