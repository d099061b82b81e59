"""Where generated files live. Everything hangs off ``HOMEFEED_HOME`` (default: the repo root).

Generated data, models, registry files and reports are git-ignored; moving ``HOMEFEED_HOME``
moves all of them, which is how tests keep their files in a temporary directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Paths:
    """The folders of one homefeed home."""

    home: Path

    @classmethod
    def from_env(cls) -> Paths:
        return cls(Path(os.environ.get("HOMEFEED_HOME", REPO_ROOT)).resolve())

    @property
    def data(self) -> Path:
        return self.home / "data"

    def raw(self, dataset: str) -> Path:
        """Validated event tables of one dataset (``sim-small``, ``completejourney``...)."""
        return self.data / dataset / "raw"

    def features(self, dataset: str) -> Path:
        """Batch feature tables (Feast's offline store) of one dataset."""
        return self.data / dataset / "features"

    def training_sets(self, dataset: str) -> Path:
        return self.data / dataset / "training"

    def ground_truth(self, dataset: str) -> Path:
        """The simulator's hidden parameters: never read by a feature or training stage."""
        return self.data / dataset / "ground_truth"

    def eventlog(self, dataset: str) -> Path:
        """The served feeds and the events the frontends sent back (``LogEvents``)."""
        return self.data / dataset / "eventlog"

    def feast(self, dataset: str) -> Path:
        """Feast's file registry and SQLite online store of one dataset."""
        return self.data / dataset / "feast"

    @property
    def reports(self) -> Path:
        return self.home / "reports"

    @property
    def artifacts(self) -> Path:
        return self.home / "artifacts"
