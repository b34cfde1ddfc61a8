"""Inter-processor interrupts, PV and emulated (guest-behaviour A.3), sans-IO.

The IPI set is FreeBSD amd64's ``xen_ipis[]``: with the vector callback each
CPU binds one event channel per kind (``EVTCHNOP_bind_ipi``) and a send is
``EVTCHNOP_send`` on the target's port; otherwise a send is an ICR write on
the emulated LAPIC and every receipt an EOI. STOP_HARD is the "NMI": over an
event channel it is maskable (FB10's bug), with ``VCPUOP_send_nmi`` (or an
ICR write in NMI delivery mode) it is not.

Several sends to one port before the target takes its upcall merge into one
handler run, so the payload never rides on the interrupt itself:
- BITMAP sub-IPIs (AST, PREEMPT, HARDCLOCK, ...) are per-(sender, receiver,
  bit) counters that only the sender bumps (:func:`take_bitmap` compares them
  with what the receiver has seen: every sub-IPI is counted, none lost);
- call-function work (RENDEZVOUS, the TLB shoot-downs) goes through the
  per-(sender, receiver) mailbox rings of :mod:`.layout`.
"""

from __future__ import annotations

import enum

from services.frontend.kernel.layout import NR_BITMAP_BITS, KernelMemory


class IPI(enum.IntEnum):
    """FreeBSD amd64 ``xen_ipis[]`` order; the value indexes a CPU's IPI ports."""

    RENDEZVOUS = 0
    INVLTLB = 1
    INVLPG = 2
    INVLRNG = 3
    INVLCACHE = 4
    BITMAP = 5
    STOP = 6
    SUSPEND = 7
    STOP_HARD = 8


NR_IPIS = len(IPI)
CALL_FUNCTION_IPIS = frozenset({IPI.RENDEZVOUS, IPI.INVLTLB, IPI.INVLPG, IPI.INVLRNG})


class IPI_BITMAP(enum.IntEnum):  # noqa: N801 - FreeBSD's name
    """Sub-IPIs multiplexed on IPI_BITMAP."""

    AST = 0
    PREEMPT = 1
    HARDCLOCK = 2
    PING = 3


class FUNC(enum.IntEnum):
    """What a mailbox slot asks the receiver to do."""

    PING = 1  #: answer PONG to the sender with the same stamp
    PONG = 2  #: a PING came back: round trip done
    RENDEZVOUS = 3  #: run the rendezvous action, then ACK
    ACK = 4  #: a RENDEZVOUS target finished
    INVLTLB = 5  #: flush (counted)


# Emulated delivery: the IDT vector of each IPI on the LAPIC (FreeBSD's
# APIC_IPI_INTS block) and of the LAPIC timer.
LAPIC_TIMER_VECTOR = 0xEF
IPI_VECTOR_BASE = 0xF0
NMI_VECTOR = 2
APIC_DM_FIXED, APIC_DM_NMI, APIC_DM_STARTUP = 0, 4, 6
APIC_DEST_SELF, APIC_DEST_ALLISELF, APIC_DEST_ALLBUT = 1, 2, 3
TRAMPOLINE_PAGE = 0x9F  # SIPI vector: the AP starts at page 0x9F000


def vector_of(ipi: IPI) -> int:
    return IPI_VECTOR_BASE + int(ipi)


def ipi_of_vector(vector: int) -> IPI | None:
    k = vector - IPI_VECTOR_BASE
    return IPI(k) if 0 <= k < NR_IPIS and IPI(k) is not IPI.STOP_HARD else None


def icr_fixed(vector: int, shorthand: int = 0) -> int:
    return vector | APIC_DM_FIXED << 8 | shorthand << 18


def icr_nmi(shorthand: int = 0) -> int:
    return NMI_VECTOR | APIC_DM_NMI << 8 | shorthand << 18


def icr_startup(page: int = TRAMPOLINE_PAGE) -> int:
    return page | APIC_DM_STARTUP << 8


def targets(dest: str | int, me: int, nr_cpus: int) -> list[int]:
    """``dest`` as FreeBSD's ``ipi_*`` calls name it: ``all``, ``others``, ``self`` or a CPU."""
    if dest == "all":
        return list(range(nr_cpus))
    if dest == "others":
        return [c for c in range(nr_cpus) if c != me]
    if dest == "self":
        return [me]
    cpu = int(dest)
    if not 0 <= cpu < nr_cpus:
        raise ValueError(f"no CPU {cpu}")
    return [cpu]


def take_bitmap(mem: KernelMemory, me: int) -> dict[int, int]:
    """The receiver's IPI_BITMAP handler: sub-IPIs sent to ``me`` since last time,
    per bit, summed over senders; ``seen`` is advanced (only ``me`` writes it)."""
    got: dict[int, int] = {}
    for sender in range(mem.nr_vcpus):
        for bit in range(NR_BITMAP_BITS):
            sent, seen = mem.sent(sender, me, bit), mem.seen(me, sender, bit)
            if sent != seen:
                got[bit] = got.get(bit, 0) + ((sent - seen) & 0xFFFFFFFF)
                mem.set_seen(me, sender, bit, sent)
    return got


def take_mailboxes(mem: KernelMemory, me: int) -> list[tuple[int, tuple[int, int, int, int, int]]]:
    """Every call-function slot waiting for ``me``, as ``(sender, slot)``."""
    out = []
    for sender in range(mem.nr_vcpus):
        prod, cons = mem.ring_indices(sender, me)
        if prod != cons:
            out += [(sender, slot) for slot in mem.ring_take(sender, me)]
    return out
