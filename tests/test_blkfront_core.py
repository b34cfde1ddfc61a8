"""blkfront's sans-IO core against a fake backend in this process.

The fake backend reads the core's ring and grant table out of the same
bytearray "guest RAM" (the real byte layouts), checks each grant the way the
hypervisor would (grantee, type, read-only), marks grants in use while it
holds a request (``GTF_reading``/``GTF_writing``), and answers from a disk
bytearray. Tests steer it: hold requests, answer out of order, refuse
flushes, send bogus ids, die.
"""

from __future__ import annotations

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.frontend.kernel import blkfront_request as rq
from services.frontend.kernel.blkfront_core import BlkfrontCore, Completion
from services.frontend.kernel.blkfront_gnttab import GrantTable, PagePool
from services.frontend.kernel.blkfront_state import BackendInfo, BioKind
from shared import codec
from shared.abi import blkif as bi
from shared.abi import grant as gt
from shared.abi.ring import PAGE_SIZE, BackRing

OP = bi.BlkifOp
NR_PAGES = 6144
TABLE_GFN = NR_PAGES - 16  # room for GRANT_FRAMES
FULL = BackendInfo(
    sectors=8192,
    flush=True,
    barrier=True,
    discard=True,
    persistent=False,
    max_indirect_segments=256,
)


class FakeBackend:
    """dom0's blkback, reduced to what the core must get right."""

    def __init__(self, ram: bytearray, refs: list[int], order: int, disk: bytearray) -> None:
        self.ram, self.disk = ram, disk
        self.table = memoryview(ram)[TABLE_GFN * PAGE_SIZE :]
        gfns = [self._gfn(r, write=True) for r in refs]
        assert gfns == list(range(gfns[0], gfns[0] + len(gfns)))
        buf = memoryview(ram)[gfns[0] * PAGE_SIZE : (gfns[-1] + 1) * PAGE_SIZE]
        self.ring = bi.blkif_back_ring(buf, order)
        self.held: list[bi.AnyRequest] = []
        self.log: list[tuple[int, int]] = []  # (op, in flight at the backend when taken)
        self.refuse_flush: int | None = None  # a status for FLUSH/BARRIER
        self.grant_faults = 0
        self.notified = 0

    def _gfn(self, ref: int, write: bool) -> int:
        e = gt.read_entry(self.table, ref)
        if gt.grant_type(e.flags) != gt.GTF.PERMIT_ACCESS or e.domid != 0:
            raise PermissionError(f"ref {ref} not granted to dom0")
        if write and e.readonly:
            raise PermissionError(f"ref {ref} is read-only")
        return e.frame

    def _pin(self, refs: list[int], set_: bool) -> None:
        for ref in refs:
            off = gt.grant_entry_offset(ref)
            flags = int.from_bytes(self.table[off : off + 2], "little")
            flags = flags | gt.GTF.READING if set_ else flags & ~(gt.GTF.READING | gt.GTF.WRITING)
            self.table[off : off + 2] = int(flags).to_bytes(2, "little")

    def take(self) -> list[bi.AnyRequest]:
        """Take every published request and hold it (grants pinned)."""
        got = [bi.decode_request(raw) for raw in self.ring.take_requests()]
        for req in got:
            self.log.append((req.operation, len(self.held)))
            self._pin(self._refs(req), True)
        self.held += got
        self.ring.final_check_for_requests()
        return got

    def _refs(self, req: bi.AnyRequest) -> list[int]:
        if isinstance(req, bi.BlkifRequestIndirect):
            return [*self._segments(req)[1], *req.indirect_grefs]
        if isinstance(req, bi.BlkifRequest):
            return [s.gref for s in req.segments]
        return []

    def _segments(self, req: bi.AnyRequest) -> tuple[int, list[int], list[bi.Segment]]:
        if isinstance(req, bi.BlkifRequestIndirect):
            pages = [
                bytes(self.ram[g * PAGE_SIZE : (g + 1) * PAGE_SIZE])
                for g in (self._gfn(r, write=False) for r in req.indirect_grefs)
            ]
            segs = list(bi.decode_indirect_segments(pages, req.nr_segments))
            return req.indirect_op, [s.gref for s in segs], segs
        assert isinstance(req, bi.BlkifRequest)
        return req.operation, [s.gref for s in req.segments], list(req.segments)

    def answer(self, reqs: list[bi.AnyRequest] | None = None, status: int | None = None) -> bool:
        """Execute and answer ``reqs`` (default: all held), in the given order;
        True if the frontend must be notified."""
        for req in list(self.held) if reqs is None else reqs:
            self.held.remove(req)
            self._pin(self._refs(req), False)
            st = self._execute(req) if status is None else status
            self.ring.put_response(bi.response_for(req, st).encode())
        notify = self.ring.push_responses_and_check_notify()
        self.notified += notify
        return notify

    def _execute(self, req: bi.AnyRequest) -> int:
        if isinstance(req, bi.BlkifRequestDiscard):
            s = req.sector_number * 512
            self.disk[s : s + req.nr_sectors * 512] = bytes(req.nr_sectors * 512)
            return bi.BlkifRsp.OKAY
        op, _, segs = self._segments(req)
        if op in (OP.FLUSH_DISKCACHE, OP.WRITE_BARRIER) and self.refuse_flush is not None:
            return self.refuse_flush
        at = req.sector_number * 512
        try:
            for seg in segs:
                gfn = self._gfn(seg.gref, write=op == OP.READ)
                n = seg.nr_sectors * 512
                page = gfn * PAGE_SIZE + seg.page_offset
                if op == OP.READ:
                    self.ram[page : page + n] = self.disk[at : at + n]
                else:
                    self.disk[at : at + n] = self.ram[page : page + n]
                at += n
        except PermissionError:
            self.grant_faults += 1
            return bi.BlkifRsp.ERROR
        return bi.BlkifRsp.OKAY


