"""One connected blkif ring (Trio adapter over the sans-IO request core).

The intake task copies requests off the ring (``RING_COPY_REQUEST``), admits
or refuses each (:mod:`blkback_request`), queues the admitted ones
(:mod:`blkback_order`) and starts whatever the queue allows as a *round*: one
task that maps every grant of its requests in one hypercall (a second one for
the data pages behind indirect descriptors), runs each request's I/O on the
image, unmaps, and only then writes the responses, pushes them and notifies the
frontend if ``rsp_event`` asks for it. Rounds run concurrently; the queue keeps
barriers and flushes in order. A bad request costs an error response and a
counter, never the ring.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import attrs
import trio

from services.backend.blkback_grants import Dom0Hypervisor, GrantCache, GrantError, Mapping
from services.backend.blkback_image import DiskImage, run_blocking
from services.backend.blkback_order import ExecEvent, ExecutionLog, OrderingQueue
from services.backend.blkback_request import (
    Admitted,
    DeviceLimits,
    IoPlan,
    Kind,
    admit,
    plan,
    plan_with_segments,
)
from shared.abi.blkif import (
    SECTOR_SIZE,
    BlkifProtocolError,
    BlkifRequestIndirect,
    BlkifRsp,
    decode_indirect_segments,
    decode_request,
    response_for,
)
from shared.abi.ring import BackRing, RingError
from shared.guestmem import PAGE_SIZE, GuestMemory, GuestMemoryError

STOP_TIMEOUT = 10.0


@attrs.define(eq=False)
class _Job:
    seq: int
    admitted: Admitted
    status: int = BlkifRsp.OKAY
    plan: IoPlan | None = None
    maps: list[Mapping] = attrs.Factory(list)


class Blkif:
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
                        self._intake()

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

    def _intake(self) -> None:
        ring = self.ring
        while True:
            try:
                slots = ring.take_requests()
            except RingError:
                self.counters["ring_overflow"] += 1
                self.broken = True  # a frontend that lies about req_prod: stop reading
                return
            for slot in slots:
                self._accept(slot)
            if not ring.final_check_for_requests():
                break
        self._dispatch()

    def _accept(self, slot: bytes) -> None:
        self.counters["requests"] += 1
        try:
            admitted = admit(slot, self.limits)
        except BlkifProtocolError as exc:
            req = decode_request(slot)
            self._refused(str(exc), exc.status)
            self.ring.put_response(response_for(req, exc.status).encode())
            self._nursery.start_soon(self._push)
            return
        seq = self.queue.submit(admitted.kind)
        self._jobs[seq] = _Job(seq, admitted)

    def _refused(self, why: str, status: int) -> None:
        self.counters["errors"] += 1
        reason = why.split(":")[0] if ":" in why else why.split(" ")[0]
        self.counters[f"refused:{BlkifRsp(status).name.lower()}:{reason}"] += 1

    def _dispatch(self) -> None:
        seqs = self.queue.startable()
        if seqs:
            self._rounds += 1
            self._nursery.start_soon(self._round, [self._jobs.pop(s) for s in seqs])

    # --- a round -------------------------------------------------------------------------

    async def _round(self, jobs: list[_Job]) -> None:
        temporary: list[Mapping] = []
        try:
            direct = [j for j in jobs if not j.admitted.indirect_grefs]
            indirect = [j for j in jobs if j.admitted.indirect_grefs]
            await self._map(direct, temporary, lambda j: _segment_refs(j.admitted))
            await self._map(
                indirect, temporary, lambda j: [(g, True) for g in j.admitted.indirect_grefs]
            )
            for job in indirect:
                self._read_indirect(job)
            await self._map(indirect, temporary, lambda j: _segment_refs(j.admitted, j.plan))
            async with trio.open_nursery() as nursery:  # requests of a round overlap
                for job in jobs:
                    nursery.start_soon(self._execute, job)
        finally:
            with trio.CancelScope(shield=True):
                await self.grants.release(temporary)
                for job in jobs:
                    self.queue.complete(job.seq)
                    self.ring.put_response(response_for(job.admitted.request, job.status).encode())
                    self.counters["responses"] += 1
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

    def _read_indirect(self, job: _Job) -> None:
        if job.status != BlkifRsp.OKAY:
            return
        req = job.admitted.request
        assert isinstance(req, BlkifRequestIndirect)
        try:
            pages = [self.memory.read(m.gfn) for m in job.maps]
            segments = decode_indirect_segments(pages, req.nr_segments)
            job.plan = plan_with_segments(job.admitted, segments, self.limits)
        except (BlkifProtocolError, GuestMemoryError) as exc:
            job.status = getattr(exc, "status", BlkifRsp.ERROR)
            self._refused(f"indirect: {exc}", job.status)

    async def _execute(self, job: _Job) -> None:
        if job.status != BlkifRsp.OKAY:
            return
        try:
            io = job.plan or plan(job.admitted, self.limits)  # the medium may have changed
        except BlkifProtocolError as exc:
            job.status = exc.status
            self._refused(str(exc), exc.status)
            return
        image = self.image
        if image is None and (io.segments or io.kind in (Kind.DISCARD,)):
            job.status = BlkifRsp.ERROR
            self._refused("medium: none", BlkifRsp.ERROR)
            return
        bufs: list[memoryview] = []
        try:
            for seg, m in zip(io.segments, job.maps, strict=True):
                self.memory.check_gfn(m.gfn)
                base = m.gfn * PAGE_SIZE
                bufs.append(
                    self.memory.view[
                        base + seg.first_sect * SECTOR_SIZE : base
                        + (seg.last_sect + 1) * SECTOR_SIZE
                    ]
                )
            self._record(job, "start", io)
            await self._do_io(image, io, bufs)
            self._record(job, "done", io)
            self.counters[f"op:{io.kind.value}"] += 1
            self.counters["bytes"] += io.nbytes
        except (OSError, GuestMemoryError) as exc:
            job.status = BlkifRsp.ERROR
            self._refused(f"io: {exc}", BlkifRsp.ERROR)
        finally:
            for b in bufs:
                b.release()

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
        nr = (io.nbytes or io.discard_bytes) // SECTOR_SIZE
        sector = io.offset // SECTOR_SIZE
        self.log.record(
            ExecEvent(self.conn_id, job.seq, job.admitted.id, io.kind.value, event, sector, nr)
        )

    async def _push(self) -> None:
        if self.ring.push_responses_and_check_notify():
            self.counters["notifications"] += 1
            await self.hv.notify(self.port)


def _segment_refs(admitted: Admitted, io: IoPlan | None = None) -> list[tuple[int, bool]]:
    """Grants of the data pages: READ fills them (writable map), others read them."""
    segments = io.segments if io is not None else admitted.segments
    readonly = not admitted.writes_guest_pages
    return [(s.gref, readonly) for s in segments]
