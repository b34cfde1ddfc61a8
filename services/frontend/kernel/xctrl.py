"""``control/shutdown``: the toolstack asks, the guest acknowledges and acts
(FreeBSD ``dev/xen/control/control.c``, Linux ``drivers/xen/manage.c``;
guest-behaviour B.1-B.2, xen-reference 11.1).

At boot vCPU0 writes ``control/feature-poweroff|reboot|suspend = 1`` and
watches ``control/shutdown``. On each event it reads the key in a
transaction; a command it knows (``poweroff``, ``halt``, ``reboot``,
``suspend``) is acknowledged by writing ``""`` in that same transaction
(retried on EAGAIN) and then carried out; anything else is left as it is,
not acknowledged (Linux).

- poweroff / halt / reboot: park the APs, ``SCHEDOP_shutdown(poweroff|reboot)``
  from vCPU0; the CPUs stay halted after it.
- suspend (FB10 ``xctrl_suspend``): ``DEVICE_SUSPEND`` every frontend (a
  failure aborts: the guest keeps running, no domain suspend); park the APs
  (IPI_SUSPEND); mask vCPU0's ports; ``SCHEDOP_shutdown(suspend)`` on vCPU0.
  rc 1 = cancelled: unmask, release the APs, resume the frontends in place.
  rc 0 = running in a new domain: that resume path comes with migration
  (:attr:`Xctrl.resume_new_domain`); until then the APs stay parked and the
  guest reports ``suspended``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from services.frontend.kernel import park
from services.frontend.kernel.xs import XsAborted, XsConnection
from services.hypervisor.messages import SchedOp
from shared.abi import hypercall as hc
from shared.abi.constants import SCHEDOP, SHUTDOWN

if TYPE_CHECKING:
    from services.frontend.kernel.kernel import Kernel
    from services.frontend.kernel.xenbus import Xenbus

COMMANDS: dict[str, SHUTDOWN] = {
    "poweroff": SHUTDOWN.poweroff,
    "halt": SHUTDOWN.poweroff,  # Linux: as poweroff (no feature-halt)
    "reboot": SHUTDOWN.reboot,
    "suspend": SHUTDOWN.suspend,
}
FEATURES = ("feature-poweroff", "feature-reboot", "feature-suspend")


class Xctrl:
    """vCPU0's ``control/shutdown`` watcher and the sequences it runs."""

    def __init__(self, k: Kernel, xs: XsConnection, bus: Xenbus) -> None:
        self.k = k
        self.xs = xs
        self.bus = bus
        self.handled: list[str] = []  #: commands acknowledged, in order
        self.ignored: list[str] = []  #: values seen and not acknowledged
        self.suspends: list[dict[str, Any]] = []  #: one record per suspend attempt
        #: what to do on rc 0 (a new domain); the migration work installs it
        self.resume_new_domain: Callable[[], Awaitable[None]] | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        async def features(tx: int) -> None:
            for key in FEATURES:
                await self.xs.write(f"control/{key}", "1", tx)

        await self.xs.transaction(features)
        watch = await self.xs.watch("control/shutdown")
        nursery.start_soon(self._watch, watch)
        self.k.log("xctrl: control/shutdown watched (poweroff, reboot, suspend)")

    async def _watch(self, watch: Any) -> None:
        async for _ in watch:
            command = await self.take_command()
            if command is not None:
                await self.act(command)

    async def take_command(self) -> str | None:
        """Read ``control/shutdown``; ack a known command in the same transaction."""
        seen: list[str] = []

        async def body(tx: int) -> str:
            value = await self.xs.read_or("control/shutdown", "", tx) or ""
            seen.append(value)
            if value not in COMMANDS:
                raise XsAborted
            await self.xs.write("control/shutdown", "", tx)
            return value

        command = await self.xs.transaction(body)
        if command is None and seen and seen[-1]:
            self.ignored.append(seen[-1])
            self.k.log(f"xctrl: unknown shutdown command {seen[-1]!r}: not acknowledged")
        elif command is not None:
            self.handled.append(command)
            self.k.touch()
        return command

    async def act(self, command: str) -> None:
        self.k.log(f"xctrl: {command} (acknowledged)")
        if command == "suspend":
            await self.suspend()
        else:
            await self.shutdown(COMMANDS[command])

    async def shutdown(self, reason: SHUTDOWN) -> int:
        """Stop the APs, then ``SCHEDOP_shutdown(reason)`` from vCPU0."""
        k = self.k
        if not await park.suspend_cpus(k):
            k.log(f"xctrl: APs not all parked ({park.parked_cpus(k)}); shutting down anyway")
        rc = await self.sched_shutdown(reason)
        k.log(f"xctrl: SCHEDOP_shutdown({reason.name}) = {rc}; halted")
        k.state = "halted"
        k.touch()
        return rc

    async def sched_shutdown(self, reason: SHUTDOWN) -> int:
        arg = hc.SchedShutdown(int(reason)).pack()
        return (await self.k.call(SchedOp(SCHEDOP.shutdown, arg))).value

    async def suspend(self) -> int | None:
        """FB10 ``xctrl_suspend`` (B.2), up to the resume. Returns the
        hypercall's rc, or None when the suspend was aborted before it."""
        k, record = self.k, {"parked": [], "rc": None, "aborted": ""}
        self.suspends.append(record)
        failed = await self.bus.suspend_devices()
        if failed is not None:
            record["aborted"] = f"device_suspend failed: {failed}"
            k.log(f"xctrl: {record['aborted']}; suspend aborted, still running")
            await self.bus.resume_devices(cancelled=True)
            return None
        if not await park.suspend_cpus(k):
            record["aborted"] = f"APs did not park (parked: {park.parked_cpus(k)})"
            k.log(f"xctrl: {record['aborted']}; suspend aborted")
            await park.resume_cpus(k)
            await self.bus.resume_devices(cancelled=True)
            return None
        record["parked"] = park.parked_cpus(k)
        k.log(f"xctrl: APs parked {record['parked']}; SCHEDOP_shutdown(suspend)")
        if k.scanner is not None:
            await k.set_interrupts(False)
        rc = await self.sched_shutdown(SHUTDOWN.suspend)
        record["rc"] = rc
        if rc == 0:
            k.log("xctrl: suspend returned 0: running in a new domain")
            if self.resume_new_domain is not None:
                await self.resume_new_domain()
            else:
                k.log("xctrl: resume in a new domain not built yet; CPUs stay parked")
                k.state = "suspended"
                k.touch()
            return rc
        k.log(f"xctrl: suspend {'cancelled' if rc == 1 else f'failed ({rc})'}: resuming in place")
        if k.scanner is not None:
            await k.set_interrupts(True)
        await park.resume_cpus(k)
        await self.bus.resume_devices(cancelled=True)
        k.touch()
        return rc

    def status(self) -> dict[str, Any]:
        return {"handled": self.handled, "ignored": self.ignored, "suspends": self.suspends}
