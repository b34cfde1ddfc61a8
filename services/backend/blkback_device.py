"""One vbd as blkback holds it: its state machine, medium, and ring when connected.

:meth:`Vbd.connect` is the "connect" step of the xenbus handshake: it reads
the frontend's ``ring-ref`` (or ``ring-page-order`` and ``ring-ref0..N-1``),
``event-channel``, ``protocol`` and ``feature-persistent``, opens the medium
named by ``params``, maps the ring pages and binds the event channel, and
starts a :class:`~services.backend.blkback_conn.Blkif` on them.
:meth:`Vbd.disconnect` undoes all of it in reverse order.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

from services.backend.blkback_conn import Blkif
from services.backend.blkback_grants import GrantCache, GrantError, Mapping
from services.backend.blkback_image import DiskFacts, DiskImage, MediaError, no_media_facts
from services.backend.blkback_order import ExecutionLog
from services.backend.blkback_request import DeviceLimits
from services.backend.blkback_ring import IndexSafeSRing, RingPages, back_ring, map_ring_pages
from services.backend.blkback_xenbus import (
    MAX_INDIRECT_SEGMENTS,
    MAX_RING_PAGE_ORDER,
    VbdBackend,
    VbdConfig,
)
from services.xenstore.client import XsClient, XsClientError
from shared.abi.blkif import BLKIF_RING_ENTRY_SIZE
from shared.guestmem import GuestMemory, ram_path

if TYPE_CHECKING:
    from services.backend.blkback_service import BlkbackService

VbdKey = tuple[int, int]  # (frontend domid, devid)
NATIVE_PROTOCOL = "x86_64-abi"


class ConnectError(Exception):
    """The frontend's ring keys cannot be used."""


async def xs_read(xs: XsClient, path: str, tx: int = 0) -> bytes | None:
    """A key's value, or None if it does not exist."""
    try:
        return await xs.read(path, tx)
    except XsClientError as exc:
        if exc.name == "ENOENT":
            return None
        raise


