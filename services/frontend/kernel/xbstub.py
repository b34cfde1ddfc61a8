"""A reference xenbus frontend: the handshake of a vbd without a ring.

:class:`StubFront` shows the shape a real driver (blkfront) takes on
:class:`~services.frontend.kernel.xbdriver.FrontendDriver` and lets the bus be
tested against a scripted backend: it writes its keys in one transaction at
``initialise``, reads the backend's at ``connect``, and counts every callback
(``dev.softc``). Configs select it with ``"xenbus_drivers": {"vbd": "stub"}``.
"""

from __future__ import annotations

import collections

from services.frontend.kernel.xbdriver import FrontendDriver, XenbusDevice
from shared.abi.constants import XenbusState

PROTOCOL = "x86_64-abi"


class StubFront(FrontendDriver):
    devtype = "vbd"
    name = "stub"

    async def attach(self, dev: XenbusDevice) -> None:
        dev.softc = collections.Counter(attach=1)
        vdev = await dev.read_or("virtual-device", str(dev.devid))
        dev.log(f"virtual-device {vdev}, device-type {await dev.read_or('device-type', 'disk')}")

    async def initialise(self, dev: XenbusDevice) -> None:
        """Where blkfront grants its ring and allocates its port: here only
        the keys, written together as the protocol asks."""
        dev.softc["initialise"] += 1
        order = await dev.read_otherend_or("max-ring-page-order", "0")

        async def keys(tx: int) -> None:
            await dev.write("protocol", PROTOCOL, tx)
            await dev.write("ring-page-order", "0", tx)
            await dev.write("stub-backend-max-order", order or "0", tx)

        await dev.transaction(keys)

    async def connect(self, dev: XenbusDevice) -> None:
        dev.softc["connect"] += 1
        sectors = await dev.read_otherend_or("sectors", "0")
        dev.log(f"backend connected: {sectors} sectors")

    async def backend_changed(self, dev: XenbusDevice, state: XenbusState) -> None:
        dev.softc[f"backend:{state.name}"] += 1

    async def disconnect(self, dev: XenbusDevice) -> None:
        dev.softc["disconnect"] += 1

    async def suspend(self, dev: XenbusDevice) -> None:
        dev.softc["suspend"] += 1

    async def resume(self, dev: XenbusDevice, cancelled: bool) -> None:
        dev.softc["resume_cancelled" if cancelled else "resume"] += 1
        if cancelled:
            await dev.switch_state(XenbusState.Connected)
