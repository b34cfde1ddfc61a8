"""blkif: the PV block protocol's ring entries, constants and request checks.

Layouts are the x86_64 native ones (``protocol`` = ``x86_64-abi``) from
``xen/io/blkif.h``. A ring slot holds a ``blkif_request`` (112 bytes) or, by
``operation``, its discard or indirect form, and is answered in place by a
16-byte ``blkif_response``. :func:`decode_request` picks the form;
:func:`validate_request` applies the rules a backend must enforce before it
touches a grant, raising :class:`BlkifProtocolError` whose ``status`` is the
``BLKIF_RSP_*`` value to answer with.
"""

from __future__ import annotations

import enum

import attrs

from shared.abi import ring
from shared.abi._layout import layout

HEADER = "xen/io/blkif.h"

BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8
SEGMENT_SIZE = 8
SEGMENTS_PER_INDIRECT_FRAME = ring.PAGE_SIZE // SEGMENT_SIZE
BLKIF_MAX_INDIRECT_SEGMENTS = BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * SEGMENTS_PER_INDIRECT_FRAME
SECTOR_SIZE = 512
SECTORS_PER_PAGE = ring.PAGE_SIZE // SECTOR_SIZE


class BlkifOp(enum.IntEnum):
    """``BLKIF_OP_*``."""

    READ = 0
    WRITE = 1
    WRITE_BARRIER = 2
    FLUSH_DISKCACHE = 3
    RESERVED_1 = 4  # SLES device-specific: never sent, refused if received
    DISCARD = 5
    INDIRECT = 6


class BlkifRsp(enum.IntEnum):
    """``BLKIF_RSP_*`` response status."""

    EOPNOTSUPP = -2
    ERROR = -1
    OKAY = 0


class VDisk(enum.IntFlag):
    """``VDISK_*`` bits of the backend's ``info`` key."""

    CDROM = 0x1
    REMOVABLE = 0x2
    READONLY = 0x4


class BlkifDiscard(enum.IntFlag):
    """``blkif_request_discard.flag`` bits."""

    SECURE = 1 << 0


SEGMENT = layout(
    "struct blkif_request_segment",
    HEADER,
    ("gref", "I"),
    ("first_sect", "B"),
    ("last_sect", "B"),
)
REQUEST = layout(
    "struct blkif_request",
    HEADER,
    ("operation", "B"),
    ("nr_segments", "B"),
    ("handle", "H"),
    ("id", "Q"),
    ("sector_number", "Q"),
    ("seg", SEGMENT, BLKIF_MAX_SEGMENTS_PER_REQUEST),
)
REQUEST_DISCARD = layout(
    "struct blkif_request_discard",
    HEADER,
    ("operation", "B"),
    ("flag", "B"),
    ("handle", "H"),
    ("id", "Q"),
    ("sector_number", "Q"),
    ("nr_sectors", "Q"),
)
REQUEST_INDIRECT = layout(
    "struct blkif_request_indirect",
    HEADER,
    ("operation", "B"),
    ("indirect_op", "B"),
    ("nr_segments", "H"),
    ("id", "Q"),
    ("sector_number", "Q"),
    ("handle", "H"),
    ("indirect_grefs", "I", BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST),
)
RESPONSE = layout(
    "struct blkif_response",
    HEADER,
    ("id", "Q"),
    ("operation", "B"),
    ("status", "h"),
)

BLKIF_RING_ENTRY_SIZE = max(REQUEST.size, RESPONSE.size)
SRING = ring.sring_layout("blkif", HEADER, BLKIF_RING_ENTRY_SIZE, REQUEST.alignment)

_REQ = REQUEST.struct
_DISCARD = REQUEST_DISCARD.struct
_INDIRECT = REQUEST_INDIRECT.struct
_NO_SEGMENT = (0, 0, 0)


class BlkifProtocolError(ValueError):
    """A request the backend must refuse; ``status`` is the response to send."""

    def __init__(self, message: str, status: BlkifRsp = BlkifRsp.ERROR) -> None:
        super().__init__(message)
        self.status = status


@attrs.frozen
class Segment(ring.WireRecord, fields=("gref", "first_sect", "last_sect")):
    """``blkif_request_segment``: sectors ``first_sect..last_sect`` of granted page ``gref``."""

    _layout = SEGMENT
    gref: int
    first_sect: int
    last_sect: int

    @property
    def nr_sectors(self) -> int:
        return self.last_sect - self.first_sect + 1

    @property
    def page_offset(self) -> int:
        return self.first_sect * SECTOR_SIZE


def validate_segment(seg: Segment) -> None:
    """``0 <= first_sect <= last_sect <= 7``, as Linux blkback checks."""
    if not 0 <= seg.first_sect <= seg.last_sect < SECTORS_PER_PAGE:
        raise BlkifProtocolError(
            f"segment gref {seg.gref}: sectors {seg.first_sect}..{seg.last_sect} "
            f"outside 0..{SECTORS_PER_PAGE - 1} or reversed"
        )


