"""Booting kernel guests on a test hypervisor (tests and benchmarks).

``guest = await boot_guest(hv, "xen", vcpus=4, device_ports=8)`` writes the
guest config into the hypervisor's run dir, creates the domain with the
kernel as its ``vcpu_command``, unpauses it and waits until every vCPU
reports ``running``. The hypervisor test bed destroys the domain at the end;
the vCPU processes are also killed by PID then, in case one outlived it.
"""

from __future__ import annotations

import json
import os
import signal
import struct
from contextlib import AbstractAsyncContextManager
from typing import Any

import attrs
import trio

from services.frontend.kernel import control as kc
from services.frontend.kernel import report
from services.hypervisor import control as ctl
from services.hypervisor.lapic import exit_reason
from services.hypervisor.messages import EventChannelOp
from services.hypervisor.testbed import Guest, HvHost, hypervisor_host
from shared.abi import hypercall as hc
from shared.abi.constants import EVTCHNOP
from shared.transport import Channel, open_channel

KERNEL = ("python", "-m", "services.frontend.kernel", "--config", "{rundir}/guest-{name}.json")


def kernel_host(**settings: str) -> AbstractAsyncContextManager[HvHost]:
    """A hypervisor process to boot kernels on (the test bed: unique host
    name, every process killed by PID at the end)."""
    return hypervisor_host(**settings)


@attrs.define(eq=False)
class KernelGuest:
    hv: HvHost
    domid: int
    vcpus: int
    created: ctl.DomainCreated
    channels: dict[int, Channel] = attrs.Factory(dict)

    def report(self, vcpu: int) -> dict[str, Any]:
        return report.read(self.hv.rundir, self.domid, vcpu) or {}

    def reports(self) -> list[dict[str, Any]]:
        return [self.report(v) for v in range(self.vcpus)]

    async def control(self, vcpu: int) -> Channel:
        if vcpu not in self.channels:
            ep = f"ipc://{self.hv.rundir}/guests/dom{self.domid}/vcpu{vcpu}.sock"
            chan = await self.hv.stack.enter_async_context(open_channel(ep))
            await chan.wait_connected(timeout=20)
            self.channels[vcpu] = chan
        return self.channels[vcpu]

    async def status(self, vcpu: int) -> dict[str, Any]:
        return json.loads((await (await self.control(vcpu)).call(kc.KernelStatus())).json)

    async def run(self, vcpu: int, spec: dict[str, Any], timeout: float = 60) -> Any:
        chan = await self.control(vcpu)
        return json.loads((await chan.call(kc.KernelRun(json.dumps(spec)), timeout=timeout)).json)

    async def ask(self, vcpu: int, msg: Any, timeout: float = 20) -> Any:
        return await (await self.control(vcpu)).call(msg, timeout=timeout)

    async def trace(self, clear: bool = False) -> list[ctl.TraceEntry]:
        return list((await self.hv.dom0.call(ctl.TraceRequest(self.domid, clear))).entries)

    async def detail(self) -> ctl.DomainDetail:
        return await self.hv.dom0.call(ctl.DomainDetailRequest(self.domid))

    async def wait_reports(self, check: Any, timeout: float = 45) -> list[dict[str, Any]]:
        """Until ``check(reports)`` holds (reports re-read every 20 ms)."""
        with trio.fail_after(timeout):
            while True:
                reps = self.reports()
                if all(reps) and check(reps):
                    return reps
                await trio.sleep(0.02)

    def kill(self) -> None:
        for pid in self.created.vcpu_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


async def boot_guest(
    hv: HvHost,
    personality: str = "xen",
    vcpus: int = 4,
    pages: int = 256,
    feature_mask: int = 0xFFFFFFFF,
    wait: bool = True,
    **cfg: Any,
) -> KernelGuest:
    name = f"k{len(hv.guests)}"
    config = {"name": name, "vcpus": vcpus, "platform": personality, "rundir": str(hv.rundir)}
    config.update(cfg)
    (hv.rundir / f"guest-{name}.json").write_text(json.dumps(config))
    command = tuple(part.replace("{name}", name) for part in KERNEL)
    created = await hv.dom0.call(
        ctl.CreateDomain(name, pages, vcpus, personality, feature_mask, command), timeout=20
    )
    hv.guests.append(Guest(created.domid, [], created))
    guest = KernelGuest(hv, created.domid, vcpus, created)
    hv.stack.callback(guest.kill)
    await hv.dom0.call(ctl.UnpauseDomain(created.domid))
    if wait:
        await guest.wait_reports(
            lambda reps: all(r.get("state") in ("running", "panic") for r in reps), timeout=40
        )
    return guest


