"""A durable, append-only, idempotent event log: local segment files (the default) or a Redis
stream, chosen by ``open_event_log(url_or_path)``.

The contract both backends keep: a record is ``(event_id, payload)``; ``append(batch)``
returns only once the batch is durable, and answers per record ``True`` (written) or
``False`` (that event id is already in the log, or earlier in the same batch). A client that
retries a batch until it is acknowledged therefore stores every event exactly once.

Segment files (``SegmentLog``), in one directory:

- ``segment-<first sequence number, 20 digits>.log``, append-only; a record's sequence number
  is its position in the whole log (0, 1, 2, ...), never stored;
- a record is a header, little-endian ``magic (2 bytes) | payload length (u32) |
  crc32(event id bytes + payload) (u32) | event id length (u8)``, then the event id (UTF-8),
  then the payload;
- a batch is one ``write`` and one ``fsync`` into one segment; the log moves to a new segment
  (and fsyncs the directory) when the batch would take the current one past
  ``segment_bytes``, so a segment is larger only when one batch alone is;
- ``LOCK`` holds an exclusive ``flock`` for as long as a writer has the log open; readers
  (``read``) take no lock and may run in other processes while it appends.

Only the last segment can end in a torn record (a write cut short by a crash); opening the log
cuts it off. Anything not intact elsewhere is ``CorruptLogError``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar, Self
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

MAX_EVENT_ID_CHARS = 128
MAX_EVENT_ID_BYTES = 255  # UTF-8 bytes: the header's event id length is a u8
MAX_PAYLOAD_BYTES = 0xFFFF_FFFF  # the header's payload length is a u32
DEFAULT_SEGMENT_BYTES = 64 << 20
DEFAULT_STREAM = "homefeed:events"
LOCK_FILE = "LOCK"
REDIS_SCHEMES = ("redis", "rediss", "unix")

MAGIC = b"\xe7\x1e"
_HEADER = struct.Struct("<2sIIB")  # magic, payload length, crc32, event id length
_SEGMENT = re.compile(r"segment-(\d{20})\.log")
_READ_BUFFER = 1 << 20


class EventLogError(RuntimeError):
    """The event log cannot do what was asked (closed, failed, unreachable)."""

    grpc_status_name: ClassVar[str] = "UNAVAILABLE"


class CorruptLogError(EventLogError):
    """A record that must be intact is not: in a segment other than the last, where no crash
    can tear one, or a segment whose name does not match the records before it."""

    grpc_status_name: ClassVar[str] = "DATA_LOSS"


class LogLockedError(EventLogError):
    """Another open ``SegmentLog`` (in this process or another) holds the directory."""

    grpc_status_name: ClassVar[str] = "FAILED_PRECONDITION"


def check_event_id(event_id: object) -> bytes:
    """The event id's UTF-8 bytes; ``ValueError`` saying what is wrong with it otherwise."""
    if not isinstance(event_id, str):
        raise ValueError(f"event_id must be a str, got {type(event_id).__name__}")
    if not 1 <= len(event_id) <= MAX_EVENT_ID_CHARS:
        raise ValueError(
            f"event_id must be 1..{MAX_EVENT_ID_CHARS} characters, got {len(event_id)}"
        )
    try:
        encoded = event_id.encode()
    except UnicodeEncodeError as exc:
        raise ValueError(f"event_id must be encodable as UTF-8: {exc}") from None
    if len(encoded) > MAX_EVENT_ID_BYTES:
        raise ValueError(
            f"event_id must be at most {MAX_EVENT_ID_BYTES} bytes in UTF-8, "
            f"got {len(encoded)} for {event_id[:20]!r}..."
        )
    return encoded


@dataclass(frozen=True)
class _Record:
    event_id: str
    encoded_id: bytes
    payload: bytes


