"""Domain table and host: life cycle, vCPUs, HVM params, personalities, destroy."""

from __future__ import annotations

import pytest

from services.hypervisor.callback import Via
from services.hypervisor.domain import (
    FEATURES_XEN,
    FEATURES_XEN_LEGACY,
    DomainTable,
    Personality,
)
from services.hypervisor.domain_state import DomainState
from services.hypervisor.effects import DomainShutdown, Upcall
from services.hypervisor.host import Host
from shared.abi import sharedinfo as si
from shared.abi.constants import (
    DOMID,
    HVM_PARAM,
    SHUTDOWN,
    VIRQ,
    XENFEAT,
    XENMAPSPACE,
    XENVER,
    XenErrno,
)
from shared.abi.grant import GNTMAP, GnttabMapGrantRef, write_grant
from shared.codec import from_wire, to_wire


def err(e: XenErrno) -> int:
    return -int(e)


@pytest.fixture
def table() -> DomainTable:
    t = DomainTable()
    t.create(1, 16, 2, Personality.xen)
    t.create(2, 16, 2, Personality.xen_legacy)
    t.create(3, 16, 1, Personality.bare)
    return t


def test_dom0_exists_and_is_privileged(table: DomainTable) -> None:
    info = table.info(0)
    assert info.privileged and info.features >> XENFEAT.dom0 & 1
    assert [i.domid for i in table.domains()] == [0, 1, 2, 3]
    assert table.create(None, 1, 1).domid == 4  # lowest free id


@pytest.mark.parametrize("domid", [1, DOMID.SELF, 0x7FFF])
def test_create_refuses_taken_or_reserved_ids(table: DomainTable, domid: int) -> None:
    with pytest.raises(ValueError):
        table.create(domid, 1, 1)


def test_pause_unpause_shutdown_info(table: DomainTable) -> None:
    table.pause(1)
    assert table.info(1).paused
    table.unpause(1)
    table.shutdown(1, SHUTDOWN.crash)
    info = table.info(1)
    assert (info.paused, info.shutdown_reason, info.online_vcpus) == (False, SHUTDOWN.crash, 1)
    assert from_wire(to_wire(info)) == info


# --- vCPUs ----------------------------------------------------------------------------------


def test_vcpu_up_down_is_up(table: DomainTable) -> None:
    assert table.vcpu_is_up(1, 1) == 0
    assert table.vcpu_up(1, 1, True) == 0
    assert table.vcpu_is_up(1, 1) == 1
    assert table.vcpu_up(1, 1, False) == 0
    assert table.vcpu_up(1, 2, True) == err(XenErrno.ENOENT)


@pytest.mark.parametrize(
    "caller_vcpu, vcpu, gfn, offset, expected",
    [
        (0, 0, 3, 0, 0),  # itself
        (0, 1, 3, 64, 0),  # for an offline vCPU
        (0, 0, 3, 4096 - 63, err(XenErrno.ENXIO)),  # 64 bytes must fit in the page
        (0, 0, 3, 4, err(XenErrno.ENXIO)),  # misaligned
        (0, 0, 16, 0, err(XenErrno.EINVAL)),  # not a RAM frame
        (0, 5, 3, 0, err(XenErrno.ENOENT)),
    ],
)
def test_register_vcpu_info_rules(
    table: DomainTable, caller_vcpu: int, vcpu: int, gfn: int, offset: int, expected: int
) -> None:
    assert table.register_vcpu_info(1, caller_vcpu, vcpu, gfn, offset) == expected


def test_register_vcpu_info_for_another_online_vcpu_or_twice_is_einval(table: DomainTable) -> None:
    table.vcpu_up(1, 1, True)
    assert table.register_vcpu_info(1, 0, 1, 3, 0) == err(XenErrno.EINVAL)
    assert table.register_vcpu_info(1, 1, 1, 3, 0) == 0
    assert table.register_vcpu_info(1, 1, 1, 3, 64) == err(XenErrno.EINVAL)  # once only


# --- HVM params -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "caller, dom, index, expected",
    [
        (1, DOMID.SELF, HVM_PARAM.CALLBACK_IRQ, 0),
        (1, DOMID.SELF, HVM_PARAM.STORE_PFN, err(XenErrno.EPERM)),  # toolstack-only
        (1, 2, HVM_PARAM.CALLBACK_IRQ, err(XenErrno.EPERM)),  # another domain
        (1, 9, HVM_PARAM.CALLBACK_IRQ, err(XenErrno.ESRCH)),
        (1, DOMID.SELF, 39, err(XenErrno.EINVAL)),
        (0, 1, HVM_PARAM.STORE_PFN, 0),  # the toolstack (dom0) sets it
    ],
)
def test_set_param_permissions(
    table: DomainTable, caller: int, dom: int, index: int, expected: int
) -> None:
    assert table.set_param(caller, dom, index, 5)[1] == expected


