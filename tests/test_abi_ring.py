"""The io/ring.h ring: sizes, the shared header, and every RING_* macro.

``RingModel`` restates the macros of xen-reference.md section 3 as plain
integer arithmetic; the property test drives our FrontRing/BackRing and the
model with the same random schedule (from indices near 2**32) and compares the
shared header, the private indices and every answer after each step. The C
interop test reuses the model to predict the real macros' decisions.
"""

from __future__ import annotations

import struct

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.abi import ring
from shared.abi.ring import (
    BackRing,
    BackRingState,
    FrontRing,
    FrontRingState,
    RingError,
    SRing,
    ring_size,
)

M = 2**32
HEADER = struct.Struct("<IIII")


@attrs.define
class RingModel:
    """Both ends' indices, with the macros written out as u32 arithmetic."""

    nr_ents: int
    req_prod: int = 0
    req_event: int = 1
    rsp_prod: int = 0
    rsp_event: int = 1
    req_prod_pvt: int = 0
    rsp_cons: int = 0
    rsp_prod_pvt: int = 0
    req_cons: int = 0

    @classmethod
    def at(cls, nr_ents: int, start: int) -> RingModel:
        s = start % M
        return cls(nr_ents, s, (s + 1) % M, s, (s + 1) % M, s, s, s, s)

    def header(self) -> tuple[int, int, int, int]:
        return (self.req_prod, self.req_event, self.rsp_prod, self.rsp_event)

    def free_requests(self) -> int:
        return self.nr_ents - (self.req_prod_pvt - self.rsp_cons) % M

    def pending_responses(self) -> int:
        """Requests the backend consumed but has not answered."""
        return (self.req_cons - self.rsp_prod_pvt) % M

    @staticmethod
    def notify(new: int, old: int, event: int) -> bool:
        return (new - event) % M < (new - old) % M

    def push_requests(self, n: int) -> bool:
        old, self.req_prod_pvt = self.req_prod, (self.req_prod_pvt + n) % M
        self.req_prod = self.req_prod_pvt
        return self.notify(self.req_prod, old, self.req_event)

    def unconsumed_requests(self) -> int:
        return min(
            (self.req_prod - self.req_cons) % M,
            (self.nr_ents - (self.req_cons - self.rsp_prod_pvt) % M) % M,
        )

    def take_requests(self) -> int:
        n = (self.req_prod - self.req_cons) % M
        self.req_cons = self.req_prod
        return n

    def final_requests(self) -> int:
        if work := self.unconsumed_requests():
            return work
        self.req_event = (self.req_cons + 1) % M
        return self.unconsumed_requests()

    def push_responses(self, n: int) -> bool:
        old, self.rsp_prod_pvt = self.rsp_prod, (self.rsp_prod_pvt + n) % M
        self.rsp_prod = self.rsp_prod_pvt
        return self.notify(self.rsp_prod, old, self.rsp_event)

    def take_responses(self) -> int:
        n = (self.rsp_prod - self.rsp_cons) % M
        self.rsp_cons = self.rsp_prod
        return n

    def final_responses(self) -> int:
        if work := (self.rsp_prod - self.rsp_cons) % M:
            return work
        self.rsp_event = (self.rsp_cons + 1) % M
        return (self.rsp_prod - self.rsp_cons) % M


@pytest.mark.parametrize(
    ("nbytes", "entry", "expected"),
    [
        (4096, 112, 32),  # blkif x86_64
        (4096, 108, 32),  # blkif x86_32-abi
        (4096, 12, 256),  # netif tx
        (4096, 8, 256),  # netif rx
        (4096, 16, 128),  # netif ctrl
        (8192, 112, 64),
        (16384, 112, 128),
        (32768, 112, 256),
        (65536, 112, 512),
        (64 + 112, 112, 1),
        (64 + 3 * 112, 112, 2),
    ],
)
def test_ring_size_rounds_down_to_power_of_two(nbytes: int, entry: int, expected: int) -> None:
    assert ring_size(nbytes, entry) == expected


