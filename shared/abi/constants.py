"""Numbers of the Xen 4.17 guest ABI, named as Xen names them.

Each C prefix becomes an enum and the rest of the C name becomes the member:
``EVTCHNOP_bind_virq`` is ``EVTCHNOP.bind_virq``, ``VIRQ_TIMER`` is ``VIRQ.TIMER``,
``__HYPERVISOR_sched_op`` is ``Hypercall.sched_op``, ``XEN_EINVAL`` is
``XenErrno.EINVAL``. Values come from the installed headers (``/usr/include/xen``)
and ``tests/test_abi_constants.py`` compiles those headers to check every member.
XenStore wire numbers live in :mod:`shared.abi.xs_wire`.
"""

from __future__ import annotations

import enum
from typing import Final


class XenErrno(enum.IntEnum):
    """``enum xen_errno`` (xen/errno.h): identical to Linux x86 errno values.
    Hypercalls return the negated value; see :func:`xen_error`."""

    EPERM = 1
    ENOENT = 2
    ESRCH = 3
    EINTR = 4  # Xen-internal, never returned to a guest
    EIO = 5
    ENXIO = 6
    E2BIG = 7
    ENOEXEC = 8
    EBADF = 9
    ECHILD = 10
    EAGAIN = 11
    EWOULDBLOCK = 11
    ENOMEM = 12
    EACCES = 13
    EFAULT = 14
    EBUSY = 16
    EEXIST = 17
    EXDEV = 18
    ENODEV = 19
    ENOTDIR = 20
    EISDIR = 21
    EINVAL = 22
    ENFILE = 23
    EMFILE = 24
    ENOSPC = 28
    EROFS = 30
    EMLINK = 31
    EDOM = 33
    ERANGE = 34
    EDEADLK = 35
    EDEADLOCK = 35
    ENAMETOOLONG = 36
    ENOLCK = 37
    ENOSYS = 38
    ENOTEMPTY = 39
    ENODATA = 61
    ETIME = 62
    EBADMSG = 74
    EOVERFLOW = 75
    EILSEQ = 84
    ERESTART = 85  # Xen-internal: a preempted hypercall is continued, not failed
    ENOTSOCK = 88
    EMSGSIZE = 90
    EOPNOTSUPP = 95
    EADDRINUSE = 98
    EADDRNOTAVAIL = 99
    ENOBUFS = 105
    EISCONN = 106
    ENOTCONN = 107
    ETIMEDOUT = 110
    ECONNREFUSED = 111


def xen_error(errno: int) -> int:
    """The hypercall return value for ``errno``: ``xen_error(XenErrno.EINVAL) == -22``."""
    return -abs(int(errno))


class DOMID(enum.IntEnum):
    """Reserved ``domid_t`` values (xen/xen.h); real domains are below ``FIRST_RESERVED``."""

    SELF = 0x7FF0
    FIRST_RESERVED = 0x7FF0
    IO = 0x7FF1
    XEN = 0x7FF2
    COW = 0x7FF3
    INVALID = 0x7FF4
    IDLE = 0x7FFF
    MASK = 0x7FFF


class Hypercall(enum.IntEnum):
    """``__HYPERVISOR_*`` (xen/xen.h): the number loaded into RAX."""

    set_trap_table = 0
    mmu_update = 1
    set_gdt = 2
    stack_switch = 3
    set_callbacks = 4
    fpu_taskswitch = 5
    sched_op_compat = 6
    platform_op = 7
    set_debugreg = 8
    get_debugreg = 9
    update_descriptor = 10
    memory_op = 12
    multicall = 13
    update_va_mapping = 14
    set_timer_op = 15
    event_channel_op_compat = 16
    xen_version = 17
    console_io = 18
    physdev_op_compat = 19
    grant_table_op = 20
    vm_assist = 21
    update_va_mapping_otherdomain = 22
    iret = 23
    vcpu_op = 24
    set_segment_base = 25
    mmuext_op = 26
    xsm_op = 27
    nmi_op = 28
    sched_op = 29
    callback_op = 30
    xenoprof_op = 31
    event_channel_op = 32
    physdev_op = 33
    hvm_op = 34
    sysctl = 35
    domctl = 36
    kexec_op = 37
    tmem_op = 38
    argo_op = 39
    xenpmu_op = 40
    dm_op = 41
    hypfs_op = 42
    arch_0 = 48
    arch_1 = 49
    arch_2 = 50
    arch_3 = 51
    arch_4 = 52
    arch_5 = 53
    arch_6 = 54
    arch_7 = 55


