"""The xenbus frontend bus (FreeBSD ``xenbusb.c`` + ``xenbusb_front.c``): finds
the frontends the toolstack created under ``/local/domain/<D>/device/``, gives
each to the driver registered for its type (:mod:`.xbdriver`), runs its state
machine (:mod:`.xbfront`) against the backend's ``state`` in the device's own
task, and holds boot until every frontend is Connected or gone — with a
timeout (``boot_hold_s``), so a backend that never answers cannot hang boot
(the XenServer CD-ROM lesson, guest-behaviour A.4). While it waits it logs
FreeBSD's ``run_interrupt_driven_hooks: still waiting after N seconds for
xenbusb_nop_confighook_cb`` once a second.

:meth:`Xenbus.attach` (vCPU0, from boot) also starts the ``control/shutdown``
handling (:mod:`.xctrl`). New frontends written after boot (block-attach) are
picked up by a watch on ``device``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import trio

from services.frontend.kernel import xbfront
from services.frontend.kernel.xbdriver import FrontendDriver, XenbusDevice
from services.frontend.kernel.xbfront import Step
from services.frontend.kernel.xs import XsConnection
from services.xenstore.client import XsClientError, open_xs_client
from shared.abi.constants import XenbusState

if TYPE_CHECKING:
    from services.frontend.kernel.kernel import Kernel

HOLD_REPORT_S = 1.0
DEVICE_SUSPEND_TIMEOUT_S = 30.0  # FreeBSD blkfront gives a drain 30 s

#: devtype -> driver class, or "module:attr" imported on first use
DRIVERS: dict[str, type[FrontendDriver] | str] = {
    "vbd": "services.frontend.kernel.blkfront:Blkfront",
    "stub": "services.frontend.kernel.xbstub:StubFront",  # short names for configs
}


def register_driver(devtype: str, driver: type[FrontendDriver] | str) -> None:
    """Make ``driver`` handle every frontend of ``devtype`` probed from now on."""
    DRIVERS[devtype] = driver


def load_driver(spec: type[FrontendDriver] | str) -> type[FrontendDriver]:
    if not isinstance(spec, str):
        return spec
    if ":" not in spec:  # a short name
        return load_driver(DRIVERS[spec])
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


class Xenbus:
    """vCPU0's xenbus: the xenstore connection, the frontends, control/shutdown."""

    def __init__(self, k: Kernel, endpoint: str, token: str) -> None:
        self.k = k
        self.endpoint = endpoint
        self.token = token.encode()
        self.xs: XsConnection | None = None
        self.devices: dict[str, XenbusDevice] = {}
        self.drivers: dict[str, FrontendDriver] = {}
        self.changed = trio.Event()
        self.hold_s = float(k.cfg.boot_hold_s)
        self.hold_result = ""
        self.ctrl: Any = None
        self._nursery: trio.Nursery | None = None
        self._locks: dict[str, trio.Lock] = {}

    # --- boot ------------------------------------------------------------------------------
    async def attach(self, nursery: trio.Nursery, device_ports: list[int]) -> None:
        """Connect, start control/shutdown, probe ``device/``, hold boot."""
        from services.frontend.kernel.xctrl import Xctrl

        del device_ports
        self._nursery = nursery
        self.xs = await nursery.start(self._connection)
        self.k.log(f"xenstore: connected as dom{self.k.domid} ({self.xs.home})")
        self.ctrl = Xctrl(self.k, self.xs, self)
        await self.ctrl.start(nursery)
        await self.enumerate()
        nursery.start_soon(self._hotplug)
        await self.hold()

    async def _connection(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with open_xs_client(self.endpoint, self.k.domid, self.token) as client:
            conn = XsConnection(client.chan, self.k.domid)
            async with trio.open_nursery() as n:
                await n.start(conn.run)
                task_status.started(conn)

    async def enumerate(self) -> list[str]:
        """``xenbusb_enumerate_bus``: every ``device/<type>/<id>`` not yet known."""
        assert self.xs is not None and self._nursery is not None
        new = []
        try:
            types = await self.xs.directory("device")
        except XsClientError:
            types = []
        for devtype in types:
            try:
                ids = await self.xs.directory(f"device/{devtype}")
            except XsClientError:
                continue
            for devid in ids:
                nodename = f"device/{devtype}/{devid}"
                if nodename in self.devices or not devid.isdigit():
                    continue
                dev = await self._new_device(nodename, devtype, int(devid))
                if dev is not None:
                    new.append(nodename)
                    self._nursery.start_soon(self._run_device, dev)
        return new

    async def _new_device(self, nodename: str, devtype: str, devid: int) -> XenbusDevice | None:
        assert self.xs is not None
        backend = await self.xs.read_or(f"{nodename}/backend")
        backend_id = await self.xs.read_or(f"{nodename}/backend-id", "0")
        if not backend:
            return None  # the toolstack is still writing it; the hotplug watch retries
        dev = XenbusDevice(self.k, self.xs, nodename, devtype, devid, backend, int(backend_id or 0))
        dev.state = xbfront.parse_state(await self.xs.read_or(f"{nodename}/state"))
        self.devices[nodename] = dev
        self._locks[nodename] = trio.Lock()
        return dev

    async def _hotplug(self) -> None:
        assert self.xs is not None
        watch = await self.xs.watch("device")
        async for _ in watch:
            for nodename in await self.enumerate():
                self.k.log(f"xenbus: new device {nodename}")

    async def hold(self) -> None:
        """Wait (at most ``boot_hold_s``) until every frontend releases the hold."""
        start = last = trio.current_time()
        while pending := self.pending():
            now = trio.current_time()
            if now - start >= self.hold_s:
                names = ", ".join(self._describe(d) for d in pending)
                self.hold_result = f"timed out after {self.hold_s:g} s: {names}"
                self.k.log(f"xenbus: boot hold {self.hold_result}; booting without them")
                return
            with trio.move_on_after(min(HOLD_REPORT_S - (now - last), self.hold_s - (now - start))):
                await self.changed.wait()
            if trio.current_time() - last >= HOLD_REPORT_S and self.pending():
                last = trio.current_time()
                waited = int(last - start)
                names = ", ".join(self._describe(d) for d in self.pending())
                self.k.log(
                    f"run_interrupt_driven_hooks: still waiting after {waited} seconds "
                    f"for xenbusb_nop_confighook_cb ({names})"
                )
        self.hold_result = "released"
        self.k.log(f"xenbus: boot hold released ({len(self.devices)} frontends)")

    def pending(self) -> list[XenbusDevice]:
        return [d for d in self.devices.values() if not xbfront.releases_hold(d.record())]

    @staticmethod
    def _describe(d: XenbusDevice) -> str:
        return f"{d.nodename}: frontend {d.state.name}, backend {d.otherend_state.name}"

    def _touch(self) -> None:
        self.changed.set()
        self.changed = trio.Event()
        self.k.touch()

    # --- one device ------------------------------------------------------------------------
    async def _run_device(self, dev: XenbusDevice) -> None:
        assert self.xs is not None
        driver = await self._probe(dev)
        self._touch()
        if driver is None:
            return
        watch = await self.xs.watch(f"{dev.otherend}/state")
        async for _ in watch:
            be = xbfront.parse_state(await self.xs.read_or(f"{dev.otherend}/state"))
            async with self._locks[dev.nodename]:
                await self._otherend_changed(dev, driver, be)
            self._touch()

    async def _probe(self, dev: XenbusDevice) -> FrontendDriver | None:
        cfg = self.k.cfg
        device_type = await dev.read_or("device-type")
        if xbfront.declines_pv_cdrom(dev.devtype, device_type, cfg.pv_cdrom):
            dev.outcome, dev.why = "declined", "device-type cdrom: left to the emulated ATAPI CD"
            self.k.log(f"xbd: {dev.nodename}: PV CD-ROM declined (ENXIO); boot does not wait")
            return None
        spec = {**DRIVERS, **cfg.xenbus_drivers}.get(dev.devtype)
        if spec is None:
            dev.outcome, dev.why = "no-driver", f"no driver for {dev.devtype}"
            self.k.log(f"xenbus: {dev.nodename}: no {dev.devtype} driver; left unattached")
            return None
        try:
            driver = load_driver(spec)()
            dev.driver_name = driver.name or type(driver).__name__
            if not await driver.probe(dev):
                dev.outcome, dev.why = "declined", f"{dev.driver_name} probe declined"
                self.k.log(f"xenbus: {dev.nodename}: {dev.why}")
                return None
            await driver.attach(dev)
        except Exception as exc:
            await self._fail(dev, f"attach: {exc!r}")
            return None
        self.drivers[dev.nodename] = driver
        self.k.log(f"xenbus: {dev.nodename} attached to {dev.driver_name} (backend {dev.otherend})")
        return driver

    async def _otherend_changed(
        self, dev: XenbusDevice, driver: FrontendDriver, be: XenbusState
    ) -> None:
        dev.otherend_state = be
        if dev.outcome == "failed":
            return
        for step in xbfront.otherend_changed(dev.state, be):
            try:
                if step is Step.INITIALISE:
                    await driver.initialise(dev)
                elif step is Step.CONNECT:
                    await driver.connect(dev)
                elif step is Step.CLOSE:
                    await driver.disconnect(dev)
                else:
                    await driver.backend_changed(dev, be)
            except Exception as exc:
                await self._fail(dev, f"{step.value}: {exc!r}")
                return
            after = xbfront.state_after(step, dev.state)
            if after != dev.state:
                await dev.switch_state(after)
                dev.outcome = {
                    XenbusState.Connected: "connected",
                    XenbusState.Closed: "closed",
                }.get(after, dev.outcome)
                self.k.log(f"xenbus: {dev.nodename}: frontend {after.name} (backend {be.name})")

    async def _fail(self, dev: XenbusDevice, why: str) -> None:
        """``xenbus_dev_fatal``: log, record under ``error/``, switch to Closing."""
        dev.outcome, dev.why = "failed", why
        self.k.log(f"xenbus: {dev.nodename} failed: {why}")
        assert self.xs is not None
        try:
            await self.xs.write(f"error/{dev.nodename}/error", why)
            await dev.switch_state(XenbusState.Closing)
        except XsClientError as exc:
            self.k.log(f"xenbus: {dev.nodename}: could not record the failure: {exc}")
        self._touch()

    # --- suspend / resume (called by xctrl on vCPU0) ---------------------------------------
    async def suspend_devices(self) -> str | None:
        """``DEVICE_SUSPEND`` of every attached frontend; the first failure's
        reason (the guest then aborts the suspend), or None."""
        for nodename, driver in self.drivers.items():
            dev = self.devices[nodename]
            with trio.move_on_after(DEVICE_SUSPEND_TIMEOUT_S):
                try:
                    async with self._locks[nodename]:
                        await driver.suspend(dev)
                except Exception as exc:
                    return f"{nodename}: {exc!r}"
                continue
            return f"{nodename}: suspend did not finish in {DEVICE_SUSPEND_TIMEOUT_S:g} s"
        return None

    async def resume_devices(self, cancelled: bool) -> None:
        """``DEVICE_RESUME``: cancelled keeps every connection; a new domain
        restarts each handshake from Initialising (FreeBSD ``xenbusb_resume``)."""
        for nodename, driver in self.drivers.items():
            dev = self.devices[nodename]
            async with self._locks[nodename]:
                if not cancelled:
                    dev.otherend = await dev.read_or("backend", dev.otherend) or dev.otherend
                    dev.otherend_id = int(await dev.read_or("backend-id", "0") or 0)
                    await dev.switch_state(XenbusState.Initialising)
                try:
                    await driver.resume(dev, cancelled)
                except Exception as exc:
                    await self._fail(dev, f"resume: {exc!r}")

    # --- report ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "devices": {n: _asdict(d) for n, d in sorted(self.devices.items())},
            "hold": self.hold_result,
            "xenstore": self.xs.statistics() if self.xs else {},
            "control": self.ctrl.status() if self.ctrl else {},
        }


def _asdict(dev: XenbusDevice) -> dict[str, Any]:
    rec = dev.record()
    return {
        "devtype": rec.devtype,
        "devid": rec.devid,
        "backend": rec.otherend,
        "backend_id": rec.otherend_id,
        "state": XenbusState(rec.state).name,
        "backend_state": XenbusState(rec.otherend_state).name,
        "driver": rec.driver,
        "outcome": rec.outcome,
        "why": rec.why,
    }
