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

An :class:`IoPlan` holds its segments as columns (``grefs``, and the
``first_sect``/``last_sect`` bytes) rather than one record per segment: a
1 MiB indirect request has 256 segments, and :func:`indirect_columns` reads
them from the indirect pages with one ``struct`` call and two byte slices, so
checking them and summing their sectors runs at C speed.
"""

from __future__ import annotations

import enum
import functools
import struct

import attrs

from shared.abi.blkif import (
    SECTOR_SIZE,
    SECTORS_PER_PAGE,
    SEGMENT_SIZE,
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
class Columns:
    """Segments as columns: ``grefs[i]`` covers sectors ``firsts[i]..lasts[i]``
    (each checked to lie in ``0..7``, first <= last) of its page."""

    grefs: tuple[int, ...]
    firsts: bytes
    lasts: bytes

    def __len__(self) -> int:
        return len(self.grefs)

    @property
    def nr_sectors(self) -> int:
        return sum(self.lasts) - sum(self.firsts) + len(self.grefs)

    @property
    def whole_pages(self) -> bool:
        """Every segment is a full 4 KiB page (the common case, and the fast one)."""
        n = len(self.grefs)
        return self.firsts == _zeros(n) and self.lasts == _sevens(n)

    @classmethod
    def of(cls, segments: tuple[Segment, ...]) -> Columns:
        """Columns of segment records (checked)."""
        for seg in segments:
            validate_segment(seg)
        return cls(
            tuple(s.gref for s in segments),
            bytes(s.first_sect for s in segments),
            bytes(s.last_sect for s in segments),
        )


@functools.cache
def _zeros(n: int) -> bytes:
    return bytes(n)


@functools.cache
def _sevens(n: int) -> bytes:
    return bytes([SECTORS_PER_PAGE - 1]) * n


@functools.cache
def _grefs_of(n: int) -> struct.Struct:
    """The ``gref`` of each of ``n`` packed ``blkif_request_segment``."""
    return struct.Struct("<" + "I4x" * n)


def indirect_columns(raw: bytes, nr_segments: int) -> Columns:
    """The first ``nr_segments`` segments of the indirect pages' bytes ``raw``
    (the pages in order), checked as :func:`validate_segment` does."""
    if len(raw) < nr_segments * SEGMENT_SIZE:
        raise BlkifProtocolError(f"{nr_segments} segments need {nr_segments * SEGMENT_SIZE} bytes")
    raw = raw[: nr_segments * SEGMENT_SIZE]
    firsts, lasts = raw[4::SEGMENT_SIZE], raw[5::SEGMENT_SIZE]
    cols = Columns(_grefs_of(nr_segments).unpack(raw), firsts, lasts)
    if not cols.whole_pages and (
        max(lasts) >= SECTORS_PER_PAGE or any(f > la for f, la in zip(firsts, lasts, strict=True))
    ):
        for k in range(nr_segments):  # name the first bad one
            validate_segment(Segment(cols.grefs[k], firsts[k], lasts[k]))
    return cols


@attrs.frozen
class IoPlan:
    """What to do on the image: ``nbytes`` from ``offset`` to/from ``segments`` in order."""

    kind: Kind
    offset: int
    segments: Columns
    discard_bytes: int = 0
    nbytes: int = 0


_KIND_OF_OP = {
    BlkifOp.READ: Kind.READ,
    BlkifOp.WRITE: Kind.WRITE,
    BlkifOp.WRITE_BARRIER: Kind.BARRIER,
    BlkifOp.FLUSH_DISKCACHE: Kind.FLUSH,
}


_KNOWN_OPS = frozenset(BlkifOp) - {BlkifOp.RESERVED_1}
_NO_SEGMENTS = Columns((), b"", b"")


def admit(slot: bytes, limits: DeviceLimits) -> Admitted:
    """Decode and check one request slot; raise BlkifProtocolError to refuse it."""
    return admit_and_plan(slot, limits)[0]


def admit_and_plan(slot: bytes, limits: DeviceLimits) -> tuple[Admitted, IoPlan | None]:
    """:func:`admit`, and the plan of a request whose segments are in its slot
    (None for INDIRECT, planned once its pages are read)."""
    req = decode_request(slot)
    if req.operation not in _KNOWN_OPS:
        raise BlkifProtocolError(f"unknown operation {req.operation}", BlkifRsp.EOPNOTSUPP)
    validate_request(req, limits.max_indirect_segments)
    if isinstance(req, BlkifRequestDiscard):
        if not limits.discard:
            raise BlkifProtocolError("discard not offered on this device", BlkifRsp.EOPNOTSUPP)
        _check_range(req.sector_number, req.nr_sectors, limits)
        admitted = Admitted(req, Kind.DISCARD, ())
        return admitted, plan(admitted, limits)
    if isinstance(req, BlkifRequestIndirect):
        kind = Kind.READ if req.indirect_op == BlkifOp.READ else Kind.WRITE
        _check_access(kind, True, limits)
        if len(req.indirect_grefs) < indirect_pages(req.nr_segments):
            raise BlkifProtocolError("fewer indirect pages than segments need")
        return Admitted(req, kind, (), req.indirect_grefs), None
    assert isinstance(req, BlkifRequest)
    kind = _KIND_OF_OP[req.operation]
    _check_access(kind, bool(req.segments), limits)
    admitted = Admitted(req, kind, req.segments)
    return admitted, plan(admitted, limits)  # range checks now, before any grant is mapped


def plan(admitted: Admitted, limits: DeviceLimits, columns: Columns | None = None) -> IoPlan:
    """The I/O of an admitted request whose segments are known (``columns``
    for an INDIRECT one, read from its pages)."""
    req = admitted.request
    if isinstance(req, BlkifRequestDiscard):
        return IoPlan(
            Kind.DISCARD,
            req.sector_number * SECTOR_SIZE,
            _NO_SEGMENTS,
            req.nr_sectors * SECTOR_SIZE,
        )
    if columns is None:
        columns = Columns.of(admitted.segments) if admitted.segments else _NO_SEGMENTS
    nr = columns.nr_sectors
    _check_range(req.sector_number, nr, limits)
    return IoPlan(admitted.kind, req.sector_number * SECTOR_SIZE, columns, 0, nr * SECTOR_SIZE)


def plan_with_segments(
    admitted: Admitted, segments: tuple[Segment, ...] | Columns, limits: DeviceLimits
) -> IoPlan:
    """Plan an INDIRECT request once its segments were read from its pages."""
    columns = segments if isinstance(segments, Columns) else Columns.of(segments)
    return plan(admitted, limits, columns)


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
