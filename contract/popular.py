"""The popularity lists of a bundle (``retrieval/popular.json``, written by
``training.retrieval.popular``): what retrieval serves a user the tower cannot serve, and the
gateway's fallback when retrieval is down.

Layout::

    {"k": 500, "window": {"start": ..., "end": ...}, "segment_key": "<country>/<device>",
     "overall": [item_id, ...], "segments": {"US/ios": [item_id, ...], ...}}

A request whose (country, device) is not a segment reads ``overall``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def segment_key(country: str, device: str) -> str:
    return f"{country}/{device}"


class PopularityLists:
    """The bundle's ``retrieval/popular.json`` as int64 arrays: a list per
    ``<country>/<device>`` segment and an overall list for any other context (module docstring)."""

    def __init__(self, overall: np.ndarray, segments: Mapping[str, np.ndarray]) -> None:
        self.overall = overall
        self.segments = dict(segments)

    @classmethod
    def from_json(cls, data: Any, source: str = "popular.json") -> PopularityLists:
        """ValueError naming ``source`` when the structure or an id is not what the training
        stage writes."""
        if not isinstance(data, dict) or not isinstance(data.get("segments"), dict):
            raise ValueError(f"{source} must be an object with 'overall' and 'segments' lists")

        def ids(key: str, value: Any) -> np.ndarray:
            if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
            ):
                raise ValueError(f"{source}: {key} must be a list of non-negative item ids")
            return np.asarray(value, dtype=np.int64)

        overall = ids("overall", data.get("overall"))
        segments = {str(k): ids(f"segments[{k!r}]", v) for k, v in data["segments"].items()}
        return cls(overall, segments)

    @classmethod
    def load(cls, path: Path) -> PopularityLists:
        return cls.from_json(json.loads(Path(path).read_text()), str(path))

    def lookup(self, country: str, device: str) -> np.ndarray:
        return self.segments.get(segment_key(country, device), self.overall)
