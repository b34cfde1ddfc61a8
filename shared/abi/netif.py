"""netif: the PV network protocol's ring entries, flags and constants.

Two rings per queue: TX (guest → backend, 12-byte requests answered by 4-byte
responses) and RX (guest posts 8-byte buffers, backend answers with 8-byte
responses in the same slot); both hold 256 entries per page. A slot flagged
``extra_info`` is followed by ``netif_extra_info`` slots (GSO, multicast,
hash). Note the checksum flags swap bits 0 and 1 between TX and RX.
"""

from __future__ import annotations

import enum
import struct

import attrs

from shared.abi import ring
from shared.abi._layout import layout

HEADER = "xen/io/netif.h"

XEN_NETIF_NR_SLOTS_MIN = 18
XEN_NETIF_MAX_TX_SIZE = 0xFFFF
NETIF_EXTRA_UNION_SIZE = 6


class NetTxF(enum.IntFlag):
    """``NETTXF_*`` (TX request flags)."""

    CSUM_BLANK = 1 << 0
    DATA_VALIDATED = 1 << 1
    MORE_DATA = 1 << 2
    EXTRA_INFO = 1 << 3


class NetRxF(enum.IntFlag):
    """``NETRXF_*`` (RX response flags); bits 0 and 1 are swapped relative to TX."""

    DATA_VALIDATED = 1 << 0
    CSUM_BLANK = 1 << 1
    MORE_DATA = 1 << 2
    EXTRA_INFO = 1 << 3
    GSO_PREFIX = 1 << 4  # deprecated


class NetifExtraType(enum.IntEnum):
    """``XEN_NETIF_EXTRA_TYPE_*``."""

    NONE = 0  # never valid on the wire
    GSO = 1
    MCAST_ADD = 2
    MCAST_DEL = 3
    HASH = 4
    MAX = 5


class NetifExtraFlag(enum.IntFlag):
    """``XEN_NETIF_EXTRA_FLAG_*``: MORE chains another extra slot."""

    MORE = 1 << 0


class NetifGsoType(enum.IntEnum):
    """``XEN_NETIF_GSO_TYPE_*``."""

    NONE = 0
    TCPV4 = 1
    TCPV6 = 2


class NetifRsp(enum.IntEnum):
    """``NETIF_RSP_*``; NULL marks a slot that carried an extra, not a fragment."""

    DROPPED = -2
    ERROR = -1
    OKAY = 0
    NULL = 1


class NetifCtrlType(enum.IntEnum):
    """``XEN_NETIF_CTRL_TYPE_*``."""

    INVALID = 0
    GET_HASH_FLAGS = 1
    SET_HASH_FLAGS = 2
    SET_HASH_KEY = 3
    GET_HASH_MAPPING_SIZE = 4
    SET_HASH_MAPPING_SIZE = 5
    SET_HASH_MAPPING = 6
    SET_HASH_ALGORITHM = 7
    GET_GREF_MAPPING_SIZE = 8
    ADD_GREF_MAPPING = 9
    DEL_GREF_MAPPING = 10


class NetifCtrlStatus(enum.IntEnum):
    """``XEN_NETIF_CTRL_STATUS_*``."""

    SUCCESS = 0
    NOT_SUPPORTED = 1
    INVALID_PARAMETER = 2
    BUFFER_OVERFLOW = 3


class NetifCtrlHashType(enum.IntFlag):
    """``XEN_NETIF_CTRL_HASH_TYPE_*`` bits."""

    IPV4 = 1 << 0
    IPV4_TCP = 1 << 1
    IPV6 = 1 << 2
    IPV6_TCP = 1 << 3


class NetifCtrlHashAlgorithm(enum.IntEnum):
    """``XEN_NETIF_CTRL_HASH_ALGORITHM_*``."""

    NONE = 0
    TOEPLITZ = 1


