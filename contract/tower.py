"""The user tower in pure numpy: input encoding, normalisation and the MLP forward pass.

Serving loads ``retrieval/user_tower.npz`` with :meth:`UserTower.load` and calls
:meth:`UserTower.embed` with the user's features as Feast returns them (defaults already
filled as in ``feature_repo.schema.DEFAULTS``). Training encodes its rows with the same
:meth:`InputSpec.encode`, so the two sides cannot drift apart: the only thing the torch
model adds is the weights.

Encoding, column by column (``InputSpec.input_names`` gives the order):

- every numeric feature: ``log1p(max(x, 0))`` (counts, amounts and day counts are all
  non-negative and heavy-tailed);
- every categorical feature: a one-hot over its vocabulary plus a last ``other`` column
  for any value outside it (``unknown`` included);
- the category-affinity input (``contract.affinity.buckets``: the user's engagement
  weights summed into at most 256 buckets, smoothed toward uniform):
  ``log(max(a, 1e-6))``, one column per bucket.

The encoded matrix is then standardised with the training rows' mean and standard
deviation (stored in the file) and fed through ``Linear → ReLU → … → Linear``.

**Value-aware retrieval** (:func:`with_value_column`, :func:`item_value`): a bundle may append
one column to both sides, the constant ``w`` to every user vector (a last layer output with
zero weights and bias ``w``) and ``log(price x margin)`` to every item embedding, so that the
inner product the index searches is ``taste + w x log(value)``. The tower's logits estimate
``log p(engagement | user)`` up to a per-user constant (sampled softmax with the logQ
correction), so with ``w = 1`` the index ranks by the log of an expected value; the weight is
chosen on the validation days. ``retrieval/config.json`` records the column
(``embeddings.value_columns``) so that cosine uses of the embeddings leave it out.

This module imports only numpy and the standard library.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SPEC_VERSION = 2  # 2: the affinity input is bucketed sparse lists, not a dense vector
AFFINITY_FLOOR = 1e-6
OTHER = "other"

Features = Mapping[str, Any]


@dataclass(frozen=True)
class InputSpec:
    """Which user features the tower reads and how each becomes input columns."""

    numeric: tuple[str, ...]
    categorical: tuple[tuple[str, tuple[str, ...]], ...]  # (feature, vocabulary)
    vector: str
    vector_dim: int

    @property
    def input_names(self) -> list[str]:
        names = list(self.numeric)
        for name, vocab in self.categorical:
            names += [f"{name}={value}" for value in vocab] + [f"{name}={OTHER}"]
        names += [f"{self.vector}[{i}]" for i in range(self.vector_dim)]
        return names

    @property
    def feature_names(self) -> list[str]:
        """The keys :meth:`encode` needs."""
        return [*self.numeric, *(name for name, _ in self.categorical), self.vector]

    def encode(self, features: Features) -> np.ndarray:
        """``(n, len(input_names))`` float32 inputs of ``n`` users.

        Scalars may be 0-d (one user) or 1-D of length ``n``; the vector feature is
        ``(vector_dim,)`` for one user or ``(n, vector_dim)``.
        """
        missing = [name for name in self.feature_names if name not in features]
        if missing:
            raise ValueError(
                f"user features missing: {missing}; the tower needs {self.feature_names}"
            )
        vectors = np.asarray(features[self.vector], dtype=np.float64)
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        if vectors.ndim != 2 or vectors.shape[1] != self.vector_dim:
            raise ValueError(
                f"{self.vector} must have shape (n, {self.vector_dim}), got {vectors.shape}"
            )
        n = vectors.shape[0]
        blocks: list[np.ndarray] = []
        for name in self.numeric:
            values = _column(features[name], n, name).astype(np.float64)
            blocks.append(np.log1p(np.maximum(values, 0.0))[:, None])
        for name, vocab in self.categorical:
            values = _column(features[name], n, name).astype(str)
            onehot = values[:, None] == np.asarray(vocab, dtype=str)[None, :]
            other = ~onehot.any(axis=1, keepdims=True)
            blocks.append(np.concatenate([onehot, other], axis=1).astype(np.float64))
        blocks.append(np.log(np.maximum(vectors, AFFINITY_FLOOR)))
        out = np.concatenate(blocks, axis=1)
        bad = ~np.isfinite(out).all(axis=1)
        if bad.any():
            raise ValueError(
                f"user features of rows {np.flatnonzero(bad)[:10].tolist()} are not finite; "
                "fill feature_repo.schema.DEFAULTS before embedding"
            )
        return out.astype(np.float32)

    def is_one_user(self, features: Features) -> bool:
        """Scalars and a 1-D vector: one user's features, as serving holds them."""
        if any(name not in features for name in self.feature_names):
            return False
        return np.ndim(features[self.vector]) == 1 and all(
            np.ndim(features[name]) == 0 for name in self.feature_names[:-1]
        )

    def encode_one(self, features: Features) -> np.ndarray:
        """``encode`` of one user given as scalars (and the vector), the same numbers with
        a handful of numpy calls instead of a few per feature: what serving runs per
        request."""
        missing = [name for name in self.feature_names if name not in features]
        if missing:
            raise ValueError(
                f"user features missing: {missing}; the tower needs {self.feature_names}"
            )
        vector = np.asarray(features[self.vector], dtype=np.float64)
        if vector.shape != (self.vector_dim,):
            raise ValueError(
                f"{self.vector} must have shape ({self.vector_dim},), got {vector.shape}"
            )
        numbers = np.array([float(features[name]) for name in self.numeric], dtype=np.float64)
        hot: list[float] = []
        for name, vocab in self.categorical:
            value = str(features[name])
            row = [1.0 if value == word else 0.0 for word in vocab]
            hot += [*row, 0.0 if 1.0 in row else 1.0]
        out = np.concatenate(
            [
                np.log1p(np.maximum(numbers, 0.0)),
                np.asarray(hot, dtype=np.float64),
                np.log(np.maximum(vector, AFFINITY_FLOOR)),
            ]
        )
        if not np.isfinite(out).all():
            raise ValueError(
                "user features of rows [0] are not finite; fill feature_repo.schema.DEFAULTS "
                "before embedding"
            )
        return out.astype(np.float32)[None, :]

    def to_dict(self) -> dict[str, Any]:
        return {
            "numeric": list(self.numeric),
            "categorical": [[name, list(vocab)] for name, vocab in self.categorical],
            "vector": self.vector,
            "vector_dim": self.vector_dim,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputSpec:
        return cls(
            numeric=tuple(d["numeric"]),
            categorical=tuple((name, tuple(vocab)) for name, vocab in d["categorical"]),
            vector=str(d["vector"]),
            vector_dim=int(d["vector_dim"]),
        )


def _column(value: Any, n: int, name: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim == 0:
        arr = np.full(n, arr.item(), dtype=arr.dtype)
    if arr.shape != (n,):
        raise ValueError(f"feature {name!r} must have shape ({n},), got {arr.shape}")
    return arr


@dataclass(frozen=True)
class UserTower:
    """An MLP user tower: ``embed(features) -> (n, dim)`` float32.

    ``weights[k]`` has shape ``(in, out)`` (``x @ W + b``, the transpose of torch's
    ``Linear.weight``); ReLU follows every layer but the last.
    """

    spec: InputSpec
    mean: np.ndarray
    std: np.ndarray
    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        width = len(self.spec.input_names)
        if self.mean.shape != (width,) or self.std.shape != (width,):
            raise ValueError(
                f"mean/std must have shape ({width},), got {self.mean.shape}/{self.std.shape}"
            )
        if len(self.weights) != len(self.biases) or not self.weights:
            raise ValueError("a tower needs one bias per weight matrix and at least one layer")
        for w, b in zip(self.weights, self.biases, strict=True):
            if w.shape[0] != width or b.shape != (w.shape[1],):
                raise ValueError(
                    f"layer shapes do not chain: weight {w.shape} after width {width}, "
                    f"bias {b.shape}"
                )
            width = w.shape[1]

    @property
    def dim(self) -> int:
        return int(self.weights[-1].shape[1])

    def encode(self, features: Features) -> np.ndarray:
        return self.spec.encode(features)

    def embed(self, features: Features | np.ndarray) -> np.ndarray:
        """Embeddings of users given as a feature dict, or as an already encoded
        ``(n, len(spec.input_names))`` matrix (the output of :meth:`encode`)."""
        if isinstance(features, np.ndarray):
            x = features
            if x.ndim != 2 or x.shape[1] != len(self.spec.input_names):
                raise ValueError(
                    f"encoded users must have shape (n, {len(self.spec.input_names)}), "
                    f"got {x.shape}"
                )
        elif self.spec.is_one_user(features):
            x = self.spec.encode_one(features)
        else:
            x = self.encode(features)
        h = (x.astype(np.float64) - self.mean) / self.std
        last = len(self.weights) - 1
        for k, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w + b
            if k < last:
                h = np.maximum(h, 0.0)
        return h.astype(np.float32)

    def save(self, path: Path) -> None:
        arrays: dict[str, np.ndarray] = {
            "spec": np.asarray(json.dumps({"version": SPEC_VERSION, **self.spec.to_dict()})),
            "mean": self.mean,
            "std": self.std,
        }
        for k, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            arrays[f"w{k}"] = w
            arrays[f"b{k}"] = b
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        path.write_bytes(buffer.getvalue())

    @classmethod
    def load(cls, path: Path | str) -> UserTower:
        with np.load(path, allow_pickle=False) as z:
            spec = json.loads(str(z["spec"]))
            if spec.get("version") != SPEC_VERSION:
                raise ValueError(
                    f"{path}: user tower format version {spec.get('version')}, "
                    f"this code reads {SPEC_VERSION}"
                )
            n_layers = sum(1 for key in z.files if key.startswith("w"))
            return cls(
                spec=InputSpec.from_dict(spec),
                mean=z["mean"].astype(np.float64),
                std=z["std"].astype(np.float64),
                weights=tuple(z[f"w{k}"].astype(np.float64) for k in range(n_layers)),
                biases=tuple(z[f"b{k}"].astype(np.float64) for k in range(n_layers)),
            )


VALUE_FLOOR = 1e-3  # the smallest price x margin the value column takes the log of
# the default weight of the value column, chosen on sim-small's validation days
# (docs/models.md; ``tools.bench_levers --served-sweep`` ``retrieval_value@<w>``)
VALUE_WEIGHT = 2.0


def value_columns(settings: Mapping[str, Any]) -> int:
    """How many last columns of a bundle's embeddings are the value column (0 or 1), from
    its ``retrieval/config.json``; 0 for bundles from before value-aware retrieval."""
    return int(settings.get("embeddings", {}).get("value_columns", 0))


def item_value(price: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """``log(max(price x margin, VALUE_FLOOR))`` per item, float32: the item side of the
    value column (module docstring)."""
    value = np.asarray(price, dtype=np.float64) * np.asarray(margin, dtype=np.float64)
    value = np.where(np.isfinite(value), value, VALUE_FLOOR)
    return np.log(np.maximum(value, VALUE_FLOOR)).astype(np.float32)


def with_value_column(tower: UserTower, weight: float) -> UserTower:
    """``tower`` whose output gains a last column equal to ``weight`` for every user (a last
    layer output with zero weights and bias ``weight``): the user side of the value column."""
    if not np.isfinite(weight) or weight < 0:
        raise ValueError(f"the value weight must be a finite number >= 0, got {weight!r}")
    last_w, last_b = tower.weights[-1], tower.biases[-1]
    weights = (*tower.weights[:-1], np.hstack([last_w, np.zeros((last_w.shape[0], 1))]))
    biases = (*tower.biases[:-1], np.concatenate([last_b, [float(weight)]]))
    return UserTower(tower.spec, tower.mean, tower.std, weights, biases)
