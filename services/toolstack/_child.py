"""One supervised service process: spawn, watch, signal by PID, reap.

Each start of a service is an *incarnation*: a task that spawns the process
(its own session, so a terminal's Ctrl-C reaches only the supervisor), holds a
channel to it for Ping/Status/Shutdown, and reaps it when it exits. A restart
is a new incarnation with a new process and a new channel.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import attrs
import trio

from services.toolstack import _runfiles
from services.toolstack._protocol import ServiceState, ServiceStates
from shared import messages
from shared.topology import SERVICE_MODULES, Host
from shared.transport import CallTimeout, Channel, PeerLost, RemoteError, open_channel

_nonces = itertools.count(1)


class StartFailed(Exception):
    """A service did not answer Ping in time; the message names it and holds
    the tail of its log."""


@attrs.define(eq=False)
class ServiceChild:
    """The supervisor's record of one service of its host."""

    name: str
    host: Host
    topology: Path
    endpoint: str
    process: trio.Process | None = None
    channel: Channel | None = None
    state: str = ServiceStates.NEVER_STARTED
    restarts: int = 0
    exit_code: int | None = None
    spawned_at: float = 0.0
    exited: trio.Event = attrs.field(factory=trio.Event)
    # What we asked for before signalling it, so its exit is named rightly.
    intent: str | None = None
    # Held by a control request (kill, stop, restart) while it acts.
    lock: trio.Lock = attrs.field(factory=trio.Lock)

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    @property
    def alive(self) -> bool:
        return self.process is not None and not self.exited.is_set()

    @property
    def log(self) -> Path:
        return _runfiles.log_file(self.host, self.name)

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            SERVICE_MODULES[self.name],
            "--topology",
            str(self.topology),
            "--host",
            self.host.name,
        ]

    async def run_incarnation(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Spawn the process, report started, then hold its channel until it
        exits and reap it. Run in the supervisor's nursery."""
        if self.process is not None:
            self.restarts += 1
        self.exited = trio.Event()
        self.intent = None
        self.exit_code = None
        with self.log.open("ab") as log:
            log.write(f"--- domsplit: starting {self.name} at {time.ctime()}\n".encode())
            log.flush()
            self.process = await trio.lowlevel.open_process(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.spawned_at = time.monotonic()
        self.state = ServiceStates.STARTING
        task_status.started()
        try:
            async with open_channel(self.endpoint) as chan:
                self.channel = chan
                await self.process.wait()
        finally:
            self.channel = None
            if self.process.returncode is None:
                # Cancelled (supervisor going away): never leave it running.
                self.signal(signal.SIGKILL)
                with trio.CancelScope(shield=True):
                    await self.process.wait()
            self.exit_code = self.process.returncode
            self.state = self.intent or ServiceStates.EXITED
            self.exited.set()

    async def wait_ready(self, timeout: float) -> None:
        """Return once the process answers Ping with its own PID; raise
        :class:`StartFailed` if it exits first or ``timeout`` passes."""
        with trio.move_on_after(timeout):
            while not self.exited.is_set():
                if await self.ping(0.5):
                    self.state = ServiceStates.RUNNING
                    return
                await trio.sleep(0.02)
        if self.exited.is_set():
            reason = f"exited with code {self.exit_code} before answering Ping"
        else:
            reason = f"did not answer Ping on {self.endpoint} within {timeout:g}s"
        tail = _runfiles.log_tail(self.log)
        raise StartFailed(f"service {self.name} (pid {self.pid}) {reason}; {self.log}:\n{tail}")

    async def ping(self, timeout: float) -> bool:
        """True if this incarnation answers Ping within ``timeout``."""
        chan = self.channel
        if chan is None:
            return False
        with trio.move_on_after(timeout):
            try:
                await chan.wait_connected(timeout)
                nonce = next(_nonces)
                pong = await chan.call(messages.Ping(nonce), timeout=timeout)
            except (trio.TooSlowError, CallTimeout, PeerLost, RemoteError):
                return False
            return pong.nonce == nonce and pong.pid == self.pid
        return False

    async def query_status(self, timeout: float) -> messages.StatusReply | None:
        """The service's StatusReply, or None if it does not answer in time."""
        chan = self.channel
        if chan is None or not chan.connected or self.state == ServiceStates.PAUSED:
            return None
        try:
            return await chan.call(messages.StatusRequest(), timeout=timeout)
        except (CallTimeout, PeerLost, RemoteError):
            return None

    def signal(self, sig: int) -> bool:
        """``kill(pid, sig)`` unless the process has been reaped (then its PID
        may belong to someone else). False if it was already gone."""
        if self.process is None or self.process.returncode is not None:
            return False
        return _runfiles.signal_pid(self.pid, sig)

    async def terminate(self, grace: float, intent: str = ServiceStates.STOPPED) -> None:
        """Stop the process: ShutdownRequest, then SIGTERM after half of
        ``grace``, then SIGKILL after the other half. Returns once it is reaped."""
        if not self.alive:
            return
        self.intent = intent
        if self.state == ServiceStates.PAUSED:
            self.signal(signal.SIGCONT)
        with trio.move_on_after(grace / 2):
            chan = self.channel
            if chan is not None and chan.connected:
                try:
                    await chan.call(messages.ShutdownRequest(), timeout=grace / 2)
                except (CallTimeout, PeerLost, RemoteError):
                    pass
            await self.exited.wait()
        for sig, wait in ((signal.SIGTERM, grace / 2), (signal.SIGKILL, 10.0)):
            if self.exited.is_set():
                return
            self.signal(sig)
            with trio.move_on_after(wait):
                await self.exited.wait()

    async def kill(self) -> None:
        """SIGKILL by PID (a fault test's crash); returns once reaped."""
        self.intent = ServiceStates.KILLED
        self.signal(signal.SIGKILL)
        with trio.fail_after(10):
            await self.exited.wait()

    def snapshot(self, status: messages.StatusReply | None = None) -> ServiceState:
        uptime = time.monotonic() - self.spawned_at if self.alive else 0.0
        return ServiceState(
            service=self.name,
            endpoint=self.endpoint,
            pid=self.pid,
            state=self.state,
            alive=self.alive,
            restarts=self.restarts,
            uptime=uptime,
            exit_code=self.exit_code,
            status=status,
            log=os.fspath(self.log),
        )
