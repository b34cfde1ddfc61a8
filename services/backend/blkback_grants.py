"""Dom0's side of grants and event channels for blkback (Trio adapter).

:class:`Dom0Hypervisor` is blkback's channel to the hypervisor, bound as dom0:
batched ``GNTTABOP_map_grant_ref``/``unmap_grant_ref`` (one hypercall for
every grant of a batch of requests), ``bind_interdomain``, ``close`` and the
one-way ``EVTCHNOP_send`` that notifies a frontend. A successful map answers
``dev_bus_addr``, the frame of the frontend's RAM file to use.

:class:`GrantCache` holds one connection's mappings: per-request ones, unmapped
when the request completes, and persistent ones (``feature-persistent``),
kept mapped writable up to :data:`MAX_PERSISTENT_GRANTS` so a frontend that
reuses its grant refs costs no hypercall.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import attrs

from services.hypervisor import control as ctl
from services.hypervisor.messages import EventChannelOp, GrantTableOp
from shared.abi import grant as gt
from shared.abi import hypercall as hc
from shared.abi.blkif import SEGMENT_SIZE
from shared.abi.constants import EVTCHNOP
from shared.evtchn_dev import EvtchnDevice
from shared.transport import CallTimeout, Channel, PeerLost, RemoteError

# Linux blkback keeps at most 1056 persistent grants per ring by default
# (xen_blkif_max_pgrants, a module parameter), sized for requests of few
# segments. Our blkfront puts a 1 MiB block in one request of 256 segments plus
# an indirect page, so 1056 holds only 4 such requests and a 5th in flight is
# mapped and unmapped per request (~1.3 ms of hypervisor time each). Room for
# 24 of them instead (what our blkfront keeps, MAX_PERSISTENT_PAGES):
MAX_PERSISTENT_GRANTS = 24 * (256 + 1)
HYPERCALL_TIMEOUT = 10.0


class GrantError(Exception):
    """A grant the frontend gave us cannot be mapped; ``status`` is the GNTST."""

    def __init__(self, ref: int, status: int) -> None:
        super().__init__(f"grant ref {ref}: {gt.GNTST(status).name}")
        self.ref = ref
        self.status = status


@attrs.frozen
class Mapping:
    ref: int
    handle: int
    gfn: int
    readonly: bool


class Dom0Hypervisor:
    """Hypercalls as dom0 over one channel (``Dom0Hello`` first)."""

    def __init__(self, chan: Channel) -> None:
        self.chan = chan
        self.hypercalls = 0
        self.device: EvtchnDevice | None = None
        self.device_sends = 0

    async def hello(self, secret: str) -> None:
        await self.chan.call(ctl.Dom0Hello(secret), timeout=HYPERCALL_TIMEOUT)

    async def open_device(self, rundir: Path) -> EvtchnDevice | None:
        """Our event-channel device (:mod:`shared.evtchn_dev`); None if the
        hypervisor refuses it (events then come and go by nng)."""
        dev = EvtchnDevice(rundir)
        try:
            await self.chan.call(
                ctl.Dom0EvtchnDevice(str(dev.fired_path), str(dev.send_path)),
                timeout=HYPERCALL_TIMEOUT,
            )
        except (RemoteError, CallTimeout, PeerLost):
            dev.close()
            return None
        self.device = dev
        return dev

    async def map(self, domid: int, refs: Sequence[tuple[int, bool]]) -> list[Mapping | GrantError]:
        """Map ``(ref, readonly)`` grants of ``domid``; one result per ref."""
        if not refs:
            return []
        ops = b"".join(
            gt.GnttabMapGrantRef(
                0, gt.GNTMAP.HOST_MAP | (gt.GNTMAP.READONLY if ro else 0), ref, domid
            ).encode()
            for ref, ro in refs
        )
        res = await self._call(GrantTableOp(gt.GNTTABOP.MAP_GRANT_REF, len(refs), ops, b""))
        size = gt.MAP_GRANT_REF.size
        out: list[Mapping | GrantError] = []
        for k, (ref, ro) in enumerate(refs):
            op = gt.GnttabMapGrantRef.decode(res.data, k * size) if res.value == 0 else None
            if op is None or op.status != gt.GNTST.OKAY:
                out.append(GrantError(ref, op.status if op else gt.GNTST.GENERAL_ERROR))
            else:
                out.append(Mapping(ref, op.handle, op.dev_bus_addr >> 12, ro))
        return out

    async def unmap(self, mappings: Sequence[Mapping]) -> None:
        if not mappings:
            return
        ops = b"".join(gt.GnttabUnmapGrantRef(0, m.gfn << 12, m.handle).encode() for m in mappings)
        await self._call(GrantTableOp(gt.GNTTABOP.UNMAP_GRANT_REF, len(mappings), ops, b""))

    async def bind_interdomain(self, domid: int, remote_port: int) -> int:
        """Bind the frontend's unbound port; returns our local port or raises."""
        arg = hc.EvtchnBindInterdomain(domid, remote_port).pack()
        res = await self._call(EventChannelOp(EVTCHNOP.bind_interdomain, arg))
        if res.value < 0:
            raise OSError(-res.value, f"bind_interdomain({domid}, {remote_port}) failed")
        return hc.EvtchnBindInterdomain.unpack(res.data).local_port

    async def close_port(self, port: int) -> None:
        await self._call(EventChannelOp(EVTCHNOP.close, hc.EvtchnClose(port).pack()))

    async def notify(self, port: int) -> None:
        """``EVTCHNOP_send``, one-way: nobody waits for its (always 0) result.
        Through the event-channel device when there is one."""
        if self.device is not None and self.device.notify(port):
            self.device_sends += 1
            return
        self.hypercalls += 1
        await self.chan.send(EventChannelOp(EVTCHNOP.send, hc.EvtchnSend(port).pack()))

    async def _call(self, msg: object) -> object:
        self.hypercalls += 1
        return await self.chan.call(msg, timeout=HYPERCALL_TIMEOUT)


