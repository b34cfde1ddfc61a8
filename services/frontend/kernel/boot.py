"""Boot: vCPU0's platform set-up (guest-behaviour A.0), each CPU's own
initialisation, SMP bring-up and the boot shuffle of device ports (C).

One code path for every personality: what runs is decided by the probes'
answers (:mod:`.platform`), never by being told the personality.
"""

from __future__ import annotations

import trio

from services.frontend.kernel import balance
from services.frontend.kernel import platform as plat
from services.frontend.kernel.ipi import IPI, icr_startup
from services.frontend.kernel.kernel import Kernel
from services.frontend.kernel.layout import (
    SHARED_INFO_GFN,
    CpuState,
    Globals,
    Stage,
    percpu_gfn,
)
from services.frontend.kernel.state import PortBinding
from services.frontend.kernel.timer import LapicTimer, XenTimer
from services.hypervisor.lapic import APIC
from services.hypervisor.messages import ApicAccess, Cpuid, HvmOp, MemoryOp, VcpuOp, XenVersion
from shared.abi import hypercall as hc
from shared.abi import sharedinfo as si
from shared.abi.constants import (
    DOMID,
    EVTCHNOP,
    HVM_PARAM,
    HVMOP,
    VCPUOP,
    VIRQ,
    XENFEAT,
    XENMAPSPACE,
    XENMEM,
    XENVER,
)

MODES = {"bare": 0, "legacy": 1, "vector": 2}
AP_TIMEOUT_S = 30.0


