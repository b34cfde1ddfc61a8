"""The emulated local APIC every personality provides: the LAPIC timer and IPIs.

This is the path the PV timer and PV IPIs replace (guest-behaviour D): arming
the LAPIC timer is a write of the LVT timer and initial-count registers, an
IPI is a write of ICR, and every interrupt they raise must be EOI'd — each of
those register accesses is a VM exit, which the dispatcher counts with the
reason :func:`exit_reason` gives.

Model (xAPIC register offsets, Xen's vlapic bus clock of 1 GHz): per vCPU an
IRR and an ISR (sets of vectors); an interrupt is injected when its priority
class (vector >> 4) is above the highest in service, and waits in IRR
otherwise; EOI retires the highest in-service vector and injects what waits.
Interrupts delivered through the vLAPIC from elsewhere (the per-vCPU event
channel upcall vector, the GSI callback) are recorded with
:meth:`Lapics.accept_external` so an EOI retires them in the right order.
The APIC id of a vCPU is its vCPU id. Time is host-monotonic ns, injected.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import attrs

from services.hypervisor.effects import ApicInterrupt, Effects


class APIC(enum.IntEnum):
    """xAPIC register offsets (``APIC_*`` in Linux/Xen ``apicdef.h``)."""

    ID = 0x020
    EOI = 0x0B0
    ICR = 0x300  #: ICR low: writing it sends the IPI
    ICR2 = 0x310  #: ICR high: destination in bits 31:24
    LVTT = 0x320  #: LVT timer: vector, mask, mode
    TMICT = 0x380  #: initial count
    TMCCT = 0x390  #: current count (read-only)
    TDCR = 0x3E0  #: divide configuration


APIC_LVT_MASKED = 1 << 16
APIC_TIMER_MODE_SHIFT = 17  # bits 18:17 -- 0 one-shot, 1 periodic, 2 TSC-deadline
APIC_TIMER_PERIODIC = 1
APIC_DM_FIXED, APIC_DM_NMI = 0, 4
APIC_DEST_LOGICAL = 1 << 11
APIC_SHORTHAND_SHIFT = 18  # 0 none, 1 self, 2 all including self, 3 all excluding self
APIC_BROADCAST = 0xFF
APIC_BUS_CYCLE_NS = 1
NMI_VECTOR = 2

_TIMER_REGS = frozenset({APIC.LVTT, APIC.TMICT, APIC.TDCR})


def exit_reason(reg: int, write: bool) -> str:
    """The accounting reason of one LAPIC register access."""
    if write and reg == APIC.EOI:
        return "eoi"
    if write and reg in (APIC.ICR, APIC.ICR2):
        return "icr_write"
    if write and reg in _TIMER_REGS:
        return "lapic_timer_write"
    return "lapic_write" if write else "lapic_read"


def divisor(tdcr: int) -> int:
    """Divide configuration register: bits 0,1,3 encode 2,4,...,128 and 1."""
    code = (tdcr & 3) | ((tdcr & 8) >> 1)
    return 1 << ((code + 1) & 7)


@attrs.define(eq=False)
class LocalApic:
    """One vCPU's LAPIC registers and interrupt state."""

    vcpu: int
    lvtt: int = APIC_LVT_MASKED
    tmict: int = 0
    tdcr: int = 0
    icr2: int = 0
    timer_start: int = 0
    deadline: int | None = None  # host ns of the next timer expiry
    irr: set[int] = attrs.Factory(set)
    isr: set[int] = attrs.Factory(set)

    @property
    def period(self) -> int:
        return self.tmict * divisor(self.tdcr) * APIC_BUS_CYCLE_NS

    @property
    def periodic(self) -> bool:
        return (self.lvtt >> APIC_TIMER_MODE_SHIFT) & 3 == APIC_TIMER_PERIODIC