TX_REQUEST = layout(
    "struct netif_tx_request",
    HEADER,
    ("gref", "I"),
    ("offset", "H"),
    ("flags", "H"),
    ("id", "H"),
    # Unchecked only because a member named "size" collides with the sizeof line
    # of the C layout test; id@8 and sizeof 12 pin it at 10, and test_abi_netif
    # checks it directly.
    ("size", "H"),
)
TX_RESPONSE = layout("struct netif_tx_response", HEADER, ("id", "H"), ("status", "h"))
RX_REQUEST = layout("struct netif_rx_request", HEADER, ("id", "H"), ("pad", "H"), ("gref", "I"))
RX_RESPONSE = layout(
    "struct netif_rx_response",
    HEADER,
    ("id", "H"),
    ("offset", "H"),
    ("flags", "H"),
    ("status", "h"),
)
EXTRA_INFO = layout(
    "struct netif_extra_info",
    HEADER,
    ("type", "B"),
    ("flags", "B"),
    ("u", "s", NETIF_EXTRA_UNION_SIZE, None, 2),
)
CTRL_REQUEST = layout(
    "struct xen_netif_ctrl_request",
    HEADER,
    ("id", "H"),
    ("type", "H"),
    ("data", "I", 3),
)
CTRL_RESPONSE = layout(
    "struct xen_netif_ctrl_response",
    HEADER,
    ("id", "H"),
    ("type", "H"),
    ("status", "I"),
    ("data", "I"),
)

NETIF_TX_RING_ENTRY_SIZE = max(TX_REQUEST.size, TX_RESPONSE.size)
NETIF_RX_RING_ENTRY_SIZE = max(RX_REQUEST.size, RX_RESPONSE.size)
NETIF_CTRL_RING_ENTRY_SIZE = max(CTRL_REQUEST.size, CTRL_RESPONSE.size)
TX_SRING = ring.sring_layout("netif_tx", HEADER, NETIF_TX_RING_ENTRY_SIZE, 4)
RX_SRING = ring.sring_layout("netif_rx", HEADER, NETIF_RX_RING_ENTRY_SIZE, 4)
CTRL_SRING = ring.sring_layout("xen_netif_ctrl", HEADER, NETIF_CTRL_RING_ENTRY_SIZE, 4)

# Views of the 6-byte union at offset 2 of netif_extra_info.
_GSO = struct.Struct("<HBxH")
_HASH = struct.Struct("<BBI")


class NetifProtocolError(ValueError):
    """A TX request a backend must treat as fatal for the queue."""


@attrs.frozen
class NetifTxRequest(ring.WireRecord, fields=("gref", "offset", "flags", "id", "size")):
    """``netif_tx_request``: ``size`` is the whole packet in the first slot of a packet."""

    _layout = TX_REQUEST
    gref: int
    offset: int
    flags: int
    id: int
    size: int


@attrs.frozen
class NetifTxResponse(ring.WireRecord, fields=("id", "status")):
    """``netif_tx_response``: one per TX request slot, ``id`` echoed."""

    _layout = TX_RESPONSE
    id: int
    status: int


@attrs.frozen
class NetifRxRequest:
    """``netif_rx_request``: an empty writable page offered for one fragment."""

    id: int
    gref: int

    def pack_into(self, buf: ring.Buffer, offset: int = 0) -> None:
        RX_REQUEST.struct.pack_into(buf, offset, self.id, 0, self.gref)

    def encode(self) -> bytes:
        return RX_REQUEST.struct.pack(self.id, 0, self.gref)

    @classmethod
    def decode(cls, buf: ring.Bytes | ring.Buffer, offset: int = 0) -> NetifRxRequest:
        rid, _pad, gref = RX_REQUEST.struct.unpack_from(buf, offset)
        return cls(rid, gref)


@attrs.frozen
class NetifRxResponse(ring.WireRecord, fields=("id", "offset", "flags", "status")):
    """``netif_rx_response``: ``status`` >= 0 is the fragment length, < 0 a NETIF_RSP error."""

    _layout = RX_RESPONSE
    id: int
    offset: int
    flags: int
    status: int


@attrs.frozen
class ExtraGso:
    """``u.gso``: segment size (MSS), GSO type and feature bits."""

    size: int
    type: int
    features: int = 0


@attrs.frozen
class ExtraHash:
    """``u.hash``: hash type bit, algorithm and the 32-bit value."""

    type: int
    algorithm: int
    value: int