@attrs.define
class Rig:
    core: BlkfrontCore
    be: FakeBackend
    ram: bytearray
    disk: bytearray

    def reconnect(self, order: int = 0, info: BackendInfo = FULL) -> None:
        refs = self.core.setup_ring(order)
        self.be = FakeBackend(self.ram, refs, order, self.disk)
        self.core.connect(info)

    def run(self, rounds: int = 100) -> list[Completion]:
        """Pump, push, let the backend answer everything, until idle."""
        out: list[Completion] = []
        for _ in range(rounds):
            self.core.pump()
            self.core.push()
            out += self.core.take_completions()
            if not self.be.take() and not self.be.held and not self.core.pending:
                break
            self.be.answer()
            self.core.take_responses()
            out += self.core.take_completions()
        return out


def make(info: BackendInfo = FULL, order: int = 0, pool: int = 1024, frames: int = 8) -> Rig:
    ram = bytearray(NR_PAGES * PAGE_SIZE)
    table = GrantTable(memoryview(ram)[TABLE_GFN * PAGE_SIZE :], frames * 512)
    core = BlkfrontCore(51712, table, PagePool(range(TABLE_GFN - pool, TABLE_GFN)), ram, 0)
    rig = Rig(core, None, ram, bytearray(info.sectors * 512))  # type: ignore[arg-type]
    rig.reconnect(order, info)
    return rig


def pattern(n: int, seed: int) -> bytes:
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(n * 512))


def test_write_then_read_back_byte_exact() -> None:
    rig = make()
    data = pattern(24, 1)
    w = rig.core.submit(BioKind.WRITE, 100, 24, data)
    assert [(c.bio, c.status) for c in rig.run()] == [(w, 0)]
    assert rig.disk[100 * 512 : 124 * 512] == data
    r = rig.core.submit(BioKind.READ, 100, 24)
    (done,) = rig.run()
    assert (done.bio, done.status, done.data) == (r, 0, data)
    assert rig.be.grant_faults == 0


def test_write_grants_are_readonly_and_every_grant_is_revoked() -> None:
    rig = make()
    free = rig.core.grants.available
    rig.core.submit(BioKind.WRITE, 0, 8, pattern(8, 2))
    rig.core.pump()
    rig.core.push()
    (req,) = rig.be.take()
    assert rig.core.grants.entry(req.segments[0].gref).readonly
    rig.be.answer()
    rig.core.take_responses()
    assert rig.core.grants.available == free
    assert rig.core.in_flight() == 0


def test_batching_one_notify_for_a_batch_and_none_while_the_backend_is_busy() -> None:
    rig = make()
    for k in range(8):
        rig.core.submit(BioKind.WRITE, 8 * k, 8, pattern(8, k))
    assert rig.core.pump() == 8
    assert rig.core.push() is True  # one kick for eight requests
    rig.be.ring.take_requests()  # the backend is working: req_event not re-armed
    rig.core.submit(BioKind.READ, 0, 8)
    rig.core.pump()
    assert rig.core.push() is False  # it will find this one in its final check
    assert rig.core.statistics().notifies == 1


def test_ids_stay_below_ring_size_and_a_full_ring_queues() -> None:
    rig = make()
    for k in range(100):
        rig.core.submit(BioKind.WRITE, k, 1, pattern(1, k))
    assert rig.core.pump() == 32 and len(rig.core.pending) == 68
    rig.core.push()
    assert all(0 <= r.id < 32 for r in rig.be.take())
    done = rig.run()
    done += rig.run()
    assert sorted(c.bio for c in done) == list(range(1, 101))
    assert all(c.status == 0 for c in done)
    assert rig.disk[:512] == pattern(1, 0) and rig.disk[99 * 512 : 100 * 512] == pattern(1, 99)


def test_unknown_and_duplicate_response_ids_are_rejected() -> None:
    rig = make()
    rig.core.submit(BioKind.READ, 0, 1)
    rig.core.pump()
    rig.core.push()
    (req,) = rig.be.take()
    ring: BackRing = rig.be.ring
    for rid in (7, 999):  # never issued
        ring.req_cons += 1  # a backend that makes up responses
        ring.put_response(bi.BlkifResponse(rid, OP.READ, 0).encode())
    rig.be.answer()
    ring.req_cons += 1
    ring.put_response(bi.BlkifResponse(req.id, OP.READ, 0).encode())  # twice
    ring.push_responses()
    rig.core.take_responses()
    assert len(rig.core.take_completions()) == 1
    assert rig.core.statistics().bad_responses == 3


