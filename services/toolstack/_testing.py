"""Test support for anything that brings a host up: a throw-away topology in a
short temporary run dir, the CLI as a subprocess, and a last-resort sweep that
kills (by PID) every process still naming the topology.

Kept next to the supervisor (as ``trio.testing`` is next to trio) so every
test module that needs live services uses the same few lines.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import trio

from services.toolstack import _runfiles
from shared.topology import SERVICES, Host, load

CLI = [sys.executable, "-m", "services.toolstack"]


@attrs.frozen
class ScratchHost:
    """A host of a temporary topology: ``path`` is the TOML file."""

    path: Path
    host: Host

    @property
    def name(self) -> str:
        return self.host.name


def write_topology(directory: Path, host: str, services: tuple[str, ...] = SERVICES) -> Path:
    """A topology with one host whose run dir is ``directory/run``; every
    endpoint is ipc:// (no TCP port to collide with anything)."""
    path = directory / "topology.toml"
    listed = ", ".join(f'"{s}"' for s in services)
    path.write_text(f'[run]\ndir = "{directory}/run"\n\n[hosts.{host}]\nservices = [{listed}]\n')
    return path


@contextmanager
def temporary_host(services: tuple[str, ...] = SERVICES) -> Iterator[ScratchHost]:
    """A fresh topology under a short /tmp dir (ipc paths stay far below the
    ~100 character limit) with a random host name (its /dev/shm files cannot
    be a real host's). On exit: ``host down``, then SIGKILL by PID whatever
    still names the topology, then remove the directory."""
    directory = Path(tempfile.mkdtemp(prefix="ds-", dir="/tmp"))
    path = write_topology(directory, "t" + secrets.token_hex(3), services)
    try:
        yield ScratchHost(path, load(path).host())
    finally:
        subprocess.run(
            [*CLI, "host", "down", "-t", str(path)], capture_output=True, timeout=60, check=False
        )
        for pid in _runfiles.processes_mentioning(str(path)):
            _runfiles.signal_pid(pid, signal.SIGKILL)
        for shm in _runfiles.shm_files(load(path).host()):
            shm.unlink(missing_ok=True)
        shutil.rmtree(directory, ignore_errors=True)


async def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """``domsplit ARGS`` as a subprocess (killed if it outlives ``timeout``)."""
    with trio.fail_after(timeout):
        return await trio.run_process(
            [*CLI, *args], capture_stdout=True, capture_stderr=True, check=False
        )


def leftovers(test_host: ScratchHost) -> dict[str, list]:
    """Everything a clean ``host down`` must leave gone; all lists empty when clean."""
    host = test_host.host
    return {
        "processes": _runfiles.processes_mentioning(str(test_host.path)),
        "sockets": [p for p in host.rundir.rglob("*") if p.is_socket() or p.is_fifo()]
        if host.rundir.exists()
        else [],
        "pid_file": [p for p in [_runfiles.pid_file(host)] if p.exists()],
        "shm": _runfiles.shm_files(host),
    }


def wait_until_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    """The PIDs still alive after ``timeout`` (zombies count as gone)."""
    return _runfiles.wait_gone([p for p in pids if p != os.getpid()], timeout)
