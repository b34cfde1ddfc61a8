"""Grant tables v1 for every domain of a host (xen-reference section 6).

Each domain's table is an array of real 8-byte ``grant_entry_v1`` in 4 KiB
frames. A frame starts in hypervisor memory (as Xen's own pages do, so the
domain builder can seed refs 0 and 1) and moves into guest RAM when the guest
maps it with ``XENMEM_add_to_physmap(XENMAPSPACE_grant_table, idx, gpfn)``
(:meth:`GrantTables.place_frame`); from then on guest and hypervisor read and
write the same bytes.

``map_grant_ref`` checks, in this order: GNTMAP flags, the HVM-forbidden flags,
the granting domain, the ref bound, the entry's type and grantee, readonly vs a
writable map, the frame inside the granter's RAM, a free maptrack handle. It
then sets ``GTF_reading`` (and ``GTF_writing``) in the entry and tells the mapper
which frame of which domain's memory file to map. ``copy`` validates both sides
and returns a :class:`CopyMove` that :meth:`GrantTables.perform` executes on the
domains' memory (or against bytes shipped in a message when a side belongs to a
domain with no RAM file here, like dom0's backends).
"""

from __future__ import annotations

import collections
import struct
from typing import TypeVar

import attrs

from services.hypervisor.gnttab_state import CopyMove, GnttabStats, GrantInUse, GrantMapping
from shared.abi.constants import DOMID
from shared.abi.grant import (
    DEFAULT_MAX_GRANT_FRAMES,
    GNTCOPY,
    GNTMAP,
    GNTST,
    GRANT_ENTRIES_PER_FRAME,
    GTF,
    GnttabCopy,
    GnttabMapGrantRef,
    GnttabQuerySize,
    GnttabSetupTable,
    GnttabUnmapGrantRef,
    GrantEntry,
    grant_type,
)
from shared.abi.ring import PAGE_SIZE, Buffer

OpT = TypeVar(
    "OpT", GnttabSetupTable, GnttabQuerySize, GnttabMapGrantRef, GnttabUnmapGrantRef, GnttabCopy
)

# Xen 4.17: max_maptrack_frames 1024, 256 handles per frame.
DEFAULT_MAX_MAPTRACK = 1024 * 256
INVALID_GFN = 2**64 - 1
_U16 = struct.Struct("<H")
_HVM_FORBIDDEN = GNTMAP.DEVICE_MAP | GNTMAP.APPLICATION_MAP | GNTMAP.CONTAINS_PTE