def test_a_response_with_the_wrong_operation_is_an_error() -> None:
    rig = make()
    b = rig.core.submit(BioKind.READ, 0, 1)
    rig.core.pump()
    rig.core.push()
    (req,) = rig.be.take()
    rig.be.held.clear()
    rig.be.ring.put_response(bi.BlkifResponse(req.id, OP.WRITE, 0).encode())
    rig.be.ring.push_responses()
    rig.core.take_responses()
    assert rig.core.take_completions() == [Completion(b, BioKind.READ, bi.BlkifRsp.ERROR)]


def test_one_mib_goes_as_one_indirect_request() -> None:
    rig = make()
    data = pattern(2048, 3)
    rig.core.submit(BioKind.WRITE, 0, 2048, data)
    rig.core.pump()
    rig.core.push()
    (req,) = rig.be.take()
    assert isinstance(req, bi.BlkifRequestIndirect) and req.nr_segments == 256
    rig.be.answer()
    rig.core.take_responses()
    assert rig.core.take_completions()[0].status == 0
    assert rig.disk[: 1 << 20] == data
    rig.core.submit(BioKind.READ, 0, 2048)
    (done,) = rig.run()
    assert done.data == data and rig.core.statistics().indirect == 2


def test_without_indirect_a_large_bio_is_split_into_11_segment_requests() -> None:
    rig = make(attrs.evolve(FULL, max_indirect_segments=0))
    data = pattern(256, 4)
    rig.core.submit(BioKind.WRITE, 8, 256, data)  # 32 pages
    rig.core.pump()
    rig.core.push()
    reqs = rig.be.take()
    assert [r.nr_segments for r in reqs] == [11, 11, 10]
    rig.be.answer()
    rig.core.take_responses()
    (done,) = rig.core.take_completions()
    assert done.status == 0 and rig.disk[8 * 512 : 264 * 512] == data


def test_multi_page_ring() -> None:
    rig = make(order=2)
    assert rig.core.ring is not None and rig.core.ring.nr_ents == 128
    for k in range(128):
        rig.core.submit(BioKind.WRITE, k, 1, pattern(1, k))
    assert rig.core.pump() == 128
    assert len(rig.run()) == 128


def test_persistent_grants_are_writable_and_reused() -> None:
    rig = make(attrs.evolve(FULL, persistent=True))
    refs = []
    for k in range(3):
        rig.core.submit(BioKind.WRITE, 0, 8, pattern(8, k))
        rig.core.pump()
        rig.core.push()
        (req,) = rig.be.take()
        refs.append(req.segments[0].gref)
        assert not rig.core.grants.entry(refs[-1]).readonly
        rig.be.answer()
        rig.core.take_responses()
    assert len(set(refs)) == 1 and rig.disk[:4096] == pattern(8, 2)
    rig.core.submit(BioKind.WRITE, 0, 2048, pattern(2048, 3))  # indirect pages too
    rig.core.pump()
    rig.core.push()
    (req,) = rig.be.take()
    assert not rig.core.grants.entry(req.indirect_grefs[0]).readonly


@pytest.mark.parametrize(
    ("flush", "barrier", "ops"),
    [
        (True, True, [OP.FLUSH_DISKCACHE]),
        (False, True, [OP.WRITE_BARRIER]),
        (False, False, []),  # write-through backend: nothing to send
    ],
)
def test_flush_maps_onto_what_the_backend_offers(flush: bool, barrier: bool, ops: list) -> None:
    rig = make(attrs.evolve(FULL, flush=flush, barrier=barrier))
    b = rig.core.submit(BioKind.FLUSH, 0)
    done = rig.run()
    assert [(c.bio, c.status) for c in done] == [(b, 0)]
    assert [op for op, _ in rig.be.log] == ops


def test_ordered_write_uses_the_barrier_when_offered() -> None:
    rig = make()
    rig.core.submit(BioKind.WRITE, 0, 1, pattern(1, 1))
    rig.core.submit(BioKind.WRITE_ORDERED, 1, 1, pattern(1, 2))
    rig.core.submit(BioKind.WRITE, 2, 1, pattern(1, 3))
    rig.core.pump()
    assert [r.operation for r in (rig.core.push(), rig.be.take())[1]] == [
        OP.WRITE,
        OP.WRITE_BARRIER,
        OP.WRITE,
    ]


