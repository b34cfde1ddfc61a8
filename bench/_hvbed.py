"""Shared set-up of the hypervisor benchmarks: a hypervisor process and an
echo peer pinned to CPU 1, the measuring process on CPU 0 (see bench.transport
on why pinning)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.hypervisor.testbed import HvHost, hypervisor_host

BENCH_CPU, PEER_CPU = 0, 1


def pin_self() -> None:
    if len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {BENCH_CPU})


def pin_process(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` (nng runs its own threads) to ``cpu``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except (ProcessLookupError, PermissionError):
            pass


def unpin_process(pid: int) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), range(os.cpu_count() or 1))
        except (ProcessLookupError, PermissionError):
            pass


@asynccontextmanager
async def bed() -> AsyncIterator[tuple[HvHost, str, int]]:
    """(hypervisor host, endpoint of an echo peer on our transport, its pid)."""
    pin_self()
    with tempfile.TemporaryDirectory(prefix="ds-b-", dir="/tmp") as tmp:
        echo = f"ipc://{tmp}/echo.sock"
        peer = subprocess.Popen(
            [
                "taskset",
                "-c",
                str(PEER_CPU),
                sys.executable,
                "-m",
                "bench._transport_peer",
                "ours",
                echo,
            ]
        )
        try:
            time.sleep(0.5)
            async with hypervisor_host() as hv:
                pin_process(hv.proc.pid, PEER_CPU)
                yield hv, echo, peer.pid
        finally:
            peer.kill()
            peer.wait(5)