def exits(detail: ctl.DomainDetail, vcpu: int | None = None) -> dict[str, int]:
    """The hypervisor's exit counts by reason (one vCPU or summed)."""
    out: dict[str, int] = {}
    for v in detail.vcpus:
        if vcpu is None or v.vcpu == vcpu:
            for reason, n in v.exits.items():
                out[reason] = out.get(reason, 0) + n
    return out


class EventSource:
    """Dom0 as a device backend: binds to the guest's device ports (unbound,
    remote dom0) and sends events on them (``EVTCHNOP_send`` from dom0)."""

    def __init__(self, hv: HvHost, domid: int) -> None:
        self.hv = hv
        self.domid = domid
        self.local: dict[int, int] = {}  # guest port -> dom0 port

    async def bind(self, ports: list[int]) -> None:
        for port in ports:
            arg = hc.EvtchnBindInterdomain(self.domid, port).pack()
            res = await self.hv.dom0.call(EventChannelOp(EVTCHNOP.bind_interdomain, arg))
            if res.value != 0:
                raise RuntimeError(f"bind_interdomain({self.domid}, {port}): {res.value}")
            self.local[port] = hc.EvtchnBindInterdomain.unpack(res.data).local_port

    async def send(self, port: int) -> None:
        arg = hc.EvtchnSend(self.local[port]).pack()
        await self.hv.dom0.call(EventChannelOp(EVTCHNOP.send, arg))

    async def send_oneway(self, port: int) -> None:
        """``EVTCHNOP_send`` without waiting for its result, as blkback notifies."""
        await self.hv.dom0.send(
            EventChannelOp(EVTCHNOP.send, hc.EvtchnSend(self.local[port]).pack())
        )

    async def blast(
        self,
        rounds: int,
        gap: float = 0.0005,
        ports: list[int] | None = None,
        parallel: int = 1,
        oneway: int = 0,
    ) -> int:
        """``rounds`` sends on every port from each of ``parallel`` senders per
        port (calls in flight at once); returns sends made. With ``oneway=K``
        each round is K one-way sends and then one call, which returns once
        the hypervisor has taken them all (the channel keeps order): the
        hypervisor answers one call in K+1 sends."""
        targets = ports if ports is not None else list(self.local)

        async def one(port: int) -> None:
            for _ in range(rounds):
                for _ in range(oneway):
                    await self.send_oneway(port)
                await self.send(port)
                await trio.sleep(gap)

        async with trio.open_nursery() as n:
            for port in targets:
                for _ in range(parallel):
                    n.start_soon(one, port)
        return rounds * len(targets) * parallel * (1 + oneway)


_APIC_ARG = struct.Struct("<I?Q")
APIC_REASONS = frozenset({"eoi", "icr_write", "lapic_timer_write", "lapic_write", "lapic_read"})


def reason(entry: ctl.TraceEntry) -> str:
    """An entry's exit reason, recomputed from the argument bytes for LAPIC
    accesses (the hypervisor names every LAPIC access after the first one it saw)."""
    if entry.name in APIC_REASONS and len(entry.arg) >= _APIC_ARG.size:
        reg, write, _ = _APIC_ARG.unpack_from(entry.arg)
        return exit_reason(reg, write)
    return entry.name


def hypercalls(trace: list[ctl.TraceEntry]) -> list[ctl.TraceEntry]:
    return [e for e in trace if e.name.startswith("hypercall:")]


def named(trace: list[ctl.TraceEntry], suffix: str) -> list[ctl.TraceEntry]:
    return [e for e in trace if reason(e).endswith(suffix)]