def test_ordered_write_without_barrier_is_single_stepped() -> None:
    """E 29: the frontend never has another request in flight alongside it."""
    rig = make(attrs.evolve(FULL, barrier=False, flush=False))
    rig.core.submit(BioKind.WRITE, 0, 1, pattern(1, 1))
    rig.core.submit(BioKind.WRITE, 1, 1, pattern(1, 2))
    o = rig.core.submit(BioKind.WRITE_ORDERED, 2, 1, pattern(1, 3))
    rig.core.submit(BioKind.WRITE, 3, 1, pattern(1, 4))
    assert rig.core.pump() == 2  # the ordered write waits for these
    rig.core.push()
    rig.be.take()
    assert rig.core.pump() == 0
    rig.be.answer()
    rig.core.take_responses()
    assert rig.core.pump() == 1  # alone
    rig.core.push()
    (req,) = rig.be.take()
    assert req.operation == OP.WRITE and rig.core.in_flight() == 1
    assert rig.core.pump() == 0  # and nothing after it until it is answered
    rig.be.answer()
    rig.core.take_responses()
    assert o in [c.bio for c in rig.core.take_completions()]
    assert rig.core.pump() == 1
    assert rig.core.statistics().single_steps == 1
    assert [n for op, n in rig.be.log if op == OP.WRITE][2] == 0


@pytest.mark.parametrize("status", [bi.BlkifRsp.EOPNOTSUPP, bi.BlkifRsp.ERROR])
def test_a_refused_empty_flush_completes_ok_and_turns_flushes_off(status: int) -> None:
    rig = make(attrs.evolve(FULL, barrier=False))
    rig.be.refuse_flush = status
    b = rig.core.submit(BioKind.FLUSH, 0)
    assert [(c.bio, c.status) for c in rig.run()] == [(b, 0)]
    assert rig.core.backend.flush is False
    rig.core.submit(BioKind.FLUSH, 0)
    rig.run()
    assert [op for op, _ in rig.be.log] == [OP.FLUSH_DISKCACHE]  # the second stayed local
    assert rig.core.statistics().flushes_elided == 1


def test_a_refused_barrier_write_is_written_again_single_stepped() -> None:
    rig = make(attrs.evolve(FULL, flush=False))
    rig.be.refuse_flush = bi.BlkifRsp.EOPNOTSUPP
    data = pattern(1, 9)
    b = rig.core.submit(BioKind.WRITE_ORDERED, 5, 1, data)
    assert [(c.bio, c.status) for c in rig.run()] == [(b, 0)]
    assert [op for op, _ in rig.be.log] == [OP.WRITE_BARRIER, OP.WRITE]
    assert rig.disk[5 * 512 : 6 * 512] == data and rig.core.backend.barrier is False


def test_discard_and_discard_not_offered() -> None:
    rig = make()
    rig.disk[:1024] = b"\xff" * 1024
    b = rig.core.submit(BioKind.DISCARD, 0, 2)
    assert [(c.bio, c.status) for c in rig.run()] == [(b, 0)]
    assert rig.disk[:1024] == bytes(1024)
    rig2 = make(attrs.evolve(FULL, discard=False))
    b = rig2.core.submit(BioKind.DISCARD, 0, 2)
    assert [(c.bio, c.status) for c in rig2.run()] == [(b, bi.BlkifRsp.EOPNOTSUPP)]


def test_reconnect_reissues_every_unanswered_request_exactly_once() -> None:
    """xen-reference 2.8: the backend dies holding requests (grants mapped);
    the frontend abandons the ring, leaks the mapped grants, and re-issues
    everything unanswered on a new ring; each bio completes once."""
    rig = make()
    bios = [rig.core.submit(BioKind.WRITE, 8 * k, 8, pattern(8, k)) for k in range(40)]
    rig.core.pump()
    rig.core.push()
    taken = rig.be.take()
    rig.be.answer(taken[:5])  # some answered ...
    rig.core.take_responses()
    first = rig.core.take_completions()
    rig.be.answer(taken[5:10])  # ... some answered but never seen: the backend died
    rig.core.disconnect()
    assert rig.core.statistics().leaked_grants == 22  # still mapped; the ring was not
    assert len(rig.core.pending) == 35 and rig.core.pending[0].bio == bios[5]
    rig.reconnect(order=1)
    rest = rig.run()
    done = [c.bio for c in first + rest]
    assert sorted(done) == bios and len(done) == len(set(done))
    for k in range(40):
        assert rig.disk[8 * k * 512 : 8 * (k + 1) * 512] == pattern(8, k)
    assert rig.core.statistics().reissued == 27


def test_reconnect_resplits_for_a_backend_with_smaller_limits() -> None:
    rig = make()
    data = pattern(1024, 5)
    b = rig.core.submit(BioKind.WRITE, 0, 1024, data)
    rig.core.pump()
    rig.core.push()
    rig.be.take()
    rig.core.disconnect()
    rig.reconnect(info=attrs.evolve(FULL, max_indirect_segments=0))
    done = rig.run()
    assert [(c.bio, c.status) for c in done] == [(b, 0)]
    assert rig.disk[: len(data)] == data
    assert rig.core.statistics().indirect == 1  # only on the first backend


