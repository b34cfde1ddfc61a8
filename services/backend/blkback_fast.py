"""Recognising the steady-state request (sans-IO): a READ or WRITE, direct or
INDIRECT, of whole consecutive 4 KiB pages (the last one may end early), on a
device that can take it. Such a request needs none of the general path's
records: :func:`fast_request` reads its header with one ``struct`` call and
:func:`whole_page_sectors` checks its segments as columns.

Anything else (another operation, a partial or odd segment, a range or
access the device refuses, a malformed slot) answers ``None``: the general
path (:mod:`blkback_request`) then checks it again, refuses it with the right
status and counts it. So a request is never refused here, only passed on.
"""

from __future__ import annotations

import functools
import struct

from services.backend.blkback_request import DeviceLimits
from shared.abi.blkif import (
    BLKIF_MAX_INDIRECT_SEGMENTS,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    REQUEST,
    REQUEST_INDIRECT,
    SECTORS_PER_PAGE,
    SEGMENTS_PER_INDIRECT_FRAME,
    BlkifOp,
)

READ, WRITE, INDIRECT = int(BlkifOp.READ), int(BlkifOp.WRITE), int(BlkifOp.INDIRECT)
_DIRECT = REQUEST.struct
_INDIRECT = REQUEST_INDIRECT.struct
_LAST = SECTORS_PER_PAGE - 1
#: the header and first segment of a direct request (the common 4 KiB case)
_ONE = struct.Struct("<BBH4xQQIBB2x")
assert _DIRECT.format.startswith(_ONE.format)


@functools.cache
def _zeros(n: int) -> bytes:
    return bytes(n)


@functools.cache
def _sevens(n: int) -> bytes:
    return bytes([_LAST]) * n


def whole_page_sectors(firsts: bytes, lasts: bytes) -> int:
    """Sectors covered by segments that start at sector 0 of their page and
    fill it, except that the last may end early; 0 if they do not."""
    n = len(lasts)
    if n == 0 or firsts != _zeros(n) or lasts[: n - 1] != _sevens(n - 1) or lasts[-1] > _LAST:
        return 0
    return (n - 1) * SECTORS_PER_PAGE + lasts[-1] + 1


def fast_request(
    slot: bytes, limits: DeviceLimits
) -> tuple[int, int, int, int, tuple[int, ...], tuple[int, ...]] | None:
    """``(id, op, sector, nr_sectors, grefs, indirect_grefs)`` of a request
    the fast path may run, else None. For INDIRECT, ``op`` is its
    ``indirect_op``, ``nr_sectors`` is 0 and ``grefs`` empty: they are read
    from the indirect pages (:func:`whole_page_sectors` checks them)."""
    op = slot[0]
    if op == INDIRECT:
        _, op, nseg, rid, sector, _handle, *refs = _INDIRECT.unpack_from(slot)
        cap = min(limits.max_indirect_segments, BLKIF_MAX_INDIRECT_SEGMENTS)
        if op > WRITE or not 0 < nseg <= cap or _refused(op, sector, nseg, limits):
            return None
        npages = -(-nseg // SEGMENTS_PER_INDIRECT_FRAME)
        return rid, op, sector, nseg, (), tuple(refs[:npages])
    if op > WRITE:
        return None
    if slot[1] == 1:  # one page: its one segment read with the header
        _, _, _, rid, sector, gref, first, last = _ONE.unpack_from(slot)
        if first or last > _LAST or _refused(op, sector, last + 1, limits):
            return None
        return rid, op, sector, last + 1, (gref,), ()
    fields = _DIRECT.unpack_from(slot)
    nseg = fields[1]
    if not 0 < nseg <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
        return None
    segs = fields[5 : 5 + 3 * nseg]
    nsect = whole_page_sectors(bytes(segs[1::3]), bytes(segs[2::3]))
    if not nsect or _refused(op, fields[4], nsect, limits):
        return None
    return fields[3], op, fields[4], nsect, segs[0::3], ()


def _refused(op: int, sector: int, nsect: int, limits: DeviceLimits) -> bool:
    """True when the device would refuse this range or access (for INDIRECT,
    ``nsect`` is the segment count: at least one sector each)."""
    return (
        not limits.has_media or (op == WRITE and limits.readonly) or sector + nsect > limits.sectors
    )
