"""One connected blkif ring (Trio adapter over the sans-IO request core).

The intake task copies requests off the ring (``RING_COPY_REQUEST``), admits
or refuses each (:mod:`blkback_request`), queues the admitted ones
(:mod:`blkback_order`) and starts whatever the queue allows.

A READ or WRITE whose grants are all persistently mapped already (the steady
state with ``feature-persistent``) and whose data fits ``INLINE_LIMIT`` runs
right there, on the intake task (:mod:`blkback_inline`). The responses of
everything one intake ran are pushed together, with at most one
notification, or sooner once they moved :data:`PUSH_BYTES`.

Anything else goes into a *round*: one task that maps every grant of its
requests in one hypercall (a second one for the data pages behind indirect
descriptors), runs each request's I/O on the image (flushes and discards on a
worker thread), unmaps, and only then writes the responses, pushes them and
notifies the frontend if ``rsp_event`` asks for it. Rounds run concurrently;
the queue keeps barriers and flushes in order. A bad request costs an error
response and a counter, never the ring.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import attrs
import trio

from services.backend.blkback_grants import Dom0Hypervisor, GrantCache, GrantError, Mapping
from services.backend.blkback_image import INLINE_LIMIT, DiskImage, run_blocking
from services.backend.blkback_inline import InlineRequests
from services.backend.blkback_order import ExecutionLog, OrderingQueue
from services.backend.blkback_request import (
    Admitted,
    DeviceLimits,
    IoPlan,
    Kind,
    admit_and_plan,
    indirect_columns,
    plan,
)
from shared.abi.blkif import (
    RESPONSE,
    SECTOR_SIZE,
    BlkifProtocolError,
    BlkifRequestIndirect,
    BlkifRsp,
    decode_request,
    response_for,
)
from shared.abi.ring import BackRing, RingError
from shared.guestmem import PAGE_SIZE, GuestMemory, GuestMemoryError

STOP_TIMEOUT = 10.0


_RESPONSE = RESPONSE.struct
_DATA_KINDS = (Kind.READ, Kind.WRITE)
# Requests taken off the ring between two pushes of responses (4 KiB reads at
# queue depth 32: 2 kept both ends streaming, ~170 k IOPS with a kick per
# ~400 requests; 4 let the frontend drain and sleep, ~120 k; 1 cost more in
# pushes than it gave)...
INTAKE_BATCH = 2
# ... or fewer, once the ones run inline moved this much data.
PUSH_BYTES = 512 * 1024


@attrs.define(eq=False)
class _Job:
    seq: int
    admitted: Admitted
    plan: IoPlan | None  #: None for INDIRECT until its pages are read
    limits: DeviceLimits  #: what ``plan`` was checked against
    rsp_op: int  #: ``operation`` of the response (``indirect_op`` for INDIRECT)
    status: int = BlkifRsp.OKAY
    maps: list[Mapping] = attrs.Factory(list)  #: mapped this round (slow path)
    gfns: list[int] = attrs.Factory(list)  #: frame of each data segment, in order


class Blkif(InlineRequests):
    """A ring to frontend ``domid`` on event channel ``port`` (ours)."""

    def __init__(
        self,
        conn_id: int,
        hv: Dom0Hypervisor,
        memory: GuestMemory,
        ring: BackRing,
        port: int,
        grants: GrantCache,
        image: DiskImage | None,
        limits: DeviceLimits,
        log: ExecutionLog,
        counters: collections.Counter[str],
    ) -> None:
        self.conn_id = conn_id
        self.hv = hv
        self.memory = memory
        self.ring = ring
        self.port = port
        self.grants = grants
        self.image = image
        self.limits = limits
        self.log = log
        self.counters = counters
        self.queue = OrderingQueue()
        self._jobs: dict[int, _Job] = {}
        self._kick = trio.Event()
        self._rounds = 0
        self._idle = trio.Event()
        self._closing = False
        self._unpushed = False  # responses written since the last push
        self._unpushed_bytes = 0  #: data those moved (inline requests)
        self.broken = False
        self._cancel = trio.CancelScope()

    def kick(self) -> None:
        """The frontend's event fired (or a round finished): look at the ring."""
        self._kick.set()

    def set_medium(self, image: DiskImage | None, limits: DeviceLimits) -> None:
        self.image, self.limits = image, limits

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._cancel:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while not self._closing:
                    await self._kick.wait()
                    self._kick = trio.Event()
                    if not self._closing and not self.broken:
                        await self._intake()
                    if self._unpushed:
                        await self._push()

    async def stop(self) -> None:
        """Take no new request, let rounds in flight finish, then stop."""
        self._closing = True
        self._kick.set()
        with trio.move_on_after(STOP_TIMEOUT):
            while self._rounds:
                self._idle = trio.Event()
                await self._idle.wait()
        self._cancel.cancel()

    # --- intake --------------------------------------------------------------------

    async def _intake(self) -> None:
        """Take requests :data:`INTAKE_BATCH` at a time, run what can run, and
        push those responses before taking more: the frontend starts on them
        while we work on the rest (two vCPUs busy instead of taking turns).
        ``rsp_event`` holds the notifications back until the frontend has
        caught up, and ``req_event`` is re-armed only once the ring is empty."""
        ring = self.ring
        while True:
            try:
                slots = ring.take_requests(INTAKE_BATCH)
            except RingError:
                self.counters["ring_overflow"] += 1
                self.broken = True  # a frontend that lies about req_prod: stop reading
                return
            for slot in slots:
                self._accept(slot)
                if self._unpushed_bytes >= PUSH_BYTES:
                    await self._push()  # a big one done: the frontend copies it now
            self._dispatch()
            if self._unpushed:
                await self._push()
            if not ring.final_check_for_requests() or self._closing:
                break

    def _accept(self, slot: bytes) -> None:
        self.counters["requests"] += 1
        if not self.queue and self._run_fast(slot):
            return
        try:
            admitted, io = admit_and_plan(slot, self.limits)
        except BlkifProtocolError as exc:
            req = decode_request(slot)
            self._refused(str(exc), exc.status)
            self.ring.put_response(response_for(req, exc.status).encode())
            self._unpushed = True
            return
        req = admitted.request
        rsp_op = req.indirect_op if isinstance(req, BlkifRequestIndirect) else req.operation
        seq = self.queue.submit(admitted.kind)
        self._jobs[seq] = _Job(seq, admitted, io, self.limits, rsp_op)

    def _refused(self, why: str, status: int) -> None:
        self.counters["errors"] += 1
        reason = why.split(":")[0] if ":" in why else why.split(" ")[0]
        self.counters[f"refused:{BlkifRsp(status).name.lower()}:{reason}"] += 1

    def _dispatch(self) -> None:
        """Start what the queue allows: inline what can be, the rest as a round."""
        while seqs := self.queue.startable():
            jobs = [self._jobs.pop(s) for s in seqs]
            slow = [job for job in jobs if not self._run_inline(job)]
            if slow:
                self._rounds += 1
                self._nursery.start_soon(self._round, slow)
            if len(slow) == len(jobs):
                return  # nothing completed, so nothing new can start

    def _respond(self, job: _Job) -> None:
        self.queue.complete(job.seq)
        self.ring.put_response(_RESPONSE.pack(job.admitted.request.id, job.rsp_op, job.status))
        self.counters["responses"] += 1
        self._unpushed = True

    # --- a round -------------------------------------------------------------------------

    async def _round(self, jobs: list[_Job]) -> None:
        temporary: list[Mapping] = []
        try:
            indirect = [j for j in jobs if j.admitted.indirect_grefs and j.plan is None]
            await self._map(
                indirect, temporary, lambda j: [(g, True) for g in j.admitted.indirect_grefs]
            )
            for job in indirect:
                if job.status == BlkifRsp.OKAY:
                    self._read_indirect(job, [m.gfn for m in job.maps])
            await self._map(jobs, temporary, _segment_refs)
            threaded = []
            for job in jobs:
                if job.status != BlkifRsp.OKAY:
                    continue
                job.gfns = [m.gfn for m in job.maps]
                io = job.plan
                if io is not None and io.kind in _DATA_KINDS and io.nbytes <= INLINE_LIMIT:
                    self._execute_inline(job)
                else:
                    threaded.append(job)
            if threaded:
                async with trio.open_nursery() as nursery:  # requests of a round overlap
                    for job in threaded:
                        nursery.start_soon(self._execute, job)
        finally:
            with trio.CancelScope(shield=True):
                await self.grants.release(temporary)
                for job in jobs:
                    self._respond(job)
                await self._push()
                self._rounds -= 1
                self._idle.set()
        self._dispatch()
        self.kick()

    async def _map(
        self, jobs: list[_Job], temporary: list[Mapping], refs_of: Callable[[_Job], list]
    ) -> None:
        live = [j for j in jobs if j.status == BlkifRsp.OKAY]
        wanted = [refs_of(j) for j in live]
        flat = [r for refs in wanted for r in refs]
        if not flat:
            return
        results, temp = await self.grants.acquire(flat)
        temporary += temp
        at = 0
        for job, refs in zip(live, wanted, strict=True):
            got = results[at : at + len(refs)]
            at += len(refs)
            bad = [g for g in got if isinstance(g, GrantError)]
            if bad:
                job.status = BlkifRsp.ERROR
                self._refused(f"grant: {bad[0]}", BlkifRsp.ERROR)
            else:
                job.maps = got  # type: ignore[assignment]

    def _read_indirect(self, job: _Job, gfns: list[int]) -> None:
        """Plan an INDIRECT request from its segment pages (frames ``gfns``)."""
        req = job.admitted.request
        assert isinstance(req, BlkifRequestIndirect)
        try:
            raw = b"".join([self.memory.read(g) for g in gfns])
            job.plan = plan(job.admitted, self.limits, indirect_columns(raw, req.nr_segments))
            job.limits = self.limits
        except (BlkifProtocolError, GuestMemoryError) as exc:
            job.status = getattr(exc, "status", BlkifRsp.ERROR)
            self._refused(f"indirect: {exc}", job.status)

    def _current_plan(self, job: _Job) -> IoPlan | None:
        """The job's plan against the medium in the drive now (it may have changed)."""
        try:
            if job.limits is not self.limits or job.plan is None:
                job.plan = plan(job.admitted, self.limits, job.plan and job.plan.segments)
                job.limits = self.limits
        except BlkifProtocolError as exc:
            job.status = exc.status
            self._refused(str(exc), exc.status)
            return None
        io = job.plan
        if self.image is None and (io.nbytes or io.kind is Kind.DISCARD):
            job.status = BlkifRsp.ERROR
            self._refused("medium: none", BlkifRsp.ERROR)
            return None
        return io

    def _buffers(self, io: IoPlan, gfns: list[int]) -> list[memoryview]:
        """The iovec of ``io``: its segments' bytes in the guest's pages, with
        segments that touch in guest memory merged into one entry."""
        if not gfns:
            return []
        if min(gfns) < 0 or max(gfns) >= self.memory.nr_pages:
            raise GuestMemoryError(f"a frame of {gfns} is outside guest memory")
        view = self.memory.view
        cols = io.segments
        g0, n = gfns[0], len(gfns)
        if cols.whole_pages and gfns[-1] - g0 == n - 1 and gfns == list(range(g0, g0 + n)):
            return [view[g0 * PAGE_SIZE : (g0 + n) * PAGE_SIZE]]
        bufs: list[memoryview] = []
        start = end = -1
        for gfn, first, last in zip(gfns, cols.firsts, cols.lasts, strict=True):
            a = gfn * PAGE_SIZE + first * SECTOR_SIZE
            if a != end:
                if end >= 0:
                    bufs.append(view[start:end])
                start = a
            end = gfn * PAGE_SIZE + (last + 1) * SECTOR_SIZE
        bufs.append(view[start:end])
        return bufs

    async def _execute(self, job: _Job) -> None:
        io = self._current_plan(job)
        if io is None:
            return
        with self._io_step(job, io) as bufs:
            await self._do_io(self.image, io, bufs)

    async def _do_io(self, image: DiskImage | None, io: IoPlan, bufs: list[memoryview]) -> None:
        if image is None:
            return  # an empty flush or barrier with no medium: nothing to make durable
        if io.kind is Kind.READ:
            await run_blocking(image.readv, io.offset, bufs, nbytes=io.nbytes)
        elif io.kind is Kind.DISCARD:
            await run_blocking(image.discard, io.offset, io.discard_bytes)
        else:
            if bufs:
                await run_blocking(image.writev, io.offset, bufs, nbytes=io.nbytes)
            if io.kind in (Kind.FLUSH, Kind.BARRIER) and not image.readonly:
                await run_blocking(image.flush)

    def _record(self, job: _Job, event: str, io: IoPlan) -> None:
        self.log.record_fields(
            self.conn_id,
            job.seq,
            job.admitted.request.id,
            io.kind.value,
            event,
            io.offset // SECTOR_SIZE,
            (io.nbytes or io.discard_bytes) // SECTOR_SIZE,
        )

    async def _push(self) -> None:
        self._unpushed = False
        self._unpushed_bytes = 0
        if self.ring.push_responses_and_check_notify():
            self.counters["notifications"] += 1
            await self.hv.notify(self.port)


def _segment_refs(job: _Job) -> list[tuple[int, bool]]:
    """Grants of the data pages: READ fills them (writable map), others read them."""
    if job.plan is None:
        return []
    readonly = not job.admitted.writes_guest_pages
    return [(g, readonly) for g in job.plan.segments.grefs]
