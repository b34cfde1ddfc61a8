"""Outbound frames of one link, through the fault hook when one is set."""

from __future__ import annotations

import trio

from shared.transport._faults import REORDER_HOLD, FaultInjector, FaultPlan
from shared.transport._nng import NngPort


class Outbound:
    """Sends frames on a port; applies the link's :class:`FaultInjector`."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.faults = FaultInjector()
        self._nursery = nursery
        self.sent = 0

    def set_faults(self, plan: FaultPlan) -> None:
        self.faults.configure(plan)

    def try_send_now(self, port: NngPort, frame: bytes, pipe: int | None = None) -> bool:
        """The hot path: hand ``frame`` to nng at once if no fault plan is set
        and nng has room; False means use :meth:`send`."""
        if self.faults.active or not port.try_send(frame, pipe):
            return False
        self.sent += 1
        return True

    async def send(self, port: NngPort, frame: bytes, pipe: int | None = None) -> None:
        if not self.faults.active:
            self.sent += 1
            await port.send(frame, pipe)
            return
        had_held = self.faults.holding
        for delay, f in self.faults.plan_send(frame):
            if delay > 0:
                self._nursery.start_soon(self._send_later, port, delay, f, pipe)
            else:
                self.sent += 1
                await port.send(f, pipe)
        if not had_held and self.faults.holding:
            self._nursery.start_soon(self._flush_held, port, pipe)

    async def _send_later(
        self, port: NngPort, delay: float, frame: bytes, pipe: int | None
    ) -> None:
        await trio.sleep(delay)
        if not port.closed:
            self.sent += 1
            await port.send(frame, pipe)

    async def _flush_held(self, port: NngPort, pipe: int | None) -> None:
        await trio.sleep(REORDER_HOLD)
        held = self.faults.release_held()
        if held is not None and not port.closed:
            self.sent += 1
            await port.send(held, pipe)