@attrs.frozen
class BlkifRequest:
    """``blkif_request`` (read, write, barrier, flush). ``segments`` holds the
    first ``min(nr_segments, 11)`` entries of ``seg[]``; the rest are not used."""

    operation: int
    nr_segments: int
    handle: int
    id: int
    sector_number: int
    segments: tuple[Segment, ...] = attrs.field(converter=tuple, default=())

    @segments.validator
    def _fits(self, _attribute: attrs.Attribute, value: tuple[Segment, ...]) -> None:
        if len(value) > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            raise ValueError(f"{len(value)} segments exceed {BLKIF_MAX_SEGMENTS_PER_REQUEST}")

    @classmethod
    def of(
        cls, operation: int, handle: int, id: int, sector_number: int, segments: tuple = ()
    ) -> BlkifRequest:
        """A request whose ``nr_segments`` is its segment count."""
        return cls(operation, len(segments), handle, id, sector_number, segments)

    def pack_into(self, buf: ring.Buffer, offset: int = 0) -> None:
        segs: list[int] = []
        for s in self.segments:
            segs += (s.gref, s.first_sect, s.last_sect)
        segs += _NO_SEGMENT * (BLKIF_MAX_SEGMENTS_PER_REQUEST - len(self.segments))
        _REQ.pack_into(
            buf,
            offset,
            self.operation,
            self.nr_segments,
            self.handle,
            self.id,
            self.sector_number,
            *segs,
        )

    def encode(self) -> bytes:
        out = bytearray(REQUEST.size)
        self.pack_into(out)
        return bytes(out)

    @classmethod
    def decode(cls, buf: ring.Bytes | ring.Buffer, offset: int = 0) -> BlkifRequest:
        v = _REQ.unpack_from(buf, offset)
        count = min(v[1], BLKIF_MAX_SEGMENTS_PER_REQUEST)
        segs = tuple(Segment(*v[5 + 3 * k : 8 + 3 * k]) for k in range(count))
        return cls(v[0], v[1], v[2], v[3], v[4], segs)


@attrs.frozen
class BlkifRequestDiscard:
    """``blkif_request_discard``: drop ``nr_sectors`` from ``sector_number``."""

    flag: int
    handle: int
    id: int
    sector_number: int
    nr_sectors: int

    @property
    def operation(self) -> int:
        return BlkifOp.DISCARD

    def pack_into(self, buf: ring.Buffer, offset: int = 0) -> None:
        _DISCARD.pack_into(
            buf,
            offset,
            BlkifOp.DISCARD,
            self.flag,
            self.handle,
            self.id,
            self.sector_number,
            self.nr_sectors,
        )

    def encode(self) -> bytes:
        out = bytearray(REQUEST_DISCARD.size)
        self.pack_into(out)
        return bytes(out)

    @classmethod
    def decode(cls, buf: ring.Bytes | ring.Buffer, offset: int = 0) -> BlkifRequestDiscard:
        _op, *rest = _DISCARD.unpack_from(buf, offset)
        return cls(*rest)


