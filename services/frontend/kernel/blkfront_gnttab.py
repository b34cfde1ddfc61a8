"""The guest's grant table and the pages blkfront grants from (xen-reference 6).

:class:`GrantTable` hands out refs over the real v1 table bytes (frames the
guest placed in its physmap with ``XENMEM_add_to_physmap(grant_table)``) and
revokes them; a ref the backend still maps cannot be revoked (a dead backend
never unmaps) and is *leaked*: never handed out again. :class:`PagePool` is the
frames blkfront owns for rings, data and indirect pages. Both are sans-IO;
:func:`kernel_grants` is the one place that makes hypercalls, once per kernel.

The grant table is a kernel facility that netfront will share; it lives here
until the kernel has its own (``gnttab.py``).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import attrs
import trio

from services.hypervisor.messages import MemoryOp
from shared.abi import grant as gt
from shared.abi import hypercall as hc
from shared.abi.constants import DOMID, XENMAPSPACE, XENMEM
from shared.abi.ring import PAGE_SIZE, Buffer

if TYPE_CHECKING:
    from services.frontend.kernel.kernel import Kernel

#: 8192 refs (Xen's default limit is 64 frames): 16 requests of 1 MiB on
#: persistent pages take 16 * 257, and 8 frames (4096) left a 16th waiting
#: for refs that never came free (a 1 MiB read at queue depth 16 ran at a
#: quarter of its speed at 8)
GRANT_FRAMES = 16
MAX_POOL_PAGES = 8192  #: 32 MiB of I/O pages at most


class GrantTable:
    """Refs of a v1 grant table; refs below ``GNTTAB_NR_RESERVED_ENTRIES`` are
    the toolstack's (console, xenstore) and never handed out."""

    def __init__(self, table: Buffer, nr_refs: int) -> None:
        self.table = table
        self.nr_refs = nr_refs
        self._free = list(range(nr_refs - 1, gt.GNTTAB_NR_RESERVED_ENTRIES - 1, -1))
        self.leaked: set[int] = set()

    @property
    def available(self) -> int:
        return len(self._free)

    def grant(self, domid: int, gfn: int, readonly: bool) -> int:
        """``gnttab_grant_foreign_access``: a fresh ref letting ``domid`` at ``gfn``."""
        if not self._free:
            raise GrantsExhausted("no free grant reference")
        ref = self._free.pop()
        gt.write_grant(self.table, ref, domid, gfn, readonly)
        return ref

    def end(self, ref: int) -> bool:
        """``gnttab_end_foreign_access``: revoke and free ``ref``; False (and the ref
        is leaked) when the grantee still has it mapped."""
        if not gt.end_grant(self.table, ref):
            self.leaked.add(ref)
            return False
        self._free.append(ref)
        return True

    def claim(self, ref: int) -> None:
        """Mark ``ref`` in use (a checkpoint restored: the ref is still granted)."""
        if ref in self._free:
            self._free.remove(ref)

    def entry(self, ref: int) -> gt.GrantEntry:
        return gt.read_entry(self.table, ref)


class GrantsExhausted(RuntimeError):
    pass


class PagePool:
    """Guest frames blkfront may use, handed out and given back by number."""

    def __init__(self, gfns: range) -> None:
        self.gfns = gfns
        self._free = set(gfns)
        self.leaked: set[int] = set()

    @property
    def available(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """``n`` frames (any), or None if fewer are free."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def alloc_run(self, n: int) -> list[int] | None:
        """``n`` consecutive frames (a multi-page ring), or None."""
        if n <= 0 or n > len(self._free):
            return None
        free = sorted(self._free)
        for end in range(n - 1, len(free)):
            if free[end] - free[end - n + 1] == n - 1:  # distinct and sorted: a run
                run = free[end - n + 1 : end + 1]
                self._free.difference_update(run)
                return run
        return None

    def claim(self, gfn: int) -> None:
        self._free.discard(gfn)

    def free(self, gfns: list[int] | tuple[int, ...]) -> None:
        self._free.update(gfns)

    def leak(self, gfns: list[int] | tuple[int, ...]) -> None:
        """Frames a backend may still write into: never reused."""
        self.leaked.update(gfns)


@attrs.define(eq=False)
class KernelGrants:
    """One kernel's grant table and I/O page pool (vCPU0's, shared by its drivers)."""

    table: GrantTable
    pool: PagePool
    ram: Buffer
    frames_gfn: int


_BY_KERNEL: weakref.WeakKeyDictionary[Kernel, KernelGrants] = weakref.WeakKeyDictionary()
_LOCKS: weakref.WeakKeyDictionary[Kernel, trio.Lock] = weakref.WeakKeyDictionary()


def layout(nr_pages: int, reserved: int) -> tuple[int, range]:
    """Where the grant frames go (the top of RAM) and the pool (below them, at
    most half of RAM, never below the kernel's ``reserved`` pages)."""
    frames_gfn = nr_pages - GRANT_FRAMES
    size = min(MAX_POOL_PAGES, nr_pages // 2, frames_gfn - reserved)
    if size < 64:
        raise ValueError(f"guest RAM of {nr_pages} pages leaves no room for block I/O")
    return frames_gfn, range(frames_gfn - size, frames_gfn)


async def kernel_grants(k: Kernel) -> KernelGrants:
    """The kernel's grant table, its frames placed in the physmap on first use."""
    # Several devices probe at once, each in its own task: without the lock two
    # could both find no table, each build one over the same frames and pool,
    # and hand out the same refs and pages (their rings then overwrote each
    # other: a stall seen under load).
    async with _LOCKS.setdefault(k, trio.Lock()):
        return _BY_KERNEL.get(k) or await _build_kernel_grants(k)


async def _build_kernel_grants(k: Kernel) -> KernelGrants:
    from services.frontend.kernel.layout import pages_needed

    ram = k.mem.ram
    frames_gfn, pool = layout(len(ram) // PAGE_SIZE, pages_needed(k.nr_cpus))
    for idx in range(GRANT_FRAMES):
        arg = hc.XenAddToPhysmap(DOMID.SELF, XENMAPSPACE.grant_table, idx, frames_gfn + idx)
        rc = (await k.call(MemoryOp(XENMEM.add_to_physmap, arg.pack()))).value
        if rc != 0:
            raise OSError(-rc, f"XENMEM_add_to_physmap(grant_table, {idx}) failed: {rc}")
    table = memoryview(ram)[frames_gfn * PAGE_SIZE : (frames_gfn + GRANT_FRAMES) * PAGE_SIZE]
    got = KernelGrants(
        GrantTable(table, GRANT_FRAMES * gt.GRANT_ENTRIES_PER_FRAME),
        PagePool(pool),
        ram,
        frames_gfn,
    )
    _BY_KERNEL[k] = got
    return got