class Vbd:
    def __init__(self, key: VbdKey, path: str, service: BlkbackService) -> None:
        self.key = key
        self.path = path
        self.service = service
        self.machine = VbdBackend()
        self.config: VbdConfig | None = None
        self.log = ExecutionLog()
        self.counters: collections.Counter[str] = collections.Counter()
        self.image: DiskImage | None = None
        self.facts: DiskFacts | None = None
        self.retired: list[DiskImage] = []
        self.memory: GuestMemory | None = None
        self.conn: Blkif | None = None
        self.connections = 0
        self._ring_maps: list[Mapping] = []
        self._pages: RingPages | None = None
        self._sring: IndexSafeSRing | None = None
        self._grants: GrantCache | None = None
        self._port: int | None = None

    def statistics(self) -> dict[str, Any]:
        g = self._grants
        return {
            "state": self.machine.state.name,
            "connections": self.connections,
            "connected": self.conn is not None,
            "medium": str(self.image.path) if self.image else "",
            "counters": dict(self.counters),
            "grants": {
                "maps": g.maps,
                "unmaps": g.unmaps,
                "persistent": len(g.persistent_maps),
                "persistent_hits": g.persistent_hits,
                "failures": g.failures,
            }
            if g
            else {},
            "queued": len(self.conn.queue) if self.conn else 0,
            "held": self.conn.queue.held if self.conn else 0,
        }

    # --- medium ----------------------------------------------------------------------

    def limits(self) -> DeviceLimits:
        assert self.facts is not None
        f = self.facts
        readonly = self.image is None or self.image.readonly
        return DeviceLimits(f.sectors, readonly, f.has_media, MAX_INDIRECT_SEGMENTS, f.discard)

    def open_medium(self, params: str) -> DiskFacts:
        """Open ``params``; an empty or unusable CD-ROM medium is "no medium"."""
        assert self.config is not None
        cdrom = self.config.cdrom
        if self.image is not None:
            self.retired.append(self.image)  # requests in flight may still use it
        self.image = None
        if params:
            try:
                self.image = DiskImage.open(params, readonly=self.config.readonly, cdrom=cdrom)
            except MediaError:
                if not cdrom:
                    raise
                self.counters["media_errors"] += 1
        self.facts = self.image.facts() if self.image else no_media_facts(cdrom)
        return self.facts

    def change_media(self, params: str) -> DiskFacts:
        facts = self.open_medium(params)
        if self.conn is not None:
            self.conn.set_medium(self.image, self.limits())
        return facts

    # --- ring ------------------------------------------------------------------------

    async def connect(self, xs: XsClient, params: str) -> tuple[DiskFacts, bool]:
        assert self.config is not None
        svc, fe, domid = self.service, self.config.frontend, self.config.frontend_id
        hv = svc.hv
        assert hv is not None
        order = int(await xs_read(xs, f"{fe}/ring-page-order") or b"0")
        if not 0 <= order <= MAX_RING_PAGE_ORDER:
            raise ConnectError(f"ring-page-order {order} above {MAX_RING_PAGE_ORDER}")
        if order == 0:
            raw = await xs_read(xs, f"{fe}/ring-ref") or await xs_read(xs, f"{fe}/ring-ref0")
            refs = [int(raw or b"-1")]
        else:
            refs = [int(await xs_read(xs, f"{fe}/ring-ref{i}") or b"-1") for i in range(1 << order)]
        port = int(await xs_read(xs, f"{fe}/event-channel") or b"-1")
        protocol = (await xs_read(xs, f"{fe}/protocol") or NATIVE_PROTOCOL.encode()).decode()
        persistent = await xs_read(xs, f"{fe}/feature-persistent") == b"1"
        if min(refs) < 0 or port < 0:
            raise ConnectError("ring-ref or event-channel missing")
        if protocol != NATIVE_PROTOCOL:
            raise ConnectError(f"protocol {protocol!r} not supported")
        facts = self.open_medium(params)
        if self.memory is None:
            self.memory = GuestMemory.open(ram_path(svc.ctx.host.name, domid))
        mapped = await hv.map(domid, [(r, False) for r in refs])
        self._ring_maps = [m for m in mapped if isinstance(m, Mapping)]
        bad = [m for m in mapped if isinstance(m, GrantError)]
        if bad:
            raise ConnectError(f"ring grant: {bad[0]}")
        self._pages = map_ring_pages(self.memory, [m.gfn for m in self._ring_maps])
        ring, self._sring = back_ring(self._pages.view, BLKIF_RING_ENTRY_SIZE, order)
        self._port = await hv.bind_interdomain(domid, port)
        self._grants = GrantCache(hv, domid, persistent)
        self.connections += 1
        self.conn = Blkif(
            self.connections,
            hv,
            self.memory,
            ring,
            self._port,
            self._grants,
            self.image,
            self.limits(),
            self.log,
            self.counters,
        )
        svc.ports[self._port] = self
        await svc.nursery.start(self.conn.run)
        self.conn.kick()  # requests may already be waiting
        return facts, persistent

    async def disconnect(self) -> None:
        """Stop the ring, unmap everything, close our port (idempotent)."""
        hv = self.service.hv
        assert hv is not None
        if self.conn is not None:
            await self.conn.stop()
            self.conn = None
        if self._grants is not None:
            await self._grants.release_all()
            self._grants = None
        if self._sring is not None:
            self._sring.release()
            self._sring = None
        if self._pages is not None:
            self._pages.close()
            self._pages = None
        if self._ring_maps:
            await hv.unmap(self._ring_maps)
            self._ring_maps = []
        if self._port is not None:
            self.service.ports.pop(self._port, None)
            await hv.close_port(self._port)
            self._port = None

    def close(self) -> None:
        """The device is gone: close media and the guest's memory."""
        for image in [*self.retired, *([self.image] if self.image else [])]:
            image.close()
        self.retired, self.image = [], None
        if self.memory is not None:
            try:
                self.memory.close()
            except BufferError:  # a view is still exported; the mapping dies with us
                pass
            self.memory = None
