"""Event-channel core: one test per rule of xen-reference 7.2 and section 8."""

from __future__ import annotations

import pytest

from services.hypervisor.callback import Callback, Via, parse_callback_irq
from services.hypervisor.effects import Outcome, Upcall, Wake
from services.hypervisor.evtchn import EventChannels
from services.hypervisor.evtchn_state import EvtchnState
from shared.abi import sharedinfo as si
from shared.abi.constants import DOMID, EVTCHNSTAT, VIRQ, XenErrno
from shared.codec import from_wire, to_wire

DOM0, DOMU, OTHER = 0, 1, 2
VECTOR = Callback(Via.vector, 0xF3)
GSI = parse_callback_irq(5)


def err(e: XenErrno) -> int:
    return -int(e)


@pytest.fixture
def ev() -> EventChannels:
    ev = EventChannels()
    ev.add_domain(DOM0, 1, bytearray(4096), privileged=True)
    ev.add_domain(DOMU, 2, bytearray(4096))
    ev.add_domain(OTHER, 2, bytearray(4096))
    for d in (DOM0, DOMU, OTHER):
        ev.set_callback(d, VECTOR)
    return ev


def shared(ev: EventChannels, domid: int) -> bytearray:
    return ev.vcpu_info(domid, 0)[0]


def connect(ev: EventChannels, front: int = DOMU, back: int = DOM0) -> tuple[int, int]:
    """Frontend allocates, backend binds: returns (front port, back port)."""
    fport = ev.alloc_unbound(front, DOMID.SELF, back).value
    out = ev.bind_interdomain(back, front, fport)
    assert out.ok
    return fport, out.value


def clear_upcall(ev: EventChannels, domid: int, vcpu: int) -> None:
    """What the guest's upcall handler does first."""
    buf, off = ev.vcpu_info(domid, vcpu)
    si.set_upcall_pending(buf, off, False)
    si.take_pending_sel(buf, off)


# --- allocation ------------------------------------------------------------------------


def test_port_0_is_reserved_and_the_lowest_free_port_is_used(ev: EventChannels) -> None:
    ports = [ev.alloc_unbound(DOMU, DOMID.SELF, DOM0).value for _ in range(3)]
    assert ports == [1, 2, 3]
    assert ev.close(DOMU, 2).value == 0
    assert ev.alloc_unbound(DOMU, DOMID.SELF, DOM0).value == 2


def test_per_domain_limit_gives_enospc() -> None:
    ev = EventChannels()
    ev.add_domain(DOMU, 1, bytearray(4096), max_port=3)
    assert [ev.bind_ipi(DOMU, 0).value for _ in range(4)] == [1, 2, 3, err(XenErrno.ENOSPC)]


@pytest.mark.parametrize(
    "caller, dom, expected",
    [
        (DOMU, DOMID.SELF, 1),
        (DOMU, DOMU, 1),
        (DOMU, OTHER, err(XenErrno.EPERM)),  # a guest cannot allocate in another domain
        (DOM0, DOMU, 1),  # the privileged domain can
        (DOMU, 77, err(XenErrno.ESRCH)),
    ],
)
def test_alloc_unbound_acts_for_self_unless_privileged(
    ev: EventChannels, caller: int, dom: int, expected: int
) -> None:
    assert ev.alloc_unbound(caller, dom, DOM0).value == expected


def test_alloc_unbound_remote_self_means_the_caller(ev: EventChannels) -> None:
    assert ev.alloc_unbound(DOMU, DOMID.SELF, DOMID.SELF).value == 1
    assert ev.table(DOMU)[0].remote_dom == DOMU


# --- bind_interdomain --------------------------------------------------------------------


def test_bind_interdomain_connects_both_ends_and_sets_local_pending(ev: EventChannels) -> None:
    fport = ev.alloc_unbound(DOMU, DOMID.SELF, DOM0).value
    out = ev.bind_interdomain(DOM0, DOMU, fport)
    assert out.value == 1
    assert out.effects == (Upcall(DOM0, 0, (1,), 0xF3, False),)
    (back,) = ev.table(DOM0)
    assert (back.state, back.remote_dom, back.remote_port, back.pending) == (
        EVTCHNSTAT.interdomain,
        DOMU,
        fport,
        True,
    )
    (front,) = ev.table(DOMU)
    assert (front.state, front.remote_dom, front.remote_port) == (EVTCHNSTAT.interdomain, DOM0, 1)


