"""Argument structures of the hypercalls a PVHVM guest makes (x86_64 layouts).

Each C struct is a registered :class:`~shared.abi._layout.Layout` (``EVTCHN_BIND_VIRQ``
mirrors ``struct evtchn_bind_virq``) plus a frozen record (``EvtchnBindVirq``) with
``pack()`` and ``unpack(data, offset=0)``. IN and OUT members share one record: the
guest fills the IN ones, the hypervisor answers with the record updated by
``attrs.evolve`` and packed back over the guest's copy. Padding members are written
as zero. ``EVTCHNOP_ARGS`` and friends map a command to its record type so a
dispatcher can decode by command number.
"""

from __future__ import annotations

from typing import ClassVar, Self

import attrs

from shared.abi._layout import Layout, layout
from shared.abi.constants import EVTCHNOP, EVTCHNSTAT, HVMOP, SCHEDOP, VCPUOP, XENMEM, XENVER

_EV = "xen/event_channel.h"


class _Args:
    """Packing by layout field name (leading ``_`` stripped): a record attribute per
    member, zero for members the record leaves out (``pad``, ``rsvd``)."""

    LAYOUT: ClassVar[Layout]

    def pack(self) -> bytes:
        return self.LAYOUT.struct.pack(*(getattr(self, n, 0) for n in _names(self.LAYOUT)))

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, offset: int = 0) -> Self:
        values = cls.LAYOUT.struct.unpack_from(data, offset)
        by_name = dict(zip(_names(cls.LAYOUT), values, strict=True))
        return cls(**{a.name: by_name[a.name] for a in attrs.fields(cls)})


def _names(lay: Layout) -> list[str]:
    return [f.name.lstrip("_") for f in lay.fields]


# --- event channels (xen/event_channel.h) -------------------------------------------------

EVTCHN_ALLOC_UNBOUND = layout(
    "struct evtchn_alloc_unbound", _EV, ("dom", "H"), ("remote_dom", "H"), ("port", "I")
)
EVTCHN_BIND_INTERDOMAIN = layout(
    "struct evtchn_bind_interdomain",
    _EV,
    ("remote_dom", "H"),
    ("remote_port", "I"),
    ("local_port", "I"),
)
EVTCHN_BIND_VIRQ = layout(
    "struct evtchn_bind_virq", _EV, ("virq", "I"), ("vcpu", "I"), ("port", "I")
)
EVTCHN_BIND_IPI = layout("struct evtchn_bind_ipi", _EV, ("vcpu", "I"), ("port", "I"))
EVTCHN_CLOSE = layout("struct evtchn_close", _EV, ("port", "I"))
EVTCHN_SEND = layout("struct evtchn_send", _EV, ("port", "I"))
# The union ``u`` (unbound.dom | interdomain.{dom,port} | pirq | virq) is kept as its
# 8 raw bytes; EvtchnStatus decodes it according to ``status``.
EVTCHN_STATUS = layout(
    "struct evtchn_status",
    _EV,
    ("dom", "H"),
    ("port", "I"),
    ("status", "I"),
    ("vcpu", "I"),
    ("u", "s", 8, None, 4),
)
EVTCHN_BIND_VCPU = layout("struct evtchn_bind_vcpu", _EV, ("port", "I"), ("vcpu", "I"))
EVTCHN_UNMASK = layout("struct evtchn_unmask", _EV, ("port", "I"))


@attrs.frozen
class EvtchnAllocUnbound(_Args):
    LAYOUT = EVTCHN_ALLOC_UNBOUND
    dom: int  #: IN: owner of the new port (DOMID_SELF)
    remote_dom: int  #: IN: the domain allowed to bind it
    port: int = 0  #: OUT


@attrs.frozen
class EvtchnBindInterdomain(_Args):
    LAYOUT = EVTCHN_BIND_INTERDOMAIN
    remote_dom: int  #: IN
    remote_port: int  #: IN: an UNBOUND port of remote_dom expecting us
    local_port: int = 0  #: OUT


@attrs.frozen
class EvtchnBindVirq(_Args):
    LAYOUT = EVTCHN_BIND_VIRQ
    virq: int  #: IN: a VIRQ value
    vcpu: int  #: IN: must be 0 for a global VIRQ
    port: int = 0  #: OUT


