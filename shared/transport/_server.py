"""A service's listening end: routes requests by message class to handlers,
answers every malformed or unknown frame with an error reply, and can push
one-way messages (upcalls) to any connected peer."""

from __future__ import annotations

import inspect
import sys
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from shared import codec
from shared.transport import _wire
from shared.transport._faults import FaultPlan
from shared.transport._link import Outbound
from shared.transport._nng import NngPort, open_socket
from shared.transport._wire import Kind, ServiceError

# handler(peer, msg) -> reply message, or None for a one-way message
Handler = Callable[[int, Any], Any]


@attrs.frozen
class ServerStats:
    endpoint: str
    peers: int
    requests: int
    oneway: int
    replies: int
    error_replies: int
    codec_errors: int
    unknown_messages: int
    handler_errors: int
    upcalls_sent: int


class Server:
    """Use :func:`open_server`. Synchronous handlers run inline in the receive
    loop (the fast path: a sans-IO core answering at once); ``async`` handlers
    each get their own task, so one that waits cannot hold up the others."""

    def __init__(self, endpoint: str, port: NngPort, nursery: trio.Nursery) -> None:
        self.endpoint = endpoint
        self._port = port
        self._nursery = nursery
        self._out = Outbound(port, nursery)
        self._routes: dict[type, tuple[Handler, bool]] = {}
        self._token = trio.lowlevel.current_trio_token()
        self.peers: set[int] = set()
        self.on_connect: Callable[[int], None] | None = None
        self.on_disconnect: Callable[[int], None] | None = None
        self.requests = self.oneway = self.replies = self.error_replies = 0
        self.codec_errors = self.unknown_messages = self.handler_errors = self.upcalls_sent = 0

    def route(self, cls: type, handler: Handler) -> None:
        """Serve messages of class ``cls`` with ``handler(peer, msg)``."""
        self._routes[cls] = (handler, inspect.iscoroutinefunction(handler))

    async def send(self, peer: int, msg: Any) -> None:
        """A one-way message to one connected peer."""
        self.upcalls_sent += 1
        await self._out.send(_wire.pack(Kind.ONEWAY, 0, codec.to_wire(msg)), peer)

    def set_faults(self, plan: FaultPlan) -> None:
        """Faults on every frame this service sends."""
        self._out.set_faults(plan)

    def statistics(self) -> ServerStats:
        return ServerStats(
            self.endpoint,
            len(self.peers),
            self.requests,
            self.oneway,
            self.replies,
            self.error_replies,
            self.codec_errors,
            self.unknown_messages,
            self.handler_errors,
            self.upcalls_sent,
        )

    # --- receive side -----------------------------------------------------

    async def _receive_loop(self) -> None:
        port = self._port
        while True:
            item = port.try_recv()
            if item is None:
                await port.wait_recv()
                continue
            pipe, frame = item
            await self._dispatch(pipe, frame)

    async def _dispatch(self, pipe: int, frame: bytes) -> None:
        try:
            kind, cid, body = _wire.unpack(frame)
            if kind not in (Kind.REQUEST, Kind.ONEWAY):
                raise codec.CodecError(f"a service accepts requests, not {Kind(kind).name}")
            msg = codec.from_wire(body)
        except codec.CodecError as exc:
            self.codec_errors += 1
            await self._error(pipe, _wire.call_id_of(frame), "codec", str(exc))
            return
        if kind == Kind.REQUEST:
            self.requests += 1
        else:
            self.oneway += 1
            cid = None
        route = self._routes.get(type(msg))
        if route is None:
            self.unknown_messages += 1
            if cid is not None:
                await self._error(pipe, cid, "unknown-message", f"{type(msg).__name__} not served")
            return
        handler, is_async = route
        if is_async:
            self._nursery.start_soon(self._run_async, handler, pipe, cid, msg)
            return
        try:
            reply = handler(pipe, msg)
        except Exception as exc:
            await self._handler_failed(pipe, cid, msg, exc)
            return
        await self._reply(pipe, cid, reply)

    async def _run_async(self, handler: Handler, pipe: int, cid: int | None, msg: Any) -> None:
        try:
            reply = await handler(pipe, msg)
        except Exception as exc:
            await self._handler_failed(pipe, cid, msg, exc)
            return
        await self._reply(pipe, cid, reply)

    async def _reply(self, pipe: int, cid: int | None, reply: Any) -> None:
        if cid is None:
            return
        if reply is None:
            await self._error(pipe, cid, "handler", "no reply")
            return
        self.replies += 1
        await self._out.send(_wire.pack(Kind.REPLY, cid, codec.to_wire(reply)), pipe)

    async def _handler_failed(self, pipe: int, cid: int | None, msg: Any, exc: Exception) -> None:
        if isinstance(exc, ServiceError):
            code, text = exc.code, exc.text
        else:
            self.handler_errors += 1
            code, text = "handler", f"{type(exc).__name__}: {exc}"
            print(f"{self.endpoint}: handler for {type(msg).__name__} failed:", file=sys.stderr)
            traceback.print_exception(exc, file=sys.stderr)
        if cid is not None:
            await self._error(pipe, cid, code, text)

    async def _error(self, pipe: int, cid: int, code: str, text: str) -> None:
        self.error_replies += 1
        await self._out.send(_wire.pack(Kind.ERROR, cid, [code, text]), pipe)

    # --- connection events (called from nng threads) ------------------------

    def _pipe_added(self, pipe: int) -> None:
        self._soon(self._connected, pipe)

    def _pipe_removed(self, pipe: int) -> None:
        self._soon(self._disconnected, pipe)

    def _soon(self, fn: Any, *args: Any) -> None:
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    def _connected(self, pipe: int) -> None:
        self.peers.add(pipe)
        if self.on_connect is not None:
            self.on_connect(pipe)

    def _disconnected(self, pipe: int) -> None:
        self.peers.discard(pipe)
        if self.on_disconnect is not None:
            self.on_disconnect(pipe)


@asynccontextmanager
async def open_server(endpoint: str) -> AsyncIterator[Server]:
    """Listen on ``endpoint`` and serve until the block exits."""
    port = NngPort(open_socket(server=True))
    try:
        async with trio.open_nursery() as nursery:
            server = Server(endpoint, port, nursery)
            port.on_pipe_events(server._pipe_added, server._pipe_removed)
            port.listen(endpoint)
            nursery.start_soon(server._receive_loop)
            try:
                yield server
            finally:
                nursery.cancel_scope.cancel()
    finally:
        port.close()
