"""contract.eventlog: round trips over segments, idempotency, recovery from torn tails and a
SIGKILLed writer, the writer lock, and the Redis stream backend against a real redis-server."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from contract import eventlog
from contract.eventlog import (
    CorruptLogError,
    LogLockedError,
    RedisStreamLog,
    SegmentLog,
    open_event_log,
)

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
HEADER = 11  # magic 2 + payload length 4 + crc32 4 + event id length 1


def batch(start: int, n: int, size: int = 20) -> list[tuple[str, bytes]]:
    return [(f"e{i}", f"payload-{i}".encode().ljust(size, b".")) for i in range(start, start + n)]


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("segment-*.log"))


def ids_in(directory: Path) -> list[str]:
    return [event_id for _, event_id, _ in eventlog.read(directory)]


def test_round_trip_over_segments(tmp_path: Path) -> None:
    records = batch(0, 40)
    with SegmentLog.open(tmp_path, segment_bytes=200) as log:
        for i in range(0, 40, 4):
            assert log.append(records[i : i + 4]) == [True] * 4
        stats = log.stats()
    files = segment_files(tmp_path)
    assert stats["records"] == 40
    assert stats["segments"] == len(files) > 3
    assert stats["bytes"] == sum(f.stat().st_size for f in files)
    assert stats["appends"] == 10
    assert files[0].name == "segment-00000000000000000000.log"
    got = list(eventlog.read(tmp_path))
    assert [seq for seq, _, _ in got] == list(range(40))
    assert [(event_id, payload) for _, event_id, payload in got] == records
    # every segment is named for its first record
    firsts = [int(f.name[len("segment-") : -len(".log")]) for f in files]
    assert firsts == sorted(firsts) and firsts[0] == 0
    assert [seq for seq, _, _ in eventlog.read(tmp_path, after=25)] == list(range(26, 40))
    assert list(eventlog.read(tmp_path, after=39)) == []


def test_batch_larger_than_a_segment_stays_in_one(tmp_path: Path) -> None:
    with SegmentLog.open(tmp_path, segment_bytes=100) as log:
        log.append(batch(0, 2))
        log.append(batch(2, 10))
        log.append(batch(12, 1))
    files = segment_files(tmp_path)
    assert [f.name for f in files] == [
        "segment-00000000000000000000.log",
        "segment-00000000000000000002.log",
        "segment-00000000000000000012.log",
    ]
    assert ids_in(tmp_path) == [f"e{i}" for i in range(13)]


def test_duplicates_are_stored_once(tmp_path: Path) -> None:
    with SegmentLog.open(tmp_path) as log:
        assert log.append([("a", b"1"), ("b", b"2"), ("a", b"3")]) == [True, True, False]
        assert log.append([("b", b"4"), ("c", b"5")]) == [False, True]
        assert log.append([]) == []
        assert log.stats()["duplicates_dropped"] == 2
    with SegmentLog.open(tmp_path) as log:
        assert log.recovery.records == 3
        assert log.append([("a", b"6"), ("d", b"7"), ("d", b"8")]) == [False, True, False]
    assert [(e, p) for _, e, p in eventlog.read(tmp_path)] == [
        ("a", b"1"),
        ("b", b"2"),
        ("c", b"5"),
        ("d", b"7"),
    ]


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        (("", b"x"), "1..128 characters, got 0"),
        (("x" * 129, b"x"), "1..128 characters, got 129"),
        (("é" * 128, b"x"), "at most 255 bytes"),
        ((7, b"x"), "must be a str, got int"),
        (("ok", "text"), "payload must be bytes, got str"),
        (("ok",), "must be an (event_id, payload) pair"),
    ],
)
def test_invalid_record_fails_the_whole_batch(tmp_path: Path, record: tuple, problem: str) -> None:
    with SegmentLog.open(tmp_path) as log:
        with pytest.raises(ValueError, match=r"record 1: |record 1 must") as info:
            log.append([("fine", b"1"), record])
        assert problem in str(info.value)
        assert log.stats()["records"] == 0
    assert ids_in(tmp_path) == []
    eventlog.check_event_id("x" * 128)


def _last_record_offset(path: Path) -> int:
    """Offset of the last record in a segment of records written by ``batch``."""
    data = path.read_bytes()
    offset = last = 0
    while offset < len(data):
        last = offset
        id_len = data[offset + 10]
        payload_len = int.from_bytes(data[offset + 2 : offset + 6], "little")
        offset += HEADER + id_len + payload_len
    return last


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["mid-record", "mid-header", "garbage", "bad crc"])
def test_torn_tail_is_truncated(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    with SegmentLog.open(tmp_path, segment_bytes=300) as log:
        for i in range(0, 30, 3):
            log.append(batch(i, 3))
    last = segment_files(tmp_path)[-1]
    size = last.stat().st_size
    start = _last_record_offset(last)
    kept = 29  # records left after the damage
    if damage == "mid-record":
        os.truncate(last, start + HEADER + 4)
        cut = HEADER + 4
    elif damage == "mid-header":
        os.truncate(last, start + 5)
        cut = 5
    elif damage == "garbage":
        garbage = b"\x00garbage that is no record\xff"
        with last.open("ab") as f:
            f.write(garbage)
        cut, kept, start = len(garbage), 30, size
    else:
        _flip(last, size - 1)
        cut = size - start

    with caplog.at_level(logging.WARNING, logger="contract.eventlog"):
        log = SegmentLog.open(tmp_path, segment_bytes=300)
    with log:
        assert log.recovery.truncated_bytes == cut
        assert log.recovery.records == kept
        assert log.stats()["truncated_bytes"] == cut
        assert last.stat().st_size == start
        assert f"truncated {cut} bytes" in caplog.text
        # a record lost to the damage is new again; the rest are duplicates
        assert log.append(batch(28, 4)) == [kept == 28, kept <= 29, True, True]
    assert ids_in(tmp_path) == [f"e{i}" for i in range(32)]
    with SegmentLog.open(tmp_path) as log:
        assert log.recovery.truncated_bytes == 0
        assert log.recovery.records == 32


def test_corrupt_middle_segment_is_an_error(tmp_path: Path) -> None:
    with SegmentLog.open(tmp_path, segment_bytes=200) as log:
        for i in range(0, 30, 3):
            log.append(batch(i, 3))
    middle = segment_files(tmp_path)[1]
    _flip(middle, HEADER + 5)  # inside the first record's payload
    with pytest.raises(
        CorruptLogError, match=rf"{re.escape(str(middle))} at offset 0: crc32 mismatch"
    ):
        SegmentLog.open(tmp_path)
    with pytest.raises(CorruptLogError, match=rf"{re.escape(str(middle))} at offset 0"):
        list(eventlog.read(tmp_path))
    # the failed open released the lock
    _flip(middle, HEADER + 5)
    SegmentLog.open(tmp_path).close()


def test_missing_segment_is_an_error(tmp_path: Path) -> None:
    with SegmentLog.open(tmp_path, segment_bytes=200) as log:
        for i in range(0, 30, 3):
            log.append(batch(i, 3))
    segment_files(tmp_path)[1].unlink()
    with pytest.raises(CorruptLogError, match="a segment is missing or misnamed"):
        SegmentLog.open(tmp_path)


def test_second_writer_is_refused(tmp_path: Path) -> None:
    with SegmentLog.open(tmp_path) as log:
        log.append(batch(0, 1))
        with pytest.raises(
            LogLockedError,
            match=rf"event log {re.escape(str(tmp_path))} is open .*pid {os.getpid()}",
        ):
            SegmentLog.open(tmp_path)
        # readers take no lock
        assert ids_in(tmp_path) == ["e0"]
    with SegmentLog.open(tmp_path) as log:
        assert log.append(batch(0, 2)) == [False, True]


def test_closed_log_refuses_appends(tmp_path: Path) -> None:
    log = SegmentLog.open(tmp_path)
    log.close()
    log.close()
    with pytest.raises(eventlog.EventLogError, match="is closed"):
        log.append(batch(0, 1))


def test_reader_stops_at_a_half_written_tail(tmp_path: Path) -> None:
    with SegmentLog.open(tmp_path) as log:
        log.append(batch(0, 5))
        last = segment_files(tmp_path)[-1]
        with last.open("ab") as f:  # what a reader sees mid-write
            f.write(eventlog.MAGIC + b"\x40\x00")
        assert ids_in(tmp_path) == [f"e{i}" for i in range(5)]


_WRITER = """
import sys
from contract.eventlog import SegmentLog

