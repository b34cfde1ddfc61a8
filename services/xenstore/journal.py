"""Durability: an append-only journal of committed changes, with compaction.

Two files in the run directory:

- ``xenstore.snapshot``: the whole state (``XenStore.snapshot()``) at some
  point, tagged with an epoch; replaced atomically (write, fsync, rename,
  fsync the directory).
- ``xenstore.journal``: a header naming the epoch it continues, then records,
  each ``u32 length | u32 crc32 | msgpack`` of one request's changes (a whole
  committed transaction is one record, so it is replayed entirely or not at
  all).

On start the snapshot is loaded and the journal replayed if its epoch matches;
a record cut short or failing its CRC (a torn tail from a crash mid-append)
ends the replay and is truncated away. The adapter appends a request's record
before it answers, writes a whole group of them with one system call and
makes them durable with ``fdatasync`` before the reply that
acknowledges it leaves, so an acknowledged write survives kill -9.

Compaction writes a snapshot of epoch e+1 and then an empty journal of epoch
e+1. A crash between the two leaves the old journal (epoch e) next to the new
snapshot, and its records — already in the snapshot — are skipped by epoch.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Any

import attrs
import msgpack

JOURNAL_MAGIC = b"DSXSJNL1"


def state_files(directory: Path) -> tuple[Path, Path]:
    """``(journal, snapshot)`` of the store kept in ``directory``."""
    return directory / "xenstore.journal", directory / "xenstore.snapshot"


SNAPSHOT_MAGIC = b"DSXSSNP1"
_HEADER = struct.Struct("<8sQ")  # magic, epoch
_RECORD = struct.Struct("<II")  # length, crc32 of the payload
COMPACT_AFTER = 4 * 1024 * 1024  # journal bytes that trigger a snapshot


class JournalError(Exception):
    """The snapshot is unreadable: refuse to start rather than lose state."""


@attrs.frozen
class JournalStats:
    epoch: int
    journal_bytes: int
    appends: int
    syncs: int
    compactions: int
    replayed_records: int
    torn_bytes_dropped: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically and durably."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def frame(record: list[Any]) -> bytes:
    payload = msgpack.packb(record, use_bin_type=True)
    return _RECORD.pack(len(payload), zlib.crc32(payload)) + payload


def parse_records(data: bytes, start: int) -> tuple[list[list[Any]], int]:
    """Records from ``start``; returns them and the offset where valid data ends."""
    records, pos = [], start
    while pos + _RECORD.size <= len(data):
        length, crc = _RECORD.unpack_from(data, pos)
        end = pos + _RECORD.size + length
        if end > len(data):
            break
        payload = data[pos + _RECORD.size : end]
        if zlib.crc32(payload) != crc:
            break
        try:
            records.append(msgpack.unpackb(payload, raw=False))
        except Exception:
            break
        pos = end
    return records, pos


@attrs.define(eq=False)
class Journal:
    """The two files of one xenstored; ``load`` first, then ``append``/``sync``."""

    directory: Path
    compact_after: int = COMPACT_AFTER
    epoch: int = 0
    size: int = 0
    _fd: int | None = None
    _buffer: list[bytes] = attrs.field(factory=list)
    appends: int = 0
    syncs: int = 0
    compactions: int = 0
    replayed: int = 0
    torn: int = 0

    @property
    def journal_path(self) -> Path:
        return state_files(self.directory)[0]

    @property
    def snapshot_path(self) -> Path:
        return state_files(self.directory)[1]

    def load(self) -> tuple[dict[str, Any] | None, list[list[Any]]]:
        """The last snapshot (None if there is none) and the records after it."""
        snapshot = None
        if self.snapshot_path.exists():
            data = self.snapshot_path.read_bytes()
            try:
                magic, self.epoch = _HEADER.unpack_from(data)
                (crc,) = struct.unpack_from("<I", data, _HEADER.size)
                body = data[_HEADER.size + 4 :]
                if magic != SNAPSHOT_MAGIC or zlib.crc32(body) != crc:
                    raise ValueError("bad magic or checksum")
                snapshot = msgpack.unpackb(body, raw=False)
            except (ValueError, struct.error) as exc:
                raise JournalError(f"{self.snapshot_path}: {exc}") from None
        records: list[list[Any]] = []
        end = 0
        if self.journal_path.exists():
            data = self.journal_path.read_bytes()
            if len(data) >= _HEADER.size and _HEADER.unpack_from(data) == (
                JOURNAL_MAGIC,
                self.epoch,
            ):
                records, end = parse_records(data, _HEADER.size)
                self.torn = len(data) - end
        if end:
            # Cut a torn tail so new records follow the last good one.
            os.truncate(self.journal_path, end)
            self.size = end
        else:
            _write_durably(self.journal_path, _HEADER.pack(JOURNAL_MAGIC, self.epoch))
            self.size = _HEADER.size
        self._fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND)
        self.replayed = len(records)
        return snapshot, records

    def append(self, records: list[list[Any]]) -> None:
        """Queue records; :meth:`flush` writes them, :meth:`sync` makes them durable."""
        assert self._fd is not None, "load() first"
        for record in records:
            data = frame(record)
            self._buffer.append(data)
            self.size += len(data)
        self.appends += 1

    def flush(self) -> None:
        """Write queued records to the file (one system call for a whole group)."""
        if self._buffer and self._fd is not None:
            _write_all(self._fd, b"".join(self._buffer))
            self._buffer.clear()

    def sync(self) -> None:
        """Make every flushed record durable (blocking: run it in a thread)."""
        if self._fd is not None:
            os.fdatasync(self._fd)
            self.syncs += 1

    @property
    def needs_compaction(self) -> bool:
        return self.size > self.compact_after

    def compact(self, snapshot: dict[str, Any]) -> None:
        """Replace snapshot + journal by ``snapshot`` and an empty journal.
        ``snapshot`` must include every record appended so far."""
        epoch = self.epoch + 1
        self._buffer.clear()  # already in the snapshot
        body = msgpack.packb(snapshot, use_bin_type=True)
        head = _HEADER.pack(SNAPSHOT_MAGIC, epoch) + struct.pack("<I", zlib.crc32(body))
        _write_durably(self.snapshot_path, head + body)
        _write_durably(self.journal_path, _HEADER.pack(JOURNAL_MAGIC, epoch))
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND)
        self.epoch, self.size = epoch, _HEADER.size
        self.compactions += 1

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def statistics(self) -> JournalStats:
        return JournalStats(
            self.epoch,
            self.size,
            self.appends,
            self.syncs,
            self.compactions,
            self.replayed,
            self.torn,
        )
