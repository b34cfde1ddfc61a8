"""blkback's process: xenstore watches in, vbd state machines, rings out.

One task owns the xenstore connection. It watches
``/local/domain/0/backend/vbd`` (every device the toolstack gives us) and,
per device, the frontend's ``state``; after each burst of watch events it
re-reads the devices they touched and steps their :class:`VbdBackend`
machines, carrying out the actions (xenstore writes in one transaction,
connecting and disconnecting rings, swapping media). A second task takes the
hypervisor's event notifications and kicks the ring each port belongs to.
A device whose handling fails is counted and left as it is; the others keep
being served.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from typing import Any

import trio

from services.backend.blkback_device import Vbd, VbdKey
from services.backend.blkback_device import xs_read as _read
from services.backend.blkback_grants import Dom0Hypervisor
from services.backend.blkback_messages import ExecLog, ExecLogRequest
from services.backend.blkback_xenbus import (
    ChangeMedia,
    Connect,
    Disconnect,
    Unregister,
    VbdConfig,
    VbdSnapshot,
    WriteKeys,
)
from services.hypervisor import control as ctl
from services.xenstore.client import XsClient, XsClientError, open_xs_client
from services.xenstore.messages import host_secret as xs_secret
from shared.abi import xs_wire
from shared.abi.constants import XenbusState
from shared.evtchn_dev import EvtchnDevice
from shared.hostsecret import host_secret
from shared.service import ServiceContext
from shared.transport import ServiceError, open_channel

BACKEND_ROOT = "/local/domain/0/backend/vbd"
CONNECT_TIMEOUT = 60.0
log = logging.getLogger("blkback")


def _state(raw: bytes | None) -> XenbusState:
    try:
        return XenbusState(int(raw or b"0"))
    except ValueError:
        return XenbusState.Unknown


class BlkbackService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.devices: dict[VbdKey, Vbd] = {}
        self.ports: dict[int, Vbd] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self.hv: Dom0Hypervisor | None = None

    def statistics(self) -> dict[str, Any]:
        return {
            "counters": dict(self.counters),
            "hypercalls": self.hv.hypercalls if self.hv else 0,
            "device_sends": self.hv.device_sends if self.hv else 0,
            "devices": {f"{k[0]}/{k[1]}": d.statistics() for k, d in self.devices.items()},
        }

    def exec_log(self, peer: object, msg: ExecLogRequest) -> ExecLog:
        vbd = self.devices.get((msg.domid, msg.devid))
        if vbd is None:
            raise ServiceError("no-such-device", f"no vbd {msg.domid}/{msg.devid}")
        return ExecLog(vbd.log.take(msg.clear), vbd.log.recorded)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        host = self.ctx.host
        async with open_channel(host.endpoint("hypervisor")) as chan:
            await chan.wait_connected(timeout=CONNECT_TIMEOUT)
            self.hv = Dom0Hypervisor(chan)
            await self.hv.hello(host_secret(host.rundir))
            device = await self.hv.open_device(host.rundir)
            try:
                async with (
                    open_xs_client(host.endpoint("xenstore"), 0, xs_secret(host.rundir)) as xs,
                    trio.open_nursery() as nursery,
                ):
                    self.nursery = nursery
                    nursery.start_soon(self._events, chan)
                    if device is not None:
                        nursery.start_soon(self._device_events, device)
                    await xs.watch(BACKEND_ROOT, "be")
                    task_status.started()
                    await self._watch_loop(xs)
            finally:
                if device is not None:
                    device.close()

    async def _device_events(self, device: EvtchnDevice) -> None:
        """The ports that fired, read from our event-channel device."""
        while True:
            try:
                ports = await device.receive()
            except trio.ClosedResourceError:
                return
            self._fired(ports)

    async def _events(self, chan: Any) -> None:
        """``/dev/xen/evtchn``: the ports that fired, to their rings."""
        while True:
            msg = await chan.receive()
            if isinstance(msg, ctl.EvtchnNotify):
                self._fired(msg.ports)

    def _fired(self, ports: Sequence[int]) -> None:
        for port in ports:
            vbd = self.ports.get(port)
            if vbd is not None and vbd.conn is not None:
                vbd.conn.kick()
            else:
                self.counters["stray_events"] += 1

    # --- xenstore --------------------------------------------------------------------

    async def _watch_loop(self, xs: XsClient) -> None:
        while True:
            touched: dict[VbdKey, None] = {}
            rescan = False
            events = [await xs.event()]
            while xs.events:
                events.append(xs.events.popleft())
            for path, token in events:
                key = _key_of(path.decode(), token.decode())
                if key is None:
                    rescan = True
                else:
                    touched[key] = None
            if rescan:
                for key in await self._list_devices(xs):
                    touched[key] = None
                for key in self.devices:
                    touched[key] = None
            for key in touched:
                try:
                    await self._reconcile(xs, key)
                except (XsClientError, OSError, ValueError) as exc:
                    self.counters["device_errors"] += 1
                    log.warning("vbd %s: %s", key, exc)

    async def _list_devices(self, xs: XsClient) -> list[VbdKey]:
        out = []
        for dom in await _dir(xs, BACKEND_ROOT):
            for dev in await _dir(xs, f"{BACKEND_ROOT}/{dom.decode()}"):
                try:
                    out.append((int(dom), int(dev)))
                except ValueError:
                    self.counters["bad_device_names"] += 1
        return out

    async def _snapshot(self, xs: XsClient, key: VbdKey) -> VbdSnapshot | None:
        be = f"{BACKEND_ROOT}/{key[0]}/{key[1]}"
        frontend = await _read(xs, f"{be}/frontend")
        if frontend is None:
            return None
        cfg = VbdConfig(
            frontend.decode(),
            int(await _read(xs, f"{be}/frontend-id") or key[0]),
            (await _read(xs, f"{be}/params") or b"").decode(),
            (await _read(xs, f"{be}/mode") or b"w").decode(),
            (await _read(xs, f"{be}/device-type") or b"disk").decode(),
            (await _read(xs, f"{be}/online") or b"1") != b"0",
        )
        be_state = _state(await _read(xs, f"{be}/state"))
        fe_state = _state(await _read(xs, f"{cfg.frontend}/state"))
        return VbdSnapshot(cfg, be_state, fe_state)

    async def _reconcile(self, xs: XsClient, key: VbdKey) -> None:
        snap = await self._snapshot(xs, key)
        vbd = self.devices.get(key)
        if vbd is None:
            if snap is None:
                return
            vbd = self.devices[key] = Vbd(key, f"{BACKEND_ROOT}/{key[0]}/{key[1]}", self)
            vbd.config = snap.config
            await xs.watch(f"{snap.config.frontend}/state", f"fe {key[0]} {key[1]}")
        if snap is not None:
            vbd.config = snap.config
        await self._apply(xs, vbd, vbd.machine.step(snap))

    async def _apply(self, xs: XsClient, vbd: Vbd, actions: list) -> None:
        for action in actions:
            match action:
                case WriteKeys():
                    await self._write(xs, vbd, action)
                case Connect():
                    try:
                        facts, persistent = await vbd.connect(xs, action.params)
                    except Exception as exc:  # whatever the frontend gave us
                        self.counters["connect_failures"] += 1
                        log.warning("vbd %s: connect failed: %s", vbd.key, exc)
                        await vbd.disconnect()
                        await self._apply(xs, vbd, vbd.machine.connect_failed())
                    else:
                        await self._apply(xs, vbd, vbd.machine.connected_ok(facts, persistent))
                case ChangeMedia():
                    facts = vbd.change_media(action.params)
                    self.counters["media_changes"] += 1
                    await self._apply(xs, vbd, vbd.machine.media_changed(facts))
                case Disconnect():
                    await vbd.disconnect()
                case Unregister():
                    await vbd.disconnect()
                    vbd.close()
                    self.devices.pop(vbd.key, None)
                    try:
                        token = f"fe {vbd.key[0]} {vbd.key[1]}"
                        path = f"{vbd.config.frontend}/state"
                        await xs.request(xs_wire.unwatch(path, token, req_id=xs.next_id()))
                    except XsClientError:
                        pass

    async def _write(self, xs: XsClient, vbd: Vbd, action: WriteKeys) -> None:
        """Keys then state in one transaction, and never into a removed directory."""
        for _attempt in range(20):
            tx = await xs.transaction_start()
            try:
                if await _read(xs, f"{vbd.path}/frontend", tx) is None:
                    await xs.transaction_end(tx, commit=False)
                    return
                for k, v in action.keys.items():
                    await xs.write(f"{vbd.path}/{k}", v.encode(), tx)
                if action.state is not None:
                    await xs.write(f"{vbd.path}/state", str(int(action.state)).encode(), tx)
                await xs.transaction_end(tx)
                return
            except XsClientError as exc:
                if exc.name != "EAGAIN":
                    raise
                self.counters["xs_eagain"] += 1
        raise OSError(0, f"vbd {vbd.key}: transaction kept failing")


def _key_of(path: str, token: str) -> VbdKey | None:
    """The device a watch event is about; None for "rescan everything"."""
    if token.startswith("fe "):
        _, dom, dev = token.split()
        return int(dom), int(dev)
    rest = path[len(BACKEND_ROOT) :].strip("/").split("/")
    if len(rest) < 2:
        return None
    try:
        return int(rest[0]), int(rest[1])
    except ValueError:
        return None


async def _dir(xs: XsClient, path: str) -> list[bytes]:
    try:
        return await xs.directory(path)
    except XsClientError as exc:
        if exc.name == "ENOENT":
            return []
        raise


async def setup(ctx: ServiceContext) -> None:
    service = BlkbackService(ctx)
    ctx.server.route(ExecLogRequest, service.exec_log)
    ctx.add_stats("blkback", service.statistics)
    ctx.nursery.start_soon(service.run)
