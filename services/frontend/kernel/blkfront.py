"""blkfront: the guest's PV disk driver (FreeBSD ``blkfront.c``, Linux
``xen-blkfront.c``), a thin Trio adapter over :mod:`.blkfront_core`.

The xenbus bus (:mod:`.xenbus`) drives it through :class:`Blkfront`'s
callbacks (xen-reference 2.4, 2.8): ``initialise`` grants a fresh ring and
allocates a port and writes the ring keys in one transaction; ``connect``
reads the backend's features and starts I/O; ``disconnect`` (backend
Closing/Closed) abandons the ring and queues everything unanswered again;
when the backend comes back (``online`` still 1) the frontend goes back to
Initialising and the handshake runs anew — Linux's ``xenbus_reset_frontend``.
Connected→Connected re-reads ``sectors`` and ``info`` (a CD-ROM's media change).

Workloads use the :class:`BlockDevice` of a vdev (:func:`wait_device`):
``read``/``write``/``flush``/``discard`` at sector granularity, each completing
exactly once, across reconnects; a status other than OKAY raises
:class:`BlockIOError` (EIO; EOPNOTSUPP for an unsupported discard).
"""

from __future__ import annotations

import errno
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from services.frontend.kernel.blkfront_core import BlkfrontCore, Completion
from services.frontend.kernel.blkfront_gnttab import kernel_grants
from services.frontend.kernel.blkfront_io import BlockIOError, IoContext
from services.frontend.kernel.blkfront_state import BackendInfo, BioKind, BlkfrontStats
from services.frontend.kernel.xbdriver import FrontendDriver, XenbusDevice
from shared.abi import blkif as bi
from shared.abi import hypercall as hc
from shared.abi.constants import DOMID, EVTCHNOP, XenbusState

if TYPE_CHECKING:
    from services.frontend.kernel.kernel import Kernel

PROTOCOL = "x86_64-abi"
MAX_RING_PAGE_ORDER = (
    4  #: the frontend's own limit (Linux module parameter ``max_ring_page_order``)
)
PortHandler = Callable[[int], Awaitable[None]]

_DEVICES: weakref.WeakKeyDictionary[Kernel, dict[str, BlockDevice]] = weakref.WeakKeyDictionary()


