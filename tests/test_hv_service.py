"""The hypervisor as a process, with scripted vCPU processes (puppets): events,
timers, grants and permissions across real process boundaries."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.hypervisor import control as ctl
from services.hypervisor.lapic import APIC
from services.hypervisor.messages import (
    ApicAccess,
    EventChannelOp,
    GrantTableOp,
    HvmOp,
    HypercallResult,
    MemoryOp,
    SchedOp,
    VcpuOp,
    XenVersion,
)
from services.hypervisor.testbed import (
    SHARED_INFO_GFN,
    Guest,
    alive,
    dom0_evtchn,
    evtchn,
    hypervisor_host,
)
from shared.abi import grant as gt
from shared.abi import hypercall as hc
from shared.abi import sharedinfo as si
from shared.abi.constants import (
    DOMID,
    EVTCHNOP,
    HVM_PARAM,
    HVMOP,
    VCPUOP,
    VIRQ,
    XENMAPSPACE,
    XENMEM,
    VCPU_SSHOTTMR_future,
    XenErrno,
    xen_error,
)
from shared.transport import RemoteError

EINVAL = xen_error(XenErrno.EINVAL)
EPERM = xen_error(XenErrno.EPERM)
ETIME = xen_error(XenErrno.ETIME)
LIMIT = 60


async def _pair(hv, a: Guest, b: Guest) -> tuple[int, int]:
    """An interdomain channel: b's unbound port, a's port bound to it."""
    rc, unbound = await b.vcpus[0].evtchn(
        EVTCHNOP.alloc_unbound, hc.EvtchnAllocUnbound(DOMID.SELF, a.domid)
    )
    assert rc == 0
    rc, bound = await a.vcpus[0].evtchn(
        EVTCHNOP.bind_interdomain, hc.EvtchnBindInterdomain(b.domid, unbound.port)
    )
    assert rc == 0
    await a.vcpus[0].wait_upcalls(1)  # bind_interdomain sets the local port pending
    await a.vcpus[0].upcalls()
    return unbound.port, bound.local_port


async def test_interdomain_event_reaches_only_the_bound_vcpu_in_vector_mode() -> None:
    with trio.fail_after(LIMIT):
        async with hypervisor_host() as hv:
            a, b = await hv.create(vcpus=3), await hv.create(vcpus=1)
            for g in (a, b):
                await g.pv_setup("vector")
            await a.bring_up()
            b_port, a_port = await _pair(hv, a, b)
            for target in (1, 2, 0):
                rc, _ = await a.vcpus[0].evtchn(
                    EVTCHNOP.bind_vcpu, hc.EvtchnBindVcpu(a_port, target)
                )
                assert rc == 0
                assert (await b.vcpus[0].evtchn(EVTCHNOP.send, hc.EvtchnSend(b_port)))[0] == 0
                seen = await a.vcpus[target].wait_upcalls(1)
                assert [u.ports for u in seen] == [(a_port,)]
                await trio.sleep(0.05)
                for other in a.vcpus:
                    got = await other.upcalls()
                    assert (len(got) == 1) == (other.vcpu == target), (target, other.vcpu, got)


async def test_legacy_gsi_mode_signals_only_vcpu0() -> None:
    with trio.fail_after(LIMIT):
        async with hypervisor_host() as hv:
            a = await hv.create(vcpus=2, personality="xen-legacy")
            b = await hv.create(vcpus=1)
            await a.pv_setup("gsi")
            await b.pv_setup("vector")
            await a.bring_up()
            b_port, a_port = await _pair(hv, a, b)
            await b.vcpus[0].evtchn(EVTCHNOP.send, hc.EvtchnSend(b_port))
            seen = await a.vcpus[0].wait_upcalls(1)
            assert seen[0].ports == (a_port,) and seen[0].eoi  # a level interrupt: EOI
            await a.vcpus[0].upcalls()
            # moved to vCPU1, the port is never signalled: GSI follows vCPU0 only
            await a.vcpus[0].evtchn(EVTCHNOP.bind_vcpu, hc.EvtchnBindVcpu(a_port, 1))
            await b.vcpus[0].evtchn(EVTCHNOP.send, hc.EvtchnSend(b_port))
            await trio.sleep(0.3)
            assert await a.vcpus[0].upcalls() == ()
            assert await a.vcpus[1].upcalls() == ()


async def test_ipi_and_timer_ports_cannot_move() -> None:
    with trio.fail_after(LIMIT):
        async with hypervisor_host() as hv:
            a = await hv.create(vcpus=2)
            await a.pv_setup()
            await a.bring_up()
            v1 = a.vcpus[1]
            rc, ipi = await v1.evtchn(EVTCHNOP.bind_ipi, hc.EvtchnBindIpi(1))
            assert rc == 0
            rc, timer = await v1.evtchn(EVTCHNOP.bind_virq, hc.EvtchnBindVirq(VIRQ.TIMER, 1))
            assert rc == 0
            for port in (ipi.port, timer.port):
                rc, _ = await v1.evtchn(EVTCHNOP.bind_vcpu, hc.EvtchnBindVcpu(port, 0))
                assert rc == EINVAL


async def test_two_sends_before_delivery_give_one_upcall_and_mask_defers() -> None:
    with trio.fail_after(LIMIT):
        async with hypervisor_host() as hv:
            a = await hv.create(vcpus=2)
            await a.pv_setup()
            await a.bring_up()
            v0, v1 = a.vcpus
            rc, ipi = await v1.evtchn(EVTCHNOP.bind_ipi, hc.EvtchnBindIpi(1))
            await v1.hold(True)  # vCPU1 has interrupts off
            for _ in range(2):
                assert (await v0.evtchn(EVTCHNOP.send, hc.EvtchnSend(ipi.port)))[0] == 0
            await trio.sleep(0.1)
            await v1.hold(False)
            await v1.wait_upcalls(1)
            await trio.sleep(0.1)
            seen = await v1.upcalls()  # everything taken since the hold, and forget it
            assert [u.ports for u in seen] == [(ipi.port,)]
            # masked in shared_info: a send delivers nothing until EVTCHNOP_unmask
            word, bit = si.port_word_bit(ipi.port)
            mask_off = si.SHARED_INFO.offsets["evtchn_mask"] + word * 8 + bit // 8
            byte = (await v1.peek(SHARED_INFO_GFN, mask_off, 1))[0]
            await v1.poke(SHARED_INFO_GFN, mask_off, bytes([byte | 1 << (bit % 8)]))
            await v0.evtchn(EVTCHNOP.send, hc.EvtchnSend(ipi.port))
            await trio.sleep(0.2)
            assert await v1.upcalls() == ()
            assert (await v1.evtchn(EVTCHNOP.unmask, hc.EvtchnUnmask(ipi.port)))[0] == 0
            seen = await v1.wait_upcalls(1)
            assert seen[0].ports == (ipi.port,)


def _guest_now() -> int:
    return time.monotonic_ns()  # guests here run with time offset 0


async def _arm(v, delta_ns: int, flags: int = 0) -> tuple[int, int]:
    deadline = _guest_now() + delta_ns
    arg = hc.VcpuSetSingleshotTimer(deadline, flags).pack()
    res = await v.call(VcpuOp(VCPUOP.set_singleshot_timer, v.vcpu, arg))
    return res.value, deadline


async def test_singleshot_timer_fires_once_on_its_own_vcpu() -> None:
    with trio.fail_after(LIMIT):
        async with hypervisor_host(sshot_past="etime") as hv:
            a = await hv.create(vcpus=3)
            await a.pv_setup()
            await a.bring_up()
            ports = {}
            for v in a.vcpus:
                rc, b = await v.evtchn(EVTCHNOP.bind_virq, hc.EvtchnBindVirq(VIRQ.TIMER, v.vcpu))
                assert rc == 0
                ports[v.vcpu] = b.port
            v2 = a.vcpus[2]
            # fires once, at or after its deadline, only on vCPU2
            rc, deadline = await _arm(v2, 30_000_000)
            assert rc == 0
            seen = await v2.wait_upcalls(1)
            assert seen[0].ports == (ports[2],) and seen[0].at_ns >= deadline
            await trio.sleep(0.1)
            assert len(await v2.upcalls()) == 1
            assert await a.vcpus[0].upcalls() == () and await a.vcpus[1].upcalls() == ()
            # a re-arm replaces: one upcall, after the second deadline
            await _arm(v2, 40_000_000)
            rc, second = await _arm(v2, 80_000_000)
            seen = await v2.wait_upcalls(1)
            assert len(seen) == 1 and seen[0].at_ns >= second
            await trio.sleep(0.1)
            assert len(await v2.upcalls()) == 1
            # a stop cancels
            await _arm(v2, 50_000_000)
            stop = await v2.call(VcpuOp(VCPUOP.stop_singleshot_timer, 2, b""))
            assert stop.value == 0
            await trio.sleep(0.15)
            assert await v2.upcalls() == ()
            # 4.17 as released: a past deadline with VCPU_SSHOTTMR_future is -ETIME
            rc, _ = await _arm(v2, -1_000_000, VCPU_SSHOTTMR_future)
            assert rc == ETIME
            await trio.sleep(0.1)
            assert await v2.upcalls() == ()
            # only the calling vCPU's own timer
            res = await a.vcpus[0].call(
                VcpuOp(VCPUOP.set_singleshot_timer, 2, hc.VcpuSetSingleshotTimer(1, 0).pack())
            )
            assert res.value == EINVAL


async def test_past_deadline_fires_at_once_with_the_newer_setting() -> None:
    with trio.fail_after(LIMIT):
        async with hypervisor_host(sshot_past="fire") as hv:
            a = await hv.create(vcpus=1)
            await a.pv_setup()
            v0 = a.vcpus[0]
            rc, b = await v0.evtchn(EVTCHNOP.bind_virq, hc.EvtchnBindVirq(VIRQ.TIMER, 0))
            rc, _ = await _arm(v0, -1_000_000, VCPU_SSHOTTMR_future)
            assert rc == 0
            seen = await v0.wait_upcalls(1)
            assert seen[0].ports == (b.port,)


async def _grant_table(v) -> int:
    """Put grant frame 0 at gfn 3 of the guest; return that gfn."""
    arg = hc.XenAddToPhysmap(DOMID.SELF, XENMAPSPACE.grant_table, 0, 3).pack()
    assert (await v.call(MemoryOp(XENMEM.add_to_physmap, arg))).value == 0
    return 3


async def _grant(v, gfn: int, ref: int, domid: int, frame: int, flags: int) -> None:
    entry = gt.GrantEntry(flags, domid, frame).encode()
    await v.poke(gfn, gt.grant_entry_offset(ref), entry)


async def _map(hv, domid: int, ref: int, flags: int) -> int:
    op = gt.GnttabMapGrantRef(0, flags, ref, domid)
    res = await hv.dom0.call(GrantTableOp(gt.GNTTABOP.MAP_GRANT_REF, 1, op.encode(), b""))
    assert res.value == 0
    return gt.GnttabMapGrantRef.decode(res.data).status


async def test_grant_map_checks() -> None:
    with trio.fail_after(LIMIT):
        async with hypervisor_host() as hv:
            a = await hv.create(vcpus=1)
            other = await hv.create(vcpus=1, puppets=False)
            await a.pv_setup()
            v = a.vcpus[0]
            table = await _grant_table(v)
            host_map = gt.GNTMAP.HOST_MAP
            await _grant(v, table, 10, 0, 20, gt.GTF.PERMIT_ACCESS)
            await _grant(v, table, 11, other.domid, 21, gt.GTF.PERMIT_ACCESS)
            await _grant(v, table, 12, 0, 22, gt.GTF.PERMIT_ACCESS | gt.GTF.READONLY)
            assert await _map(hv, a.domid, 10, host_map) == gt.GNTST.OKAY
            flags = gt.GrantEntry.decode(await v.peek(table, gt.grant_entry_offset(10), 8)).flags
            assert flags & gt.GTF.READING and flags & gt.GTF.WRITING
            assert await _map(hv, a.domid, 11, host_map) == gt.GNTST.GENERAL_ERROR  # not for us
            assert await _map(hv, a.domid, 12, host_map) == gt.GNTST.GENERAL_ERROR  # ro for write
            assert await _map(hv, a.domid, 12, host_map | gt.GNTMAP.READONLY) == gt.GNTST.OKAY
            await v.poke(table, gt.grant_entry_offset(13), bytes(8))  # freed entry
            assert await _map(hv, a.domid, 13, host_map) == gt.GNTST.GENERAL_ERROR
            assert await _map(hv, a.domid, 1 << 20, host_map) == gt.GNTST.BAD_GNTREF
            assert await _map(hv, 999, 10, host_map) == gt.GNTST.BAD_DOMAIN


async def test_a_guest_acts_only_as_itself() -> None:
    with trio.fail_after(LIMIT):
        async with hypervisor_host() as hv:
            a = await hv.create(vcpus=1)
            b = await hv.create(vcpus=1)
            for g in (a, b):
                await g.pv_setup()
            va = a.vcpus[0]
            # b's port 1 exists; a naming "port 1" names its own (missing) port 1
            rc, bp = await b.vcpus[0].evtchn(EVTCHNOP.bind_ipi, hc.EvtchnBindIpi(0))
            assert rc == 0
            assert (await va.evtchn(EVTCHNOP.close, hc.EvtchnClose(bp.port)))[0] == EINVAL
            assert (await va.evtchn(EVTCHNOP.send, hc.EvtchnSend(bp.port)))[0] == EINVAL
            # no port in another domain, no status of another domain's port
            rc, _ = await va.evtchn(EVTCHNOP.alloc_unbound, hc.EvtchnAllocUnbound(b.domid, 0))
            assert rc == EPERM
            rc, _ = await va.evtchn(EVTCHNOP.status, hc.EvtchnStatus(b.domid, bp.port))
            assert rc == EPERM
            # no HVM param of another domain
            param = hc.XenHvmParam(b.domid, HVM_PARAM.CALLBACK_IRQ, 0).pack()
            assert (await va.call(HvmOp(HVMOP.set_param, param))).value < 0
            # a vCPU that is not ours: the id names our own (missing) vCPU
            res = await va.call(VcpuOp(VCPUOP.up, 5, b""))
            assert res.value < 0
            # b's port is untouched by all this
            assert (await b.vcpus[0].evtchn(EVTCHNOP.send, hc.EvtchnSend(bp.port)))[0] == 0
            # a connection cannot claim b's vCPU without its token, nor dom0's rights
            chan = await hv.bind_as_vcpu(a, 0)
            with pytest.raises(RemoteError) as err:
                await chan.call(ctl.VcpuHello(b.domid, 0, "not-the-token"))
            assert err.value.code == "refused"
            with pytest.raises(RemoteError) as err:
                await chan.call(ctl.CreateDomain("x", 64, 1))
            assert err.value.code == "refused"
            assert (await hv.status()).stats["hypervisor"]["refused_bindings"] >= 1


hypercall_classes = [EventChannelOp, VcpuOp, HvmOp, MemoryOp, GrantTableOp, XenVersion, SchedOp]


@st.composite
def malformed(draw):
    cls = draw(st.sampled_from(hypercall_classes))
    big = st.integers(-(2**63), 2**64 - 1)
    arg = draw(st.binary(max_size=80))
    if cls is VcpuOp:
        return VcpuOp(draw(big), draw(big), arg)
    if cls is GrantTableOp:
        return GrantTableOp(
            draw(big), draw(st.integers(-5, 2**32)), arg, draw(st.binary(max_size=8))
        )
    if cls is SchedOp:
        # block/poll would legitimately wait; everything else must answer
        return SchedOp(draw(big.filter(lambda c: c not in (1, 3))), arg)
    return cls(draw(big), arg)


async def test_malformed_hypercalls_get_error_results_and_others_are_served() -> None:
    with trio.fail_after(120):
        async with hypervisor_host() as hv:
            victim = await hv.create(vcpus=1, puppets=False)
            bystander = await hv.create(vcpus=1)
            chan = await hv.bind_as_vcpu(victim, 0)
            calls: list = []

            @settings(
                max_examples=150,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            @given(malformed())
            def collect(msg) -> None:
                calls.append(msg)

            collect()
            for i, msg in enumerate(calls):
                try:
                    res = await chan.call(msg, timeout=5)
                except RemoteError as err:  # the codec refused a value out of range
                    assert err.code == "codec", err
                    continue
                assert isinstance(res, HypercallResult)
                if i % 10 == 0:  # the others are still served
                    ok = await bystander.vcpus[0].call(XenVersion(0, b""))
                    assert ok.value == (4 << 16) | 17
            stats = (await hv.status()).stats["hypervisor"]
            assert stats["internal_errors"] == 0
            # a message the hypervisor does not serve is refused, not fatal
            with pytest.raises(RemoteError) as err:
                await chan.call(ctl.Done(), timeout=5)
            assert err.value.code == "unknown-message"
            assert (await bystander.vcpus[0].call(XenVersion(0, b""))).value > 0


async def test_destroy_leaves_nothing_behind() -> None:
    with trio.fail_after(LIMIT):
        async with hypervisor_host() as hv:
            a = await hv.create(vcpus=2)
            b = await hv.create(vcpus=1)
            for g in (a, b):
                await g.pv_setup()
            await a.bring_up()
            await _pair(hv, a, b)
            await a.vcpus[1].evtchn(EVTCHNOP.bind_ipi, hc.EvtchnBindIpi(1))
            await _arm(a.vcpus[0], 10_000_000_000)
            table = await _grant_table(a.vcpus[0])
            await _grant(a.vcpus[0], table, 10, 0, 20, gt.GTF.PERMIT_ACCESS)
            assert await _map(hv, a.domid, 10, gt.GNTMAP.HOST_MAP) == gt.GNTST.OKAY
            pids = a.created.vcpu_pids
            memory = Path(a.created.memory_path)
            assert memory.exists() and all(alive(p) for p in pids)
            gone = await hv.dom0.call(ctl.DestroyDomain(a.domid), timeout=20)
            hv.guests.remove(a)
            assert set(gone.leftovers.values()) == {0}, gone.leftovers
            assert not memory.exists()
            assert not any(alive(p) for p in pids)
            listed = (await hv.dom0.call(ctl.ListDomains())).domains
            assert a.domid not in [d.domid for d in listed]
            # b's end of the channel went back to unbound, b still works
            rc, status = await b.vcpus[0].evtchn(EVTCHNOP.status, hc.EvtchnStatus(DOMID.SELF, 1))
            assert rc == 0


async def test_dom0_gets_notified_for_its_own_ports() -> None:
    with trio.fail_after(LIMIT):
        async with hypervisor_host() as hv:
            a = await hv.create(vcpus=1)
            await a.pv_setup()
            rc, unbound = await a.vcpus[0].evtchn(
                EVTCHNOP.alloc_unbound, hc.EvtchnAllocUnbound(DOMID.SELF, 0)
            )
            rc, bound = await dom0_evtchn(
                hv, EVTCHNOP.bind_interdomain, hc.EvtchnBindInterdomain(a.domid, unbound.port)
            )
            assert rc == 0
            first = await hv.dom0.receive()  # the bind sets our end pending
            assert isinstance(first, ctl.EvtchnNotify) and first.ports == (bound.local_port,)
            await a.vcpus[0].evtchn(EVTCHNOP.send, hc.EvtchnSend(unbound.port))
            with trio.fail_after(5):
                note = await hv.dom0.receive()
            assert note.ports == (bound.local_port,)


async def test_trace_records_every_exit_in_order() -> None:
    with trio.fail_after(LIMIT):
        async with hypervisor_host() as hv:
            a = await hv.create(vcpus=2)
            await a.pv_setup()
            await a.bring_up()
            await a.vcpus[1].evtchn(EVTCHNOP.bind_virq, hc.EvtchnBindVirq(VIRQ.TIMER, 1))
            await a.vcpus[1].call(VcpuOp(VCPUOP.stop_periodic_timer, 1, b""))
            trace = (await hv.dom0.call(ctl.TraceRequest(a.domid, clear=True))).entries
            names = [(e.vcpu, e.name) for e in trace]
            assert names == [
                (0, "hypercall:memory_op.add_to_physmap"),
                (0, "hypercall:hvm_op.set_param"),
                (0, "hypercall:vcpu_op.up"),
                (1, "hypercall:event_channel_op.bind_virq"),
                (1, "hypercall:vcpu_op.stop_periodic_timer"),
            ]
            assert [e.seq for e in trace] == sorted(e.seq for e in trace)
            assert trace[2].target == 1 and trace[3].arg[:4] == bytes(4)  # VIRQ_TIMER = 0
            assert (await hv.dom0.call(ctl.TraceRequest(a.domid))).entries == ()


async def test_sipi_starts_an_ap_on_bare_metal() -> None:
    with trio.fail_after(LIMIT):
        async with hypervisor_host() as hv:
            a = await hv.create(vcpus=2, personality="bare")
            v0 = a.vcpus[0]
            assert (await v0.call(XenVersion(0, b""))).value == xen_error(XenErrno.ENOSYS)
            info = (await hv.dom0.call(ctl.DomainDetailRequest(a.domid))).info
            assert info.online_vcpus == 1
            await v0.call(ApicAccess(APIC.ICR2, True, 1 << 24))
            await v0.call(ApicAccess(APIC.ICR, True, 5 << 8))  # INIT
            await v0.call(ApicAccess(APIC.ICR, True, 6 << 8 | 0x10))  # SIPI
            info = (await hv.dom0.call(ctl.DomainDetailRequest(a.domid))).info
            assert info.online_vcpus == 2
            exits = (await hv.dom0.call(ctl.DomainDetailRequest(a.domid))).vcpus[0].exits
            assert exits.get("icr_write", 0) == 3  # ICR2 + INIT + SIPI: each an exit


async def test_a_doorbell_must_be_the_guests_own_fifo() -> None:
    with trio.fail_after(LIMIT):
        async with hypervisor_host() as hv:
            a = await hv.create(vcpus=1, puppets=False)
            chan = await hv.bind_as_vcpu(a, 0)
            for path in (
                "/etc/passwd",
                a.created.memory_path,
                a.created.memory_path + "-vcpu0.bell",
            ):
                with pytest.raises(RemoteError) as err:  # not next to its RAM, or no FIFO
                    await chan.call(ctl.VcpuDoorbell(path))
                assert err.value.code == "refused"
            with pytest.raises(RemoteError):
                await hv.dom0.call(ctl.VcpuDoorbell("/tmp/x"))


async def test_scenario_knobs_of_the_host() -> None:
    with trio.fail_after(LIMIT):
        async with hypervisor_host(
            callback_vector="fail", sshot_etime_first="2", periodic_default_hz="100"
        ) as hv:
            a = await hv.create(vcpus=1)
            v = a.vcpus[0]
            arg = hc.XenAddToPhysmap(DOMID.SELF, XENMAPSPACE.shared_info, 0, SHARED_INFO_GFN)
            await v.call(MemoryOp(XENMEM.add_to_physmap, arg.pack()))
            vector = hc.XenHvmParam(DOMID.SELF, HVM_PARAM.CALLBACK_IRQ, 2 << 56 | 0xF3)
            assert (await v.call(HvmOp(HVMOP.set_param, vector.pack()))).value == EINVAL
            gsi = hc.XenHvmParam(DOMID.SELF, HVM_PARAM.CALLBACK_IRQ, 28)
            assert (await v.call(HvmOp(HVMOP.set_param, gsi.pack()))).value == 0
            rc, timer = await v.evtchn(EVTCHNOP.bind_virq, hc.EvtchnBindVirq(VIRQ.TIMER, 0))
            seen = await v.wait_upcalls(3, timeout=2)  # the default periodic timer ticks
            assert len(seen) >= 3 and all(u.ports == (timer.port,) for u in seen)
            assert (await v.call(VcpuOp(VCPUOP.stop_periodic_timer, 0, b""))).value == 0
            await trio.sleep(0.05)
            await v.upcalls()
            await trio.sleep(0.1)
            assert await v.upcalls() == ()
            results = [(await _arm(v, 10_000_000))[0] for _ in range(3)]
            assert results == [ETIME, ETIME, 0]


async def test_a_dead_backends_grant_mappings_are_released() -> None:
    from shared.hostsecret import host_secret
    from shared.transport import open_channel

    with trio.fail_after(LIMIT):
        async with hypervisor_host() as hv:
            a = await hv.create(vcpus=1)
            await a.pv_setup()
            v = a.vcpus[0]
            table = await _grant_table(v)
            await _grant(v, table, 10, 0, 20, gt.GTF.PERMIT_ACCESS)
            async with open_channel(hv.endpoint) as backend:
                await backend.call(ctl.Dom0Hello(host_secret(hv.rundir)))
                op = gt.GnttabMapGrantRef(0, gt.GNTMAP.HOST_MAP, 10, a.domid)
                res = await backend.call(
                    GrantTableOp(gt.GNTTABOP.MAP_GRANT_REF, 1, op.encode(), b"")
                )
                assert gt.GnttabMapGrantRef.decode(res.data).status == gt.GNTST.OKAY
                entry = gt.GrantEntry.decode(await v.peek(table, gt.grant_entry_offset(10), 8))
                assert entry.flags & gt.GTF.READING
            # the backend process is gone (its connection closed): so is its mapping
            for _ in range(100):
                entry = gt.GrantEntry.decode(await v.peek(table, gt.grant_entry_offset(10), 8))
                if not entry.flags & (gt.GTF.READING | gt.GTF.WRITING):
                    break
                await trio.sleep(0.02)
            assert not entry.flags & (gt.GTF.READING | gt.GTF.WRITING)
            stats = (await hv.status()).stats["hypervisor"]
            assert stats["released_mappings"] == 1 and stats["gnttab"]["mappings"] == 0


async def test_a_vcpus_posted_sends_go_through_its_fifo_in_order() -> None:
    from shared.doorbell import DoorbellReader, bell_path, sends_path
    from shared.evtchn_dev import SendFifo

    with trio.fail_after(LIMIT):
        async with hypervisor_host() as hv:
            a = await hv.create(vcpus=1, puppets=False)
            chan = await hv.bind_as_vcpu(a, 0)
            bell = DoorbellReader(bell_path(a.created.memory_path, 0))
            fifo = SendFifo(sends_path(a.created.memory_path, 0))
            try:
                for bad in ("/tmp/x", a.created.memory_path, str(bell.path)):
                    with pytest.raises(RemoteError) as err:  # elsewhere, or not a FIFO
                        await chan.call(ctl.VcpuDoorbell(str(bell.path), bad))
                    assert err.value.code == "refused"
                await chan.call(ctl.VcpuDoorbell(str(bell.path), str(fifo.path)))
                res = await chan.call(evtchn(EVTCHNOP.bind_ipi, hc.EvtchnBindIpi(0)))
                port = hc.EvtchnBindIpi.unpack(res.data).port
                await hv.dom0.call(ctl.TraceRequest(a.domid, clear=True))
                assert fifo.send(port) and fifo.send(port) and fifo.send(9999)
                # a hypercall made after the sends is carried out after them
                await chan.call(evtchn(EVTCHNOP.close, hc.EvtchnClose(port)))
                trace = (await hv.dom0.call(ctl.TraceRequest(a.domid, clear=True))).entries
                assert [(e.name, e.rc) for e in trace] == [
                    ("hypercall:event_channel_op.send", 0),
                    ("hypercall:event_channel_op.send", 0),
                    ("hypercall:event_channel_op.send", EINVAL),  # no such port: refused
                    ("hypercall:event_channel_op.close", 0),
                ]
                # ... even when both are waiting as the hypervisor wakes (its
                # tasks run in no fixed order): the hypercall takes the FIFO first
                for _ in range(4):
                    hv.proc.send_signal(signal.SIGSTOP)
                    try:
                        assert fifo.send(9998)
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(chan.call, XenVersion(0, b""))
                            await trio.sleep(0.05)
                            hv.proc.send_signal(signal.SIGCONT)
                    finally:
                        hv.proc.send_signal(signal.SIGCONT)
                    trace = (await hv.dom0.call(ctl.TraceRequest(a.domid, clear=True))).entries
                    assert [e.name for e in trace] == [
                        "hypercall:event_channel_op.send",
                        "hypercall:xen_version",
                    ]
                counters = (await hv.status()).stats["hypervisor"]["evtchn_devices"]
                assert (counters["vcpu_fifos"], counters["sends"]) == (1, 7)
                assert counters["refused_sends"] == 5
            finally:
                fifo.close()
                bell.close()


def test_a_hypercall_first_carries_out_the_sends_its_caller_posted(tmp_path: Path) -> None:
    from services.hypervisor.dom0_device import DeviceCounters
    from services.hypervisor.service import HypervisorService
    from shared.evtchn_dev import PortReader, SendFifo

    fifo = SendFifo(tmp_path / "v.send")
    reader = PortReader(fifo.path)
    svc = HypervisorService.__new__(HypervisorService)  # the adapter's rule alone
    svc.send_fifos, svc.device_counters = {"vcpu": reader}, DeviceCounters()
    seen: list[object] = []
    svc._hypercall = lambda peer, msg: seen.append((peer, msg)) or HypercallResult(0, b"")  # type: ignore[method-assign]
    try:
        assert fifo.send(5) and fifo.send(6)
        later = XenVersion(0, b"")
        svc.hypercall("vcpu", later)
        svc.hypercall("other", later)  # another caller's hypercall takes nothing
        sends = [EventChannelOp(EVTCHNOP.send, hc.EvtchnSend(p).pack()) for p in (5, 6)]
        assert seen == [("vcpu", sends[0]), ("vcpu", sends[1]), ("vcpu", later), ("other", later)]
        assert svc.device_counters.sends == 2
    finally:
        reader.close()
        fifo.close()
