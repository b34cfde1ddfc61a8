"""Records of the timer core: expiries, per-vCPU timer state that migrates (as
time remaining, never as absolute deadlines) and the counters."""

from __future__ import annotations

from shared.codec import message


@message(225)
class TimerFired:
    """A timer of ``vcpu`` expired: raise ``VIRQ_TIMER`` on that vCPU."""

    domid: int
    vcpu: int
    kind: str  #: "singleshot" or "periodic"


@message(226)
class TimerStats:
    singleshot_armed: int
    periodic_armed: int
    fired: dict[str, int]  #: by kind


@message(252)
class VcpuTimers:
    """One vCPU's timers relative to guest time now (negative = overdue)."""

    vcpu: int
    singleshot_remaining: int | None
    periodic_period: int
    periodic_remaining: int | None


@message(253)
class TimersState:
    domid: int
    vcpus: tuple[VcpuTimers, ...]
