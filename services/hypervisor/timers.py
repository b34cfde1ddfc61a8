"""PV timers of every vCPU of a host, and guest system time (xen-reference 9).

Guest system time is host ``CLOCK_MONOTONIC`` nanoseconds plus a per-domain
offset (:class:`GuestClock`; the host-time function is injected so tests use a
fake clock and migration can set the offset). Each vCPU has one singleshot
timer (``VCPUOP_set_singleshot_timer``, also driven by the legacy
``set_timer_op``) and one periodic timer. :class:`Timers` keeps them in a heap
keyed by host time: the adapter sleeps until :meth:`Timers.next_deadline` and
calls :meth:`Timers.expire`, which returns :class:`TimerFired` records; the
host turns each into ``VIRQ_TIMER`` on that vCPU through the evtchn core.

A singleshot deadline already in the past depends on the host setting
``sshot_past``: ``"etime"`` (Xen 4.17 as released) answers ``-ETIME`` and arms
nothing when the guest passed ``VCPU_SSHOTTMR_future``; ``"fire"`` (Xen 4.18,
4.17.3+) ignores the flag. Either way a past deadline that is accepted fires
at once (the returned ``fired`` tuple), as Xen's ``set_timer`` in the past does.
"""

from __future__ import annotations

import collections
import heapq
import itertools
from collections.abc import Callable
from typing import Literal

import attrs

from services.hypervisor.timers_state import TimerFired, TimersState, TimerStats, VcpuTimers
from shared.abi.constants import VCPU_SSHOTTMR_future, XenErrno, xen_error

MIN_PERIOD_NS = 1_000_000  # VCPUOP_set_periodic_timer refuses < 1 ms
STIME_DELTA_MAX = 2**63 - 1
SET_TIMER_OP_MAX_AHEAD = 1 << 50  # do_set_timer_op clamps deadlines further away
SINGLESHOT, PERIODIC = "singleshot", "periodic"
SshotPast = Literal["etime", "fire"]


class GuestClock:
    """Guest system time per domain: ``host_now() + offset(domid)``."""

    def __init__(self, host_now: Callable[[], int]) -> None:
        self.host_now = host_now
        self._offsets: dict[int, int] = {}

    def add_domain(self, domid: int, offset: int = 0) -> None:
        self._offsets[domid] = offset

    def remove_domain(self, domid: int) -> None:
        self._offsets.pop(domid, None)

    def set_offset(self, domid: int, offset: int) -> None:
        """Migration: chosen so guest time continues from the source's."""
        self._offsets[domid] = offset

    def offset(self, domid: int) -> int:
        return self._offsets[domid]

    def now(self, domid: int) -> int:
        return self.host_now() + self._offsets[domid]


@attrs.define
class _Armed:
    deadline: int  # guest ns
    seq: int
    period: int = 0


