"""A test bed for tests and benchmarks: a real hypervisor process with
scripted vCPU processes (puppets) in separate processes.

``async with hypervisor_host(tmp) as hv:`` starts ``python -m
services.hypervisor`` on a temporary topology, connects as dom0, and on exit
kills every process it started, by PID, and checks nothing is left.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from services.frontend import puppet as pp
from services.hypervisor import control as ctl
from services.hypervisor.messages import EventChannelOp, HvmOp, HypercallResult, MemoryOp, VcpuOp
from shared import messages
from shared.abi import hypercall as hc
from shared.abi.constants import (
    DOMID,
    EVTCHNOP,
    HVM_PARAM,
    HVMOP,
    VCPUOP,
    XENMAPSPACE,
    XENMEM,
)
from shared.hostsecret import host_secret
from shared.transport import Channel, open_channel

PUPPET = (
    "python",
    "-m",
    "services.frontend.puppet",
    "--control",
    "ipc://{rundir}/p{domid}-{vcpu}.sock",
)
SHARED_INFO_GFN = 2
CALLBACK_VECTOR = 0xF3
HVM_CALLBACK_VECTOR = 2 << 56


def evtchn(cmd: int, record: Any) -> EventChannelOp:
    return EventChannelOp(cmd, record.pack())


@attrs.define(eq=False)
class Vcpu:
    """A puppet vCPU: ``call`` makes a hypercall as it."""

    domid: int
    vcpu: int
    control: Channel

    async def call(self, hypercall: Any) -> HypercallResult:
        return await self.control.call(pp.PuppetCall(hypercall), timeout=10)

    async def evtchn(self, cmd: int, record: Any) -> tuple[int, Any]:
        """An EVTCHNOP; returns (rc, the OUT record)."""
        res = await self.call(evtchn(cmd, record))
        out = type(record).unpack(res.data) if res.value >= 0 and res.data else None
        return res.value, out

    async def upcalls(self, clear: bool = True) -> tuple[pp.UpcallSeen, ...]:
        return (await self.control.call(pp.PuppetUpcalls(clear))).upcalls

    async def wait_upcalls(self, count: int, timeout: float = 5.0) -> tuple[pp.UpcallSeen, ...]:
        return (await self.control.call(pp.PuppetWait(count, timeout), timeout=timeout + 5)).upcalls

    async def poke(self, gfn: int, offset: int, data: bytes) -> None:
        await self.control.call(pp.PuppetPoke(gfn, offset, data))

    async def peek(self, gfn: int, offset: int, length: int) -> bytes:
        return (await self.control.call(pp.PuppetPeek(gfn, offset, length))).data

    async def hold(self, hold: bool) -> None:
        await self.control.call(pp.PuppetHold(hold))


@attrs.define(eq=False)
class Guest:
    domid: int
    vcpus: list[Vcpu]
    created: ctl.DomainCreated

    async def pv_setup(self, callback: str = "vector") -> None:
        """What a PVHVM guest's vCPU0 does first: map shared_info, set the
        callback (``vector``, ``gsi`` or ``none``)."""
        v0 = self.vcpus[0]
        arg = hc.XenAddToPhysmap(DOMID.SELF, XENMAPSPACE.shared_info, 0, SHARED_INFO_GFN).pack()
        assert (await v0.call(MemoryOp(XENMEM.add_to_physmap, arg))).value == 0
        value = {"vector": HVM_CALLBACK_VECTOR | CALLBACK_VECTOR, "gsi": 28, "none": 0}[callback]
        param = hc.XenHvmParam(DOMID.SELF, HVM_PARAM.CALLBACK_IRQ, value).pack()
        assert (await v0.call(HvmOp(HVMOP.set_param, param))).value == 0

    async def bring_up(self) -> None:
        """vCPU0 brings every other vCPU online."""
        for v in self.vcpus[1:]:
            assert (await self.vcpus[0].call(VcpuOp(VCPUOP.up, v.vcpu, b""))).value == 0


@attrs.define(eq=False)
class HvHost:
    rundir: Path
    endpoint: str
    dom0: Channel
    proc: subprocess.Popen
    stack: AsyncExitStack
    guests: list[Guest] = attrs.Factory(list)

    async def create(
        self,
        vcpus: int = 2,
        personality: str = "xen",
        pages: int = 64,
        puppets: bool = True,
        feature_mask: int = 0xFFFFFFFF,
    ) -> Guest:
        command = PUPPET if puppets else ()
        created = await self.dom0.call(
            ctl.CreateDomain(
                f"g{len(self.guests)}", pages, vcpus, personality, feature_mask, command
            ),
            timeout=20,
        )
        guest = Guest(created.domid, [], created)
        if puppets:
            for v in range(vcpus):
                ep = f"ipc://{self.rundir}/p{created.domid}-{v}.sock"
                chan = await self.stack.enter_async_context(open_channel(ep))
                await chan.wait_connected(timeout=20)
                guest.vcpus.append(Vcpu(created.domid, v, chan))
            # every puppet has said hello once it answers (it serves after binding)
            await self.dom0.call(ctl.UnpauseDomain(created.domid))
        self.guests.append(guest)
        return guest

    async def bind_as_vcpu(self, guest: Guest, vcpu: int) -> Channel:
        """A channel of the test's own acting as ``guest``'s vCPU (no process)."""
        chan = await self.stack.enter_async_context(open_channel(self.endpoint))
        await chan.call(ctl.VcpuHello(guest.domid, vcpu, guest.created.tokens[vcpu]))
        return chan

    async def status(self) -> messages.StatusReply:
        return await self.dom0.call(messages.StatusRequest())


async def dom0_evtchn(hv: HvHost, cmd: int, record: Any) -> tuple[int, Any]:
    res = await hv.dom0.call(evtchn(cmd, record))
    return res.value, (type(record).unpack(res.data) if res.value >= 0 and res.data else None)


async def interdomain_pair(hv: HvHost) -> tuple[Guest, Guest, int, int]:
    """Two 1-vCPU guests in vector mode with an interdomain channel between
    them, the binding's upcall already taken: ``(a, b, a's port, b's port)``."""
    a, b = await hv.create(vcpus=1), await hv.create(vcpus=1)
    for g in (a, b):
        await g.pv_setup("vector")
    rc, unbound = await b.vcpus[0].evtchn(
        EVTCHNOP.alloc_unbound, hc.EvtchnAllocUnbound(DOMID.SELF, a.domid)
    )
    if rc:
        raise RuntimeError(f"alloc_unbound: {rc}")
    rc, bound = await a.vcpus[0].evtchn(
        EVTCHNOP.bind_interdomain, hc.EvtchnBindInterdomain(b.domid, unbound.port)
    )
    if rc:
        raise RuntimeError(f"bind_interdomain: {rc}")
    await a.vcpus[0].wait_upcalls(1)
    await a.vcpus[0].upcalls()
    return a, b, bound.local_port, unbound.port