@attrs.frozen
class NetifExtraInfo(ring.WireRecord, fields=("type", "flags", "u")):
    """``netif_extra_info``; ``u`` is the raw 6-byte union, read through
    :attr:`gso`, :attr:`mcast_addr` or :attr:`hash` according to ``type``."""

    _layout = EXTRA_INFO
    type: int
    flags: int
    u: bytes = attrs.field(default=bytes(NETIF_EXTRA_UNION_SIZE))

    @u.validator
    def _six(self, _attribute: attrs.Attribute, value: bytes) -> None:
        if len(value) != NETIF_EXTRA_UNION_SIZE:
            raise ValueError(f"netif_extra_info union is 6 bytes, not {len(value)}")

    @property
    def more(self) -> bool:
        return bool(self.flags & NetifExtraFlag.MORE)

    @classmethod
    def of_gso(cls, gso: ExtraGso, flags: int = 0) -> NetifExtraInfo:
        return cls(NetifExtraType.GSO, flags, _GSO.pack(gso.size, gso.type, gso.features))

    @classmethod
    def of_mcast(cls, add: bool, addr: bytes, flags: int = 0) -> NetifExtraInfo:
        kind = NetifExtraType.MCAST_ADD if add else NetifExtraType.MCAST_DEL
        return cls(kind, flags, bytes(addr))

    @classmethod
    def of_hash(cls, hash: ExtraHash, flags: int = 0) -> NetifExtraInfo:
        return cls(NetifExtraType.HASH, flags, _HASH.pack(hash.type, hash.algorithm, hash.value))

    @property
    def gso(self) -> ExtraGso:
        return ExtraGso(*_GSO.unpack(self.u))

    @property
    def mcast_addr(self) -> bytes:
        return self.u

    @property
    def hash(self) -> ExtraHash:
        return ExtraHash(*_HASH.unpack(self.u))


@attrs.frozen
class NetifCtrlRequest:
    """``xen_netif_ctrl_request``."""

    id: int
    type: int
    data: tuple[int, int, int] = (0, 0, 0)

    def pack_into(self, buf: ring.Buffer, offset: int = 0) -> None:
        CTRL_REQUEST.struct.pack_into(buf, offset, self.id, self.type, *self.data)

    def encode(self) -> bytes:
        return CTRL_REQUEST.struct.pack(self.id, self.type, *self.data)

    @classmethod
    def decode(cls, buf: ring.Bytes | ring.Buffer, offset: int = 0) -> NetifCtrlRequest:
        rid, kind, *data = CTRL_REQUEST.struct.unpack_from(buf, offset)
        return cls(rid, kind, tuple(data))


@attrs.frozen
class NetifCtrlResponse(ring.WireRecord, fields=("id", "type", "status", "data")):
    """``xen_netif_ctrl_response``."""

    _layout = CTRL_RESPONSE
    id: int
    type: int
    status: int
    data: int = 0


def validate_tx_fragment(offset: int, length: int) -> None:
    """A fragment must stay inside its 4 KiB granted page (netback treats it as fatal)."""
    if offset + length > ring.PAGE_SIZE:
        raise NetifProtocolError(f"fragment at offset {offset} of {length} bytes crosses the page")


def validate_tx_packet(first: NetifTxRequest, fragments: list[NetifTxRequest]) -> int:
    """Check a TX packet (first slot plus the ``more_data`` fragments after it, extras
    excluded) and return the first slot's own length."""
    if len(fragments) + 1 > XEN_NETIF_NR_SLOTS_MIN:
        raise NetifProtocolError(
            f"packet uses {len(fragments) + 1} slots (> {XEN_NETIF_NR_SLOTS_MIN})"
        )
    rest = sum(f.size for f in fragments)
    if rest > first.size:
        raise NetifProtocolError(f"fragments total {rest} exceeds packet size {first.size}")
    for frag in fragments:
        validate_tx_fragment(frag.offset, frag.size)
    first_len = first.size - rest
    validate_tx_fragment(first.offset, first_len)
    return first_len


def netif_tx_front_ring(buf: ring.Buffer, *, init: bool = True, index: int = 0) -> ring.FrontRing:
    """The TX ring as the frontend sees it (256 slots on one page)."""
    return ring.front_ring(buf, NETIF_TX_RING_ENTRY_SIZE, init=init, index=index)


def netif_tx_back_ring(buf: ring.Buffer, *, index: int = 0) -> ring.BackRing:
    return ring.back_ring(buf, NETIF_TX_RING_ENTRY_SIZE, index=index)


def netif_rx_front_ring(buf: ring.Buffer, *, init: bool = True, index: int = 0) -> ring.FrontRing:
    """The RX ring as the frontend sees it (256 slots on one page)."""
    return ring.front_ring(buf, NETIF_RX_RING_ENTRY_SIZE, init=init, index=index)


def netif_rx_back_ring(buf: ring.Buffer, *, index: int = 0) -> ring.BackRing:
    return ring.back_ring(buf, NETIF_RX_RING_ENTRY_SIZE, index=index)
