"""The vCPU processes of the guests the hypervisor builds: spawned with the
domain, one per vCPU, killed by PID and reaped when the domain goes."""

from __future__ import annotations

import secrets
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import trio


class VcpuProcesses:
    def __init__(self, nursery: trio.Nursery, logdir: Path | None = None) -> None:
        self._nursery = nursery
        self._logdir = logdir
        self._procs: dict[int, list[trio.Process]] = {}
        self.exits: dict[int, list[int | None]] = {}

    @staticmethod
    def new_token() -> str:
        return secrets.token_hex(16)

    async def spawn(
        self,
        domid: int,
        command: Sequence[str],
        fill: Mapping[str, Any],
        endpoint: str,
        tokens: Sequence[str],
    ) -> tuple[int, ...]:
        """Start one process per token; ``command`` items may use ``{vcpu}`` and
        the keys of ``fill``; the binding arguments are appended."""
        procs = self._procs.setdefault(domid, [])
        for vcpu, token in enumerate(tokens):
            args = [str(part).format(vcpu=vcpu, **fill) for part in command]
            if args and args[0] == "python":
                args[0] = sys.executable  # the interpreter of this installation
            args += ["--hypervisor", endpoint, "--domid", str(domid), "--vcpu", str(vcpu)]
            args += ["--token", token]
            log = self._log(domid, vcpu)
            proc = await trio.lowlevel.open_process(args, stdout=log, stderr=log)
            if log is not None:
                log.close()
            procs.append(proc)
            self._nursery.start_soon(self._reap, domid, proc)
        return tuple(p.pid for p in procs)

    def _log(self, domid: int, vcpu: int) -> Any:
        if self._logdir is None:
            return None
        self._logdir.mkdir(parents=True, exist_ok=True)
        return open(self._logdir / f"dom{domid}-vcpu{vcpu}.log", "ab")  # noqa: SIM115

    async def _reap(self, domid: int, proc: trio.Process) -> None:
        code = await proc.wait()
        self.exits.setdefault(domid, []).append(code)
        procs = self._procs.get(domid)
        if procs is not None and proc in procs:
            procs.remove(proc)
            if not procs:
                del self._procs[domid]

    async def kill_domain(self, domid: int) -> None:
        """SIGKILL every vCPU process of ``domid`` by PID and wait for them."""
        for proc in list(self._procs.get(domid, ())):
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
        with trio.fail_after(10):
            for proc in list(self._procs.get(domid, ())):
                await proc.wait()
        while domid in self._procs:  # let the reapers run
            await trio.sleep(0.001)

    def pids(self, domid: int) -> tuple[int, ...]:
        return tuple(p.pid for p in self._procs.get(domid, ()) if p.returncode is None)

    def count(self, domid: int) -> int:
        return len(self.pids(domid))

    def running(self) -> int:
        return sum(self.count(d) for d in self._procs)

    async def kill_all(self) -> None:
        for domid in list(self._procs):
            await self.kill_domain(domid)
