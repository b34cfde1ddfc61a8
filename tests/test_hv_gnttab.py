"""Grant-table core: the checks of xen-reference 6.4, one test per rule."""

from __future__ import annotations

import pytest

from services.hypervisor.gnttab import INVALID_GFN, GrantTables
from services.hypervisor.gnttab_state import CopyMove
from shared.abi.constants import DOMID
from shared.abi.grant import (
    GNTCOPY,
    GNTMAP,
    GNTST,
    GTF,
    GnttabCopy,
    GnttabCopyPtr,
    GnttabMapGrantRef,
    GnttabQuerySize,
    GnttabSetupTable,
    GnttabUnmapGrantRef,
    end_grant,
    read_entry,
    write_grant,
)
from shared.codec import from_wire, to_wire

DOM0, DOMU, OTHER = 0, 1, 2
PAGES = 16
RW = GNTMAP.HOST_MAP
RO = GNTMAP.HOST_MAP | GNTMAP.READONLY


@pytest.fixture
def gt() -> GrantTables:
    gt = GrantTables()
    gt.add_domain(DOM0, None, hvm=False, privileged=True)
    gt.add_domain(DOMU, bytearray(PAGES * 4096))
    gt.add_domain(OTHER, bytearray(PAGES * 4096))
    return gt


def grant(gt: GrantTables, ref: int, to: int = DOM0, frame: int = 3, ro: bool = False) -> None:
    write_grant(gt.frame(DOMU, ref // 512), ref % 512, to, frame, readonly=ro)


def map_(gt: GrantTables, caller: int = DOM0, ref: int = 8, flags: int = RW, dom: int = DOMU):
    return gt.map_grant_ref(caller, GnttabMapGrantRef(0, flags, ref, dom))


def flags_of(gt: GrantTables, ref: int) -> int:
    return read_entry(gt.frame(DOMU, 0), ref).flags


# --- map -----------------------------------------------------------------------------------


def test_map_sets_reading_writing_and_says_what_to_map(gt: GrantTables) -> None:
    grant(gt, 8, frame=5)
    out, mapping = map_(gt)
    assert out.status == GNTST.OKAY and mapping is not None
    assert (mapping.granter, mapping.gfn, mapping.readonly, mapping.handle) == (DOMU, 5, False, 0)
    assert flags_of(gt, 8) == GTF.PERMIT_ACCESS | GTF.READING | GTF.WRITING
    assert not end_grant(gt.frame(DOMU, 0), 8)  # the guest cannot revoke it now


def test_readonly_map_sets_only_reading(gt: GrantTables) -> None:
    grant(gt, 8, ro=True)
    out, m = map_(gt, flags=RO)
    assert out.status == GNTST.OKAY and m.readonly
    assert flags_of(gt, 8) == GTF.PERMIT_ACCESS | GTF.READONLY | GTF.READING


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no_map_flags", GNTST.BAD_GNTREF),
        ("hvm_device_map", GNTST.GENERAL_ERROR),
        ("unknown_dom", GNTST.BAD_DOMAIN),
        ("domid_self", GNTST.BAD_DOMAIN),
        ("ref_beyond_table", GNTST.BAD_GNTREF),
        ("not_addressed_to_caller", GNTST.GENERAL_ERROR),
        ("invalid_entry", GNTST.GENERAL_ERROR),
        ("accept_transfer", GNTST.GENERAL_ERROR),
        ("write_of_readonly", GNTST.GENERAL_ERROR),
        ("frame_outside_ram", GNTST.BAD_PAGE),
    ],
)
def test_map_refusals(gt: GrantTables, case: str, expected: GNTST) -> None:
    grant(
        gt, 8, to=OTHER if case == "not_addressed_to_caller" else DOM0, ro=case.startswith("write")
    )
    grant(gt, 9, frame=PAGES)
    if case == "accept_transfer":
        gt.frame(DOMU, 0)[8 * 8] = GTF.ACCEPT_TRANSFER
    caller, ref, flags, dom = DOM0, 8, RW, DOMU
    match case:
        case "no_map_flags":
            flags = GNTMAP.READONLY
        case "hvm_device_map":
            caller, flags = OTHER, GNTMAP.HOST_MAP | GNTMAP.DEVICE_MAP
        case "unknown_dom":
            dom = 99
        case "domid_self":
            dom = DOMID.SELF
        case "ref_beyond_table":
            ref = 512  # one frame = refs 0..511
        case "invalid_entry":
            ref = 20
        case "frame_outside_ram":
            ref = 9
    out, mapping = map_(gt, caller, ref, flags, dom)
    assert (out.status, mapping) == (expected, None)
    assert flags_of(gt, 8) & (GTF.READING | GTF.WRITING) == 0


def test_a_freed_entry_cannot_be_mapped(gt: GrantTables) -> None:
    grant(gt, 8)
    assert end_grant(gt.frame(DOMU, 0), 8)
    assert map_(gt)[0].status == GNTST.GENERAL_ERROR