# Hypercall page (HVM): the guest writes the page's GPA to this MSR (CPUID base+2 EBX);
# Xen fills it with one 32-byte stub per hypercall number (xen-reference 0.1).
HYPERCALL_PAGE_MSR: Final = 0x40000000
HYPERCALL_STUB_SIZE: Final = 32


class EVTCHNOP(enum.IntEnum):
    """``EVTCHNOP_*`` (xen/event_channel.h): ``HYPERVISOR_event_channel_op`` commands."""

    bind_interdomain = 0
    bind_virq = 1
    bind_pirq = 2
    close = 3
    send = 4
    status = 5
    alloc_unbound = 6
    bind_ipi = 7
    bind_vcpu = 8
    unmask = 9
    reset = 10
    init_control = 11  # FIFO ABI: a 2-level-only implementation answers -ENOSYS
    expand_array = 12
    set_priority = 13


class EVTCHNSTAT(enum.IntEnum):
    """``EVTCHNSTAT_*``: the ``status`` reported by ``EVTCHNOP_status``."""

    closed = 0
    unbound = 1
    interdomain = 2
    pirq = 3
    virq = 4
    ipi = 5


BIND_PIRQ__WILL_SHARE: Final = 1
EVTCHN_2L_NR_CHANNELS: Final = 64 * 64  # sizeof(xen_ulong_t)**2 * 64 on x86_64
XEN_LEGACY_MAX_VCPUS: Final = 32  # vcpu_info slots inside shared_info


class VIRQ(enum.IntEnum):
    """``VIRQ_*`` (xen/xen.h); see :data:`PER_VCPU_VIRQS` for which are per-vCPU."""

    TIMER = 0
    DEBUG = 1
    CONSOLE = 2
    DOM_EXC = 3
    TBUF = 4
    DEBUGGER = 6
    XENOPROF = 7
    CON_RING = 8
    PCPU_STATE = 9
    MEM_EVENT = 10
    ARGO = 11
    ENOMEM = 12
    XENPMU = 13
    ARCH_0 = 16  # x86: machine check (global)
    ARCH_1 = 17
    ARCH_2 = 18
    ARCH_3 = 19
    ARCH_4 = 20
    ARCH_5 = 21
    ARCH_6 = 22
    ARCH_7 = 23


NR_VIRQS: Final = 24
# Marked "V." in xen.h: bound once per vCPU and never movable with EVTCHNOP_bind_vcpu;
# every other VIRQ is global and may only be bound on vCPU 0.
PER_VCPU_VIRQS: Final = frozenset({VIRQ.TIMER, VIRQ.DEBUG, VIRQ.XENOPROF, VIRQ.XENPMU})


class VCPUOP(enum.IntEnum):
    """``VCPUOP_*`` (xen/vcpu.h): ``HYPERVISOR_vcpu_op(cmd, vcpuid, arg)`` commands."""

    initialise = 0
    up = 1
    down = 2
    is_up = 3
    get_runstate_info = 4
    register_runstate_memory_area = 5
    set_periodic_timer = 6
    stop_periodic_timer = 7
    set_singleshot_timer = 8
    stop_singleshot_timer = 9
    register_vcpu_info = 10
    send_nmi = 11
    get_physid = 12
    register_vcpu_time_memory_area = 13


VCPU_SSHOTTMR_future: Final = 1 << 0  # old ABI: -ETIME instead of arming a past timeout


class RUNSTATE(enum.IntEnum):
    """``RUNSTATE_*`` (xen/vcpu.h)."""

    running = 0
    runnable = 1
    blocked = 2
    offline = 3


class SCHEDOP(enum.IntEnum):
    """``SCHEDOP_*`` (xen/sched.h): ``HYPERVISOR_sched_op(cmd, arg)`` commands."""

    yield_ = 0  # SCHEDOP_yield; ``yield`` is a Python keyword
    block = 1
    shutdown = 2
    poll = 3
    remote_shutdown = 4
    shutdown_code = 5
    watchdog = 6
    pin_override = 7


class SHUTDOWN(enum.IntEnum):
    """``SHUTDOWN_*`` reasons (xen/sched.h)."""

    poweroff = 0
    reboot = 1
    suspend = 2
    crash = 3
    watchdog = 4
    soft_reset = 5