@attrs.define(eq=False)
class _Table:
    domid: int
    memory: Buffer | None  # None: no guest RAM here (dom0's backends)
    hvm: bool
    privileged: bool
    max_frames: int
    frames: list[Buffer] = attrs.Factory(lambda: [bytearray(PAGE_SIZE)])
    gpfns: list[int] = attrs.Factory(lambda: [INVALID_GFN])
    maptrack: dict[int, GrantMapping] = attrs.Factory(dict)  # this domain as mapper
    pins: dict[int, list[int]] = attrs.Factory(dict)  # ref -> [readers, writers]

    @property
    def nr_pages(self) -> int | None:
        return None if self.memory is None else len(self.memory) // PAGE_SIZE

    def entry_at(self, ref: int) -> tuple[Buffer, int]:
        return self.frames[ref // GRANT_ENTRIES_PER_FRAME], ref % GRANT_ENTRIES_PER_FRAME * 8

    def entry(self, ref: int) -> GrantEntry:
        return GrantEntry.decode(*self.entry_at(ref))

    def set_flags(self, ref: int, set_: int = 0, clear: int = 0) -> None:
        buf, off = self.entry_at(ref)
        _U16.pack_into(buf, off, (_U16.unpack_from(buf, off)[0] | set_) & ~clear & 0xFFFF)


class GrantTables:
    """The grant tables of all domains and the mappings between them."""

    def __init__(self, max_maptrack: int = DEFAULT_MAX_MAPTRACK) -> None:
        self._tables: dict[int, _Table] = {}
        self._max_maptrack = max_maptrack
        self._ops: collections.Counter[str] = collections.Counter()
        self._status: collections.Counter[str] = collections.Counter()

    def add_domain(
        self,
        domid: int,
        memory: Buffer | None,
        hvm: bool = True,
        privileged: bool = False,
        max_frames: int = DEFAULT_MAX_GRANT_FRAMES,
    ) -> None:
        if domid in self._tables:
            raise ValueError(f"domain {domid} already has a grant table")
        self._tables[domid] = _Table(domid, memory, hvm, privileged, max_frames)

    def remove_domain(self, domid: int) -> None:
        """Destroy: drop the domain's own mappings and every mapping of its grants."""
        gone = self._tables.pop(domid, None)
        if gone is None:
            return
        for handle in list(gone.maptrack):
            self._unpin(gone, handle)
        for t in self._tables.values():
            for handle, m in list(t.maptrack.items()):
                if m.granter == domid:
                    del t.maptrack[handle]

    def place_frame(self, domid: int, idx: int, gpfn: int) -> int:
        """``XENMEM_add_to_physmap(grant_table, idx, gpfn)``: grow the table to
        ``idx + 1`` frames and show frame ``idx`` at ``gpfn``. 0 or -EINVAL."""
        t = self._tables[domid]
        if t.nr_pages is None or not 0 <= idx < t.max_frames or not 0 <= gpfn < t.nr_pages:
            return -22
        self._grow(t, idx + 1)
        page = memoryview(t.memory)[gpfn * PAGE_SIZE : (gpfn + 1) * PAGE_SIZE]
        page[:] = bytes(t.frames[idx])
        t.frames[idx], t.gpfns[idx] = page, gpfn
        return 0

    def frame(self, domid: int, idx: int) -> Buffer:
        """Frame ``idx`` of a table (tests and the domain builder write grants here)."""
        return self._tables[domid].frames[idx]

    # --- GNTTABOP_* ----------------------------------------------------------------------

    def setup_table(self, caller: int, op: GnttabSetupTable) -> tuple[GnttabSetupTable, list[int]]:
        """Grow ``dom``'s table to ``nr_frames``; returns the GFN of each frame
        (``INVALID_GFN`` for one the guest has not placed in its physmap yet)."""
        t, status = self._target(caller, op.dom)
        if t is not None and op.nr_frames > t.max_frames:
            status = GNTST.GENERAL_ERROR
        if t is None or status:
            return self._count("setup_table", attrs.evolve(op, status=status)), []
        self._grow(t, op.nr_frames)
        frames = t.gpfns[: op.nr_frames]
        return self._count("setup_table", attrs.evolve(op, status=GNTST.OKAY)), frames

    def query_size(self, caller: int, op: GnttabQuerySize) -> GnttabQuerySize:
        t, status = self._target(caller, op.dom)
        if t is None or status:
            return self._count("query_size", attrs.evolve(op, status=status))
        out = GnttabQuerySize(op.dom, len(t.frames), t.max_frames, GNTST.OKAY)
        return self._count("query_size", out)

    def map_grant_ref(
        self, caller: int, op: GnttabMapGrantRef
    ) -> tuple[GnttabMapGrantRef, GrantMapping | None]:
        def fail(status: GNTST) -> tuple[GnttabMapGrantRef, None]:
            return self._count("map_grant_ref", attrs.evolve(op, status=status)), None

        lt = self._tables[caller]
        if not op.flags & (GNTMAP.HOST_MAP | GNTMAP.DEVICE_MAP):
            return fail(GNTST.BAD_GNTREF)
        if lt.hvm and op.flags & _HVM_FORBIDDEN:
            return fail(GNTST.GENERAL_ERROR)
        rt = self._tables.get(op.dom)  # by id: DOMID_SELF is not a mappable domain
        if rt is None:
            return fail(GNTST.BAD_DOMAIN)
        if not 0 <= op.ref < len(rt.frames) * GRANT_ENTRIES_PER_FRAME:
            return fail(GNTST.BAD_GNTREF)
        entry = rt.entry(op.ref)
        if grant_type(entry.flags) != GTF.PERMIT_ACCESS or entry.domid != caller:
            return fail(GNTST.GENERAL_ERROR)
        readonly = bool(op.flags & GNTMAP.READONLY)
        if not readonly and entry.readonly:
            return fail(GNTST.GENERAL_ERROR)
        if rt.nr_pages is not None and entry.frame >= rt.nr_pages:
            return fail(GNTST.BAD_PAGE)
        handle = self._free_handle(lt)
        if handle < 0:
            return fail(GNTST.NO_SPACE)
        pin = rt.pins.setdefault(op.ref, [0, 0])
        pin[0 if readonly else 1] += 1
        rt.set_flags(op.ref, GTF.READING | (0 if readonly else GTF.WRITING))
        mapping = GrantMapping(handle, caller, rt.domid, op.ref, entry.frame, readonly)
        lt.maptrack[handle] = mapping
        out = attrs.evolve(op, status=GNTST.OKAY, handle=handle)
        return self._count("map_grant_ref", out), mapping

    def unmap_grant_ref(self, caller: int, op: GnttabUnmapGrantRef) -> GnttabUnmapGrantRef:
        lt = self._tables[caller]
        if op.handle not in lt.maptrack:
            return self._count("unmap_grant_ref", attrs.evolve(op, status=GNTST.BAD_HANDLE))
        self._unpin(lt, op.handle)
        return self._count("unmap_grant_ref", attrs.evolve(op, status=GNTST.OKAY))

    def copy(self, caller: int, op: GnttabCopy) -> tuple[GnttabCopy, CopyMove | None]:
        """Validate one ``gnttab_copy``; the bytes move in :meth:`perform`. Xen sets
        reading/writing only while it copies, so no flag outlives the op here."""

        def fail(status: GNTST) -> tuple[GnttabCopy, None]:
            return self._count("copy", attrs.evolve(op, status=status)), None

        if op.source.offset + op.len > PAGE_SIZE or op.dest.offset + op.len > PAGE_SIZE:
            return fail(GNTST.BAD_COPY_ARG)
        src_gref, dst_gref = (
            bool(op.flags & GNTCOPY.SOURCE_GREF),
            bool(op.flags & GNTCOPY.DEST_GREF),
        )
        if (not src_gref and op.source.domid != DOMID.SELF) or (
            not dst_gref and op.dest.domid != DOMID.SELF
        ):
            return fail(GNTST.PERMISSION_DENIED)
        sides = []
        for ptr, by_gref, writable in ((op.source, src_gref, False), (op.dest, dst_gref, True)):
            t = self._tables.get(caller if ptr.domid == DOMID.SELF else ptr.domid)
            if t is None:
                return fail(GNTST.BAD_DOMAIN)
            status, gfn = self._copy_side(caller, t, ptr.u, by_gref, writable)
            if status:
                return fail(status)
            sides.append((t.domid, gfn, ptr.offset))
        (sd, sg, so), (dd, dg, do) = sides
        move = CopyMove(sd, sg, so, dd, dg, do, op.len)
        return self._count("copy", attrs.evolve(op, status=GNTST.OKAY)), move

    def perform(self, move: CopyMove, payload: bytes = b"") -> bytes:
        """Execute a validated copy. A side in a domain with no RAM here is the
        message: the source bytes come from ``payload``, destination bytes are
        returned to be shipped back."""
        src = self._tables[move.src_dom].memory
        dst = self._tables[move.dst_dom].memory
        if src is None:
            data = bytes(payload[: move.len]).ljust(move.len, b"\0")
        else:
            at = move.src_gfn * PAGE_SIZE + move.src_offset
            data = bytes(src[at : at + move.len])
        if dst is None:
            return data
        at = move.dst_gfn * PAGE_SIZE + move.dst_offset
        dst[at : at + move.len] = data
        return b""

    # --- introspection ---------------------------------------------------------------------

    def mappings(self, domid: int) -> tuple[GrantMapping, ...]:
        """Mappings held by ``domid`` and mappings of ``domid``'s grants."""
        return tuple(
            m
            for t in self._tables.values()
            for m in t.maptrack.values()
            if domid in (m.mapper, m.granter)
        )

    def grants_in_use(self, domid: int) -> tuple[GrantInUse, ...]:
        t = self._tables[domid]
        out = []
        for ref, (readers, writers) in sorted(t.pins.items()):
            e = t.entry(ref)
            out.append(GrantInUse(ref, e.domid, e.frame, e.flags, readers, writers))
        return tuple(out)

    def statistics(self) -> GnttabStats:
        live = sum(len(t.maptrack) for t in self._tables.values())
        return GnttabStats(dict(self._ops), dict(self._status), live)

    # --- internals ---------------------------------------------------------------------------

    def _target(self, caller: int, dom: int) -> tuple[_Table | None, GNTST]:
        domid = caller if dom == DOMID.SELF else dom
        t = self._tables.get(domid)
        if t is None:
            return None, GNTST.BAD_DOMAIN
        if domid != caller and not self._tables[caller].privileged:
            return None, GNTST.PERMISSION_DENIED
        return t, GNTST.OKAY

    def _copy_side(
        self, caller: int, t: _Table, u: int, by_gref: bool, writable: bool
    ) -> tuple[GNTST, int]:
        if not by_gref:
            if t.nr_pages is not None and not 0 <= u < t.nr_pages:
                return GNTST.BAD_PAGE, 0
            return GNTST.OKAY, u
        ref = u & 0xFFFFFFFF
        if ref >= len(t.frames) * GRANT_ENTRIES_PER_FRAME:
            return GNTST.BAD_GNTREF, 0
        e = t.entry(ref)
        if grant_type(e.flags) != GTF.PERMIT_ACCESS or e.domid != caller:
            return GNTST.GENERAL_ERROR, 0
        if writable and e.readonly:
            return GNTST.GENERAL_ERROR, 0
        if t.nr_pages is not None and e.frame >= t.nr_pages:
            return GNTST.BAD_PAGE, 0
        return GNTST.OKAY, e.frame

    def _grow(self, t: _Table, nr_frames: int) -> None:
        while len(t.frames) < nr_frames:
            t.frames.append(bytearray(PAGE_SIZE))
            t.gpfns.append(INVALID_GFN)

    def _free_handle(self, t: _Table) -> int:
        if len(t.maptrack) >= self._max_maptrack:
            return -1
        handle = len(t.maptrack)
        while handle in t.maptrack:  # a hole below exists after unmaps
            handle = (handle + 1) % self._max_maptrack
        return handle

    def _unpin(self, mapper: _Table, handle: int) -> None:
        m = mapper.maptrack.pop(handle)
        rt = self._tables.get(m.granter)
        if rt is None or m.ref not in rt.pins:
            return
        pin = rt.pins[m.ref]
        pin[0 if m.readonly else 1] -= 1
        if pin[1] == 0:
            rt.set_flags(m.ref, clear=GTF.WRITING)
        if pin == [0, 0]:
            rt.set_flags(m.ref, clear=GTF.READING)
            del rt.pins[m.ref]

    def _count(self, op: str, out: OpT) -> OpT:
        self._ops[op] += 1
        self._status[f"{op}:{GNTST(out.status).name.lower()}"] += 1
        return out
