"""The vCPU process: bind to the hypervisor as (domid, vCPU), map guest RAM,
wait to be started, boot (vCPU0) or come up as an AP, then run the
configured workloads; serve the control endpoint and keep the report file
current throughout. Exits when the hypervisor is gone for good.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
from pathlib import Path
from typing import Any

import trio

from services.frontend.kernel import boot, report, workloads
from services.frontend.kernel import config as kconfig
from services.frontend.kernel import control as kcontrol
from services.frontend.kernel.kernel import Kernel, KernelPanic
from services.frontend.kernel.layout import KernelMemory, Stage
from services.hypervisor import control as ctl
from services.hypervisor.effects import ApicInterrupt, Upcall
from shared.doorbell import EOI, NMI, UPCALL, DoorbellReader, bell_path, sends_path
from shared.evtchn_dev import SendFifo
from shared.guestmem import GuestMemory
from shared.memtune import calm_gc, keep_large_buffers
from shared.transport import Channel, open_channel, open_server

REPORT_INTERVAL_S = 0.1
CHURN_INTERVAL_S = 0.5


class Guest:
    """One vCPU process's kernel plus its bookkeeping for the report."""

    def __init__(self, k: Kernel, args: argparse.Namespace) -> None:
        self.k = k
        self.args = args
        self.devices: list[int] = []
        self.results: dict[str, Any] = {}
        self.xenbus: Any = None

    def status(self) -> dict[str, Any]:
        data = report.build(self.k, self.devices, self.results)
        data["test_callouts"] = getattr(self.k, "test_callouts", [])
        if self.xenbus is not None:
            data["xenbus"] = self.xenbus.status()
        return data

    def write_report(self) -> None:
        if self.k.cfg.rundir:
            path = report.report_path(self.k.cfg.rundir, self.k.domid, self.k.cpu)
            report.write_atomic(path, self.status())

    def version(self) -> tuple[int, ...]:
        """What a reader waits for: log lines, results, IPIs, the CPU's state."""
        k = self.k
        return (
            len(k.dmesg),
            len(self.results),
            len(getattr(k, "test_callouts", ())),
            sum(k.ipi_sent.values()),
            sum(k.ipi_handled.values()),
            sum(k.bitmap_taken.values()),
            k.nmis,
            hash(k.state),
        )

    def churn(self) -> tuple[int, ...]:
        """Counters that move with every interrupt."""
        sc = self.k.scanner
        return (
            sc.upcalls if sc else 0,
            sum(sc.apic.values()) if sc else 0,
            sum(self.k.device_events.values()),
        )

    async def reporter(self) -> None:
        """Rewrite the report within 0.1 s of a change a reader waits for, and
        at most every 0.5 s when only interrupt counters moved: each rewrite
        costs the host ~0.3 ms of file system work, and at 0.1 s under a timer
        workload those were the 1 % tail of timer lateness."""
        written, churned, last = None, None, 0.0
        while True:
            await trio.sleep(REPORT_INTERVAL_S)
            v, c = self.version(), self.churn()
            due = v != written or (c != churned and trio.current_time() - last >= CHURN_INTERVAL_S)
            if due and self.k.cfg.rundir:
                path = report.report_path(self.k.cfg.rundir, self.k.domid, self.k.cpu)
                body = report.encode(self.status())
                try:
                    await trio.to_thread.run_sync(_write_in_background, path, body)
                except OSError as exc:  # (the run directory going away): try again later
                    print(f"report not written: {exc}", file=sys.stderr, flush=True)
                    continue
                written, churned, last = v, c, trio.current_time()

    async def run_workload(self, spec: dict[str, Any]) -> dict[str, Any] | None:
        name = spec.get("name") or f"{len(self.results)}:{spec['kind']}"
        result = await workloads.run(self.k, spec)
        if result is not None:
            self.results[name] = result
            self.k.touch()
        return result

    async def rebind(self, port: int, vcpu: int) -> int:
        rc = await boot.assign_cpu(self.k, port, vcpu)
        self.k.log(f"rebind port {port} -> cpu{vcpu}: {rc}")
        return rc

    async def boot(self) -> None:
        k = self.k
        await k.started.wait()
        if k.cpu == 0:
            k.log(f"booting {k.cfg.name}: {k.nr_cpus} vCPUs")
            self.devices = await boot.boot_bsp(k)
            if self.args.xenstore and k.platform.xen:
                from services.frontend.kernel.xenbus import Xenbus

                self.xenbus = Xenbus(k, self.args.xenstore, self.args.xs_token)
                assert k.nursery is not None
                await self.xenbus.attach(k.nursery, self.devices)
            k.mem.set_stage(Stage.DEVICES)
            k.log("boot complete")
        else:
            await boot.boot_ap(k)
            while k.mem.stage() < Stage.DEVICES:
                await trio.sleep(0.002)
        if k.state == "booting":
            k.state = "running"
        k.touch()

    async def main(self) -> None:
        k = self.k
        try:
            await self.boot()
            for spec in k.cfg.workloads:
                await self.run_workload(dict(spec))
            if k.cfg.workloads:
                k.log("workloads done")
        except KernelPanic:
            pass
        self.write_report()
        await trio.sleep(math.inf)


