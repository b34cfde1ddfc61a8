"""Domains and vCPUs, HVM parameters and what each platform personality answers.

A domain has guest RAM (a buffer of ``nr_pages`` 4 KiB frames; the adapter
hands in the ``/dev/shm`` mmap, tests a bytearray; dom0 has none here), vCPUs,
a *personality* and a feature mask:

``bare``        no Xen CPUID leaf and no hypercall (every one ``-ENOSYS``);
``xen-legacy``  a Xen without ``XENFEAT_hvm_callback_vector``: the guest must use
                the GSI/INTx callback (a type-2 CALLBACK_IRQ is an unknown type
                there, i.e. no callback) and has no per-vCPU upcall vector;
``xen``         Xen 4.17 as an HVM guest sees it (vector callback, safe pvclock,
                per-vCPU upcall vector).

``xen-legacy`` keeps ``XENFEAT_hvm_safe_pvclock`` (bit 9): the PV clock alone is
not enough for PV timers, which need a vector callback too (guest-behaviour
A.2, xen-reference 8.1), so a guest on it must take the emulated-timer path for
the right reason -- the missing callback -- and not stop at an earlier check.
Clear bit 9 with the feature mask to model a pre-4.0 Xen exactly.

The checks here are Xen's; applying a result to the other cores (event
channels, grant frames) is :mod:`services.hypervisor.host`'s job.
"""

from __future__ import annotations

import enum

import attrs

from services.hypervisor.domain_state import DomainInfo, DomainState, VcpuState
from shared.abi.constants import (
    DOMID,
    HVM_NR_PARAMS,
    HVM_PARAM,
    XEN_HVM_CPUID,
    XENFEAT,
    XENVER,
    XenErrno,
    xen_error,
)
from shared.abi.ring import PAGE_SIZE, Buffer
from shared.abi.sharedinfo import VCPU_INFO, time_scale

XEN_MAJOR, XEN_MINOR = 4, 17
CPUID_BASE = 0x40000000
HYPERCALL_MSR = 0x40000000
TSC_KHZ = 1_000_000  # the guest TSC ticks in guest nanoseconds
FEATURES_XEN = 0x00012305  # bits 0, 2, 8, 9, 13, 16: an HVM guest on 4.17
FEATURES_XEN_LEGACY = FEATURES_XEN & ~(1 << XENFEAT.hvm_callback_vector)
CAPABILITIES = b"hvm-3.0-x86_64 hvm-3.0-x86_32 hvm-3.0-x86_32p"

EINVAL, ENOENT, ENXIO, EPERM, ESRCH, ENOSYS = (
    xen_error(e)
    for e in (
        XenErrno.EINVAL,
        XenErrno.ENOENT,
        XenErrno.ENXIO,
        XenErrno.EPERM,
        XenErrno.ESRCH,
        XenErrno.ENOSYS,
    )
)

# hvm_allow_set_param / hvm_allow_get_param: what a guest may touch on itself.
GUEST_SETTABLE = frozenset(
    {
        HVM_PARAM.CALLBACK_IRQ,
        HVM_PARAM.VM86_TSS,
        HVM_PARAM.VM86_TSS_SIZED,
        HVM_PARAM.ACPI_IOPORTS_LOCATION,
        HVM_PARAM.VM_GENERATION_ID_ADDR,
        HVM_PARAM.STORE_EVTCHN,
        HVM_PARAM.CONSOLE_EVTCHN,
        HVM_PARAM.X87_FIP_WIDTH,
    }
)
GUEST_READABLE = GUEST_SETTABLE | {
    HVM_PARAM.STORE_PFN,
    HVM_PARAM.CONSOLE_PFN,
    HVM_PARAM.ALTP2M,
}


class Personality(enum.Enum):
    bare = "bare"
    xen_legacy = "xen-legacy"
    xen = "xen"


@attrs.define
class Vcpu:
    vcpu: int
    online: bool
    vcpu_info: tuple[int, int] | None = None  # (gfn, offset) once registered


@attrs.define(eq=False)
class Domain:
    domid: int
    nr_pages: int
    personality: Personality
    feature_mask: int
    privileged: bool
    memory: Buffer | None
    vcpus: list[Vcpu]
    paused: bool = False
    shutdown_reason: int | None = None
    hvm_params: dict[int, int] = attrs.Factory(dict)
    shared_info_gfn: int | None = None
    incarnation: int = 0  # times migrated (CPUID base+3 EDX)

    @property
    def nr_vcpus(self) -> int:
        return len(self.vcpus)

    @property
    def is_xen(self) -> bool:
        return self.personality is not Personality.bare

    @property
    def features(self) -> int:
        base = {Personality.xen: FEATURES_XEN, Personality.xen_legacy: FEATURES_XEN_LEGACY}
        bits = base.get(self.personality, 0) | (1 << XENFEAT.dom0 if self.privileged else 0)
        return bits & self.feature_mask

    @property
    def vector_callback(self) -> bool:
        return bool(self.features >> XENFEAT.hvm_callback_vector & 1)