def indirect_pages(nr_segments: int) -> int:
    """Indirect pages a request of ``nr_segments`` uses: ``ceil(nr / 512)``."""
    return -(-nr_segments // SEGMENTS_PER_INDIRECT_FRAME)


@attrs.frozen
class BlkifRequestIndirect:
    """``blkif_request_indirect``: segments live in granted pages ``indirect_grefs``,
    which holds the first ``min(ceil(nr_segments / 512), 8)`` grefs."""

    indirect_op: int
    nr_segments: int
    id: int
    sector_number: int
    handle: int
    indirect_grefs: tuple[int, ...] = attrs.field(converter=tuple, default=())

    @indirect_grefs.validator
    def _fits(self, _attribute: attrs.Attribute, value: tuple[int, ...]) -> None:
        if len(value) > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST:
            raise ValueError(f"{len(value)} indirect pages exceed 8")

    @property
    def operation(self) -> int:
        return BlkifOp.INDIRECT

    def pack_into(self, buf: ring.Buffer, offset: int = 0) -> None:
        grefs = self.indirect_grefs + (0,) * (
            BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST - len(self.indirect_grefs)
        )
        _INDIRECT.pack_into(
            buf,
            offset,
            BlkifOp.INDIRECT,
            self.indirect_op,
            self.nr_segments,
            self.id,
            self.sector_number,
            self.handle,
            *grefs,
        )

    def encode(self) -> bytes:
        out = bytearray(REQUEST_INDIRECT.size)
        self.pack_into(out)
        return bytes(out)

    @classmethod
    def decode(cls, buf: ring.Bytes | ring.Buffer, offset: int = 0) -> BlkifRequestIndirect:
        v = _INDIRECT.unpack_from(buf, offset)
        used = min(indirect_pages(v[2]), BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)
        return cls(v[1], v[2], v[3], v[4], v[5], v[6 : 6 + used])


AnyRequest = BlkifRequest | BlkifRequestDiscard | BlkifRequestIndirect


def decode_request(buf: ring.Bytes | ring.Buffer, offset: int = 0) -> AnyRequest:
    """Decode a ring slot into the request form its ``operation`` byte selects."""
    op = buf[offset]
    if op == BlkifOp.DISCARD:
        return BlkifRequestDiscard.decode(buf, offset)
    if op == BlkifOp.INDIRECT:
        return BlkifRequestIndirect.decode(buf, offset)
    return BlkifRequest.decode(buf, offset)


def encode_indirect_page(segments: tuple[Segment, ...] | list[Segment]) -> bytes:
    """A packed ``blkif_request_segment`` array (at most 512) for one indirect page."""
    if len(segments) > SEGMENTS_PER_INDIRECT_FRAME:
        raise ValueError(f"{len(segments)} segments exceed one indirect page")
    return b"".join(s.encode() for s in segments)


def decode_indirect_segments(pages: list[ring.Bytes], nr_segments: int) -> tuple[Segment, ...]:
    """The first ``nr_segments`` segments from the contents of the indirect pages."""
    if len(pages) < indirect_pages(nr_segments):
        raise BlkifProtocolError(f"{nr_segments} segments need {indirect_pages(nr_segments)} pages")
    out = []
    for k in range(nr_segments):
        page, slot = divmod(k, SEGMENTS_PER_INDIRECT_FRAME)
        out.append(Segment.decode(pages[page], slot * SEGMENT_SIZE))
    return tuple(out)


_DATA_OPS = (BlkifOp.READ, BlkifOp.WRITE)
_FLUSH_OPS = (BlkifOp.WRITE_BARRIER, BlkifOp.FLUSH_DISKCACHE)


def validate_request(
    req: AnyRequest, max_indirect_segments: int = BLKIF_MAX_INDIRECT_SEGMENTS
) -> None:
    """Refuse what Linux blkback refuses; ``max_indirect_segments`` is what we advertised
    in ``feature-max-indirect-segments``. Indirect segments themselves are checked
    with :func:`validate_segment` once their pages are read."""
    if isinstance(req, BlkifRequestDiscard):
        if req.flag & ~int(BlkifDiscard.SECURE):  # ~ on an IntFlag stays inside its members
            raise BlkifProtocolError(f"discard flag {req.flag:#x} has unknown bits")
        return
    if isinstance(req, BlkifRequestIndirect):
        if req.indirect_op not in _DATA_OPS:
            raise BlkifProtocolError(f"indirect_op {req.indirect_op} is not READ or WRITE")
        if not 1 <= req.nr_segments <= min(max_indirect_segments, BLKIF_MAX_INDIRECT_SEGMENTS):
            raise BlkifProtocolError(
                f"indirect request with {req.nr_segments} segments "
                f"(max {min(max_indirect_segments, BLKIF_MAX_INDIRECT_SEGMENTS)})"
            )
        return
    if req.operation not in _DATA_OPS and req.operation not in _FLUSH_OPS:
        raise BlkifProtocolError(f"operation {req.operation} not supported", BlkifRsp.EOPNOTSUPP)
    if req.nr_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST:
        raise BlkifProtocolError(
            f"{req.nr_segments} segments exceed {BLKIF_MAX_SEGMENTS_PER_REQUEST}"
        )
    if req.nr_segments == 0 and req.operation in _DATA_OPS:
        raise BlkifProtocolError(f"{BlkifOp(req.operation).name} request without segments")
    for seg in req.segments:
        validate_segment(seg)


@attrs.frozen
class BlkifResponse(ring.WireRecord, fields=("id", "operation", "status")):
    """``blkif_response``: ``id`` echoed, ``operation`` (``indirect_op`` for INDIRECT)."""

    _layout = RESPONSE
    id: int
    operation: int
    status: int


def response_for(req: AnyRequest, status: int) -> BlkifResponse:
    """The response to ``req``: Linux blkfront expects ``indirect_op`` for INDIRECT."""
    op = req.indirect_op if isinstance(req, BlkifRequestIndirect) else req.operation
    return BlkifResponse(req.id, op, status)


def blkif_front_ring(
    buf: ring.Buffer, order: int = 0, *, init: bool = True, index: int = 0
) -> ring.FrontRing:
    """A blkif frontend over ``2**order`` pages (32 slots per page)."""
    return ring.front_ring(buf, BLKIF_RING_ENTRY_SIZE, order, init=init, index=index)


def blkif_back_ring(buf: ring.Buffer, order: int = 0, *, index: int = 0) -> ring.BackRing:
    """A blkif backend over ``2**order`` pages."""
    return ring.back_ring(buf, BLKIF_RING_ENTRY_SIZE, order, index=index)