def test_ring_size_refuses_a_ring_without_room_for_one_entry() -> None:
    with pytest.raises(ValueError):
        ring_size(64 + 111, 112)


@pytest.mark.parametrize(("order", "nbytes"), [(0, 4096), (1, 8192), (4, 65536)])
def test_ring_bytes_by_order(order: int, nbytes: int) -> None:
    assert ring.ring_bytes(order) == nbytes


@pytest.mark.parametrize("order", [-1, 5])
def test_ring_order_outside_0_to_4_is_refused(order: int) -> None:
    with pytest.raises(ValueError):
        ring.ring_bytes(order)


def test_shared_ring_init_sets_producers_events_and_zeroes_only_the_header_pads() -> None:
    buf = bytearray(b"\xa5" * 4096)
    SRing(buf, 112).init()
    assert buf[:16] == HEADER.pack(0, 1, 0, 1)
    assert buf[16:64] == bytes(48)
    assert buf[64:] == b"\xa5" * (4096 - 64)


def test_indices_are_read_from_and_written_to_the_buffer_every_time() -> None:
    buf = bytearray(4096)
    s = SRing(buf, 112)
    HEADER.pack_into(buf, 0, 7, 8, 9, 10)
    assert (s.req_prod, s.req_event, s.rsp_prod, s.rsp_event) == (7, 8, 9, 10)
    s.req_prod, s.req_event, s.rsp_prod, s.rsp_event = M + 1, M - 1, 3, 4
    assert HEADER.unpack_from(buf) == (1, M - 1, 3, 4)


@pytest.mark.parametrize(
    ("idx", "offset"),
    [
        (0, 64),
        (1, 176),
        (31, 64 + 31 * 112),
        (32, 64),
        (M - 1, 64 + 31 * 112),
        (M + 5, 64 + 5 * 112),
    ],
)
def test_slot_offset_masks_the_free_running_index(idx: int, offset: int) -> None:
    assert SRing(bytearray(4096), 112).slot_offset(idx) == offset


def test_multi_page_ring_spans_all_pages() -> None:
    buf = bytearray(4 * 4096)
    s = SRing.of_order(buf, 112, 2)
    assert s.nr_ents == 128
    s.write_slot(127, b"\xff" * 112)
    assert buf[64 + 127 * 112 : 64 + 128 * 112] == b"\xff" * 112
    with s.slot(127) as view:
        assert view.nbytes == 112


def test_slot_write_refuses_an_oversized_entry() -> None:
    with pytest.raises(ValueError):
        SRing(bytearray(4096), 8).write_slot(0, bytes(9))


def test_ring_on_an_mmap(tmp_path) -> None:
    import mmap

    path = tmp_path / "ring"
    path.write_bytes(bytes(4096))
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 4096) as mm:
        front = ring.front_ring(mm, 112)
        back = ring.back_ring(mm, 112)
        front.put_request(b"x" * 112)
        assert front.push_requests_and_check_notify()
        assert back.take_requests() == [b"x" * 112]
        del front, back
    assert path.read_bytes()[:16] == HEADER.pack(1, 1, 0, 1)


@pytest.mark.parametrize(
    ("old", "new", "event", "notify"),
    [
        (0, 1, 1, True),
        (0, 5, 3, True),
        (0, 5, 6, False),
        (0, 5, 0, False),  # event not in (old, new]
        (5, 5, 5, False),  # nothing pushed
        (M - 2, 3, M - 1, True),  # window wraps
        (M - 2, 3, 0, True),
        (M - 2, 3, 4, False),
        (M - 1, 0, 0, True),
    ],
)
def test_push_notifies_iff_event_lies_in_old_to_new(
    old: int, new: int, event: int, notify: bool
) -> None:
    buf = bytearray(4096)
    front = FrontRing(SRing(buf, 112), new)
    HEADER.pack_into(buf, 0, old, event, 0, 0)
    assert front.push_requests_and_check_notify() is notify
    back = BackRing(SRing(buf, 112), new)
    HEADER.pack_into(buf, 0, 0, 0, old, event)
    assert back.push_responses_and_check_notify() is notify


