"""Grant tables, version 1: the shared entry array and the GNTTABOP argument structs.

A guest's grant table is an array of 8-byte ``grant_entry_v1`` (512 per 4 KiB
frame) indexed by grant reference. The guest writes ``domid`` and ``frame``
before ``flags`` so the grantee never sees a valid type with stale contents;
the hypervisor sets ``GTF_reading``/``GTF_writing`` while the grant is in use.
The ``gnttab_*`` records are the in/out arguments of ``HYPERVISOR_grant_table_op``;
per-op failures come back in their ``status`` field as ``GNTST_*``.
"""

from __future__ import annotations

import enum
import struct

import attrs

from shared.abi import ring
from shared.abi._layout import layout

HEADER = "xen/grant_table.h"

GNTTAB_NR_RESERVED_ENTRIES = 8
GNTTAB_RESERVED_CONSOLE = 0
GNTTAB_RESERVED_XENSTORE = 1
GRANT_ENTRY_V1_SIZE = 8
GRANT_ENTRIES_PER_FRAME = ring.PAGE_SIZE // GRANT_ENTRY_V1_SIZE
DEFAULT_MAX_GRANT_FRAMES = 64
GNTMAP_GUEST_AVAIL0 = 16
GNTMAP_GUEST_AVAIL_MASK = 0xFFFFFFFF << GNTMAP_GUEST_AVAIL0 & 0xFFFFFFFF


class GTF(enum.IntFlag):
    """``GTF_*``: the entry type (low two bits, see :func:`grant_type`) and flag bits."""

    INVALID = 0
    PERMIT_ACCESS = 1
    ACCEPT_TRANSFER = 2
    TRANSITIVE = 3
    TYPE_MASK = 3
    READONLY = 1 << 2
    READING = 1 << 3
    WRITING = 1 << 4
    PWT = 1 << 5
    PCD = 1 << 6
    PAT = 1 << 7
    SUB_PAGE = 1 << 8
    # Transfer sub-flags reuse the access bits (obsolete PV page transfer).
    TRANSFER_COMMITTED = 1 << 2
    TRANSFER_COMPLETED = 1 << 3


class GNTTABOP(enum.IntEnum):
    """``GNTTABOP_*`` command numbers."""

    MAP_GRANT_REF = 0
    UNMAP_GRANT_REF = 1
    SETUP_TABLE = 2
    DUMP_TABLE = 3
    TRANSFER = 4
    COPY = 5
    QUERY_SIZE = 6
    UNMAP_AND_REPLACE = 7
    SET_VERSION = 8
    GET_STATUS_FRAMES = 9
    GET_VERSION = 10
    SWAP_GRANT_REF = 11
    CACHE_FLUSH = 12


class GNTMAP(enum.IntFlag):
    """``GNTMAP_*`` flags of ``gnttab_map_grant_ref``."""

    DEVICE_MAP = 1 << 0
    HOST_MAP = 1 << 1
    READONLY = 1 << 2
    APPLICATION_MAP = 1 << 3
    CONTAINS_PTE = 1 << 4


class GNTCOPY(enum.IntFlag):
    """``GNTCOPY_*``: which side of a copy is named by grant reference."""

    SOURCE_GREF = 1 << 0
    DEST_GREF = 1 << 1


class GNTST(enum.IntEnum):
    """``GNTST_*`` per-op status codes."""

    OKAY = 0
    GENERAL_ERROR = -1
    BAD_DOMAIN = -2
    BAD_GNTREF = -3
    BAD_HANDLE = -4
    BAD_VIRT_ADDR = -5
    BAD_DEV_ADDR = -6
    NO_DEVICE_SPACE = -7
    PERMISSION_DENIED = -8
    BAD_PAGE = -9
    BAD_COPY_ARG = -10
    ADDRESS_TOO_BIG = -11
    EAGAIN = -12
    NO_SPACE = -13


GRANT_ENTRY_V1 = layout(
    "struct grant_entry_v1", HEADER, ("flags", "H"), ("domid", "H"), ("frame", "I")
)
MAP_GRANT_REF = layout(
    "struct gnttab_map_grant_ref",
    HEADER,
    ("host_addr", "Q"),
    ("flags", "I"),
    ("ref", "I"),
    ("dom", "H"),
    ("status", "h"),
    ("handle", "I"),
    ("dev_bus_addr", "Q"),
)
UNMAP_GRANT_REF = layout(
    "struct gnttab_unmap_grant_ref",
    HEADER,
    ("host_addr", "Q"),
    ("dev_bus_addr", "Q"),
    ("handle", "I"),
    ("status", "h"),
)
SETUP_TABLE = layout(
    "struct gnttab_setup_table",
    HEADER,
    ("dom", "H"),
    ("nr_frames", "I"),
    ("status", "h"),
    ("frame_list", "Q", 1, "frame_list.p"),
)
# The union u is {grant_ref_t ref; xen_pfn_t gmfn;}: held as the 64-bit gmfn,
# whose low 32 bits are ref on this little-endian ABI.
COPY_PTR = layout(
    "struct gnttab_copy_ptr",
    HEADER,
    ("u", "Q", 1, "u.gmfn"),
    ("domid", "H"),
    ("offset", "H"),
)
COPY = layout(
    "struct gnttab_copy",
    HEADER,
    ("source", COPY_PTR),
    ("dest", COPY_PTR),
    ("len", "H"),
    ("flags", "H"),
    ("status", "h"),
)
QUERY_SIZE = layout(
    "struct gnttab_query_size",
    HEADER,
    ("dom", "H"),
    ("nr_frames", "I"),
    ("max_nr_frames", "I"),
    ("status", "h"),
)

