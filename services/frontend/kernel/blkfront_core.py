"""blkfront's sans-IO core: bios in, ring requests out, responses back to bios.

The upper layer submits bios (:meth:`BlkfrontCore.submit`); :meth:`pump` turns
queued parts into ring requests while there is a free ring slot, a free shadow
id, and pages to grant; :meth:`push` publishes them with
``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`` and says whether to kick the backend;
:meth:`take_responses` drains the ring with ``RING_FINAL_CHECK_FOR_RESPONSES``
and yields :class:`Completion` records, one per bio, exactly once.

Rules a reviewer checks here (xen-reference 3, 4.3, 6; guest-behaviour A.4, B.5):

- a request's ``id`` is its shadow index (< RING_SIZE); a response whose id is
  not in flight, or whose operation is not the one sent, is counted and dropped;
- an ordered write without a backend barrier is single-stepped: sent only when
  nothing is in flight, and nothing else is sent until it is answered;
- EOPNOTSUPP on a flush or barrier (or ERROR on one without data) turns that
  feature off (Linux); an empty one completes OK, one with data goes again;
- reads are granted writable, writes read-only, unless grants are persistent
  (all writable, refs reused for the connection's life);
- :meth:`disconnect` puts every unanswered part back at the head of the queue,
  in issue order, and revokes the old ring's grants, leaking any a dead backend
  still maps; the next :meth:`connect` re-issues them against the new limits.
"""

from __future__ import annotations

import collections

import attrs

from services.frontend.kernel import blkfront_request as rq
from services.frontend.kernel.blkfront_gnttab import GrantTable, PagePool
from services.frontend.kernel.blkfront_pages import GrantedPages
from services.frontend.kernel.blkfront_request import Plan
from services.frontend.kernel.blkfront_state import (
    BackendInfo,
    BioKind,
    BioRecord,
    BlkfrontState,
    BlkfrontStats,
    Part,
    ShadowEntry,
)
from shared.abi import blkif as bi
from shared.abi.ring import PAGE_SIZE, RING_IDX_MASK, Buffer, FrontRing, RingError

OKAY, ERROR, EOPNOTSUPP = (
    int(bi.BlkifRsp.OKAY),
    int(bi.BlkifRsp.ERROR),
    int(bi.BlkifRsp.EOPNOTSUPP),
)
READ, WRITE, WRITE_BARRIER = (
    int(bi.BlkifOp.READ),
    int(bi.BlkifOp.WRITE),
    int(bi.BlkifOp.WRITE_BARRIER),
)
_DIRECT_PAGES = bi.BLKIF_MAX_SEGMENTS_PER_REQUEST
_FLUSH_OPS = (int(bi.BlkifOp.FLUSH_DISKCACHE), WRITE_BARRIER)
_DATA_BIOS = (BioKind.READ, BioKind.WRITE, BioKind.WRITE_ORDERED)
_READ_BIO = BioKind.READ
_RESPONSE = bi.RESPONSE.struct


@attrs.define
class Completion:
    """A bio finished: its status (BLKIF_RSP_*) and, for a read, the bytes.
    Made per request, so as cheap to make as :class:`Part` (not frozen)."""

    bio: int
    kind: BioKind
    status: int
    data: bytes = b""