async def run(args: argparse.Namespace) -> None:
    cfg = kconfig.load(args.config)
    async with open_channel(args.hypervisor) as hv:
        welcome = await hv.call(ctl.VcpuHello(args.domid, args.vcpu, args.token), timeout=10)
        memory = GuestMemory.open(Path(welcome.memory_path))
        mem = KernelMemory(memory.view, welcome.nr_vcpus)
        k = Kernel(hv, cfg, args.domid, args.vcpu, mem)
        guest = Guest(k, args)
        bell = DoorbellReader(bell_path(welcome.memory_path, args.vcpu))
        sends = SendFifo(sends_path(welcome.memory_path, args.vcpu))
        await hv.call(ctl.VcpuDoorbell(str(bell.path), str(sends.path)))
        k.posted = sends
        irq_in, irq_out = trio.open_memory_channel[object](math.inf)
        async with trio.open_nursery() as nursery:
            k.nursery = nursery
            k.irq = irq_in
            nursery.start_soon(k.interrupts, irq_out)
            nursery.start_soon(_take_messages, hv, irq_in)
            nursery.start_soon(_take_kicks, bell, args.domid, args.vcpu, irq_in)
            nursery.start_soon(guest.reporter)
            endpoint = cfg.control_endpoint(args.domid, args.vcpu)
            if endpoint:
                report.report_path(cfg.rundir, args.domid, args.vcpu).parent.mkdir(
                    parents=True, exist_ok=True
                )
                server = await nursery.start(_serve, endpoint, guest)
                del server
            nursery.start_soon(guest.main)
            while True:  # the hypervisor is gone for good when its connection stays down
                await trio.sleep(0.5)
                if not hv.connected:
                    await trio.sleep(1.0)
                    if not hv.connected:
                        print(f"cpu{args.vcpu}: hypervisor gone, halting", file=sys.stderr)
                        guest.write_report()
                        bell.close()
                        nursery.cancel_scope.cancel()
                        return


def _write_in_background(path: Path, body: bytes) -> None:
    """On a worker thread at the lowest priority: the report must not take a
    core from the hypervisor or a vCPU about to take an interrupt."""
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    report.write_bytes_atomic(path, body)


async def _take_messages(hv: Channel, irq: trio.MemorySendChannel[object]) -> None:
    while True:
        irq.send_nowait(await hv.receive())


async def _take_kicks(
    bell: DoorbellReader, domid: int, vcpu: int, irq: trio.MemorySendChannel[object]
) -> None:
    """Doorbell records are the hypervisor's kicks without nng (the bits are in RAM)."""
    while True:
        for kind, vector, flags in await bell.receive():
            if kind == UPCALL:
                irq.send_nowait(Upcall(domid, vcpu, (), vector, bool(flags & EOI)))
            else:
                irq.send_nowait(ApicInterrupt(domid, vcpu, vector, bool(flags & NMI)))


async def _serve(endpoint: str, guest: Guest, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    async with open_server(endpoint) as server:
        kcontrol.install(server, guest.k, guest.status, guest.run_workload, guest.rebind)
        task_status.started(server)
        await trio.sleep(math.inf)


PROFILE_ENV = "DOMSPLIT_VCPU_PROFILE"


async def _profiled(args: argparse.Namespace, where: str) -> None:
    """With ``DOMSPLIT_VCPU_PROFILE=<dir>``: run under cProfile and dump the
    stats to ``<dir>/dom<D>-vcpu<K>.prof`` every second (a vCPU process is
    killed, not stopped, when its domain is destroyed)."""
    import cProfile

    prof = cProfile.Profile()
    out = Path(where) / f"dom{args.domid}-vcpu{args.vcpu}.prof"

    async def dump() -> None:
        while True:
            await trio.sleep(1.0)
            prof.create_stats()
            prof.dump_stats(out)
            prof.enable()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dump)
        prof.enable()
        await run(args)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m services.frontend.kernel")
    p.add_argument("--config", required=True)
    p.add_argument("--xenstore", default="")
    p.add_argument("--xs-token", default="")
    p.add_argument("--hypervisor", required=True)
    p.add_argument("--domid", type=int, required=True)
    p.add_argument("--vcpu", type=int, required=True)
    p.add_argument("--token", required=True)
    args = p.parse_args(argv)
    keep_large_buffers()
    calm_gc()
    where = os.environ.get(PROFILE_ENV)
    if where:
        trio.run(_profiled, args, where)
    else:
        trio.run(run, args)
