"""The supervisor of one host: starts each service of the host as its own
process, waits until every one answers Ping, then serves the control endpoint
(``Host.supervisor_endpoint``, messages in :mod:`services.toolstack._protocol`)
until ``HostDown``, SIGTERM or SIGINT; then stops everything and removes the
host's run files.

It never restarts a service by itself: a service that dies (or that a fault
test kills) stays dead until someone sends ``RestartService``.

:func:`run` is the whole life of a supervisor in the foreground; ``domsplit
host up`` runs it in a detached process, ``domsplit demo`` in its own.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from services.toolstack import _runfiles
from services.toolstack._child import ServiceChild, StartFailed
from services.toolstack._protocol import (
    HostDown,
    HostStatusReply,
    HostStatusRequest,
    KillService,
    PauseService,
    RestartService,
    ServiceState,
    ServiceStates,
    StopService,
    UnpauseService,
)
from shared import messages
from shared.topology import Host, Topology
from shared.transport import ServiceError, open_server

# Seconds a service gets to answer Ping after it is spawned.
READY_TIMEOUT = 15.0
# Seconds from ShutdownRequest to SIGKILL when stopping a service.
GRACE = 3.0
# Seconds a StatusRequest to one service may take before it shows as silent.
STATUS_TIMEOUT = 0.5

OnReady = Callable[["Supervisor"], Awaitable[None]]


class AlreadyUp(Exception):
    """Another live supervisor owns this host's run dir."""


@attrs.define(eq=False)
class Supervisor:
    """The services of one host and what can be done to them."""

    host: Host
    topology: Path
    nursery: trio.Nursery
    ready_timeout: float = READY_TIMEOUT
    grace: float = GRACE
    started: float = attrs.field(factory=time.monotonic)
    children: dict[str, ServiceChild] = attrs.field(factory=dict)
    down_requested: trio.Event = attrs.field(factory=trio.Event)
    _down_done: trio.Event = attrs.field(factory=trio.Event)
    _down_started: bool = False

    def __attrs_post_init__(self) -> None:
        for name in self.host.services:
            self.children[name] = ServiceChild(
                name, self.host, self.topology, self.host.endpoint(name)
            )

    # --- lifecycle ----------------------------------------------------------

    async def start_all(self) -> None:
        """Spawn every service, then wait until each answers Ping; raise
        :class:`StartFailed` naming the first one that did not."""
        for child in self.children.values():
            await self.nursery.start(child.run_incarnation)
        self._record_pids()
        failures: list[str] = []
        async with trio.open_nursery() as waiters:
            for child in self.children.values():
                waiters.start_soon(self._wait_ready, child, failures)
        if failures:
            raise StartFailed("\n".join(failures))

    async def _wait_ready(self, child: ServiceChild, failures: list[str]) -> None:
        try:
            await child.wait_ready(self.ready_timeout)
        except StartFailed as exc:
            failures.append(str(exc))

    async def down(self) -> None:
        """Stop every service (cleanly, then by signal), remove the run files.
        Safe to call more than once and from several tasks."""
        if self._down_started:
            await self._down_done.wait()
            return
        self._down_started = True
        try:
            async with trio.open_nursery() as stoppers:
                for child in self.children.values():
                    stoppers.start_soon(child.terminate, self.grace)
            _runfiles.remove_run_files(self.host)
        finally:
            self._down_done.set()

    def _record_pids(self) -> None:
        processes = {"supervisor": os.getpid()}
        processes.update({c.name: c.pid for c in self.children.values() if c.pid})
        _runfiles.write_pid_file(self.host, self.topology, processes)

    # --- control requests ---------------------------------------------------

    def child(self, name: str) -> ServiceChild:
        try:
            return self.children[name]
        except KeyError:
            raise ServiceError(
                "no-such-service", f"host {self.host.name} runs no {name!r}"
            ) from None

    def _running(self, name: str) -> ServiceChild:
        child = self.child(name)
        if not child.alive:
            raise ServiceError("not-running", f"{name} is not running ({child.state})")
        return child

    async def status(self) -> HostStatusReply:
        states: dict[str, ServiceState] = {}

        async def one(child: ServiceChild) -> None:
            reply = await child.query_status(STATUS_TIMEOUT) if child.alive else None
            states[child.name] = child.snapshot(reply)

        async with trio.open_nursery() as queries:
            for child in self.children.values():
                queries.start_soon(one, child)
        return HostStatusReply(
            self.host.name,
            os.getpid(),
            time.monotonic() - self.started,
            tuple(states[name] for name in self.children),
        )

    async def kill(self, name: str) -> ServiceState:
        async with self.child(name).lock:
            child = self._running(name)
            await child.kill()
            return child.snapshot()

    async def stop(self, name: str) -> ServiceState:
        async with self.child(name).lock:
            child = self._running(name)
            await child.terminate(self.grace)
            return child.snapshot()

    async def restart(self, name: str) -> ServiceState:
        child = self.child(name)
        async with child.lock:
            if self._down_started:
                raise ServiceError("going-down", f"host {self.host.name} is going down")
            await child.terminate(self.grace)
            await self.nursery.start(child.run_incarnation)
            self._record_pids()
            try:
                await child.wait_ready(self.ready_timeout)
            except StartFailed as exc:
                raise ServiceError("start-failed", str(exc)) from None
            return child.snapshot()

    def pause(self, name: str) -> ServiceState:
        child = self._running(name)
        child.signal(signal.SIGSTOP)
        child.state = ServiceStates.PAUSED
        return child.snapshot()

    def unpause(self, name: str) -> ServiceState:
        child = self._running(name)
        child.signal(signal.SIGCONT)
        if child.state == ServiceStates.PAUSED:
            child.state = ServiceStates.RUNNING
        return child.snapshot()

    async def host_down(self) -> messages.Ack:
        await self.down()
        self.down_requested.set()
        return messages.Ack()

    def route(self, server: Any) -> None:
        """Serve the control protocol on ``server``."""

        async def status(peer: Any, m: HostStatusRequest) -> HostStatusReply:
            return await self.status()

        async def kill(peer: Any, m: KillService) -> ServiceState:
            return await self.kill(m.service)

        async def stop(peer: Any, m: StopService) -> ServiceState:
            return await self.stop(m.service)

        async def restart(peer: Any, m: RestartService) -> ServiceState:
            return await self.restart(m.service)

        async def host_down(peer: Any, m: HostDown) -> messages.Ack:
            return await self.host_down()

        server.route(HostStatusRequest, status)
        server.route(KillService, kill)
        server.route(StopService, stop)
        server.route(RestartService, restart)
        server.route(PauseService, lambda peer, m: self.pause(m.service))
        server.route(UnpauseService, lambda peer, m: self.unpause(m.service))
        server.route(HostDown, host_down)


