"""Exit and upcall accounting per vCPU: the numbers the FreeBSD 10 comparison
rests on (guest-behaviour D). An *exit* is one guest -> hypervisor transition:
a hypercall (reason ``"hypercall:<name>"``, e.g. ``"hypercall:event_channel_op.send"``),
a LAPIC register access (``"eoi"``, ``"icr_write"``, ``"lapic_timer_write"``,
...), a CPUID. Injections are not exits; upcalls delivered are counted apart.
The adapter measures the handling time and passes it in (the core reads no clock).
"""

from __future__ import annotations

import collections

import attrs

from shared.codec import message


@message(227)
class VcpuStats:
    """One vCPU's counters."""

    domid: int
    vcpu: int
    exits: dict[str, int]  #: by reason
    upcalls: int  #: event-channel upcalls and LAPIC interrupts delivered
    handling_ns: int  #: total time the hypervisor spent handling its exits


@message(228)
class AccountingStats:
    vcpus: tuple[VcpuStats, ...]


@attrs.define
class _Counters:
    exits: collections.Counter[str] = attrs.Factory(collections.Counter)
    upcalls: int = 0
    handling_ns: int = 0


class Accounting:
    """Counters per (domain, vCPU)."""

    def __init__(self) -> None:
        self._vcpus: dict[tuple[int, int], _Counters] = {}

    def record_exit(self, domid: int, vcpu: int, reason: str, handling_ns: int = 0) -> None:
        c = self._counters(domid, vcpu)
        c.exits[reason] += 1
        c.handling_ns += max(0, handling_ns)

    def record_upcall(self, domid: int, vcpu: int) -> None:
        self._counters(domid, vcpu).upcalls += 1

    def remove_domain(self, domid: int) -> None:
        for key in [k for k in self._vcpus if k[0] == domid]:
            del self._vcpus[key]

    def vcpu(self, domid: int, vcpu: int) -> VcpuStats:
        c = self._counters(domid, vcpu)
        return VcpuStats(domid, vcpu, dict(c.exits), c.upcalls, c.handling_ns)

    def statistics(self) -> AccountingStats:
        return AccountingStats(tuple(self.vcpu(d, v) for d, v in sorted(self._vcpus)))

    def _counters(self, domid: int, vcpu: int) -> _Counters:
        c = self._vcpus.get((domid, vcpu))
        if c is None:
            c = self._vcpus[domid, vcpu] = _Counters()
        return c