@pytest.mark.parametrize(
    "setup, expected",
    [
        ("not_expecting_caller", err(XenErrno.EINVAL)),
        ("no_such_port", err(XenErrno.EINVAL)),
        ("already_bound", err(XenErrno.EINVAL)),
        ("no_such_domain", err(XenErrno.ESRCH)),
    ],
)
def test_bind_interdomain_refusals(ev: EventChannels, setup: str, expected: int) -> None:
    fport = ev.alloc_unbound(DOMU, DOMID.SELF, OTHER).value  # expects OTHER, not dom0
    if setup == "already_bound":
        assert ev.bind_interdomain(OTHER, DOMU, fport).ok
    remote_dom, remote_port = {
        "no_such_port": (DOMU, 99),
        "no_such_domain": (55, fport),
    }.get(setup, (DOMU, fport))
    caller = DOM0 if setup != "already_bound" else OTHER
    assert ev.bind_interdomain(caller, remote_dom, remote_port).value == expected


# --- bind_virq / bind_ipi ----------------------------------------------------------------


@pytest.mark.parametrize(
    "virq, vcpu, expected",
    [
        (VIRQ.TIMER, 1, 1),
        (24, 0, err(XenErrno.EINVAL)),  # >= NR_VIRQS
        (-1, 0, err(XenErrno.EINVAL)),
        (VIRQ.CONSOLE, 1, err(XenErrno.EINVAL)),  # global VIRQ on vCPU != 0
        (VIRQ.TIMER, 2, err(XenErrno.ENOENT)),  # no such vCPU
        (VIRQ.TIMER, 7, err(XenErrno.ENOENT)),
    ],
)
def test_bind_virq_rules(ev: EventChannels, virq: int, vcpu: int, expected: int) -> None:
    assert ev.bind_virq(DOMU, virq, vcpu).value == expected


def test_bind_virq_twice_on_one_vcpu_is_eexist(ev: EventChannels) -> None:
    assert ev.bind_virq(DOMU, VIRQ.TIMER, 0).value == 1
    assert ev.bind_virq(DOMU, VIRQ.TIMER, 1).value == 2  # per-vCPU: one per vCPU
    assert ev.bind_virq(DOMU, VIRQ.TIMER, 0).value == err(XenErrno.EEXIST)
    ev.close(DOMU, 1)
    assert ev.bind_virq(DOMU, VIRQ.TIMER, 0).value == 1  # closing unbinds


def test_bind_ipi_needs_an_existing_vcpu(ev: EventChannels) -> None:
    assert ev.bind_ipi(DOMU, 1).value == 1
    assert ev.bind_ipi(DOMU, 2).value == err(XenErrno.ENOENT)


# --- close / send ------------------------------------------------------------------------


def test_close_reverts_the_peer_to_unbound_expecting_the_closer(ev: EventChannels) -> None:
    fport, bport = connect(ev)
    assert ev.close(DOM0, bport).value == 0
    (front,) = ev.table(DOMU)
    assert (front.state, front.remote_dom) == (EVTCHNSTAT.unbound, DOM0)
    assert ev.table(DOM0) == ()
    assert not si.evtchn_is_pending(shared(ev, DOM0), bport)  # freed port: pending cleared
    assert ev.bind_interdomain(DOM0, DOMU, fport).ok  # dom0 may bind it again


@pytest.mark.parametrize("port", [0, 5, 4096, -1, 2**40])
def test_close_of_free_or_reserved_port_is_einval(ev: EventChannels, port: int) -> None:
    assert ev.close(DOMU, port).value == err(XenErrno.EINVAL)


def test_send_interdomain_sets_pending_on_the_remote_end(ev: EventChannels) -> None:
    fport, bport = connect(ev)
    out = ev.send(DOM0, bport)
    assert out.value == 0
    assert out.effects == (Upcall(DOMU, 0, (fport,), 0xF3, False),)
    assert si.evtchn_is_pending(shared(ev, DOMU), fport)


