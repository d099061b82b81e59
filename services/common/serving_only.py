"""A service process runs without the training stack, as it does in a serving image.

The serving image installs only the serving dependency set (``[project] dependencies``):
no PyTorch, LightGBM, Optuna, scikit-learn, matplotlib, pandera or DuckDB, and none of
homefeed's ``training`` or ``tools``. A development environment has all of them, and some
libraries import what they find: Feast imports PyTorch whenever it is installed (about 2 s
and 300 MB per process). ``block_training_stack`` gives a service process the serving
image's view: importing any of those raises ``ImportError``, which such libraries take as
"not installed", and a homefeed module that really needs one fails at start, here, instead
of in production. Every ``python -m services.<name>`` calls it first.
"""

from __future__ import annotations

import sys

TRAINING_STACK = (
    "torch",
    "lightgbm",
    "optuna",
    "sklearn",
    "matplotlib",
    "pandera",
    "duckdb",
    "training",
    "tools",
)


def block_training_stack(modules: tuple[str, ...] = TRAINING_STACK) -> None:
    """Make ``import <module>`` fail for each of ``modules`` in this process; RuntimeError
    when one is imported already (the block would come too late to mean anything)."""
    loaded = [name for name in modules if sys.modules.get(name) is not None]
    if loaded:
        raise RuntimeError(f"block_training_stack() called after {loaded} were imported")
    for name in modules:
        sys.modules[name] = None  # type: ignore[assignment]