def vdev_name(devid: int) -> str:
    """``xvda`` for 51712, ``hdc`` for 5632 (docs/man/xen-vbd-interface.7)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    if devid >> 28 == 1:
        disk, part = devid >> 8 & 0xFFFFF, devid & 0xFF
        prefix = "xvd"
    elif devid >> 8 == 202:
        disk, part, prefix = devid >> 4 & 0xF, devid & 0xF, "xvd"
    elif devid >> 8 in (3, 22):
        disk = (devid >> 6 & 1) + (2 if devid >> 8 == 22 else 0)
        part, prefix = devid & 0x3F, "hd"
    elif devid >> 8 == 8:
        disk, part, prefix = devid >> 4 & 0xF, devid & 0xF, "sd"
    else:
        return str(devid)
    name = prefix + (letters[disk] if disk < 26 else str(disk))
    return name + (str(part) if part else "")


#: data written into the ring between two pushes (each at most one notification)
PUSH_BYTES = 256 * 1024
#: read data handed over between two kicks: the workload requeues (and the
#: backend starts on those) while the rest is copied out. 4 KiB reads at queue
#: depth 32 go in fours: 16 responses at once left blkback idle while the guest
#: worked through them (80 k -> 100-120 k IOPS); in twos the kicks cost more
#: than the overlap gave. A bigger response is a chunk of its own.
READ_CHUNK = 16 * 1024
#: requests published between two kicks while an interrupt's chunks of small
#: responses are handled (the last chunk kicks for whatever is left): a
#: backend that ran dry wakes to 8 requests, not to every chunk's four
KICK_BATCH = 8


class BlockDevice:
    """One vbd as the guest's workloads see it."""

    def __init__(self, k: Kernel, name: str, devid: int) -> None:
        self.k = k
        self.name = name
        self.devid = devid
        self.core: BlkfrontCore | None = None
        self.port = 0
        self.connected = trio.Event()
        self.device_type = "disk"
        self.mode = "w"
        self._waiters: dict[int, trio.Event] = {}
        self._done: dict[int, Completion] = {}
        self._contexts: dict[int, IoContext] = {}  #: bios queued by an IoContext
        self._kick_scheduled = False

    # --- what the guest sees ----------------------------------------------------------
    @property
    def backend(self) -> BackendInfo:
        return self.core.backend if self.core else BackendInfo()

    @property
    def sectors(self) -> int:
        return self.backend.sectors

    @property
    def readonly(self) -> bool:
        return bool(self.backend.info & bi.VDisk.READONLY) or "w" not in self.mode

    @property
    def cdrom(self) -> bool:
        return bool(self.backend.info & bi.VDisk.CDROM) or self.device_type == "cdrom"

    async def read(self, sector: int, nsectors: int) -> bytes:
        return (await self.submit(BioKind.READ, sector, nsectors)).data

    async def write(self, sector: int, data: bytes, ordered: bool = False) -> None:
        kind = BioKind.WRITE_ORDERED if ordered else BioKind.WRITE
        await self.submit(kind, sector, len(data) // bi.SECTOR_SIZE, data)

    async def flush(self) -> None:
        await self.submit(BioKind.FLUSH, 0)

    async def discard(self, sector: int, nsectors: int) -> None:
        await self.submit(BioKind.DISCARD, sector, nsectors)

    async def submit(
        self, kind: BioKind, sector: int, nsectors: int = 0, data: bytes = b""
    ) -> Completion:
        """Queue one bio and wait for its completion (at most once, whatever
        happens to the connection meanwhile)."""
        if self.core is None:
            raise BlockIOError(errno.ENXIO, f"{self.name}: not attached")
        bio = self.core.submit(kind, sector, nsectors, data)
        done = self._waiters[bio] = trio.Event()
        self._schedule_kick()
        try:
            await done.wait()
        finally:
            self._waiters.pop(bio, None)
        result = self._done.pop(bio)
        if result.status != bi.BlkifRsp.OKAY:
            code = errno.EOPNOTSUPP if result.status == bi.BlkifRsp.EOPNOTSUPP else errno.EIO
            raise BlockIOError(
                code, f"{self.name}: {kind.name} at {sector}: status {result.status}"
            )
        return result

    def io_context(self, end_io: Callable[[Completion], None] | None = None) -> IoContext:
        """A queue of bios that are waited for together (``io_setup``), or
        whose completions go to ``end_io`` (see :class:`IoContext`)."""
        return IoContext(self, end_io)

    def statistics(self) -> BlkfrontStats:
        return self.core.statistics() if self.core else BlkfrontStats()

    def status(self) -> dict[str, Any]:
        be = self.backend
        return {
            "name": self.name,
            "sectors": be.sectors,
            "info": be.info,
            "readonly": self.readonly,
            "cdrom": self.cdrom,
            "features": {
                "flush": be.flush,
                "barrier": be.barrier,
                "discard": be.discard,
                "persistent": be.persistent,
                "max_indirect_segments": be.max_indirect_segments,
            },
            "ring_slots": len(self.core.shadow) if self.core else 0,
            "outstanding": self.core.outstanding() if self.core else 0,
        }

    # --- the ring -----------------------------------------------------------------------
    def _schedule_kick(self) -> None:
        """Batch: every bio queued before the scheduler next runs us goes out in
        one push (and at most one notification)."""
        if not self._kick_scheduled and self.k.nursery is not None:
            self._kick_scheduled = True
            self.k.nursery.start_soon(self._kick_soon)

    async def _kick_soon(self) -> None:
        await trio.sleep(0)
        self._kick_scheduled = False
        await self.kick()

    async def kick(self, hold: int = 0) -> None:
        """Pump queued parts into the ring, publish, notify if asked to. Every
        :data:`PUSH_BYTES` of data written is published on its own, so the
        backend starts on a big write while the next one is still being copied.
        ``hold``: see :meth:`BlkfrontCore.push`; a kick without it notifies
        for whatever was held back."""
        core = self.core
        while core is not None and core.pump(PUSH_BYTES):
            self._complete(core.take_completions())
            await self._publish(core, hold)
            core = self.core
        if core is not None:
            self._complete(core.take_completions())
            if not hold and core.held:
                await self._publish(core, 0)

    async def _publish(self, core: BlkfrontCore, hold: int) -> None:
        if core.push(hold) and self.port:
            await self.k.notify_via_evtchn(self.port)

    async def on_event(self, port: int) -> None:
        """The port's interrupt handler (``blkif_interrupt``)."""
        if self.core is None or port != self.port:
            return
        self._kick_scheduled = True  # the loop below kicks: no task for it
        try:
            while (core := self.core) is not None and (n := core.take_responses(READ_CHUNK)):
                if self._complete(core.take_completions()):
                    await trio.sleep(0)  # whoever waited on those may queue more now
                # small requests: more chunks may follow, kick for a batch; a
                # big one alone is worth the backend's start at once
                await self.kick(KICK_BATCH if n > 1 else 0)
            await self.kick()  # the last chunk: whatever was held back goes
        finally:
            self._kick_scheduled = False
        if self.core is not None and (self.core.pending or self.core.held):
            self._schedule_kick()  # queued after our last kick

    def _complete(self, done: list[Completion]) -> bool:
        """Hand completions over; True if that woke a task (an ``end_io``
        callback runs here and wakes nobody)."""
        contexts = self._contexts
        woke = False
        for c in done:
            ctx = contexts.pop(c.bio, None)
            if ctx is not None:
                woke = ctx._done(c) or woke
                continue
            self._done[c.bio] = c
            ev = self._waiters.get(c.bio)
            if ev is not None:
                ev.set()
                woke = True
        if done:
            self.k.touch()
        return woke


def devices(k: Kernel) -> dict[str, BlockDevice]:
    """This kernel's block devices by name (``xvda``) and devid (``51712``)."""
    return _DEVICES.setdefault(k, {})


async def wait_device(k: Kernel, name: str, timeout: float) -> BlockDevice:
    """The connected device ``name``; raises ``trio.TooSlowError`` after ``timeout``."""
    with trio.fail_after(timeout):
        while (dev := devices(k).get(name)) is None:
            await trio.sleep(0.05)
        await dev.connected.wait()
    return dev


async def workload_device(k: Kernel, spec: dict[str, Any]) -> BlockDevice | str:
    """The device a block workload's spec names (``vdev``, default xvda) once
    connected, or the error to report after its ``timeout`` (default 60 s)."""
    name, timeout = str(spec.get("vdev", "xvda")), float(spec.get("timeout", 60))
    try:
        return await wait_device(k, name, timeout)
    except trio.TooSlowError:
        return f"no connected {name} after {timeout:g} s"


def port_handlers(k: Kernel) -> dict[int, PortHandler]:
    """The kernel's per-port interrupt handlers. Until the kernel's ``dispatch``
    consults ``k.port_handlers`` itself, the instance's dispatch is wrapped."""
    handlers: dict[int, PortHandler] | None = getattr(k, "port_handlers", None)
    if handlers is not None:
        return handlers
    table: dict[int, PortHandler] = {}
    plain = k.dispatch

    async def dispatch(port: int) -> None:
        handler = table.get(port)
        if handler is None:
            await plain(port)
            return
        k.device_events[port] += 1
        await handler(port)

    k.port_handlers = table  # type: ignore[attr-defined]
    k.dispatch = dispatch  # type: ignore[method-assign]
    return table


class Blkfront(FrontendDriver):
    """The ``vbd`` driver (``xbd``)."""

    devtype = "vbd"
    name = "xbd"

    async def attach(self, dev: XenbusDevice) -> None:
        devid = int(await dev.read_or("virtual-device", str(dev.devid)) or dev.devid)
        bdev = BlockDevice(dev.k, vdev_name(devid), devid)
        bdev.device_type = await dev.read_or("device-type", "disk") or "disk"
        dev.softc = bdev
        devices(dev.k)[bdev.name] = bdev
        devices(dev.k)[str(devid)] = bdev
        dev.log(f"{bdev.name}: virtual-device {devid}, device-type {bdev.device_type}")

    async def initialise(self, dev: XenbusDevice) -> None:
        """``talk_to_blkback``: a new ring, grants and port; keys in one transaction."""
        bdev: BlockDevice = dev.softc
        grants = await kernel_grants(dev.k)
        if bdev.core is None:
            bdev.core = BlkfrontCore(bdev.devid, grants.table, grants.pool, grants.ram, 0)
        core = bdev.core
        if core.ring is not None:  # resumed in a new domain: the old ring is gone
            await self._abandon(dev, bdev)
        core.backend_domid = dev.otherend_id
        max_order = int(await dev.read_otherend_or("max-ring-page-order", "0") or 0)
        order = max(0, min(max_order, MAX_RING_PAGE_ORDER))
        refs = core.setup_ring(order)
        rc, out = await dev.k.evtchn_op(
            EVTCHNOP.alloc_unbound, hc.EvtchnAllocUnbound(DOMID.SELF, dev.otherend_id)
        )
        if rc < 0 or out is None:
            raise OSError(-rc, f"alloc_unbound(remote={dev.otherend_id}) failed: {rc}")
        bdev.port = out.port
        port_handlers(dev.k)[bdev.port] = bdev.on_event

        async def keys(tx: int) -> None:
            for old in await dev.xs.directory(dev.path, tx):
                if old.startswith(("ring-ref", "ring-page-order", "num-ring-pages")):
                    await dev.xs.rm(f"{dev.path}/{old}", tx)
            if order == 0:
                await dev.write("ring-ref", refs[0], tx)
            else:
                await dev.write("ring-page-order", order, tx)
                await dev.write("num-ring-pages", 1 << order, tx)
                for i, ref in enumerate(refs):
                    await dev.write(f"ring-ref{i}", ref, tx)
            await dev.write("event-channel", bdev.port, tx)
            await dev.write("protocol", PROTOCOL, tx)
            await dev.write("feature-persistent", 1, tx)

        await dev.transaction(keys)
        dev.log(f"ring order {order} ({len(core.shadow)} slots), port {bdev.port}")

    async def connect(self, dev: XenbusDevice) -> None:
        """``blkfront_connect``: read the disk and its features, start I/O."""
        bdev: BlockDevice = dev.softc
        assert bdev.core is not None
        bdev.mode = await dev.read_otherend_or("mode", "w") or "w"
        info = await read_backend_info(dev)
        bdev.core.connect(info)
        dev.log(
            f"{bdev.name}: {info.sectors} sectors, info {info.info:#x}, flush {int(info.flush)}, "
            f"barrier {int(info.barrier)}, indirect {info.max_indirect_segments}, "
            f"persistent {int(info.persistent)}"
        )
        bdev.connected.set()
        await bdev.kick()  # what was queued (a reconnect's re-issues) goes now

    async def backend_changed(self, dev: XenbusDevice, state: XenbusState) -> None:
        bdev: BlockDevice = dev.softc
        if state == XenbusState.Connected and dev.state == XenbusState.Connected:
            await self._media_check(dev, bdev)
        elif dev.state == XenbusState.Closed and state in (
            XenbusState.Initialising,
            XenbusState.InitWait,
            XenbusState.Closed,
        ):
            if await dev.read_otherend_or("online", "0") == "1":
                dev.log("backend is back: reconnecting (Initialising)")
                await dev.switch_state(XenbusState.Initialising)

    async def _media_check(self, dev: XenbusDevice, bdev: BlockDevice) -> None:
        assert bdev.core is not None
        old = bdev.core.backend
        new = await read_backend_info(dev)
        bdev.core.backend = new
        if (new.sectors, new.info) != (old.sectors, old.info):
            bdev.core.stats["media_changes"] += 1
            dev.log(f"{bdev.name}: media change: {old.sectors} -> {new.sectors} sectors")

    async def disconnect(self, dev: XenbusDevice) -> None:
        """Backend Closing/Closed: the ring is dead; keep every bio for the next one."""
        bdev: BlockDevice = dev.softc
        await self._abandon(dev, bdev)
        dev.log(f"{bdev.name}: disconnected; {bdev.core.outstanding() if bdev.core else 0} queued")

    async def _abandon(self, dev: XenbusDevice, bdev: BlockDevice) -> None:
        bdev.connected = trio.Event()
        if bdev.port:
            port_handlers(dev.k).pop(bdev.port, None)
            await dev.k.evtchn_op(EVTCHNOP.close, hc.EvtchnClose(bdev.port))
            bdev.port = 0
        if bdev.core is not None:
            bdev.core.take_responses()  # what the old backend did answer counts
            bdev._complete(bdev.core.take_completions())
            bdev.core.disconnect()

    async def resume(self, dev: XenbusDevice, cancelled: bool) -> None:
        if cancelled:
            await dev.switch_state(XenbusState.Connected)


async def read_backend_info(dev: XenbusDevice) -> BackendInfo:
    """``blkfront_gather_backend_features`` plus the disk's size and info."""

    async def num(key: str, default: int = 0) -> int:
        raw = await dev.read_otherend_or(key)
        try:
            return int(raw) if raw else default
        except ValueError:
            return default

    return BackendInfo(
        sectors=await num("sectors"),
        sector_size=await num("sector-size", 512),
        physical_sector_size=await num("physical-sector-size", 512),
        info=await num("info"),
        flush=await num("feature-flush-cache") == 1,
        barrier=await num("feature-barrier") == 1,
        discard=await num("feature-discard") == 1,
        persistent=await num("feature-persistent") == 1,
        max_indirect_segments=await num("feature-max-indirect-segments"),
    )
