"""Guest kernel, sans-IO pieces: callout wheel, fair upcall scan, balancing
policy, detection tree, guest-RAM layout (rings, sub-IPI counters, clamp) and
kernel state round trips through the codec."""

from __future__ import annotations

import pytest

from services.frontend.kernel import balance
from services.frontend.kernel import platform as plat
from services.frontend.kernel.callout import CalloutWheel
from services.frontend.kernel.clock import GuestClock
from services.frontend.kernel.evtchn import UpcallScanner
from services.frontend.kernel.ipi import take_bitmap, take_mailboxes, targets
from services.frontend.kernel.layout import RING_SLOTS, KernelMemory, pages_needed
from services.frontend.kernel.state import (
    EventTimerState,
    IpiState,
    PortBinding,
    UpcallState,
    VcpuKernelState,
)
from shared import codec
from shared.abi import sharedinfo as si
from shared.abi.constants import XENFEAT
from shared.guestmem import PAGE_SIZE


def ram(vcpus: int = 4) -> KernelMemory:
    return KernelMemory(bytearray(pages_needed(vcpus) * PAGE_SIZE), vcpus)


# --- callout wheel ---------------------------------------------------------------------------


def test_wheel_reset_moves_earliest_and_expires_in_order() -> None:
    w = CalloutWheel(2)
    assert w.reset(1, 300) and w.next_deadline() == 300
    assert w.reset(2, 100) and w.next_deadline() == 100
    assert not w.reset(3, 500)
    assert w.reset(2, 400)  # re-arming before it fired cancels the old deadline
    assert w.next_deadline() == 300
    assert [c for c, _, _ in w.expire(450)] == [1, 2]
    assert w.stop(3) and w.next_deadline() is None and w.fired == 2


def test_wheel_round_trips_through_the_codec() -> None:
    w = CalloutWheel(1)
    w.reset(7, 1_000, "callout")
    w.reset(9, 2_000, "test")
    state = codec.decode(codec.encode(w.state()))
    assert state == w.state()
    again = CalloutWheel.from_state(state)
    assert [c for c, _, _ in again.expire(5_000)] == [7, 9]


# --- upcall scan -----------------------------------------------------------------------------


def _pend(shared: bytearray, vinfo: int, *ports: int) -> None:
    for p in ports:
        si.evtchn_2l_set_pending(shared, p, vinfo)


def test_scan_is_fair_and_clears_only_this_cpus_ports() -> None:
    shared = bytearray(PAGE_SIZE)
    mine = {3, 5, 70, 200}
    sc = UpcallScanner(shared, (shared, 0), lambda p: p in mine)
    _pend(shared, 0, 3, 4, 5, 70, 200)  # 4 belongs to another CPU
    assert list(sc.scan()) == [3, 5, 70, 200]
    assert si.evtchn_is_pending(shared, 4) and not si.upcall_pending(shared, 0)
    _pend(shared, 0, 3, 70)
    sc.last_l1i, sc.last_l2i = 0, 3  # resume after port 3: 70 first
    assert list(sc.scan()) == [70, 3]
    assert sc.per_port[3] == 2 and sc.per_port[70] == 2


def test_scan_skips_masked_ports_and_counts_stray_upcalls() -> None:
    shared = bytearray(PAGE_SIZE)
    sc = UpcallScanner(shared, (shared, 0), lambda p: True)
    si.evtchn_set_mask(shared, 9)
    _pend(shared, 0, 9)
    assert list(sc.scan()) == [] and sc.stray == 1
    si.evtchn_clear_mask(shared, 9)
    si.set_pending_sel_bit(shared, 0, 0)
    assert list(sc.scan()) == [9]
    codec.decode(codec.encode(sc.state()))


# --- balancing -------------------------------------------------------------------------------


def test_shuffle_is_round_robin_two_per_cpu() -> None:
    plan = balance.shuffle(range(11, 19), 4)
    assert [c for _, c in plan] == [0, 1, 2, 3, 0, 1, 2, 3]


@pytest.mark.parametrize(
    ("kind", "mode", "hypercall", "cpu1"),
    [
        ("device", "vector", True, True),
        ("virq", "vector", False, True),
        ("ipi", "vector", False, True),
        ("device", "legacy", False, False),
    ],
)
def test_only_device_ports_go_to_xen_and_legacy_moves_nothing(
    kind: str, mode: str, hypercall: bool, cpu1: bool
) -> None:
    assert balance.needs_hypercall(kind, mode) is hypercall
    assert balance.can_assign(kind, mode, 1) is cpu1