class BlkfrontCore(GrantedPages):
    """One vbd's queue, shadow and ring (FreeBSD ``xbd_softc``, Linux ``blkfront_info``)."""

    def __init__(
        self, handle: int, grants: GrantTable, pool: PagePool, ram: Buffer, backend_domid: int
    ) -> None:
        self.handle = handle  #: the vdev, sent in every request
        self.grants = grants
        self.pool = pool
        self.ram = memoryview(ram).cast("B")
        self.backend_domid = backend_domid
        self.backend = BackendInfo()
        self.ring: FrontRing | None = None
        self.ring_pages: list[tuple[int, int]] = []
        self.shadow: list[ShadowEntry | None] = []
        self._free_ids: list[int] = []
        self.bios: dict[int, BioRecord] = {}
        #: data read so far per READ bio: the bytes themselves when one request
        #: carried the whole bio (one copy, as ``pread``), else filled part by part
        self._reads: dict[int, bytes | bytearray] = {}
        self.pending: collections.deque[Part] = collections.deque()
        self.persistent_free: dict[int, list[tuple[tuple[int, int], ...]]] = {}
        self._free_count = 0
        self.persistent_all: dict[tuple[int, int], None] = {}  #: an ordered set
        self.frozen = False  #: a single-stepped ordered write is in flight
        self.live = False  #: between connect() and disconnect()
        self.next_bio = 1
        self.next_seq = 1
        self.completions: list[Completion] = []
        #: (id, operation, status) taken off the ring, not yet handled
        self._backlog: list[tuple[int, int, int]] = []
        self._runs = {}
        self._held_from: int | None = None  #: req_prod before a held push
        self._plans_for: BackendInfo | None = None
        self._plan_of: dict[BioKind, tuple[int | None, Plan]] = {}
        self.stats: collections.Counter[str] = collections.Counter()

    # --- connection -------------------------------------------------------------------
    def setup_ring(self, order: int) -> list[int]:
        """``SHARED_RING_INIT`` on ``2**order`` fresh consecutive pages granted
        (writable) to the backend; answers their refs for ``ring-ref*``."""
        gfns = self.pool.alloc_run(1 << order)
        if gfns is None:
            raise MemoryError(f"no {1 << order} consecutive pages for the ring")
        refs = [self.grants.grant(self.backend_domid, g, readonly=False) for g in gfns]
        self.ring_pages = list(zip(gfns, refs, strict=True))
        buf = self.ram[gfns[0] * PAGE_SIZE : (gfns[-1] + 1) * PAGE_SIZE]
        self.ring = bi.blkif_front_ring(buf, order)
        self.shadow = [None] * self.ring.nr_ents
        self._free_ids = list(range(self.ring.nr_ents - 1, -1, -1))
        return refs

    def connect(self, backend: BackendInfo) -> None:
        """The backend is Connected with these features: start (re-)issuing."""
        if self.ring is None:
            raise RuntimeError("connect before setup_ring")
        self.backend = backend
        self.live = True
        self.stats["connects"] += 1

    def disconnect(self) -> None:
        """The ring is gone: unanswered parts go back to the queue head in issue
        order, and every grant of this connection is revoked (or leaked).
        Answers already taken off the ring are honoured first."""
        backlog, self._backlog = self._backlog, []
        for answer in backlog:
            self._response(*answer)
        entries = sorted((e for e in self.shadow if e is not None), key=lambda e: e.part.seq)
        for entry in reversed(entries):
            self._release(entry)
            self.pending.appendleft(entry.part)
            self.stats["reissued"] += 1
        for gfn, ref in self.persistent_all:
            self._revoke(gfn, ref)
        self.persistent_all, self.persistent_free, self._free_count = {}, {}, 0
        self._forget_runs()
        for gfn, ref in self.ring_pages:
            self._revoke(gfn, ref)
        self.ring, self.ring_pages, self.shadow, self._free_ids = None, [], [], []
        self._held_from = None
        self.frozen = False
        self.live = False

    # --- the upper layer ----------------------------------------------------------------
    def submit(self, kind: BioKind, sector: int, nsectors: int = 0, data: bytes = b"") -> int:
        """Queue a bio; answers its id. Writes carry ``nsectors * 512`` bytes."""
        if kind in _DATA_BIOS:
            if nsectors <= 0:
                raise ValueError("a read or write of no sectors")
            if kind != _READ_BIO and len(data) != nsectors * rq.SECTOR:
                raise ValueError(f"{len(data)} bytes for {nsectors} sectors")
        bio, self.next_bio = self.next_bio, self.next_bio + 1
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        self.bios[bio] = BioRecord(bio, kind, sector, nsectors, bytes(data))
        self.pending.append(Part(bio, kind, sector, nsectors, 0, seq))
        return bio

    def in_flight(self) -> int:
        return len(self.shadow) - len(self._free_ids)

    def outstanding(self) -> int:
        """Bios not yet completed."""
        return len(self.bios)

    def take_completions(self) -> list[Completion]:
        out, self.completions = self.completions, []
        return out

    # --- requests -----------------------------------------------------------------------
    def pump(self, max_bytes: int = 0) -> int:
        """Put queued parts into the ring (not yet published); answers how many.
        With ``max_bytes``, stop once the parts put have had that much data
        copied in (the caller publishes those so the backend can start on
        them while the next ones are copied)."""
        put = moved = 0
        ring, pending = self.ring, self.pending
        plans = self._plans()
        while pending and ring is not None and self.live and not self.frozen:
            if max_bytes and moved >= max_bytes:
                break
            part = pending[0]
            op, plan = plans[part.kind]
            if plan is Plan.SEND and op <= WRITE and self._issue_steady(part, op):
                pending.popleft()
                put += 1
                if op == WRITE:
                    moved += part.nsectors * rq.SECTOR
                continue
            if plan is not Plan.SEND:
                if plan in (Plan.LOCAL, Plan.UNSUPPORTED):
                    pending.popleft()
                    self.stats["flushes_elided" if plan is Plan.LOCAL else "errors"] += 1
                    self._part_done(part, OKAY if plan is Plan.LOCAL else EOPNOTSUPP)
                    continue
                if self.in_flight():
                    break  # single-step: wait until idle
            assert op is not None
            if ring.full() or not self._free_ids:
                break
            head, tail = part, None
            if rq.pages_for(part.nsectors) > bi.BLKIF_MAX_SEGMENTS_PER_REQUEST:
                limit = min(rq.max_segments(self.backend, op), self._page_budget())
                head, tail = rq.split(part, max(limit, 1))
            if not self._issue(head, op, plan):
                break  # out of pages or refs: answers will free some
            if op != READ:
                moved += head.nsectors * rq.SECTOR  # copied in: worth publishing early
            pending.popleft()
            if tail is not None:
                self.bios[part.bio] = attrs.evolve(
                    self.bios[part.bio], parts=self.bios[part.bio].parts + 1
                )
                pending.appendleft(tail)
            put += 1
            if plan is Plan.ALONE:
                self.frozen = True
                self.stats["single_steps"] += 1
        return put

    def _plans(self) -> dict[BioKind, tuple[int | None, Plan]]:
        """:func:`rq.operation_for` of every bio kind on the current backend."""
        if self._plans_for is not self.backend:
            self._plans_for = self.backend
            self._plan_of = {k: rq.operation_for(k, self.backend) for k in BioKind}
        return self._plan_of

    def _issue_steady(self, part: Part, op: int) -> bool:
        """The steady state, in one step: a READ or WRITE of at most 11 pages
        (no indirect page, no split) over a run of persistent pages of its
        size given back by an earlier request. False when any of that does
        not hold: :meth:`_issue` then takes the part the general way."""
        npages = (part.nsectors + rq.SECTORS_PER_PAGE - 1) // rq.SECTORS_PER_PAGE
        runs = self.persistent_free.get(npages)
        ring = self.ring
        if not runs or npages > _DIRECT_PAGES or not self._free_ids or ring is None or ring.full():
            return False
        pages = self._take_run(npages, runs)
        refs, start = self._layout(pages)
        if op == WRITE:
            self._copy_in(part, pages, start)
        rid = self._free_ids.pop()
        rq.put_direct(ring, op, self.handle, rid, part.sector, part.nsectors, refs)
        self.shadow[rid] = ShadowEntry(rid, part, op, pages)
        self.stats["requests"] += 1
        return True

    def _page_budget(self) -> int:
        """Data pages one request may take: at most a quarter of the pool, so
        no single request can starve the rest of the queue forever."""
        return max(1, len(self.pool.gfns) // 4)

    def _issue(self, part: Part, op: int, plan: Plan) -> bool:
        ring = self.ring
        assert ring is not None
        data = part.kind in _DATA_BIOS
        npages = (part.nsectors + rq.SECTORS_PER_PAGE - 1) // rq.SECTORS_PER_PAGE if data else 0
        pages = self._data_pages(npages, readonly=op != READ)
        if pages is None:
            return False
        ind: list[tuple[int, int]] | None = []
        if npages > bi.BLKIF_MAX_SEGMENTS_PER_REQUEST:
            nind = rq.indirect_pages_needed(op, npages)
            ind = self._data_pages(nind, readonly=True)  # persistent too, as Linux does
            if ind is None:
                self._release_pages(pages, persistent=self._persistent)
                return False
        pages_t = tuple(pages)
        data_refs, start = self._layout(pages_t)
        if op != READ and data:
            self._copy_in(part, pages_t, start)
        rid = self._free_ids.pop()
        if ind:
            contents = self._indirect(pages_t, data_refs, part.nsectors)
            for (gfn, _), raw in zip(ind, contents, strict=True):
                self.ram[gfn * PAGE_SIZE : gfn * PAGE_SIZE + len(raw)] = raw
            wire = rq.encode(op, self.handle, rid, part, data_refs, [r for _, r in ind])
            ring.put_request(wire)
            self.stats["indirect"] += 1
        elif data:
            rq.put_direct(ring, op, self.handle, rid, part.sector, part.nsectors, data_refs)
        else:
            ring.put_request(rq.encode(op, self.handle, rid, part, data_refs, []))
        if op in _FLUSH_OPS:
            self.stats["barriers" if op == WRITE_BARRIER else "flushes"] += 1
        ind_t = tuple(ind) if ind else ()
        self.shadow[rid] = ShadowEntry(rid, part, op, pages_t, ind_t, plan is Plan.ALONE)
        self.stats["requests"] += 1
        return True

    def push(self, hold: int = 0) -> bool:
        """Publish what :meth:`pump` put; True when the backend must be notified.
        With ``hold``, the decision waits while fewer than ``hold`` requests
        have been published since the last one (the caller has more to push
        and pushes without ``hold`` at the end): a backend that went idle then
        wakes to a batch, not to every few requests. The decision covers all
        of them (``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`` since the first)."""
        ring = self.ring
        if ring is None:
            return False
        published, new = ring.sring.req_prod, ring.req_prod_pvt
        if published == new and self._held_from is None:
            return False
        if published != new:
            self.stats["pushes"] += 1
        since = published if self._held_from is None else self._held_from
        if hold and (new - since) & RING_IDX_MASK < hold:
            ring.push_requests()
            self._held_from = since
            return False
        self._held_from = None
        notify = ring.push_requests_and_check_notify(since)
        self.stats["notifies"] += notify
        return notify

    @property
    def held(self) -> bool:
        """Requests are published whose notification :meth:`push` held back."""
        return self._held_from is not None

    # --- responses ----------------------------------------------------------------------
    def take_responses(self, max_bytes: int = 0) -> int:
        """Drain the ring until ``RING_FINAL_CHECK_FOR_RESPONSES`` says it is
        safe to sleep; answers how many responses were handled. With
        ``max_bytes``, stop early once that much read data has been copied
        out (the caller hands those over and calls again: the next requests
        go out while the rest is copied); responses already taken off the
        ring wait in ``_backlog`` for that call."""
        handled = copied = 0
        while self.ring is not None:
            answers, self._backlog = self._backlog, []
            if not answers:
                try:
                    answers = self.ring.take_responses_unpacked(_RESPONSE)
                except RingError:
                    self.stats["bad_responses"] += 1
                    return handled
                self.stats["responses"] += len(answers)
            response = self._response
            for k, (rid, operation, status) in enumerate(answers):
                copied += response(rid, operation, status)
                if max_bytes and copied >= max_bytes:
                    self._backlog = answers[k + 1 :]
                    return handled + k + 1  # more may be waiting: the caller comes back
            handled += len(answers)
            if self.ring is None or not self.ring.final_check_for_responses(self._moderation()):
                break
        return handled

    def _response(self, rid: int, operation: int, status: int) -> int:
        """Handle one response; answers the bytes of read data it copied out."""
        entry = self.shadow[rid] if 0 <= rid < len(self.shadow) else None
        if entry is None:
            self.stats["bad_responses"] += 1  # an id we never issued, or answered twice
            return 0
        if status == OKAY and operation == entry.operation and not entry.single_step:
            done = self._answered_whole(rid, entry)
            if done >= 0:
                return done
        if operation != entry.operation:
            self.stats["bad_responses"] += 1
            status = ERROR
        copied = 0
        if entry.operation == READ and status == OKAY:
            self._copy_out(entry)
            copied = entry.part.nsectors * rq.SECTOR
        self.shadow[rid] = None
        self._free_ids.append(rid)
        self._release(entry)
        if entry.single_step:
            self.frozen = False
        part = entry.part
        if entry.operation in _FLUSH_OPS and (
            status == EOPNOTSUPP or (status == ERROR and not entry.pages)
        ):
            self._flush_unsupported(entry.operation)
            if rq.carries_data(part.kind):
                self.pending.appendleft(part)  # the data still has to be written
                return copied
            status = OKAY  # Linux: the flush is done, flushes are off from now on
        if status != OKAY:
            self.stats["errors"] += 1
        self._part_done(part, status)
        return copied

    def _moderation(self) -> int:
        """Where to ask for the next notification: once half of what is in
        flight has been answered (FreeBSD and Linux netfront's ``rsp_event =
        cons + (outstanding >> 1) + 1``), so that a deep queue is woken for
        a batch, not for each response; at the next one when a single-stepped
        write waits (nothing else may go before it is answered)."""
        if self.frozen:
            return 1
        return (self.in_flight() >> 1) + 1

    def _answered_whole(self, rid: int, entry: ShadowEntry) -> int:
        """The steady state, in one step: an OKAY READ or WRITE that was its
        whole bio (no split) on directly addressed pages completes here;
        answers the bytes read (0 for a write), or -1 when it is not that
        case (:meth:`_response` then takes it the general way)."""
        part = entry.part
        bio = self.bios[part.bio]
        if entry.operation > WRITE or entry.indirect_pages or bio.parts != 1 or part.offset:
            return -1
        data = b""
        if entry.operation == READ:
            start = self._layout(entry.pages)[1]
            if start is None:
                return -1
            data = self.ram[start : start + part.nsectors * rq.SECTOR].tobytes()
        self.shadow[rid] = None
        self._free_ids.append(rid)
        self._release_pages(entry.pages, self.backend.persistent)
        del self.bios[part.bio]
        self.completions.append(Completion(bio.id, bio.kind, OKAY, data))
        self.stats["bios_done"] += 1
        return len(data)

    def _flush_unsupported(self, op: int) -> None:
        if op == bi.BlkifOp.FLUSH_DISKCACHE:
            self.backend = attrs.evolve(self.backend, flush=False)
        else:
            self.backend = attrs.evolve(self.backend, barrier=False)

    def _part_done(self, part: Part, status: int) -> None:
        bio = self.bios[part.bio]
        final = bio.status if bio.status != OKAY else status  # the first error sticks
        if bio.parts > 1:
            self.bios[part.bio] = attrs.evolve(bio, parts=bio.parts - 1, status=final)
            return
        del self.bios[part.bio]
        data = self._reads.pop(part.bio, b"")
        data = bytes(data) if final == OKAY else b""
        self.completions.append(Completion(bio.id, bio.kind, final, data))
        self.stats["bios_done"] += 1

    # --- state --------------------------------------------------------------------------
    def statistics(self) -> BlkfrontStats:
        return BlkfrontStats(**{f.name: self.stats[f.name] for f in attrs.fields(BlkfrontStats)})

    def state(self) -> BlkfrontState:
        bios = tuple(
            attrs.evolve(b, data=bytes(self._reads[b.id])) if b.id in self._reads else b
            for b in self.bios.values()
        )
        ring = self.ring.state() if self.ring is not None else None
        return BlkfrontState(
            self.handle,
            self.backend,
            bios,
            tuple(self.pending),
            tuple(e for e in self.shadow if e is not None),
            tuple(self.persistent_all),
            (ring.req_prod_pvt, ring.rsp_cons) if ring else (0, 0),
            self.next_bio,
            self.next_seq,
            self.frozen,
            self.statistics(),
        )

    @classmethod
    def restore(
        cls,
        state: BlkfrontState,
        grants: GrantTable,
        pool: PagePool,
        ram: Buffer,
        backend_domid: int,
    ) -> BlkfrontCore:
        """A core from a checkpoint, its old ring gone (a new domain): every
        part in flight is queued again (``blkif_recover``)."""
        core = cls(state.handle, grants, pool, ram, backend_domid)
        core.backend = state.backend
        for b in state.bios:
            if b.kind == BioKind.READ:
                core._reads[b.id] = bytearray(b.data)
                b = attrs.evolve(b, data=b"")
            core.bios[b.id] = b
        core.pending.extend(state.pending)
        core.shadow = list(state.shadow)
        core.persistent_all = dict.fromkeys(state.persistent_pages)
        for entry in state.shadow:
            for gfn, ref in (*entry.pages, *entry.indirect_pages):
                grants.claim(ref)
                pool.claim(gfn)
        for gfn, ref in state.persistent_pages:
            grants.claim(ref)
            pool.claim(gfn)
        core.next_bio, core.next_seq = state.next_bio, state.next_seq
        core.stats.update(attrs.asdict(state.stats))
        core.disconnect()
        return core
