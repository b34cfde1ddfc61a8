"""Boot-time platform detection (guest-behaviour A.0, xen-reference 10): the
decision tree of a GENERIC kernel, as pure functions over what the probes
answered. The probes themselves (CPUID exits, hypercalls) are made by
:mod:`.boot`; this module only reads their answers and says what to use and why.
"""

from __future__ import annotations

import struct

from services.frontend.kernel.state import PlatformDecision
from shared.abi.constants import (
    XEN_CPUID_FIRST_LEAF,
    XEN_CPUID_SIGNATURE_EBX,
    XEN_CPUID_SIGNATURE_ECX,
    XEN_CPUID_SIGNATURE_EDX,
    XENFEAT,
)

CPUID_HYPERVISOR_BIT = 1 << 31  # leaf 1 ECX: "running under a hypervisor"
CPUID_SCAN_LEAVES = 256  # base 0x40000000 + 0x100*k, k = 0..255
IDT_EVTCHN = 0x93  # FreeBSD's vector for the Xen upcall
HVM_CALLBACK_VECTOR = 2 << 56
HVM_CALLBACK_PCI_INTX = 1 << 56
PLATFORM_PCI_SLOT = 3  # the Xen platform device (5853:0001) on qemu's bus
_REGS = struct.Struct("<4I")


def regs(data: bytes) -> tuple[int, int, int, int]:
    """EAX..EDX of a CPUID answer."""
    return _REGS.unpack(data[: _REGS.size])


def scan_leaf(k: int) -> int:
    return XEN_CPUID_FIRST_LEAF + 0x100 * k


def is_xen_leaf(leaf: int, answer: tuple[int, int, int, int]) -> bool:
    """``XenVMMXenVMM`` in EBX/ECX/EDX and at least base+2 present."""
    eax, ebx, ecx, edx = answer
    signature = (ebx, ecx, edx) == (
        XEN_CPUID_SIGNATURE_EBX,
        XEN_CPUID_SIGNATURE_ECX,
        XEN_CPUID_SIGNATURE_EDX,
    )
    return signature and eax - leaf >= 2


def version_string(eax: int) -> str:
    return f"{eax >> 16}.{eax & 0xFFFF}"


def has_feature(features: int, bit: XENFEAT) -> bool:
    return bool(features >> bit & 1)


def vector_callback_value(vector: int = IDT_EVTCHN) -> int:
    """``HVM_CALLBACK_VECTOR(vector)``: type 2 in bits 63:56."""
    return HVM_CALLBACK_VECTOR | vector


def legacy_callback_value(pci_irq: int, slot: int = PLATFORM_PCI_SLOT, pin: int = 1) -> int:
    """FreeBSD ``xenpci``: ``HVM_CALLBACK_GSI(irq)`` when the platform device's
    IRQ is below 16, else ``HVM_CALLBACK_PCI_INTX(slot, pin - 1)``."""
    if 0 < pci_irq < 16:
        return pci_irq
    devfn = slot << 3
    return HVM_CALLBACK_PCI_INTX | devfn << 8 | (pin - 1) & 3


def bare() -> PlatformDecision:
    return PlatformDecision(
        False,
        0,
        0,
        0,
        "bare",
        0,
        False,
        False,
        False,
        ("no XenVMMXenVMM CPUID leaf: bare-metal paths (LAPIC timer, APIC IPIs), no hypercalls",),
    )


def decide(
    base: int,
    version: int,
    features: int,
    vector_rc: int | None,
    stop_periodic_rc: int | None,
    callback: int,
) -> PlatformDecision:
    """The A.0 tree once the probes ran. ``vector_rc`` is the answer to
    ``set_param(CALLBACK_IRQ, vector)`` (None: not tried because feature 8 is
    off); ``stop_periodic_rc`` that of ``VCPUOP_stop_periodic_timer(0)`` (None:
    not probed); ``callback`` the value finally set."""
    reasons = [f"Xen {version_string(version)} at CPUID {base:#x}, features {features:#010x}"]
    vector = vector_rc == 0
    if vector_rc is None:
        reasons.append("XENFEAT_hvm_callback_vector=0: legacy GSI/INTx callback, all on vCPU0")
    elif not vector:
        reasons.append(
            f"callback vector registration failed ({vector_rc}): "
            "falling back to emulated device interrupt"
        )
    else:
        reasons.append(f"vector callback {IDT_EVTCHN:#x}: per-vCPU event delivery")
    pv_clock = has_feature(features, XENFEAT.hvm_safe_pvclock)
    pv_ipi = vector
    if not vector:
        reasons.append("vector callbacks unavailable: emulated LAPIC timer and APIC IPIs")
        pv_timer = False
    elif not pv_clock:
        reasons.append("XENFEAT_hvm_safe_pvclock=0: emulated LAPIC timer, PV IPIs")
        pv_timer = False
    elif stop_periodic_rc != 0:
        reasons.append(f"VCPUOP_stop_periodic_timer(0) = {stop_periodic_rc}: emulated timer")
        pv_timer = False
    else:
        reasons.append("PV timer XENTIMER (singleshot + VIRQ_TIMER), PV IPIs")
        pv_timer = True
    return PlatformDecision(
        True,
        base,
        version,
        features,
        "vector" if vector else "legacy",
        callback,
        pv_timer,
        pv_ipi,
        pv_clock,
        tuple(reasons),
    )