def test_get_param_reads_what_the_toolstack_set(table: DomainTable) -> None:
    table.set_param(0, 1, HVM_PARAM.STORE_PFN, 0xFEFFF)
    assert table.get_param(1, DOMID.SELF, HVM_PARAM.STORE_PFN) == (0, 0xFEFFF)
    assert table.get_param(1, DOMID.SELF, HVM_PARAM.IOREQ_PFN) == (err(XenErrno.EPERM), 0)
    assert table.get_param(1, DOMID.SELF, 1000)[0] == err(XenErrno.EINVAL)


@pytest.mark.parametrize(
    "domid, vcpu, vector, expected",
    [
        (1, 1, 0xF3, 0),
        (1, 1, 0x0F, err(XenErrno.EINVAL)),
        (1, 2, 0xF3, err(XenErrno.ENOENT)),
        (2, 0, 0xF3, err(XenErrno.ENOSYS)),  # xen-legacy predates HVMOP 23
    ],
)
def test_upcall_vector_checks(
    table: DomainTable, domid: int, vcpu: int, vector: int, expected: int
) -> None:
    assert table.check_upcall_vector(domid, vcpu, vector) == expected


# --- personalities --------------------------------------------------------------------------


def test_xen_cpuid_leaves(table: DomainTable) -> None:
    eax, ebx, ecx, edx = table.cpuid(1, 1, 0x40000000, 0)
    sig = b"".join(r.to_bytes(4, "little") for r in (ebx, ecx, edx))
    assert (sig, eax) == (b"XenVMMXenVMM", 0x40000005)
    assert table.cpuid(1, 1, 0x40000001, 0)[0] == 0x00040011
    assert table.cpuid(1, 1, 0x40000002, 0)[:2] == (1, 0x40000000)
    assert table.cpuid(1, 1, 0x40000004, 0) == (0b1011100, 1, 1, 0)  # bits 2,3,4,6; vcpu; domid
    assert table.cpuid(1, 0, 0x40000100, 0) == (0, 0, 0, 0)


def test_bare_has_no_xen_leaf_and_legacy_no_upcall_vector_bit(table: DomainTable) -> None:
    assert table.cpuid(3, 0, 0x40000000, 0) == (0, 0, 0, 0)
    assert table.cpuid(3, 0, 1, 0)[2] >> 31 == 0
    assert table.cpuid(2, 0, 1, 0)[2] >> 31 == 1
    assert table.cpuid(2, 0, 0x40000000, 0)[0] == 0x40000002
    assert table.cpuid(2, 0, 0x40000004, 0) == (0, 0, 0, 0)


def test_xen_version_and_features_per_personality(table: DomainTable) -> None:
    assert table.xen_version(1, XENVER.version) == (0x40011, b"")
    assert table.xen_version(1, XENVER.get_features) == (0, (0x00012305).to_bytes(4, "little"))
    assert FEATURES_XEN_LEGACY == 0x00012205
    assert table.xen_version(2, XENVER.get_features)[1] == FEATURES_XEN_LEGACY.to_bytes(4, "little")
    assert table.xen_version(1, XENVER.get_features, 1)[0] == err(XenErrno.EINVAL)
    assert table.xen_version(3, XENVER.version)[0] == err(XenErrno.ENOSYS)
    assert table.xen_version(1, 99)[0] == err(XenErrno.ENOSYS)


def test_feature_mask_hides_bits(table: DomainTable) -> None:
    d = table.create(None, 1, 1, Personality.xen, feature_mask=~(1 << XENFEAT.hvm_safe_pvclock))
    assert d.features == FEATURES_XEN & ~(1 << 9)


def test_domain_state_round_trip(table: DomainTable) -> None:
    table.register_vcpu_info(1, 0, 0, 3, 64)
    table.set_param(0, 1, HVM_PARAM.STORE_EVTCHN, 4)
    state = table.export_state(1)
    assert from_wire(to_wire(state)) == state and isinstance(state, DomainState)
    other = DomainTable()
    d = other.import_state(state)
    assert (d.vcpus[0].vcpu_info, d.hvm_params, d.incarnation) == ((3, 64), {2: 4}, 1)


