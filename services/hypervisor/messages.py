"""Hypercall messages a vCPU process sends, named and numbered as in Xen.

A hypercall message's tag is ``100 + __HYPERVISOR_<name>`` (``EventChannelOp``
is 132 because ``event_channel_op`` is hypercall 32). ``arg`` holds the real C
argument struct bytes the guest would pass by pointer (``struct evtchn_send``,
``struct vcpu_set_singleshot_timer``, ... as packed by :mod:`shared.abi.hypercall`
and :mod:`shared.abi.grant`); the answer is a :class:`HypercallResult` whose
``data`` is the struct written back (OUT fields filled). Where the C struct
holds a guest pointer, the array it points to follows the struct in ``arg``
(``sched_poll``'s ports) or in ``data`` (``gnttab_setup_table``'s frame list).
Exits that are not hypercalls (CPUID, LAPIC register accesses) have their own
messages so they are counted the same way.
"""

from __future__ import annotations

from shared.abi.constants import Hypercall
from shared.codec import message


@message(100 + Hypercall.memory_op)
class MemoryOp:
    cmd: int  #: XENMEM_*
    arg: bytes


@message(100 + Hypercall.set_timer_op)
class SetTimerOp:
    timeout_abs_ns: int  #: absolute guest system time; 0 cancels


@message(100 + Hypercall.xen_version)
class XenVersion:
    cmd: int  #: XENVER_*
    arg: bytes


@message(100 + Hypercall.grant_table_op)
class GrantTableOp:
    """``count`` structs of the ``cmd``'s type back to back in ``args``. For
    GNTTABOP_copy, ``payload`` carries the source bytes of every op whose source
    is the caller's own frame and the caller has no RAM here (dom0's backends),
    in op order; the bytes read for such destinations follow the structs in
    the result's ``data``."""

    cmd: int  #: GNTTABOP_*
    count: int
    args: bytes
    payload: bytes


@message(100 + Hypercall.vcpu_op)
class VcpuOp:
    cmd: int  #: VCPUOP_*
    vcpuid: int
    arg: bytes


@message(100 + Hypercall.sched_op)
class SchedOp:
    cmd: int  #: SCHEDOP_*
    arg: bytes


@message(100 + Hypercall.event_channel_op)
class EventChannelOp:
    cmd: int  #: EVTCHNOP_*
    arg: bytes


@message(100 + Hypercall.hvm_op)
class HvmOp:
    cmd: int  #: HVMOP_*
    arg: bytes


@message(160)
class Cpuid:
    """The CPUID instruction (an exit): answered with ``data`` = EAX..EDX as 4 u32."""

    leaf: int
    subleaf: int


@message(161)
class ApicAccess:
    """A LAPIC register access (xAPIC MMIO / x2APIC MSR exit)."""

    reg: int
    write: bool
    value: int


@message(199)
class HypercallResult:
    """RAX (0 / positive, or a negative Xen errno) and the OUT bytes."""

    value: int
    data: bytes


HYPERCALL_MESSAGES = (
    MemoryOp,
    SetTimerOp,
    XenVersion,
    GrantTableOp,
    VcpuOp,
    SchedOp,
    EventChannelOp,
    HvmOp,
)