@pytest.mark.parametrize(
    ("req_prod", "req_cons", "rsp_prod_pvt", "expected"),
    [
        (10, 4, 4, 6),
        (40, 4, 4, 32),  # capped at the ring size
        (40, 20, 0, 12),  # capped by 20 unanswered requests
        (3, M - 2, M - 2, 5),  # wraps
        (4, 4, 4, 0),
    ],
)
def test_unconsumed_requests_is_the_min_formula(
    req_prod: int, req_cons: int, rsp_prod_pvt: int, expected: int
) -> None:
    buf = bytearray(4096)
    back = BackRing(SRing(buf, 112))
    back.restore(BackRingState(rsp_prod_pvt, req_cons))
    HEADER.pack_into(buf, 0, req_prod, 0, 0, 0)
    assert back.nr_unconsumed_requests() == expected
    assert back.has_unconsumed_requests() is (expected != 0)


def test_frontend_cannot_overfill_the_ring() -> None:
    front = ring.front_ring(bytearray(4096), 112, index=M - 3)
    for _ in range(32):
        front.put_request(b"r")
    assert front.full() and front.free_requests() == 0
    with pytest.raises(RingError):
        front.put_request(b"r")


def test_backend_cannot_answer_more_than_it_consumed() -> None:
    buf = bytearray(4096)
    front, back = ring.front_ring(buf, 112), ring.back_ring(buf, 112)
    front.put_request(b"r")
    front.push_requests()
    back.take_requests()
    back.put_response(b"a")
    with pytest.raises(RingError):
        back.put_response(b"b")


def test_impossible_req_prod_is_rejected_as_a_misbehaving_frontend() -> None:
    buf = bytearray(4096)
    back = ring.back_ring(buf, 112, index=M - 10)
    assert not back.request_prod_overflow((M - 10 + 32) % M)
    assert back.request_prod_overflow((M - 10 + 33) % M)
    HEADER.pack_into(buf, 0, (M - 10 + 33) % M, 0, 0, 0)
    with pytest.raises(RingError):
        back.take_requests()


def test_req_prod_moving_backwards_stops_consumption_at_the_ring_size() -> None:
    buf = bytearray(4096)
    back = ring.back_ring(buf, 112, index=100)
    HEADER.pack_into(buf, 0, 110, 0, 0, 0)
    assert len(back.take_requests()) == 10
    HEADER.pack_into(buf, 0, 105, 0, 0, 0)  # the frontend rewinds req_prod
    assert len(back.take_requests()) == 22  # stops where responses are owed
    assert back.request_cons_overflow(back.req_cons)


def test_impossible_rsp_prod_is_rejected_as_a_misbehaving_backend() -> None:
    buf = bytearray(4096)
    front = ring.front_ring(buf, 112, index=5)
    HEADER.pack_into(buf, 0, 5, 6, 5 + 33, 6)
    assert front.response_prod_overflow(5 + 33)
    with pytest.raises(RingError):
        front.take_responses()


def test_take_respects_the_limit() -> None:
    buf = bytearray(4096)
    front, back = ring.front_ring(buf, 112), ring.back_ring(buf, 112)
    for k in range(5):
        front.put_request(bytes([k]))
    front.push_requests()
    assert [r[0] for r in back.take_requests(limit=2)] == [0, 1]
    assert [r[0] for r in back.take_requests()] == [2, 3, 4]


def test_final_check_arms_the_event_only_when_idle() -> None:
    buf = bytearray(4096)
    front, back = (
        ring.front_ring(buf, 112, init=False, index=M - 1),
        ring.back_ring(buf, 112, index=M - 1),
    )
    HEADER.pack_into(buf, 0, M - 1, 0, M - 1, 0)
    front.put_request(b"q")
    front.push_requests()
    assert back.final_check_for_requests() is True
    assert back.sring.req_event == 0  # untouched while there is work
    back.take_requests()
    assert back.final_check_for_requests() is False
    assert back.sring.req_event == 1  # req_cons (0 after the wrap) + 1
    assert front.final_check_for_responses() is False
    assert front.sring.rsp_event == 0  # rsp_cons (M - 1) + 1 wraps to 0