def _check_batch(records: Iterable[tuple[str, bytes]]) -> list[_Record]:
    """Every record checked before any is written: a bad record fails the whole batch."""
    batch = []
    for i, record in enumerate(records):
        try:
            event_id, payload = record
        except (TypeError, ValueError):
            raise ValueError(
                f"record {i} must be an (event_id, payload) pair, got {type(record).__name__}"
            ) from None
        try:
            encoded = check_event_id(event_id)
        except ValueError as exc:
            raise ValueError(f"record {i}: {exc}") from None
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise ValueError(f"record {i}: payload must be bytes, got {type(payload).__name__}")
        payload = bytes(payload)
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise ValueError(
                f"record {i}: payload must be at most {MAX_PAYLOAD_BYTES} bytes, got {len(payload)}"
            )
        batch.append(_Record(event_id, encoded, payload))
    return batch


def _frame(record: _Record) -> bytes:
    crc = zlib.crc32(record.payload, zlib.crc32(record.encoded_id))
    header = _HEADER.pack(MAGIC, len(record.payload), crc, len(record.encoded_id))
    return header + record.encoded_id + record.payload


# --- segment files -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Segment:
    path: Path
    first_seq: int


def _segments(directory: Path) -> list[_Segment]:
    found = []
    for path in directory.iterdir():
        m = _SEGMENT.fullmatch(path.name)
        if m:
            found.append(_Segment(path, int(m.group(1))))
    return sorted(found, key=lambda s: s.first_seq)


class _Scan:
    """The intact records of one segment file, up to ``size`` bytes, in order.

    Iteration stops at the end or at the first record that is not intact; then ``end`` is the
    offset just past the last intact record and ``problem`` says what was wrong (``None`` at a
    clean end).
    """

    def __init__(self, f: IO[bytes], size: int) -> None:
        self._f = f
        self._size = size
        self.end = 0
        self.problem: str | None = None

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        f, size = self._f, self._size
        f.seek(0)
        while self.end < size:
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size or self.end + _HEADER.size > size:
                self.problem = f"short header ({size - self.end} of {_HEADER.size} bytes)"
                return
            magic, payload_len, crc, id_len = _HEADER.unpack(header)
            if magic != MAGIC:
                self.problem = f"bad magic {magic.hex()}"
                return
            if id_len == 0:
                self.problem = "event id length 0"
                return
            record_end = self.end + _HEADER.size + id_len + payload_len
            if record_end > size:
                self.problem = f"short record ({record_end - size} bytes missing)"
                return
            body = f.read(id_len + payload_len)
            if len(body) < id_len + payload_len:
                self.problem = "short record (file shrank while reading)"
                return
            if zlib.crc32(body) != crc:
                self.problem = "crc32 mismatch"
                return
            try:
                event_id = body[:id_len].decode()
            except UnicodeDecodeError:
                self.problem = "event id is not UTF-8"
                return
            self.end = record_end
            yield event_id, body[id_len:]