def test_send_ipi_pends_own_port_on_its_vcpu(ev: EventChannels) -> None:
    port = ev.bind_ipi(DOMU, 1).value
    assert ev.send(DOMU, port).effects == (Upcall(DOMU, 1, (port,), 0xF3, False),)


def test_send_on_unbound_is_dropped_and_virq_is_einval(ev: EventChannels) -> None:
    unbound = ev.alloc_unbound(DOMU, DOMID.SELF, DOM0).value
    assert ev.send(DOMU, unbound) == Outcome(0)
    virq = ev.bind_virq(DOMU, VIRQ.TIMER, 0).value
    assert ev.send(DOMU, virq).value == err(XenErrno.EINVAL)
    assert ev.send(DOMU, 999).value == err(XenErrno.EINVAL)


# --- status / bind_vcpu / reset / FIFO -------------------------------------------------


def test_status_reports_each_state(ev: EventChannels) -> None:
    fport, _ = connect(ev)
    virq = ev.bind_virq(DOMU, VIRQ.TIMER, 1).value
    st = ev.status(DOMU, DOMID.SELF, fport).data
    assert (st.status, st.vcpu, st.remote_dom, st.remote_port) == (EVTCHNSTAT.interdomain, 0, 0, 1)
    st = ev.status(DOMU, DOMID.SELF, virq).data
    assert (st.status, st.vcpu, st.irq) == (EVTCHNSTAT.virq, 1, VIRQ.TIMER)
    assert ev.status(DOMU, DOMID.SELF, 0).data.status == EVTCHNSTAT.closed
    assert ev.status(DOMU, DOMID.SELF, 5000).value == err(XenErrno.EINVAL)
    assert ev.status(DOMU, OTHER, 1).value == err(XenErrno.EPERM)
    assert ev.status(DOM0, DOMU, fport).data.status == EVTCHNSTAT.interdomain


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("ipi", err(XenErrno.EINVAL)),
        ("virq_timer", err(XenErrno.EINVAL)),
        ("virq_global", 0),
        ("interdomain", 0),
        ("unbound", 0),
        ("free", err(XenErrno.EINVAL)),
    ],
)
def test_bind_vcpu_moves_only_movable_ports(ev: EventChannels, kind: str, expected: int) -> None:
    port = {
        "ipi": lambda: ev.bind_ipi(DOMU, 0).value,
        "virq_timer": lambda: ev.bind_virq(DOMU, VIRQ.TIMER, 0).value,
        "virq_global": lambda: ev.bind_virq(DOMU, VIRQ.CON_RING, 0).value,
        "interdomain": lambda: connect(ev)[0],
        "unbound": lambda: ev.alloc_unbound(DOMU, DOMID.SELF, DOM0).value,
        "free": lambda: 42,
    }[kind]()
    assert ev.bind_vcpu(DOMU, port, 1).value == expected


def test_bind_vcpu_to_missing_vcpu_is_enoent(ev: EventChannels) -> None:
    fport, _ = connect(ev)
    assert ev.bind_vcpu(DOMU, fport, 2).value == err(XenErrno.ENOENT)


def test_reset_closes_everything_of_self_only(ev: EventChannels) -> None:
    connect(ev)
    ev.bind_ipi(DOMU, 0)
    assert ev.reset(DOMU, OTHER).value == err(XenErrno.EPERM)
    assert ev.reset(DOMU, DOMID.SELF).value == 0
    assert ev.table(DOMU) == ()
    assert ev.table(DOM0)[0].state == EVTCHNSTAT.unbound


# --- delivery -----------------------------------------------------------------------------


def test_vector_mode_reaches_only_the_bound_vcpu(ev: EventChannels) -> None:
    fport, bport = connect(ev)
    assert ev.bind_vcpu(DOMU, fport, 1).value == 0
    effects = ev.send(DOM0, bport).effects
    assert effects == (Upcall(DOMU, 1, (fport,), 0xF3, False),)
    buf, off0 = ev.vcpu_info(DOMU, 0)
    assert not si.upcall_pending(buf, off0)
    assert si.upcall_pending(*ev.vcpu_info(DOMU, 1))
    assert si.pending_sel(*ev.vcpu_info(DOMU, 1)) == 1


