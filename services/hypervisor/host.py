"""One host's hypervisor state: the cores wired together (still no I/O).

:class:`Host` owns a :class:`DomainTable`, the event channels, grant tables,
PV timers, LAPICs and the accounting, and does what spans them: building and
destroying a domain in every core, mapping shared_info and grant frames into
guest RAM, applying HVM params to the event-channel core, routing a LAPIC EOI
to the event-channel upcall it retires, turning timer expiries into
``VIRQ_TIMER``, and counting every upcall it hands out. The Trio adapter calls
:meth:`Host.next_deadline` / :meth:`Host.expire` from its timer task and sends
the effects every method returns.
"""

from __future__ import annotations

from collections.abc import Callable

from services.hypervisor.accounting import Accounting
from services.hypervisor.callback import parse_callback_irq
from services.hypervisor.domain import Domain, DomainTable, Personality
from services.hypervisor.effects import ApicInterrupt, DomainShutdown, Effects, Outcome, Upcall
from services.hypervisor.evtchn import DEFAULT_MAX_PORT, EventChannels
from services.hypervisor.gnttab import DEFAULT_MAX_MAPTRACK, GrantTables
from services.hypervisor.lapic import APIC, Lapics
from services.hypervisor.timers import GuestClock, SshotPast, Timers
from services.hypervisor.timers_state import TimerFired
from shared.abi import sharedinfo as si
from shared.abi.constants import HVM_PARAM, VIRQ, XENMAPSPACE, XenErrno, xen_error
from shared.abi.ring import PAGE_SIZE, Buffer

EINVAL = xen_error(XenErrno.EINVAL)
GUEST_TSC_HZ = 10**9  # guest TSC ticks = guest ns (domain.TSC_KHZ)


