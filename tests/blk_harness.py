"""A host for blkback tests: hypervisor, xenstored and blkback as real
processes on a temporary topology; the test plays the toolstack (it writes the
vbd directories, as ``xl block-attach`` would) and the guest (see
:mod:`tests.blk_frontend`).

Every process is started here and killed here by PID; ``kill_blkback`` is
``kill -9`` and ``start_blkback`` brings a fresh one up. With ``BLK_PROFILE``
set to a directory each process runs under cProfile (see ``bench/block.py``).
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

from services.backend.blkback_messages import ExecLog, ExecLogRequest
from services.hypervisor import control as ctl
from services.xenstore.client import XsClient, open_xs_client
from services.xenstore.messages import host_secret as xs_secret
from shared import messages
from shared.abi import xs_wire as w
from shared.hostsecret import host_secret
from shared.transport import Channel, open_channel

SERVICES = ("hypervisor", "xenstore", "blkback")
# A directory: every process is started under cProfile and writes
# ``<dir>/<service>.prof`` when it stops (SIGTERM exits cleanly).
PROFILE_ENV = "BLK_PROFILE"


def vbd_paths(domid: int, devid: int, backend: int = 0) -> tuple[str, str]:
    """(frontend dir, backend dir) of a vbd."""
    return (
        f"/local/domain/{domid}/device/vbd/{devid}",
        f"/local/domain/{backend}/backend/vbd/{domid}/{devid}",
    )


@attrs.define(eq=False)
class BlkHost:
    base: Path
    rundir: Path
    topology: Path
    procs: dict[str, subprocess.Popen]
    stack: AsyncExitStack
    hv: Channel | None = None
    xs: XsClient | None = None
    blkback_ctl: Channel | None = None
    domids: list[int] = attrs.Factory(list)

    def endpoint(self, service: str) -> str:
        return f"ipc://{self.rundir}/{service}.sock"

    def _spawn(self, service: str) -> subprocess.Popen:
        module = {"hypervisor": "services.hypervisor", "xenstore": "services.xenstore"}.get(
            service, "services.backend.blkback"
        )
        log = open(self.base / f"{service}.log", "ab")  # noqa: SIM115
        profile = os.environ.get(PROFILE_ENV)
        prefix = ["-m", "cProfile", "-o", f"{profile}/{service}.prof"] if profile else []
        proc = subprocess.Popen(
            [sys.executable, *prefix, "-m", module, "--topology", str(self.topology)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs[service] = proc
        return proc

    async def start_blkback(self) -> None:
        self._spawn("blkback")
        assert self.blkback_ctl is not None
        with trio.fail_after(20):
            while True:
                try:
                    await self.blkback_ctl.call(messages.Ping(1), timeout=2)
                    return
                except Exception:
                    await trio.sleep(0.05)

    def kill_blkback(self) -> None:
        """``kill -9`` the blkback process and reap it."""
        proc = self.procs["blkback"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

    async def blkback_status(self) -> dict[str, Any]:
        assert self.blkback_ctl is not None
        return (await self.blkback_ctl.call(messages.StatusRequest())).stats["blkback"]

    async def exec_log(self, domid: int, devid: int, clear: bool = False) -> ExecLog:
        assert self.blkback_ctl is not None
        return await self.blkback_ctl.call(ExecLogRequest(domid, devid, clear))

    async def create_guest(self, pages: int = 2048) -> ctl.DomainCreated:
        """A paused domain with no vCPU process: the test acts as its vCPU."""
        assert self.hv is not None
        created = await self.hv.call(ctl.CreateDomain("g", pages, 1, "xen"), timeout=20)
        self.domids.append(created.domid)
        return created

    async def attach(
        self,
        domid: int,
        devid: int,
        params: str,
        mode: str = "w",
        device_type: str = "disk",
    ) -> None:
        """What the toolstack writes for a vbd (xen-reference 2.2/2.3), in one transaction."""
        xs = self.xs
        assert xs is not None
        fe, be = vbd_paths(domid, devid)
        tx = await xs.transaction_start()
        for path, owner, other in (
            (f"/local/domain/{domid}", domid, 0),
            (fe, domid, 0),
            (be, 0, domid),
        ):
            await xs.request(w.mkdir(path, req_id=xs.next_id(), tx_id=tx))
            perms = [w.Perm(w.PermKind.NONE, owner), w.Perm(w.PermKind.READ, other)]
            await xs.request(w.set_perms(path, perms, req_id=xs.next_id(), tx_id=tx))
        fe_keys = {
            "backend": be,
            "backend-id": "0",
            "state": "1",
            "virtual-device": str(devid),
            "device-type": device_type,
        }
        be_keys = {
            "frontend": fe,
            "frontend-id": str(domid),
            "online": "1",
            "state": "1",
            "params": params,
            "type": "file",
            "mode": mode,
            "device-type": device_type,
            "removable": "1" if device_type == "cdrom" else "0",
        }
        for d, keys in ((fe, fe_keys), (be, be_keys)):
            for k, v in keys.items():
                await xs.write(f"{d}/{k}", v.encode(), tx)
        await xs.transaction_end(tx)

    async def set_params(self, domid: int, devid: int, params: str) -> None:
        """Media insert/eject: the toolstack rewrites ``params``."""
        assert self.xs is not None
        await self.xs.write(f"{vbd_paths(domid, devid)[1]}/params", params.encode())


def _topology(base: Path, name: str) -> Path:
    path = base / "topo.toml"
    listed = ", ".join(f'"{s}"' for s in SERVICES)
    path.write_text(f'[run]\ndir = "{base}"\n\n[hosts.{name}]\nservices = [{listed}]\n')
    return path


@asynccontextmanager
async def blk_host() -> AsyncIterator[BlkHost]:
    base = Path(tempfile.mkdtemp(prefix="ds-blk-", dir="/tmp"))
    name = "b" + secrets.token_hex(3)  # its /dev/shm files cannot be anyone else's
    rundir = base / name
    rundir.mkdir()
    host_secret(rundir, create=True)
    topo = _topology(base, name)
    async with AsyncExitStack() as stack:
        h = BlkHost(base, rundir, topo, {}, stack)
        try:
            h._spawn("hypervisor")
            h._spawn("xenstore")
            h.hv = await stack.enter_async_context(open_channel(h.endpoint("hypervisor")))
            await h.hv.wait_connected(timeout=20)
            await h.hv.call(ctl.Dom0Hello(host_secret(rundir)), timeout=10)
            h.xs = await stack.enter_async_context(
                open_xs_client(h.endpoint("xenstore"), 0, xs_secret(rundir))
            )
            h.blkback_ctl = await stack.enter_async_context(open_channel(h.endpoint("blkback")))
            await h.start_blkback()
            yield h
        finally:
            with trio.move_on_after(5) as scope:
                scope.shield = True
                for domid in h.domids:
                    try:
                        await h.hv.call(ctl.DestroyDomain(domid), timeout=5)  # type: ignore[union-attr]
                    except Exception:
                        pass
            for proc in h.procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in h.procs.values():
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            for shm in Path("/dev/shm").glob(f"domsplit-{name}-dom*"):
                shm.unlink(missing_ok=True)
            if os.environ.get("BLK_KEEP"):
                print(f"blkback test host kept in {base}")
            else:
                shutil.rmtree(base, ignore_errors=True)
