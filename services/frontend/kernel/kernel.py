"""One vCPU's kernel: the Trio adapter that makes the exits, takes the
interrupts and runs the sans-IO pieces (scan, wheel, IPI bookkeeping).

Interrupt context is one task, :meth:`Kernel.interrupts`: every upcall, LAPIC
interrupt and NMI the hypervisor sends is handled there, in order, to the end
(handlers may make hypercalls), so a handler never runs nested. Threads
(workloads, the control endpoint) are other tasks of the same process. Boot
(:mod:`.boot`) and balancing use the methods here.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from services.frontend.kernel import ipi as ipis
from services.frontend.kernel import park
from services.frontend.kernel.callout import CalloutWheel
from services.frontend.kernel.clock import GuestClock
from services.frontend.kernel.config import KernelConfig
from services.frontend.kernel.evtchn import PortTable, UpcallScanner
from services.frontend.kernel.ipi import FUNC, IPI
from services.frontend.kernel.layout import NR_BITMAP_BITS, KernelMemory
from services.frontend.kernel.platform import bare
from services.frontend.kernel.state import IpiState, PlatformDecision, VcpuKernelState
from services.frontend.kernel.timer import EventTimer, TimerPanic
from services.hypervisor import control as ctl
from services.hypervisor.effects import ApicInterrupt, Upcall
from services.hypervisor.lapic import APIC
from services.hypervisor.messages import ApicAccess, EventChannelOp, HypercallResult, VcpuOp
from shared.abi import hypercall as hc
from shared.abi import sharedinfo as si
from shared.abi.constants import EVTCHNOP, VCPUOP
from shared.evtchn_dev import SendFifo
from shared.transport import Channel

CalloutFn = Callable[[int, int], None]  # (now, deadline)


class KernelPanic(RuntimeError):
    pass


class Kernel:
    def __init__(
        self, hv: Channel, cfg: KernelConfig, domid: int, cpu: int, mem: KernelMemory
    ) -> None:
        self.hv = hv
        #: port -> interrupt handler of the driver that bound it (blkfront...)
        self.port_handlers: dict[int, Callable[[int], Awaitable[None]]] = {}
        self.cfg = cfg
        self.domid = domid
        self.cpu = cpu
        self.mem = mem
        self.nr_cpus = mem.nr_vcpus
        self.clock = GuestClock(mem, cpu)
        self.wheel = CalloutWheel(cpu)
        self.callouts: dict[int, CalloutFn] = {}
        self._next_cid = 1
        self.ports = PortTable()
        self.platform: PlatformDecision = bare()
        self.timer: EventTimer | None = None
        self.scanner: UpcallScanner | None = None
        self.my_ipi_ports: dict[int, IPI] = {}
        self.timer_port = 0
        self.et_target: int | None = None
        self._percpu_owner: dict[int, int] = {}
        self.dmesg: list[str] = []
        self.exits: collections.Counter[str] = collections.Counter()
        self.ipi_sent: collections.Counter[str] = collections.Counter()
        self.ipi_handled: collections.Counter[str] = collections.Counter()
        self.bitmap_taken: collections.Counter[int] = collections.Counter()
        self.device_events: collections.Counter[int] = collections.Counter()
        self.nmis = 0
        self.state = "booting"
        self.started = trio.Event()
        self.running = False
        self.interrupts_off = False
        self.deferred: list[object] = []
        self.early: list[object] = []
        self.irq: trio.MemorySendChannel[object] | None = None
        self.mailbox_waiters: dict[tuple[int, int], Any] = {}
        self.on_func: dict[int, Callable[[int, tuple[int, int, int, int, int]], None]] = {}
        self.changed = trio.Event()
        self.nursery: trio.Nursery | None = None
        self.parked = False
        self.unparked = trio.Event()
        #: where posted sends go without an nng message (None: by hypercall)
        self.posted: SendFifo | None = None

    # --- output ------------------------------------------------------------------------------
    def log(self, line: str) -> None:
        text = f"[{time.monotonic():.6f}] cpu{self.cpu}: {line}"
        self.dmesg.append(text)
        print(text, flush=True)
        self.touch()

    def touch(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def panic(self, why: str) -> None:
        self.state = "panic"
        self.log(f"panic: {why}")
        raise KernelPanic(why)

    # --- exits -------------------------------------------------------------------------------
    async def call(self, msg: Any) -> HypercallResult:
        if self.parked:  # a parked CPU runs nothing: its threads wait here
            await self.unparked.wait()
        self.exits[type(msg).__name__] += 1
        return await self.hv.call(msg, timeout=30)

    async def notify_via_evtchn(self, port: int) -> None:
        """``notify_remote_via_evtchn``: an ``EVTCHNOP_send`` whose result no
        caller reads, posted: the vCPU carries on without the reply (a round
        trip here, not a microsecond). The port goes through the vCPU's send
        FIFO (one ``write``, no nng threads), else as a one-way message; the
        hypervisor takes a vCPU's hypercalls in order either way, so none made
        later can overtake it."""
        if self.parked:
            await self.unparked.wait()
        self.exits["EventChannelOp"] += 1
        if self.posted is not None and self.posted.send(port):
            return  # the hypervisor takes it before any later hypercall of ours
        await self.hv.send(EventChannelOp(EVTCHNOP.send, hc.EvtchnSend(port).pack()))

    async def evtchn_op(self, cmd: int, record: Any) -> tuple[int, Any]:
        res = await self.call(EventChannelOp(cmd, record.pack()))
        return res.value, (type(record).unpack(res.data) if res.value >= 0 and res.data else None)

    async def eoi(self) -> None:
        await self.call(ApicAccess(APIC.EOI, True, 0))

    # --- ports this CPU services -------------------------------------------------------------
    def owner_of(self, port: int) -> int | None:
        mask = self.mem.port_cpus(port)
        if mask:
            return (mask & -mask).bit_length() - 1
        owner = self._percpu_owner.get(port)
        if owner is None:
            self.refresh_percpu_ports()
            owner = self._percpu_owner.get(port)
        return owner

    def refresh_percpu_ports(self) -> None:
        for c in range(self.nr_cpus):
            for p in (self.mem.timer_port(c), *self.mem.ipi_ports(c)):
                if p:
                    self._percpu_owner[p] = c

    def mine(self, port: int) -> bool:
        if port in self.my_ipi_ports or port == self.timer_port:
            return True
        mask = self.mem.port_cpus(port)
        if mask:
            return bool(mask >> self.cpu & 1)
        owner = self.owner_of(port)
        return owner == self.cpu if owner is not None else self.cpu == 0

    def attach_scanner(self) -> None:
        shared = self.mem.ram[2 * 4096 : 3 * 4096]
        g = self.mem.read_globals()
        if g is not None and g.shared_info_gfn not in (0, 0xFFFFFFFF):
            shared = self.mem.ram[g.shared_info_gfn * 4096 : (g.shared_info_gfn + 1) * 4096]
        self.scanner = UpcallScanner(shared, (self.mem.ram, self.vcpu_info_offset), self.mine)

    vcpu_info_offset: int = 0

    def enable_interrupts(self) -> None:
        """End of this CPU's early boot: take what was held, and rescan once
        (Xen marked everything pending when vcpu_info moved)."""
        assert self.irq is not None
        held, self.early = self.early, []
        if not any(isinstance(m, Upcall) for m in held):
            held.append(Upcall(self.domid, self.cpu, (), 0, False))
        for msg in held:
            self.irq.send_nowait(msg)

    # --- callouts ----------------------------------------------------------------------------
    def new_cid(self) -> int:
        cid, self._next_cid = self._next_cid, self._next_cid + 1
        return cid

    async def callout_reset(self, cid: int, deadline: int, fn: CalloutFn, kind: str = "") -> None:
        self.callouts[cid] = fn
        if self.wheel.reset(cid, deadline, kind):
            await self._rearm()

    async def callout_stop(self, cid: int) -> None:
        self.callouts.pop(cid, None)
        if self.wheel.stop(cid):
            await self._rearm()

    async def _rearm(self) -> None:
        assert self.timer is not None
        nxt = self.wheel.next_deadline()
        if nxt is None:
            self.et_target = None
            if self.timer.armed is not None:
                await self.timer.stop()
        elif nxt != self.et_target or self.timer.armed is None:
            self.et_target = nxt
            floor = self.clock.now() + self.timer.min_period_ns
            try:
                await self.timer.start(max(nxt, floor))
            except TimerPanic as exc:
                self.panic(str(exc))

    async def et_event(self) -> None:
        """The event-timer interrupt: run what is due, re-arm for the next."""
        assert self.timer is not None
        self.timer.fired()
        now = self.clock.now()
        for cid, deadline, _ in self.wheel.expire(now):
            fn = self.callouts.pop(cid, None)
            if fn is not None:
                fn(now, deadline)
        await self._rearm()

    # --- IPIs --------------------------------------------------------------------------------
    async def ipi_send(self, kind: IPI, dest: str | int) -> None:
        tgts = ipis.targets(dest, self.cpu, self.nr_cpus)
        self.ipi_sent[kind.name] += len(tgts)
        if kind is IPI.STOP_HARD and self.cfg.nmi == "send_nmi" and self.platform.xen:
            for t in tgts:
                await self.call(VcpuOp(VCPUOP.send_nmi, t, b""))
            return
        if self.platform.pv_ipi:
            for t in tgts:
                port = self.mem.ipi_ports(t)[kind] if t != self.cpu else self._my_port(kind)
                await self.notify_via_evtchn(port)
            return
        if kind is IPI.STOP_HARD:
            icr = ipis.icr_nmi
        else:
            vector = ipis.vector_of(kind)
            icr = lambda sh=0: ipis.icr_fixed(vector, sh)  # noqa: E731
        if dest == "others" and self.nr_cpus > 1:
            await self.call(ApicAccess(APIC.ICR, True, icr(ipis.APIC_DEST_ALLBUT)))
        elif dest == "all":
            await self.call(ApicAccess(APIC.ICR, True, icr(ipis.APIC_DEST_ALLISELF)))
        else:
            for t in tgts:
                await self.call(ApicAccess(APIC.ICR2, True, t << 24))
                await self.call(ApicAccess(APIC.ICR, True, icr(0)))

    def _my_port(self, kind: IPI) -> int:
        return next(p for p, k in self.my_ipi_ports.items() if k is kind)

    async def ipi_bitmap(self, dest: str | int, bit: int) -> None:
        """``ipi_bitmap``: bump the per-(sender, receiver) counter, then interrupt."""
        for t in ipis.targets(dest, self.cpu, self.nr_cpus):
            self.mem.bump_sent(self.cpu, t, bit)
        await self.ipi_send(IPI.BITMAP, dest)

    async def mailbox_post(self, target: int, slot: tuple[int, int, int, int, int]) -> None:
        for _ in range(20_000):
            if self.mem.ring_put(self.cpu, target, slot):
                return
            await trio.sleep(0.0002)  # the receiver has not drained its ring yet
        self.panic(f"mailbox to cpu{target} stayed full")

    async def ipi_handler(self, kind: IPI) -> None:
        self.ipi_handled[kind.name] += 1
        if kind is IPI.BITMAP:
            for bit, n in ipis.take_bitmap(self.mem, self.cpu).items():
                self.bitmap_taken[bit] += n
        elif kind in ipis.CALL_FUNCTION_IPIS:
            for sender, slot in ipis.take_mailboxes(self.mem, self.cpu):
                await self._call_function(sender, slot)
        elif kind is IPI.STOP_HARD:
            self.nmis += 1
        elif kind is IPI.SUSPEND and self.cpu != 0:
            await park.cpususpend_handler(self)
        self.touch()

    async def _call_function(self, sender: int, slot: tuple[int, int, int, int, int]) -> None:
        func, seq, a, b, c = slot
        if func == FUNC.PING:
            await self.mailbox_post(sender, (FUNC.PONG, seq, a, self.clock.now(), c))
            await self.ipi_send(IPI.RENDEZVOUS, sender)
        elif func == FUNC.RENDEZVOUS:
            await self.mailbox_post(sender, (FUNC.ACK, seq, a, self.clock.now(), c))
            await self.ipi_send(IPI.RENDEZVOUS, sender)
        hook = self.on_func.get(func)
        if hook is not None:
            hook(sender, slot)

    # --- interrupt context -------------------------------------------------------------------
    async def interrupts(self, source: trio.MemoryReceiveChannel[object]) -> None:
        """Interrupt context: everything the hypervisor sends, one at a time."""
        async for msg in source:
            if isinstance(msg, ctl.VcpuStart):
                self.running = True
                self.started.set()
            elif isinstance(msg, ctl.VcpuStop):
                self.running = False
            elif isinstance(msg, Upcall | ApicInterrupt):
                if self.state == "panic":
                    continue  # halted: interrupts are no longer taken
                if self.interrupts_off and not (isinstance(msg, ApicInterrupt) and msg.nmi):
                    self.deferred.append(msg)
                    continue
                await self.take_interrupt(msg)

    async def take_interrupt(self, msg: object) -> None:
        try:
            if isinstance(msg, Upcall):
                await self._upcall(msg)
            elif isinstance(msg, ApicInterrupt):
                await self._apic_interrupt(msg)
        except KernelPanic:
            pass  # logged by panic(); the CPU is halted from here on
        except Exception as exc:  # a handler bug must show, not kill interrupt handling
            self.log(f"interrupt handler error: {exc!r}")

    async def _upcall(self, msg: Upcall) -> None:
        if self.scanner is None:  # interrupts still off during early boot: hold it
            self.early.append(msg)
            return
        for port in self.scanner.scan():
            await self.dispatch(port)
        if msg.eoi:  # legacy GSI/INTx (or per-vCPU vector): through the (v)LAPIC
            await self.eoi()

    async def dispatch(self, port: int) -> None:
        if port == self.timer_port:
            await self.et_event()
        elif port in self.my_ipi_ports:
            await self.ipi_handler(self.my_ipi_ports[port])
        elif (handler := self.port_handlers.get(port)) is not None:  # a driver's port
            self.device_events[port] += 1
            await handler(port)
        elif self.mem.port_cpus(port):
            self.device_events[port] += 1
            _spin_us(self.cfg.device_work_us)

    async def _apic_interrupt(self, msg: ApicInterrupt) -> None:
        assert self.scanner is not None
        self.scanner.apic[msg.vector] += 1
        if msg.nmi:
            self.ipi_handled[IPI.STOP_HARD.name] += 1
            self.nmis += 1
            self.touch()
            return
        await self.eoi()  # FreeBSD's lapic handlers EOI first
        if msg.vector == ipis.LAPIC_TIMER_VECTOR and self.timer is not None:
            await self.et_event()
        elif (kind := ipis.ipi_of_vector(msg.vector)) is not None:
            await self.ipi_handler(kind)

    async def set_interrupts(self, enabled: bool) -> None:
        """``intr_disable``/``enable``: masks this CPU's ports in shared_info (Xen does
        not notify a masked port) and holds LAPIC interrupts; NMIs still come."""
        assert self.scanner is not None
        mine = [*self.my_ipi_ports, *([self.timer_port] if self.timer_port else [])]
        if not enabled:
            self.interrupts_off = True
            for p in mine:
                si.evtchn_set_mask(self.scanner.shared, p)
            return
        for p in mine:
            if si.evtchn_is_pending(self.scanner.shared, p):
                await self.call(EventChannelOp(EVTCHNOP.unmask, hc.EvtchnUnmask(p).pack()))
            else:
                si.evtchn_clear_mask(self.scanner.shared, p)
        self.interrupts_off = False
        held, self.deferred = self.deferred, []
        for msg in held:
            await self.take_interrupt(msg)

    # --- state -------------------------------------------------------------------------------
    def ipi_state(self) -> IpiState:
        n, bits = self.nr_cpus, range(NR_BITMAP_BITS)
        return IpiState(
            self.cpu,
            tuple(tuple(self.mem.sent(self.cpu, r, b) for b in bits) for r in range(n)),
            tuple(tuple(self.mem.seen(self.cpu, s, b) for b in bits) for s in range(n)),
            tuple(self.mem.ring_indices(s, self.cpu) for s in range(n)),
            dict(self.ipi_sent),
            dict(self.ipi_handled),
        )

    def snapshot(self) -> VcpuKernelState:
        assert self.timer is not None and self.scanner is not None
        counters = {f"exit:{k}": v for k, v in self.exits.items()}
        counters.update({f"device:{p}": n for p, n in self.device_events.items()})
        counters["nmis"] = self.nmis
        return VcpuKernelState(
            self.cpu,
            self.platform,
            self.wheel.state(),
            self.ports.state(),
            self.ipi_state(),
            self.scanner.state(),
            self.timer.state(),
            counters,
        )


def _spin_us(us: int) -> None:
    end = time.perf_counter_ns() + us * 1000
    while time.perf_counter_ns() < end:
        pass
