"""The ``io/ring.h`` shared request/response ring, over a writable buffer.

The shared page(s) start with a 64-byte header (``req_prod``, ``req_event``,
``rsp_prod``, ``rsp_event``, a 4-byte ``pvt`` union and 44 bytes of padding)
followed by ``RING_SIZE`` entries of ``max(sizeof(req), sizeof(rsp))`` bytes.
Indices are free-running 32-bit counters; a slot is ``idx & (size - 1)``.

:class:`SRing` is a view of the shared part and reads or writes the indices in
the buffer on every access, because the other end of the ring is another
process. :class:`FrontRing` and :class:`BackRing` hold the private indices of
each end and implement the ``RING_*`` macros with the exact mod-2**32 arithmetic
of the C header (xen-reference.md sections 3.3 to 3.5).
"""

from __future__ import annotations

import mmap
import operator
import struct
import threading
from collections.abc import Callable
from typing import Any, ClassVar, Self, TypeAlias

import attrs

from shared import atomics
from shared.abi._layout import Layout, layout

PAGE_SIZE = 4096
MAX_RING_ORDER = 4
SRING_HEADER_SIZE = 64
RING_IDX_MASK = 0xFFFFFFFF

# Shared memory the ring may live in; entries may come from any bytes-like object.
Buffer: TypeAlias = bytearray | memoryview | mmap.mmap
Bytes: TypeAlias = bytes | bytearray | memoryview

REQ_PROD = 0
REQ_EVENT = 4
RSP_PROD = 8
RSP_EVENT = 12

# '<I' on a little-endian host packs and unpacks with one aligned 4-byte
# memcpy, so the other process never sees a torn index.
_PADS_ZERO = bytes(SRING_HEADER_SIZE - 16)

# A locked instruction is a full fence on x86; acquiring and releasing a lock
# executes one. TSO already orders store->store and load->load, so only the
# store->load points of ring.h (xen_mb) need this.
_FENCE = threading.Lock()


def full_barrier() -> None:
    """``xen_mb()``: make our index store visible before reading the peer's."""
    with _FENCE:
        pass


class RingError(ValueError):
    """The peer broke the ring protocol, or a caller asked for an impossible step."""


def ring_size(nbytes: int, entry_size: int) -> int:
    """``__RING_SIZE``: entries that fit after the header, rounded down to a power of two."""
    fit = (nbytes - SRING_HEADER_SIZE) // entry_size
    if fit < 1:
        raise ValueError(f"a {nbytes}-byte ring cannot hold a {entry_size}-byte entry")
    return 1 << (fit.bit_length() - 1)


def ring_bytes(order: int) -> int:
    """Bytes of a ring of ``2**order`` contiguous pages (``ring-page-order``)."""
    if not 0 <= order <= MAX_RING_ORDER:
        raise ValueError(f"ring order {order} outside 0..{MAX_RING_ORDER}")
    return PAGE_SIZE << order


def sring_layout(name: str, header: str, entry_size: int, entry_align: int) -> Layout:
    """Register ``struct <name>_sring`` (its C ``ring[1]`` holds one entry)."""
    return layout(
        f"struct {name}_sring",
        header,
        ("req_prod", "I"),
        ("req_event", "I"),
        ("rsp_prod", "I"),
        ("rsp_event", "I"),
        ("pvt", "s", 4, "pvt.pvt_pad"),
        ("pad", "s", 44, "__pad"),
        ("ring", "s", entry_size, None, entry_align),
    )


