"""How an event reaches a vCPU (xen-reference 7.4, section 8): Xen's 2-level
set-pending in the guest's shared_info, the pollers it wakes, and the kick
per callback mode (vector, per-vCPU vector, GSI/INTx). A mixin of
:class:`~services.hypervisor.evtchn.EventChannels`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.hypervisor.callback import delivery_for
from services.hypervisor.effects import Effects, Upcall, Wake
from shared.abi import sharedinfo as si

if TYPE_CHECKING:
    from services.hypervisor.evtchn import _Domain


class Delivery:
    _upcalls: int

    def _set_pending(self, d: _Domain, port: int) -> Effects:
        """Xen's ``evtchn_2l_set_pending`` on the port's notify vCPU."""
        if si.evtchn_set_pending(d.shared, port):
            return ()  # already pending: this send merges into the earlier one
        wake = self._check_pollers(d, port)
        if si.evtchn_is_masked(d.shared, port):
            return wake
        vcpu = d.channels[port].vcpu
        buf, off = d.vcpu_info[vcpu]
        if si.set_pending_sel_bit(buf, off, port >> 6) or si.set_upcall_pending(buf, off):
            return wake
        return wake + self._kick(d, vcpu)

    def _check_pollers(self, d: _Domain, port: int) -> Effects:
        woken = [v for v, ports in d.polls.items() if port in ports]
        for v in woken:
            del d.polls[v]
        return tuple(Wake(d.domid, v) for v in woken)

    def _kick(self, d: _Domain, vcpu: int) -> Effects:
        """``evtchn_upcall_pending`` went 0 -> 1: deliver per the callback mode."""
        how = delivery_for(d.callback, d.upcall_vectors.get(vcpu), vcpu)
        if how is None:
            return ()
        if how.needs_eoi:
            if vcpu in d.in_service:
                d.latched.add(vcpu)
                return ()
            d.in_service.add(vcpu)
        self._upcalls += 1
        return (Upcall(d.domid, vcpu, self._pending_ports(d, vcpu), how.vector, how.needs_eoi),)

    def _reassert(self, d: _Domain, vcpus: tuple[int, ...] | None = None) -> Effects:
        effects: Effects = ()
        for v in range(d.nr_vcpus) if vcpus is None else vcpus:
            buf, off = d.vcpu_info[v]
            if si.upcall_pending(buf, off) and v not in d.in_service:
                effects += self._kick(d, v)
        return effects

    def _pending_ports(self, d: _Domain, vcpu: int) -> tuple[int, ...]:
        buf, off = d.vcpu_info[vcpu]
        sel, ports = si.pending_sel(buf, off), []
        while sel:  # set bits only: this runs on every delivered event
            low = sel & -sel
            sel ^= low
            word = low.bit_length() - 1
            bits = si.pending_word(d.shared, word)
            while bits:
                lowbit = bits & -bits
                bits ^= lowbit
                port = word * 64 + lowbit.bit_length() - 1
                ch = d.channels.get(port)
                if ch is not None and ch.vcpu == vcpu:
                    ports.append(port)
        return tuple(ports)
