"""A vCPU's doorbell: how the hypervisor kicks a vCPU process.

In Xen an upcall is a bit in shared memory plus a kick (an IPI to the pCPU
the vCPU runs on); the guest finds the pending ports in ``shared_info``
itself. Here the bits are already in the guest's RAM file, so the kick need
not carry them: it is a 4-byte record written to a FIFO the vCPU process
reads, one syscall on the hypervisor side and one wake-up on the guest's,
instead of a message through nng's queues and threads (a hop about half as
long). Records: ``kind`` (1 event-channel upcall, 2 LAPIC interrupt),
``vector``, ``flags`` (bit 0: EOI needed; for kind 2 bit 1: NMI).

The vCPU process creates the FIFO and names it in its ``VcpuHello``; the
hypervisor opens the write end. A full FIFO or a gone reader makes the
hypervisor fall back to an nng message, so no kick is ever lost.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import trio

RECORD = struct.Struct("<BBBB")
UPCALL, APIC = 1, 2
EOI, NMI = 1, 2


async def read_records(fd: int, rest: bytes, size: int) -> tuple[bytes, bytes]:
    """Wait for and read a non-blocking FIFO of ``size``-byte records:
    ``(whole records, the torn tail to prepend next time)``."""
    while True:
        try:
            data = rest + os.read(fd, 4096)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)
            continue
        whole = len(data) - len(data) % size
        return data[:whole], data[whole:]


def bell_path(memory_path: str | Path, vcpu: int) -> Path:
    """Next to the domain's RAM file (so a host's clean-up finds it)."""
    return Path(f"{memory_path}-vcpu{vcpu}.bell")


def sends_path(memory_path: str | Path, vcpu: int) -> Path:
    """The other direction, also next to the RAM file: the ports a vCPU posts
    ``EVTCHNOP_send`` on (records of :mod:`shared.evtchn_dev`)."""
    return Path(f"{memory_path}-vcpu{vcpu}.send")


class DoorbellReader:
    """The vCPU side: create the FIFO, then ``await receive()`` records."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        os.mkfifo(path, 0o600)
        # O_RDWR keeps the FIFO open for reading even when no writer is there yet,
        # so the fd never reports EOF between hypervisor restarts.
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self._buf = b""

    async def receive(self) -> list[tuple[int, int, int]]:
        """The next batch of ``(kind, vector, flags)`` records."""
        data, self._buf = await read_records(self.fd, self._buf, RECORD.size)
        return [RECORD.unpack_from(data, i)[:3] for i in range(0, len(data), RECORD.size)]

    def close(self) -> None:
        if self.fd >= 0:
            try:
                trio.lowlevel.notify_closing(self.fd)
            except RuntimeError:
                pass
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)


class DoorbellWriter:
    """The hypervisor side of one vCPU's doorbell."""

    def __init__(self, path: Path) -> None:
        if not stat.S_ISFIFO(os.stat(path).st_mode):
            raise ValueError(f"{path} is not a FIFO")
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)

    def ring(self, kind: int, vector: int, flags: int) -> bool:
        """Kick; False if the FIFO is full or its reader gone (use the fallback)."""
        try:
            return os.write(self.fd, RECORD.pack(kind, vector & 0xFF, flags, 0)) == RECORD.size
        except (BlockingIOError, BrokenPipeError, OSError):
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