def test_gsi_mode_signals_only_vcpu0(ev: EventChannels) -> None:
    ev.set_callback(DOMU, GSI)
    fport, bport = connect(ev)
    (up,) = ev.send(DOM0, bport).effects
    assert (up.vcpu, up.eoi, up.vector) == (0, True, 0x25)
    clear_upcall(ev, DOMU, 0)
    ev.ack_upcall(DOMU, 0)
    ev.bind_vcpu(DOMU, fport, 1)
    si.evtchn_clear_pending(shared(ev, DOMU), fport)
    # Bound to vCPU1: its selector and upcall_pending are set, but no interrupt.
    assert ev.send(DOM0, bport).effects == ()
    assert si.upcall_pending(*ev.vcpu_info(DOMU, 1))


def test_two_sends_before_delivery_give_one_upcall(ev: EventChannels) -> None:
    _, bport = connect(ev)
    assert len(ev.send(DOM0, bport).effects) == 1
    assert ev.send(DOM0, bport).effects == ()


def test_a_new_port_on_a_vcpu_with_an_undelivered_upcall_merges(ev: EventChannels) -> None:
    _, b1 = connect(ev)
    _, b2 = connect(ev)
    assert len(ev.send(DOM0, b1).effects) == 1
    assert ev.send(DOM0, b2).effects == ()  # upcall_pending still 1
    clear_upcall(ev, DOMU, 0)  # the guest took the upcall: acknowledged
    si.evtchn_clear_pending(shared(ev, DOMU), 1)
    assert len(ev.send(DOM0, b1).effects) == 1


def test_masked_port_delivers_on_unmask(ev: EventChannels) -> None:
    fport, bport = connect(ev)
    si.evtchn_set_mask(shared(ev, DOMU), fport)  # the guest masks in shared memory
    assert ev.send(DOM0, bport).effects == ()
    assert si.evtchn_is_pending(shared(ev, DOMU), fport)
    assert ev.unmask(DOMU, fport).effects == (Upcall(DOMU, 0, (fport,), 0xF3, False),)
    assert not si.evtchn_is_masked(shared(ev, DOMU), fport)


def test_percpu_vector_needs_eoi_and_latches_meanwhile(ev: EventChannels) -> None:
    ev.set_upcall_vector(DOMU, 0, 0xF3)
    fport, bport = connect(ev)
    assert ev.send(DOM0, bport).effects == (Upcall(DOMU, 0, (fport,), 0xF3, True),)
    clear_upcall(ev, DOMU, 0)
    si.evtchn_clear_pending(shared(ev, DOMU), fport)
    assert ev.send(DOM0, bport).effects == ()  # still in service: latched in IRR
    (again,) = ev.ack_upcall(DOMU, 0)
    assert again.eoi and again.vcpu == 0
    assert ev.ack_upcall(DOMU, 0) == ()
    assert ev.ack_upcall(DOMU, 0) == ()  # nothing in service: EOI is harmless


def test_gsi_is_level_triggered_on_vcpu0_pending(ev: EventChannels) -> None:
    ev.set_callback(DOMU, GSI)
    _, bport = connect(ev)
    assert len(ev.send(DOM0, bport).effects) == 1
    # The guest EOIs without clearing upcall_pending: the line is still high.
    assert len(ev.ack_upcall(DOMU, 0)) == 1
    clear_upcall(ev, DOMU, 0)
    assert ev.ack_upcall(DOMU, 0) == ()


def test_no_callback_means_no_upcalls_until_one_is_set(ev: EventChannels) -> None:
    ev.set_callback(DOMU, Callback())
    fport, bport = connect(ev)
    assert ev.send(DOM0, bport).effects == ()
    assert ev.set_callback(DOMU, VECTOR) == (Upcall(DOMU, 0, (fport,), 0xF3, False),)


def test_vcpu_info_move_keeps_state_and_forces_a_rescan(ev: EventChannels) -> None:
    page = bytearray(4096)
    effects = ev.move_vcpu_info(DOMU, 1, page, 128)
    assert effects == (Upcall(DOMU, 1, (), 0xF3, False),)
    assert si.pending_sel(page, 128) == 2**64 - 1
    assert ev.vcpu_info(DOMU, 1) == (page, 128)