def test_state_round_trips_and_a_restored_core_finishes_the_work() -> None:
    rig = make()
    reads = rig.core.submit(BioKind.READ, 0, 8)
    writes = [rig.core.submit(BioKind.WRITE, 8 + k, 1, pattern(1, k)) for k in range(40)]
    rig.core.pump()
    rig.core.push()
    rig.be.take()
    state = rig.core.state()
    again = codec.decode(codec.encode(state))
    assert again == state
    assert len(again.shadow) == 32 and len(again.pending) == 9
    core = BlkfrontCore.restore(again, rig.core.grants, rig.core.pool, rig.ram, 0)
    rig.core = core
    rig.reconnect()
    done = rig.run()
    assert sorted(c.bio for c in done) == sorted([reads, *writes])
    assert core.outstanding() == 0 and core.statistics().reissued >= 32


@pytest.mark.parametrize("nsectors", [1, 7, 8, 9, 88, 2048, 4096 + 3, 8 * 600])
def test_indirect_pages_hold_the_same_segments_as_segment_records(nsectors: int) -> None:
    """The packed fast path equals the segment records encoded one by one."""
    from services.frontend.kernel import blkfront_request as rq

    refs = [1000 + 3 * k for k in range(rq.pages_for(nsectors))]
    segs = rq.segments(nsectors, refs)
    per = bi.SEGMENTS_PER_INDIRECT_FRAME
    expected = [bi.encode_indirect_page(segs[k : k + per]) for k in range(0, len(segs), per)]
    assert rq.indirect_contents(nsectors, refs) == expected
    pages = b"".join(expected)
    assert bi.decode_indirect_segments(
        [pages[k : k + PAGE_SIZE] for k in range(0, len(pages), PAGE_SIZE)] or [b""], len(segs)
    ) == tuple(segs)


def test_one_run_is_only_consecutive_frames() -> None:
    from services.frontend.kernel.blkfront_pages import _one_run

    assert _one_run([(5, 1), (6, 9), (7, 2)]) == 5 * PAGE_SIZE
    assert _one_run([(5, 1), (7, 9), (7, 2)]) is None  # ends fit, middle does not
    assert _one_run([(5, 1), (4, 9)]) is None
    assert _one_run([]) is None


@pytest.mark.parametrize("nsectors", [1, 7, 8, 9, 64, 88])
def test_direct_slots_are_the_request_records_bytes(nsectors: int) -> None:
    from services.frontend.kernel import blkfront_request as rq

    refs = [700 + k for k in range(rq.pages_for(nsectors))]
    want = bi.BlkifRequest.of(
        bi.BlkifOp.WRITE, 51712, 9, 12345, tuple(rq.segments(nsectors, refs))
    ).encode()
    assert rq.direct_slot(bi.BlkifOp.WRITE, 51712, 9, 12345, nsectors, refs) == want


def test_pump_with_a_byte_budget_stops_once_it_is_spent() -> None:
    rig = make()
    for k in range(4):
        rig.core.submit(BioKind.WRITE, 512 * k, 512, pattern(512, k))  # 256 KiB each
    assert rig.core.pump(max_bytes=256 * 1024) == 1
    assert rig.core.pump(max_bytes=300 * 1024) == 2  # the budget may be overshot by one
    assert rig.core.pump() == 1
    assert [c.status for c in rig.run()] == [0] * 4
    assert rig.disk[: 4 * 512 * 512] == b"".join(pattern(512, k) for k in range(4))


@pytest.mark.parametrize("n", [1, 2, 7, 11])
def test_a_direct_request_packed_in_the_ring_is_the_encoded_one(n: int) -> None:
    rig = make()
    ring = rig.core.ring
    assert ring is not None
    refs = [100 + 3 * k for k in range(n)]
    nsectors = 8 * (n - 1) + 5
    rq.put_direct(ring, OP.WRITE, 51712, 9, 4242, nsectors, refs)
    raw = rig.be.ring.sring.read_slot(ring.req_prod_pvt - 1)
    assert raw[: bi.REQUEST.size] == rq.direct_slot(OP.WRITE, 51712, 9, 4242, nsectors, refs)
    want = [bi.Segment(r, 0, 7) for r in refs[:-1]] + [bi.Segment(refs[-1], 0, 4)]
    assert list(bi.decode_request(raw).segments) == want


def test_a_run_of_pages_is_recognised_by_all_of_it_not_its_first_page() -> None:
    rig = make(attrs.evolve(FULL, persistent=True))
    core = rig.core
    a = ((10, 1), (11, 2), (12, 3))
    b = ((10, 1), (11, 2), (40, 9))  # same first page and length, another run
    assert core._layout(a) == ([1, 2, 3], 10 * PAGE_SIZE)
    assert core._layout(b) == ([1, 2, 9], None)
    assert core._layout(a) == ([1, 2, 3], 10 * PAGE_SIZE)