def test_maptrack_exhaustion_is_no_space() -> None:
    gt = GrantTables(max_maptrack=2)
    gt.add_domain(DOM0, None, hvm=False, privileged=True)
    gt.add_domain(DOMU, bytearray(PAGES * 4096))
    grant(gt, 8)
    assert [map_(gt)[0].status for _ in range(3)] == [GNTST.OKAY, GNTST.OKAY, GNTST.NO_SPACE]
    gt.unmap_grant_ref(DOM0, GnttabUnmapGrantRef(0, 0, 0))
    assert map_(gt)[0].handle == 0  # the freed handle is reused


# --- unmap ---------------------------------------------------------------------------------


def test_unmap_clears_flags_when_the_last_mapping_goes(gt: GrantTables) -> None:
    grant(gt, 8)
    h_rw = map_(gt)[0].handle
    h_ro = map_(gt, flags=RO)[0].handle
    assert gt.unmap_grant_ref(DOM0, GnttabUnmapGrantRef(0, 0, h_rw)).status == GNTST.OKAY
    assert flags_of(gt, 8) == GTF.PERMIT_ACCESS | GTF.READING  # writer gone, reader stays
    assert gt.unmap_grant_ref(DOM0, GnttabUnmapGrantRef(0, 0, h_ro)).status == GNTST.OKAY
    assert flags_of(gt, 8) == GTF.PERMIT_ACCESS
    assert gt.grants_in_use(DOMU) == ()


@pytest.mark.parametrize("handle", [0, 7, 2**32 - 1])
def test_unmap_of_unknown_handle_is_bad_handle(gt: GrantTables, handle: int) -> None:
    assert gt.unmap_grant_ref(DOM0, GnttabUnmapGrantRef(0, 0, handle)).status == GNTST.BAD_HANDLE


def test_a_domain_cannot_unmap_anothers_handle(gt: GrantTables) -> None:
    grant(gt, 8)
    handle = map_(gt)[0].handle
    assert gt.unmap_grant_ref(OTHER, GnttabUnmapGrantRef(0, 0, handle)).status == GNTST.BAD_HANDLE
    assert len(gt.mappings(DOM0)) == 1


# --- copy ----------------------------------------------------------------------------------


def copy_op(src: GnttabCopyPtr, dst: GnttabCopyPtr, n: int = 16, flags: int = 0) -> GnttabCopy:
    return GnttabCopy(src, dst, n, flags)


def test_copy_from_a_grant_to_the_callers_frame(gt: GrantTables) -> None:
    grant(gt, 8, to=OTHER, frame=3, ro=True)  # a readonly grant may be a copy source
    domu_ram = gt._tables[DOMU].memory
    domu_ram[3 * 4096 + 100 : 3 * 4096 + 104] = b"ring"
    op = copy_op(
        GnttabCopyPtr(8, DOMU, 100), GnttabCopyPtr(2, DOMID.SELF, 8), 4, GNTCOPY.SOURCE_GREF
    )
    out, move = gt.copy(OTHER, op)
    assert out.status == GNTST.OKAY
    assert move == CopyMove(DOMU, 3, 100, OTHER, 2, 8, 4)
    assert gt.perform(move) == b""
    assert gt._tables[OTHER].memory[2 * 4096 + 8 : 2 * 4096 + 12] == b"ring"
    assert flags_of(gt, 8) == GTF.PERMIT_ACCESS | GTF.READONLY  # no flag outlives the copy


def test_copy_with_dom0_payload_both_ways(gt: GrantTables) -> None:
    grant(gt, 8, frame=4)
    to_guest = copy_op(
        GnttabCopyPtr(0, DOMID.SELF, 0), GnttabCopyPtr(8, DOMU, 10), 3, GNTCOPY.DEST_GREF
    )
    out, move = gt.copy(DOM0, to_guest)
    assert out.status == GNTST.OKAY
    assert gt.perform(move, b"abc") == b""
    from_guest = copy_op(
        GnttabCopyPtr(8, DOMU, 10), GnttabCopyPtr(0, DOMID.SELF, 0), 3, GNTCOPY.SOURCE_GREF
    )
    assert gt.perform(gt.copy(DOM0, from_guest)[1]) == b"abc"


