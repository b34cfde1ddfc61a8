"""What every service process shares: its command line, its endpoint, the
control messages (ping, status, faults, shutdown) and a clean exit.

A service module's ``__main__`` calls :func:`main` with its name and an
optional ``setup`` coroutine that routes its own messages on the server and
may start tasks in ``ctx.nursery``::

    async def setup(ctx: ServiceContext) -> None:
        ctx.server.route(MyRequest, handle)
        ctx.add_stats("core", core.statistics)

    if __name__ == "__main__":
        main("hypervisor", setup)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from shared import messages, topology
from shared.memtune import calm_gc
from shared.transport import FaultPlan, Server, open_server

Setup = Callable[["ServiceContext"], Awaitable[None]]
CLEANUP_TIMEOUT = 5.0


@attrs.define(eq=False)
class ServiceContext:
    name: str
    host: topology.Host
    topology: topology.Topology
    server: Server
    nursery: trio.Nursery
    started: float = attrs.field(factory=time.monotonic)
    _stats: dict[str, Callable[[], Any]] = attrs.field(factory=dict)
    _cleanups: list[Callable[[], Awaitable[None]]] = attrs.field(factory=list)

    def add_cleanup(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``await fn()`` when the service stops (before its tasks are
        cancelled), e.g. to kill and reap child processes."""
        self._cleanups.append(fn)

    def add_stats(self, group: str, source: Callable[[], Any]) -> None:
        """Report ``source()`` (an attrs record or a dict) under ``group`` in status."""
        self._stats[group] = source

    def status(self) -> messages.StatusReply:
        stats = {"transport": _as_dict(self.server.statistics())}
        for group, source in self._stats.items():
            stats[group] = _as_dict(source())
        return messages.StatusReply(self.name, os.getpid(), time.monotonic() - self.started, stats)


def _as_dict(value: Any) -> Any:
    if attrs.has(type(value)):
        return attrs.asdict(value, value_serializer=lambda _i, _a, v: _plain(v))
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "__fspath__"):
        return os.fspath(value)
    return value


def parse_args(name: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {topology.SERVICE_MODULES[name]}")
    parser.add_argument("--topology", required=True, help="topology TOML file")
    parser.add_argument("--host", default=None, help="host of the topology (default: first)")
    return parser.parse_args(argv)


async def run(
    name: str, topo: topology.Topology, host_name: str | None, setup: Setup | None
) -> None:
    host = topo.host(host_name)
    host.rundir.mkdir(parents=True, exist_ok=True)
    endpoint = host.endpoint(name)
    async with open_server(endpoint) as server, trio.open_nursery() as nursery:
        ctx = ServiceContext(name, host, topo, server, nursery)
        stop = trio.Event()
        server.route(messages.Ping, lambda peer, m: messages.Pong(m.nonce, name, os.getpid()))
        server.route(messages.StatusRequest, lambda peer, m: ctx.status())

        def set_faults(peer: Any, m: messages.SetFaults) -> messages.Ack:
            server.set_faults(FaultPlan(**attrs.asdict(m)))
            return messages.Ack()

        def shutdown(peer: Any, m: messages.ShutdownRequest) -> messages.Ack:
            stop.set()
            return messages.Ack()

        server.route(messages.SetFaults, set_faults)
        server.route(messages.ShutdownRequest, shutdown)
        if setup is not None:
            await setup(ctx)
        calm_gc()
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            nursery.start_soon(_stop_on_signal, signals, stop)
            await stop.wait()
            # Let the Ack of a ShutdownRequest leave before the socket closes.
            await trio.sleep(0.05)
        for cleanup in ctx._cleanups:
            with trio.move_on_after(CLEANUP_TIMEOUT):
                await cleanup()
        nursery.cancel_scope.cancel()


async def _stop_on_signal(signals: Any, stop: trio.Event) -> None:
    async for _ in signals:
        stop.set()
        return


def main(name: str, setup: Setup | None = None, argv: list[str] | None = None) -> None:
    args = parse_args(name, argv)
    try:
        topo = topology.load(args.topology)
    except topology.TopologyError as exc:
        sys.exit(f"{name}: {exc}")
    where = os.environ.get(PROFILE_ENV)
    if not where:
        trio.run(run, name, topo, args.host, setup)
        return
    import cProfile

    prof = cProfile.Profile()
    try:
        prof.runcall(trio.run, run, name, topo, args.host, setup)
    finally:
        prof.dump_stats(os.path.join(where, f"{name}.prof"))


#: ``DOMSPLIT_SERVICE_PROFILE=<dir>``: run the service under cProfile and write
#: ``<dir>/<service>.prof`` when it stops (SIGTERM, ``host down``).
PROFILE_ENV = "DOMSPLIT_SERVICE_PROFILE"