def test_shared_info_move_carries_pending_bits(ev: EventChannels) -> None:
    fport, bport = connect(ev)
    ev.send(DOM0, bport)
    ram = bytearray(3 * 4096)
    ev.move_shared_info(DOMU, memoryview(ram)[4096:8192])
    assert si.evtchn_is_pending(memoryview(ram)[4096:8192], fport)
    assert si.upcall_pending(memoryview(ram)[4096:8192], 0)


def test_poll_wakes_on_a_masked_port(ev: EventChannels) -> None:
    fport, bport = connect(ev)
    si.evtchn_set_mask(shared(ev, DOMU), fport)
    assert ev.poll(DOMU, 1, (fport,)).value == 1
    assert ev.send(DOM0, bport).effects == (Wake(DOMU, 1),)
    assert ev.poll(DOMU, 1, (fport,)).value == 0  # already pending: no wait
    assert ev.poll(DOMU, 1, tuple(range(129))).value == err(XenErrno.EINVAL)


def test_send_virq_raises_the_bound_port_on_its_vcpu(ev: EventChannels) -> None:
    port = ev.bind_virq(DOMU, VIRQ.TIMER, 1).value
    assert ev.send_virq(DOMU, 1, VIRQ.TIMER) == (Upcall(DOMU, 1, (port,), 0xF3, False),)
    assert ev.send_virq(DOMU, 0, VIRQ.TIMER) == ()  # not bound on vCPU0


# --- permissions, destroy, migration ----------------------------------------------------


def test_a_guest_cannot_touch_another_domains_port(ev: EventChannels) -> None:
    ofront, _ = connect(ev, front=OTHER)
    # Port numbers name the caller's own table: DOMU has no such port.
    assert ev.send(DOMU, ofront).value == err(XenErrno.EINVAL)
    assert ev.close(DOMU, ofront).value == err(XenErrno.EINVAL)
    assert ev.bind_vcpu(DOMU, ofront, 1).value == err(XenErrno.EINVAL)
    # A port expecting dom0 cannot be bound by a third domain.
    assert ev.bind_interdomain(DOMU, OTHER, ofront).value == err(XenErrno.EINVAL)
    assert ev.table(OTHER)[0].state == EVTCHNSTAT.interdomain


def test_remove_domain_leaves_no_port_and_unbinds_peers(ev: EventChannels) -> None:
    connect(ev)
    ev.bind_ipi(DOMU, 1)
    before = ev.statistics().ports_in_use
    ev.remove_domain(DOMU)
    assert not ev.has_domain(DOMU)
    assert ev.statistics().ports_in_use == before - 2
    assert ev.table(DOM0)[0].state == EVTCHNSTAT.unbound


def test_state_round_trips_through_the_codec(ev: EventChannels) -> None:
    ev.set_upcall_vector(DOMU, 1, 0xF3)
    fport, bport = connect(ev)
    ev.bind_virq(DOMU, VIRQ.TIMER, 1)
    ev.bind_ipi(DOMU, 1)
    si.evtchn_set_mask(shared(ev, DOMU), 3)
    ev.send(DOM0, bport)
    state = ev.export_state(DOMU)
    again = from_wire(to_wire(state))
    assert again == state and isinstance(again, EvtchnState)
    other = EventChannels()
    other.add_domain(DOM0, 1, bytearray(4096), privileged=True)
    other.add_domain(DOMU, 2, bytearray(4096))
    other.import_state(again)
    # The peer is gone on the destination: the interdomain port is unbound there.
    assert [r.state for r in other.table(DOMU)] == [
        EVTCHNSTAT.unbound,
        EVTCHNSTAT.virq,
        EVTCHNSTAT.ipi,
    ]
    assert [(r.pending, r.masked) for r in other.table(DOMU)] == [
        (True, False),
        (False, False),
        (False, True),
    ]
    assert other.export_state(DOMU).upcall_vectors == {1: 0xF3}


def test_statistics_count_ops_and_errors(ev: EventChannels) -> None:
    ev.bind_ipi(DOMU, 0)
    ev.bind_ipi(DOMU, 9)
    stats = ev.statistics()
    assert stats.ops["bind_ipi"] == 2 and stats.errors["bind_ipi"] == 1
