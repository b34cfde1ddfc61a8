"""netif: constants and flags, byte layouts, codecs and TX packet checks."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.abi import netif
from shared.abi.netif import (
    ExtraGso,
    ExtraHash,
    NetifCtrlRequest,
    NetifCtrlResponse,
    NetifCtrlStatus,
    NetifCtrlType,
    NetifExtraFlag,
    NetifExtraInfo,
    NetifExtraType,
    NetifGsoType,
    NetifProtocolError,
    NetifRsp,
    NetifRxRequest,
    NetifRxResponse,
    NetifTxRequest,
    NetifTxResponse,
    NetRxF,
    NetTxF,
)
from tests.cbuild import compile_c
from tests.strategies import S16, U8, U16, U32


@pytest.mark.parametrize(
    ("constant", "value"),
    [
        (NetTxF.CSUM_BLANK, 0x1),
        (NetTxF.DATA_VALIDATED, 0x2),
        (NetTxF.MORE_DATA, 0x4),
        (NetTxF.EXTRA_INFO, 0x8),
        (NetRxF.DATA_VALIDATED, 0x1),  # swapped with TX
        (NetRxF.CSUM_BLANK, 0x2),
        (NetRxF.MORE_DATA, 0x4),
        (NetRxF.EXTRA_INFO, 0x8),
        (NetRxF.GSO_PREFIX, 0x10),
        (NetifExtraType.NONE, 0),
        (NetifExtraType.GSO, 1),
        (NetifExtraType.MCAST_ADD, 2),
        (NetifExtraType.MCAST_DEL, 3),
        (NetifExtraType.HASH, 4),
        (NetifExtraType.MAX, 5),
        (NetifExtraFlag.MORE, 1),
        (NetifGsoType.TCPV4, 1),
        (NetifGsoType.TCPV6, 2),
        (NetifRsp.DROPPED, -2),
        (NetifRsp.ERROR, -1),
        (NetifRsp.OKAY, 0),
        (NetifRsp.NULL, 1),
        (NetifCtrlType.INVALID, 0),
        (NetifCtrlType.SET_HASH_ALGORITHM, 7),
        (NetifCtrlType.DEL_GREF_MAPPING, 10),
        (NetifCtrlStatus.BUFFER_OVERFLOW, 3),
        (netif.XEN_NETIF_NR_SLOTS_MIN, 18),
        (netif.XEN_NETIF_MAX_TX_SIZE, 0xFFFF),
        (netif.NETIF_TX_RING_ENTRY_SIZE, 12),
        (netif.NETIF_RX_RING_ENTRY_SIZE, 8),
        (netif.NETIF_CTRL_RING_ENTRY_SIZE, 16),
    ],
)
def test_constants_match_the_header(constant: int, value: int) -> None:
    assert constant == value


@pytest.mark.parametrize(
    ("lay", "size"),
    [
        (netif.TX_REQUEST, 12),
        (netif.TX_RESPONSE, 4),
        (netif.RX_REQUEST, 8),
        (netif.RX_RESPONSE, 8),
        (netif.EXTRA_INFO, 8),
        (netif.CTRL_REQUEST, 16),
        (netif.CTRL_RESPONSE, 12),
    ],
)
def test_entry_sizes(lay, size: int) -> None:
    assert lay.size == size


def test_members_the_generic_layout_test_cannot_see_match_the_header(tmp_path) -> None:
    """``netif_tx_request.size`` (its name collides with the sizeof line there) and
    the members of the extra-info union, which we read through small views."""
    members = {
        ("netif_tx_request", "size"): 10,
        ("netif_extra_info", "u.gso.size"): 2,
        ("netif_extra_info", "u.gso.type"): 4,
        ("netif_extra_info", "u.gso.features"): 6,
        ("netif_extra_info", "u.mcast.addr"): 2,
        ("netif_extra_info", "u.hash.type"): 2,
        ("netif_extra_info", "u.hash.algorithm"): 3,
        ("netif_extra_info", "u.hash.value"): 4,
    }
    lines = [f'  printf("%zu\\n", offsetof(struct {s}, {m}));' for (s, m) in members]
    source = "\n".join(
        [
            "#include <stdio.h>",
            "#include <stddef.h>",
            "#include <stdint.h>",
            "#include <xen/xen.h>",
            "#include <xen/io/netif.h>",
            "int main(void) {",
            *lines,
            "  return 0;",
            "}",
            "",
        ]
    )
    exe = compile_c(tmp_path, "netif_members.c", source)
    out = subprocess.run([exe], capture_output=True, text=True, check=True, timeout=30).stdout
    assert [int(x) for x in out.split()] == list(members.values())


def test_tx_request_bytes() -> None:
    req = NetifTxRequest(0x01020304, 0x10, NetTxF.MORE_DATA, 7, 1514)
    assert req.encode() == bytes([4, 3, 2, 1, 0x10, 0, 4, 0, 7, 0, 0xEA, 0x05])


def test_extra_info_views_of_the_union() -> None:
    gso = NetifExtraInfo.of_gso(ExtraGso(1448, NetifGsoType.TCPV4), NetifExtraFlag.MORE)
    assert gso.encode() == bytes([1, 1, 0xA8, 0x05, 1, 0, 0, 0])
    assert gso.gso == ExtraGso(1448, 1, 0) and gso.more
    mcast = NetifExtraInfo.of_mcast(True, b"\x01\x00\x5e\x00\x00\x01")
    assert mcast.encode() == bytes([2, 0, 1, 0, 0x5E, 0, 0, 1])
    assert mcast.mcast_addr == b"\x01\x00\x5e\x00\x00\x01" and not mcast.more
    assert NetifExtraInfo.of_mcast(False, bytes(6)).type == NetifExtraType.MCAST_DEL
    h = NetifExtraInfo.of_hash(ExtraHash(2, 1, 0xDEADBEEF))
    assert h.encode() == bytes([4, 0, 2, 1, 0xEF, 0xBE, 0xAD, 0xDE])
    assert h.hash == ExtraHash(2, 1, 0xDEADBEEF)


def test_extra_info_union_must_be_six_bytes() -> None:
    with pytest.raises(ValueError):
        NetifExtraInfo(NetifExtraType.GSO, 0, bytes(5))


RECORDS = [
    (NetifTxRequest, netif.TX_REQUEST, st.builds(NetifTxRequest, U32, U16, U16, U16, U16)),
    (NetifTxResponse, netif.TX_RESPONSE, st.builds(NetifTxResponse, U16, S16)),
    (NetifRxRequest, netif.RX_REQUEST, st.builds(NetifRxRequest, U16, U32)),
    (NetifRxResponse, netif.RX_RESPONSE, st.builds(NetifRxResponse, U16, U16, U16, S16)),
    (
        NetifExtraInfo,
        netif.EXTRA_INFO,
        st.builds(NetifExtraInfo, U8, U8, st.binary(min_size=6, max_size=6)),
    ),
    (
        NetifCtrlRequest,
        netif.CTRL_REQUEST,
        st.builds(NetifCtrlRequest, U16, U16, st.tuples(U32, U32, U32)),
    ),
    (NetifCtrlResponse, netif.CTRL_RESPONSE, st.builds(NetifCtrlResponse, U16, U16, U32, U32)),
]


@pytest.mark.parametrize(("cls", "lay", "records"), RECORDS, ids=[r[0].__name__ for r in RECORDS])
def test_records_round_trip(cls, lay, records) -> None:
    @given(records, st.integers(0, 16))
    def round_trip(rec, offset: int) -> None:
        raw = rec.encode()
        assert len(raw) == lay.size
        assert cls.decode(raw) == rec
        buf = bytearray(b"\x77" * (offset + lay.size))
        rec.pack_into(buf, offset)
        assert buf[offset:] == raw
        assert cls.decode(buf, offset) == rec

    round_trip()


def test_rx_request_pad_is_written_as_zero_and_ignored_on_decode() -> None:
    raw = bytearray(NetifRxRequest(5, 9).encode())
    assert raw[2:4] == b"\0\0"
    raw[2:4] = b"\xff\xff"
    assert NetifRxRequest.decode(raw) == NetifRxRequest(5, 9)


def _tx(offset: int, size: int, flags: int = 0) -> NetifTxRequest:
    return NetifTxRequest(1, offset, flags, 0, size)


@pytest.mark.parametrize(
    ("first", "frags", "first_len"),
    [
        (_tx(0, 60), [], 60),
        (_tx(4000, 96), [], 96),
        (_tx(100, 5000, NetTxF.MORE_DATA), [_tx(0, 4096, NetTxF.MORE_DATA), _tx(0, 10)], 894),
        (_tx(0, 18 * 100, NetTxF.MORE_DATA), [_tx(0, 100)] * 17, 100),
    ],
)
def test_valid_tx_packets(first: NetifTxRequest, frags: list, first_len: int) -> None:
    assert netif.validate_tx_packet(first, frags) == first_len


@pytest.mark.parametrize(
    ("first", "frags"),
    [
        (_tx(4000, 97), []),  # crosses the page
        (_tx(0, 100), [_tx(4090, 10)]),  # a fragment crosses
        (_tx(0, 50), [_tx(0, 60)]),  # fragments exceed the total
        (_tx(0, 19 * 10), [_tx(0, 10)] * 18),  # more than XEN_NETIF_NR_SLOTS_MIN slots
    ],
)
def test_invalid_tx_packets(first: NetifTxRequest, frags: list) -> None:
    with pytest.raises(NetifProtocolError):
        netif.validate_tx_packet(first, frags)


def test_tx_and_rx_rings_hold_256_slots() -> None:
    buf = bytearray(4096)
    front = netif.netif_tx_front_ring(buf)
    back = netif.netif_tx_back_ring(buf)
    assert front.nr_ents == back.nr_ents == 256
    for i in range(256):
        front.put_request(NetifTxRequest(i, 0, 0, i, 60).encode())
    front.push_requests()
    got = [NetifTxRequest.decode(r) for r in back.take_requests()]
    assert [r.id for r in got] == list(range(256))
    for r in got:
        back.put_response(NetifTxResponse(r.id, NetifRsp.OKAY).encode())
    back.push_responses()
    assert [NetifTxResponse.decode(r).id for r in front.take_responses()] == list(range(256))
    rx = bytearray(4096)
    assert netif.netif_rx_front_ring(rx).nr_ents == netif.netif_rx_back_ring(rx).nr_ents == 256
