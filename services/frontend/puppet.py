"""A scripted vCPU: one vCPU process of a guest, driven from outside.

It stands in for the guest kernel where a test or a benchmark needs exact
control: it binds to the hypervisor as its vCPU (``VcpuHello`` + token), maps
the domain's RAM, and serves a control endpoint on which a test asks it to make
hypercalls (:class:`PuppetCall`), reports the upcalls it took
(:class:`PuppetUpcalls`), or runs a timed loop of hypercalls
(:class:`PuppetBench`). Its upcall handler does what a Linux/FreeBSD handler
does on the real ``shared_info`` layout: clear ``evtchn_upcall_pending``, take
``evtchn_pending_sel``, collect and clear the pending unmasked ports, and write
the LAPIC EOI when the delivery needs one.

``python -m services.frontend.puppet --control ENDPOINT --hypervisor ... --domid
D --vcpu K --token T`` (the hypervisor appends the last four).
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import time
from pathlib import Path

import attrs
import trio

from services.hypervisor import control as ctl
from services.hypervisor.effects import ApicInterrupt, Upcall
from services.hypervisor.lapic import APIC
from services.hypervisor.messages import (
    ApicAccess,
    EventChannelOp,
    HypercallResult,
    MemoryOp,
    VcpuOp,
    XenVersion,
)
from shared.abi import hypercall as hc
from shared.abi import sharedinfo as si
from shared.abi.constants import EVTCHNOP, VCPUOP, XENMAPSPACE, XENMEM
from shared.codec import AnyMessage, message
from shared.doorbell import EOI, NMI, UPCALL, DoorbellReader, bell_path, sends_path
from shared.evtchn_dev import SendFifo
from shared.guestmem import PAGE_SIZE, GuestMemory
from shared.transport import Channel, Peer, ServiceError, open_channel, open_server

# The puppets' "kernel globals" in guest RAM: where vCPU0 mapped shared_info,
# so the other vCPU processes (which share no Python state) can find it.
GLOBALS_GFN = 0
GLOBALS = struct.Struct("<QQ")
GLOBALS_MAGIC = 0x7075707065740001


@message(480)
class PuppetCall:
    """Make this hypercall as this vCPU and answer its result."""

    hypercall: AnyMessage


@message(481)
class PuppetUpcalls:
    """The upcalls taken so far (and forget them if ``clear``)."""

    clear: bool = True


@message(482)
class UpcallSeen:
    kind: str  # "evtchn" | "apic"
    at_ns: int  # time.monotonic_ns() when the handler ran
    vector: int
    ports: tuple[int, ...]  # ports found pending (evtchn)
    eoi: bool


@message(483)
class UpcallList:
    upcalls: tuple[UpcallSeen, ...]
    running: bool


@message(484)
class PuppetWait:
    """Answer once at least ``count`` upcalls were taken (or ``timeout`` passed)."""

    count: int
    timeout: float


@message(485)
class PuppetBench:
    """Time ``n`` round trips of a cheap hypercall (``XENVER_version``)."""

    n: int


@message(486)
class BenchResult:
    p50_ns: float
    p99_ns: float
    mean_ns: float


@message(487)
class PuppetSend:
    """``EVTCHNOP_send`` on ``port`` ``n`` times, ``gap`` seconds apart,
    answering the monotonic send times (for latency measurements). ``posted``:
    through the vCPU's send FIFO, as the guest kernel's
    ``notify_remote_via_evtchn`` does, instead of a hypercall message that
    waits for its result."""

    port: int
    n: int
    gap: float
    posted: bool = False


@message(488)
class SendTimes:
    at_ns: tuple[int, ...]


@message(489)
class PuppetHold:
    """``hold``: leave upcalls unhandled (interrupts off); False runs them."""

    hold: bool


@message(490)
class PuppetPoke:
    """Write ``data`` into guest RAM at ``gfn``/``offset`` (what guest code does
    to its own memory: grant entries, mask bits)."""

    gfn: int
    offset: int
    data: bytes


@message(491)
class PuppetPeek:
    gfn: int
    offset: int
    length: int


@message(492)
class Bytes:
    data: bytes


@message(493)
class Ok:
    pass


@message(494)
class Stamp:
    """A one-way message carrying its send time, for one-hop latency."""

    sent_ns: int


@message(495)
class PuppetStampTo:
    """Send ``n`` :class:`Stamp` messages to another process's ``endpoint``,
    ``gap`` seconds apart (the transport's one-way baseline between the same
    two processes that exchange events)."""

    endpoint: str
    n: int
    gap: float


@message(496)
class PuppetStamps:
    """The delays of the stamps received so far (and forget them)."""

    delays_ns: tuple[int, ...] = ()


@attrs.define(eq=False)
class Puppet:
    hv: Channel
    domid: int
    vcpu: int
    memory: GuestMemory | None = None
    shared_info_gfn: int | None = None
    vcpu_info: tuple[int, int] | None = None  # (gfn, offset) once registered
    running: bool = False
    hold: bool = False
    held: list[object] = attrs.Factory(list)
    upcalls: list[UpcallSeen] = attrs.Factory(list)
    changed: trio.Event = attrs.Factory(trio.Event)
    stamp_delays: list[int] = attrs.Factory(list)
    posted: SendFifo | None = None  #: the vCPU's send FIFO (posted EVTCHNOP_send)

    async def call(self, msg: object) -> HypercallResult:
        result = await self.hv.call(msg)
        if result.value >= 0:
            self._track(msg)
        return result

    def _track(self, msg: object) -> None:
        """Remember where shared_info and our vcpu_info live in guest RAM."""
        if isinstance(msg, MemoryOp) and msg.cmd == XENMEM.add_to_physmap:
            req = hc.XenAddToPhysmap.unpack(msg.arg)
            if req.space == XENMAPSPACE.shared_info and self.memory is not None:
                # Kernel memory every vCPU of the guest sees: where shared_info is.
                self.memory.write(GLOBALS_GFN, 0, GLOBALS.pack(GLOBALS_MAGIC, req.gpfn))
                self.shared_info_gfn = req.gpfn
        elif isinstance(msg, VcpuOp) and msg.cmd == VCPUOP.register_vcpu_info:
            if msg.vcpuid == self.vcpu:
                reg = hc.VcpuRegisterVcpuInfo.unpack(msg.arg)
                self.vcpu_info = (reg.mfn, reg.offset)

    async def handle(self, event: object) -> None:
        if self.hold and isinstance(event, Upcall | ApicInterrupt):
            self.held.append(event)
            return
        now = time.monotonic_ns()
        if isinstance(event, Upcall):
            ports = self._scan()
            self._record(UpcallSeen("evtchn", now, event.vector, ports, event.eoi))
            if event.eoi:
                await self.call(ApicAccess(APIC.EOI, True, 0))
        elif isinstance(event, ApicInterrupt):
            self._record(UpcallSeen("apic", now, event.vector, (), not event.nmi))
            if not event.nmi:
                await self.call(ApicAccess(APIC.EOI, True, 0))
        elif isinstance(event, ctl.VcpuStart):
            self.running = True
        elif isinstance(event, ctl.VcpuStop):
            self.running = False

    def _record(self, seen: UpcallSeen) -> None:
        self.upcalls.append(seen)
        self.changed.set()
        self.changed = trio.Event()

    def _scan(self) -> tuple[int, ...]:
        """The 2-level upcall handler on the real shared_info bytes."""
        if self.memory is None:
            return ()
        if self.shared_info_gfn is None:
            magic, gfn = GLOBALS.unpack(self.memory.read(GLOBALS_GFN, 0, GLOBALS.size))
            if magic != GLOBALS_MAGIC:
                return ()
            self.shared_info_gfn = gfn
        view = self.memory.view
        shared = view[self.shared_info_gfn * PAGE_SIZE : (self.shared_info_gfn + 1) * PAGE_SIZE]
        if self.vcpu_info is not None:
            vbuf, voff = view, self.vcpu_info[0] * PAGE_SIZE + self.vcpu_info[1]
        else:
            vbuf, voff = shared, si.vcpu_info_offset(self.vcpu)
        ports: list[int] = []
        while si.upcall_pending(vbuf, voff):
            si.set_upcall_pending(vbuf, voff, False)  # clear first, as Linux does
            sel = si.take_pending_sel(vbuf, voff)
            for word in range(64):
                if sel >> word & 1:
                    bits = si.pending_word(shared, word)
                    for bit in range(64):
                        if bits >> bit & 1:
                            si.evtchn_clear_pending(shared, word * 64 + bit)
                            ports.append(word * 64 + bit)
        return tuple(ports)

    async def bench(self, n: int) -> BenchResult:
        msg = XenVersion(0, b"")
        lat = []
        for _ in range(n):
            t = time.perf_counter_ns()
            await self.hv.call(msg)
            lat.append(time.perf_counter_ns() - t)
        lat = lat[n // 10 :]
        lat.sort()
        return BenchResult(
            float(lat[len(lat) // 2]), float(lat[int(len(lat) * 0.99)]), statistics.fmean(lat)
        )


def _serve_control(server, puppet: Puppet) -> None:  # type: ignore[no-untyped-def]
    async def call(peer: Peer, msg: PuppetCall) -> object:
        return await puppet.call(msg.hypercall)

    def upcalls(peer: Peer, msg: PuppetUpcalls) -> UpcallList:
        out = UpcallList(tuple(puppet.upcalls), puppet.running)
        if msg.clear:
            puppet.upcalls.clear()
        return out

    async def wait(peer: Peer, msg: PuppetWait) -> UpcallList:
        with trio.move_on_after(msg.timeout):
            while len(puppet.upcalls) < msg.count:
                await puppet.changed.wait()
        return UpcallList(tuple(puppet.upcalls), puppet.running)

    async def bench(peer: Peer, msg: PuppetBench) -> BenchResult:
        if msg.n < 10:
            raise ServiceError("invalid", "at least 10 round trips")
        return await puppet.bench(msg.n)

    async def send(peer: Peer, msg: PuppetSend) -> SendTimes:
        op = EventChannelOp(EVTCHNOP.send, hc.EvtchnSend(msg.port).pack())
        times = []
        fifo = puppet.posted if msg.posted else None
        for _ in range(msg.n):
            times.append(time.monotonic_ns())
            if fifo is None or not fifo.send(msg.port):
                await puppet.hv.call(op)
            if msg.gap:
                await trio.sleep(msg.gap)
        return SendTimes(tuple(times))

    async def hold(peer: Peer, msg: PuppetHold) -> Ok:
        puppet.hold = msg.hold
        if not msg.hold:
            held, puppet.held = puppet.held, []
            for event in held:
                await puppet.handle(event)
        return Ok()

    def poke(peer: Peer, msg: PuppetPoke) -> Ok:
        assert puppet.memory is not None
        try:
            puppet.memory.write(msg.gfn, msg.offset, msg.data)
        except ValueError as exc:
            raise ServiceError("invalid", str(exc)) from None
        return Ok()

    def peek(peer: Peer, msg: PuppetPeek) -> Bytes:
        assert puppet.memory is not None
        try:
            return Bytes(puppet.memory.read(msg.gfn, msg.offset, msg.length))
        except ValueError as exc:
            raise ServiceError("invalid", str(exc)) from None

    def stamp(peer: Peer, msg: Stamp) -> None:
        puppet.stamp_delays.append(time.monotonic_ns() - msg.sent_ns)

    def stamps(peer: Peer, msg: PuppetStamps) -> PuppetStamps:
        out = PuppetStamps(tuple(puppet.stamp_delays))
        puppet.stamp_delays.clear()
        return out

    async def stamp_to(peer: Peer, msg: PuppetStampTo) -> Ok:
        async with open_channel(msg.endpoint) as chan:
            await chan.wait_connected()
            for _ in range(msg.n):
                await chan.send(Stamp(time.monotonic_ns()))
                await trio.sleep(msg.gap)
            await chan.call(PuppetUpcalls(clear=False), timeout=10)  # the stamps are in
        return Ok()

    server.route(Stamp, stamp)
    server.route(PuppetStamps, stamps)
    server.route(PuppetStampTo, stamp_to)
    server.route(PuppetHold, hold)
    server.route(PuppetPoke, poke)
    server.route(PuppetPeek, peek)
    server.route(PuppetCall, call)
    server.route(PuppetUpcalls, upcalls)
    server.route(PuppetWait, wait)
    server.route(PuppetBench, bench)
    server.route(PuppetSend, send)


async def run(args: argparse.Namespace) -> None:
    async with open_channel(args.hypervisor) as hv:
        welcome = await hv.call(ctl.VcpuHello(args.domid, args.vcpu, args.token), timeout=10)
        puppet = Puppet(hv, args.domid, args.vcpu)
        puppet.memory = GuestMemory.open(Path(welcome.memory_path))
        bell = DoorbellReader(bell_path(welcome.memory_path, args.vcpu))
        puppet.posted = SendFifo(sends_path(welcome.memory_path, args.vcpu))
        await hv.call(ctl.VcpuDoorbell(str(bell.path), str(puppet.posted.path)))
        async with open_server(args.control) as server, trio.open_nursery() as nursery:
            _serve_control(server, puppet)

            async def take_messages() -> None:
                while True:
                    await puppet.handle(await hv.receive())

            async def take_kicks() -> None:
                while True:
                    for kind, vector, flags in await bell.receive():
                        if kind == UPCALL:
                            event = Upcall(args.domid, args.vcpu, (), vector, bool(flags & EOI))
                        else:
                            event = ApicInterrupt(args.domid, args.vcpu, vector, bool(flags & NMI))
                        await puppet.handle(event)

            nursery.start_soon(take_messages)
            nursery.start_soon(take_kicks)
            # The hypervisor is gone for good when its connection stays down.
            while True:
                await trio.sleep(0.5)
                if not hv.connected:
                    await trio.sleep(1.0)
                    if not hv.connected:
                        print("puppet: hypervisor gone, exiting", file=sys.stderr)
                        bell.close()
                        puppet.posted.close()
                        nursery.cancel_scope.cancel()
                        return


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m services.frontend.puppet")
    p.add_argument("--control", required=True)
    p.add_argument("--hypervisor", required=True)
    p.add_argument("--domid", type=int, required=True)
    p.add_argument("--vcpu", type=int, required=True)
    p.add_argument("--token", required=True)
    trio.run(run, p.parse_args(argv))


if __name__ == "__main__":
    main()
