"""Outbound frames of one link, through the fault hook when one is set."""

from __future__ import annotations

import trio

from shared.transport._faults import REORDER_HOLD, FaultInjector, FaultPlan
from shared.transport._nng import NngPort


class Outbound:
    """Sends frames on ``port``; applies the link's :class:`FaultInjector`."""

    def __init__(self, port: NngPort, nursery: trio.Nursery) -> None:
        self.port = port
        self.faults = FaultInjector()
        self._nursery = nursery
        self.sent = 0

    def set_faults(self, plan: FaultPlan) -> None:
        self.faults.configure(plan)

    async def send(self, frame: bytes, pipe: int | None = None) -> None:
        if not self.faults.active:
            self.sent += 1
            await self.port.send(frame, pipe)
            return
        had_held = self.faults._held is not None
        for delay, f in self.faults.plan_send(frame):
            if delay > 0:
                self._nursery.start_soon(self._send_later, delay, f, pipe)
            else:
                self.sent += 1
                await self.port.send(f, pipe)
        if not had_held and self.faults._held is not None:
            self._nursery.start_soon(self._flush_held, pipe)

    async def _send_later(self, delay: float, frame: bytes, pipe: int | None) -> None:
        await trio.sleep(delay)
        if not self.port.closed:
            self.sent += 1
            await self.port.send(frame, pipe)

    async def _flush_held(self, pipe: int | None) -> None:
        await trio.sleep(REORDER_HOLD)
        held = self.faults.release_held()
        if held is not None and not self.port.closed:
            self.sent += 1
            await self.port.send(held, pipe)