_U16 = struct.Struct("<H")
_DOMID_FRAME = struct.Struct("<HI")


def grant_type(flags: int) -> GTF:
    """The entry type: ``flags & GTF_type_mask``."""
    return GTF(flags & GTF.TYPE_MASK)


@attrs.frozen
class GrantEntry(ring.WireRecord, fields=("flags", "domid", "frame")):
    """``grant_entry_v1``: ``domid`` may access guest frame ``frame`` as ``flags`` allow."""

    _layout = GRANT_ENTRY_V1
    flags: int
    domid: int
    frame: int

    @property
    def readonly(self) -> bool:
        return bool(self.flags & GTF.READONLY)

    @property
    def in_use(self) -> bool:
        return bool(self.flags & (GTF.READING | GTF.WRITING))


def grant_entry_offset(ref: int) -> int:
    """Byte offset of entry ``ref`` in the (contiguous) v1 table."""
    return ref * GRANT_ENTRY_V1_SIZE


def read_entry(table: ring.Bytes | ring.Buffer, ref: int) -> GrantEntry:
    return GrantEntry.decode(table, grant_entry_offset(ref))


def write_grant(
    table: ring.Buffer, ref: int, domid: int, frame: int, readonly: bool = False
) -> None:
    """Grant ``domid`` access to ``frame`` the way a guest must: contents, then flags.

    Python stores are issued in program order and x86 keeps store order, so
    writing ``flags`` last is the ``wmb()`` the protocol asks for.
    """
    off = grant_entry_offset(ref)
    _DOMID_FRAME.pack_into(table, off + 2, domid, frame)
    flags = GTF.PERMIT_ACCESS | (GTF.READONLY if readonly else 0)
    _U16.pack_into(table, off, flags)


def end_grant(table: ring.Buffer, ref: int) -> bool:
    """Revoke ``ref`` if the grantee is not using it; False if it is still mapped.

    Without cmpxchg this is only safe when the hypervisor cannot set
    reading/writing concurrently (it serialises grant ops per table).
    """
    off = grant_entry_offset(ref)
    flags = _U16.unpack_from(table, off)[0]
    if flags & (GTF.READING | GTF.WRITING):
        return False
    _U16.pack_into(table, off, 0)
    return True


@attrs.frozen
class GnttabMapGrantRef(
    ring.WireRecord,
    fields=("host_addr", "flags", "ref", "dom", "status", "handle", "dev_bus_addr"),
):
    """``gnttab_map_grant_ref``: IN host_addr, flags (GNTMAP), ref, dom;
    OUT status, handle, dev_bus_addr."""

    _layout = MAP_GRANT_REF
    host_addr: int
    flags: int
    ref: int
    dom: int
    status: int = 0
    handle: int = 0
    dev_bus_addr: int = 0


@attrs.frozen
class GnttabUnmapGrantRef(
    ring.WireRecord, fields=("host_addr", "dev_bus_addr", "handle", "status")
):
    """``gnttab_unmap_grant_ref``: IN host_addr, dev_bus_addr, handle; OUT status."""

    _layout = UNMAP_GRANT_REF
    host_addr: int
    dev_bus_addr: int
    handle: int
    status: int = 0


@attrs.frozen
class GnttabSetupTable(ring.WireRecord, fields=("dom", "nr_frames", "status", "frame_list")):
    """``gnttab_setup_table``: ``frame_list`` is the guest address of a xen_pfn_t array."""

    _layout = SETUP_TABLE
    dom: int
    nr_frames: int
    status: int = 0
    frame_list: int = 0


@attrs.frozen
class GnttabCopyPtr:
    """One side of a copy: ``u`` is ``u.ref`` with the matching GNTCOPY flag, else ``u.gmfn``."""

    u: int
    domid: int
    offset: int

    @property
    def ref(self) -> int:
        return self.u & 0xFFFFFFFF


@attrs.frozen
class GnttabCopy:
    """``gnttab_copy``: copy ``len`` bytes from ``source`` to ``dest``; OUT status."""

    source: GnttabCopyPtr
    dest: GnttabCopyPtr
    len: int
    flags: int
    status: int = 0

    def pack_into(self, buf: ring.Buffer, offset: int = 0) -> None:
        s, d = self.source, self.dest
        COPY.struct.pack_into(
            buf,
            offset,
            s.u,
            s.domid,
            s.offset,
            d.u,
            d.domid,
            d.offset,
            self.len,
            self.flags,
            self.status,
        )

    def encode(self) -> bytes:
        out = bytearray(COPY.size)
        self.pack_into(out)
        return bytes(out)

    @classmethod
    def decode(cls, buf: ring.Bytes | ring.Buffer, offset: int = 0) -> GnttabCopy:
        v = COPY.struct.unpack_from(buf, offset)
        return cls(GnttabCopyPtr(*v[0:3]), GnttabCopyPtr(*v[3:6]), v[6], v[7], v[8])


@attrs.frozen
class GnttabQuerySize(ring.WireRecord, fields=("dom", "nr_frames", "max_nr_frames", "status")):
    """``gnttab_query_size``: IN dom; OUT current and maximum frames, status."""

    _layout = QUERY_SIZE
    dom: int
    nr_frames: int = 0
    max_nr_frames: int = 0
    status: int = 0
