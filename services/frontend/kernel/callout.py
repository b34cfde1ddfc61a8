"""The per-CPU callout wheel (FreeBSD ``kern_timeout.c``, reduced): callouts
keyed by absolute guest time, a tickless event timer armed at the earliest.

Sans-IO: :meth:`CalloutWheel.reset` / :meth:`stop` say whether the earliest
deadline changed (the caller re-arms its event timer), :meth:`expire` hands
back the callouts due at ``now``. The wheel is plain data
(:meth:`CalloutWheel.state`) so it survives a checkpoint.
"""

from __future__ import annotations

import heapq

from services.frontend.kernel.state import CalloutRecord, CalloutWheelState


class CalloutWheel:
    """Pending callouts of one CPU, by deadline (guest ns); ids are the caller's."""

    def __init__(self, cpu: int) -> None:
        self.cpu = cpu
        self._deadline: dict[int, int] = {}  # id -> deadline
        self._kind: dict[int, str] = {}
        self._heap: list[tuple[int, int]] = []
        self.fired = 0

    def __len__(self) -> int:
        return len(self._deadline)

    def __contains__(self, cid: int) -> bool:
        return cid in self._deadline

    def next_deadline(self) -> int | None:
        while self._heap and self._deadline.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)  # stale entry of a reset or stopped callout
        return self._heap[0][0] if self._heap else None

    def reset(self, cid: int, deadline: int, kind: str = "") -> bool:
        """``callout_reset``: (re)schedule ``cid``; True when the earliest deadline moved."""
        before = self.next_deadline()
        self._deadline[cid] = deadline
        self._kind[cid] = kind
        heapq.heappush(self._heap, (deadline, cid))
        return self.next_deadline() != before

    def stop(self, cid: int) -> bool:
        """``callout_stop``: True when the earliest deadline moved."""
        before = self.next_deadline()
        if self._deadline.pop(cid, None) is None:
            return False
        self._kind.pop(cid, None)
        return self.next_deadline() != before

    def expire(self, now: int) -> list[tuple[int, int, str]]:
        """Every callout due at ``now`` as ``(id, deadline, kind)``, earliest first."""
        due = []
        while (d := self.next_deadline()) is not None and d <= now:
            _, cid = heapq.heappop(self._heap)
            self._deadline.pop(cid)
            due.append((cid, d, self._kind.pop(cid, "")))
        self.fired += len(due)
        return due

    def state(self) -> CalloutWheelState:
        pending = tuple(
            CalloutRecord(cid, d, self._kind.get(cid, ""))
            for cid, d in sorted(self._deadline.items())
        )
        return CalloutWheelState(self.cpu, pending, self.fired)

    @classmethod
    def from_state(cls, state: CalloutWheelState) -> CalloutWheel:
        wheel = cls(state.cpu)
        for rec in state.pending:
            wheel.reset(rec.cid, rec.deadline, rec.kind)
        wheel.fired = state.fired
        return wheel
