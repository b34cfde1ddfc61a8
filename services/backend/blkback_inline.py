"""The requests blkback runs to their response on the intake task, with no
hypercall, no task and no thread: a steady-state READ or WRITE over
persistent grants straight from its slot (:mod:`blkback_fast`), and any
READ or WRITE of at most :data:`~.blkback_image.INLINE_LIMIT` bytes whose
grants are all persistently mapped already. A mixin of
:class:`~.blkback_conn.Blkif`; its I/O is one ``preadv``/``pwritev`` over
the guest's pages with adjacent frames merged into one iovec entry."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from services.backend.blkback_fast import WRITE, fast_request, whole_page_sectors
from services.backend.blkback_grants import GrantCache
from services.backend.blkback_image import INLINE_LIMIT, DiskImage
from services.backend.blkback_order import ExecutionLog, OrderingQueue
from services.backend.blkback_request import DeviceLimits, IoPlan, Kind, indirect_columns
from shared.abi.blkif import RESPONSE, SECTOR_SIZE, SEGMENT_SIZE, BlkifProtocolError, BlkifRsp
from shared.abi.ring import BackRing
from shared.guestmem import PAGE_SIZE, GuestMemory, GuestMemoryError

if TYPE_CHECKING:
    from services.backend.blkback_conn import _Job

OP_COUNTER = {k: f"op:{k.value}" for k in Kind}
_RESPONSE = RESPONSE.struct
_DATA_KINDS = (Kind.READ, Kind.WRITE)
#: by READ (0) and WRITE (1): the execution log's name, the counter
_FAST_NAMES = (Kind.READ.value, Kind.WRITE.value)
_FAST_COUNTERS = (OP_COUNTER[Kind.READ], OP_COUNTER[Kind.WRITE])
OKAY, ERROR = int(BlkifRsp.OKAY), int(BlkifRsp.ERROR)


class InlineRequests:
    """Handlers; ``self`` is the :class:`~.blkback_conn.Blkif`."""

    conn_id: int
    memory: GuestMemory
    ring: BackRing
    grants: GrantCache
    image: DiskImage | None
    limits: DeviceLimits
    log: ExecutionLog
    counters: collections.Counter[str]
    queue: OrderingQueue
    _unpushed: bool
    _unpushed_bytes: int

    def _run_fast(self, slot: bytes) -> bool:
        """Run a steady-state READ or WRITE (:mod:`blkback_fast`) to its
        response now, when nothing else is queued and every grant it names is
        persistently mapped; False leaves it to the general path."""
        got = fast_request(slot, self.limits)
        if got is None or self.image is None:
            return False
        rid, op, sector, nsect, grefs, indirect = got
        grants = self.grants
        if indirect:  # fast_request's nsect is then the segment count
            npages = nsect
            pages = grants.lookup(indirect)
            if pages is None or max(pages) >= self.memory.nr_pages:
                return False
            view = self.memory.view
            nbytes = npages * SEGMENT_SIZE
            if len(pages) == 1:
                base = pages[0] * PAGE_SIZE
                segments = bytes(view[base : base + nbytes])
            else:
                raw = b"".join([view[g * PAGE_SIZE : (g + 1) * PAGE_SIZE] for g in pages])
                segments = raw[:nbytes]
            hit = grants.lookup_indirect_run(segments)
            if hit is None:
                try:
                    cols = indirect_columns(segments, npages)
                except BlkifProtocolError:
                    return False
                nsect = whole_page_sectors(cols.firsts, cols.lasts)
                g0 = grants.lookup_run(cols.grefs) if nsect else None
                if g0 is None:
                    return False  # not whole pages, not mapped yet, or frames apart
                grants.remember_indirect_run(segments, g0, nsect)
            else:
                g0, nsect = hit
            if sector + nsect > self.limits.sectors:
                return False
        else:
            npages = len(grefs)
            g0 = grants.lookup_run(grefs)
            if g0 is None:
                return False  # not mapped yet, or frames apart: the general path
        if g0 < 0 or g0 + npages > self.memory.nr_pages:
            return False
        seq = self.queue.skip()
        nbytes = nsect * SECTOR_SIZE
        status = OKAY
        with self.memory.view[g0 * PAGE_SIZE : g0 * PAGE_SIZE + nbytes] as buf:
            try:
                self.image.transfer(op == WRITE, sector * SECTOR_SIZE, buf)
            except OSError as exc:
                status = ERROR
                self._refused(f"io: {exc}", status)
        # started and done with nothing in between: both recorded now
        self.log.record_run(self.conn_id, seq, rid, _FAST_NAMES[op], sector, nsect)
        counters = self.counters
        if status == OKAY:
            counters[_FAST_COUNTERS[op]] += 1
            counters["bytes"] += nbytes
        self.ring.put_response_packed(_RESPONSE, rid, op, status)
        counters["responses"] += 1
        counters["steady"] += 1
        self._unpushed = True
        self._unpushed_bytes += nbytes
        return True

    def _run_inline(self, job: _Job) -> bool:
        """Run ``job`` to its response now if it needs no hypercall and no thread."""
        adm = job.admitted
        if adm.kind not in _DATA_KINDS:
            return False
        grants = self.grants
        if adm.indirect_grefs and job.plan is None:
            pages = grants.lookup(adm.indirect_grefs)
            if pages is None:
                return False
            self._read_indirect(job, pages)
        if job.status == BlkifRsp.OKAY:
            io = job.plan
            assert io is not None
            if io.nbytes > INLINE_LIMIT:
                return False
            gfns = grants.lookup(io.segments.grefs)
            if gfns is None:
                return False
            job.gfns = gfns
            self._execute_inline(job)
        self._respond(job)
        return True

    def _execute_inline(self, job: _Job) -> None:
        """A READ or WRITE of at most INLINE_LIMIT bytes, on this thread."""
        io = self._current_plan(job)
        if io is None:
            return
        image = self.image
        assert image is not None or not io.nbytes
        with self._io_step(job, io) as bufs:
            if image is not None and bufs:
                if io.kind is Kind.READ:
                    image.readv(io.offset, bufs)
                else:
                    image.writev(io.offset, bufs)

    @contextlib.contextmanager
    def _io_step(self, job: _Job, io: IoPlan) -> Iterator[list[memoryview]]:
        """Around one request's I/O (inline or on a round): its iovec, the
        execution log's start and done, the counters; an I/O or guest-memory
        error becomes the job's ERROR status, counted."""
        bufs: list[memoryview] = []
        try:
            bufs = self._buffers(io, job.gfns)
            self._record(job, "start", io)
            yield bufs
            self._record(job, "done", io)
            self.counters[OP_COUNTER[io.kind]] += 1
            self.counters["bytes"] += io.nbytes
        except (OSError, GuestMemoryError) as exc:
            job.status = ERROR
            self._refused(f"io: {exc}", ERROR)
        finally:
            for b in bufs:
                b.release()
