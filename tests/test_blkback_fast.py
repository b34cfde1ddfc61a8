"""blkback's fast path recogniser agrees with the general checks: it takes
only requests the general path would accept with the same plan, and passes
every refusal on (where it is refused and counted)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.backend.blkback_fast import fast_request, whole_page_sectors
from services.backend.blkback_order import OrderingQueue
from services.backend.blkback_request import DeviceLimits, Kind, admit_and_plan
from shared.abi.blkif import (
    BlkifOp,
    BlkifProtocolError,
    BlkifRequest,
    BlkifRequestIndirect,
    Segment,
)
from tests.test_blkback_core import DISK, EMPTY, REFUSALS, RO

OP = BlkifOp


def rw(op: int, sector: int, *segs: tuple[int, int, int]) -> bytes:
    return BlkifRequest.of(op, 0, 7, sector, tuple(Segment(*s) for s in segs)).encode()


@pytest.mark.parametrize(
    ("why", "slot", "limits", "_status"), REFUSALS, ids=[r[0] for r in REFUSALS]
)
def test_every_refusal_goes_to_the_general_path(
    why: str, slot: bytes, limits: object, _status: int
) -> None:
    assert fast_request(slot.ljust(112, b"\0"), limits) is None  # type: ignore[arg-type]


def test_direct_read_of_whole_pages_and_a_short_last_page() -> None:
    got = fast_request(rw(OP.READ, 16, (5, 0, 7), (6, 0, 7), (9, 0, 3)), DISK)
    assert got == (7, OP.READ, 16, 20, (5, 6, 9), ())


@pytest.mark.parametrize(
    ("slot", "limits"),
    [
        (rw(OP.READ, 0, (5, 1, 7)), DISK),  # starts inside its page
        (rw(OP.WRITE, 0, (5, 0, 3), (6, 0, 7)), DISK),  # a hole between segments
        (rw(OP.WRITE, 0, (5, 0, 7)), RO),  # refused: read-only
        (rw(OP.READ, 1020, (5, 0, 7)), DISK),  # refused: past the end
        (rw(OP.READ, 0, (5, 0, 7)), EMPTY),  # refused: no medium
        (rw(OP.FLUSH_DISKCACHE, 0), DISK),  # ordered: the queue decides
        (rw(OP.WRITE_BARRIER, 0, (5, 0, 7)), DISK),
        (BlkifRequestIndirect(OP.WRITE, 300, 1, 0, 0, (1,)).encode(), DISK),  # over 256
        (BlkifRequestIndirect(OP.FLUSH_DISKCACHE, 3, 1, 0, 0, (1,)).encode(), DISK),
        (BlkifRequestIndirect(OP.WRITE, 8, 1, 0, 0, (1,)).encode(), RO),
    ],
)
def test_what_the_fast_path_leaves_alone(slot: bytes, limits: object) -> None:
    assert fast_request(slot.ljust(112, b"\0"), limits) is None  # type: ignore[arg-type]


def test_indirect_names_its_pages_only() -> None:
    slot = BlkifRequestIndirect(OP.READ, 600, 9, 64, 0, (11, 12, 13)).encode()
    assert fast_request(slot, DISK) is None  # 600 segments: over the 256 offered
    wide = DeviceLimits(4096, False, True, 1024, True)
    assert fast_request(slot, wide) == (9, OP.READ, 64, 600, (), (11, 12))


def test_whole_page_sectors() -> None:
    assert whole_page_sectors(bytes(3), bytes([7, 7, 7])) == 24
    assert whole_page_sectors(bytes(2), bytes([7, 0])) == 9
    assert whole_page_sectors(bytes([0, 1]), bytes([7, 7])) == 0
    assert whole_page_sectors(bytes(2), bytes([3, 7])) == 0
    assert whole_page_sectors(bytes(1), bytes([8])) == 0
    assert whole_page_sectors(b"", b"") == 0


# mostly whole pages, so that many examples reach the fast path
segment = st.tuples(
    st.integers(0, 2**32 - 1),
    st.sampled_from([0] * 8 + [1, 9]),
    st.sampled_from([7] * 8 + [0, 3, 8, 9]),
)
TAKEN: list[int] = []


@settings(max_examples=400, deadline=None)
@given(
    op=st.sampled_from([OP.READ, OP.WRITE, OP.WRITE_BARRIER, OP.FLUSH_DISKCACHE, 9]),
    sector=st.integers(0, 1100),
    segs=st.one_of(st.lists(segment, max_size=3), st.lists(segment, max_size=11)),
    readonly=st.booleans(),
)
def test_agrees_with_the_general_path(
    op: int, sector: int, segs: list[tuple[int, int, int]], readonly: bool
) -> None:
    limits = RO if readonly else DISK
    slot = bytearray(112)
    slot[:] = BlkifRequest.of(OP.READ, 0, 7, sector, ()).encode()
    slot[0], slot[1] = op, len(segs)
    for k, (g, f, la) in enumerate(segs):
        slot[24 + 8 * k : 30 + 8 * k] = g.to_bytes(4, "little") + bytes([f, la])
    got = fast_request(bytes(slot), limits)
    if got is None:
        return
    TAKEN.append(1)
    admitted, io = admit_and_plan(bytes(slot), limits)  # must not raise
    assert io is not None
    assert admitted.kind in (Kind.READ, Kind.WRITE)
    rid, fop, fsector, nsect, grefs, indirect = got
    assert (rid, fop, fsector, indirect) == (7, op, sector, ())
    assert (io.offset, io.nbytes, io.segments.grefs) == (sector * 512, nsect * 512, grefs)


def test_the_agreement_test_reached_the_fast_path() -> None:
    test_agrees_with_the_general_path()
    assert len(TAKEN) > 20


def test_general_path_refuses_what_fast_path_passed_on() -> None:
    with pytest.raises(BlkifProtocolError):
        admit_and_plan(rw(OP.WRITE, 0, (5, 0, 7)), RO)


def test_skip_takes_a_sequence_number_only_from_an_empty_queue() -> None:
    q = OrderingQueue()
    assert q.skip() == 0
    assert q.submit(Kind.WRITE) == 1
    with pytest.raises(RuntimeError):
        q.skip()
    assert q.startable() == [1]
    q.complete(1)
    assert q.skip() == 2


async def test_a_run_of_persistent_grants_is_found_once_and_forgotten_on_disconnect() -> None:
    from services.backend.blkback_grants import GrantCache

    class NoHv:
        async def unmap(self, maps: object) -> None:
            pass

    cache = GrantCache(NoHv(), 1, persistent=True)  # type: ignore[arg-type]
    cache._gfns.update({10: 100, 11: 101, 12: 102, 20: 300})
    assert cache.lookup_run((10, 11, 12)) == 100
    assert cache.lookup_run((10, 20)) is None  # frames apart
    assert cache.lookup_run((10, 99)) is None  # 99 not mapped
    cache._gfns[12] = 555  # (never happens while connected: the answer is kept)
    assert cache.lookup_run((10, 11, 12)) == 100
    await cache.release_all()
    assert cache.lookup_run((10, 11, 12)) is None
    assert GrantCache(NoHv(), 1, persistent=False).lookup_run((10,)) is None  # type: ignore[arg-type]


class _Hv:
    notified = 0

    async def notify(self, port: int) -> None:
        self.notified += 1

    async def unmap(self, maps: object) -> None:
        pass


def _persistent_blkif(tmp_path: Path) -> tuple:
    """A blkif over a real image and guest RAM: refs 1000-2023 persistently
    mapped as 4 runs of 256 frames from frame 100, refs 2000-2003 the
    indirect pages at frames 10-13; ``(blkif, front ring, image, memory)``."""
    import collections

    from services.backend.blkback_conn import Blkif
    from services.backend.blkback_grants import GrantCache
    from services.backend.blkback_image import DiskImage
    from services.backend.blkback_order import ExecutionLog
    from shared.abi import blkif as bi
    from shared.guestmem import GuestMemory

    image_path = tmp_path / "disk.img"
    image_path.write_bytes(bytes(8 << 20))
    image = DiskImage.open(image_path, readonly=False)
    mem = GuestMemory.create(tmp_path / "ram", 2048)
    ring_buf = bytearray(4096)
    front = bi.blkif_front_ring(ring_buf)
    back = bi.blkif_back_ring(ring_buf)
    grants = GrantCache(_Hv(), 1, persistent=True)  # type: ignore[arg-type]
    grants._gfns.update({1000 + k: 100 + k for k in range(1024)})
    grants._gfns.update({2000 + k: 10 + k for k in range(4)})
    limits = DeviceLimits(16384, False, True, 256, True)
    blkif = Blkif(
        1, _Hv(), mem, back, 5, grants, image, limits, ExecutionLog(), collections.Counter()
    )  # type: ignore[arg-type]
    return blkif, front, image, mem


def _indirect(run: int, last_sect: int = 7) -> bytes:
    """The indirect page of a request over run ``run`` (256 pages)."""
    from shared.abi import blkif as bi

    refs = range(1000 + 256 * run, 1000 + 256 * (run + 1))
    segs = [bi.Segment(r, 0, 7) for r in refs]
    segs[-1] = bi.Segment(segs[-1].gref, 0, last_sect)
    return bi.encode_indirect_page(segs)


async def test_big_inline_requests_are_answered_one_push_each(tmp_path: Path) -> None:
    """Four 1 MiB reads in one kick: each response is pushed as soon as its
    data is in (PUSH_BYTES), so the frontend copies one while we read the
    next; four 4 KiB reads go out a push per INTAKE_BATCH of them."""
    from services.backend.blkback_conn import INTAKE_BATCH, PUSH_BYTES

    assert 4096 < PUSH_BYTES <= 1 << 20
    blkif, front, image, mem = _persistent_blkif(tmp_path)
    back = blkif.ring
    pushes: list[int] = []
    real_push = blkif._push

    async def counted() -> None:
        pushes.append(back.rsp_prod_pvt)
        await real_push()

    blkif._push = counted  # type: ignore[method-assign]
    try:
        for k in range(4):
            mem.write(10 + k, 0, _indirect(k))
            front.put_request(
                BlkifRequestIndirect(OP.READ, 256, k, 2048 * k, 0, (2000 + k,)).encode()
            )
        front.push_requests()
        await blkif._intake()
        assert pushes == [1, 2, 3, 4]  # one push per 1 MiB answer
        assert blkif.counters["op:read"] == 4 and blkif.counters["requests"] == 4
        for k in range(4):
            front.put_request(rw(OP.READ, 8 * k, (1000 + k, 0, 7)))
        front.push_requests()
        pushes.clear()
        await blkif._intake()
        assert 1 < INTAKE_BATCH <= 4
        assert pushes == list(range(4 + INTAKE_BATCH, 9, INTAKE_BATCH))  # small ones: batched
    finally:
        image.close()
        mem.close()


async def test_an_indirect_request_seen_before_is_found_by_its_segment_records(
    tmp_path: Path,
) -> None:
    """The second 1 MiB write with the same indirect page skips the refs'
    unpacking and run lookup; a page that says something else (a short last
    segment) is worked out afresh, and a disconnect forgets every answer."""
    from shared.abi.blkif import SECTOR_SIZE

    blkif, front, image, mem = _persistent_blkif(tmp_path)
    grants = blkif.grants
    runs_seen: list[int] = []
    try:
        for rid, (stamp, last_sect) in enumerate([(1, 7), (2, 7), (3, 3)]):
            mem.view[100 * 4096 : 356 * 4096] = bytes([stamp]) * (256 * 4096)
            mem.write(10, 0, _indirect(0, last_sect))
            front.put_request(BlkifRequestIndirect(OP.WRITE, 256, rid, 0, 0, (2000,)).encode())
            front.push_requests()
            await blkif._intake()
            runs_seen.append(len(grants._runs))
            grants._runs.clear()  # what lookup_run keeps: gone, to see who calls it
            nbytes = (255 * 8 + last_sect + 1) * SECTOR_SIZE
            with open(image.path, "rb") as f:
                disk = f.read(1 << 20)
            assert disk[:nbytes] == bytes([stamp]) * nbytes
            assert disk[nbytes:] == bytes([2]) * (len(disk) - nbytes)  # (3: short by 4 sectors)
        assert runs_seen == [1, 0, 1]  # the first and the changed page, not the repeat
        assert blkif.counters["steady"] == 3 and blkif.counters["responses"] == 3
        await grants.release_all()
        assert grants.lookup_indirect_run(mem.read(10, 0, 256 * 8)) is None
    finally:
        image.close()
        mem.close()


def test_one_buffer_transfer_and_a_short_one(tmp_path: Path) -> None:
    from services.backend.blkback_image import DiskImage

    path = tmp_path / "img"
    path.write_bytes(bytes(range(256)) * 32)  # 8 KiB
    image = DiskImage.open(path, readonly=False)
    try:
        buf = bytearray(4096)
        image.transfer(False, 4096, memoryview(buf))
        assert bytes(buf) == path.read_bytes()[4096:]
        image.transfer(True, 0, memoryview(b"\xaa" * 512))
        assert path.read_bytes()[:512] == b"\xaa" * 512
        with pytest.raises(OSError):  # past the end: a short read is an error
            image.transfer(False, 6144, memoryview(bytearray(4096)))
    finally:
        image.close()
