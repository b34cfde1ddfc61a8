"""The hypercall dispatcher: real argument structs in, Xen's answers out, never
an exception; permissions as the calling domain; the acceptance points end to end
at core level."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.hypervisor.domain import Personality
from services.hypervisor.effects import Block, Upcall, Wake
from services.hypervisor.host import Host
from services.hypervisor.hypercalls import SCHED_POLL, Dispatcher
from services.hypervisor.messages import (
    HYPERCALL_MESSAGES,
    ApicAccess,
    Cpuid,
    EventChannelOp,
    GrantTableOp,
    HvmOp,
    HypercallResult,
    MemoryOp,
    SchedOp,
    SetTimerOp,
    VcpuOp,
    XenVersion,
)
from shared.abi import grant as gt
from shared.abi import hypercall as hc
from shared.abi.constants import (
    DOMID,
    EVTCHNOP,
    HVM_PARAM,
    HVMOP,
    SCHEDOP,
    SHUTDOWN,
    VCPUOP,
    VIRQ,
    XENMAPSPACE,
    XENMEM,
    XENVER,
    VCPU_SSHOTTMR_future,
    XenErrno,
)
from shared.codec import CodecError, decode, encode

VECTOR_CB = 2 << 56 | 0xF3
GSI_CB = 5


def err(e: XenErrno) -> int:
    return -int(e)


class Clock:
    now = 10**9

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def host(clock: Clock) -> Host:
    h = Host(clock)
    for _ in range(2):
        h.create_domain(64, 2, Personality.xen)
    h.create_domain(64, 1, Personality.bare)
    return h


@pytest.fixture
def hv(host: Host) -> Dispatcher:
    return Dispatcher(host, strict=True)


def call(hv: Dispatcher, dom: int, vcpu: int, msg: object) -> tuple[HypercallResult, tuple]:
    return hv.dispatch(dom, vcpu, msg)


def ev(hv: Dispatcher, dom: int, cmd: int, rec: object, vcpu: int = 0):
    return call(hv, dom, vcpu, EventChannelOp(cmd, rec.pack()))


def set_callback(hv: Dispatcher, dom: int, value: int) -> None:
    res, _ = call(hv, dom, 0, HvmOp(HVMOP.set_param, hc.XenHvmParam(DOMID.SELF, 0, value).pack()))
    assert res.value == 0


def interdomain(hv: Dispatcher, front: int = 1, back: int = 0) -> tuple[int, int]:
    res, _ = ev(hv, front, EVTCHNOP.alloc_unbound, hc.EvtchnAllocUnbound(DOMID.SELF, back))
    fport = hc.EvtchnAllocUnbound.unpack(res.data).port
    res, _ = ev(hv, back, EVTCHNOP.bind_interdomain, hc.EvtchnBindInterdomain(front, fport))
    return fport, hc.EvtchnBindInterdomain.unpack(res.data).local_port


# --- acceptance points ----------------------------------------------------------------------


def test_interdomain_event_reaches_only_the_bound_vcpu_in_vector_mode(hv: Dispatcher) -> None:
    set_callback(hv, 1, VECTOR_CB)
    fport, bport = interdomain(hv)
    assert ev(hv, 1, EVTCHNOP.bind_vcpu, hc.EvtchnBindVcpu(fport, 1))[0].value == 0
    res, effects = ev(hv, 0, EVTCHNOP.send, hc.EvtchnSend(bport))
    assert res.value == 0 and effects == (Upcall(1, 1, (fport,), 0xF3, False),)


def test_interdomain_event_reaches_only_vcpu0_in_legacy_mode(hv: Dispatcher) -> None:
    set_callback(hv, 1, GSI_CB)
    fport, bport = interdomain(hv)
    assert [e.vcpu for e in ev(hv, 0, EVTCHNOP.send, hc.EvtchnSend(bport))[1]] == [0]
    buf, off = hv.host.evtchn.vcpu_info(1, 0)
    buf[off] = 0  # the handler clears upcall_pending, then EOIs: the line drops
    assert call(hv, 1, 0, ApicAccess(0x0B0, True, 0))[1] == ()
    ev(hv, 1, EVTCHNOP.bind_vcpu, hc.EvtchnBindVcpu(fport, 1))  # Xen allows the move ...
    buf[2048:2560] = bytes(512)  # guest handled everything
    buf[off + 8 : off + 16] = bytes(8)
    assert ev(hv, 0, EVTCHNOP.send, hc.EvtchnSend(bport))[1] == ()  # ... but never signals


@pytest.mark.parametrize("kind", ["ipi", "virq_timer"])
def test_bind_vcpu_on_ipi_or_timer_port_is_einval(hv: Dispatcher, kind: str) -> None:
    rec = hc.EvtchnBindIpi(0) if kind == "ipi" else hc.EvtchnBindVirq(VIRQ.TIMER, 0)
    cmd = EVTCHNOP.bind_ipi if kind == "ipi" else EVTCHNOP.bind_virq
    port = type(rec).unpack(ev(hv, 1, cmd, rec)[0].data).port
    assert ev(hv, 1, EVTCHNOP.bind_vcpu, hc.EvtchnBindVcpu(port, 1))[0].value == err(
        XenErrno.EINVAL
    )


def test_two_sends_one_upcall_and_masked_delivers_on_unmask(hv: Dispatcher) -> None:
    set_callback(hv, 1, VECTOR_CB)
    port = hc.EvtchnBindIpi.unpack(ev(hv, 1, EVTCHNOP.bind_ipi, hc.EvtchnBindIpi(1))[0].data).port
    assert len(ev(hv, 1, EVTCHNOP.send, hc.EvtchnSend(port))[1]) == 1
    assert ev(hv, 1, EVTCHNOP.send, hc.EvtchnSend(port))[1] == ()
    shared = hv.host.shared_info(1)
    shared[:] = bytes(len(shared))  # the guest handled it and cleared every bit
    shared[2560 + port // 8] |= 1 << (port % 8)  # ... then masked the port
    assert ev(hv, 1, EVTCHNOP.send, hc.EvtchnSend(port))[1] == ()
    assert ev(hv, 1, EVTCHNOP.unmask, hc.EvtchnUnmask(port))[1] == (
        Upcall(1, 1, (port,), 0xF3, False),
    )


def test_singleshot_timer_end_to_end(hv: Dispatcher, clock: Clock) -> None:
    set_callback(hv, 1, VECTOR_CB)
    port = hc.EvtchnBindVirq.unpack(
        ev(hv, 1, EVTCHNOP.bind_virq, hc.EvtchnBindVirq(VIRQ.TIMER, 1), vcpu=1)[0].data
    ).port
    now = hv.host.clock.now(1)
    arm = VcpuOp(VCPUOP.set_singleshot_timer, 1, hc.VcpuSetSingleshotTimer(now + 5000).pack())
    assert call(hv, 1, 0, arm)[0].value == err(XenErrno.EINVAL)  # not the calling vCPU
    assert call(hv, 1, 1, arm)[0].value == 0
    assert hv.host.expire(clock.now + 4999) == ()
    assert hv.host.expire(clock.now + 5000) == (Upcall(1, 1, (port,), 0xF3, False),)
    past = VcpuOp(
        VCPUOP.set_singleshot_timer,
        1,
        hc.VcpuSetSingleshotTimer(now - 1, VCPU_SSHOTTMR_future).pack(),
    )
    hv.host.timers.sshot_past = "etime"
    assert call(hv, 1, 1, past)[0].value == err(XenErrno.ETIME)
    hv.host.timers.sshot_past = "fire"
    assert call(hv, 1, 1, past)[0].value == 0


def test_grant_map_failures_through_the_dispatcher(hv: Dispatcher) -> None:
    d1 = hv.host.domains.get(1)
    assert (
        call(
            hv,
            1,
            0,
            MemoryOp(
                XENMEM.add_to_physmap,
                hc.XenAddToPhysmap(DOMID.SELF, XENMAPSPACE.grant_table, 0, 40).pack(),
            ),
        )[0].value
        == 0
    )
    table = memoryview(d1.memory)[40 * 4096 :]
    gt.write_grant(table, 8, 2, 5)  # to domain 2, not dom0
    gt.write_grant(table, 9, 0, 5, readonly=True)
    gt.write_grant(table, 10, 0, 5)
    gt.end_grant(table, 10)  # freed

    def map_status(ref: int, flags: int = gt.GNTMAP.HOST_MAP) -> tuple[int, int]:
        op = gt.GnttabMapGrantRef(0, flags, ref, 1).encode()
        res, _ = call(hv, 0, 0, GrantTableOp(gt.GNTTABOP.MAP_GRANT_REF, 1, op, b""))
        out = gt.GnttabMapGrantRef.decode(res.data)
        return out.status, out.dev_bus_addr

    assert map_status(8)[0] == gt.GNTST.GENERAL_ERROR
    assert map_status(9)[0] == gt.GNTST.GENERAL_ERROR
    assert map_status(9, gt.GNTMAP.HOST_MAP | gt.GNTMAP.READONLY) == (gt.GNTST.OKAY, 5 << 12)
    assert map_status(10)[0] == gt.GNTST.GENERAL_ERROR


# --- the rest of the surface ---------------------------------------------------------------


def test_personality_answers(hv: Dispatcher) -> None:
    res, _ = call(hv, 1, 0, Cpuid(0x40000000, 0))
    assert res.data[4:16] == b"XenVMMXenVMM"
    assert call(hv, 3, 0, Cpuid(0x40000000, 0))[0].data == bytes(16)
    assert call(hv, 1, 0, XenVersion(XENVER.version, b""))[0].value == 0x40011
    res, _ = call(hv, 1, 0, XenVersion(XENVER.get_features, hc.XenFeatureInfo(0).pack()))
    assert hc.XenFeatureInfo.unpack(res.data).submap == 0x00012305
    for msg in (XenVersion(0, b""), EventChannelOp(EVTCHNOP.send, b"\0" * 4), SetTimerOp(0)):
        assert call(hv, 3, 0, msg)[0].value == err(XenErrno.ENOSYS)  # bare


@pytest.mark.parametrize(
    "cmd", [EVTCHNOP.init_control, EVTCHNOP.expand_array, EVTCHNOP.set_priority, 99]
)
def test_fifo_and_unknown_evtchn_ops_are_enosys(hv: Dispatcher, cmd: int) -> None:
    assert call(hv, 1, 0, EventChannelOp(cmd, bytes(24)))[0].value == err(XenErrno.ENOSYS)


def test_short_struct_is_efault(hv: Dispatcher) -> None:
    assert call(hv, 1, 0, EventChannelOp(EVTCHNOP.send, b"\1"))[0].value == err(XenErrno.EFAULT)
    assert call(hv, 1, 0, GrantTableOp(gt.GNTTABOP.COPY, 2, bytes(40), b""))[0].value == err(
        XenErrno.EFAULT
    )


def test_sched_ops(hv: Dispatcher) -> None:
    assert call(hv, 1, 0, SchedOp(SCHEDOP.yield_, b""))[0].value == 0
    assert call(hv, 1, 1, SchedOp(SCHEDOP.block, b""))[1] == (Block(1, 1),)
    port = hc.EvtchnBindIpi.unpack(ev(hv, 1, EVTCHNOP.bind_ipi, hc.EvtchnBindIpi(1))[0].data).port
    poll = SCHED_POLL.pack(0, 1, 0) + struct.pack("<I", port)
    assert call(hv, 1, 1, SchedOp(SCHEDOP.poll, poll))[1] == (Block(1, 1, (port,), 0),)
    assert ev(hv, 1, EVTCHNOP.send, hc.EvtchnSend(port))[1][0] == Wake(1, 1)
    remote = SchedOp(SCHEDOP.remote_shutdown, hc.SchedRemoteShutdown(2, SHUTDOWN.poweroff).pack())
    assert call(hv, 1, 0, remote)[0].value == err(XenErrno.EPERM)
    assert call(hv, 0, 0, remote)[1][0].domid == 2
    bad = SchedOp(SCHEDOP.shutdown, hc.SchedShutdown(9).pack())
    assert call(hv, 1, 0, bad)[0].value == err(XenErrno.EINVAL)
    assert call(hv, 1, 0, SchedOp(SCHEDOP.shutdown, hc.SchedShutdown(0).pack()))[1][0].reason == 0


def test_hvm_ops(hv: Dispatcher) -> None:
    up = HvmOp(HVMOP.set_evtchn_upcall_vector, hc.XenHvmEvtchnUpcallVector(1, 0xF3).pack())
    assert call(hv, 1, 1, up)[0].value == 0
    get = HvmOp(HVMOP.get_param, hc.XenHvmParam(DOMID.SELF, HVM_PARAM.STORE_EVTCHN).pack())
    assert call(hv, 1, 0, get)[0].value == 0
    other = HvmOp(HVMOP.set_param, hc.XenHvmParam(2, HVM_PARAM.CALLBACK_IRQ, 1).pack())
    assert call(hv, 1, 0, other)[0].value == err(XenErrno.EPERM)
    assert call(hv, 1, 0, HvmOp(77, b""))[0].value == err(XenErrno.ENOSYS)


def test_exits_are_counted_by_reason(hv: Dispatcher) -> None:
    call(hv, 1, 1, Cpuid(0, 0))
    call(hv, 1, 1, ApicAccess(0x380, True, 5))
    ev(hv, 1, EVTCHNOP.bind_ipi, hc.EvtchnBindIpi(1), vcpu=1)
    exits = hv.host.accounting.vcpu(1, 1).exits
    assert exits == {
        "cpuid": 1,
        "lapic_timer_write": 1,
        "hypercall:event_channel_op.bind_ipi": 1,
    }


# --- a guest acts only as itself ------------------------------------------------------------


def test_guest_cannot_name_another_domains_port_grant_or_vcpu(hv: Dispatcher) -> None:
    fport, _ = interdomain(hv, front=2)
    # Ports are looked up in the caller's table only.
    assert ev(hv, 1, EVTCHNOP.close, hc.EvtchnClose(fport))[0].value == err(XenErrno.EINVAL)
    assert ev(hv, 1, EVTCHNOP.status, hc.EvtchnStatus(2, fport))[0].value == err(XenErrno.EPERM)
    assert ev(hv, 1, EVTCHNOP.alloc_unbound, hc.EvtchnAllocUnbound(2, 1))[0].value == err(
        XenErrno.EPERM
    )
    assert ev(hv, 1, EVTCHNOP.reset, hc.EvtchnClose(2))[0].value == err(XenErrno.EPERM)
    # vCPU ids name the caller's vCPUs; domain 1 has two.
    assert call(hv, 1, 0, VcpuOp(VCPUOP.is_up, 2, b""))[0].value == err(XenErrno.ENOENT)
    # Grant ops on another domain's table are refused.
    q = gt.GnttabQuerySize(2).encode()
    res, _ = call(hv, 1, 0, GrantTableOp(gt.GNTTABOP.QUERY_SIZE, 1, q, b""))
    assert gt.GnttabQuerySize.decode(res.data).status == gt.GNTST.PERMISSION_DENIED
    physmap = hc.XenAddToPhysmap(2, XENMAPSPACE.shared_info, 0, 3).pack()
    assert call(hv, 1, 0, MemoryOp(XENMEM.add_to_physmap, physmap))[0].value == err(XenErrno.EPERM)
    assert hv.host.evtchn.table(2)[0].state == 2  # untouched


def test_unknown_caller_or_vcpu_is_esrch(hv: Dispatcher) -> None:
    assert call(hv, 9, 0, Cpuid(0, 0))[0].value == err(XenErrno.ESRCH)
    assert call(hv, 1, 2, Cpuid(0, 0))[0].value == err(XenErrno.ESRCH)


# --- hypothesis: malformed hypercalls ------------------------------------------------------

ints = st.one_of(
    st.integers(-(2**70), 2**70), st.integers(-5, 300), st.sampled_from([0, 1, 2**31, 2**32 - 1])
)
blobs = st.binary(max_size=80)
messages = st.one_of(
    st.builds(EventChannelOp, ints, blobs),
    st.builds(VcpuOp, ints, ints, blobs),
    st.builds(SchedOp, ints, blobs),
    st.builds(HvmOp, ints, blobs),
    st.builds(MemoryOp, ints, blobs),
    st.builds(XenVersion, ints, blobs),
    st.builds(GrantTableOp, ints, st.integers(-3, 4), blobs, blobs),
    st.builds(SetTimerOp, ints),
    st.builds(Cpuid, ints, ints),
    st.builds(ApicAccess, st.integers(0, 0x400), st.booleans(), ints),
)


@settings(max_examples=400, deadline=None)
@given(msg=messages, dom=st.sampled_from([0, 1, 2, 3]), vcpu=st.integers(0, 1))
def test_malformed_hypercalls_get_answers_never_exceptions(
    msg: object, dom: int, vcpu: int
) -> None:
    host = Host(Clock())
    for _ in range(2):
        host.create_domain(64, 2, Personality.xen)
    host.create_domain(64, 1, Personality.bare)
    hv = Dispatcher(host, strict=True)
    res, effects = hv.dispatch(dom, vcpu, msg)
    assert isinstance(res, HypercallResult) and isinstance(effects, tuple)
    # The host keeps serving others afterwards.
    assert hv.dispatch(1, 0, XenVersion(XENVER.version, b""))[0].value == 0x40011


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(st.integers(-(2**40), 2**40), st.binary(max_size=8), st.text(max_size=3)),
        max_size=5,
    ),
    st.sampled_from(HYPERCALL_MESSAGES),
)
def test_wrong_arity_or_types_are_codec_errors(fields: list, cls: type) -> None:
    import msgpack

    from shared.codec import tag_of

    data = msgpack.packb([tag_of(cls), *fields], use_bin_type=True)
    try:
        msg = decode(data)
    except CodecError:
        return
    assert type(msg) is cls and encode(msg) == data
