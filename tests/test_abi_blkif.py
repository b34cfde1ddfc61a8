"""blkif: constants, byte layouts, codecs and the checks a backend applies."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.abi import blkif
from shared.abi.blkif import (
    BlkifDiscard,
    BlkifOp,
    BlkifProtocolError,
    BlkifRequest,
    BlkifRequestDiscard,
    BlkifRequestIndirect,
    BlkifResponse,
    BlkifRsp,
    Segment,
    VDisk,
)
from tests.strategies import S16, U8, U16, U32, U64


@pytest.mark.parametrize(
    ("constant", "value"),
    [
        (BlkifOp.READ, 0),
        (BlkifOp.WRITE, 1),
        (BlkifOp.WRITE_BARRIER, 2),
        (BlkifOp.FLUSH_DISKCACHE, 3),
        (BlkifOp.RESERVED_1, 4),
        (BlkifOp.DISCARD, 5),
        (BlkifOp.INDIRECT, 6),
        (BlkifRsp.OKAY, 0),
        (BlkifRsp.ERROR, -1),
        (BlkifRsp.EOPNOTSUPP, -2),
        (VDisk.CDROM, 1),
        (VDisk.REMOVABLE, 2),
        (VDisk.READONLY, 4),
        (BlkifDiscard.SECURE, 1),
        (blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST, 11),
        (blkif.BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST, 8),
        (blkif.SEGMENTS_PER_INDIRECT_FRAME, 512),
        (blkif.BLKIF_MAX_INDIRECT_SEGMENTS, 4096),
        (blkif.BLKIF_RING_ENTRY_SIZE, 112),
    ],
)
def test_constants_match_the_header(constant: int, value: int) -> None:
    assert constant == value


@pytest.mark.parametrize(
    ("lay", "size", "offsets"),
    [
        (blkif.SEGMENT, 8, {"gref": 0, "first_sect": 4, "last_sect": 5}),
        (
            blkif.REQUEST,
            112,
            {
                "operation": 0,
                "nr_segments": 1,
                "handle": 2,
                "id": 8,
                "sector_number": 16,
                "seg": 24,
            },
        ),
        (blkif.REQUEST_DISCARD, 32, {"flag": 1, "handle": 2, "id": 8, "nr_sectors": 24}),
        (
            blkif.REQUEST_INDIRECT,
            64,
            {
                "indirect_op": 1,
                "nr_segments": 2,
                "id": 8,
                "sector_number": 16,
                "handle": 24,
                "indirect_grefs": 28,
            },
        ),
        (blkif.RESPONSE, 16, {"id": 0, "operation": 8, "status": 10}),
        (blkif.SRING, 64 + 112, {"req_prod": 0, "rsp_event": 12, "pvt": 16, "pad": 20, "ring": 64}),
    ],
)
def test_layouts_match_the_reference(lay, size: int, offsets: dict[str, int]) -> None:
    assert lay.size == size
    assert {k: lay.offsets[k] for k in offsets} == offsets


def test_request_bytes_are_the_documented_vector() -> None:
    req = BlkifRequest.of(
        BlkifOp.WRITE, 0x0301, 0x1122334455667788, 0x10, (Segment(0xAABBCCDD, 1, 6),)
    )
    expected = (
        bytes([1, 1, 0x01, 0x03, 0, 0, 0, 0])
        + struct.pack("<QQ", 0x1122334455667788, 0x10)
        + bytes([0xDD, 0xCC, 0xBB, 0xAA, 1, 6, 0, 0])
        + bytes(80)
    )
    assert req.encode() == expected


def test_response_bytes_are_the_documented_vector() -> None:
    raw = BlkifResponse(7, BlkifOp.READ, BlkifRsp.EOPNOTSUPP).encode()
    assert raw == struct.pack("<Q", 7) + bytes([0, 0]) + b"\xfe\xff" + bytes(4)


SEGMENTS = st.builds(Segment, U32, U8, U8)


@st.composite
def plain_requests(draw) -> BlkifRequest:
    op = draw(st.sampled_from([0, 1, 2, 3, 4, 7, 255]))
    nr = draw(U8)
    segs = draw(st.lists(SEGMENTS, min_size=min(nr, 11), max_size=min(nr, 11)))
    return BlkifRequest(op, nr, draw(U16), draw(U64), draw(U64), tuple(segs))


@st.composite
def indirect_requests(draw) -> BlkifRequestIndirect:
    nr = draw(U16)
    used = min(blkif.indirect_pages(nr), 8)
    grefs = draw(st.lists(U32, min_size=used, max_size=used))
    return BlkifRequestIndirect(draw(U8), nr, draw(U64), draw(U64), draw(U16), tuple(grefs))


DISCARDS = st.builds(BlkifRequestDiscard, U8, U16, U64, U64, U64)
ANY_REQUEST = st.one_of(plain_requests(), indirect_requests(), DISCARDS)


@given(SEGMENTS)
def test_segment_round_trips(seg: Segment) -> None:
    raw = seg.encode()
    assert len(raw) == blkif.SEGMENT.size
    assert Segment.decode(raw) == seg


@given(ANY_REQUEST, st.integers(0, 64))
def test_requests_round_trip_through_a_ring_slot(req: blkif.AnyRequest, offset: int) -> None:
    raw = req.encode()
    lay = {BlkifRequest: blkif.REQUEST, BlkifRequestDiscard: blkif.REQUEST_DISCARD}.get(
        type(req), blkif.REQUEST_INDIRECT
    )
    assert len(raw) == lay.size
    assert type(req).decode(raw) == req
    slot = bytearray(b"\xee" * (offset + blkif.BLKIF_RING_ENTRY_SIZE))
    req.pack_into(slot, offset)
    assert blkif.decode_request(slot, offset) == req
    assert slot[offset : offset + lay.size] == raw


@given(st.builds(BlkifResponse, U64, U8, S16))
def test_response_round_trips(rsp: BlkifResponse) -> None:
    raw = rsp.encode()
    assert len(raw) == blkif.RESPONSE.size
    assert BlkifResponse.decode(raw) == rsp


def test_decode_request_dispatches_on_the_operation_byte() -> None:
    slot = bytearray(112)
    for op, kind in [
        (BlkifOp.READ, BlkifRequest),
        (BlkifOp.FLUSH_DISKCACHE, BlkifRequest),
        (BlkifOp.DISCARD, BlkifRequestDiscard),
        (BlkifOp.INDIRECT, BlkifRequestIndirect),
    ]:
        slot[0] = op
        assert type(blkif.decode_request(slot)) is kind


def test_decode_keeps_at_most_eleven_segments_of_a_lying_request() -> None:
    raw = bytearray(BlkifRequest.of(BlkifOp.READ, 0, 0, 0, (Segment(1, 0, 7),) * 11).encode())
    raw[1] = 200
    req = BlkifRequest.decode(raw)
    assert req.nr_segments == 200 and len(req.segments) == 11


def test_record_refuses_more_segments_than_a_slot_holds() -> None:
    with pytest.raises(ValueError):
        BlkifRequest.of(BlkifOp.READ, 0, 0, 0, (Segment(1, 0, 7),) * 12)
    with pytest.raises(ValueError):
        BlkifRequestIndirect(BlkifOp.READ, 4096, 0, 0, 0, (1,) * 9)


OK_SEG = Segment(9, 0, 7)
VALIDATION = [
    # (request, expected status or None when valid)
    (BlkifRequest.of(BlkifOp.READ, 0, 1, 0, (OK_SEG,)), None),
    (BlkifRequest.of(BlkifOp.WRITE, 0, 1, 0, (OK_SEG,) * 11), None),
    (BlkifRequest.of(BlkifOp.FLUSH_DISKCACHE, 0, 1, 0), None),
    (BlkifRequest.of(BlkifOp.WRITE_BARRIER, 0, 1, 0), None),
    (BlkifRequest.of(BlkifOp.FLUSH_DISKCACHE, 0, 1, 0, (OK_SEG,)), None),
    (BlkifRequest.of(BlkifOp.READ, 0, 1, 0), BlkifRsp.ERROR),  # data op without data
    (BlkifRequest(BlkifOp.READ, 12, 0, 1, 0, (OK_SEG,) * 11), BlkifRsp.ERROR),
    (BlkifRequest.of(BlkifOp.READ, 0, 1, 0, (Segment(9, 0, 8),)), BlkifRsp.ERROR),
    (BlkifRequest.of(BlkifOp.READ, 0, 1, 0, (Segment(9, 5, 4),)), BlkifRsp.ERROR),
    (BlkifRequest.of(BlkifOp.RESERVED_1, 0, 1, 0), BlkifRsp.EOPNOTSUPP),
    (BlkifRequest.of(9, 0, 1, 0), BlkifRsp.EOPNOTSUPP),
    (BlkifRequestDiscard(0, 0, 1, 0, 8), None),
    (BlkifRequestDiscard(BlkifDiscard.SECURE, 0, 1, 0, 8), None),
    (BlkifRequestDiscard(2, 0, 1, 0, 8), BlkifRsp.ERROR),
    (BlkifRequestIndirect(BlkifOp.READ, 1, 1, 0, 0, (5,)), None),
    (BlkifRequestIndirect(BlkifOp.WRITE, 4096, 1, 0, 0, tuple(range(8))), None),
    (BlkifRequestIndirect(BlkifOp.WRITE, 4097, 1, 0, 0, tuple(range(8))), BlkifRsp.ERROR),
    (BlkifRequestIndirect(BlkifOp.WRITE, 0, 1, 0, 0), BlkifRsp.ERROR),
    (BlkifRequestIndirect(BlkifOp.FLUSH_DISKCACHE, 1, 1, 0, 0, (5,)), BlkifRsp.ERROR),
    (BlkifRequestIndirect(BlkifOp.DISCARD, 1, 1, 0, 0, (5,)), BlkifRsp.ERROR),
]


@pytest.mark.parametrize(("req", "status"), VALIDATION)
def test_validate_request(req: blkif.AnyRequest, status: BlkifRsp | None) -> None:
    if status is None:
        blkif.validate_request(req)
        return
    with pytest.raises(BlkifProtocolError) as info:
        blkif.validate_request(req)
    assert info.value.status == status
    assert str(info.value)


def test_indirect_limit_is_what_the_backend_advertised() -> None:
    req = BlkifRequestIndirect(BlkifOp.READ, 257, 1, 0, 0, (1,))
    blkif.validate_request(req)
    with pytest.raises(BlkifProtocolError):
        blkif.validate_request(req, max_indirect_segments=256)


@pytest.mark.parametrize(
    ("first", "last", "valid"),
    [(0, 0, True), (0, 7, True), (7, 7, True), (3, 2, False), (0, 8, False), (8, 8, False)],
)
def test_validate_segment(first: int, last: int, valid: bool) -> None:
    seg = Segment(1, first, last)
    if valid:
        blkif.validate_segment(seg)
        assert seg.nr_sectors * 512 == (last - first + 1) * 512
        assert seg.page_offset == first * 512
    else:
        with pytest.raises(BlkifProtocolError):
            blkif.validate_segment(seg)


@pytest.mark.parametrize(("nr", "pages"), [(0, 0), (1, 1), (512, 1), (513, 2), (4096, 8)])
def test_indirect_pages(nr: int, pages: int) -> None:
    assert blkif.indirect_pages(nr) == pages


@given(st.lists(SEGMENTS, min_size=1, max_size=1100))
def test_indirect_pages_round_trip(segs: list[Segment]) -> None:
    pages = [
        blkif.encode_indirect_page(segs[i : i + 512]).ljust(4096, b"\0")
        for i in range(0, len(segs), 512)
    ]
    assert blkif.decode_indirect_segments(pages, len(segs)) == tuple(segs)


def test_indirect_segments_need_enough_pages() -> None:
    with pytest.raises(BlkifProtocolError):
        blkif.decode_indirect_segments([bytes(4096)], 513)
    with pytest.raises(ValueError):
        blkif.encode_indirect_page([Segment(0, 0, 0)] * 513)


def test_response_to_indirect_carries_the_indirect_op() -> None:
    req = BlkifRequestIndirect(BlkifOp.WRITE, 3, 42, 0, 0, (1,))
    assert blkif.response_for(req, BlkifRsp.OKAY) == BlkifResponse(42, BlkifOp.WRITE, 0)
    disc = BlkifRequestDiscard(0, 0, 43, 0, 1)
    assert blkif.response_for(disc, -2) == BlkifResponse(43, BlkifOp.DISCARD, -2)


@pytest.mark.parametrize(("order", "slots"), [(0, 32), (1, 64), (2, 128), (3, 256), (4, 512)])
def test_blkif_rings_by_page_order(order: int, slots: int) -> None:
    buf = bytearray(4096 << order)
    front = blkif.blkif_front_ring(buf, order)
    back = blkif.blkif_back_ring(buf, order)
    assert front.nr_ents == back.nr_ents == slots
    req = BlkifRequest.of(BlkifOp.READ, 1, 5, 0, (OK_SEG,))
    for _ in range(slots):
        front.put_request(req.encode())
    front.push_requests()
    assert [blkif.decode_request(r) for r in back.take_requests()] == [req] * slots