def test_state_round_trips_and_attach_resets_both_indices() -> None:
    buf = bytearray(4096)
    front = FrontRing(SRing(buf, 112))
    front.restore(FrontRingState(M + 7, 3))
    assert front.state() == FrontRingState(7, 3)
    front.attach(M - 1)
    assert front.state() == FrontRingState(M - 1, M - 1)
    back = BackRing(SRing(buf, 112))
    back.restore(BackRingState(9, 12))
    assert back.state() == BackRingState(9, 12)
    assert attrs.evolve(back.state(), req_cons=1) == BackRingState(9, 1)


_ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(
            ["push", "push_plain", "take_req", "final_req", "respond", "take_rsp", "final_rsp"]
        ),
        st.integers(0, 40),
    ),
    max_size=120,
)


@settings(max_examples=150, deadline=None)
@given(
    start=st.one_of(st.integers(0, M - 1), st.integers(M - 70, M - 1)),
    order=st.integers(0, 1),
    actions=_ACTIONS,
)
def test_rings_behave_exactly_like_the_macros(start: int, order: int, actions: list) -> None:
    buf = bytearray(4096 << order)
    HEADER.pack_into(buf, 0, start, (start + 1) % M, start, (start + 1) % M)
    front = ring.front_ring(buf, 112, order, init=False, index=start)
    back = ring.back_ring(buf, 112, order, index=start)
    model = RingModel.at(front.nr_ents, start)
    sent = taken_req = answered = taken_rsp = 0
    back_asleep = front_asleep = True
    for action, arg in actions:
        if action in ("push", "push_plain"):
            n = min(arg, model.free_requests())
            for _ in range(n):
                front.put_request(sent.to_bytes(8, "little"))
                sent += 1
            if action == "push_plain":  # the caller kicks the backend itself
                front.push_requests()
                model.push_requests(n)
                back_asleep = back_asleep and n == 0
                continue
            notify = front.push_requests_and_check_notify()
            assert notify is model.push_requests(n)
            assert notify is (n > 0 and back_asleep), "lost or spurious wakeup"
            back_asleep = back_asleep and not notify
        elif action == "respond":
            n = min(arg, model.pending_responses())
            for _ in range(n):
                back.put_response(answered.to_bytes(8, "little"))
                answered += 1
            notify = back.push_responses_and_check_notify()
            assert notify is model.push_responses(n)
            assert notify is (n > 0 and front_asleep), "lost or spurious wakeup"
            front_asleep = front_asleep and not notify
        elif action == "take_req":
            got = back.take_requests()
            assert len(got) == model.take_requests()
            back_asleep = back_asleep and not got  # a consumer with work runs to its final check
            for raw in got:
                assert int.from_bytes(raw[:8], "little") == taken_req
                taken_req += 1
        elif action == "take_rsp":
            got = front.take_responses()
            assert len(got) == model.take_responses()
            front_asleep = front_asleep and not got
            for raw in got:
                assert int.from_bytes(raw[:8], "little") == taken_rsp
                taken_rsp += 1
        elif action == "final_req" and not back_asleep:
            work = model.final_requests()
            assert back.final_check_for_requests() is (work > 0)
            back_asleep = work == 0
        elif action == "final_rsp" and not front_asleep:
            work = model.final_responses()
            assert front.final_check_for_responses() is (work > 0)
            front_asleep = work == 0
        assert HEADER.unpack_from(buf) == model.header()
        assert front.state() == FrontRingState(model.req_prod_pvt, model.rsp_cons)
        assert back.state() == BackRingState(model.rsp_prod_pvt, model.req_cons)
        assert front.free_requests() == model.free_requests()
        assert back.nr_unconsumed_requests() == model.unconsumed_requests()
