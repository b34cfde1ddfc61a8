"""Event timers: the PV singleshot timer (FreeBSD ``XENTIMER``) and the
emulated LAPIC timer it replaces (guest-behaviour A.2, D).

Both are one-shot per CPU and armed at absolute guest time:
- :class:`XenTimer` — ``VCPUOP_set_singleshot_timer(my vcpu, now + delta,
  VCPU_SSHOTTMR_future)`` with FreeBSD's loop: on ``-ETIME`` recompute
  ``now + delta`` and retry, up to 60 tries, then panic. Expiry is VIRQ_TIMER
  on this CPU's port: no EOI. One exit per arm.
- :class:`LapicTimer` — the LVT timer programmed once (vector, one-shot,
  divide by 1), then one TMICT write per arm (1 ns bus cycles) and one EOI per
  interrupt. Two exits per event.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from services.frontend.kernel.clock import GuestClock
from services.frontend.kernel.ipi import LAPIC_TIMER_VECTOR
from services.frontend.kernel.state import EventTimerState
from services.hypervisor.lapic import APIC
from services.hypervisor.messages import ApicAccess, HypercallResult, VcpuOp
from shared.abi import hypercall as hc
from shared.abi.constants import VCPUOP, VCPU_SSHOTTMR_future, XenErrno, xen_error

ETIME = xen_error(XenErrno.ETIME)
MAX_TRIES = 60
TDCR_DIVIDE_BY_1 = 0xB
TMICT_MAX = 0xFFFFFFFF

Hypercall = Callable[[object], Awaitable[HypercallResult]]


class TimerPanic(RuntimeError):
    """FreeBSD panics when the singleshot timer cannot be armed."""


class EventTimer:
    kind = "none"

    def __init__(self, cpu: int, clock: GuestClock, call: Hypercall, min_period_ns: int) -> None:
        self.cpu = cpu
        self.clock = clock
        self.call = call
        self.min_period_ns = min_period_ns
        self.armed: int | None = None
        self.arms = 0
        self.events = 0
        self.etime_retries = 0
        self.max_retries = 0

    async def init(self) -> None:
        pass

    async def start(self, deadline: int) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def fired(self) -> None:
        self.events += 1
        self.armed = None

    def state(self) -> EventTimerState:
        return EventTimerState(
            self.kind, self.armed, self.arms, self.events, self.etime_retries, self.max_retries
        )


class XenTimer(EventTimer):
    kind = "xentimer"

    def __init__(
        self, *args: object, future: bool = True, backoff: bool = False, **kw: object
    ) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.future = future
        self.backoff = backoff  # not FB10: double delta after each -ETIME (a slow host)

    async def start(self, deadline: int) -> None:
        delta = max(deadline - self.clock.now(), 1)
        flags = VCPU_SSHOTTMR_future if self.future else 0
        tries = 0
        for tries in range(1, MAX_TRIES + 1):  # noqa: B007 - read after the loop
            target = self.clock.now() + delta
            arg = hc.VcpuSetSingleshotTimer(target, flags).pack()
            rc = (await self.call(VcpuOp(VCPUOP.set_singleshot_timer, self.cpu, arg))).value
            if rc != ETIME:
                break
            self.etime_retries += 1
            if self.backoff:
                delta *= 2
        else:
            raise TimerPanic(f"xentimer: cannot arm after {MAX_TRIES} -ETIME answers")
        self.max_retries = max(self.max_retries, tries - 1)
        if rc != 0:
            raise TimerPanic(f"xentimer: set_singleshot_timer failed: {rc}")
        self.arms += 1
        self.armed = target

    async def stop(self) -> None:
        self.armed = None
        await self.call(VcpuOp(VCPUOP.stop_singleshot_timer, self.cpu, b""))


class LapicTimer(EventTimer):
    kind = "lapic"

    async def init(self) -> None:
        await self.call(ApicAccess(APIC.TDCR, True, TDCR_DIVIDE_BY_1))
        await self.call(ApicAccess(APIC.LVTT, True, LAPIC_TIMER_VECTOR))  # one-shot, unmasked

    async def start(self, deadline: int) -> None:
        count = min(max(deadline - self.clock.now(), 1), TMICT_MAX)
        await self.call(ApicAccess(APIC.TMICT, True, count))
        self.arms += 1
        self.armed = deadline

    async def stop(self) -> None:
        self.armed = None
        await self.call(ApicAccess(APIC.TMICT, True, 0))