log = SegmentLog.open(sys.argv[1])
payload = b"x" * 2000
for b in range(100_000):
    ids = [f"e{b * 50 + i}" for i in range(50)]
    log.append([(event_id, payload) for event_id in ids])
    print(ids[-1], flush=True)
"""


# the child runs ahead of what the parent has read; waiting a little longer after the 20th
# acknowledgement lands the kill at other points (in a write, between write and fsync, ...)
@pytest.mark.parametrize("kill_delay", [0.0, 0.002, 0.01])
def test_sigkill_loses_no_acknowledged_event(tmp_path: Path, kill_delay: float) -> None:
    directory = tmp_path / "log"
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(_WRITER))
    child = subprocess.Popen(
        [sys.executable, str(script), str(directory)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    acked: list[str] = []
    deadline = time.monotonic() + 30
    while len(acked) < 20 and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        acked.append(line.strip())
    time.sleep(kill_delay)
    os.kill(child.pid, signal.SIGKILL)
    acked += child.stdout.read().split()  # acknowledged before the kill, printed, unread
    child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL, child.stderr.read() if child.stderr else ""
    assert len(acked) >= 20
    last_acked = int(acked[-1][1:])
    assert (last_acked + 1) % 50 == 0

    with SegmentLog.open(directory) as log:
        present = ids_in(directory)
        # batches went in order, each one write: what survived is a prefix, with nothing twice
        assert present == [f"e{i}" for i in range(len(present))]
        assert len(present) > last_acked
        assert log.recovery.records == len(present)
        # the client retries everything it attempted: up to the batch after the last that
        # reached the disk, whether or not it was acknowledged
        attempted = (len(present) // 50 + 1) * 50
        payload = b"x" * 2000
        for start in range(0, attempted, 50):
            results = log.append([(f"e{i}", payload) for i in range(start, start + 50)])
            assert results == [i >= len(present) for i in range(start, start + 50)]

    with SegmentLog.open(directory) as log:
        assert log.recovery.truncated_bytes == 0
        assert log.recovery.records == attempted
    records = list(eventlog.read(directory))
    assert [seq for seq, _, _ in records] == list(range(attempted))
    assert [e for _, e, _ in records] == [f"e{i}" for i in range(attempted)]
    assert all(p == payload for _, _, p in records)


def test_open_event_log_picks_the_backend(tmp_path: Path) -> None:
    assert eventlog.is_redis_url("redis://127.0.0.1:6379/0")
    assert not eventlog.is_redis_url(tmp_path / "redis")
    assert not eventlog.is_redis_url("relative/dir")
    with open_event_log(str(tmp_path / "log")) as log:
        assert isinstance(log, SegmentLog)
        assert log.directory == tmp_path / "log"


@pytest.mark.redis
def test_redis_round_trip_and_idempotency(redis_server: str) -> None:
    url = f"redis://{redis_server}/0"
    with open_event_log(url) as log:
        assert isinstance(log, RedisStreamLog)
        assert log.append([("a", b"1"), ("b", b"\x00\xff"), ("a", b"3")]) == [True, True, False]
        assert log.append([("b", b"4"), ("c", b"5")]) == [False, True]
        assert log.stats() == {"records": 3, "duplicates_dropped": 2, "appends": 2}
        got = list(log.read())
        assert [(e, p) for _, e, p in got] == [("a", b"1"), ("b", b"\x00\xff"), ("c", b"5")]
        assert [e for _, e, _ in log.read(after=got[0][0])] == ["b", "c"]
        assert [e for _, e, _ in log.read(count=1)] == ["a", "b", "c"]
    with RedisStreamLog.open(url) as log:  # another client: the seen markers are in Redis
        assert log.append([("c", b"6"), ("d", b"7")]) == [False, True]
        assert [e for _, e, _ in log.read()] == ["a", "b", "c", "d"]
        with pytest.raises(ValueError, match=r"record 0: event_id must be 1\.\.128"):
            log.append([("", b"x")])


def test_redis_unreachable_is_a_clear_error() -> None:
    from tests.conftest import free_port

    url = f"redis://user:secret@127.0.0.1:{free_port()}/0"
    with pytest.raises(
        eventlog.EventLogError, match=r"redis://127\.0\.0\.1:\d+/0 unreachable"
    ) as info:
        RedisStreamLog.open(url)
    assert "secret" not in str(info.value)