def test_persistent_pages_of_a_new_connection_are_named_by_their_new_refs() -> None:
    rig = make(attrs.evolve(FULL, persistent=True))
    first = pattern(2048, 1)
    rig.core.submit(BioKind.WRITE, 0, 2048, first)  # 1 MiB: indirect, persistent pages
    rig.run()
    rig.core.submit(BioKind.READ, 0, 2048)
    assert [c.data == first for c in rig.run()] == [True]
    rig.core.disconnect()
    rig.reconnect(info=attrs.evolve(FULL, persistent=True))
    second = pattern(2048, 2)
    rig.core.submit(BioKind.WRITE, 0, 2048, second)
    rig.core.submit(BioKind.READ, 0, 2048)
    assert [c.data for c in rig.run()] == [b"", second]
    assert rig.be.grant_faults == 0 and rig.disk[: 2048 * 512] == second


class _Kernel:
    nursery = None  # no kick task: the test pumps the rig itself

    def __init__(self) -> None:
        self.logged: list[str] = []

    def touch(self) -> None:
        pass

    def log(self, line: str) -> None:
        self.logged.append(line)


async def test_an_io_context_reaps_its_own_bios_with_their_status() -> None:
    from services.frontend.kernel.blkfront import BlockDevice

    rig = make(attrs.evolve(FULL, discard=False))
    dev = BlockDevice(_Kernel(), "xvda", 51712)  # type: ignore[arg-type]
    dev.core = rig.core
    ctx, other = dev.io_context(), dev.io_context()
    w = ctx.start(BioKind.WRITE, 8, 8, pattern(8, 5))
    d = ctx.start(BioKind.DISCARD, 0, 8)  # not offered: completes with EOPNOTSUPP
    o = other.start(BioKind.READ, 8, 8)
    assert (ctx.in_flight, other.in_flight) == (2, 1)
    dev._complete(rig.run())
    got = {c.bio: c.status for c in await ctx.reap()}
    assert got == {w: 0, d: bi.BlkifRsp.EOPNOTSUPP} and ctx.in_flight == 0
    (mine,) = await other.reap()
    assert (mine.bio, mine.data) == (o, pattern(8, 5))
    with pytest.raises(RuntimeError):
        await ctx.reap()  # nothing in flight: it would wait forever


