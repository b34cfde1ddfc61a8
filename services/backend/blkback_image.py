"""The backing store of one vbd: a raw or sparse image file, or an ISO.

The file's page cache is the disk's volatile write cache: a completed WRITE is
in the page cache, and only ``BLKIF_OP_FLUSH_DISKCACHE`` (``fdatasync``) makes
it durable. DISCARD punches holes (``fallocate(PUNCH_HOLE | KEEP_SIZE)``), so a
sparse image stays sparse. Data moves with one ``preadv``/``pwritev`` per
request straight between the file and the granted guest pages (no copy here).

These calls block; :func:`run_blocking` is the one place that decides whether
a call runs inline (small, page-cache speed) or on a worker thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import attrs
import trio

from shared.abi.blkif import SECTOR_SIZE, VDisk

T = TypeVar("T")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
ISO_BLOCK_SIZE = 2048
# Above this many bytes a transfer leaves the event loop; below, a page-cache
# copy is cheaper than the thread hand-off. 1 MiB (the largest request we
# accept: 256 indirect segments) measured 40-45 us for a page-cache
# pwritev/preadv, a ``trio.to_thread`` round trip 72 us (idle machine; more
# under load, plus GIL contention with the event loop); a cold 1 MiB read
# (~0.5 ms) stalls the loop briefly but costs no more than the thread would.
INLINE_LIMIT = 1024 * 1024
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class MediaError(OSError):
    """The image cannot be used (missing, unreadable, not whole sectors)."""


@attrs.frozen
class DiskFacts:
    """What the backend tells the frontend about the medium (xenstore keys)."""

    sectors: int  #: ``sectors``, in 512-byte units
    info: VDisk  #: ``info`` bits
    physical_sector_size: int
    discard: bool  #: ``feature-discard`` (writable, not a CD-ROM)
    has_media: bool


class DiskImage:
    """An open image file; ``readonly`` images are opened O_RDONLY."""

    def __init__(self, path: Path, fd: int, size: int, readonly: bool, cdrom: bool) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.readonly = readonly
        self.cdrom = cdrom

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool, cdrom: bool = False) -> DiskImage:
        path = Path(path)
        readonly = readonly or cdrom
        try:
            fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        except OSError as exc:
            raise MediaError(exc.errno, f"cannot open {path}: {exc.strerror}") from None
        size = os.fstat(fd).st_size
        if size % SECTOR_SIZE:
            os.close(fd)
            raise MediaError(0, f"{path}: size {size} is not whole {SECTOR_SIZE}-byte sectors")
        return cls(path, fd, size, readonly, cdrom)

    @property
    def sectors(self) -> int:
        return self.size // SECTOR_SIZE

    def facts(self) -> DiskFacts:
        info = VDisk(0)
        if self.cdrom:
            info |= VDisk.CDROM | VDisk.REMOVABLE
        if self.readonly:
            info |= VDisk.READONLY
        physical = ISO_BLOCK_SIZE if self.cdrom else SECTOR_SIZE
        return DiskFacts(self.sectors, info, physical, not self.readonly, True)

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill ``buffers`` from ``offset`` (holes read as zeros)."""
        _transfer(os.preadv, self.fd, offset, buffers)

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        _transfer(os.pwritev, self.fd, offset, buffers)

    def transfer(self, write: bool, offset: int, buf: memoryview) -> None:
        """One buffer read (or written) at ``offset``: one system call unless
        it comes up short."""
        done = (os.pwrite if write else os.preadv)(self.fd, buf if write else (buf,), offset)
        if done != buf.nbytes:
            _transfer(os.pwritev if write else os.preadv, self.fd, offset + done, (buf[done:],))

    def flush(self) -> None:
        """Commit every completed write to stable storage."""
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole: the range reads as zeros and frees its blocks."""
        if length <= 0:
            return
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if _libc.fallocate(self.fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"fallocate(PUNCH_HOLE) on {self.path}: {os.strerror(err)}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def no_media_facts(cdrom: bool) -> DiskFacts:
    """An empty removable drive: no sectors, read-only."""
    info = VDisk.READONLY | (VDisk.CDROM | VDisk.REMOVABLE if cdrom else VDisk(0))
    return DiskFacts(0, info, ISO_BLOCK_SIZE if cdrom else SECTOR_SIZE, False, False)


def _transfer(
    op: Callable[[int, Sequence[memoryview], int], int],
    fd: int,
    offset: int,
    buffers: Sequence[memoryview],
) -> None:
    """``preadv``/``pwritev`` all of ``buffers``, resuming after short transfers."""
    pending = list(buffers)
    while pending:
        batch = pending[:_IOV_MAX]
        done = op(fd, batch, offset)
        if done <= 0:
            raise OSError(0, f"short transfer at offset {offset}")
        offset += done
        while done:
            head = pending[0]
            if done >= head.nbytes:
                done -= head.nbytes
                pending.pop(0)
            else:
                pending[0] = head[done:]
                done = 0


async def run_blocking(fn: Callable[..., T], *args: object, nbytes: int = 0) -> T:
    """Run a blocking image call: inline when it moves at most ``INLINE_LIMIT``
    bytes of page cache, else on a worker thread (flushes always go there)."""
    if nbytes and nbytes <= INLINE_LIMIT:
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args)
