"""Dom0's event-channel device: port numbers through two FIFOs, no nng.

Linux dom0 processes use ``/dev/xen/evtchn``: ``read()`` returns the ports
that fired as ``uint32`` values, and ``IOCTL_EVTCHN_NOTIFY`` sends on one.
Here a dom0 process (blkback) makes two FIFOs in the host's run directory and
names them to the hypervisor on its authenticated channel
(``Dom0EvtchnDevice``):

- ``evtchn-<pid>.fired`` — the hypervisor writes the ports that fired for
  this process (what ``EvtchnNotify`` carries over nng);
- ``evtchn-<pid>.send`` — the process writes the ports it sends on, each an
  ``EVTCHNOP_send`` the hypervisor checks and carries out as for a hypercall
  from that process (one-way: the result of a send on a port the process
  owns is always 0).

A port is 4 bytes and a write of up to ``PIPE_BUF`` bytes is atomic, so
records never tear. Either side falls back to the nng message when a write
fails (FIFO full, reader gone), so no event is lost. Each notification then
costs one ``write`` and one wake-up instead of a trip through nng's worker
threads (perf: half the hypervisor's time per block request was those
threads' context switches).
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import trio

from shared.doorbell import read_records

PORT = struct.Struct("<I")
PIPE_BUF = 4096
FIRED, SEND = ".fired", ".send"


def device_paths(rundir: Path, pid: int) -> tuple[Path, Path]:
    """``(fired, send)`` FIFOs of process ``pid``."""
    return rundir / f"evtchn-{pid}{FIRED}", rundir / f"evtchn-{pid}{SEND}"


def is_device_path(rundir: Path, path: Path, suffix: str) -> bool:
    """``path`` is a FIFO this module would have made in ``rundir``."""
    try:
        mode = path.lstat().st_mode
    except OSError:
        return False
    return (
        path.parent == rundir
        and path.name.startswith("evtchn-")
        and path.name.endswith(suffix)
        and stat.S_ISFIFO(mode)
    )


def pack_ports(ports: list[int] | tuple[int, ...]) -> bytes:
    return b"".join(PORT.pack(p) for p in ports)


class PortReader:
    """The read end of one FIFO of ports (``O_RDWR``: never EOF while open)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
        self._rest = b""

    async def receive(self) -> list[int]:
        """The next batch of ports; raises ``trio.ClosedResourceError`` once closed."""
        if self.fd < 0:
            raise trio.ClosedResourceError
        data, self._rest = await read_records(self.fd, self._rest, PORT.size)
        return [p for (p,) in PORT.iter_unpack(data)]

    def take_nowait(self) -> list[int]:
        """Whatever ports are in the FIFO now, without waiting (maybe none)."""
        if self.fd < 0:
            return []
        try:
            data = self._rest + os.read(self.fd, PIPE_BUF)
        except BlockingIOError:
            data = self._rest
        whole = len(data) - len(data) % PORT.size
        self._rest = data[whole:]
        return [p for (p,) in PORT.iter_unpack(data[:whole])]

    def close(self) -> None:
        if self.fd >= 0:
            try:
                trio.lowlevel.notify_closing(self.fd)
            except RuntimeError:
                pass  # not in a Trio run
            os.close(self.fd)
            self.fd = -1


class PortWriter:
    """The write end of one FIFO of ports."""

    def __init__(self, path: Path, flags: int = os.O_WRONLY) -> None:
        self.path = path
        self.fd = os.open(path, flags | os.O_NONBLOCK)

    def write(self, ports: list[int] | tuple[int, ...]) -> bool:
        """All of ``ports`` in one atomic write; False if it could not be
        written (full, or the reader gone): the caller falls back."""
        data = pack_ports(ports)
        if self.fd < 0 or len(data) > PIPE_BUF:
            return False
        try:
            return os.write(self.fd, data) == len(data)
        except OSError:  # BlockingIOError (full), BrokenPipeError (reader gone)
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def make_fifo(path: Path) -> None:
    """A fresh FIFO at ``path`` (a stale one from a dead process is replaced)."""
    path.unlink(missing_ok=True)
    os.mkfifo(path, 0o600)


class SendFifo:
    """A vCPU's posted sends: it makes the FIFO and writes the ports it sends
    on; the hypervisor reads them as ``EVTCHNOP_send`` hypercalls of that vCPU."""

    def __init__(self, path: Path) -> None:
        self.path = path
        make_fifo(path)
        # O_RDWR: opening for writing must not wait for (or fail without) a reader
        self.writer = PortWriter(path, os.O_RDWR)

    def send(self, port: int) -> bool:
        """Post a send on ``port``; False: make the hypercall instead."""
        return self.writer.write((port,))

    def close(self) -> None:
        self.writer.close()
        self.path.unlink(missing_ok=True)


class EvtchnDevice:
    """The dom0 process's side: makes both FIFOs, reads fired ports, writes sends."""

    def __init__(self, rundir: Path, pid: int | None = None) -> None:
        self.fired_path, self.send_path = device_paths(rundir, pid or os.getpid())
        for path in (self.fired_path, self.send_path):
            make_fifo(path)
        self.fired = PortReader(self.fired_path)
        # O_RDWR: opening for writing must not wait for (or fail without) a reader
        self.sends = PortWriter(self.send_path, os.O_RDWR)

    async def receive(self) -> list[int]:
        return await self.fired.receive()

    def notify(self, port: int) -> bool:
        """``EVTCHNOP_send`` on ``port``; False: use the hypercall instead."""
        return self.sends.write((port,))

    def close(self) -> None:
        self.fired.close()
        self.sends.close()
        for path in (self.fired_path, self.send_path):
            path.unlink(missing_ok=True)


class HypervisorEnd:
    """The hypervisor's side of one process's device."""

    def __init__(self, fired: Path, send: Path) -> None:
        self.fired = PortWriter(fired)  # fails (ENXIO) unless the process has it open
        try:
            self.sends = PortReader(send)
        except OSError:
            self.fired.close()
            raise

    def close(self) -> None:
        self.fired.close()
        self.sends.close()
