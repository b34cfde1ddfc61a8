"""The sans-IO hypercall dispatcher: a message from a vCPU in, a result out.

``Dispatcher.dispatch(caller_domid, caller_vcpu, msg)`` decodes the C argument
struct carried by the message, calls the cores as that vCPU's domain and
answers ``(HypercallResult, effects)``. Malformed input never raises: a short
struct is ``-EFAULT`` (Xen's ``copy_from_guest`` failing), an unknown command
``-ENOSYS``, an out-of-range value the errno Xen gives. A ``bare`` domain gets
``-ENOSYS`` for every hypercall (CPUID and LAPIC accesses still work).

``SCHEDOP_block`` and ``SCHEDOP_poll`` do not block: when the vCPU must wait,
the effects hold a :class:`~services.hypervisor.effects.Block` and the adapter
keeps the reply (value 0) until an upcall, interrupt or ``Wake`` reaches that
vCPU. Every call is counted as an exit of the calling vCPU.
"""

from __future__ import annotations

import struct
from typing import Any

from services.hypervisor.effects import ApicInterrupt, Block, Effects, Outcome
from services.hypervisor.host import Host
from services.hypervisor.lapic import exit_reason
from services.hypervisor.messages import (
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
    EVTCHNOP,
    HVMOP,
    RUNSTATE,
    SCHEDOP,
    SHUTDOWN_MAX,
    VCPUOP,
    XENMEM,
    XenErrno,
    xen_error,
)

EFAULT, EINVAL, ENOENT, ENOSYS, EPERM, ESRCH = (
    xen_error(e)
    for e in (
        XenErrno.EFAULT,
        XenErrno.EINVAL,
        XenErrno.ENOENT,
        XenErrno.ENOSYS,
        XenErrno.EPERM,
        XenErrno.ESRCH,
    )
)
SCHED_POLL = struct.Struct("<QI4xQ")  # ports (guest pointer), nr_ports, timeout
RUNSTATE_INFO = struct.Struct("<i4xQ4Q")
HVM_GET_TIME = struct.Struct("<Q")
GNTTAB_SET_VERSION = struct.Struct("<I")
GNTTAB_GET_VERSION = struct.Struct("<H2xI")
GNTTAB_OPS: dict[int, tuple[int, str]] = {
    gt.GNTTABOP.MAP_GRANT_REF: (gt.MAP_GRANT_REF.size, "map_grant_ref"),
    gt.GNTTABOP.UNMAP_GRANT_REF: (gt.UNMAP_GRANT_REF.size, "unmap_grant_ref"),
    gt.GNTTABOP.SETUP_TABLE: (gt.SETUP_TABLE.size, "setup_table"),
    gt.GNTTABOP.COPY: (gt.COPY.size, "copy"),
    gt.GNTTABOP.QUERY_SIZE: (gt.QUERY_SIZE.size, "query_size"),
    gt.GNTTABOP.SET_VERSION: (GNTTAB_SET_VERSION.size, "set_version"),
    gt.GNTTABOP.GET_VERSION: (GNTTAB_GET_VERSION.size, "get_version"),
}


_EVTCHNOPS = frozenset(int(c) for c in EVTCHNOP)
EVTCHN_SEND = struct.Struct("<I")  # struct evtchn_send: the port


class _Fault(Exception):
    """A guest struct too short to read: ``-EFAULT``."""


def _arg(cls: Any, data: bytes) -> Any:
    if len(data) < cls.LAYOUT.size:
        raise _Fault
    return cls.unpack(data)


def _name(enum_cls: Any, cmd: int) -> str:
    try:
        return enum_cls(cmd).name.rstrip("_")
    except ValueError:
        return str(cmd)