@attrs.frozen
class EvtchnBindIpi(_Args):
    LAYOUT = EVTCHN_BIND_IPI
    vcpu: int  #: IN: the vCPU notified (fixed for the port's life)
    port: int = 0  #: OUT


@attrs.frozen
class EvtchnClose(_Args):
    LAYOUT = EVTCHN_CLOSE
    port: int


@attrs.frozen
class EvtchnSend(_Args):
    LAYOUT = EVTCHN_SEND
    port: int


@attrs.frozen
class EvtchnStatus(_Args):
    """``status`` selects the union member: ``remote_dom`` for unbound and
    interdomain, ``remote_port`` for interdomain, ``irq`` (pirq or virq) otherwise."""

    LAYOUT = EVTCHN_STATUS
    dom: int  #: IN
    port: int  #: IN
    status: int = EVTCHNSTAT.closed  #: OUT: an EVTCHNSTAT value
    vcpu: int = 0  #: OUT: the notified vCPU
    remote_dom: int = 0  #: OUT: u.unbound.dom / u.interdomain.dom
    remote_port: int = 0  #: OUT: u.interdomain.port
    irq: int = 0  #: OUT: u.pirq / u.virq

    def pack(self) -> bytes:
        if self.status in (EVTCHNSTAT.pirq, EVTCHNSTAT.virq):
            u = self.irq.to_bytes(4, "little") + bytes(4)
        else:
            u = (
                self.remote_dom.to_bytes(2, "little")
                + bytes(2)
                + self.remote_port.to_bytes(4, "little")
            )
        return self.LAYOUT.struct.pack(self.dom, self.port, self.status, self.vcpu, u)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview, offset: int = 0) -> Self:
        dom, port, status, vcpu, u = cls.LAYOUT.struct.unpack_from(data, offset)
        if status in (EVTCHNSTAT.pirq, EVTCHNSTAT.virq):
            return cls(dom, port, status, vcpu, irq=int.from_bytes(u[:4], "little"))
        remote_dom = int.from_bytes(u[:2], "little")
        remote_port = int.from_bytes(u[4:], "little") if status == EVTCHNSTAT.interdomain else 0
        return cls(dom, port, status, vcpu, remote_dom=remote_dom, remote_port=remote_port)


@attrs.frozen
class EvtchnBindVcpu(_Args):
    LAYOUT = EVTCHN_BIND_VCPU
    port: int
    vcpu: int


@attrs.frozen
class EvtchnUnmask(_Args):
    LAYOUT = EVTCHN_UNMASK
    port: int


# --- vCPU timers and vcpu_info placement (xen/vcpu.h) -------------------------------------

VCPU_SET_SINGLESHOT_TIMER = layout(
    "struct vcpu_set_singleshot_timer", "xen/vcpu.h", ("timeout_abs_ns", "Q"), ("flags", "I")
)
VCPU_SET_PERIODIC_TIMER = layout("struct vcpu_set_periodic_timer", "xen/vcpu.h", ("period_ns", "Q"))
VCPU_REGISTER_VCPU_INFO = layout(
    "struct vcpu_register_vcpu_info",
    "xen/vcpu.h",
    ("mfn", "Q"),
    ("offset", "I"),
    ("rsvd", "I"),
)


@attrs.frozen
class VcpuSetSingleshotTimer(_Args):
    LAYOUT = VCPU_SET_SINGLESHOT_TIMER
    timeout_abs_ns: int  #: absolute Xen system time
    flags: int = 0  #: VCPU_SSHOTTMR_future (old ABI)


@attrs.frozen
class VcpuSetPeriodicTimer(_Args):
    LAYOUT = VCPU_SET_PERIODIC_TIMER
    period_ns: int


@attrs.frozen
class VcpuRegisterVcpuInfo(_Args):
    LAYOUT = VCPU_REGISTER_VCPU_INFO
    mfn: int  #: frame (a GFN for HVM) holding the new vcpu_info
    offset: int  #: byte offset of the 64-byte vcpu_info in that frame


# --- HVM (xen/hvm/hvm_op.h) ---------------------------------------------------------------

XEN_HVM_PARAM = layout(
    "struct xen_hvm_param",
    "xen/hvm/hvm_op.h",
    ("domid", "H"),
    ("pad", "H"),
    ("index", "I"),
    ("value", "Q"),
)
XEN_HVM_EVTCHN_UPCALL_VECTOR = layout(
    "struct xen_hvm_evtchn_upcall_vector", "xen/hvm/hvm_op.h", ("vcpu", "I"), ("vector", "B")
)


