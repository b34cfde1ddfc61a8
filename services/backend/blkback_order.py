"""Request ordering for one ring: which admitted requests may start (sans-IO).

Requests get a sequence number in ring order and otherwise run concurrently,
in any order, as blkif allows. Two operations order them (blkif.h):

- ``BLKIF_OP_WRITE_BARRIER`` is a full fence: it starts only once every
  earlier request has completed, and no later request starts before it has
  completed (Linux blkback drains all in-flight I/O before a barrier; holding
  later reads too keeps a read from overtaking the barrier's own data).
- ``BLKIF_OP_FLUSH_DISKCACHE`` starts once every earlier *modifying* request
  (write, discard, barrier, flush) has completed, so the ``fdatasync`` covers
  them; later requests are not held.

:class:`ExecutionLog` records when each request's I/O starts and ends on the
image, so a test can check the barrier rule from outside the process.
"""

from __future__ import annotations

import collections

import attrs

from services.backend.blkback_request import Kind
from shared.codec import message

LOG_LIMIT = 4096


@attrs.define(eq=False)
class _Entry:
    seq: int
    kind: Kind
    started: bool = False


class OrderingQueue:
    """Admitted, not yet completed requests of one ring, in ring order."""

    def __init__(self) -> None:
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
        self._next_seq = 0
        self.fences = 0
        self.held = 0  #: times a request had to wait for an earlier one

    def __len__(self) -> int:
        return len(self._entries)

    def submit(self, kind: Kind) -> int:
        """Queue a request; returns its sequence number."""
        seq = self._next_seq
        self._next_seq += 1
        self._entries[seq] = _Entry(seq, kind)
        if kind is Kind.BARRIER:
            self.fences += 1
        return seq

    def skip(self) -> int:
        """A sequence number for a request that runs to completion at once,
        never queued: only while nothing is queued (nothing to order against)."""
        if self._entries:
            raise RuntimeError("a request may only bypass an empty queue")
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def startable(self) -> list[int]:
        """Sequence numbers that may start now (marked started), in ring order."""
        out: list[int] = []
        earlier_any = False  # an earlier request has not completed
        earlier_modifying = False
        for e in self._entries.values():
            if e.kind is Kind.BARRIER:
                if not e.started:
                    if earlier_any:
                        self.held += 1
                        return out
                    e.started = True
                    out.append(e.seq)
                return out  # nothing after an uncompleted fence may start
            if not e.started:
                if e.kind is Kind.FLUSH and earlier_modifying:
                    self.held += 1
                else:
                    e.started = True
                    out.append(e.seq)
            earlier_any = True
            earlier_modifying = earlier_modifying or e.kind.modifies
        return out

    def complete(self, seq: int) -> None:
        entry = self._entries.pop(seq, None)
        if entry is None or not entry.started:
            raise KeyError(f"request {seq} is not running")


@message(500)
class ExecEvent:
    """One line of the execution log: request ``seq`` (ring order on its
    connection ``conn``), its ``id`` and operation name, ``event`` = ``start``
    (I/O issued to the image) or ``done`` (I/O finished), ``sector`` and
    ``nr_sectors`` (0 for flushes)."""

    conn: int
    seq: int
    id: int
    op: str
    event: str
    sector: int
    nr_sectors: int


class ExecutionLog:
    """The last ``limit`` execution events of a device. The hot path records
    plain field tuples (two per request); :meth:`take` builds the records."""

    def __init__(self, limit: int = LOG_LIMIT) -> None:
        self._events: collections.deque[tuple] = collections.deque(maxlen=limit)
        self.recorded = 0

    def record(self, event: ExecEvent) -> None:
        self.record_fields(
            event.conn, event.seq, event.id, event.op, event.event, event.sector, event.nr_sectors
        )

    def record_fields(
        self, conn: int, seq: int, id: int, op: str, event: str, sector: int, nr_sectors: int
    ) -> None:
        """:meth:`record` without building the record."""
        self._events.append((conn, seq, id, op, event, sector, nr_sectors))
        self.recorded += 1

    def record_run(self, conn: int, seq: int, id: int, op: str, sector: int, nr: int) -> None:
        """A request's ``start`` and ``done`` with nothing in between (I/O that
        ran to completion on the recording thread), in one call."""
        self._events.append((conn, seq, id, op, "start", sector, nr))
        self._events.append((conn, seq, id, op, "done", sector, nr))
        self.recorded += 2

    @property
    def events(self) -> list[ExecEvent]:
        return [ExecEvent(*e) for e in self._events]

    def take(self, clear: bool = False) -> tuple[ExecEvent, ...]:
        out = tuple(self.events)
        if clear:
            self._events.clear()
        return out


def barrier_violations(events: tuple[ExecEvent, ...] | list[ExecEvent]) -> list[str]:
    """Check the WRITE_BARRIER rule on a log: every request before a barrier
    (by seq, same connection) is done before the barrier starts; none after it
    starts before the barrier is done."""
    problems: list[str] = []
    at: dict[tuple[int, int, str], int] = {}
    ops: dict[tuple[int, int], str] = {}
    for i, e in enumerate(events):
        at[(e.conn, e.seq, e.event)] = i
        ops[(e.conn, e.seq)] = e.op
    for (conn, seq), op in ops.items():
        if op != "barrier" or (conn, seq, "start") not in at:
            continue
        start = at[(conn, seq, "start")]
        done = at.get((conn, seq, "done"), len(events))
        for (c2, s2), op2 in ops.items():
            if c2 != conn or s2 == seq:
                continue
            if s2 < seq and at.get((c2, s2, "done"), len(events)) > start:
                problems.append(f"{op2} {s2} not done before barrier {seq} started")
            if s2 > seq and at.get((c2, s2, "start"), len(events)) < done:
                problems.append(f"{op2} {s2} started before barrier {seq} was done")
    return problems
