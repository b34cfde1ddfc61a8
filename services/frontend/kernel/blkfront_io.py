"""Bios a workload queues without waiting for each and collects as they
complete: Linux's ``io_submit``/``io_getevents``, how fio's libaio engine
keeps a queue depth from one thread (the ``block_raw`` workload uses it)."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from services.frontend.kernel.blkfront_core import Completion
from services.frontend.kernel.blkfront_state import BioKind

if TYPE_CHECKING:
    from services.frontend.kernel.blkfront import BlockDevice


class BlockIOError(OSError):
    """A bio that did not complete with BLKIF_RSP_OKAY."""


class IoContext:
    """Bios queued without waiting for each (``io_submit``) and collected as
    they complete (``io_getevents``): how fio's libaio engine keeps a queue
    depth from one thread. Made by :meth:`BlockDevice.io_context`.

    With ``end_io``, each completion goes to that callback instead, called
    in the interrupt handler as it completes (a bio's ``bi_end_io``): a
    kernel-side I/O generator that starts the next bio from there keeps its
    queue depth with no task switch per completion; :meth:`drained` waits
    for the last."""

    def __init__(
        self, dev: BlockDevice, end_io: Callable[[Completion], None] | None = None
    ) -> None:
        self.dev = dev
        self.in_flight = 0
        self.end_io = end_io
        self._ready: list[Completion] = []
        self._wakeup = trio.Event()

    def start(self, kind: BioKind, sector: int, nsectors: int = 0, data: bytes = b"") -> int:
        """Queue one bio; its :class:`Completion` comes back from :meth:`reap`."""
        dev = self.dev
        if dev.core is None:
            raise BlockIOError(errno.ENXIO, f"{dev.name}: not attached")
        bio = dev.core.submit(kind, sector, nsectors, data)
        dev._contexts[bio] = self
        self.in_flight += 1
        dev._schedule_kick()
        return bio

    async def reap(self) -> list[Completion]:
        """Completions of this context's bios, at least one (waiting for it).
        A failed bio is a completion with its status, not an exception."""
        if self.end_io is not None:
            raise RuntimeError("completions go to end_io: wait with drained()")
        while not self._ready:
            if not self.in_flight:
                raise RuntimeError("reap with no bio in flight")
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        out, self._ready = self._ready, []
        self.in_flight -= len(out)
        return out

    async def drained(self) -> None:
        """Wait until no bio of this context is in flight."""
        while self.in_flight:
            self._wakeup = trio.Event()
            await self._wakeup.wait()

    def _done(self, c: Completion) -> bool:
        """A bio of ours completed; True if that woke a task."""
        if self.end_io is None:
            self._ready.append(c)
            self._wakeup.set()
            return True
        self.in_flight -= 1
        try:
            self.end_io(c)  # interrupt context: it may start more, it may not wait
        except Exception as exc:  # a callback's bug must not cost the other completions
            self.dev.k.log(f"{self.dev.name}: end_io of bio {c.bio} failed: {exc!r}")
        if self.in_flight:
            return False
        self._wakeup.set()
        return True
