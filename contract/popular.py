"""The popularity lists of a bundle (``retrieval/popular.json``, written by
``training.retrieval.popular``): what retrieval serves a user the tower cannot serve, and the
gateway's fallback when retrieval is down.

Layout (format 2)::

    {"format": 2, "k": 500, "window": {"start": ..., "end": ...},
     "segment_key": "<country>/<device>", "weights": {...}, "min_support": {...},
     "overall": [item_id, ...],                      # the global list
     "countries": {"GB": [item_id, ...], ...},      # countries with enough support
     "segments": {"GB/unknown": [item_id, ...], ...},  # (country, device) with enough support
     "support": {"GB": {"users": ..., "events": ...}, "GB/unknown": {...}, ...}}

A request reads the first non-empty list of: its ``<country>/<device>`` segment, its
country, the global list (:func:`resolve`). So a country or device the bundle has never seen
gets the global list, never an empty one. Format 1 (no ``format`` key, no ``countries``:
bundles built before the dataset's own segments) still loads and resolves segment -> global;
a format newer than :data:`FORMAT` is refused with a message that says so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sized
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 2  # what training writes; this reader understands 1..FORMAT

# the level a request's list was found at (:func:`resolve`)
SEGMENT = "segment"
COUNTRY = "country"
GLOBAL = "global"


def segment_key(country: str, device: str) -> str:
    return f"{country}/{device}"


def resolve(
    segments: Mapping[str, Sized], countries: Mapping[str, Sized], country: str, device: str
) -> tuple[str, str]:
    """``(level, key)`` of the list a request from ``country``/``device`` reads: its segment,
    else its country, else the global list (key ``""``); an empty list counts as absent."""
    key = segment_key(country, device)
    if len(segments.get(key, ())):
        return SEGMENT, key
    if len(countries.get(country, ())):
        return COUNTRY, country
    return GLOBAL, ""


class PopularityLists:
    """The bundle's ``retrieval/popular.json`` as int64 arrays: a list per
    ``<country>/<device>`` segment, per country, and a global (``overall``) list for any
    other context (module docstring)."""

    def __init__(
        self,
        overall: np.ndarray,
        segments: Mapping[str, np.ndarray],
        countries: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.overall = overall
        self.segments = dict(segments)
        self.countries = dict(countries or {})

    @classmethod
    def from_json(cls, data: Any, source: str = "popular.json") -> PopularityLists:
        """ValueError naming ``source`` when the format, the structure or an id is not what
        the training stage writes."""
        if not isinstance(data, dict) or not isinstance(data.get("segments"), dict):
            raise ValueError(f"{source} must be an object with 'overall' and 'segments' lists")
        version = data.get("format", 1)
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT:
            raise ValueError(
                f"{source} has format {version!r}; this reader understands formats 1..{FORMAT}: "
                "serve the bundle with the homefeed release that built it, or rebuild it"
            )
        countries = data.get("countries", {})
        if not isinstance(countries, dict):
            raise ValueError(f"{source}: 'countries' must be an object of lists, got {countries!r}")

        def ids(key: str, value: Any) -> np.ndarray:
            if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
            ):
                raise ValueError(f"{source}: {key} must be a list of non-negative item ids")
            return np.asarray(value, dtype=np.int64)

        return cls(
            ids("overall", data.get("overall")),
            {str(k): ids(f"segments[{k!r}]", v) for k, v in data["segments"].items()},
            {str(k): ids(f"countries[{k!r}]", v) for k, v in countries.items()},
        )

    @classmethod
    def load(cls, path: Path) -> PopularityLists:
        return cls.from_json(json.loads(Path(path).read_text()), str(path))

    def resolve(self, country: str, device: str) -> tuple[str, str]:
        """``(level, key)`` of the list ``country``/``device`` reads (:func:`resolve`)."""
        return resolve(self.segments, self.countries, country, device)

    def lists(self) -> dict[tuple[str, str], np.ndarray]:
        """Every list by the ``(level, key)`` that :meth:`resolve` answers."""
        return {
            (GLOBAL, ""): self.overall,
            **{(COUNTRY, k): v for k, v in self.countries.items()},
            **{(SEGMENT, k): v for k, v in self.segments.items()},
        }

    def lookup(self, country: str, device: str) -> np.ndarray:
        """The list a request from ``country``/``device`` reads (module docstring)."""
        level, key = self.resolve(country, device)
        if level == SEGMENT:
            return self.segments[key]
        if level == COUNTRY:
            return self.countries[key]
        return self.overall