def claim_host(host: Host) -> list[Path]:
    """Make sure no live supervisor owns ``host``; clean up after a dead one
    (its orphaned services are killed by PID). Returns the files removed."""
    recorded = _runfiles.read_pid_file(host)
    if recorded is not None and recorded.is_live("supervisor"):
        raise AlreadyUp(f"host {host.name} is already up (supervisor pid {recorded.supervisor})")
    return _runfiles.cleanup_from_pid_file(host, GRACE).removed


async def run(
    topo: Topology,
    host_name: str | None,
    *,
    ready_timeout: float = READY_TIMEOUT,
    grace: float = GRACE,
    on_ready: OnReady | None = None,
) -> None:
    """Be the supervisor of a host until HostDown, SIGTERM or SIGINT.

    Raises :class:`StartFailed` (after stopping whatever did start) if a
    service does not come up, :class:`AlreadyUp` if the host has a supervisor.
    ``on_ready`` runs once every service answers (the demo's status display)."""
    host = topo.host(host_name)
    topology = Path(topo.source or "").resolve()
    host.rundir.mkdir(parents=True, exist_ok=True)
    _runfiles.log_dir(host).mkdir(exist_ok=True)
    claim_host(host)
    failure: StartFailed | None = None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            sup = Supervisor(host, topology, nursery, ready_timeout, grace)
            sup._record_pids()
            nursery.start_soon(_down_on_signal, signals, sup)
            try:
                await _serve(sup, on_ready)
            except StartFailed as exc:
                failure = exc  # raised outside the nursery, not in an ExceptionGroup
            finally:
                with trio.CancelScope(shield=True):
                    await sup.down()
                nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def _serve(sup: Supervisor, on_ready: OnReady | None) -> None:
    with trio.CancelScope() as starting:
        # A signal while the services start stops the waiting at once.
        sup.nursery.start_soon(_cancel_when_set, sup.down_requested, starting)
        await sup.start_all()
    if sup.down_requested.is_set():
        return
    async with open_server(sup.host.supervisor_endpoint) as server:
        sup.route(server)
        if on_ready is not None:
            sup.nursery.start_soon(on_ready, sup)
        await sup.down_requested.wait()
        # Let the Ack of a HostDown leave before the socket closes.
        await trio.sleep(0.1)


async def _down_on_signal(signals: Any, sup: Supervisor) -> None:
    async for _ in signals:
        sup.down_requested.set()


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