class WireRecord:
    """``encode``/``decode``/``pack_into`` for an attrs record whose fields map one
    to one, in order, onto the members of ``_layout`` (no padding members)."""

    __slots__ = ()
    _layout: ClassVar[Layout]
    _values: ClassVar[Callable[[Any], tuple[Any, ...]]]

    def __init_subclass__(cls, fields: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if fields:
            if len(fields) < 2:  # attrgetter of one name returns a bare value
                raise TypeError("a WireRecord has at least two fields")
            cls._values = staticmethod(operator.attrgetter(*fields))

    def pack_into(self, buf: Buffer, offset: int = 0) -> None:
        self._layout.struct.pack_into(buf, offset, *self._values(self))

    def encode(self) -> bytes:
        return self._layout.struct.pack(*self._values(self))

    @classmethod
    def decode(cls, buf: Bytes | Buffer, offset: int = 0) -> Self:
        return cls(*cls._layout.struct.unpack_from(buf, offset))


class SRing:
    """The shared part of a ring: indices and slots, read from the buffer each time.

    Each index is loaded and stored as one aligned 32-bit access: the other end
    is another process reading and writing the same page concurrently.

    ``buf`` is a writable buffer (``mmap``, ``bytearray``, ``memoryview``) whose
    first ``nbytes`` bytes (default: all of it) are the ring pages.
    """

    __slots__ = ("buf", "nbytes", "entry_size", "nr_ents", "_mask")

    def __init__(self, buf: Buffer, entry_size: int, nbytes: int | None = None) -> None:
        with memoryview(buf) as view:
            size = view.nbytes
        nbytes = size if nbytes is None else nbytes
        if nbytes > size:
            raise ValueError(f"ring of {nbytes} bytes does not fit a {size}-byte buffer")
        self.buf = buf
        self.nbytes = nbytes
        self.entry_size = entry_size
        self.nr_ents = ring_size(nbytes, entry_size)
        self._mask = self.nr_ents - 1

    @classmethod
    def of_order(cls, buf: Buffer, entry_size: int, order: int = 0) -> SRing:
        return cls(buf, entry_size, ring_bytes(order))

    @property
    def req_prod(self) -> int:
        return atomics.load_u32(self.buf, REQ_PROD)

    @req_prod.setter
    def req_prod(self, value: int) -> None:
        atomics.store_u32(self.buf, REQ_PROD, value & RING_IDX_MASK)

    @property
    def req_event(self) -> int:
        return atomics.load_u32(self.buf, REQ_EVENT)

    @req_event.setter
    def req_event(self, value: int) -> None:
        atomics.store_u32(self.buf, REQ_EVENT, value & RING_IDX_MASK)

    @property
    def rsp_prod(self) -> int:
        return atomics.load_u32(self.buf, RSP_PROD)

    @rsp_prod.setter
    def rsp_prod(self, value: int) -> None:
        atomics.store_u32(self.buf, RSP_PROD, value & RING_IDX_MASK)

    @property
    def rsp_event(self) -> int:
        return atomics.load_u32(self.buf, RSP_EVENT)

    @rsp_event.setter
    def rsp_event(self, value: int) -> None:
        atomics.store_u32(self.buf, RSP_EVENT, value & RING_IDX_MASK)

    def init(self) -> None:
        """``SHARED_RING_INIT`` (frontend only): producers 0, events 1, pads zeroed."""
        self.req_prod = 0
        self.rsp_prod = 0
        self.req_event = 1
        self.rsp_event = 1
        with memoryview(self.buf) as view:
            view[16:SRING_HEADER_SIZE] = _PADS_ZERO

    def slot_offset(self, idx: int) -> int:
        """Byte offset of the entry for free-running index ``idx``."""
        return SRING_HEADER_SIZE + (idx & self._mask) * self.entry_size

    def slot(self, idx: int) -> memoryview:
        """A live view of one entry (release it before closing an mmap)."""
        off = self.slot_offset(idx)
        return memoryview(self.buf)[off : off + self.entry_size]

    def read_slot(self, idx: int) -> bytes:
        """``RING_COPY_*``: a private copy, so validation cannot race the peer."""
        off = self.slot_offset(idx)
        with memoryview(self.buf) as view:
            return bytes(view[off : off + self.entry_size])

    def write_slot(self, idx: int, data: Bytes) -> None:
        """Write ``data`` (at most one entry) at the start of a slot."""
        off = self.slot_offset(idx)
        with memoryview(data) as src, memoryview(self.buf) as view:
            if src.nbytes > self.entry_size:
                raise ValueError(f"{src.nbytes}-byte entry exceeds slot of {self.entry_size}")
            view[off : off + src.nbytes] = src.cast("B")


@attrs.frozen
class FrontRingState:
    """A frontend's private indices, checkpointed across migration."""

    req_prod_pvt: int
    rsp_cons: int


@attrs.frozen
class BackRingState:
    """A backend's private indices, checkpointed across migration."""

    rsp_prod_pvt: int
    req_cons: int


def _must_notify(new: int, old: int, event: int) -> bool:
    """The hold-off rule: notify iff ``event`` lies in ``(old, new]`` mod 2**32."""
    return ((new - event) & RING_IDX_MASK) < ((new - old) & RING_IDX_MASK)


class FrontRing:
    """The frontend half: produces requests, consumes responses."""

    __slots__ = ("sring", "nr_ents", "req_prod_pvt", "rsp_cons")

    def __init__(self, sring: SRing, index: int = 0) -> None:
        self.sring = sring
        self.nr_ents = sring.nr_ents
        self.attach(index)

    def attach(self, index: int) -> None:
        """``FRONT_RING_ATTACH``: resume at ``index`` (``FRONT_RING_INIT`` is 0)."""
        self.req_prod_pvt = index & RING_IDX_MASK
        self.rsp_cons = index & RING_IDX_MASK

    def state(self) -> FrontRingState:
        return FrontRingState(self.req_prod_pvt, self.rsp_cons)

    def restore(self, state: FrontRingState) -> None:
        self.req_prod_pvt = state.req_prod_pvt & RING_IDX_MASK
        self.rsp_cons = state.rsp_cons & RING_IDX_MASK

    def free_requests(self) -> int:
        """``RING_FREE_REQUESTS``."""
        in_flight = (self.req_prod_pvt - self.rsp_cons) & RING_IDX_MASK
        return (self.nr_ents - in_flight) & RING_IDX_MASK

    def full(self) -> bool:
        return self.free_requests() == 0

    def nr_unconsumed_responses(self) -> int:
        """``XEN_RING_NR_UNCONSUMED_RESPONSES``."""
        return (self.sring.rsp_prod - self.rsp_cons) & RING_IDX_MASK

    def has_unconsumed_responses(self) -> bool:
        return self.nr_unconsumed_responses() != 0

    def response_prod_overflow(self, prod: int) -> bool:
        """``RING_RESPONSE_PROD_OVERFLOW``: the backend claims impossible responses."""
        return ((prod - self.rsp_cons) & RING_IDX_MASK) > self.nr_ents

    def put_request(self, data: Bytes) -> int:
        """Write one request at ``req_prod_pvt`` (not yet visible) and return its index."""
        if self.full():
            raise RingError("ring full: no free request slot")
        idx = self.req_prod_pvt
        self.sring.write_slot(idx, data)
        self.req_prod_pvt = (idx + 1) & RING_IDX_MASK
        return idx

    def push_requests(self) -> None:
        """``RING_PUSH_REQUESTS``: publish without deciding about a notification."""
        self.sring.req_prod = self.req_prod_pvt

    def push_requests_and_check_notify(self, since: int | None = None) -> bool:
        """``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY``: True if the backend must be
        kicked. ``since``: an earlier ``req_prod`` whose push decided nothing
        (:meth:`push_requests`); the check then covers everything published
        after it, as if it had all been pushed at once."""
        sring = self.sring
        old = sring.req_prod if since is None else since
        new = self.req_prod_pvt
        sring.req_prod = new
        full_barrier()
        return _must_notify(new, old, sring.req_event)

    def take_responses(self, limit: int | None = None) -> list[bytes]:
        """Copy out the published responses (at most ``limit``) and advance ``rsp_cons``.

        Raises :class:`RingError` if the backend's ``rsp_prod`` is impossible.
        """
        cons, count = self.rsp_cons, self._published_responses()
        if limit is not None:
            count = min(count, limit)
        out = [self.sring.read_slot(cons + k) for k in range(count)]
        self.rsp_cons = (cons + count) & RING_IDX_MASK
        return out

    def take_responses_unpacked(self, fields: struct.Struct) -> list[tuple]:
        """:meth:`take_responses`, each response unpacked with ``fields`` (a
        struct of at most one entry) straight from the ring: one copy of its
        values, no ``bytes`` of the slot in between."""
        cons, count = self.rsp_cons, self._published_responses()
        sring = self.sring
        buf, offset, unpack = sring.buf, sring.slot_offset, fields.unpack_from
        out = [unpack(buf, offset(cons + k)) for k in range(count)]
        self.rsp_cons = (cons + count) & RING_IDX_MASK
        return out

    def _published_responses(self) -> int:
        """Responses the backend published past ``rsp_cons``; :class:`RingError`
        if its ``rsp_prod`` is impossible."""
        prod = self.sring.rsp_prod
        if self.response_prod_overflow(prod):
            raise RingError(f"backend rsp_prod {prod} overflows rsp_cons {self.rsp_cons}")
        return (prod - self.rsp_cons) & RING_IDX_MASK

    def final_check_for_responses(self, ahead: int = 1) -> bool:
        """``RING_FINAL_CHECK_FOR_RESPONSES``: False means it is safe to sleep.
        With ``ahead`` > 1 the notification is asked for at the ``ahead``-th
        next response, not the next one (netfront's moderation, ``rsp_event =
        cons + (outstanding >> 1) + 1``): only safe while at least that many
        requests are unanswered, or the wakeup is lost."""
        if self.has_unconsumed_responses():
            return True
        self.sring.rsp_event = self.rsp_cons + ahead
        full_barrier()
        return self.has_unconsumed_responses()


class BackRing:
    """The backend half: consumes requests, produces responses."""

    __slots__ = ("sring", "nr_ents", "rsp_prod_pvt", "req_cons")

    def __init__(self, sring: SRing, index: int = 0) -> None:
        self.sring = sring
        self.nr_ents = sring.nr_ents
        self.attach(index)

    def attach(self, index: int) -> None:
        """``BACK_RING_ATTACH``: resume at ``index`` (``BACK_RING_INIT`` is 0)."""
        self.rsp_prod_pvt = index & RING_IDX_MASK
        self.req_cons = index & RING_IDX_MASK

    def state(self) -> BackRingState:
        return BackRingState(self.rsp_prod_pvt, self.req_cons)

    def restore(self, state: BackRingState) -> None:
        self.rsp_prod_pvt = state.rsp_prod_pvt & RING_IDX_MASK
        self.req_cons = state.req_cons & RING_IDX_MASK

    def nr_unconsumed_requests(self) -> int:
        """``XEN_RING_NR_UNCONSUMED_REQUESTS``: capped by the free response slots, so a
        frontend that over-produces cannot make us read slots we still owe answers in."""
        req = (self.sring.req_prod - self.req_cons) & RING_IDX_MASK
        rsp = (self.nr_ents - ((self.req_cons - self.rsp_prod_pvt) & RING_IDX_MASK)) & RING_IDX_MASK
        return min(req, rsp)

    def has_unconsumed_requests(self) -> bool:
        return self.nr_unconsumed_requests() != 0

    def request_cons_overflow(self, cons: int) -> bool:
        """``RING_REQUEST_CONS_OVERFLOW``: consuming ``cons`` would reuse an unanswered slot."""
        return ((cons - self.rsp_prod_pvt) & RING_IDX_MASK) >= self.nr_ents

    def request_prod_overflow(self, prod: int) -> bool:
        """``RING_REQUEST_PROD_OVERFLOW``: the frontend claims impossible requests."""
        return ((prod - self.rsp_prod_pvt) & RING_IDX_MASK) > self.nr_ents

    def take_requests(self, limit: int | None = None) -> list[bytes]:
        """Copy out published requests (at most ``limit``) and advance ``req_cons``.

        Mirrors blkback: reject an impossible ``req_prod`` outright, and stop at
        a slot whose response is still owed.
        """
        prod = self.sring.req_prod
        if self.request_prod_overflow(prod):
            raise RingError(f"frontend req_prod {prod} overflows rsp_prod_pvt {self.rsp_prod_pvt}")
        cons = self.req_cons
        # published, and not past a slot whose response is still owed
        count = min(
            (prod - cons) & RING_IDX_MASK,
            self.nr_ents - ((cons - self.rsp_prod_pvt) & RING_IDX_MASK),
        )
        if limit is not None:
            count = min(count, limit)
        read = self.sring.read_slot
        out = [read(cons + k) for k in range(max(count, 0))]
        self.req_cons = (cons + len(out)) & RING_IDX_MASK
        return out

    def put_response(self, data: Bytes) -> int:
        """Write one response at ``rsp_prod_pvt`` (not yet visible) and return its index."""
        idx = self.rsp_prod_pvt
        if idx == self.req_cons:
            raise RingError("no consumed request is waiting for a response")
        self.sring.write_slot(idx, data)
        self.rsp_prod_pvt = (idx + 1) & RING_IDX_MASK
        return idx

    def put_response_packed(self, st: struct.Struct, *values: object) -> int:
        """:meth:`put_response` of ``st.pack(*values)``, packed in place."""
        idx = self.rsp_prod_pvt
        if idx == self.req_cons:
            raise RingError("no consumed request is waiting for a response")
        sring = self.sring
        st.pack_into(sring.buf, sring.slot_offset(idx), *values)
        self.rsp_prod_pvt = (idx + 1) & RING_IDX_MASK
        return idx

    def push_responses(self) -> None:
        """``RING_PUSH_RESPONSES``."""
        self.sring.rsp_prod = self.rsp_prod_pvt

    def push_responses_and_check_notify(self) -> bool:
        """``RING_PUSH_RESPONSES_AND_CHECK_NOTIFY``: True if the frontend must be kicked."""
        sring = self.sring
        old = sring.rsp_prod
        new = self.rsp_prod_pvt
        sring.rsp_prod = new
        full_barrier()
        return _must_notify(new, old, sring.rsp_event)

    def final_check_for_requests(self) -> bool:
        """``RING_FINAL_CHECK_FOR_REQUESTS``: False means it is safe to sleep."""
        if self.has_unconsumed_requests():
            return True
        self.sring.req_event = self.req_cons + 1
        full_barrier()
        return self.has_unconsumed_requests()


def front_ring(
    buf: Buffer, entry_size: int, order: int = 0, *, init: bool = True, index: int = 0
) -> FrontRing:
    """``XEN_FRONT_RING_INIT`` (or, with ``init=False``, attach to an existing ring)."""
    sring = SRing.of_order(buf, entry_size, order)
    if init:
        sring.init()
    return FrontRing(sring, index)


def back_ring(buf: Buffer, entry_size: int, order: int = 0, *, index: int = 0) -> BackRing:
    """``BACK_RING_INIT``/``BACK_RING_ATTACH``: the backend never initialises the page."""
    return BackRing(SRing.of_order(buf, entry_size, order), index)
