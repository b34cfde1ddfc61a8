"""Mapping a piece of a bio onto one blkif request (xen-reference 4; FreeBSD
``xbd_bio_command``, Linux ``blkif_queue_rw_req``), sans-IO.

Which operation: READ/WRITE as asked; an ordered write becomes
``BLKIF_OP_WRITE_BARRIER`` when the backend offers barriers, else a plain WRITE
sent *alone* (single-step: nothing else in flight before or during it); a flush
becomes ``BLKIF_OP_FLUSH_DISKCACHE``, else ``BLKIF_OP_WRITE_BARRIER`` without
segments, else nothing at all (the backend is write-through: Linux issues no
flushes then). How big: data sits at page offset 0 of consecutive pages, one
segment per page; up to 11 segments in the request itself, beyond that an
``BLKIF_OP_INDIRECT`` up to the backend's ``feature-max-indirect-segments``.
"""

from __future__ import annotations

import enum
import functools
import struct

from services.frontend.kernel.blkfront_state import BackendInfo, BioKind, Part
from shared.abi import blkif as bi
from shared.abi.ring import PAGE_SIZE, RING_IDX_MASK, FrontRing, RingError

SECTOR = bi.SECTOR_SIZE
SECTORS_PER_PAGE = bi.SECTORS_PER_PAGE
MAX_INDIRECT_SEGMENTS = 256  #: the frontend's own cap (Linux's default is 32)


class Plan(enum.Enum):
    """How a part goes out."""

    SEND = "send"  #: an ordinary request
    ALONE = "alone"  #: single-step: wait until idle, send it alone, hold the queue
    LOCAL = "local"  #: complete it here with OKAY (a flush the backend cannot take)
    UNSUPPORTED = "unsupported"  #: complete it here with EOPNOTSUPP (discard not offered)


def operation_for(kind: BioKind, be: BackendInfo) -> tuple[int | None, Plan]:
    """The blkif operation for a bio kind on this backend, and how to send it."""
    if kind == BioKind.READ:
        return bi.BlkifOp.READ, Plan.SEND
    if kind == BioKind.WRITE:
        return bi.BlkifOp.WRITE, Plan.SEND
    if kind == BioKind.WRITE_ORDERED:
        if be.barrier:
            return bi.BlkifOp.WRITE_BARRIER, Plan.SEND
        return bi.BlkifOp.WRITE, Plan.ALONE
    if kind == BioKind.FLUSH:
        if be.flush:
            return bi.BlkifOp.FLUSH_DISKCACHE, Plan.SEND
        if be.barrier:
            return bi.BlkifOp.WRITE_BARRIER, Plan.SEND
        return None, Plan.LOCAL
    if kind == BioKind.DISCARD:
        return (bi.BlkifOp.DISCARD, Plan.SEND) if be.discard else (None, Plan.UNSUPPORTED)
    raise ValueError(f"unknown bio kind {kind!r}")


def max_segments(be: BackendInfo, op: int) -> int:
    """Segments one request of ``op`` may carry: 11, or the indirect limit for
    READ/WRITE when the backend offers INDIRECT (barriers are never indirect)."""
    if op in (bi.BlkifOp.READ, bi.BlkifOp.WRITE) and be.max_indirect_segments > 0:
        cap = min(be.max_indirect_segments, MAX_INDIRECT_SEGMENTS, bi.BLKIF_MAX_INDIRECT_SEGMENTS)
        return max(cap, bi.BLKIF_MAX_SEGMENTS_PER_REQUEST)
    return bi.BLKIF_MAX_SEGMENTS_PER_REQUEST


def carries_data(kind: BioKind) -> bool:
    return kind in (BioKind.READ, BioKind.WRITE, BioKind.WRITE_ORDERED)


