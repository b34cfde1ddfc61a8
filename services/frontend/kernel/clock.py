"""The guest's clock: Xen system time from ``vcpu_time_info`` (pvclock), or
the TSC on paths without it, with FreeBSD's global monotonic clamp.

The guest TSC is ``time.monotonic_ns()`` plus the domain's time offset
(CPUID base+3 subleaf 1: offset lo/hi in EAX/EBX; 0 when absent), ticking in
guest ns. FreeBSD clamps with a compare-and-swap on one global
``xen_timer_last_time``; here no two processes may write one word, so each CPU
publishes the last value it returned in its own per-CPU word and a reader
takes the maximum over all CPUs (same guarantee: no CPU ever sees time go
back behind what any CPU has seen). :meth:`GuestClock.reset_clamp` is the
resume-time reset (Linux ``pvclock_resume``).
"""

from __future__ import annotations

import time

from services.frontend.kernel.layout import KernelMemory
from shared.abi import sharedinfo as si


class GuestClock:
    def __init__(self, mem: KernelMemory, cpu: int, tsc_offset: int = 0) -> None:
        self.mem = mem
        self.cpu = cpu
        self.tsc_offset = tsc_offset
        self.pvclock = False
        self.clamped = 0

    def rdtsc(self) -> int:
        return time.monotonic_ns() + self.tsc_offset

    def use_pvclock(self) -> None:
        self.pvclock = True

    def raw(self) -> int:
        """``xen_fetch_vcpu_time`` (seqlock read + scale) or the TSC."""
        if not self.pvclock:
            return self.rdtsc()
        info = si.read_time_info(self.mem.ram, self.mem.vcpu_info_at(self.cpu))
        if info.tsc_to_system_mul == 0:  # not published yet
            return self.rdtsc()
        return info.ns_at(self.rdtsc())

    def now(self) -> int:
        """Monotonic across all CPUs of the guest."""
        t = self.raw()
        last = max(self.mem.clamp(c) for c in range(self.mem.nr_vcpus))
        if t < last:
            self.clamped += 1
            t = last
        self.mem.set_clamp(self.cpu, t)
        return t

    def reset_clamp(self) -> None:
        self.mem.set_clamp(self.cpu, 0)