def read(
    directory: str | os.PathLike[str], *, after: int | None = None
) -> Iterator[tuple[int, str, bytes]]:
    """``(seq, event_id, payload)`` for every complete record of the log in ``directory``
    (those with ``seq > after`` when ``after`` is given), in order.

    Takes no lock: safe while a writer appends, in this process or another. The last segment
    is read up to its first incomplete record (a batch being written, or a torn tail the next
    open will cut); a record not intact in any other segment raises ``CorruptLogError``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise EventLogError(f"no event log at {directory}: not a directory")
    segments = _segments(directory)
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if after is not None and not last and segments[i + 1].first_seq <= after + 1:
            continue
        seq = segment.first_seq
        with segment.path.open("rb", buffering=_READ_BUFFER) as f:
            scan = _Scan(f, os.fstat(f.fileno()).st_size)
            for event_id, payload in scan:
                if after is None or seq > after:
                    yield seq, event_id, payload
                seq += 1
        if not last:
            if scan.problem is not None:
                raise CorruptLogError(
                    f"{segment.path} at offset {scan.end}: {scan.problem}; only the last "
                    "segment may end in a torn record"
                )
            if seq != segments[i + 1].first_seq:
                raise CorruptLogError(
                    f"{segments[i + 1].path} should start at sequence number {seq} "
                    f"(the records before it), a segment is missing or misnamed"
                )


@dataclass(frozen=True)
class Recovery:
    """What ``SegmentLog.open`` found: records and segments on disk (after recovery) and the
    bytes it cut off the end of the last segment."""

    records: int
    segments: int
    truncated_bytes: int


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(directory: Path) -> int:
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LogLockedError(
            f"event log {directory} is open in another writer (pid {holder} holds {path}); "
            "close that one first, a log has one writer at a time"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class SegmentLog:
    """The event log in local segment files (see the module docstring for the layout).

    The idempotency index is a set of every event id in the log, in memory, rebuilt by
    ``open`` from all segments: in CPython about 85 bytes plus the id's length per id (the
    str object and its set slot), so ~120 MB per million 36-character UUIDs.

    With ``fsync=False`` an acknowledged batch survives the process dying but not the
    machine. Thread-safe: one lock serialises ``append``, ``stats`` and ``close``.
    """

    def __init__(
        self,
        directory: Path,
        *,
        lock_fd: int,
        segment_bytes: int,
        fsync: bool,
        ids: set[str],
        recovery: Recovery,
        tail: _Segment | None,
        total_bytes: int,
    ) -> None:
        """Use ``SegmentLog.open``."""
        self.directory = directory
        self.recovery = recovery
        self._lock_fd: int | None = lock_fd
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        self._ids = ids
        self._records = recovery.records
        self._segments = recovery.segments
        self._bytes = total_bytes
        self._appends = 0
        self._duplicates = 0
        self._failed: str | None = None
        self._mutex = threading.Lock()
        self._tail_fd: int | None = None
        self._tail_size = 0
        if tail is not None:
            self._tail_fd = os.open(tail.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            self._tail_size = os.fstat(self._tail_fd).st_size

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fsync: bool = True,
    ) -> SegmentLog:
        """Open (creating if needed) the log in ``directory`` as its one writer.

        Scans every segment to rebuild the idempotency index, cuts a torn or corrupt tail
        off the last segment (logged, and counted in ``recovery.truncated_bytes``) and, with
        ``fsync``, fsyncs what it kept: an id it reports as already present is durable.
        """
        if segment_bytes < _HEADER.size + 1:
            raise ValueError(
                f"segment_bytes must be at least {_HEADER.size + 1}, got {segment_bytes}"
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lock_fd = _lock(directory)
        try:
            return cls._recover(directory, lock_fd, segment_bytes, fsync)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _recover(cls, directory: Path, lock_fd: int, segment_bytes: int, fsync: bool) -> Self:
        segments = _segments(directory)
        ids: set[str] = set()
        records = total_bytes = truncated = 0
        for i, segment in enumerate(segments):
            last = i == len(segments) - 1
            if segment.first_seq != records:
                raise CorruptLogError(
                    f"{segment.path} should start at sequence number {records} (the records "
                    "before it), a segment is missing or misnamed"
                )
            with segment.path.open("r+b" if last else "rb", buffering=_READ_BUFFER) as f:
                size = os.fstat(f.fileno()).st_size
                scan = _Scan(f, size)
                for event_id, _ in scan:
                    ids.add(event_id)
                    records += 1
                if scan.problem is not None and not last:
                    raise CorruptLogError(
                        f"{segment.path} at offset {scan.end}: {scan.problem}; only the last "
                        "segment may end in a torn record, restore this one from a copy"
                    )
                if scan.problem is not None:
                    truncated = size - scan.end
                    os.ftruncate(f.fileno(), scan.end)
                    log.warning(
                        "event log %s: %s at offset %d of %s; truncated %d bytes "
                        "(an unacknowledged write cut short)",
                        directory,
                        scan.problem,
                        scan.end,
                        segment.path.name,
                        truncated,
                    )
                if fsync:
                    os.fsync(f.fileno())
                total_bytes += scan.end
        recovery = Recovery(records=records, segments=len(segments), truncated_bytes=truncated)
        return cls(
            directory,
            lock_fd=lock_fd,
            segment_bytes=segment_bytes,
            fsync=fsync,
            ids=ids,
            recovery=recovery,
            tail=segments[-1] if segments else None,
            total_bytes=total_bytes,
        )

    def append(self, records: Iterable[tuple[str, bytes]]) -> list[bool]:
        """Append one batch; per record ``True`` if written, ``False`` if its event id is
        already in the log (or earlier in this batch). Returns once the batch is durable.

        A record that is not valid fails the whole batch with ``ValueError``, nothing
        written. A failed write or fsync raises ``EventLogError`` and leaves the log unusable
        until it is reopened (reopening rebuilds the index from what reached the disk).
        """
        batch = _check_batch(records)
        with self._mutex:
            self._check_usable()
            written: set[str] = set()
            frames = []
            results = []
            for record in batch:
                new = record.event_id not in self._ids and record.event_id not in written
                results.append(new)
                if new:
                    written.add(record.event_id)
                    frames.append(_frame(record))
            self._appends += 1
            self._duplicates += len(batch) - len(written)
            if frames:
                data = b"".join(frames)
                try:
                    self._write(data)
                except OSError as exc:
                    self._failed = f"{type(exc).__name__}: {exc}"
                    raise EventLogError(
                        f"event log {self.directory}: writing a batch failed ({exc}); the "
                        "batch is not acknowledged, reopen the log before appending again"
                    ) from exc
                self._ids |= written
                self._records += len(written)
                self._bytes += len(data)
            return results

    def _write(self, data: bytes) -> None:
        if self._tail_fd is None or (
            self._tail_size > 0 and self._tail_size + len(data) > self._segment_bytes
        ):
            self._roll()
        assert self._tail_fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self._tail_fd, view) :]
        self._tail_size += len(data)
        if self._fsync:
            os.fsync(self._tail_fd)

    def _roll(self) -> None:
        path = self.directory / f"segment-{self._records:020d}.log"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        if self._tail_fd is not None:
            os.close(self._tail_fd)
        self._tail_fd, self._tail_size = fd, 0
        self._segments += 1
        if self._fsync:
            _fsync_dir(self.directory)

    def _check_usable(self) -> None:
        if self._lock_fd is None:
            raise EventLogError(f"event log {self.directory} is closed")
        if self._failed is not None:
            raise EventLogError(
                f"event log {self.directory} failed earlier ({self._failed}); reopen it"
            )

    def read(self, *, after: int | None = None) -> Iterator[tuple[int, str, bytes]]:
        """``read(self.directory, after=after)``."""
        return read(self.directory, after=after)

    def stats(self) -> dict[str, int]:
        with self._mutex:
            return {
                "records": self._records,
                "segments": self._segments,
                "bytes": self._bytes,
                "duplicates_dropped": self._duplicates,
                "appends": self._appends,
                "truncated_bytes": self.recovery.truncated_bytes,
            }

    def close(self) -> None:
        """Close the segment and release the lock; closing twice is a no-op."""
        with self._mutex:
            if self._tail_fd is not None:
                os.close(self._tail_fd)
                self._tail_fd = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- Redis streams -------------------------------------------------------------------------

# KEYS[1]: the stream; KEYS[1 + i]: record i's seen marker; ARGV[2i - 1], ARGV[2i]: its event
# id and payload. The script is atomic, so EXISTS + XADD + SET is the same as ``SET seen 1 NX``
# then XADD, with the order chosen so that an XADD that fails marks nothing as seen.
_APPEND_SCRIPT = """
local written = {}
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('XADD', KEYS[1], '*', 'id', ARGV[2 * i - 3], 'data', ARGV[2 * i - 2])
    redis.call('SET', KEYS[i], '1')
    written[i - 1] = 1
  else
    written[i - 1] = 0
  end