# --- the host: cores wired together --------------------------------------------------------


@pytest.fixture
def host() -> Host:
    return Host(lambda: 1_000_000)


def test_legacy_personality_has_no_vector_callback(host: Host) -> None:
    d = host.create_domain(16, 1, Personality.xen_legacy)
    assert host.set_param(d.domid, DOMID.SELF, HVM_PARAM.CALLBACK_IRQ, 2 << 56 | 0xF3).ok
    assert host.evtchn.callback(d.domid).via is Via.none
    host.set_param(d.domid, DOMID.SELF, HVM_PARAM.CALLBACK_IRQ, 5)
    assert host.evtchn.callback(d.domid).via is Via.gsi


def test_shared_info_lands_in_guest_ram(host: Host) -> None:
    d = host.create_domain(16, 2)
    assert host.add_to_physmap(d.domid, XENMAPSPACE.shared_info, 0, 7) == 0
    assert host.add_to_physmap(d.domid, XENMAPSPACE.shared_info, 1, 7) == err(XenErrno.EINVAL)
    assert host.add_to_physmap(d.domid, XENMAPSPACE.shared_info, 0, 16) == err(XenErrno.EINVAL)
    port = host.evtchn.bind_ipi(d.domid, 1).value
    host.evtchn.send(d.domid, port)
    ram = memoryview(d.memory)[7 * 4096 : 8 * 4096]
    assert si.evtchn_is_pending(ram, port)
    host.publish_time(d.domid)
    assert si.read_time_info(ram, si.vcpu_info_offset(1)).system_time == 1_000_000


def test_upcall_vector_eoi_goes_through_the_lapic(host: Host) -> None:
    d = host.create_domain(16, 2)
    host.set_upcall_vector(d.domid, 1, 0xF3)
    port = host.evtchn.bind_ipi(d.domid, 1).value
    (up,) = host.route(host.evtchn.send(d.domid, port).effects)
    assert up == Upcall(d.domid, 1, (port,), 0xF3, True)
    buf, off = host.evtchn.vcpu_info(d.domid, 1)
    si.set_upcall_pending(buf, off, False)  # the guest's handler runs ...
    si.take_pending_sel(buf, off)
    si.evtchn_clear_pending(buf, port)
    assert host.evtchn.send(d.domid, port).effects == ()  # ... still in service: latched
    (again,) = host.apic_write(d.domid, 1, 0x0B0, 0)
    assert again.vcpu == 1 and again.eoi
    assert host.accounting.vcpu(d.domid, 1).upcalls == 2


def test_shutdown_notifies_the_toolstack_and_dom0(host: Host) -> None:
    d = host.create_domain(16, 1)
    port = host.evtchn.bind_virq(0, VIRQ.DOM_EXC, 0).value
    host.set_param(0, DOMID.SELF, HVM_PARAM.CALLBACK_IRQ, 2 << 56 | 0xF3)
    effects = host.shutdown_domain(d.domid, SHUTDOWN.poweroff)
    assert effects == (DomainShutdown(d.domid, 0), Upcall(0, 0, (port,), 0xF3, False))


def test_destroy_leaves_nothing_behind(host: Host) -> None:
    d = host.create_domain(16, 2)
    dom = d.domid
    host.add_to_physmap(dom, XENMAPSPACE.grant_table, 0, 9)
    write_grant(memoryview(d.memory)[9 * 4096 :], 8, 0, 3)
    assert host.gnttab.map_grant_ref(0, GnttabMapGrantRef(0, GNTMAP.HOST_MAP, 8, dom))[1]
    fport = host.evtchn.alloc_unbound(dom, DOMID.SELF, 0).value
    host.evtchn.bind_interdomain(0, dom, fport)
    host.timers.set_singleshot(dom, 1, 1, host.clock.now(dom) + 10**6)
    host.lapics.write(dom, 0, 0x380, 1000)
    host.destroy_domain(dom)
    assert host.leftovers(dom) == dict.fromkeys(
        ("domain", "ports", "mappings", "timers", "lapic"), 0
    )
    assert host.next_deadline() is None
    assert host.gnttab.statistics().mappings == 0
    assert host.evtchn.table(0)[0].state == 1  # dom0's end reverted to unbound
    with pytest.raises(ValueError):
        host.destroy_domain(0)
