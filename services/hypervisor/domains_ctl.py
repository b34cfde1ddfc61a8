"""The hypervisor's domain control plane (dom0 only): build a domain and its
vCPU processes, destroy it leaving nothing behind, pause, unpause, shut down,
list and introspect. A mixin of :class:`~services.hypervisor.service.HypervisorService`,
whose state (cores, guests, processes, bindings) it uses."""

from __future__ import annotations

from typing import Any

import attrs

from services.hypervisor import control as ctl
from services.hypervisor.domain import Personality
from services.hypervisor.trace import DomainTrace
from services.hypervisor.vcpus import VcpuProcesses
from shared.doorbell import bell_path, sends_path
from shared.guestmem import GuestMemory, ram_path
from shared.transport import Peer, ServiceError


@attrs.define(eq=False)
class GuestRuntime:
    """What the adapter keeps per guest beyond the cores: name, RAM, processes."""

    name: str
    memory: GuestMemory
    tokens: tuple[str, ...]
    running: bool = False


class DomainControl:
    """Control-plane handlers; ``self`` is the hypervisor service."""

    # provided by HypervisorService
    core: Any
    guests: dict[int, GuestRuntime]
    processes: VcpuProcesses

    async def create_domain(self, peer: Peer, msg: ctl.CreateDomain) -> ctl.DomainCreated:
        self._dom0(peer)
        try:
            personality = Personality(msg.personality)
        except ValueError:
            raise ServiceError("invalid", f"unknown personality {msg.personality!r}") from None
        if not 1 <= msg.vcpus <= 32 or msg.memory_pages < 16:
            raise ServiceError("invalid", "1-32 vCPUs and at least 16 pages of memory")
        domid = self._next_domid()
        memory = GuestMemory.create(ram_path(self.host_name, domid), msg.memory_pages)
        try:
            d = self.core.create_domain(
                msg.memory_pages,
                msg.vcpus,
                personality,
                msg.feature_mask,
                domid=domid,
                memory=memory.map,
                time_offset=msg.time_offset,
            )
        except Exception:
            memory.close()
            memory.unlink()
            raise
        self.core.domains.pause(d.domid)
        if self.periodic_hz:
            for v in range(msg.vcpus):
                self.core.timers.set_periodic(d.domid, v, 1_000_000_000 // self.periodic_hz)
            self._rearm()
        tokens = tuple(VcpuProcesses.new_token() for _ in range(msg.vcpus))
        self.guests[d.domid] = GuestRuntime(msg.name, memory, tokens)
        self.traces[d.domid] = DomainTrace()
        pids: tuple[int, ...] = ()
        if msg.vcpu_command:
            fill = {"domid": d.domid, "host": self.host_name, "rundir": self.ctx.host.rundir}
            pids = await self.processes.spawn(
                d.domid, msg.vcpu_command, fill, self.endpoint, tokens
            )
        return ctl.DomainCreated(d.domid, str(memory.path), pids, tokens)

    async def destroy_domain(self, peer: Peer, msg: ctl.DestroyDomain) -> ctl.DomainDestroyed:
        self._dom0(peer)
        if msg.domid not in self.guests:
            raise ServiceError("no-such-domain", f"no domain {msg.domid}")
        return ctl.DomainDestroyed(msg.domid, await self._destroy(msg.domid))

    async def _destroy(self, domid: int) -> dict[str, int]:
        guest = self.guests.pop(domid)
        for key in [k for k in self.doorbells if k[0] == domid]:
            self.doorbells.pop(key).close()
        for vcpu in range(len(guest.tokens)):
            bell_path(guest.memory.path, vcpu).unlink(missing_ok=True)
            sends_path(guest.memory.path, vcpu).unlink(missing_ok=True)
        self.traces.pop(domid, None)
        await self.processes.kill_domain(domid)
        for key in [k for k in self.vcpu_peers if k[0] == domid]:
            peer = self.vcpu_peers.pop(key)
            self._drop_vcpu_sends(peer)
            self.bindings.pop(peer, None)
        self.core.destroy_domain(domid)
        self._rearm()
        guest.memory.close()
        guest.memory.unlink()
        leftovers = self.core.leftovers(domid)
        leftovers["processes"] = self.processes.count(domid)
        leftovers["memory_file"] = int(guest.memory.path.exists())
        return leftovers

    def unpause_domain(self, peer: Peer, msg: ctl.UnpauseDomain) -> ctl.Done:
        self._dom0(peer)
        guest = self._guest(msg.domid)
        self.core.domains.unpause(msg.domid)
        guest.running = True
        for (domid, vcpu), p in self.vcpu_peers.items():
            if domid == msg.domid and self._runs(domid, vcpu):
                self.server.send_nowait(p, ctl.VcpuStart(vcpu))
        return ctl.Done()

    def pause_domain(self, peer: Peer, msg: ctl.PauseDomain) -> ctl.Done:
        self._dom0(peer)
        self._guest(msg.domid).running = False
        self.core.domains.pause(msg.domid)
        for (domid, vcpu), p in self.vcpu_peers.items():
            if domid == msg.domid:
                self.server.send_nowait(p, ctl.VcpuStop(vcpu))
        return ctl.Done()

    def shutdown_domain(self, peer: Peer, msg: ctl.ShutdownDomain) -> ctl.Done:
        self._dom0(peer)
        self._guest(msg.domid)
        self._deliver(self.core.shutdown_domain(msg.domid, msg.reason))
        return ctl.Done()

    def list_domains(self, peer: Peer, msg: ctl.ListDomains) -> ctl.DomainList:
        self._dom0(peer)
        return ctl.DomainList(self.core.domains.domains())

    def domain_detail(self, peer: Peer, msg: ctl.DomainDetailRequest) -> ctl.DomainDetail:
        self._dom0(peer)
        d = self.core.domains.get(msg.domid)
        if d is None:
            raise ServiceError("no-such-domain", f"no domain {msg.domid}")
        guest = self.guests.get(msg.domid)
        return ctl.DomainDetail(
            self.core.domains.info(msg.domid),
            self.core.evtchn.table(msg.domid),
            self.core.gnttab.grants_in_use(msg.domid),
            tuple(self.core.accounting.vcpu(msg.domid, v) for v in range(d.nr_vcpus)),
            self.processes.pids(msg.domid),
            guest.name if guest else "Domain-0",
            tuple(v.online for v in d.vcpus),
        )

    def _next_domid(self) -> int:
        """Like Xen, do not hand a domid out again soon after it was used."""
        while self._last_domid + 1 in self.core.domains:
            self._last_domid += 1
        self._last_domid += 1
        return self._last_domid

    def _guest(self, domid: int) -> GuestRuntime:
        guest = self.guests.get(domid)
        if guest is None:
            raise ServiceError("no-such-domain", f"no domain {domid}")
        return guest

    def _runs(self, domid: int, vcpu: int) -> bool:
        guest = self.guests.get(domid)
        return bool(guest and guest.running and self.core.domains.vcpu_is_up(domid, vcpu) == 1)