def pages_for(nsectors: int) -> int:
    return -(-nsectors // SECTORS_PER_PAGE)


def split(part: Part, max_pages: int) -> tuple[Part, Part | None]:
    """The head of ``part`` that fits ``max_pages`` pages, and the rest (or None)."""
    if not carries_data(part.kind) or pages_for(part.nsectors) <= max_pages:
        return part, None
    n = max_pages * SECTORS_PER_PAGE
    head = Part(part.bio, part.kind, part.sector, n, part.offset, part.seq)
    tail = Part(
        part.bio, part.kind, part.sector + n, part.nsectors - n, part.offset + n * SECTOR, part.seq
    )
    return head, tail


def segments(nsectors: int, refs: list[int]) -> list[bi.Segment]:
    """One segment per page: sectors ``0..k-1`` of each, the last page partial."""
    out = []
    left = nsectors
    for ref in refs:
        n = min(SECTORS_PER_PAGE, left)
        out.append(bi.Segment(ref, 0, n - 1))
        left -= n
    return out


def indirect_pages_needed(op: int, nr_segments: int) -> int:
    if (
        op in (bi.BlkifOp.READ, bi.BlkifOp.WRITE)
        and nr_segments > bi.BLKIF_MAX_SEGMENTS_PER_REQUEST
    ):
        return bi.indirect_pages(nr_segments)
    return 0


def encode(
    op: int,
    handle: int,
    rid: int,
    part: Part,
    data_refs: list[int],
    indirect_refs: list[int],
) -> bytes:
    """The ring slot for ``part`` as request ``rid`` (its indirect pages, if any,
    are filled by the caller with :func:`indirect_contents`)."""
    if op == bi.BlkifOp.DISCARD:
        return bi.BlkifRequestDiscard(0, handle, rid, part.sector, part.nsectors).encode()
    if not carries_data(part.kind):
        return bi.BlkifRequest.of(op, handle, rid, part.sector).encode()
    if indirect_refs:
        n = len(data_refs)
        req = bi.BlkifRequestIndirect(op, n, rid, part.sector, handle, tuple(indirect_refs))
        return req.encode()
    return direct_slot(op, handle, rid, part.sector, part.nsectors, data_refs)


def direct_slot(
    op: int, handle: int, rid: int, sector: int, nsectors: int, refs: list[int]
) -> bytes:
    """The ring slot of a request with its :func:`segments` in the slot, packed
    in one ``struct`` call (the same bytes as ``BlkifRequest.encode``)."""
    n = len(refs)
    fields = [0] * (3 * bi.BLKIF_MAX_SEGMENTS_PER_REQUEST)
    fields[0 : 3 * n : 3] = refs
    fields[2 : 3 * n : 3] = [SECTORS_PER_PAGE - 1] * n
    if n:
        fields[3 * n - 1] = (nsectors - 1) % SECTORS_PER_PAGE  # the last page may be partial
    slot = _REQUEST.pack(op, n, handle, rid, sector, *fields)
    return slot.ljust(bi.REQUEST.size, b"\0")


_REQUEST = bi.REQUEST.struct
_LAST = SECTORS_PER_PAGE - 1


@functools.cache
def _request_struct(n: int) -> struct.Struct:
    """A ``blkif_request`` header and its first ``n`` segments."""
    head, segment = "<BBH4xQQ", "IBB2x"
    assert bi.REQUEST.struct.format == head + segment * bi.BLKIF_MAX_SEGMENTS_PER_REQUEST
    return struct.Struct(head + segment * n)


def put_direct(
    ring: FrontRing, op: int, handle: int, rid: int, sector: int, nsectors: int, refs: list[int]
) -> None:
    """:func:`direct_slot` packed straight into the ring's next request slot
    (``RING_GET_REQUEST`` + fill + ``req_prod_pvt++``). As Linux's
    ``blkif_queue_rw_req``, only the ``nr_segments`` segments in use are
    written: the backend reads no further."""
    if ring.full():
        raise RingError("ring full: no free request slot")
    n = len(refs)
    idx = ring.req_prod_pvt
    sring = ring.sring
    off = sring.slot_offset(idx)
    last = (nsectors - 1) % SECTORS_PER_PAGE
    if n == 1:  # a request of one page: no list to build
        _request_struct(1).pack_into(sring.buf, off, op, 1, handle, rid, sector, refs[0], 0, last)
    else:
        fields = [0, 0, _LAST] * n
        fields[0::3] = refs
        fields[-1] = last
        _request_struct(n).pack_into(sring.buf, off, op, n, handle, rid, sector, *fields)
    ring.req_prod_pvt = (idx + 1) & RING_IDX_MASK


@functools.cache
def _segments_struct(n: int) -> struct.Struct:
    """``n`` packed ``blkif_request_segment`` (gref, first_sect, last_sect, pad)."""
    assert bi.SEGMENT_SIZE == 8
    return struct.Struct("<" + "IBBxx" * n)


def indirect_contents(nsectors: int, data_refs: list[int]) -> list[bytes]:
    """The bytes of each indirect page: packed segments, 512 per page (the
    same bytes as :func:`segments` encoded, built at C speed: a 1 MiB request
    has 256 of them)."""
    n = len(data_refs)
    fields: list[int] = [0] * (3 * n)
    fields[0::3] = data_refs
    fields[2::3] = [SECTORS_PER_PAGE - 1] * n
    if n:
        fields[-1] = (nsectors - 1) % SECTORS_PER_PAGE  # the last page may be partial
    raw = _segments_struct(n).pack(*fields)
    step = bi.SEGMENTS_PER_INDIRECT_FRAME * bi.SEGMENT_SIZE
    return [raw[k : k + step] for k in range(0, len(raw), step)]


assert PAGE_SIZE == SECTORS_PER_PAGE * SECTOR