class Dispatcher:
    """Maps hypercall messages onto the cores of a :class:`Host`."""

    def __init__(self, host: Host, strict: bool = False) -> None:
        self.host = host
        self.strict = strict  # tests: let a bug in a core raise instead of -EFAULT
        self.internal_errors = 0
        self._reasons: dict[tuple[object, ...], str] = {}

    def dispatch(self, caller: int, vcpu: int, msg: object) -> tuple[HypercallResult, Effects]:
        d = self.host.domains.get(caller)
        if d is None or not 0 <= vcpu < d.nr_vcpus:
            return HypercallResult(ESRCH, b""), ()
        self.host.accounting.record_exit(caller, vcpu, self.reason(msg))
        if not d.is_xen and not isinstance(msg, Cpuid | ApicAccess):
            return HypercallResult(ENOSYS, b""), ()
        handler = self._HANDLERS.get(type(msg))
        if handler is None:
            return HypercallResult(ENOSYS, b""), ()
        try:
            out = handler(self, caller, vcpu, msg)
        except _Fault:
            return HypercallResult(EFAULT, b""), ()
        except Exception:
            if self.strict:
                raise
            self.internal_errors += 1
            return HypercallResult(EFAULT, b""), ()
        data = out.data if isinstance(out.data, bytes) else b""
        return HypercallResult(out.value, data), out.effects

    def reason(self, msg: object) -> str:
        """The exit reason of ``msg`` (``hypercall:event_channel_op.send``...)."""
        if isinstance(msg, ApicAccess):  # named by register, not by a command
            key: tuple[object, ...] = (ApicAccess, msg.reg, msg.write)
        else:
            key = (type(msg), getattr(msg, "cmd", None))
        reason = self._reasons.get(key)
        if reason is None:  # built once per (message, command)
            reason = self._reasons[key] = self._reason(msg)
        return reason

    @staticmethod
    def _reason(msg: object) -> str:
        match msg:
            case Cpuid():
                return "cpuid"
            case ApicAccess(reg=reg, write=write):
                return exit_reason(reg, write)
            case EventChannelOp(cmd=cmd):
                return f"hypercall:event_channel_op.{_name(EVTCHNOP, cmd)}"
            case VcpuOp(cmd=cmd):
                return f"hypercall:vcpu_op.{_name(VCPUOP, cmd)}"
            case SchedOp(cmd=cmd):
                return f"hypercall:sched_op.{_name(SCHEDOP, cmd)}"
            case HvmOp(cmd=cmd):
                return f"hypercall:hvm_op.{_name(HVMOP, cmd)}"
            case GrantTableOp(cmd=cmd):
                return f"hypercall:grant_table_op.{_name(gt.GNTTABOP, cmd).lower()}"
            case MemoryOp(cmd=cmd):
                return f"hypercall:memory_op.{_name(XENMEM, cmd)}"
            case XenVersion():
                return "hypercall:xen_version"
            case SetTimerOp():
                return "hypercall:set_timer_op"
        return f"unknown:{type(msg).__name__}"

    # --- exits that are not hypercalls ---------------------------------------------------------

    def _cpuid(self, caller: int, vcpu: int, msg: Cpuid) -> Outcome:
        regs = self.host.domains.cpuid(caller, vcpu, msg.leaf, msg.subleaf)
        return Outcome(0, struct.pack("<4I", *(r & 0xFFFFFFFF for r in regs)))

    def _apic(self, caller: int, vcpu: int, msg: ApicAccess) -> Outcome:
        if msg.write:
            return Outcome(0, effects=self.host.apic_write(caller, vcpu, msg.reg, msg.value))
        return Outcome(self.host.lapics.read(caller, vcpu, msg.reg))

    # --- hypercalls ----------------------------------------------------------------------------

    def _xen_version(self, caller: int, vcpu: int, msg: XenVersion) -> Outcome:
        idx = _arg(hc.XenFeatureInfo, msg.arg).submap_idx if msg.cmd == 6 else 0
        rc, data = self.host.domains.xen_version(caller, msg.cmd, idx)
        if msg.cmd == 6 and rc == 0:
            data = hc.XenFeatureInfo(idx, int.from_bytes(data, "little")).pack()
        return Outcome(rc, data)

    def _set_timer_op(self, caller: int, vcpu: int, msg: SetTimerOp) -> Outcome:
        if not 0 <= msg.timeout_abs_ns < 2**64:
            return Outcome(EINVAL)
        rc, fired = self.host.timers.set_timer_op(caller, vcpu, msg.timeout_abs_ns)
        return Outcome(rc, effects=self.host.fire(fired))

    def _event_channel_op(self, caller: int, vcpu: int, msg: EventChannelOp) -> Outcome:
        ev, cmd = self.host.evtchn, msg.cmd
        if cmd == EVTCHNOP.send:  # the hot one: every notification of every device
            if len(msg.arg) < EVTCHN_SEND.size:
                raise _Fault
            out = ev.send(caller, EVTCHN_SEND.unpack_from(msg.arg)[0])
            return Outcome(out.value, effects=self.host.route(out.effects))
        if cmd in (EVTCHNOP.init_control, EVTCHNOP.expand_array, EVTCHNOP.set_priority):
            return Outcome(ENOSYS)  # FIFO ABI: Linux falls back to 2-level on this
        if cmd == EVTCHNOP.bind_pirq:
            return Outcome(EINVAL)  # no PIRQs on this platform (nr_pirqs = 0)
        if cmd == EVTCHNOP.reset:
            if len(msg.arg) < 2:
                raise _Fault
            return ev.reset(caller, int.from_bytes(msg.arg[:2], "little"))
        cls = hc.EVTCHNOP_ARGS.get(cmd) if cmd in _EVTCHNOPS else None
        if cls is None:
            return Outcome(ENOSYS)
        a = _arg(cls, msg.arg)
        match cmd:
            case EVTCHNOP.alloc_unbound:
                out = ev.alloc_unbound(caller, a.dom, a.remote_dom)
                return self._port(out, lambda p: hc.EvtchnAllocUnbound(a.dom, a.remote_dom, p))
            case EVTCHNOP.bind_interdomain:
                out = ev.bind_interdomain(caller, a.remote_dom, a.remote_port)
                pack = lambda p: hc.EvtchnBindInterdomain(a.remote_dom, a.remote_port, p)  # noqa: E731
                return self._port(out, pack)
            case EVTCHNOP.bind_virq:
                out = ev.bind_virq(caller, a.virq, a.vcpu)
                return self._port(out, lambda p: hc.EvtchnBindVirq(a.virq, a.vcpu, p))
            case EVTCHNOP.bind_ipi:
                return self._port(
                    ev.bind_ipi(caller, a.vcpu), lambda p: hc.EvtchnBindIpi(a.vcpu, p)
                )
            case EVTCHNOP.close:
                return ev.close(caller, a.port)
            case EVTCHNOP.send:
                out = ev.send(caller, a.port)
                return Outcome(out.value, effects=self.host.route(out.effects))
            case EVTCHNOP.status:
                out = ev.status(caller, a.dom, a.port)
                return Outcome(out.value, out.data.pack() if out.ok else b"")
            case EVTCHNOP.bind_vcpu:
                return ev.bind_vcpu(caller, a.port, a.vcpu)
            case EVTCHNOP.unmask:
                out = ev.unmask(caller, a.port)
                return Outcome(out.value, effects=self.host.route(out.effects))
        return Outcome(ENOSYS)

    def _port(self, out: Outcome, record: Any) -> Outcome:
        """A bind/alloc answer: RAX 0 and the port in the OUT struct."""
        if not out.ok:
            return out
        return Outcome(0, record(out.value).pack(), self.host.route(out.effects))

    def _vcpu_op(self, caller: int, vcpu: int, msg: VcpuOp) -> Outcome:
        d = self.host.domains.get(caller)
        target, cmd = msg.vcpuid, msg.cmd
        if d is None or not 0 <= target < d.nr_vcpus:
            return Outcome(ENOENT)
        timers = self.host.timers
        match cmd:
            case VCPUOP.up | VCPUOP.down:
                return Outcome(self.host.domains.vcpu_up(caller, target, cmd == VCPUOP.up))
            case VCPUOP.is_up:
                return Outcome(self.host.domains.vcpu_is_up(caller, target))
            case VCPUOP.get_runstate_info:
                state = RUNSTATE.running if d.vcpus[target].online else RUNSTATE.offline
                return Outcome(0, RUNSTATE_INFO.pack(state, 0, 0, 0, 0, 0))
            case VCPUOP.set_periodic_timer:
                period = _arg(hc.VcpuSetPeriodicTimer, msg.arg).period_ns
                return Outcome(timers.set_periodic(caller, target, period))
            case VCPUOP.stop_periodic_timer:
                return Outcome(timers.stop_periodic(caller, target))
            case VCPUOP.set_singleshot_timer:
                a = _arg(hc.VcpuSetSingleshotTimer, msg.arg)
                rc, fired = timers.set_singleshot(caller, vcpu, target, a.timeout_abs_ns, a.flags)
                return Outcome(rc, effects=self.host.fire(fired))
            case VCPUOP.stop_singleshot_timer:
                return Outcome(timers.stop_singleshot(caller, vcpu, target))
            case VCPUOP.register_vcpu_info:
                a = _arg(hc.VcpuRegisterVcpuInfo, msg.arg)
                return self.host.register_vcpu_info(caller, vcpu, target, a.mfn, a.offset)
            case VCPUOP.send_nmi:
                return Outcome(0, effects=(ApicInterrupt(caller, target, 2, nmi=True),))
        return Outcome(ENOSYS)  # initialise, runstate/time areas, physid: not modelled

    def _sched_op(self, caller: int, vcpu: int, msg: SchedOp) -> Outcome:
        host = self.host
        match msg.cmd:
            case SCHEDOP.yield_:
                return Outcome(0)
            case SCHEDOP.block:
                if host.evtchn.events_pending(caller, vcpu):
                    return Outcome(0)
                return Outcome(0, effects=(Block(caller, vcpu),))
            case SCHEDOP.shutdown:
                reason = _arg(hc.SchedShutdown, msg.arg).reason
                if reason > SHUTDOWN_MAX:
                    return Outcome(EINVAL)
                return Outcome(0, effects=host.shutdown_domain(caller, reason))
            case SCHEDOP.poll:
                return self._poll(caller, vcpu, msg.arg)
            case SCHEDOP.remote_shutdown:
                a = _arg(hc.SchedRemoteShutdown, msg.arg)
                if a.domain_id not in host.domains or a.domain_id == 0:
                    return Outcome(ESRCH)
                if not host.domains.get(caller).privileged:  # type: ignore[union-attr]
                    return Outcome(EPERM)
                if a.reason > SHUTDOWN_MAX:
                    return Outcome(EINVAL)
                return Outcome(0, effects=host.shutdown_domain(a.domain_id, a.reason))
            case SCHEDOP.shutdown_code:
                _arg(hc.SchedShutdown, msg.arg)
                return Outcome(0)
            case SCHEDOP.pin_override:
                return Outcome(EPERM)  # hardware domain only
        return Outcome(ENOSYS)

    def _poll(self, caller: int, vcpu: int, arg: bytes) -> Outcome:
        if len(arg) < SCHED_POLL.size:
            raise _Fault
        _, nr_ports, timeout = SCHED_POLL.unpack_from(arg)
        if len(arg) < SCHED_POLL.size + 4 * min(nr_ports, 129):
            raise _Fault
        ports = struct.unpack_from(f"<{min(nr_ports, 129)}I", arg, SCHED_POLL.size)
        out = self.host.evtchn.poll(caller, vcpu, ports)
        if out.value == 1:
            return Outcome(0, effects=(Block(caller, vcpu, ports, timeout),))
        return out

    def _hvm_op(self, caller: int, vcpu: int, msg: HvmOp) -> Outcome:
        match msg.cmd:
            case HVMOP.set_param:
                a = _arg(hc.XenHvmParam, msg.arg)
                return self.host.set_param(caller, a.domid, a.index, a.value)
            case HVMOP.get_param:
                a = _arg(hc.XenHvmParam, msg.arg)
                rc, value = self.host.domains.get_param(caller, a.domid, a.index)
                return Outcome(
                    rc, hc.XenHvmParam(a.domid, a.index, value).pack() if rc == 0 else b""
                )
            case HVMOP.set_evtchn_upcall_vector:
                a = _arg(hc.XenHvmEvtchnUpcallVector, msg.arg)
                return self.host.set_upcall_vector(caller, a.vcpu, a.vector)
            case HVMOP.get_time:
                return Outcome(0, HVM_GET_TIME.pack(self.host.clock.now(caller)))
        return Outcome(ENOSYS)

    def _memory_op(self, caller: int, vcpu: int, msg: MemoryOp) -> Outcome:
        domains = self.host.domains
        match msg.cmd:
            case XENMEM.add_to_physmap:
                a = _arg(hc.XenAddToPhysmap, msg.arg)
                target, rc = domains.resolve(caller, a.domid)
                if target is None:
                    return Outcome(rc)
                return Outcome(self.host.add_to_physmap(target.domid, a.space, a.idx, a.gpfn))
            case XENMEM.current_reservation | XENMEM.maximum_reservation:
                if len(msg.arg) < 2:
                    raise _Fault
                target, rc = domains.resolve(caller, int.from_bytes(msg.arg[:2], "little"))
                return Outcome(rc if target is None else target.nr_pages)
            case XENMEM.maximum_gpfn:
                d = domains.get(caller)
                return Outcome(max(0, d.nr_pages - 1))  # type: ignore[union-attr]
        return Outcome(ENOSYS)

    def _grant_table_op(self, caller: int, vcpu: int, msg: GrantTableOp) -> Outcome:
        if msg.count < 0 or msg.count >= 2**31:
            return Outcome(EINVAL)
        spec = GNTTAB_OPS.get(msg.cmd)
        if spec is None:
            return Outcome(ENOSYS)
        size, _ = spec
        if len(msg.args) < size * msg.count:
            raise _Fault
        ops = [msg.args[i * size : (i + 1) * size] for i in range(msg.count)]
        g, out, extra = self.host.gnttab, bytearray(), bytearray()
        payload = memoryview(msg.payload)
        for raw in ops:
            match msg.cmd:
                case gt.GNTTABOP.MAP_GRANT_REF:
                    res, m = g.map_grant_ref(caller, gt.GnttabMapGrantRef.decode(raw))
                    out += (res if m is None else _with_bus_addr(res, m.gfn)).encode()
                case gt.GNTTABOP.UNMAP_GRANT_REF:
                    out += g.unmap_grant_ref(caller, gt.GnttabUnmapGrantRef.decode(raw)).encode()
                case gt.GNTTABOP.SETUP_TABLE:
                    res, frames = g.setup_table(caller, gt.GnttabSetupTable.decode(raw))
                    out += res.encode()
                    extra += struct.pack(f"<{len(frames)}Q", *frames)
                case gt.GNTTABOP.QUERY_SIZE:
                    out += g.query_size(caller, gt.GnttabQuerySize.decode(raw)).encode()
                case gt.GNTTABOP.COPY:
                    res, move = g.copy(caller, gt.GnttabCopy.decode(raw))
                    out += res.encode()
                    if move is not None:
                        external_src = self.host.domains.get(move.src_dom).memory is None  # type: ignore[union-attr]
                        chunk = bytes(payload[: move.len]) if external_src else b""
                        payload = payload[move.len :] if external_src else payload
                        extra += g.perform(move, chunk)
                case gt.GNTTABOP.SET_VERSION:
                    version = GNTTAB_SET_VERSION.unpack(raw)[0]
                    if version != 1:
                        return Outcome(ENOSYS if version == 2 else EINVAL)
                    out += raw
                case gt.GNTTABOP.GET_VERSION:
                    dom = GNTTAB_GET_VERSION.unpack(raw)[0]
                    target, rc = self.host.domains.resolve(caller, dom)
                    if target is None:
                        return Outcome(rc)
                    out += GNTTAB_GET_VERSION.pack(dom, 1)
        return Outcome(0, bytes(out + extra))

    _HANDLERS: dict[type, Any] = {
        Cpuid: _cpuid,
        ApicAccess: _apic,
        XenVersion: _xen_version,
        SetTimerOp: _set_timer_op,
        EventChannelOp: _event_channel_op,
        VcpuOp: _vcpu_op,
        SchedOp: _sched_op,
        HvmOp: _hvm_op,
        MemoryOp: _memory_op,
        GrantTableOp: _grant_table_op,
    }


def _with_bus_addr(res: gt.GnttabMapGrantRef, gfn: int) -> gt.GnttabMapGrantRef:
    """The mapper learns which frame of the granter's memory file to map from
    ``dev_bus_addr`` (that frame's address), as a device would."""
    return gt.GnttabMapGrantRef(
        res.host_addr, res.flags, res.ref, res.dom, res.status, res.handle, gfn << 12
    )