async def test_an_io_context_with_end_io_refills_from_the_completion() -> None:
    """Each completion goes to ``end_io`` at once (no reap), which may start
    the next bio there; ``drained`` returns once the last is done, and only
    the last completion wakes a task."""
    from services.frontend.kernel.blkfront import BlockDevice

    rig = make(attrs.evolve(FULL, persistent=True))
    dev = BlockDevice(_Kernel(), "xvda", 51712)  # type: ignore[arg-type]
    dev.core = rig.core
    rig.disk[:] = pattern(len(rig.disk) // 512, 9)
    todo, seen = iter(range(2, 10)), []

    def end_io(c: Completion) -> None:
        seen.append(c)
        sector = next(todo, None)
        if sector is not None:
            ctx.start(BioKind.READ, 8 * sector, 8)

    ctx = dev.io_context(end_io)
    ctx.start(BioKind.READ, 0, 8)
    ctx.start(BioKind.READ, 8, 8)
    woke = []
    while ctx.in_flight:
        rig.core.pump()
        rig.core.push()
        rig.be.take()
        rig.be.answer()
        rig.core.take_responses()
        woke.append(dev._complete(rig.core.take_completions()))
    assert woke[-1] is True and not any(woke[:-1])
    assert [c.data for c in seen] == [rig.disk[4096 * k : 4096 * (k + 1)] for k in range(10)]
    with trio.fail_after(1):
        await ctx.drained()
    with pytest.raises(RuntimeError):
        await ctx.reap()


async def test_a_failing_end_io_costs_no_other_completion() -> None:
    from services.frontend.kernel.blkfront import BlockDevice

    rig = make(attrs.evolve(FULL, persistent=True))
    k = _Kernel()
    dev = BlockDevice(k, "xvda", 51712)  # type: ignore[arg-type]
    dev.core = rig.core
    seen: list[int] = []

    def end_io(c: Completion) -> None:
        seen.append(c.bio)
        if len(seen) == 1:
            raise ValueError("a bug")

    ctx = dev.io_context(end_io)
    bios = [ctx.start(BioKind.READ, 8 * n, 8) for n in range(3)]
    dev._complete(rig.run())
    assert seen == bios and ctx.in_flight == 0 and "a bug" in " ".join(k.logged)
    with trio.fail_after(1):
        await ctx.drained()


def test_persistent_pages_come_back_as_the_runs_requests_of_that_size_gave() -> None:
    rig = make(attrs.evolve(FULL, persistent=True), pool=1200)
    core = rig.core
    for k in range(3):  # three 1 MiB requests in flight: three runs of 256 (+ indirect)
        core.submit(BioKind.WRITE, 2048 * k, 2048, pattern(2048, k))
    rig.run()
    assert [len(r) for r in core.persistent_free[256]] == [256] * 3
    granted = len(core.persistent_all)
    for k in range(40):  # 4 KiB requests: the 3 indirect pages, then pages of their own
        core.submit(BioKind.READ, 8 * k, 8)
    rig.run()
    singles = len(core.persistent_all) - granted
    assert 0 < singles <= 37  # (a ring of 32 slots: some were reused)
    assert [len(r) for r in core.persistent_free[256]] == [256] * 3  # runs left whole
    for _ in range(2):
        core.submit(BioKind.WRITE, 0, 2048, pattern(2048, 9))
        core.pump()
        (entry,) = [e for e in core.shadow if e is not None]
        assert core._layout(entry.pages)[1] is not None  # one run of frames again
        rig.run()
    assert rig.be.grant_faults == 0 and rig.disk[: 2048 * 512] == pattern(2048, 9)
    assert len(core.persistent_all) == granted + singles  # and no new grant for it


def test_a_page_pool_hands_out_the_first_run_of_consecutive_frames() -> None:
    pool = PagePool(range(100, 120))
    for gfn in (103, 108, 109):
        pool.claim(gfn)
    assert pool.alloc_run(4) == [104, 105, 106, 107]  # 100-102 is too short
    assert pool.alloc_run(5) == [110, 111, 112, 113, 114]
    assert pool.alloc_run(6) is None  # 115-119 is the longest left
    assert pool.alloc_run(0) is None and pool.alloc_run(99) is None
    assert pool.available == 20 - 3 - 4 - 5


def test_sixteen_one_mib_requests_go_out_at_once_on_persistent_pages() -> None:
    from services.frontend.kernel.blkfront_gnttab import GRANT_FRAMES

    rig = make(attrs.evolve(FULL, persistent=True), pool=16 * 257 + 64, frames=GRANT_FRAMES)
    core = rig.core
    blocks = [bytes([k + 1]) * (2048 * 512) for k in range(16)]
    for k, block in enumerate(blocks):
        core.submit(BioKind.WRITE, 2048 * k, 2048, block)
    core.pump()
    assert not core.pending  # refs and pages for all sixteen: none waits
    assert sum(e is not None for e in core.shadow) == 16
    assert all(core._layout(e.pages)[1] is not None for e in core.shadow if e is not None)
    rig.run()
    assert rig.disk[: 16 * 2048 * 512] == b"".join(blocks)


def test_a_full_pool_peels_requests_off_the_shortest_longer_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.frontend.kernel import blkfront_pages

    monkeypatch.setattr(blkfront_pages, "MAX_PERSISTENT_PAGES", 10)
    rig = make(attrs.evolve(FULL, persistent=True))
    core = rig.core
    core.submit(BioKind.WRITE, 0, 64, pattern(64, 1))  # 8 pages
    core.submit(BioKind.WRITE, 64, 16, pattern(16, 2))  # 2 pages: the pool is full
    rig.run()
    eight = core.persistent_free[8][0]
    core.submit(BioKind.WRITE, 100, 32, pattern(32, 3))  # 4 pages: peeled off the 8
    core.pump()
    (entry,) = [e for e in core.shadow if e is not None]
    assert entry.pages == eight[:4]
    assert {n: len(r) for n, r in core.persistent_free.items()} == {2: 1, 4: 1}
    rig.run()
    core.submit(BioKind.WRITE, 0, 80, pattern(80, 4))  # 10 pages: everything, gathered
    rig.run()
    assert len(core.persistent_all) == 10 and core._free_count == 10
    assert rig.disk[: 80 * 512] == pattern(80, 4) and rig.be.grant_faults == 0


def test_responses_taken_a_budget_at_a_time() -> None:
    rig = make(attrs.evolve(FULL, persistent=True), pool=1200)
    core = rig.core
    for k in range(3):
        core.submit(BioKind.READ, 2048 * k, 2048)
    core.pump()
    core.push()
    rig.be.take()
    rig.be.answer()
    assert [core.take_responses(max_bytes=256 * 1024) for _ in range(4)] == [1, 1, 1, 0]
    assert len(core.take_completions()) == 3


def test_answers_taken_but_not_yet_handled_count_at_a_disconnect() -> None:
    rig = make(attrs.evolve(FULL, persistent=True), pool=1200)
    core = rig.core
    bios = [core.submit(BioKind.READ, 2048 * k, 2048) for k in range(3)]
    core.pump()
    core.push()
    rig.be.take()
    rig.be.answer()
    assert core.take_responses(max_bytes=1 << 20) == 1  # two wait in the backlog
    core.disconnect()  # the backend went away: the two answers still count
    assert [c.bio for c in core.take_completions()] == bios
    assert not core.pending and core.stats["reissued"] == 0


_BIO_STEPS = st.lists(
    st.tuples(
        st.sampled_from(
            [BioKind.READ, BioKind.WRITE, BioKind.WRITE_ORDERED, BioKind.FLUSH, BioKind.DISCARD]
        ),
        st.integers(0, 60),  # first sector / 8
        st.sampled_from([1, 7, 8, 16, 88, 96, 512]),  # sectors: 1 page .. indirect
        st.booleans(),  # answer everything after this bio
    ),
    min_size=1,
    max_size=40,
)


def _drive(steps: list, steady: bool, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """``steps`` through a persistent-grant core, its steady-state steps on or off."""
    with monkeypatch.context() as m:
        if not steady:
            m.setattr(BlkfrontCore, "_issue_steady", lambda self, part, op: False)
            m.setattr(BlkfrontCore, "_answered_whole", lambda self, rid, entry: -1)
        rig = make(attrs.evolve(FULL, persistent=True), pool=1500)
        requests, done = [], []
        for n, (kind, at, nsect, settle) in enumerate(steps):
            data = pattern(nsect, n) if kind in (BioKind.WRITE, BioKind.WRITE_ORDERED) else b""
            rig.core.submit(kind, at * 8, nsect, data)
            rig.core.pump()
            rig.core.push()
            requests += rig.be.take()
            if settle:
                rig.be.answer()
                rig.core.take_responses()
            done += rig.core.take_completions()
        while rig.core.outstanding():
            rig.core.pump()
            rig.core.push()
            requests += rig.be.take()
            rig.be.answer()
            rig.core.take_responses()
            done += rig.core.take_completions()
        return requests, done, bytes(rig.disk), rig.core.statistics()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=_BIO_STEPS)
def test_the_steady_state_steps_do_what_the_general_path_does(steps: list) -> None:
    """The one-step issue of a persistent READ/WRITE and the one-step answer of
    a whole bio send the same requests (same ids, sectors, refs), complete the
    same bios with the same data, and leave the same disk as the general path."""
    with pytest.MonkeyPatch.context() as mp:
        fast = _drive(steps, True, mp)
        slow = _drive(steps, False, mp)
    assert fast == slow


def test_a_held_push_notifies_once_for_the_whole_span_at_the_end() -> None:
    """push(hold=8) publishes at once but decides about the kick only when 8
    requests are out since the last decision; a push without hold decides
    for everything held, so an idle backend is never left unkicked."""
    rig = make(attrs.evolve(FULL, persistent=True))
    core = rig.core
    assert not rig.be.take()  # the backend idles: req_event = req_cons + 1
    for k in range(3):
        core.submit(BioKind.READ, 8 * k, 8)
    core.pump()
    assert core.push(hold=8) is False and core.held
    assert len(rig.be.take()) == 3  # published all the same
    rig.be.answer()
    core.take_responses()
    core.submit(BioKind.READ, 64, 8)
    core.pump()
    assert core.push(hold=8) is False and core.held  # 4 since the decision
    assert core.push() is True and not core.held  # req_event was inside the span
    assert core.push() is False  # nothing new, nothing held
    before = core.statistics().notifies
    for k in range(8):
        core.submit(BioKind.READ, 8 * k, 8)
    core.pump()
    assert core.push(hold=8) is False and not core.held  # 8 out: decided; the backend is busy
    rig.be.take()
    rig.be.answer()
    core.take_responses()
    for k in range(8):
        core.submit(BioKind.READ, 8 * k, 8)
    core.pump()
    assert core.push(hold=8) is True and not core.held  # 8 out: decided at once
    assert core.statistics().notifies == before + 1


def test_a_disconnect_forgets_a_held_push() -> None:
    rig = make(attrs.evolve(FULL, persistent=True))
    rig.core.submit(BioKind.READ, 0, 8)
    rig.core.pump()
    rig.core.push(hold=8)
    assert rig.core.held
    rig.core.disconnect()
    assert not rig.core.held


def test_moderation_asks_for_a_notification_halfway_through_what_is_in_flight() -> None:
    rig = make(attrs.evolve(FULL, persistent=True))
    core = rig.core
    for k in range(10):
        core.submit(BioKind.READ, 8 * k, 8)
    core.pump()
    core.push()
    rig.be.take()
    rig.be.answer(rig.be.held[:4])
    core.take_responses()  # 4 answered, 6 still out: woken at the 4th of those
    assert core.ring is not None
    assert core.ring.sring.rsp_event == core.ring.rsp_cons + 6 // 2 + 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=_BIO_STEPS, answer=st.lists(st.integers(0, 40), min_size=1, max_size=40))
def test_moderation_never_asks_for_more_responses_than_are_coming(
    steps: list, answer: list[int]
) -> None:
    """However many are in flight and however many the backend answers at a
    time, the notification asked for (``rsp_event``) is for a response that
    will come: never past the last request in flight (a lost wakeup)."""
    rig = make(attrs.evolve(FULL, persistent=True), pool=1500)
    core = rig.core
    for n, (kind, at, nsect, _) in enumerate(steps):
        data = pattern(nsect, n) if kind in (BioKind.WRITE, BioKind.WRITE_ORDERED) else b""
        core.submit(kind, at * 8, nsect, data)
    for k in answer * 3:
        core.pump()
        core.push()
        rig.be.take()
        rig.be.answer(rig.be.held[:k])
        core.take_responses()
        ring = core.ring
        assert ring is not None
        ahead = (ring.sring.rsp_event - ring.rsp_cons) & 0xFFFFFFFF
        assert 1 <= ahead <= max(1, core.in_flight())