end
return written
"""


def _redacted(url: str) -> str:
    """The URL without its credentials, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class RedisStreamLog:
    """The event log as a Redis stream: ``XADD <stream> * id <event_id> data <payload>``, with
    ``<stream>:seen:<event_id>`` set in the same Lua script (one per batch), so a retried event
    is stored once. The seen markers never expire: one small key per event.

    Durability is Redis's: an acknowledged batch survives a Redis restart only with
    ``appendonly yes``, and a Redis crash only with ``appendfsync always`` (``everysec``, the
    default, can lose the last second); replication is asynchronous. On Redis Cluster give the
    stream a hash tag (``{homefeed:events}``) so its seen markers share its slot.
    """

    def __init__(self, client: Any, *, stream: str = DEFAULT_STREAM, where: str = "redis") -> None:
        """Use ``RedisStreamLog.open``; ``client`` is a ``redis.Redis`` returning bytes."""
        self.stream = stream
        self.where = where
        self._client = client
        self._script = client.register_script(_APPEND_SCRIPT)
        self._appends = 0
        self._duplicates = 0
        self._closed = False
        self._mutex = threading.Lock()

    @classmethod
    def open(cls, url: str, *, stream: str = DEFAULT_STREAM) -> RedisStreamLog:
        """Connect to ``redis://host:port/db`` and check that Redis answers."""
        import redis

        where = _redacted(url)
        client = redis.Redis.from_url(url)
        try:
            client.ping()
        except redis.RedisError as exc:
            client.close()
            raise EventLogError(f"event log at {where} unreachable: {exc}") from exc
        return cls(client, stream=stream, where=where)

    def append(self, records: Iterable[tuple[str, bytes]]) -> list[bool]:
        """Append one batch; per record ``True`` if written, ``False`` if its event id was
        already seen (or earlier in this batch)."""
        batch = _check_batch(records)
        if self._closed:
            raise EventLogError(f"event log {self.where} {self.stream} is closed")
        if not batch:
            return []
        keys = [self.stream, *(f"{self.stream}:seen:{r.event_id}" for r in batch)]
        args: list[bytes] = []
        for record in batch:
            args += [record.encoded_id, record.payload]
        results = [bool(flag) for flag in self._script(keys=keys, args=args)]
        with self._mutex:
            self._appends += 1
            self._duplicates += results.count(False)
        return results

    def read(
        self, *, after: str | None = None, count: int = 1000
    ) -> Iterator[tuple[str, str, bytes]]:
        """``(stream entry id, event_id, payload)`` for every entry (those after the entry id
        ``after`` when given), in order, fetched ``count`` at a time."""
        start = "-" if after is None else f"({after}"
        while entries := self._client.xrange(self.stream, min=start, max="+", count=count):
            for entry_id, fields in entries:
                seq = entry_id.decode()
                yield seq, fields[b"id"].decode(), fields[b"data"]
            start = f"({seq}"

    def stats(self) -> dict[str, int]:
        records = int(self._client.xlen(self.stream))
        with self._mutex:
            return {
                "records": records,
                "duplicates_dropped": self._duplicates,
                "appends": self._appends,
            }

    def close(self) -> None:
        self._closed = True
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def is_redis_url(url_or_path: str | os.PathLike[str]) -> bool:
    """Whether ``url_or_path`` names a Redis server (``redis://``, ``rediss://``,
    ``unix://``) rather than a segment directory."""
    return urlsplit(os.fspath(url_or_path)).scheme in REDIS_SCHEMES


def open_event_log(url_or_path: str | os.PathLike[str]) -> SegmentLog | RedisStreamLog:
    """``redis://host:port/db`` opens a ``RedisStreamLog`` on the default stream; anything
    else is a directory for a ``SegmentLog`` with the defaults."""
    if is_redis_url(url_or_path):
        return RedisStreamLog.open(os.fspath(url_or_path))
    return SegmentLog.open(url_or_path)
