"""A minimal blkfront played by the test process, to prove blkback on its own.

It is the guest: bound to the hypervisor as the guest's vCPU0 (its token), to
xenstored as the guest's domid, with the guest's RAM file mapped, it does what
the guest kernel's blkfront does (xen-reference 2.4, 3, 4, 6): grant table
frames in its physmap, ring pages initialised and granted to dom0, an unbound
port for dom0, the ring keys and Initialised in one transaction, then requests
written into the ring with the real codecs, ``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY``
and ``EVTCHNOP_send``, responses taken in its upcall handler (a scan of the
real ``shared_info`` pending bits) with ``RING_FINAL_CHECK_FOR_RESPONSES``.
Every response is recorded, so tests can check "exactly one response per id".
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from services.backend.blkback_ring import IndexSafeSRing
from services.hypervisor import control as ctl
from services.hypervisor.effects import Upcall
from services.hypervisor.messages import EventChannelOp, HvmOp, MemoryOp
from services.xenstore.client import XsClient, XsClientError, open_xs_client
from services.xenstore.messages import host_secret as xs_secret
from shared.abi import blkif as bi
from shared.abi import grant as gt
from shared.abi import hypercall as hc
from shared.abi import sharedinfo as si
from shared.abi.constants import DOMID, EVTCHNOP, HVM_PARAM, HVMOP, XENMAPSPACE, XENMEM, XenbusState
from shared.abi.ring import PAGE_SIZE, FrontRing
from shared.guestmem import GuestMemory
from shared.transport import Channel, open_channel
from tests.blk_harness import vbd_paths

SHARED_INFO_GFN = 2
GRANT_GFN0 = 3
GRANT_FRAMES = 8
FIRST_FREE_GFN = 16
RING_AREA = 128  # top pages: 8 areas of 16 for the rings of successive connections
CALLBACK = (2 << 56) | 0xF3
SECTOR = bi.SECTOR_SIZE
S = XenbusState


@attrs.define(eq=False)
class InFlight:
    slot: bytes
    done: trio.Event = attrs.Factory(trio.Event)
    response: bi.BlkifResponse | None = None
    submitted: int = 0  #: position in the frontend's event order when pushed
    acked: int = 0  #: position when its response was taken


class BlkFrontend:
    """Use :func:`open_frontend`."""

    def __init__(self, domid: int, devid: int, vcpu: Channel, xs: XsClient, mem: GuestMemory):
        self.domid, self.devid = domid, devid
        self.vcpu, self.xs, self.mem = vcpu, xs, mem
        self.fe, self.be = vbd_paths(domid, devid)
        self.free_gfns = list(range(mem.nr_pages - RING_AREA - 1, FIRST_FREE_GFN - 1, -1))
        self.connects = 0
        self.free_refs = list(range(GRANT_FRAMES * gt.GRANT_ENTRIES_PER_FRAME - 1, 7, -1))
        self.table = mem.view[GRANT_GFN0 * PAGE_SIZE : (GRANT_GFN0 + GRANT_FRAMES) * PAGE_SIZE]
        self.ring: FrontRing | None = None
        self.ring_pages: list[tuple[int, int]] = []
        self.port = 0
        self.next_id = 1
        self.clock = itertools.count(1)
        self.inflight: dict[int, InFlight] = {}
        self.responses: collections.Counter[int] = collections.Counter()
        self.stray: list[int] = []  #: responses for ids not in flight
        self.backend: dict[str, bytes] = {}
        self.persistent = False
        self.order = 0
        self.closed = False
        self.backlog: collections.deque[bytes] = collections.deque()
        self.pool: list[tuple[int, int]] = []  # persistent (gfn, ref), granted writable
        self.notifies = 0
        self.upcalls = 0
        # Opt-in for streaming users (bench/block.py): every completed request
        # is appended here, and ``progress`` is set (then replaced) after each
        # batch of responses.
        self.completions: collections.deque[InFlight] | None = None
        self.progress = trio.Event()
        self.media_changes = 0
        self._views: list[memoryview] = []

    # --- guest kernel -----------------------------------------------------------------

    async def call(self, msg: Any) -> Any:
        return await self.vcpu.call(msg, timeout=10)

    async def evtchn(self, cmd: int, rec: Any) -> Any:
        res = await self.call(EventChannelOp(cmd, rec.pack()))
        assert res.value >= 0, (cmd, res.value)
        return type(rec).unpack(res.data) if res.data else None

    async def boot(self) -> None:
        arg = hc.XenAddToPhysmap(DOMID.SELF, XENMAPSPACE.shared_info, 0, SHARED_INFO_GFN).pack()
        assert (await self.call(MemoryOp(XENMEM.add_to_physmap, arg))).value == 0
        param = hc.XenHvmParam(DOMID.SELF, HVM_PARAM.CALLBACK_IRQ, CALLBACK).pack()
        assert (await self.call(HvmOp(HVMOP.set_param, param))).value == 0
        for k in range(GRANT_FRAMES):
            arg = hc.XenAddToPhysmap(DOMID.SELF, XENMAPSPACE.grant_table, k, GRANT_GFN0 + k).pack()
            assert (await self.call(MemoryOp(XENMEM.add_to_physmap, arg))).value == 0
        await self.xs.watch(f"{self.be}/state", "be")

    def grant_buffer(self, npages: int) -> list[tuple[int, int]]:
        """``npages`` pages at consecutive frames, granted writable to dom0 (a
        persistent-grant I/O buffer); (gfn, ref) of each, in frame order."""
        gfns = [self.free_gfns.pop() for _ in range(npages)]
        assert gfns == list(range(gfns[0], gfns[0] + npages)), "free frames are not consecutive"
        pages = []
        for gfn in gfns:
            ref = self.free_refs.pop()
            gt.write_grant(self.table, ref, 0, gfn, False)
            pages.append((gfn, ref))
        return pages

    def grant_page(self, readonly: bool = False) -> tuple[int, int]:
        gfn, ref = self.free_gfns.pop(), self.free_refs.pop()
        gt.write_grant(self.table, ref, 0, gfn, readonly)
        return gfn, ref

    def end_page(self, gfn: int, ref: int) -> None:
        if gt.end_grant(self.table, ref):  # still mapped (a dead backend's): leak it
            self.free_refs.append(ref)
            self.free_gfns.append(gfn)

    async def upcall_loop(self) -> None:
        """The vector callback: scan shared_info, then service our port."""
        shared = self.mem.view[SHARED_INFO_GFN * PAGE_SIZE : (SHARED_INFO_GFN + 1) * PAGE_SIZE]
        vi = si.vcpu_info_offset(0)
        while True:
            msg = await self.vcpu.receive()
            if not isinstance(msg, Upcall) or self.closed:
                continue
            self.upcalls += 1
            ports = []
            while si.upcall_pending(shared, vi):
                si.set_upcall_pending(shared, vi, False)
                sel = si.take_pending_sel(shared, vi)
                for word in range(64):
                    if sel >> word & 1:
                        bits = si.pending_word(shared, word)
                        for bit in range(64):
                            if bits >> bit & 1:
                                si.evtchn_clear_pending(shared, word * 64 + bit)
                                ports.append(word * 64 + bit)
            if self.port in ports:
                self.take_responses()
                if self._refill():
                    await self.kick()

    # --- xenbus ---------------------------------------------------------------------------

    async def read_be(self, key: str) -> bytes | None:
        try:
            return await self.xs.read(f"{self.be}/{key}")
        except XsClientError:
            return None

    async def backend_state(self) -> S:
        return S(int(await self.read_be("state") or b"0"))

    async def wait_backend(self, *states: S, timeout: float = 20) -> S:
        with trio.fail_after(timeout):
            while True:
                state = await self.backend_state()
                if state in states:
                    return state
                await self.xs.event()

    async def set_state(self, state: S) -> None:
        await self.xs.write(f"{self.fe}/state", str(int(state)).encode())

    async def connect(self, order: int = 0, persistent: bool = False) -> None:
        """blkfront's talk_to_blkback + connect (xen-reference 2.4)."""
        await self.wait_backend(S.InitWait)
        max_order = int(await self.read_be("max-ring-page-order") or b"0")
        order = min(order, max_order)
        base = self.mem.nr_pages - RING_AREA + (self.connects % 8) * 16
        self.connects += 1
        self.ring_pages = []
        for gfn in range(base, base + (1 << order)):
            ref = self.free_refs.pop()
            gt.write_grant(self.table, ref, 0, gfn)
            self.ring_pages.append((gfn, ref))
        gfns = [g for g, _ in self.ring_pages]
        buf = self._ring_buffer(gfns)
        # Index stores that a concurrent reader never sees half-done (see
        # services.backend.blkback_ring.IndexSafeSRing).
        sring = IndexSafeSRing(buf, bi.BLKIF_RING_ENTRY_SIZE, PAGE_SIZE << order)
        self._views.append(sring._idx)
        sring.init()
        self.ring = FrontRing(sring)
        unbound = await self.evtchn(EVTCHNOP.alloc_unbound, hc.EvtchnAllocUnbound(DOMID.SELF, 0))
        self.port = unbound.port
        self.persistent = persistent
        keys = {"event-channel": str(self.port), "protocol": "x86_64-abi"}
        keys["feature-persistent"] = "1" if persistent else "0"
        if order == 0:
            keys["ring-ref"] = str(self.ring_pages[0][1])
        else:
            keys["ring-page-order"] = str(order)
            keys |= {f"ring-ref{i}": str(ref) for i, (_, ref) in enumerate(self.ring_pages)}
        self.order = order
        while True:
            tx = await self.xs.transaction_start()
            for stale in await self.xs.directory(self.fe, tx):  # keys of an older ring
                if stale.startswith((b"ring-ref", b"ring-page-order")):
                    await self.xs.rm(f"{self.fe}/{stale.decode()}", tx)
            for k, v in keys.items():
                await self.xs.write(f"{self.fe}/{k}", v.encode(), tx)
            await self.xs.write(f"{self.fe}/state", b"3", tx)
            try:
                await self.xs.transaction_end(tx)
                break
            except XsClientError as exc:
                if exc.name != "EAGAIN":
                    raise
        await self.wait_backend(S.Connected)
        await self.read_backend_info()
        await self.set_state(S.Connected)

    def close(self) -> None:
        """Release our views of guest RAM, then the mapping."""
        self.closed = True
        self.ring = None
        self.table.release()
        for view in self._views:
            view.release()
        try:
            self.mem.close()
        except BufferError:
            pass

    def _ring_buffer(self, gfns: list[int]) -> memoryview:
        if gfns == list(range(gfns[0], gfns[0] + len(gfns))):
            view = self.mem.view[gfns[0] * PAGE_SIZE : (gfns[-1] + 1) * PAGE_SIZE]
            self._views.append(view)
            return view
        raise AssertionError("multi-page rings use consecutive pages here")

    async def read_backend_info(self) -> None:
        for k in (
            "sectors",
            "info",
            "sector-size",
            "physical-sector-size",
            "feature-flush-cache",
            "feature-barrier",
            "feature-discard",
            "feature-persistent",
            "feature-max-indirect-segments",
        ):
            self.backend[k] = await self.read_be(k) or b""

    @property
    def sectors(self) -> int:
        return int(self.backend["sectors"])

    @property
    def info(self) -> bi.VDisk:
        return bi.VDisk(int(self.backend["info"]))

    async def wait_media_change(self, timeout: float = 10) -> None:
        """Connected -> Connected with new ``sectors``: re-read the disk facts."""
        old = (self.backend.get("sectors"), self.backend.get("info"))
        with trio.fail_after(timeout):
            while True:
                if await self.backend_state() == S.Connected:
                    await self.read_backend_info()
                    if (self.backend["sectors"], self.backend["info"]) != old:
                        self.media_changes += 1
                        return
                await self.xs.event()

    async def recover(self) -> None:
        """The backend went away and came back (xen-reference 2.8): close, start
        over with a new ring, grants and port, and re-issue what had no response."""
        await self.wait_backend(S.Closing, S.Closed)
        if self.ring is not None:
            self.take_responses()  # what the old backend did answer counts
        await self.teardown()
        await self.set_state(S.Closed)
        await self.wait_backend(S.Closed)
        await self.set_state(S.Initialising)
        await self.connect(self.order, persistent=self.persistent)
        self.backlog.clear()  # everything without a response goes again, in id order
        for _rid, entry in sorted(self.inflight.items()):
            self._put(entry.slot)
        await self.kick()

    async def teardown(self) -> None:
        await self.evtchn(EVTCHNOP.close, hc.EvtchnClose(self.port))
        for _gfn, ref in self.ring_pages:
            gt.end_grant(self.table, ref)
        self.ring, self.ring_pages, self.port = None, [], 0

    # --- ring -----------------------------------------------------------------------------

    def _put(self, slot: bytes) -> None:
        """Into the ring, or behind it when every slot is taken (as blkfront queues)."""
        if self.ring is None or self.ring.full() or self.backlog:
            self.backlog.append(slot)
        else:
            self.ring.put_request(slot)

    def _refill(self) -> bool:
        moved = False
        while self.ring is not None and self.backlog and not self.ring.full():
            self.ring.put_request(self.backlog.popleft())
            moved = True
        return moved

    async def kick(self) -> None:
        assert self.ring is not None
        if self.ring.push_requests_and_check_notify():
            self.notifies += 1
            await self.evtchn(EVTCHNOP.send, hc.EvtchnSend(self.port))

    def take_responses(self) -> None:
        ring = self.ring
        if ring is None:
            return
        while True:
            for raw in ring.take_responses():
                rsp = bi.BlkifResponse.decode(raw)
                self.responses[rsp.id] += 1
                entry = self.inflight.pop(rsp.id, None)
                if entry is None:
                    self.stray.append(rsp.id)
                    continue
                entry.response = rsp
                entry.acked = next(self.clock)
                entry.done.set()
                if self.completions is not None:
                    self.completions.append(entry)
            if not ring.final_check_for_responses():
                self.progress.set()
                self.progress = trio.Event()
                return

    def put_requests(self, slots: list[bytes]) -> list[InFlight]:
        """Put encoded requests (``id`` at offset 8) in the ring, not yet pushed;
        synchronous, so a cancelled caller never leaves half a batch unrecorded."""
        out = []
        for slot in slots:
            rid = int.from_bytes(slot[8:16], "little")
            entry = self.inflight[rid] = InFlight(slot, submitted=next(self.clock))
            self._put(slot)
            out.append(entry)
        return out

    async def submit_raw(self, slots: list[bytes]) -> list[InFlight]:
        """Put encoded requests and kick once."""
        out = self.put_requests(slots)
        await self.kick()
        return out

    async def wait(self, entries: list[InFlight], timeout: float = 20) -> list[int]:
        with trio.fail_after(timeout):
            for e in entries:
                await e.done.wait()
        return [e.response.status for e in entries]  # type: ignore[union-attr]

    # --- data requests -------------------------------------------------------------------

    def _page(self, readonly: bool) -> tuple[int, int]:
        if self.persistent:
            return self.pool.pop() if self.pool else self.grant_page(readonly=False)
        return self.grant_page(readonly)

    def _unpage(self, gfn: int, ref: int) -> None:
        if self.persistent:
            self.pool.append((gfn, ref))
        else:
            self.end_page(gfn, ref)

    def peek_id(self) -> int:
        """The id the next :meth:`prepare` will use."""
        return self.next_id

    def prepare(
        self,
        op: int,
        sector: int,
        data: bytes | None = None,
        nbytes: int = 0,
        indirect: bool = False,
    ) -> Request:
        """Grant pages for ``data`` (a write) or ``nbytes`` (a read) and encode the request;
        more than 11 segments, or ``indirect``, makes it a BLKIF_OP_INDIRECT."""
        nbytes = len(data) if data is not None else nbytes
        assert nbytes % SECTOR == 0
        rid, self.next_id = self.next_id, self.next_id + 1
        readonly = op != bi.BlkifOp.READ
        pages, segs = [], []
        for off in range(0, nbytes, PAGE_SIZE):
            gfn, ref = self._page(readonly)
            chunk = min(PAGE_SIZE, nbytes - off)
            if data is not None:
                self.mem.write(gfn, 0, data[off : off + chunk])
            pages.append((gfn, ref))
            segs.append(bi.Segment(ref, 0, chunk // SECTOR - 1))
        ind_pages = []
        if indirect or len(segs) > bi.BLKIF_MAX_SEGMENTS_PER_REQUEST:
            for k in range(0, len(segs), bi.SEGMENTS_PER_INDIRECT_FRAME):
                gfn, ref = self._page(True)
                chunk = segs[k : k + bi.SEGMENTS_PER_INDIRECT_FRAME]
                self.mem.write(gfn, 0, bi.encode_indirect_page(chunk))
                ind_pages.append((gfn, ref))
            req: Any = bi.BlkifRequestIndirect(
                op, len(segs), rid, sector, self.devid, tuple(r for _, r in ind_pages)
            )
        else:
            req = bi.BlkifRequest.of(op, self.devid, rid, sector, tuple(segs))
        return Request(rid, op, nbytes, req.encode().ljust(112, b"\0"), pages, ind_pages)

    def finish(self, req: Request) -> bytes:
        """Copy a read's data out of its pages and give every page back."""
        out = bytearray()
        for gfn, _ in req.pages:
            out += self.mem.read(gfn, 0, min(PAGE_SIZE, req.nbytes - len(out)))
        for gfn, ref in req.pages + req.ind_pages:
            self._unpage(gfn, ref)
        req.pages, req.ind_pages = [], []  # given back once
        return bytes(out) if req.op == bi.BlkifOp.READ else b""

    async def run(self, reqs: list[Request], timeout: float = 30) -> list[tuple[int, bytes]]:
        """Submit ``reqs`` together (one kick), wait for all, release their pages."""
        entries = await self.submit_raw([r.slot for r in reqs])
        statuses = await self.wait(entries, timeout)
        return [(s, self.finish(r)) for s, r in zip(statuses, reqs, strict=True)]

    async def io(
        self,
        op: int,
        sector: int,
        data: bytes | None = None,
        nbytes: int = 0,
        indirect: bool = False,
    ) -> tuple[int, bytes]:
        return (await self.run([self.prepare(op, sector, data, nbytes, indirect)]))[0]


@attrs.define(eq=False)
class Request:
    id: int
    op: int
    nbytes: int
    slot: bytes
    pages: list[tuple[int, int]]
    ind_pages: list[tuple[int, int]]


async def open_frontend(
    host: Any, created: ctl.DomainCreated, devid: int, stack: AsyncExitStack
) -> BlkFrontend:
    """Bind as the guest's vCPU0 and as its domid in xenstore, map its RAM, boot.
    Run :meth:`BlkFrontend.upcall_loop` in a nursery that ends before ``stack``."""
    vcpu = await stack.enter_async_context(open_channel(host.endpoint("hypervisor")))
    await vcpu.call(ctl.VcpuHello(created.domid, 0, created.tokens[0]), timeout=10)
    xs = await stack.enter_async_context(
        open_xs_client(host.endpoint("xenstore"), created.domid, xs_secret(host.rundir))
    )
    mem = GuestMemory.open(Path(created.memory_path))
    fe = BlkFrontend(created.domid, devid, vcpu, xs, mem)
    stack.callback(fe.close)
    await fe.boot()
    return fe


@asynccontextmanager
async def frontend(host: Any, created: ctl.DomainCreated, devid: int) -> AsyncIterator[BlkFrontend]:
    """A booted :class:`BlkFrontend`; its upcall task stops before its channels
    and memory go, so an error in the block is the one reported."""
    async with AsyncExitStack() as stack:
        fe = await open_frontend(host, created, devid, stack)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fe.upcall_loop)
            try:
                yield fe
            finally:
                nursery.cancel_scope.cancel()