def _topology(rundir: Path, settings: dict[str, str]) -> Path:
    lines = [
        f'[run]\ndir = "{rundir.parent}"',
        f"[hosts.{rundir.name}]",
        'services = ["hypervisor"]',
    ]
    if settings:
        lines.append(f"[hosts.{rundir.name}.settings]")
        lines += [f'{k} = "{v}"' for k, v in settings.items()]
    path = rundir.parent / f"{rundir.name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@asynccontextmanager
async def hypervisor_host(**settings: str) -> AsyncIterator[HvHost]:
    base = Path(tempfile.mkdtemp(prefix="ds-hv-", dir="/tmp"))
    # A host name of its own: RAM files are /dev/shm/domsplit-<host>-dom<N>, and
    # test beds running at once must not collide there.
    rundir = base / ("h" + secrets.token_hex(3))
    rundir.mkdir()
    topo = _topology(rundir, settings)
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.hypervisor", "--topology", str(topo)],
        stdout=open(base / "hv.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    endpoint = f"ipc://{rundir}/hypervisor.sock"
    try:
        async with AsyncExitStack() as stack:
            dom0 = await stack.enter_async_context(open_channel(endpoint))
            await dom0.wait_connected(timeout=20)
            await dom0.call(ctl.Dom0Hello(host_secret(rundir)), timeout=10)
            host = HvHost(rundir, endpoint, dom0, proc, stack)
            try:
                yield host
            finally:
                with trio.move_on_after(10):
                    for g in host.guests:
                        try:
                            await dom0.call(ctl.DestroyDomain(g.domid), timeout=10)
                        except Exception:
                            pass
    finally:
        pids = _vcpu_pids(topo)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        for pid in pids:  # a vCPU process that outlived its hypervisor
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(base, ignore_errors=True)


def _vcpu_pids(topo: Path) -> list[int]:
    """PIDs of vCPU processes (puppets or kernels) serving under this test's run dir."""
    marker = str(topo.parent).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            is_vcpu = (
                b"services.frontend.puppet" in cmdline or b"services.frontend.kernel" in cmdline
            )
            if is_vcpu and marker in cmdline:
                pids.append(int(entry))
    return pids


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status