async def cpuid(k: Kernel, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    return plat.regs((await k.call(Cpuid(leaf, subleaf))).data)


async def detect(k: Kernel) -> None:
    """vCPU0, SI_SUB_HYPERVISOR: find Xen, read it, map shared_info, set the callback."""
    if not cpuid_hypervisor_bit(await cpuid(k, 1)):
        k.platform = plat.bare()
        return
    base = None
    for i in range(plat.CPUID_SCAN_LEAVES):
        leaf = plat.scan_leaf(i)
        if plat.is_xen_leaf(leaf, await cpuid(k, leaf)):
            base = leaf
            break
    if base is None:
        k.platform = plat.bare()
        return
    version = (await cpuid(k, base + 1))[0]
    k.log(f"XEN: Hypervisor version {plat.version_string(version)} detected.")
    pages, msr = (await cpuid(k, base + 2))[:2]
    k.log(f"XEN: {pages} hypercall page(s), MSR {msr:#x}")
    lo, hi = (await cpuid(k, base + 3, 1))[:2]
    k.clock.tsc_offset = 0  # base+3.1 EAX/EBX is the TSC offset; the guest TSC is host ns
    if lo or hi:
        k.clock.tsc_offset = (hi << 32 | lo) - (1 << 64 if hi >> 31 else 0)
    res = await k.call(XenVersion(XENVER.get_features, hc.XenFeatureInfo(0).pack()))
    features = hc.XenFeatureInfo.unpack(res.data).submap if res.value == 0 else 0
    arg = hc.XenAddToPhysmap(DOMID.SELF, XENMAPSPACE.shared_info, 0, SHARED_INFO_GFN).pack()
    if (rc := (await k.call(MemoryOp(XENMEM.add_to_physmap, arg))).value) != 0:
        k.panic(f"XENMEM_add_to_physmap(shared_info) failed: {rc}")
    vector_rc = None
    callback = 0
    if plat.has_feature(features, XENFEAT.hvm_callback_vector):
        vector_rc = await set_callback(k, plat.vector_callback_value())
        callback = plat.vector_callback_value() if vector_rc == 0 else 0
        if vector_rc != 0:
            k.log(
                "xen: callback vector registration failed; Falling back to emulated device interrupt"
            )
    if callback == 0:
        callback = plat.legacy_callback_value(k.cfg.platform_pci_irq)
        if (rc := await set_callback(k, callback)) != 0:
            k.log(f"xenpci: set_callback failed: {rc}")
    await register_vcpu_info(k)
    stop_rc = None
    if vector_rc == 0 and plat.has_feature(features, XENFEAT.hvm_safe_pvclock):
        stop_rc = (await k.call(VcpuOp(VCPUOP.stop_periodic_timer, 0, b""))).value
    k.platform = plat.decide(base, version, features, vector_rc, stop_rc, callback)


def cpuid_hypervisor_bit(leaf1: tuple[int, int, int, int]) -> bool:
    return bool(leaf1[2] & plat.CPUID_HYPERVISOR_BIT)


async def set_callback(k: Kernel, value: int) -> int:
    arg = hc.XenHvmParam(DOMID.SELF, HVM_PARAM.CALLBACK_IRQ, value).pack()
    return (await k.call(HvmOp(HVMOP.set_param, arg))).value


async def register_vcpu_info(k: Kernel) -> None:
    """``xen_hvm_cpu_init``: this CPU's vcpu_info to its per-CPU page, on itself;
    the shared_info slot if that fails (ids < 32 only)."""
    arg = hc.VcpuRegisterVcpuInfo(percpu_gfn(k.cpu), 0).pack()
    rc = (await k.call(VcpuOp(VCPUOP.register_vcpu_info, k.cpu, arg))).value
    if rc == 0:
        k.vcpu_info_offset = k.mem.vcpu_info_at(k.cpu)
    else:
        k.log(f"register_vcpu_info failed ({rc}): using shared_info.vcpu_info[{k.cpu}]")
        k.vcpu_info_offset = SHARED_INFO_GFN * 4096 + si.vcpu_info_offset(k.cpu)


async def cpu_init(k: Kernel) -> None:
    """Per CPU (BSP and APs, on themselves): event timer and IPI ports."""
    p = k.platform
    if not p.xen:
        k.vcpu_info_offset = SHARED_INFO_GFN * 4096 + si.vcpu_info_offset(k.cpu)
    k.attach_scanner()
    tcfg = k.cfg.timer
    if p.pv_timer:
        if k.cpu != 0:  # vCPU0's stop was the probe
            await k.call(VcpuOp(VCPUOP.stop_periodic_timer, k.cpu, b""))
        rc, out = await k.evtchn_op(EVTCHNOP.bind_virq, hc.EvtchnBindVirq(VIRQ.TIMER, k.cpu))
        if rc != 0:
            k.panic(f"bind_virq(VIRQ_TIMER, {k.cpu}) failed: {rc}")
        k.timer_port = out.port
        k.ports.add(PortBinding(out.port, "virq", VIRQ.TIMER, k.cpu, False))
        k.clock.use_pvclock()
        k.timer = XenTimer(
            k.cpu,
            k.clock,
            k.call,
            tcfg.min_period_ns,
            future=tcfg.sshot_future,
            backoff=tcfg.etime_backoff,
        )
    else:
        k.timer = LapicTimer(k.cpu, k.clock, k.call, tcfg.min_period_ns)
    await k.timer.init()
    ipi_ports = []
    if p.pv_ipi:
        for kind in IPI:
            rc, out = await k.evtchn_op(EVTCHNOP.bind_ipi, hc.EvtchnBindIpi(k.cpu))
            if rc != 0:
                k.panic(f"bind_ipi({k.cpu}) failed: {rc}")
            k.my_ipi_ports[out.port] = kind
            k.ports.add(PortBinding(out.port, "ipi", int(kind), k.cpu, False))
            ipi_ports.append(out.port)
    k.mem.publish_ports(k.cpu, k.timer_port, tuple(ipi_ports))
    k.enable_interrupts()
    k.log(
        f"cpu{k.cpu}: event timer {k.timer.kind}"
        + (f" (VIRQ_TIMER port {k.timer_port})" if k.timer_port else "")
        + (f", IPI ports {ipi_ports}" if ipi_ports else ", IPIs via the emulated APIC")
    )


async def boot_bsp(k: Kernel) -> list[int]:
    """vCPU0 from reset to SMP started; returns the device ports it allocated."""
    await detect(k)
    p = k.platform
    for reason in p.reasons:
        k.log(f"platform: {reason}")
    k.mem.write_globals(
        Globals(
            Stage.PLATFORM,
            MODES[p.mode],
            p.pv_timer | p.pv_ipi << 1 | p.pv_clock << 2 | p.xen << 3,
            p.features,
            p.version,
            k.nr_cpus,
            SHARED_INFO_GFN if p.xen else 0xFFFFFFFF,
            p.cpuid_base,
            int(k.cfg.nmi == "send_nmi"),
            1,
        )
    )
    await cpu_init(k)
    k.mem.set_cpu_state(0, CpuState.ONLINE)
    devices = await alloc_device_ports(k)
    for ap in range(1, k.nr_cpus):
        await start_ap(k, ap)
    k.refresh_percpu_ports()
    await shuffle(k, devices)
    k.mem.set_stage(Stage.SMP)
    k.log(f"SMP: {k.nr_cpus} CPUs online")
    return devices


async def alloc_device_ports(k: Kernel) -> list[int]:
    """Frontend-style ports (remote dom0) for an external event source."""
    ports = []
    if not k.platform.xen:
        return ports
    for _ in range(k.cfg.device_ports):
        rc, out = await k.evtchn_op(EVTCHNOP.alloc_unbound, hc.EvtchnAllocUnbound(DOMID.SELF, 0))
        if rc != 0:
            k.log(f"alloc_unbound failed: {rc}")
            break
        k.mem.set_port_cpus(out.port, 1)  # on vCPU0 until the shuffle
        k.ports.add(PortBinding(out.port, "device", 0, 0, True))
        ports.append(out.port)
    if ports:
        k.log(f"device ports {ports} (remote dom0), on cpu0")
    return ports


async def start_ap(k: Kernel, ap: int) -> None:
    k.mem.set_cpu_state(ap, CpuState.BOOTING)
    if k.platform.xen:
        rc = (await k.call(VcpuOp(VCPUOP.up, ap, b""))).value
        if rc != 0:
            k.panic(f"VCPUOP_up({ap}) failed: {rc}")
    else:  # INIT-SIPI on the emulated LAPIC
        await k.call(ApicAccess(APIC.ICR2, True, ap << 24))
        await k.call(ApicAccess(APIC.ICR, True, icr_startup()))
    with trio.move_on_after(AP_TIMEOUT_S):
        while k.mem.cpu_state(ap) != CpuState.ONLINE:
            await trio.sleep(0.001)
        return
    k.panic(f"cpu{ap} did not come up in {AP_TIMEOUT_S} s")


async def boot_ap(k: Kernel) -> None:
    """An AP once started: wait for the BSP's platform, initialise itself."""
    while k.mem.stage() < Stage.PLATFORM:
        await trio.sleep(0.001)
    g = k.mem.read_globals()
    assert g is not None
    k.platform = await platform_from_globals(k, g)
    if k.platform.xen:
        await register_vcpu_info(k)
    await cpu_init(k)
    k.mem.set_cpu_state(k.cpu, CpuState.ONLINE)
    k.log(f"cpu{k.cpu}: online ({k.platform.mode})")


async def platform_from_globals(k: Kernel, g: Globals) -> object:
    from services.frontend.kernel.state import PlatformDecision

    mode = {v: n for n, v in MODES.items()}[g.mode]
    return PlatformDecision(
        bool(g.flags & 8),
        g.cpuid_base,
        g.version,
        g.features,
        mode,
        0,
        bool(g.flags & 1),
        bool(g.flags & 2),
        bool(g.flags & 4),
        ("as cpu0 chose",),
    )


async def assign_cpu(k: Kernel, port: int, cpu: int) -> int:
    """``xen_intr_assign_cpu`` for a device port (vCPU0, the table's only writer):
    mask the port, ask Xen, switch the table, unmask (re-delivering if pending)."""
    binding = k.ports.get(port)
    k.refresh_percpu_ports()
    if binding is not None:
        kind = binding.kind
    elif port in k._percpu_owner:
        kind = "percpu"  # another CPU's VIRQ_TIMER or IPI port: bound to it for life
    else:
        kind = "device"
    if not balance.can_assign(kind, k.platform.mode, cpu):
        return -95  # EOPNOTSUPP
    if not balance.needs_hypercall(kind, k.platform.mode):
        return 0
    assert k.scanner is not None
    shared = k.scanner.shared
    was_masked = si.evtchn_set_mask(shared, port)
    rc, _ = await k.evtchn_op(EVTCHNOP.bind_vcpu, hc.EvtchnBindVcpu(port, cpu))
    if rc == 0:
        k.mem.set_port_cpus(port, 1 << cpu)
        if binding is not None:
            k.ports.add(PortBinding(port, kind, binding.index, cpu, True))
    if not was_masked:
        if si.evtchn_is_pending(shared, port):
            await k.evtchn_op(EVTCHNOP.unmask, hc.EvtchnUnmask(port))
        else:
            si.evtchn_clear_mask(shared, port)
    return rc


async def shuffle(k: Kernel, devices: list[int]) -> None:
    """``intr_shuffle_irqs``: round-robin, advancing on success."""
    if not devices:
        return
    if k.platform.mode != "vector":
        k.log("intr_shuffle: legacy callback, every device port stays on cpu0")
        return
    rr = balance.Shuffler(k.nr_cpus)
    for port in sorted(devices):
        cpu = rr.target()
        rc = await assign_cpu(k, port, cpu)
        rr.assigned(rc == 0)
        k.log(f"intr_shuffle: port {port} -> cpu{cpu}" + ("" if rc == 0 else f" failed {rc}"))
