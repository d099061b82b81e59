"""JSON-lines logs: one object per record on stderr, so a collector can parse every service
the same way.

Fields: ``ts`` (ISO 8601, UTC, milliseconds), ``level``, ``service``, ``logger``, ``msg``,
then whatever the call passed as ``extra`` (``rpc``, ``code``, ``ms``, ``request_id``...),
and ``exc`` with the traceback text when the record carries an exception.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_FIELDS = frozenset(logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, tz=UTC)
        out: dict[str, object] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (not the one at start), or to a given stream."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(stream)
        self._fixed = stream

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = self._fixed if self._fixed is not None else sys.stderr
        super().emit(record)


def configure_logging(service: str, level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send every log record of the process as JSON lines to stderr (or ``stream``).

    Idempotent: a second call replaces the handler the first one installed (so the level or
    service name can change) and never doubles the output. A plain stderr/stdout handler that
    ``logging.basicConfig`` installed (the CLI does) is replaced too, so records are not
    printed twice in two formats; other handlers (files, test capture) stay.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log level must be one of DEBUG, INFO, WARNING, ERROR, got {level!r}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        plain = type(handler) is logging.StreamHandler and handler.stream in (
            sys.stderr,
            sys.stdout,
        )
        if isinstance(handler, _StderrHandler) or plain:
            root.removeHandler(handler)
    handler = _StderrHandler(stream)
    handler.setFormatter(JsonFormatter(service))
    root.addHandler(handler)
    root.setLevel(numeric)