class Timers:
    """Singleshot and periodic timers of all vCPUs, ordered by host deadline."""

    def __init__(self, clock: GuestClock, sshot_past: SshotPast = "fire") -> None:
        if sshot_past not in ("etime", "fire"):
            raise ValueError("sshot_past is 'etime' or 'fire'")
        self.clock = clock
        self.sshot_past = sshot_past
        self._armed: dict[tuple[int, int, str], _Armed] = {}
        self._heap: list[tuple[int, int, int, int, str]] = []  # host ns, seq, dom, vcpu, kind
        self._seq = itertools.count()
        self._fired: collections.Counter[str] = collections.Counter()

    # --- VCPUOP_* and set_timer_op (vCPU checks are the dispatcher's) ------------------------

    def set_singleshot(
        self, domid: int, caller_vcpu: int, vcpu: int, timeout_abs_ns: int, flags: int = 0
    ) -> tuple[int, tuple[TimerFired, ...]]:
        if vcpu != caller_vcpu:
            return xen_error(XenErrno.EINVAL), ()
        if timeout_abs_ns < self.clock.now(domid):
            if self.sshot_past == "etime" and flags & VCPU_SSHOTTMR_future:
                return xen_error(XenErrno.ETIME), ()  # the old timer stays as it was
            self._disarm(domid, vcpu, SINGLESHOT)
            return 0, (self._fire(domid, vcpu, SINGLESHOT),)
        self._arm(domid, vcpu, SINGLESHOT, timeout_abs_ns)
        return 0, ()

    def stop_singleshot(self, domid: int, caller_vcpu: int, vcpu: int) -> int:
        if vcpu != caller_vcpu:
            return xen_error(XenErrno.EINVAL)
        self._disarm(domid, vcpu, SINGLESHOT)
        return 0

    def set_timer_op(
        self, domid: int, vcpu: int, timeout_abs_ns: int
    ) -> tuple[int, tuple[TimerFired, ...]]:
        """Legacy ``__HYPERVISOR_set_timer_op``: the caller's singleshot; 0 cancels."""
        if timeout_abs_ns == 0:
            self._disarm(domid, vcpu, SINGLESHOT)
            return 0, ()
        now = self.clock.now(domid)
        if timeout_abs_ns - now > SET_TIMER_OP_MAX_AHEAD:
            timeout_abs_ns = now + SET_TIMER_OP_MAX_AHEAD  # a buggy guest's huge value
        return self.set_singleshot(domid, vcpu, vcpu, timeout_abs_ns)

    def set_periodic(self, domid: int, vcpu: int, period_ns: int) -> int:
        if not MIN_PERIOD_NS <= period_ns <= STIME_DELTA_MAX:
            return xen_error(XenErrno.EINVAL)
        self._arm(domid, vcpu, PERIODIC, self.clock.now(domid) + period_ns, period_ns)
        return 0

    def stop_periodic(self, domid: int, vcpu: int) -> int:
        self._disarm(domid, vcpu, PERIODIC)
        return 0

    # --- the adapter's loop -------------------------------------------------------------------

    def next_deadline(self) -> int | None:
        """Host-monotonic ns of the earliest armed timer, or None."""
        while self._heap and not self._current(self._heap[0]):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def expire(self, host_now_ns: int) -> list[TimerFired]:
        """Every timer due at ``host_now_ns``, in deadline order; periodic timers
        re-arm one period after now (Xen does not replay missed periods)."""
        fired = []
        while self._heap and self._heap[0][0] <= host_now_ns:
            entry = heapq.heappop(self._heap)
            if not self._current(entry):
                continue
            _, _, domid, vcpu, kind = entry
            armed = self._armed.pop((domid, vcpu, kind))
            fired.append(self._fire(domid, vcpu, kind))
            if armed.period:  # next period counts from the expiry time, never earlier
                now = host_now_ns + self.clock.offset(domid)
                self._arm(domid, vcpu, kind, now + armed.period, armed.period)
        return fired

    def remove_domain(self, domid: int) -> None:
        for key in [k for k in self._armed if k[0] == domid]:
            del self._armed[key]

    def armed_count(self, domid: int) -> int:
        return sum(1 for key in self._armed if key[0] == domid)

    def armed(self, domid: int, vcpu: int) -> tuple[int | None, int | None]:
        """(singleshot deadline, periodic next deadline) in guest ns, for introspection."""
        s = self._armed.get((domid, vcpu, SINGLESHOT))
        p = self._armed.get((domid, vcpu, PERIODIC))
        return (s.deadline if s else None, p.deadline if p else None)

    # --- migration ----------------------------------------------------------------------------

    def export_state(self, domid: int, nr_vcpus: int) -> TimersState:
        """Deadlines as time remaining, so the destination re-arms them from its
        own clock (``new_deadline = new_now + remaining``)."""
        now = self.clock.now(domid)
        vcpus = []
        for v in range(nr_vcpus):
            s = self._armed.get((domid, v, SINGLESHOT))
            p = self._armed.get((domid, v, PERIODIC))
            vcpus.append(
                VcpuTimers(
                    v,
                    None if s is None else s.deadline - now,
                    0 if p is None else p.period,
                    None if p is None else p.deadline - now,
                )
            )
        return TimersState(domid, tuple(vcpus))

    def import_state(self, state: TimersState) -> None:
        now = self.clock.now(state.domid)
        for t in state.vcpus:
            if t.singleshot_remaining is not None:
                self._arm(state.domid, t.vcpu, SINGLESHOT, now + t.singleshot_remaining)
            if t.periodic_remaining is not None:
                deadline = now + t.periodic_remaining
                self._arm(state.domid, t.vcpu, PERIODIC, deadline, t.periodic_period)

    def statistics(self) -> TimerStats:
        kinds = collections.Counter(k[2] for k in self._armed)
        return TimerStats(kinds[SINGLESHOT], kinds[PERIODIC], dict(self._fired))

    # --- internals ----------------------------------------------------------------------------

    def _arm(self, domid: int, vcpu: int, kind: str, deadline: int, period: int = 0) -> None:
        seq = next(self._seq)
        self._armed[(domid, vcpu, kind)] = _Armed(deadline, seq, period)
        host = deadline - self.clock.offset(domid)
        heapq.heappush(self._heap, (host, seq, domid, vcpu, kind))

    def _disarm(self, domid: int, vcpu: int, kind: str) -> None:
        self._armed.pop((domid, vcpu, kind), None)  # its heap entry goes stale

    def _current(self, entry: tuple[int, int, int, int, str]) -> bool:
        _, seq, domid, vcpu, kind = entry
        armed = self._armed.get((domid, vcpu, kind))
        return armed is not None and armed.seq == seq

    def _fire(self, domid: int, vcpu: int, kind: str) -> TimerFired:
        self._fired[kind] += 1
        return TimerFired(domid, vcpu, kind)
