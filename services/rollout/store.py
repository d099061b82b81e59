"""Where the rollout state lives and who may change it: two small interfaces and their local
implementations. ``kube.py`` implements both on a Kubernetes API server (a ConfigMap and a
Lease); the controller sees only these interfaces.

- ``StateStore``: ``load()`` the state document (None when there is none yet) and
  ``save()`` it whole. Only the leader saves.
- ``LeaderElection``: ``acquire()`` becomes (or stays) the leader and says whether this
  process leads now; called before every decision, so a controller that lost the lead stops
  deciding within one tick. ``release()`` gives the lead up on the way out.

Locally, ``FileStore`` writes the JSON document atomically (a temporary file renamed over
the old one, so a reader never sees half a document and a crash mid-write loses nothing),
and ``FileLock`` elects with an exclusive ``flock`` on a lock file: the kernel drops it when
the leader's process dies, so a restarted or second controller takes over at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import IO, Protocol

from services.rollout.state import RolloutState


class StoreError(RuntimeError):
    """The state could not be read or written (unreadable document, API error)."""


class StateStore(Protocol):
    def load(self) -> RolloutState | None:
        """The saved state, or None when nothing was saved yet; StoreError when unreadable."""
        ...

    def save(self, state: RolloutState) -> None:
        """Replace the saved state with ``state``; StoreError when it cannot."""
        ...

    def describe(self) -> str:
        """Where the state lives, for logs and errors."""
        ...


class LeaderElection(Protocol):
    def acquire(self) -> bool:
        """Become or stay the leader; True while this process leads."""
        ...

    def release(self) -> None:
        """Stop leading (another controller may take over at once)."""
        ...


def parse_state(text: str, where: str) -> RolloutState:
    try:
        return RolloutState.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError) as err:
        raise StoreError(f"{where} does not hold a rollout state: {err}") from None


def dump_state(state: RolloutState) -> str:
    return json.dumps(state.to_json(), indent=1, sort_keys=True) + "\n"


class FileStore:
    """The state as one JSON file, replaced atomically on every save."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def describe(self) -> str:
        return str(self.path)

    def load(self) -> RolloutState | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise StoreError(f"cannot read {self.path}: {err}") from None
        return parse_state(text, str(self.path))

    def save(self, state: RolloutState) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                f.write(dump_state(state))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreError(f"cannot write {self.path}: {err}") from None


class FileLock:
    """Leader election on one machine: an exclusive, non-blocking ``flock``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None

    def acquire(self) -> bool:
        if self._file is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a")  # noqa: SIM115 (held while leading, closed by release)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return False
        self._file = f
        return True

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
