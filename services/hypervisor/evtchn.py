"""Event channels with Xen 4.17 2-level semantics, for every domain of a host.

Port tables (type, peer, notify vCPU) are hypervisor state; the pending and mask
bits and each vCPU's ``evtchn_upcall_pending``/``evtchn_pending_sel`` live in
the domain's real ``shared_info`` page (and registered ``vcpu_info`` areas), on
a buffer the core is handed, so a vCPU process reading guest RAM sees exactly
what a Xen guest sees (xen-reference 7.2-7.4, section 8).

Every operation takes the calling domain first and acts as it: a port number is
always one of the caller's ports; another domain is named only where Xen allows
(``bind_interdomain``'s remote, privileged callers of ``alloc_unbound``,
``status`` and ``reset``). Operations return an :class:`Outcome` (value = port
or 0 or a negative errno) carrying upcall effects.

Acknowledging an upcall (edge semantics): a kick happens only when a vCPU's
``evtchn_upcall_pending`` goes 0 -> 1, exactly as in Xen. With the global
vector callback the guest acknowledges by clearing ``evtchn_upcall_pending`` in
its shared page (first thing in its handler); further sends before that merge
into the upcall already sent. With an EOI-needing delivery (per-vCPU upcall
vector, GSI, PCI INTx) the interrupt is also *in service* until the guest's EOI,
:meth:`EventChannels.ack_upcall`: kicks meanwhile are latched and delivered at
the EOI; for GSI/INTx the line is level-triggered, so the EOI re-delivers while
vCPU0's ``evtchn_upcall_pending`` still reads 1.
"""

from __future__ import annotations

import collections

import attrs

from services.hypervisor.callback import Callback, Via
from services.hypervisor.effects import Effects, Outcome
from services.hypervisor.evtchn_delivery import Delivery
from services.hypervisor.evtchn_state import ChannelRecord, EvtchnState, EvtchnStats
from shared.abi import sharedinfo as si
from shared.abi.constants import (
    DOMID,
    EVTCHN_2L_NR_CHANNELS,
    EVTCHNSTAT,
    NR_VIRQS,
    PER_VCPU_VIRQS,
    XEN_LEGACY_MAX_VCPUS,
    XenErrno,
    xen_error,
)
from shared.abi.hypercall import EvtchnStatus
from shared.abi.ring import Buffer

DEFAULT_MAX_PORT = 1023  # libxl's default event_channels
MAX_POLL_PORTS = 128  # SCHEDOP_poll refuses longer lists

EINVAL, ENOENT, ESRCH, EPERM, EEXIST, ENOSPC = (
    xen_error(e)
    for e in (
        XenErrno.EINVAL,
        XenErrno.ENOENT,
        XenErrno.ESRCH,
        XenErrno.EPERM,
        XenErrno.EEXIST,
        XenErrno.ENOSPC,
    )
)


@attrs.define
class Channel:
    """One allocated port: ``vcpu`` is Xen's ``notify_vcpu_id``."""

    state: EVTCHNSTAT
    vcpu: int = 0
    remote_dom: int = 0  #: unbound: who may bind; interdomain: the peer
    remote_port: int = 0
    virq: int = 0


@attrs.define(eq=False)
class _Domain:
    domid: int
    nr_vcpus: int
    privileged: bool
    max_port: int
    shared: Buffer
    vcpu_info: list[tuple[Buffer, int]]
    registered: set[int] = attrs.Factory(set)  # vCPUs whose vcpu_info moved out
    channels: dict[int, Channel] = attrs.Factory(dict)
    virqs: dict[tuple[int, int], int] = attrs.Factory(dict)
    callback: Callback = Callback()
    upcall_vectors: dict[int, int] = attrs.Factory(dict)
    in_service: set[int] = attrs.Factory(set)
    latched: set[int] = attrs.Factory(set)
    polls: dict[int, frozenset[int]] = attrs.Factory(dict)