SHUTDOWN_MAX: Final = SHUTDOWN.soft_reset


class HVMOP(enum.IntEnum):
    """``HVMOP_*`` (xen/hvm/hvm_op.h) of the 4.17 interface; 2-4 exist only for
    interface versions before 4.9 and the altp2m sub-operations are not listed."""

    set_param = 0
    get_param = 1
    flush_tlbs = 5
    pagetable_dying = 9
    get_time = 10
    xentrace = 11
    set_mem_access = 12
    get_mem_access = 13
    get_mem_type = 15
    set_evtchn_upcall_vector = 23
    guest_request_vm_event = 24
    altp2m = 25


class HVM_PARAM(enum.IntEnum):
    """``HVM_PARAM_*`` indices (xen/hvm/params.h), including the deprecated ones
    the header still defines for tools, so every index can be named."""

    CALLBACK_IRQ = 0
    STORE_PFN = 1
    STORE_EVTCHN = 2
    PAE_ENABLED = 4
    IOREQ_PFN = 5
    BUFIOREQ_PFN = 6
    VIRIDIAN = 9
    TIMER_MODE = 10
    HPET_ENABLED = 11
    IDENT_PT = 12
    DM_DOMAIN = 13
    ACPI_S_STATE = 14
    VM86_TSS = 15
    VPT_ALIGN = 16
    CONSOLE_PFN = 17
    CONSOLE_EVTCHN = 18
    ACPI_IOPORTS_LOCATION = 19
    MEMORY_EVENT_CR0 = 20
    MEMORY_EVENT_CR3 = 21
    MEMORY_EVENT_CR4 = 22
    MEMORY_EVENT_INT3 = 23
    NESTEDHVM = 24
    MEMORY_EVENT_SINGLE_STEP = 25
    BUFIOREQ_EVTCHN = 26
    PAGING_RING_PFN = 27
    MONITOR_RING_PFN = 28
    SHARING_RING_PFN = 29
    MEMORY_EVENT_MSR = 30
    TRIPLE_FAULT_REASON = 31
    IOREQ_SERVER_PFN = 32
    NR_IOREQ_SERVER_PAGES = 33
    VM_GENERATION_ID_ADDR = 34
    ALTP2M = 35
    X87_FIP_WIDTH = 36
    VM86_TSS_SIZED = 37
    MCA_CAP = 38


HVM_NR_PARAMS: Final = 39


class HVM_PARAM_CALLBACK_TYPE(enum.IntEnum):
    """Delivery type in bits 63:56 of the ``HVM_PARAM_CALLBACK_IRQ`` value."""

    GSI = 0
    PCI_INTX = 1
    VECTOR = 2


HVM_PARAM_CALLBACK_IRQ_TYPE_MASK: Final = 0xFF00000000000000
HVM_PARAM_CALLBACK_IRQ_TYPE_SHIFT: Final = 56


def callback_irq_type(value: int) -> int:
    """The delivery type (:class:`HVM_PARAM_CALLBACK_TYPE` value) of a CALLBACK_IRQ value."""
    return (value & HVM_PARAM_CALLBACK_IRQ_TYPE_MASK) >> HVM_PARAM_CALLBACK_IRQ_TYPE_SHIFT


class XENVER(enum.IntEnum):
    """``XENVER_*`` (xen/version.h): ``HYPERVISOR_xen_version(cmd, arg)`` commands."""

    version = 0
    extraversion = 1
    compile_info = 2
    capabilities = 3
    changeset = 4
    platform_parameters = 5
    get_features = 6
    pagesize = 7
    guest_handle = 8
    commandline = 9
    build_id = 10


class XENFEAT(enum.IntEnum):
    """``XENFEAT_*`` bit numbers (xen/features.h) in submap 0 of ``XENVER_get_features``.
    12 is commented out in the header (deprecated); 18-20 are newer than 4.17."""

    writable_page_tables = 0
    writable_descriptor_tables = 1
    auto_translated_physmap = 2
    supervisor_mode_kernel = 3
    pae_pgdir_above_4gb = 4
    mmu_pt_update_preserve_ad = 5
    highmem_assist = 6
    gnttab_map_avail_bits = 7
    hvm_callback_vector = 8
    hvm_safe_pvclock = 9
    hvm_pirqs = 10
    dom0 = 11
    grant_map_identity = 12
    memory_op_vnode_supported = 13
    ARM_SMCCC_supported = 14
    linux_rsdp_unrestricted = 15
    not_direct_mapped = 16
    direct_mapped = 17
    runstate_phys_area = 18
    vcpu_time_phys_area = 19
    dm_msix_all_writes = 20