def test_shuffler_advances_only_on_success() -> None:
    rr = balance.Shuffler(2)
    rr.assigned(False)
    assert rr.target() == 0
    rr.assigned(True)
    assert rr.target() == 1


# --- detection -------------------------------------------------------------------------------

XEN = 0x40000000
F_FULL = 1 << XENFEAT.hvm_callback_vector | 1 << XENFEAT.hvm_safe_pvclock


def test_signature_needs_two_more_leaves() -> None:
    sig = (XEN + 5, 0x566E6558, 0x65584D4D, 0x4D4D566E)
    assert plat.is_xen_leaf(XEN, sig)
    assert not plat.is_xen_leaf(XEN, (XEN + 1, *sig[1:]))
    assert not plat.is_xen_leaf(XEN, (XEN + 5, 0, 0, 0))


@pytest.mark.parametrize(
    ("features", "vector_rc", "stop_rc", "mode", "pv_timer", "pv_ipi"),
    [
        (F_FULL, 0, 0, "vector", True, True),
        (F_FULL & ~(1 << 9), 0, None, "vector", False, True),  # scenario 4
        (F_FULL & ~(1 << 8), None, None, "legacy", False, False),  # scenario 2
        (F_FULL, -38, None, "legacy", False, False),  # scenario 3
        (F_FULL, 0, -38, "vector", False, True),
    ],
)
def test_decision_tree(
    features: int,
    vector_rc: int | None,
    stop_rc: int | None,
    mode: str,
    pv_timer: bool,
    pv_ipi: bool,
) -> None:
    d = plat.decide(XEN, 0x40011, features, vector_rc, stop_rc, 0)
    assert (d.mode, d.pv_timer, d.pv_ipi) == (mode, pv_timer, pv_ipi)
    assert codec.decode(codec.encode(d)) == d


def test_legacy_callback_is_gsi_below_16_else_pci_intx() -> None:
    assert plat.legacy_callback_value(10) == 10
    value = plat.legacy_callback_value(28)
    assert value >> 56 == 1 and (value >> 11) & 31 == plat.PLATFORM_PCI_SLOT and value & 3 == 0
    assert plat.vector_callback_value() == 2 << 56 | 0x93


# --- guest RAM: one writer per word ----------------------------------------------------------


def test_mailbox_ring_is_spsc_and_refuses_when_full() -> None:
    m = ram()
    for i in range(RING_SLOTS):
        assert m.ring_put(1, 3, (1, i, 2, 3, 4))
    assert not m.ring_put(1, 3, (1, 99, 0, 0, 0))
    got = take_mailboxes(m, 3)
    assert [s[1] for _, s in got] == list(range(RING_SLOTS)) and {c for c, _ in got} == {1}
    assert m.ring_put(1, 3, (1, 99, 0, 0, 0)) and m.ring_indices(1, 3) == (
        RING_SLOTS + 1,
        RING_SLOTS,
    )


def test_merged_bitmap_ipis_lose_no_sub_ipi() -> None:
    m = ram()
    for _ in range(3):
        m.bump_sent(0, 2, 1)  # three PREEMPTs from cpu0 before cpu2 looks
    m.bump_sent(1, 2, 0)
    m.bump_sent(1, 2, 1)
    assert take_bitmap(m, 2) == {1: 4, 0: 1}
    assert take_bitmap(m, 2) == {}


def test_clock_clamp_is_global_across_cpus() -> None:
    m = ram()
    c0, c1 = GuestClock(m, 0), GuestClock(m, 1)
    m.set_clamp(0, 1 << 62)  # cpu0 once read a later time
    assert c1.now() == 1 << 62 and c1.clamped == 1
    c0.reset_clamp()
    c1.reset_clamp()
    assert c1.now() < 1 << 62


def test_targets() -> None:
    assert targets("others", 1, 4) == [0, 2, 3]
    assert targets("all", 1, 2) == [0, 1] and targets(3, 0, 4) == [3]


def test_vcpu_kernel_state_round_trip() -> None:
    state = VcpuKernelState(
        1,
        plat.decide(XEN, 0x40011, F_FULL, 0, 0, plat.vector_callback_value()),
        CalloutWheel(1).state(),
        (PortBinding(5, "ipi", 0, 1, False), PortBinding(11, "device", 0, 1, True)),
        IpiState(1, ((0, 1),), ((2, 3),), ((4, 4),), {"RENDEZVOUS": 2}, {"BITMAP": 1}),
        UpcallState(0, 5, 7, {5: 3}, {0xEF: 1}, 0),
        EventTimerState("xentimer", 123, 4, 3, 1, 1),
        {"nmis": 0},
    )
    assert codec.decode(codec.encode(state)) == state
