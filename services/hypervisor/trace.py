"""The hypervisor's exit trace: every exit of a guest's vCPUs, in order, with
its argument bytes and result, for tests that check a guest against what the
hypervisor saw (guest-behaviour E's "trace"). A mixin of the service."""

from __future__ import annotations

import collections
import struct
from typing import Any

import attrs

from services.hypervisor import control as ctl
from services.hypervisor.messages import ApicAccess, Cpuid, VcpuOp
from shared.transport import Peer, ServiceError

_APIC_ARG = struct.Struct("<I?Q")  # reg, write, value
_CPUID_ARG = struct.Struct("<II")  # leaf, subleaf
TRACE_LENGTH = 100_000  # exits kept per domain (a ring: the oldest go first)


@attrs.define(eq=False)
class DomainTrace:
    """The hypervisor's call log of one domain (guest-behaviour E: "trace")."""

    entries: collections.deque[ctl.TraceEntry] = attrs.Factory(
        lambda: collections.deque(maxlen=TRACE_LENGTH)
    )
    seq: int = 0
    dropped: int = 0


class TraceLog:
    """Trace handlers; ``self`` is the hypervisor service."""

    traces: dict[int, DomainTrace]
    dispatcher: Any

    def _trace(self, domid: int, vcpu: int, msg: Any, rc: int) -> None:
        trace = self.traces.get(domid)
        if trace is None:
            return  # dom0's own calls are not traced
        if len(trace.entries) == trace.entries.maxlen:
            trace.dropped += 1
        if isinstance(msg, ApicAccess):
            arg = _APIC_ARG.pack(msg.reg, msg.write, msg.value & 0xFFFFFFFFFFFFFFFF)
        elif isinstance(msg, Cpuid):
            arg = _CPUID_ARG.pack(msg.leaf & 0xFFFFFFFF, msg.subleaf & 0xFFFFFFFF)
        else:
            arg = getattr(msg, "arg", None) or getattr(msg, "args", b"")
        target = msg.vcpuid if isinstance(msg, VcpuOp) else vcpu
        trace.seq += 1
        trace.entries.append(
            ctl.TraceEntry(trace.seq, vcpu, self.dispatcher.reason(msg), target, arg, rc)
        )

    def trace(self, peer: Peer, msg: ctl.TraceRequest) -> ctl.Trace:
        self._dom0(peer)
        trace = self.traces.get(msg.domid)
        if trace is None:
            raise ServiceError("no-such-domain", f"no domain {msg.domid}")
        out = ctl.Trace(tuple(trace.entries), trace.dropped)
        if msg.clear:
            trace.entries.clear()
            trace.dropped = 0
        return out
