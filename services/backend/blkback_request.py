"""From a ring slot to an I/O plan: the checks blkback makes before touching
a grant or the image (sans-IO).

A request goes through two steps. :func:`admit` decodes the slot (copied out
of the ring first, so the frontend cannot change it under us), applies the
header rules of ``validate_request`` and the device's own (read-only, no
media, which operations we offered) and says which grants must be mapped.
For INDIRECT requests the segments live in granted pages; once they are read,
:func:`plan_with_segments` checks each one and the sector range. Every
refusal is a :class:`~shared.abi.blkif.BlkifProtocolError` carrying the
``BLKIF_RSP_*`` status to answer with.
"""

from __future__ import annotations

import enum

import attrs

from shared.abi.blkif import (
    SECTOR_SIZE,
    AnyRequest,
    BlkifOp,
    BlkifProtocolError,
    BlkifRequest,
    BlkifRequestDiscard,
    BlkifRequestIndirect,
    BlkifRsp,
    Segment,
    decode_request,
    indirect_pages,
    validate_request,
    validate_segment,
)


class Kind(enum.Enum):
    """How the ordering queue treats a request."""

    READ = "read"
    WRITE = "write"
    DISCARD = "discard"
    FLUSH = "flush"  #: FLUSH_DISKCACHE: after earlier writes; may carry data
    BARRIER = "barrier"  #: WRITE_BARRIER: a full fence; may carry data

    @property
    def modifies(self) -> bool:
        return self is not Kind.READ


@attrs.frozen
class DeviceLimits:
    """What this device offered the frontend and what its medium allows."""

    sectors: int
    readonly: bool
    has_media: bool
    max_indirect_segments: int
    discard: bool


@attrs.frozen
class Admitted:
    """A request past the header checks. ``segments`` is empty for INDIRECT
    until its ``indirect_grefs`` pages are read."""

    request: AnyRequest
    kind: Kind
    segments: tuple[Segment, ...]
    indirect_grefs: tuple[int, ...] = ()

    @property
    def id(self) -> int:
        return self.request.id

    @property
    def writes_guest_pages(self) -> bool:
        """READ fills the granted pages: they must be mapped writable."""
        return self.kind is Kind.READ


@attrs.frozen
class IoPlan:
    """What to do on the image: bytes from ``offset`` to/from ``segments`` in order."""

    kind: Kind
    offset: int
    segments: tuple[Segment, ...]
    discard_bytes: int = 0

    @property
    def nbytes(self) -> int:
        return sum(s.nr_sectors for s in self.segments) * SECTOR_SIZE


_KIND_OF_OP = {
    BlkifOp.READ: Kind.READ,
    BlkifOp.WRITE: Kind.WRITE,
    BlkifOp.WRITE_BARRIER: Kind.BARRIER,
    BlkifOp.FLUSH_DISKCACHE: Kind.FLUSH,
}


def admit(slot: bytes, limits: DeviceLimits) -> Admitted:
    """Decode and check one request slot; raise BlkifProtocolError to refuse it."""
    req = decode_request(slot)
    if req.operation not in set(BlkifOp) or req.operation == BlkifOp.RESERVED_1:
        raise BlkifProtocolError(f"unknown operation {req.operation}", BlkifRsp.EOPNOTSUPP)
    validate_request(req, limits.max_indirect_segments)
    if isinstance(req, BlkifRequestDiscard):
        if not limits.discard:
            raise BlkifProtocolError("discard not offered on this device", BlkifRsp.EOPNOTSUPP)
        _check_range(req.sector_number, req.nr_sectors, limits)
        return Admitted(req, Kind.DISCARD, ())
    if isinstance(req, BlkifRequestIndirect):
        kind = Kind.READ if req.indirect_op == BlkifOp.READ else Kind.WRITE
        _check_access(kind, True, limits)
        if len(req.indirect_grefs) < indirect_pages(req.nr_segments):
            raise BlkifProtocolError("fewer indirect pages than segments need")
        return Admitted(req, kind, (), req.indirect_grefs)
    assert isinstance(req, BlkifRequest)
    kind = _KIND_OF_OP[BlkifOp(req.operation)]
    _check_access(kind, bool(req.segments), limits)
    admitted = Admitted(req, kind, req.segments)
    plan(admitted, limits)  # range checks now, before any grant is mapped
    return admitted


def plan(admitted: Admitted, limits: DeviceLimits) -> IoPlan:
    """The I/O of an admitted request whose segments are known."""
    req = admitted.request
    if isinstance(req, BlkifRequestDiscard):
        return IoPlan(
            Kind.DISCARD, req.sector_number * SECTOR_SIZE, (), req.nr_sectors * SECTOR_SIZE
        )
    nr = sum(s.nr_sectors for s in admitted.segments)
    _check_range(req.sector_number, nr, limits)
    return IoPlan(admitted.kind, req.sector_number * SECTOR_SIZE, admitted.segments)


def plan_with_segments(
    admitted: Admitted, segments: tuple[Segment, ...], limits: DeviceLimits
) -> IoPlan:
    """Plan an INDIRECT request once its segments were read from its pages."""
    for seg in segments:
        validate_segment(seg)
    return plan(attrs.evolve(admitted, segments=segments), limits)


def _check_access(kind: Kind, has_data: bool, limits: DeviceLimits) -> None:
    if not has_data:
        return  # an empty flush or barrier touches no sector
    if not limits.has_media:
        raise BlkifProtocolError("no medium in the drive")
    if kind is not Kind.READ and limits.readonly:
        raise BlkifProtocolError("write to a read-only device")


def _check_range(sector: int, nr_sectors: int, limits: DeviceLimits) -> None:
    if nr_sectors and not limits.has_media:
        raise BlkifProtocolError("no medium in the drive")
    if sector < 0 or sector + nr_sectors > limits.sectors:
        raise BlkifProtocolError(
            f"sectors {sector}+{nr_sectors} outside a disk of {limits.sectors} sectors"
        )