@attrs.frozen
class XenHvmParam(_Args):
    LAYOUT = XEN_HVM_PARAM
    domid: int  #: IN: DOMID_SELF from a guest
    index: int  #: IN: an HVM_PARAM value
    value: int = 0  #: IN for set_param, OUT for get_param


@attrs.frozen
class XenHvmEvtchnUpcallVector(_Args):
    LAYOUT = XEN_HVM_EVTCHN_UPCALL_VECTOR
    vcpu: int
    vector: int  #: x86 vector, >= 0x10


# --- memory, version, scheduler -----------------------------------------------------------

XEN_ADD_TO_PHYSMAP = layout(
    "struct xen_add_to_physmap",
    "xen/memory.h",
    ("domid", "H"),
    # Leading underscore = not in the shared C layout test, whose "<type> size" key
    # for sizeof() would collide with this member; test_abi_hypercall checks it.
    ("size", "H"),
    ("space", "I"),
    ("idx", "Q"),
    ("gpfn", "Q"),
)
XEN_FEATURE_INFO = layout(
    "struct xen_feature_info", "xen/version.h", ("submap_idx", "I"), ("submap", "I")
)
SCHED_SHUTDOWN = layout("struct sched_shutdown", "xen/sched.h", ("reason", "I"))
SCHED_REMOTE_SHUTDOWN = layout(
    "struct sched_remote_shutdown", "xen/sched.h", ("domain_id", "H"), ("reason", "I")
)


@attrs.frozen
class XenAddToPhysmap(_Args):
    LAYOUT = XEN_ADD_TO_PHYSMAP
    domid: int
    space: int  #: a XENMAPSPACE value
    idx: int  #: index within the space (0 for shared_info)
    gpfn: int  #: where the page appears in the guest
    size: int = 0  #: pages, for XENMAPSPACE_gmfn_range only


@attrs.frozen
class XenFeatureInfo(_Args):
    LAYOUT = XEN_FEATURE_INFO
    submap_idx: int  #: IN: only 0 exists
    submap: int = 0  #: OUT: XENFEAT bits


@attrs.frozen
class SchedShutdown(_Args):
    LAYOUT = SCHED_SHUTDOWN
    reason: int  #: a SHUTDOWN value


@attrs.frozen
class SchedRemoteShutdown(_Args):
    LAYOUT = SCHED_REMOTE_SHUTDOWN
    domain_id: int
    reason: int


# Commands whose argument is one of the records above (others take none, or a
# struct this module does not define).
EVTCHNOP_ARGS: dict[EVTCHNOP, type[_Args]] = {
    EVTCHNOP.bind_interdomain: EvtchnBindInterdomain,
    EVTCHNOP.bind_virq: EvtchnBindVirq,
    EVTCHNOP.close: EvtchnClose,
    EVTCHNOP.send: EvtchnSend,
    EVTCHNOP.status: EvtchnStatus,
    EVTCHNOP.alloc_unbound: EvtchnAllocUnbound,
    EVTCHNOP.bind_ipi: EvtchnBindIpi,
    EVTCHNOP.bind_vcpu: EvtchnBindVcpu,
    EVTCHNOP.unmask: EvtchnUnmask,
}
VCPUOP_ARGS: dict[VCPUOP, type[_Args]] = {
    VCPUOP.set_periodic_timer: VcpuSetPeriodicTimer,
    VCPUOP.set_singleshot_timer: VcpuSetSingleshotTimer,
    VCPUOP.register_vcpu_info: VcpuRegisterVcpuInfo,
}
HVMOP_ARGS: dict[HVMOP, type[_Args]] = {
    HVMOP.set_param: XenHvmParam,
    HVMOP.get_param: XenHvmParam,
    HVMOP.set_evtchn_upcall_vector: XenHvmEvtchnUpcallVector,
}
SCHEDOP_ARGS: dict[SCHEDOP, type[_Args]] = {
    SCHEDOP.shutdown: SchedShutdown,
    SCHEDOP.remote_shutdown: SchedRemoteShutdown,
}
XENMEM_ARGS: dict[XENMEM, type[_Args]] = {XENMEM.add_to_physmap: XenAddToPhysmap}
XENVER_ARGS: dict[XENVER, type[_Args]] = {XENVER.get_features: XenFeatureInfo}