class Lapics:
    """The LAPICs of every vCPU of a host."""

    def __init__(self, host_now: Callable[[], int]) -> None:
        self.host_now = host_now
        self._apics: dict[int, list[LocalApic]] = {}

    def add_domain(self, domid: int, nr_vcpus: int) -> None:
        self._apics[domid] = [LocalApic(v) for v in range(nr_vcpus)]

    def remove_domain(self, domid: int) -> None:
        self._apics.pop(domid, None)

    def has_domain(self, domid: int) -> bool:
        return domid in self._apics

    def apic(self, domid: int, vcpu: int) -> LocalApic:
        return self._apics[domid][vcpu]

    # --- register accesses (each one an exit) -----------------------------------------------

    def read(self, domid: int, vcpu: int, reg: int) -> int:
        a = self._apics[domid][vcpu]
        match reg:
            case APIC.ID:
                return vcpu << 24
            case APIC.LVTT:
                return a.lvtt
            case APIC.TMICT:
                return a.tmict
            case APIC.TMCCT:
                return self._current_count(a)
            case APIC.TDCR:
                return a.tdcr
            case APIC.ICR2:
                return a.icr2
        return 0

    def write(self, domid: int, vcpu: int, reg: int, value: int) -> Effects:
        a = self._apics[domid][vcpu]
        value &= 0xFFFFFFFF
        match reg:
            case APIC.EOI:
                return self.eoi(domid, vcpu)[1]
            case APIC.ICR:
                return self._send_ipi(domid, vcpu, value)
            case APIC.ICR2:
                a.icr2 = value
            case APIC.LVTT:
                a.lvtt = value & (0xFF | APIC_LVT_MASKED | 3 << APIC_TIMER_MODE_SHIFT)
            case APIC.TMICT:
                a.tmict = value
                a.timer_start = self.host_now()
                a.deadline = a.timer_start + a.period if value else None
            case APIC.TDCR:
                a.tdcr = value & 0xB
        return ()

    def eoi(self, domid: int, vcpu: int) -> tuple[int | None, Effects]:
        """Retire the highest in-service vector; returns it (None if none) and the
        interrupt that was waiting for it, if any."""
        a = self._apics[domid][vcpu]
        if not a.isr:
            return None, ()
        vector = max(a.isr)
        a.isr.discard(vector)
        return vector, self._inject(domid, a)

    def accept_external(self, domid: int, vcpu: int, vector: int) -> None:
        """An interrupt injected through the vLAPIC by another path is in service."""
        self._apics[domid][vcpu].isr.add(vector)

    def raise_irq(self, domid: int, vcpu: int, vector: int) -> Effects:
        a = self._apics[domid][vcpu]
        a.irr.add(vector)
        return self._inject(domid, a)

    # --- the timer ---------------------------------------------------------------------------

    def next_deadline(self) -> int | None:
        deadlines = [a.deadline for apics in self._apics.values() for a in apics if a.deadline]
        return min(deadlines, default=None)

    def expire(self, host_now_ns: int) -> Effects:
        effects: Effects = ()
        for domid, apics in self._apics.items():
            for a in apics:
                if a.deadline is None or a.deadline > host_now_ns:
                    continue
                if a.periodic and a.period:
                    while a.deadline <= host_now_ns:  # missed periods merge, as in IRR
                        a.deadline += a.period
                else:
                    a.deadline = None
                if not a.lvtt & APIC_LVT_MASKED:
                    effects += self.raise_irq(domid, a.vcpu, a.lvtt & 0xFF)
        return effects

    # --- internals ---------------------------------------------------------------------------

    def _current_count(self, a: LocalApic) -> int:
        if a.deadline is None or not a.period:
            return 0
        left = max(0, a.deadline - self.host_now())
        return (left % a.period if a.periodic else left) // (divisor(a.tdcr) * APIC_BUS_CYCLE_NS)

    def ipi_targets(self, domid: int, vcpu: int, icr: int) -> list[int]:
        """The vCPUs an ICR write of ``vcpu`` addresses (shorthand, logical or
        physical destination in ICR2)."""
        apics = self._apics[domid]
        shorthand = (icr >> APIC_SHORTHAND_SHIFT) & 3
        dest = apics[vcpu].icr2 >> 24
        if shorthand == 1:
            return [vcpu]
        if shorthand in (2, 3):
            return [v for v in range(len(apics)) if shorthand == 2 or v != vcpu]
        if icr & APIC_DEST_LOGICAL:  # flat logical model: bit n is vCPU n
            return [v for v in range(min(len(apics), 8)) if dest >> v & 1]
        if dest == APIC_BROADCAST:
            return list(range(len(apics)))
        return [dest] if dest < len(apics) else []

    def _send_ipi(self, domid: int, vcpu: int, icr: int) -> Effects:
        targets = self.ipi_targets(domid, vcpu, icr)
        mode, vector = (icr >> 8) & 7, icr & 0xFF
        if mode == APIC_DM_NMI:
            return tuple(ApicInterrupt(domid, t, NMI_VECTOR, nmi=True) for t in targets)
        if mode != APIC_DM_FIXED or vector < 16:
            return ()  # INIT/SIPI/SMI are not modelled; vectors < 16 are illegal
        effects: Effects = ()
        for t in targets:
            effects += self.raise_irq(domid, t, vector)
        return effects

    def _inject(self, domid: int, a: LocalApic) -> Effects:
        effects: Effects = ()
        while a.irr:
            vector = max(a.irr)
            if a.isr and vector >> 4 <= max(a.isr) >> 4:
                break
            a.irr.discard(vector)
            a.isr.add(vector)
            effects += (ApicInterrupt(domid, a.vcpu, vector),)
        return effects
