"""Guest RAM: one file in /dev/shm per domain, mapped by every process that
needs it (the hypervisor, the domain's vCPU processes, a backend that was
granted a page). Frame numbers (gfns) index 4 KiB pages.

Files are named ``domsplit-<host>-dom<domid>`` so the supervisor can find and
remove what a crashed host left behind.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

PAGE_SIZE = 4096
SHM_DIR = Path("/dev/shm")


def ram_path(host: str, domid: int, shm_dir: Path = SHM_DIR) -> Path:
    return shm_dir / f"domsplit-{host}-dom{domid}"


class GuestMemoryError(ValueError):
    """A frame outside the domain's memory, or a file that cannot be used."""


class GuestMemory:
    """A mapping of one domain's RAM file."""

    def __init__(self, path: Path, fd: int, nr_pages: int) -> None:
        self.path = path
        self.nr_pages = nr_pages
        self._fd = fd
        self.map = mmap.mmap(fd, nr_pages * PAGE_SIZE, mmap.MAP_SHARED)
        self.view = memoryview(self.map)

    @classmethod
    def create(cls, path: Path, nr_pages: int) -> GuestMemory:
        """A new, zeroed RAM file of ``nr_pages`` pages (fails if it exists)."""
        if nr_pages <= 0:
            raise GuestMemoryError(f"a domain needs memory, got {nr_pages} pages")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, nr_pages * PAGE_SIZE)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return cls(path, fd, nr_pages)

    @classmethod
    def open(cls, path: Path) -> GuestMemory:
        """Map an existing RAM file (a vCPU process or a backend)."""
        fd = os.open(path, os.O_RDWR)
        size = os.fstat(fd).st_size
        if size == 0 or size % PAGE_SIZE:
            os.close(fd)
            raise GuestMemoryError(f"{path}: size {size} is not whole pages")
        return cls(path, fd, size // PAGE_SIZE)

    def check_gfn(self, gfn: int) -> None:
        if not 0 <= gfn < self.nr_pages:
            raise GuestMemoryError(f"gfn {gfn:#x} outside {self.nr_pages} pages")

    def page(self, gfn: int) -> memoryview:
        """The 4 KiB page at ``gfn``, writable in place."""
        self.check_gfn(gfn)
        return self.view[gfn * PAGE_SIZE : (gfn + 1) * PAGE_SIZE]

    def read(self, gfn: int, offset: int = 0, length: int = PAGE_SIZE) -> bytes:
        self.check_gfn(gfn)
        if offset < 0 or length < 0 or offset + length > PAGE_SIZE:
            raise GuestMemoryError(f"bytes {offset}+{length} outside a page")
        base = gfn * PAGE_SIZE + offset
        return bytes(self.view[base : base + length])

    def write(self, gfn: int, offset: int, data: bytes) -> None:
        self.check_gfn(gfn)
        if offset < 0 or offset + len(data) > PAGE_SIZE:
            raise GuestMemoryError(f"bytes {offset}+{len(data)} outside a page")
        base = gfn * PAGE_SIZE + offset
        self.view[base : base + len(data)] = data

    def close(self) -> None:
        if self._fd >= 0:
            self.view.release()
            self.map.close()
            os.close(self._fd)
            self._fd = -1

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
