"""The xenbus frontend driver interface: what blkfront (and netfront) implement.

A driver is a class with ``devtype`` (``"vbd"``, ``"vif"``) whose instance the
bus creates once per device it probes under ``/local/domain/<D>/device/<devtype>/``.
Register it with :func:`services.frontend.kernel.xenbus.register_driver`
(``register_driver("vbd", Blkfront)``) or name it in the guest config
(``"xenbus_drivers": {"vbd": "package.module:Blkfront"}``).

Every callback is a coroutine and runs in that device's own task, one at a
time (the bus never calls two callbacks of one device at once). The bus owns
the frontend ``state`` key and the boot hold; a callback that returns lets the
bus take the next step, one that raises fails the device (the bus logs it,
writes ``error/<nodename>/error`` and switches the frontend to Closing).
The sequence for a vbd (xen-reference 2.4)::

    probe(dev)            -> False: declined (ENXIO); the device is dropped, boot goes on
    attach(dev)           FE Initialising: read your frontend keys (virtual-device, ...)
    initialise(dev)       BE InitWait: read BE max-ring-page-order, allocate and grant the
                          ring, alloc_unbound(remote=dev.otherend_id), then write ring-ref,
                          event-channel, protocol in ONE dev.transaction(...);
                          the bus then writes FE Initialised
    connect(dev)          BE Connected: read sectors, info, sector-size, feature-*; start
                          I/O; the bus then writes FE Connected (boot hold released)
    backend_changed(dev, state)   any other BE state seen (also Connected -> Connected:
                          capacity changed, re-read ``sectors``)
    disconnect(dev)       BE Closing/Closed/gone: free ring, grants, port; FE -> Closed
    suspend(dev)          before SCHEDOP_shutdown(suspend): drain in-flight requests;
                          raise DeviceBusy to veto (the guest aborts the suspend and keeps
                          running, FreeBSD "device_suspend failed")
    resume(dev, cancelled)  after it. cancelled (rc 1): keep ring, grants and port; the bus
                          puts FE back to Connected. New domain (rc 0): the bus has set FE
                          to Initialising and re-read backend/backend-id; drop the old ring
                          (its grants and port are gone) and the handshake runs again
                          from initialise().

Where a driver waits on the backend beyond the handshake, it should do so with
a timeout: a backend that never answers must not hang the guest (the bus's
boot hold gives up after ``boot_hold_s`` and says so in the boot log).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from services.frontend.kernel.state import XenbusDeviceRecord
from services.frontend.kernel.xs import XsConnection
from shared.abi.constants import XenbusState

if TYPE_CHECKING:
    from services.frontend.kernel.kernel import Kernel

T = TypeVar("T")


class DeviceBusy(Exception):
    """A driver's ``suspend`` cannot quiesce the device: the suspend is aborted."""


class XenbusDevice:
    """A driver's handle on its device: its keys, the backend's, the kernel."""

    def __init__(
        self,
        k: Kernel,
        xs: XsConnection,
        nodename: str,
        devtype: str,
        devid: int,
        otherend: str,
        otherend_id: int,
    ) -> None:
        self.k = k  #: the kernel (hypercalls: ``k.evtchn_op``, ``k.call``; ``k.mem``)
        self.xs = xs
        self.nodename = nodename  #: ``device/vbd/51712`` (relative to the domain's home)
        self.path = xs.path(nodename)  #: absolute frontend path
        self.devtype = devtype
        self.devid = devid
        self.otherend = otherend  #: the backend's path
        self.otherend_id = otherend_id  #: the backend's domid
        self.state = XenbusState.Initialising  #: the frontend state last written
        self.otherend_state = XenbusState.Unknown  #: the backend state last seen
        self.driver_name = ""
        self.outcome = "attaching"
        self.why = ""
        self.softc: Any = None  #: the driver's own per-device data

    # --- keys ------------------------------------------------------------------------------
    async def read(self, key: str, tx: int = 0) -> str:
        return await self.xs.read(f"{self.path}/{key}", tx)

    async def read_or(self, key: str, default: str | None = None, tx: int = 0) -> str | None:
        return await self.xs.read_or(f"{self.path}/{key}", default, tx)

    async def write(self, key: str, value: str | int, tx: int = 0) -> None:
        await self.xs.write(f"{self.path}/{key}", str(value), tx)

    async def read_otherend(self, key: str, tx: int = 0) -> str:
        return await self.xs.read(f"{self.otherend}/{key}", tx)

    async def read_otherend_or(
        self, key: str, default: str | None = None, tx: int = 0
    ) -> str | None:
        return await self.xs.read_or(f"{self.otherend}/{key}", default, tx)

    async def transaction(self, body: Callable[[int], Awaitable[T]]) -> T | None:
        """``body(tx)`` in one xenstore transaction, retried on EAGAIN."""
        return await self.xs.transaction(body)

    async def switch_state(self, state: XenbusState) -> None:
        """``xenbus_set_state``: write the frontend ``state`` (drivers that skip a
        state, like netfront going straight to Connected, call this themselves)."""
        await self.write("state", int(state))
        self.state = state

    def log(self, line: str) -> None:
        self.k.log(f"{self.driver_name or self.devtype}{self.devid}: {line}")

    def record(self) -> XenbusDeviceRecord:
        return XenbusDeviceRecord(
            self.nodename,
            self.devtype,
            self.devid,
            self.otherend,
            self.otherend_id,
            int(self.state),
            int(self.otherend_state),
            self.driver_name,
            self.outcome,
            self.why,
        )


class FrontendDriver:
    """Base class of xenbus frontend drivers; every callback defaults to a no-op
    (``probe`` accepts). See the module doc for the sequence."""

    devtype: ClassVar[str] = ""
    name: ClassVar[str] = ""  #: for the boot log (``xbd``, ``xn``)

    async def probe(self, dev: XenbusDevice) -> bool:
        return True

    async def attach(self, dev: XenbusDevice) -> None:
        pass

    async def initialise(self, dev: XenbusDevice) -> None:
        pass

    async def connect(self, dev: XenbusDevice) -> None:
        pass

    async def backend_changed(self, dev: XenbusDevice, state: XenbusState) -> None:
        pass

    async def disconnect(self, dev: XenbusDevice) -> None:
        pass

    async def suspend(self, dev: XenbusDevice) -> None:
        pass

    async def resume(self, dev: XenbusDevice, cancelled: bool) -> None:
        pass
