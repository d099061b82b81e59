"""Loading a bundle's ScaNN index (``retrieval/scann/``), as training measured it and serving
searches it. Building and tuning the index is training's (``training.retrieval.ann``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_index(directory: Path) -> Any:
    import scann

    if not (directory / "scann_assets.pbtxt").exists():
        raise FileNotFoundError(f"no ScaNN index at {directory} (scann_assets.pbtxt missing)")
    return scann.scann_ops_pybind.load_searcher(str(directory))
