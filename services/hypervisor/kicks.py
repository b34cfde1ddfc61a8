"""How the hypervisor delivers what its cores decide: kicks to vCPU processes
(the doorbell FIFO, nng as the fallback), waking blocked vCPUs, and dom0's
events to the dom0 process that owns each port. A mixin of the service."""

from __future__ import annotations

from typing import Any

from services.hypervisor import control as ctl
from services.hypervisor.effects import ApicInterrupt, DomainShutdown, Upcall, Wake
from shared.abi import sharedinfo as si
from shared.doorbell import APIC as APIC_KICK
from shared.doorbell import EOI, NMI, UPCALL, DoorbellWriter
from shared.transport import Peer

_KICKS = (Upcall, ApicInterrupt, Wake)


class Kicks:
    """Delivery; ``self`` is the hypervisor service."""

    core: Any
    server: Any
    waiters: dict[tuple[int, int], Any]
    doorbells: dict[tuple[int, int], DoorbellWriter]
    vcpu_peers: dict[tuple[int, int], Peer]
    dom0_ports: dict[int, Peer]
    shutdowns: list[tuple[int, int]]
    kicks: int
    kick_fallbacks: int

    def _deliver(self, effects: Any) -> None:
        for e in effects:
            if isinstance(e, _KICKS):
                key = (e.domid, e.vcpu)
                waiter = self.waiters.pop(key, None)
                if waiter is not None:
                    waiter.set()
                if isinstance(e, Wake):
                    continue
                if e.domid == 0:
                    self._dom0_upcall()
                    continue
                bell = self.doorbells.get(key)
                if bell is not None:
                    if isinstance(e, Upcall):
                        rung = bell.ring(UPCALL, e.vector, EOI if e.eoi else 0)
                    else:
                        rung = bell.ring(
                            APIC_KICK, e.vector, (NMI if e.nmi else 0) | (0 if e.nmi else EOI)
                        )
                    if rung:
                        self.kicks += 1
                        continue
                    self.kick_fallbacks += 1
                peer = self.vcpu_peers.get(key)
                if peer is not None:
                    self.server.send_nowait(peer, e)
            elif isinstance(e, DomainShutdown):
                self.shutdowns.append((e.domid, e.reason))

    def _dom0_upcall(self) -> None:
        """Dom0 is many processes: take its pending ports off its shared page
        (as its kernel's upcall handler would) and tell each owner, like
        ``/dev/xen/evtchn`` does."""
        page, vcpu_off = self.core.evtchn.vcpu_info(0, 0)
        si.set_upcall_pending(page, vcpu_off, False)
        sel = si.take_pending_sel(page, vcpu_off)
        by_owner: dict[Peer, list[int]] = {}
        for word in range(64):
            if not sel >> word & 1:
                continue
            bits = si.pending_word(page, word)
            for bit in range(64):
                if bits >> bit & 1:
                    port = word * 64 + bit
                    si.evtchn_clear_pending(page, port)
                    owner = self.dom0_ports.get(port)
                    if owner is not None:
                        by_owner.setdefault(owner, []).append(port)
        for owner, ports in by_owner.items():
            if not self._device_kick(owner, ports):
                self.server.send_nowait(owner, ctl.EvtchnNotify(tuple(ports)))
