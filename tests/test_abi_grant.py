"""Grant tables v1: constants, entry and GNTTABOP layouts, codecs, guest-side helpers."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.abi import grant
from shared.abi.grant import (
    GNTCOPY,
    GNTMAP,
    GNTST,
    GNTTABOP,
    GTF,
    GnttabCopy,
    GnttabCopyPtr,
    GnttabMapGrantRef,
    GnttabQuerySize,
    GnttabSetupTable,
    GnttabUnmapGrantRef,
    GrantEntry,
)
from tests.strategies import S16, U16, U32, U64


@pytest.mark.parametrize(
    ("constant", "value"),
    [
        (GTF.INVALID, 0),
        (GTF.PERMIT_ACCESS, 1),
        (GTF.ACCEPT_TRANSFER, 2),
        (GTF.TRANSITIVE, 3),
        (GTF.TYPE_MASK, 3),
        (GTF.READONLY, 4),
        (GTF.READING, 8),
        (GTF.WRITING, 16),
        (GTF.PWT, 32),
        (GTF.PCD, 64),
        (GTF.PAT, 128),
        (GTF.SUB_PAGE, 256),
        (GTF.TRANSFER_COMMITTED, 4),
        (GTF.TRANSFER_COMPLETED, 8),
        (GNTMAP.DEVICE_MAP, 1),
        (GNTMAP.HOST_MAP, 2),
        (GNTMAP.READONLY, 4),
        (GNTMAP.APPLICATION_MAP, 8),
        (GNTMAP.CONTAINS_PTE, 16),
        (grant.GNTMAP_GUEST_AVAIL_MASK, 0xFFFF0000),
        (GNTCOPY.SOURCE_GREF, 1),
        (GNTCOPY.DEST_GREF, 2),
        (grant.GNTTAB_NR_RESERVED_ENTRIES, 8),
        (grant.GNTTAB_RESERVED_CONSOLE, 0),
        (grant.GNTTAB_RESERVED_XENSTORE, 1),
        (grant.GRANT_ENTRIES_PER_FRAME, 512),
    ],
)
def test_constants_match_the_header(constant: int, value: int) -> None:
    assert constant == value


def test_gnttabop_numbers_in_order() -> None:
    names = [
        "MAP_GRANT_REF",
        "UNMAP_GRANT_REF",
        "SETUP_TABLE",
        "DUMP_TABLE",
        "TRANSFER",
        "COPY",
        "QUERY_SIZE",
        "UNMAP_AND_REPLACE",
        "SET_VERSION",
        "GET_STATUS_FRAMES",
        "GET_VERSION",
        "SWAP_GRANT_REF",
        "CACHE_FLUSH",
    ]
    assert [(op.name, op.value) for op in GNTTABOP] == [(n, i) for i, n in enumerate(names)]


def test_gntst_codes_count_down_from_okay() -> None:
    names = [
        "OKAY",
        "GENERAL_ERROR",
        "BAD_DOMAIN",
        "BAD_GNTREF",
        "BAD_HANDLE",
        "BAD_VIRT_ADDR",
        "BAD_DEV_ADDR",
        "NO_DEVICE_SPACE",
        "PERMISSION_DENIED",
        "BAD_PAGE",
        "BAD_COPY_ARG",
        "ADDRESS_TOO_BIG",
        "EAGAIN",
        "NO_SPACE",
    ]
    assert [(s.name, s.value) for s in GNTST] == [(n, -i) for i, n in enumerate(names)]


@pytest.mark.parametrize(
    ("lay", "size", "offsets"),
    [
        (grant.GRANT_ENTRY_V1, 8, {"flags": 0, "domid": 2, "frame": 4}),
        (
            grant.MAP_GRANT_REF,
            32,
            {
                "host_addr": 0,
                "flags": 8,
                "ref": 12,
                "dom": 16,
                "status": 18,
                "handle": 20,
                "dev_bus_addr": 24,
            },
        ),
        (grant.UNMAP_GRANT_REF, 24, {"dev_bus_addr": 8, "handle": 16, "status": 20}),
        (grant.SETUP_TABLE, 24, {"dom": 0, "nr_frames": 4, "status": 8, "frame_list": 16}),
        (grant.COPY, 40, {"source": 0, "dest": 16, "len": 32, "flags": 34, "status": 36}),
        (grant.QUERY_SIZE, 16, {"dom": 0, "nr_frames": 4, "max_nr_frames": 8, "status": 12}),
    ],
)
def test_layouts_match_the_reference(lay, size: int, offsets: dict[str, int]) -> None:
    assert lay.size == size
    assert {k: lay.offsets[k] for k in offsets} == offsets


def test_grant_type_is_the_low_two_bits() -> None:
    assert grant.grant_type(GTF.PERMIT_ACCESS | GTF.READONLY | GTF.READING) == GTF.PERMIT_ACCESS
    assert grant.grant_type(GTF.TRANSITIVE | GTF.WRITING) == GTF.TRANSITIVE
    assert grant.grant_type(GTF.READING) == GTF.INVALID


def test_guest_grants_and_revokes_an_entry_in_the_table() -> None:
    table = bytearray(4096)
    grant.write_grant(table, 9, domid=0, frame=0xFEEDF, readonly=True)
    assert table[72:80] == struct.pack("<HHI", GTF.PERMIT_ACCESS | GTF.READONLY, 0, 0xFEEDF)
    entry = grant.read_entry(table, 9)
    assert entry == GrantEntry(GTF.PERMIT_ACCESS | GTF.READONLY, 0, 0xFEEDF)
    assert entry.readonly and not entry.in_use
    table[72] |= GTF.READING  # the hypervisor maps it
    assert grant.read_entry(table, 9).in_use
    assert grant.end_grant(table, 9) is False
    assert grant.read_entry(table, 9).flags & GTF.PERMIT_ACCESS
    table[72] &= ~int(GTF.READING) & 0xFF
    assert grant.end_grant(table, 9) is True
    assert grant.read_entry(table, 9).flags == 0


def test_copy_ptr_ref_is_the_low_half_of_the_union() -> None:
    raw = bytearray(GnttabCopy(GnttabCopyPtr(0, 1, 0), GnttabCopyPtr(0, 2, 0), 8, 0).encode())
    struct.pack_into("<I", raw, 0, 0x1234)  # what C writes through u.ref
    assert GnttabCopy.decode(raw).source.ref == 0x1234
    assert GnttabCopyPtr(0xAAAA_BBBB_0000_0005, 0, 0).ref == 5


PTRS = st.builds(GnttabCopyPtr, U64, U16, U16)
RECORDS = [
    (GrantEntry, grant.GRANT_ENTRY_V1, st.builds(GrantEntry, U16, U16, U32)),
    (
        GnttabMapGrantRef,
        grant.MAP_GRANT_REF,
        st.builds(GnttabMapGrantRef, U64, U32, U32, U16, S16, U32, U64),
    ),
    (
        GnttabUnmapGrantRef,
        grant.UNMAP_GRANT_REF,
        st.builds(GnttabUnmapGrantRef, U64, U64, U32, S16),
    ),
    (GnttabSetupTable, grant.SETUP_TABLE, st.builds(GnttabSetupTable, U16, U32, S16, U64)),
    (GnttabCopy, grant.COPY, st.builds(GnttabCopy, PTRS, PTRS, U16, U16, S16)),
    (GnttabQuerySize, grant.QUERY_SIZE, st.builds(GnttabQuerySize, U16, U32, U32, S16)),
]


@pytest.mark.parametrize(("cls", "lay", "records"), RECORDS, ids=[r[0].__name__ for r in RECORDS])
def test_records_round_trip(cls, lay, records) -> None:
    @given(records, st.integers(0, 16))
    def round_trip(rec, offset: int) -> None:
        raw = rec.encode()
        assert len(raw) == lay.size
        assert cls.decode(raw) == rec
        buf = bytearray(b"\x99" * (offset + lay.size))
        rec.pack_into(buf, offset)
        assert cls.decode(buf, offset) == rec

    round_trip()