class DomainTable:
    """Every domain of a host; dom0 is created with the table."""

    def __init__(self, dom0_vcpus: int = 1) -> None:
        self._domains: dict[int, Domain] = {}
        self.create(0, 0, dom0_vcpus, Personality.xen, privileged=True)

    def create(
        self,
        domid: int | None,
        nr_pages: int,
        nr_vcpus: int,
        personality: Personality = Personality.xen,
        feature_mask: int = 0xFFFFFFFF,
        privileged: bool = False,
        memory: Buffer | None = None,
    ) -> Domain:
        if domid is None:
            domid = next(d for d in range(1, DOMID.FIRST_RESERVED) if d not in self._domains)
        if domid in self._domains or not 0 <= domid < DOMID.FIRST_RESERVED:
            raise ValueError(f"domid {domid} is taken or reserved")
        if nr_vcpus < 1:
            raise ValueError("a domain has at least one vCPU")
        if memory is None and nr_pages:
            memory = bytearray(nr_pages * PAGE_SIZE)
        if memory is not None and len(memory) < nr_pages * PAGE_SIZE:
            raise ValueError("memory is smaller than nr_pages")
        vcpus = [Vcpu(v, online=v == 0) for v in range(nr_vcpus)]
        d = Domain(domid, nr_pages, personality, feature_mask, privileged, memory, vcpus)
        self._domains[domid] = d
        return d

    def get(self, domid: int) -> Domain | None:
        return self._domains.get(domid)

    def __contains__(self, domid: int) -> bool:
        return domid in self._domains

    def destroy(self, domid: int) -> Domain | None:
        return self._domains.pop(domid, None)

    def pause(self, domid: int) -> None:
        self._domains[domid].paused = True

    def unpause(self, domid: int) -> None:
        self._domains[domid].paused = False

    def shutdown(self, domid: int, reason: int) -> None:
        """The domain stops running with ``reason`` (a SHUTDOWN value)."""
        d = self._domains[domid]
        d.shutdown_reason = int(reason)

    def info(self, domid: int) -> DomainInfo:
        d = self._domains[domid]
        return DomainInfo(
            d.domid,
            d.personality.value,
            d.nr_pages,
            d.nr_vcpus,
            sum(v.online for v in d.vcpus),
            d.paused,
            d.shutdown_reason,
            d.privileged,
            d.features,
        )

    def domains(self) -> tuple[DomainInfo, ...]:
        return tuple(self.info(d) for d in sorted(self._domains))

    # --- VCPUOP_up/down/is_up/register_vcpu_info ---------------------------------------------

    def vcpu_up(self, domid: int, vcpu: int, up: bool) -> int:
        d = self._domains[domid]
        if not 0 <= vcpu < d.nr_vcpus:
            return ENOENT
        d.vcpus[vcpu].online = up
        return 0

    def vcpu_is_up(self, domid: int, vcpu: int) -> int:
        d = self._domains[domid]
        return ENOENT if not 0 <= vcpu < d.nr_vcpus else int(d.vcpus[vcpu].online)

    def register_vcpu_info(
        self, domid: int, caller_vcpu: int, vcpu: int, gfn: int, offset: int
    ) -> int:
        """Xen's ``map_vcpu_info`` checks, in order; on 0 the caller moves the area."""
        d = self._domains[domid]
        if not 0 <= vcpu < d.nr_vcpus:
            return ENOENT
        v = d.vcpus[vcpu]
        if vcpu != caller_vcpu and v.online:
            return EINVAL
        if not 0 <= offset <= PAGE_SIZE - VCPU_INFO.size or offset % 8:
            return ENXIO
        if v.vcpu_info is not None:
            return EINVAL  # once per vCPU
        if not 0 <= gfn < d.nr_pages:
            return EINVAL
        v.vcpu_info = (gfn, offset)
        return 0

    # --- HVM params --------------------------------------------------------------------------

    def resolve(self, caller: int, dom: int) -> tuple[Domain | None, int]:
        """The domain an HVMOP/XENMEM names: self, or any if the caller is privileged."""
        target = self._domains.get(caller if dom == DOMID.SELF else dom)
        if target is None:
            return None, ESRCH
        if target.domid != caller and not self._domains[caller].privileged:
            return None, EPERM
        return target, 0

    def set_param(self, caller: int, dom: int, index: int, value: int) -> tuple[Domain | None, int]:
        target, rc = self.resolve(caller, dom)
        if target is None:
            return None, rc
        if not 0 <= index < HVM_NR_PARAMS or not 0 <= value < 2**64:
            return None, EINVAL
        if target.domid == caller and not target.privileged and index not in GUEST_SETTABLE:
            return None, EPERM
        target.hvm_params[int(index)] = int(value)
        return target, 0

    def get_param(self, caller: int, dom: int, index: int) -> tuple[int, int]:
        target, rc = self.resolve(caller, dom)
        if target is None:
            return rc, 0
        if not 0 <= index < HVM_NR_PARAMS:
            return EINVAL, 0
        if target.domid == caller and not target.privileged and index not in GUEST_READABLE:
            return EPERM, 0
        return 0, target.hvm_params.get(index, 0)

    def check_upcall_vector(self, domid: int, vcpu: int, vector: int) -> int:
        d = self._domains[domid]
        if d.personality is Personality.xen_legacy:
            return ENOSYS  # HVMOP 23 did not exist yet
        if not 0x10 <= vector <= 0xFF:
            return EINVAL
        return 0 if 0 <= vcpu < d.nr_vcpus else ENOENT

    # --- personality answers -----------------------------------------------------------------

    def cpuid(self, domid: int, vcpu: int, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        """Hypervisor leaves only (plus the leaf-1 "hypervisor present" bit); every
        other leaf reads as zeros, the real CPU's business."""
        d = self._domains[domid]
        if leaf == 1:
            return 0, 0, (1 << 31) if d.is_xen else 0, 0
        if not d.is_xen:
            return 0, 0, 0, 0
        last = 5 if d.personality is Personality.xen else 2
        k = leaf - CPUID_BASE
        if not 0 <= k <= last:
            return 0, 0, 0, 0
        if k == 0:
            return CPUID_BASE + last, 0x566E6558, 0x65584D4D, 0x4D4D566E
        if k == 1:
            return (XEN_MAJOR << 16) | XEN_MINOR, 0, 0, 0
        if k == 2:
            return 1, HYPERCALL_MSR, 0, 0
        if k == 3:
            mul, shift = time_scale(TSC_KHZ * 1000)
            return {
                0: (0, 0, TSC_KHZ, d.incarnation),
                1: (0, 0, mul, shift & 0xFFFFFFFF),
                2: (TSC_KHZ, 0, 0, 0),
            }.get(subleaf, (0, 0, 0, 0))
        if k == 4:
            flags = XEN_HVM_CPUID.IOMMU_MAPPINGS | XEN_HVM_CPUID.VCPU_ID_PRESENT
            flags |= XEN_HVM_CPUID.DOMID_PRESENT | XEN_HVM_CPUID.UPCALL_VECTOR
            return int(flags), vcpu, domid, 0
        return 0, 0, 0, 0  # base+5 is for PV guests

    def xen_version(self, domid: int, cmd: int, submap_idx: int = 0) -> tuple[int, bytes]:
        d = self._domains[domid]
        if not d.is_xen:
            return ENOSYS, b""
        match cmd:
            case XENVER.version:
                return (XEN_MAJOR << 16) | XEN_MINOR, b""
            case XENVER.extraversion:
                return 0, b".0".ljust(16, b"\0")
            case XENVER.capabilities:
                return 0, CAPABILITIES.ljust(1024, b"\0")
            case XENVER.get_features:
                if submap_idx != 0:
                    return EINVAL, b""
                return 0, d.features.to_bytes(4, "little")
            case XENVER.pagesize:
                return PAGE_SIZE, b""
        if cmd in XENVER.__members__.values():
            return 0, b""  # informational strings domsplit leaves empty
        return ENOSYS, b""

    # --- migration ---------------------------------------------------------------------------

    def export_state(self, domid: int) -> DomainState:
        d = self._domains[domid]
        vcpus = tuple(
            VcpuState(v.vcpu, v.online, *(v.vcpu_info if v.vcpu_info else (None, 0)))
            for v in d.vcpus
        )
        return DomainState(
            d.domid,
            d.nr_pages,
            d.personality.value,
            d.feature_mask,
            vcpus,
            dict(d.hvm_params),
            d.shared_info_gfn,
            d.incarnation,
        )

    def import_state(self, state: DomainState, memory: Buffer | None = None) -> Domain:
        """Create the domain described by ``state``: one more incarnation."""
        d = self.create(
            state.domid,
            state.nr_pages,
            len(state.vcpus),
            Personality(state.personality),
            state.feature_mask,
            memory=memory,
        )
        for v, s in zip(d.vcpus, state.vcpus, strict=True):
            v.online = s.online
            v.vcpu_info = None if s.vcpu_info_gfn is None else (s.vcpu_info_gfn, s.vcpu_info_offset)
        d.hvm_params = dict(state.hvm_params)
        d.shared_info_gfn = state.shared_info_gfn
        d.incarnation = state.incarnation + 1
        return d