class EventChannels(Delivery):
    """All event channels of a host (a plain state table: no I/O)."""

    def __init__(self) -> None:
        self._doms: dict[int, _Domain] = {}
        self._ops: collections.Counter[str] = collections.Counter()
        self._errors: collections.Counter[str] = collections.Counter()
        self._upcalls = 0

    # --- domains and where their shared state lives ------------------------------------

    def add_domain(
        self,
        domid: int,
        nr_vcpus: int,
        shared_info: Buffer,
        privileged: bool = False,
        max_port: int = DEFAULT_MAX_PORT,
    ) -> None:
        """Register a domain whose shared_info page is (for now) ``shared_info``."""
        if domid in self._doms:
            raise ValueError(f"domain {domid} already has an event channel table")
        vinfo: list[tuple[Buffer, int]] = [
            (shared_info, si.vcpu_info_offset(v))
            if v < XEN_LEGACY_MAX_VCPUS
            else (bytearray(64), 0)
            for v in range(nr_vcpus)
        ]
        max_port = min(max_port, EVTCHN_2L_NR_CHANNELS - 1)
        self._doms[domid] = _Domain(domid, nr_vcpus, privileged, max_port, shared_info, vinfo)

    def remove_domain(self, domid: int) -> None:
        """Destroy: close every port (interdomain peers revert to UNBOUND)."""
        d = self._doms.get(domid)
        if d is None:
            return
        for port in list(d.channels):
            self._close(d, port)
        del self._doms[domid]

    def has_domain(self, domid: int) -> bool:
        return domid in self._doms

    def move_shared_info(self, domid: int, page: Buffer) -> None:
        """``XENMEM_add_to_physmap(shared_info)``: the page now shows in guest RAM at
        ``page``; its contents (bits set before the guest mapped it) move along."""
        d = self._doms[domid]
        page[: si.SHARED_INFO.size] = bytes(d.shared[: si.SHARED_INFO.size])
        d.shared = page
        for v in range(min(d.nr_vcpus, XEN_LEGACY_MAX_VCPUS)):
            if v not in d.registered:
                d.vcpu_info[v] = (page, si.vcpu_info_offset(v))

    def move_vcpu_info(self, domid: int, vcpu: int, buf: Buffer, offset: int) -> Effects:
        """``VCPUOP_register_vcpu_info`` (checks are the caller's): copy the old
        contents, then mark everything pending so the guest rescans (as Xen does)."""
        d = self._doms[domid]
        old, at = d.vcpu_info[vcpu]
        buf[offset : offset + si.VCPU_INFO.size] = bytes(old[at : at + si.VCPU_INFO.size])
        d.vcpu_info[vcpu] = (buf, offset)
        d.registered.add(vcpu)
        buf[offset + 8 : offset + 16] = b"\xff" * 8  # evtchn_pending_sel = ~0
        if si.set_upcall_pending(buf, offset):
            return ()
        return self._kick(d, vcpu)

    def vcpu_info(self, domid: int, vcpu: int) -> tuple[Buffer, int]:
        return self._doms[domid].vcpu_info[vcpu]

    def set_callback(self, domid: int, callback: Callback) -> Effects:
        """A new ``HVM_PARAM_CALLBACK_IRQ``: Xen re-asserts every vCPU afterwards, so
        a vCPU with ``evtchn_upcall_pending`` already set gets its upcall now."""
        d = self._doms[domid]
        d.callback = callback
        return self._reassert(d)

    def set_upcall_vector(self, domid: int, vcpu: int, vector: int) -> Effects:
        """``HVMOP_set_evtchn_upcall_vector`` (range checks are the caller's)."""
        d = self._doms[domid]
        d.upcall_vectors[vcpu] = vector
        return self._reassert(d, (vcpu,))

    def callback(self, domid: int) -> Callback:
        return self._doms[domid].callback

    def upcall_vector(self, domid: int, vcpu: int) -> int | None:
        return self._doms[domid].upcall_vectors.get(vcpu)

    # --- EVTCHNOP_* ----------------------------------------------------------------------

    def alloc_unbound(self, caller: int, dom: int, remote_dom: int) -> Outcome:
        target = caller if dom == DOMID.SELF else dom
        if (d := self._doms.get(target)) is None:
            return self._fail("alloc_unbound", ESRCH)
        if target != caller and not self._privileged(caller):
            return self._fail("alloc_unbound", EPERM)
        port = self._free_port(d)
        if port < 0:
            return self._fail("alloc_unbound", port)
        remote = caller if remote_dom == DOMID.SELF else remote_dom
        d.channels[port] = Channel(EVTCHNSTAT.unbound, remote_dom=remote)
        return self._done("alloc_unbound", Outcome(port))

    def bind_interdomain(self, caller: int, remote_dom: int, remote_port: int) -> Outcome:
        ld = self._doms.get(caller)
        rd = self._doms.get(caller if remote_dom == DOMID.SELF else remote_dom)
        if ld is None or rd is None:
            return self._fail("bind_interdomain", ESRCH)
        lport = self._free_port(ld)
        if lport < 0:
            return self._fail("bind_interdomain", lport)
        rch = rd.channels.get(remote_port)
        if rch is None or rch.state != EVTCHNSTAT.unbound or rch.remote_dom != caller:
            return self._fail("bind_interdomain", EINVAL)
        ld.channels[lport] = Channel(EVTCHNSTAT.interdomain, 0, rd.domid, remote_port)
        rch.state, rch.remote_port = EVTCHNSTAT.interdomain, lport
        # Sends to the remote end while it was unbound were dropped: mark the new
        # local port pending so the binder looks at the shared ring once.
        return self._done("bind_interdomain", Outcome(lport, effects=self._set_pending(ld, lport)))

    def bind_virq(self, caller: int, virq: int, vcpu: int) -> Outcome:
        d = self._doms[caller]
        if not 0 <= virq < NR_VIRQS:
            return self._fail("bind_virq", EINVAL)
        if virq not in PER_VCPU_VIRQS and vcpu != 0:
            return self._fail("bind_virq", EINVAL)
        if not 0 <= vcpu < d.nr_vcpus:
            return self._fail("bind_virq", ENOENT)
        if (virq, vcpu) in d.virqs:
            return self._fail("bind_virq", EEXIST)
        port = self._free_port(d)
        if port < 0:
            return self._fail("bind_virq", port)
        d.channels[port] = Channel(EVTCHNSTAT.virq, vcpu, virq=virq)
        d.virqs[(virq, vcpu)] = port
        return self._done("bind_virq", Outcome(port))

    def bind_ipi(self, caller: int, vcpu: int) -> Outcome:
        d = self._doms[caller]
        if not 0 <= vcpu < d.nr_vcpus:
            return self._fail("bind_ipi", ENOENT)
        port = self._free_port(d)
        if port < 0:
            return self._fail("bind_ipi", port)
        d.channels[port] = Channel(EVTCHNSTAT.ipi, vcpu)
        return self._done("bind_ipi", Outcome(port))

    def close(self, caller: int, port: int) -> Outcome:
        d = self._doms[caller]
        if port not in d.channels:
            return self._fail("close", EINVAL)
        self._close(d, port)
        return self._done("close", Outcome(0))

    def send(self, caller: int, port: int) -> Outcome:
        d = self._doms[caller]
        ch = d.channels.get(port)
        if ch is None:
            return self._fail("send", EINVAL)
        if ch.state == EVTCHNSTAT.interdomain:
            rd = self._doms[ch.remote_dom]
            return self._done("send", Outcome(0, effects=self._set_pending(rd, ch.remote_port)))
        if ch.state == EVTCHNSTAT.ipi:
            return self._done("send", Outcome(0, effects=self._set_pending(d, port)))
        if ch.state == EVTCHNSTAT.unbound:
            return self._done("send", Outcome(0))  # nobody listens yet: dropped
        return self._fail("send", EINVAL)

    def status(self, caller: int, dom: int, port: int) -> Outcome:
        target = caller if dom == DOMID.SELF else dom
        if (d := self._doms.get(target)) is None:
            return self._fail("status", ESRCH)
        if target != caller and not self._privileged(caller):
            return self._fail("status", EPERM)
        if not 0 <= port <= d.max_port:
            return self._fail("status", EINVAL)
        ch = d.channels.get(port)
        if ch is None:  # free (or the reserved port 0)
            rec = EvtchnStatus(dom, port, EVTCHNSTAT.closed, 0)
        elif ch.state in (EVTCHNSTAT.unbound, EVTCHNSTAT.interdomain):
            rec = EvtchnStatus(dom, port, ch.state, ch.vcpu, ch.remote_dom, ch.remote_port)
        else:
            rec = EvtchnStatus(dom, port, ch.state, ch.vcpu, irq=ch.virq)
        return self._done("status", Outcome(0, rec))

    def bind_vcpu(self, caller: int, port: int, vcpu: int) -> Outcome:
        d = self._doms[caller]
        if not 0 <= vcpu < d.nr_vcpus:
            return self._fail("bind_vcpu", ENOENT)
        ch = d.channels.get(port)
        if ch is None:
            return self._fail("bind_vcpu", EINVAL)
        movable = ch.state in (EVTCHNSTAT.unbound, EVTCHNSTAT.interdomain) or (
            ch.state == EVTCHNSTAT.virq and ch.virq not in PER_VCPU_VIRQS
        )
        if not movable:  # IPI and per-vCPU VIRQ ports are fixed to their vCPU
            return self._fail("bind_vcpu", EINVAL)
        ch.vcpu = vcpu
        return self._done("bind_vcpu", Outcome(0))

    def unmask(self, caller: int, port: int) -> Outcome:
        d = self._doms[caller]
        if not 0 <= port <= d.max_port:
            return self._fail("unmask", EINVAL)
        ch = d.channels.get(port)
        vcpu = ch.vcpu if ch else 0
        buf, off = d.vcpu_info[vcpu]
        effects: Effects = ()
        if si.evtchn_clear_mask(d.shared, port) and si.evtchn_is_pending(d.shared, port):
            if not si.set_pending_sel_bit(buf, off, port >> 6) and not si.set_upcall_pending(
                buf, off
            ):
                effects = self._kick(d, vcpu)
        return self._done("unmask", Outcome(0, effects=effects))

    def reset(self, caller: int, dom: int) -> Outcome:
        target = caller if dom == DOMID.SELF else dom
        if (d := self._doms.get(target)) is None:
            return self._fail("reset", ESRCH)
        if target != caller and not self._privileged(caller):
            return self._fail("reset", EPERM)
        for port in list(d.channels):
            self._close(d, port)
        return self._done("reset", Outcome(0))

    # --- hypervisor-side sources and the guest's acknowledgement ---------------------------

    def send_virq(self, domid: int, vcpu: int, virq: int) -> Effects:
        """``send_guest_vcpu_virq`` / ``send_guest_global_virq``: raise ``virq``;
        nothing happens if the guest did not bind it."""
        d = self._doms.get(domid)
        if d is None:
            return ()
        port = d.virqs.get((virq, vcpu if virq in PER_VCPU_VIRQS else 0))
        return () if port is None else self._set_pending(d, port)

    def ack_upcall(self, domid: int, vcpu: int) -> Effects:
        """The guest's EOI of an upcall delivered with ``eoi=True``."""
        d = self._doms[domid]
        if vcpu not in d.in_service:
            return ()
        d.in_service.discard(vcpu)
        latched = vcpu in d.latched
        d.latched.discard(vcpu)
        buf, off = d.vcpu_info[vcpu]
        level = si.upcall_pending(buf, off) and vcpu not in d.upcall_vectors
        return self._kick(d, vcpu) if latched or level else ()

    def poll(self, caller: int, vcpu: int, ports: tuple[int, ...]) -> Outcome:
        """``SCHEDOP_poll``: 0 at once if a port is pending, else a ``Wake`` effect
        comes when one becomes pending (``value`` 1 = the reply is deferred)."""
        d = self._doms[caller]
        if len(ports) > MAX_POLL_PORTS or any(not 0 <= p <= d.max_port for p in ports):
            return self._fail("poll", EINVAL)
        if any(si.evtchn_is_pending(d.shared, p) for p in ports):
            return self._done("poll", Outcome(0))
        d.polls[vcpu] = frozenset(ports)
        return self._done("poll", Outcome(1))

    def cancel_poll(self, domid: int, vcpu: int) -> None:
        """The poll timed out (the adapter's clock)."""
        if (d := self._doms.get(domid)) is not None:
            d.polls.pop(vcpu, None)

    def events_pending(self, domid: int, vcpu: int) -> bool:
        """``local_events_need_delivery`` for an HVM vCPU (``SCHEDOP_block``)."""
        buf, off = self._doms[domid].vcpu_info[vcpu]
        return si.upcall_pending(buf, off)

    # --- introspection and migration ------------------------------------------------------

    def table(self, domid: int) -> tuple[ChannelRecord, ...]:
        d = self._doms[domid]
        return tuple(self._record(d, port) for port in sorted(d.channels))

    def export_state(self, domid: int) -> EvtchnState:
        d = self._doms[domid]
        cb = d.callback
        return EvtchnState(
            domid,
            d.max_port,
            cb.via.value,
            cb.vector,
            cb.raw,
            dict(d.upcall_vectors),
            self.table(domid),
        )

    def import_state(self, state: EvtchnState) -> None:
        """Rebuild a port table saved by :meth:`export_state` into a freshly added
        domain; interdomain ports whose peer is gone come back UNBOUND for it."""
        d = self._doms[state.domid]
        d.max_port = state.max_port
        d.callback = Callback(Via(state.callback_via), state.callback_vector, 0, state.callback_raw)
        d.upcall_vectors = dict(state.upcall_vectors)
        for rec in state.channels:
            st = EVTCHNSTAT(rec.state)
            peer = self._doms.get(rec.remote_dom)
            if st == EVTCHNSTAT.interdomain and (
                peer is None or rec.remote_port not in peer.channels
            ):
                st = EVTCHNSTAT.unbound
            d.channels[rec.port] = Channel(st, rec.vcpu, rec.remote_dom, rec.remote_port, rec.virq)
            if st == EVTCHNSTAT.virq:
                d.virqs[(rec.virq, rec.vcpu if rec.virq in PER_VCPU_VIRQS else 0)] = rec.port
            (si.evtchn_set_mask if rec.masked else si.evtchn_clear_mask)(d.shared, rec.port)
            (si.evtchn_set_pending if rec.pending else si.evtchn_clear_pending)(d.shared, rec.port)

    def statistics(self) -> EvtchnStats:
        in_use = sum(len(d.channels) for d in self._doms.values())
        return EvtchnStats(dict(self._ops), dict(self._errors), self._upcalls, in_use)

    # --- internals ---------------------------------------------------------------------------

    def _record(self, d: _Domain, port: int) -> ChannelRecord:
        ch = d.channels[port]
        return ChannelRecord(
            port,
            int(ch.state),
            int(ch.vcpu),
            int(ch.remote_dom),
            int(ch.remote_port),
            int(ch.virq),
            si.evtchn_is_pending(d.shared, port),
            si.evtchn_is_masked(d.shared, port),
        )

    def _privileged(self, domid: int) -> bool:
        d = self._doms.get(domid)
        return d is not None and d.privileged

    def _free_port(self, d: _Domain) -> int:
        for port in range(1, d.max_port + 1):  # port 0 is reserved
            if port not in d.channels:
                return port
        return ENOSPC

    def _close(self, d: _Domain, port: int) -> None:
        ch = d.channels.pop(port)
        if ch.state == EVTCHNSTAT.virq:
            d.virqs.pop((ch.virq, ch.vcpu if ch.virq in PER_VCPU_VIRQS else 0), None)
        elif ch.state == EVTCHNSTAT.interdomain:
            peer = self._doms.get(ch.remote_dom)
            rch = peer.channels.get(ch.remote_port) if peer else None
            if rch is not None and rch.state == EVTCHNSTAT.interdomain:
                rch.state, rch.remote_dom, rch.remote_port = EVTCHNSTAT.unbound, d.domid, 0
        si.evtchn_clear_pending(d.shared, port)

    def _fail(self, op: str, errno: int) -> Outcome:
        self._ops[op] += 1
        self._errors[op] += 1
        return Outcome(errno)

    def _done(self, op: str, outcome: Outcome) -> Outcome:
        self._ops[op] += 1
        return outcome