class Host:
    """All hypervisor cores of one host."""

    def __init__(
        self,
        host_now: Callable[[], int],
        sshot_past: SshotPast = "fire",
        max_evtchn_port: int = DEFAULT_MAX_PORT,
        max_maptrack: int = DEFAULT_MAX_MAPTRACK,
        dom0_vcpus: int = 1,
    ) -> None:
        self.host_now = host_now
        self.max_evtchn_port = max_evtchn_port
        self.domains = DomainTable(dom0_vcpus)
        self.clock = GuestClock(host_now)
        self.evtchn = EventChannels()
        self.gnttab = GrantTables(max_maptrack)
        self.timers = Timers(self.clock, sshot_past)
        self.lapics = Lapics(host_now)
        self.accounting = Accounting()
        self._shared_pages: dict[int, Buffer] = {}
        dom0 = self.domains.get(0)
        assert dom0 is not None
        self._attach(dom0, 0, max_evtchn_port)

    # --- domain life cycle -------------------------------------------------------------------

    def create_domain(
        self,
        nr_pages: int,
        nr_vcpus: int,
        personality: Personality = Personality.xen,
        feature_mask: int = 0xFFFFFFFF,
        domid: int | None = None,
        memory: Buffer | None = None,
        time_offset: int = 0,
    ) -> Domain:
        d = self.domains.create(domid, nr_pages, nr_vcpus, personality, feature_mask, memory=memory)
        self._attach(d, time_offset, self.max_evtchn_port)
        return d

    def destroy_domain(self, domid: int) -> None:
        """Release everything the domain holds in every core (dom0 stays)."""
        if domid == 0:
            raise ValueError("dom0 is not destroyed")
        self.evtchn.remove_domain(domid)
        self.gnttab.remove_domain(domid)
        self.timers.remove_domain(domid)
        self.clock.remove_domain(domid)
        self.lapics.remove_domain(domid)
        self.accounting.remove_domain(domid)
        self._shared_pages.pop(domid, None)
        self.domains.destroy(domid)

    def shutdown_domain(self, domid: int, reason: int) -> Effects:
        """SCHEDOP_shutdown or the toolstack: tell the toolstack and raise
        ``VIRQ_DOM_EXC`` in dom0, as Xen does."""
        self.domains.shutdown(domid, reason)
        return (DomainShutdown(domid, reason),) + self.route(
            self.evtchn.send_virq(0, 0, VIRQ.DOM_EXC)
        )

    def leftovers(self, domid: int) -> dict[str, int]:
        """What the host still holds for ``domid`` (all 0 after a destroy)."""
        return {
            "domain": int(domid in self.domains),
            "ports": int(self.evtchn.has_domain(domid)),
            "mappings": len(self.gnttab.mappings(domid)),
            "timers": self.timers.armed_count(domid),
            "lapic": int(self.lapics.has_domain(domid)),
        }

    # --- guest memory placement --------------------------------------------------------------

    def add_to_physmap(self, domid: int, space: int, idx: int, gpfn: int) -> int:
        """``XENMEM_add_to_physmap`` for the shared_info page and grant frames."""
        d = self._domain(domid)
        if space == XENMAPSPACE.shared_info:
            if idx != 0 or d.memory is None or not 0 <= gpfn < d.nr_pages:
                return EINVAL
            page = memoryview(d.memory)[gpfn * PAGE_SIZE : (gpfn + 1) * PAGE_SIZE]
            self.evtchn.move_shared_info(domid, page)
            self._shared_pages[domid] = page
            d.shared_info_gfn = gpfn
            return 0
        if space == XENMAPSPACE.grant_table:
            return self.gnttab.place_frame(domid, idx, gpfn)
        return EINVAL  # gmfn moves and foreign maps are not modelled

    def shared_info(self, domid: int) -> Buffer:
        return self._shared_pages[domid]

    def publish_time(self, domid: int) -> None:
        """Write each vCPU's ``vcpu_time_info`` (guest TSC = guest ns)."""
        now = self.clock.now(domid)
        mul, shift = si.time_scale(GUEST_TSC_HZ)
        info = si.VcpuTimeInfo(now, now, mul, shift, 1)  # XEN_PVCLOCK_TSC_STABLE_BIT
        for v in range(self._domain(domid).nr_vcpus):
            si.write_time_info(*self.evtchn.vcpu_info(domid, v), info)

    # --- operations spanning cores -------------------------------------------------------------

    def set_param(self, caller: int, dom: int, index: int, value: int) -> Outcome:
        target, rc = self.domains.set_param(caller, dom, index, value)
        if target is None:
            return Outcome(rc)
        effects: Effects = ()
        if index == HVM_PARAM.CALLBACK_IRQ:
            cb = parse_callback_irq(value, target.vector_callback)
            effects = self.route(self.evtchn.set_callback(target.domid, cb))
        return Outcome(0, effects=effects)

    def set_upcall_vector(self, domid: int, vcpu: int, vector: int) -> Outcome:
        rc = self.domains.check_upcall_vector(domid, vcpu, vector)
        if rc:
            return Outcome(rc)
        return Outcome(0, effects=self.route(self.evtchn.set_upcall_vector(domid, vcpu, vector)))

    def register_vcpu_info(
        self, domid: int, caller_vcpu: int, vcpu: int, gfn: int, offset: int
    ) -> Outcome:
        rc = self.domains.register_vcpu_info(domid, caller_vcpu, vcpu, gfn, offset)
        if rc:
            return Outcome(rc)
        memory = self._domain(domid).memory
        assert memory is not None  # register_vcpu_info checked gfn < nr_pages
        effects = self.evtchn.move_vcpu_info(domid, vcpu, memory, gfn * PAGE_SIZE + offset)
        return Outcome(0, effects=self.route(effects))

    def apic_write(self, domid: int, vcpu: int, reg: int, value: int) -> Effects:
        """A LAPIC register write; an EOI that retires the event-channel upcall
        vector is that upcall's acknowledgement."""
        if reg != APIC.EOI:
            return self.route(self.lapics.write(domid, vcpu, reg, value))
        vector, effects = self.lapics.eoi(domid, vcpu)
        if vector is not None and vector == self._upcall_vector(domid, vcpu):
            effects += self.evtchn.ack_upcall(domid, vcpu)
        return self.route(effects)

    # --- time ----------------------------------------------------------------------------------

    def fire(self, fired: tuple[TimerFired, ...] | list[TimerFired]) -> Effects:
        effects: Effects = ()
        for f in fired:
            effects += self.evtchn.send_virq(f.domid, f.vcpu, VIRQ.TIMER)
        return self.route(effects)

    def next_deadline(self) -> int | None:
        deadlines = [t for t in (self.timers.next_deadline(), self.lapics.next_deadline()) if t]
        return min(deadlines, default=None)

    def expire(self, host_now_ns: int) -> Effects:
        return self.fire(self.timers.expire(host_now_ns)) + self.route(
            self.lapics.expire(host_now_ns)
        )

    # --- internals -----------------------------------------------------------------------------

    def route(self, effects: Effects) -> Effects:
        """Count deliveries; an upcall through the vLAPIC goes in service there."""
        for e in effects:
            if isinstance(e, Upcall):
                self.accounting.record_upcall(e.domid, e.vcpu)
                if e.eoi:
                    self.lapics.accept_external(e.domid, e.vcpu, e.vector)
            elif isinstance(e, ApicInterrupt):
                self.accounting.record_upcall(e.domid, e.vcpu)
        return effects

    def _upcall_vector(self, domid: int, vcpu: int) -> int | None:
        vector = self.evtchn.upcall_vector(domid, vcpu)
        if vector is None and vcpu == 0:
            cb = self.evtchn.callback(domid)
            return cb.vector if cb.vector else None
        return vector

    def _attach(self, d: Domain, time_offset: int, max_port: int) -> None:
        shared = bytearray(PAGE_SIZE)  # Xen's own page until the guest maps it
        self._shared_pages[d.domid] = shared
        self.evtchn.add_domain(d.domid, d.nr_vcpus, shared, d.privileged, max_port)
        self.gnttab.add_domain(d.domid, d.memory, hvm=not d.privileged, privileged=d.privileged)
        self.clock.add_domain(d.domid, time_offset)
        self.lapics.add_domain(d.domid, d.nr_vcpus)

    def _domain(self, domid: int) -> Domain:
        d = self.domains.get(domid)
        if d is None:
            raise KeyError(f"no domain {domid}")
        return d