RUNS_KEPT = 4096


@attrs.define(eq=False)
class GrantCache:
    """The mappings of one connection to ``domid``."""

    hv: Dom0Hypervisor
    domid: int
    persistent: bool
    persistent_maps: dict[int, Mapping] = attrs.Factory(dict)
    _gfns: dict[int, int] = attrs.Factory(dict)  #: ref -> frame of persistent_maps
    #: refs of a request -> frame of the first, when they are persistently
    #: mapped frames that follow one another (a frontend reuses its page runs)
    _runs: dict[tuple[int, ...], int] = attrs.Factory(dict)
    #: the segment records of an INDIRECT request -> (frame of its first page,
    #: sectors) when they name whole pages of such a run: a frontend that
    #: reuses its runs reuses their indirect pages' contents too, so a repeat
    #: costs one ``bytes`` lookup instead of unpacking and hashing 256 refs
    _indirect_runs: dict[bytes, tuple[int, int]] = attrs.Factory(dict)
    maps: int = 0
    unmaps: int = 0
    persistent_hits: int = 0
    failures: int = 0

    def lookup(self, refs: Sequence[int]) -> list[int] | None:
        """The frames of ``refs`` if every one is persistently mapped already
        (no hypercall: the steady state of a persistent-grant frontend), else None."""
        if not self.persistent:
            return None
        found = list(map(self._gfns.get, refs))
        if None in found:
            return None
        self.persistent_hits += len(found)
        return found  # type: ignore[return-value]

    async def acquire(
        self, refs: Sequence[tuple[int, bool]]
    ) -> tuple[list[Mapping | GrantError], list[Mapping]]:
        """Map ``(ref, readonly)`` grants: results in order, and the temporary
        mappings to hand back to :meth:`release` whatever happens next."""
        results: list[Mapping | GrantError | None] = [None] * len(refs)
        wanted: list[tuple[int, bool]] = []
        where: list[int] = []
        for k, (ref, ro) in enumerate(refs):
            hit = self.persistent_maps.get(ref) if self.persistent else None
            if hit is not None:
                self.persistent_hits += 1
                results[k] = hit
            else:
                # Persistent grants are granted writable and mapped so, once.
                wanted.append((ref, ro and not self.persistent))
                where.append(k)
        temporary: list[Mapping] = []
        mapped = await self.hv.map(self.domid, wanted)
        self.maps += len(wanted)
        for k, res in zip(where, mapped, strict=True):
            results[k] = res
            if isinstance(res, GrantError):
                self.failures += 1
            elif (
                self.persistent
                and res.ref not in self.persistent_maps
                and len(self.persistent_maps) < MAX_PERSISTENT_GRANTS
            ):
                self.persistent_maps[res.ref] = res
                self._gfns[res.ref] = res.gfn
            else:
                temporary.append(res)
        return results, temporary  # type: ignore[return-value]

    def lookup_run(self, refs: tuple[int, ...]) -> int | None:
        """The frame of ``refs[0]`` if every ref is persistently mapped and
        their frames are consecutive (one buffer for the whole request), else
        None. Persistent mappings stay until disconnect, so answers are kept."""
        first = self._runs.get(refs)
        if first is not None:
            self.persistent_hits += len(refs)
            return first
        gfns = self.lookup(refs)
        if gfns is None:
            return None
        g0, n = gfns[0], len(gfns)
        if gfns[-1] - g0 != n - 1 or gfns != list(range(g0, g0 + n)):
            return None
        if len(self._runs) >= RUNS_KEPT:
            self._runs.clear()
        self._runs[refs] = g0
        return g0

    def lookup_indirect_run(self, segments: bytes) -> tuple[int, int] | None:
        """``(frame, sectors)`` :meth:`remember_indirect_run` kept for these
        segment records, else None."""
        hit = self._indirect_runs.get(segments)
        if hit is not None:
            self.persistent_hits += len(segments) // SEGMENT_SIZE
        return hit

    def remember_indirect_run(self, segments: bytes, first: int, nsect: int) -> None:
        """Segment records whose refs :meth:`lookup_run` found as one run at
        frame ``first``, covering ``nsect`` whole-page sectors. Kept until
        disconnect, as the persistent mappings they rest on."""
        if len(self._indirect_runs) >= RUNS_KEPT:
            self._indirect_runs.clear()
        self._indirect_runs[segments] = (first, nsect)

    async def release(self, temporary: Sequence[Mapping]) -> None:
        self.unmaps += len(temporary)
        await self.hv.unmap(temporary)

    async def release_all(self) -> None:
        """On disconnect: every persistent mapping goes too."""
        kept, self.persistent_maps = list(self.persistent_maps.values()), {}
        self._gfns, self._runs, self._indirect_runs = {}, {}, {}
        await self.release(kept)