@pytest.mark.parametrize(
    "case, expected",
    [
        ("src_past_page", GNTST.BAD_COPY_ARG),
        ("dst_past_page", GNTST.BAD_COPY_ARG),
        ("frame_side_of_other_domain", GNTST.PERMISSION_DENIED),
        ("frame_side_named_by_own_id", GNTST.PERMISSION_DENIED),
        ("unknown_domain", GNTST.BAD_DOMAIN),
        ("bad_ref", GNTST.BAD_GNTREF),
        ("not_granted_to_caller", GNTST.GENERAL_ERROR),
        ("dest_readonly", GNTST.GENERAL_ERROR),
        ("own_frame_outside_ram", GNTST.BAD_PAGE),
    ],
)
def test_copy_refusals(gt: GrantTables, case: str, expected: GNTST) -> None:
    grant(gt, 8, to=OTHER)
    grant(gt, 9, to=OTHER, ro=True)
    grant(gt, 10, to=DOM0)
    src, dst, n, flags = (
        GnttabCopyPtr(8, DOMU, 0),
        GnttabCopyPtr(0, DOMID.SELF, 0),
        16,
        GNTCOPY.SOURCE_GREF,
    )
    match case:
        case "src_past_page":
            src, n = GnttabCopyPtr(8, DOMU, 4090), 7
        case "dst_past_page":
            dst, n = GnttabCopyPtr(0, DOMID.SELF, 4000), 97
        case "frame_side_of_other_domain":
            dst = GnttabCopyPtr(0, DOMU, 0)
        case "frame_side_named_by_own_id":
            dst = GnttabCopyPtr(0, OTHER, 0)
        case "unknown_domain":
            src = GnttabCopyPtr(8, 55, 0)
        case "bad_ref":
            src = GnttabCopyPtr(4096, DOMU, 0)
        case "not_granted_to_caller":
            src = GnttabCopyPtr(10, DOMU, 0)
        case "dest_readonly":
            src, dst, flags = (
                GnttabCopyPtr(0, DOMID.SELF, 0),
                GnttabCopyPtr(9, DOMU, 0),
                GNTCOPY.DEST_GREF,
            )
        case "own_frame_outside_ram":
            dst = GnttabCopyPtr(PAGES, DOMID.SELF, 0)
    out, move = gt.copy(OTHER, copy_op(src, dst, n, flags))
    assert (out.status, move) == (expected, None)


# --- table size, placement ------------------------------------------------------------------


def test_query_size_and_setup_table(gt: GrantTables) -> None:
    q = gt.query_size(DOMU, GnttabQuerySize(DOMID.SELF))
    assert (q.nr_frames, q.max_nr_frames, q.status) == (1, 64, GNTST.OKAY)
    out, frames = gt.setup_table(DOMU, GnttabSetupTable(DOMID.SELF, 4))
    assert out.status == GNTST.OKAY and frames == [INVALID_GFN] * 4
    assert gt.query_size(DOMU, GnttabQuerySize(DOMID.SELF)).nr_frames == 4
    assert gt.setup_table(DOMU, GnttabSetupTable(DOMID.SELF, 65))[0].status == GNTST.GENERAL_ERROR
    assert gt.query_size(DOMU, GnttabQuerySize(OTHER)).status == GNTST.PERMISSION_DENIED
    assert gt.query_size(DOMU, GnttabQuerySize(77)).status == GNTST.BAD_DOMAIN
    assert gt.query_size(DOM0, GnttabQuerySize(DOMU)).status == GNTST.OKAY


def test_place_frame_moves_the_table_into_guest_ram(gt: GrantTables) -> None:
    grant(gt, 8, frame=6)  # seeded before the guest mapped the frame
    assert gt.place_frame(DOMU, 0, 12) == 0
    ram = gt._tables[DOMU].memory
    assert read_entry(memoryview(ram)[12 * 4096 :], 8).frame == 6
    write_grant(memoryview(ram)[12 * 4096 :], 9, DOM0, 7)  # the guest writes its RAM
    assert map_(gt, ref=9)[1].gfn == 7
    assert gt.place_frame(DOMU, 64, 13) == -22
    assert gt.place_frame(DOMU, 1, PAGES) == -22
    assert gt.place_frame(DOMU, 2, 13) == 0
    assert gt.query_size(DOMU, GnttabQuerySize(DOMID.SELF)).nr_frames == 3


# --- destroy, introspection --------------------------------------------------------------


def test_destroying_either_side_leaves_no_mapping(gt: GrantTables) -> None:
    grant(gt, 8)
    grant(gt, 9, to=OTHER)
    map_(gt)
    map_(gt, caller=OTHER, ref=9)
    assert gt.statistics().mappings == 2
    gt.remove_domain(DOMU)
    assert gt.statistics().mappings == 0
    assert gt.mappings(DOM0) == () and gt.mappings(OTHER) == ()


def test_destroying_the_mapper_releases_the_entry(gt: GrantTables) -> None:
    grant(gt, 9, to=OTHER)
    map_(gt, caller=OTHER, ref=9)
    gt.remove_domain(OTHER)
    assert flags_of(gt, 9) == GTF.PERMIT_ACCESS


def test_grants_in_use_and_records_round_trip(gt: GrantTables) -> None:
    grant(gt, 8, frame=5)
    _, m = map_(gt)
    (use,) = gt.grants_in_use(DOMU)
    assert (use.ref, use.domid, use.frame, use.readers, use.writers) == (8, DOM0, 5, 0, 1)
    for record in (m, use, gt.statistics()):
        assert from_wire(to_wire(record)) == record
    assert gt.statistics().status["map_grant_ref:okay"] == 1