XENFEAT_NR_SUBMAPS: Final = 1


class XENMEM(enum.IntEnum):
    """``XENMEM_*`` commands of ``HYPERVISOR_memory_op`` (xen/memory.h); sub-op
    numbers of paging/access/sharing/resource are not listed."""

    increase_reservation = 0
    decrease_reservation = 1
    maximum_ram_page = 2
    current_reservation = 3
    maximum_reservation = 4
    machphys_mfn_list = 5
    populate_physmap = 6
    add_to_physmap = 7
    memory_map = 9
    machine_memory_map = 10
    exchange = 11
    machphys_mapping = 12
    set_memory_map = 13
    maximum_gpfn = 14
    remove_from_physmap = 15
    set_pod_target = 16
    get_pod_target = 17
    get_sharing_freed_pages = 18
    get_sharing_shared_pages = 19
    paging_op = 20
    access_op = 21
    sharing_op = 22
    add_to_physmap_batch = 23
    claim_pages = 24
    machphys_compat_mfn_list = 25
    get_vnumainfo = 26
    reserved_device_memory_map = 27
    acquire_resource = 28


class XENMAPSPACE(enum.IntEnum):
    """``XENMAPSPACE_*``: what ``xen_add_to_physmap.space`` maps."""

    shared_info = 0
    grant_table = 1
    gmfn = 2
    gmfn_range = 3
    gmfn_foreign = 4
    dev_mmio = 5


XENMAPIDX_grant_table_status: Final = 0x80000000


class XEN_PVCLOCK(enum.IntFlag):
    """``vcpu_time_info.flags`` bits (xen/xen.h ``XEN_PVCLOCK_*``)."""

    TSC_STABLE_BIT = 1 << 0
    GUEST_STOPPED = 1 << 1


# CPUID hypervisor leaves (xen/arch-x86/cpuid.h). Guests scan base, base+0x100, ...
XEN_CPUID_FIRST_LEAF: Final = 0x40000000
XEN_CPUID_SIGNATURE_EBX: Final = 0x566E6558  # "XenV"
XEN_CPUID_SIGNATURE_ECX: Final = 0x65584D4D  # "MMXe"
XEN_CPUID_SIGNATURE_EDX: Final = 0x4D4D566E  # "nVMM"
XEN_CPUID_MAX_NUM_LEAVES: Final = 5
XEN_CPUID_FEAT1_MMU_PT_UPDATE_PRESERVE_AD: Final = 1 << 0
XEN_CPUID_MACHINE_ADDRESS_WIDTH_MASK: Final = 0xFF


def XEN_CPUID_LEAF(i: int) -> int:  # noqa: N802 - the header's macro name
    """``XEN_CPUID_LEAF(i)``: leaf ``i`` above the first Xen leaf."""
    return XEN_CPUID_FIRST_LEAF + i


class XEN_HVM_CPUID(enum.IntFlag):
    """EAX bits of leaf base+4 (``XEN_HVM_CPUID_*``)."""

    APIC_ACCESS_VIRT = 1 << 0
    X2APIC_VIRT = 1 << 1
    IOMMU_MAPPINGS = 1 << 2
    VCPU_ID_PRESENT = 1 << 3
    DOMID_PRESENT = 1 << 4
    EXT_DEST_ID = 1 << 5
    UPCALL_VECTOR = 1 << 6


class XenbusState(enum.IntEnum):
    """``enum xenbus_state`` (xen/io/xenbus.h), stored as a decimal string in
    ``<device dir>/state``. Members carry the C spelling (``XenbusStateConnected``
    is ``XenbusState.Connected``); upper-case aliases (``XenbusState.CONNECTED``)
    name the same values."""

    Unknown = 0
    Initialising = 1
    InitWait = 2
    Initialised = 3
    Connected = 4
    Closing = 5
    Closed = 6
    Reconfiguring = 7
    Reconfigured = 8
    UNKNOWN = 0
    INITIALISING = 1
    INITWAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8
