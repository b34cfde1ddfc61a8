"""A service's listening end: routes requests by message class to handlers,
answers every malformed or unknown frame with an error reply, and can push
one-way messages (upcalls) to any connected peer.

Clients first reach the polyamorous listening socket and ask (``Connect``) for
a dedicated socket; each then talks over its own plain Pair1 socket, served by
its own receive task. A peer that never asks is served on the shared socket.
"""

from __future__ import annotations

import inspect
import itertools
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
from shared.transport._nng import NngPort, TransportClosed, open_socket
from shared.transport._wire import Connect, Connected, Kind, ServiceError

# A dedicated socket nobody dials within this long is closed again.
DEDICATED_DIAL_GRACE = 5.0

# handler(peer, msg) -> reply message, or None for a one-way message
Handler = Callable[["Peer", Any], Any]


@attrs.define(eq=False)
class Peer:
    """One client connection. Hashable by identity; ``id`` is for logs."""

    id: int
    port: NngPort
    pipe: int | None  # the pipe on the shared socket, None on a dedicated one
    endpoint: str | None = None  # the dedicated socket's endpoint
    connected: bool = False
    announced: bool = False  # on_connect was called
    scope: trio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"<Peer {self.id}>"


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
    upcalls_dropped: int
    handoffs: int


class Server:
    """Use :func:`open_server`. Synchronous handlers run inline in the receive
    loop (the fast path: a sans-IO core answering at once); ``async`` handlers
    each get their own task, so one that waits cannot hold up the others."""

    def __init__(self, endpoint: str, port: NngPort, nursery: trio.Nursery) -> None:
        self.endpoint = endpoint
        self._port = port
        self._nursery = nursery
        self._out = Outbound(nursery)
        self._routes: dict[type, tuple[Handler, bool]] = {}
        self._token = trio.lowlevel.current_trio_token()
        self._ids = itertools.count(1)
        self._shared_peers: dict[int, Peer] = {}
        self._dedicated: set[Peer] = set()
        self.on_connect: Callable[[Peer], None] | None = None
        self.on_disconnect: Callable[[Peer], None] | None = None
        self.requests = self.oneway = self.replies = self.error_replies = 0
        self.codec_errors = self.unknown_messages = self.handler_errors = 0
        self.upcalls_sent = self.upcalls_dropped = self.handoffs = 0

    def route(self, cls: type, handler: Handler) -> None:
        """Serve messages of class ``cls`` with ``handler(peer, msg)``."""
        self._routes[cls] = (handler, inspect.iscoroutinefunction(handler))

    @property
    def peers(self) -> list[Peer]:
        return [p for p in (*self._dedicated, *self._shared_peers.values()) if p.announced]

    async def send(self, peer: Peer, msg: Any) -> bool:
        """A one-way message to one peer; False (and counted) if it is gone."""
        if peer.port.closed:
            self.upcalls_dropped += 1
            return False
        self.upcalls_sent += 1
        try:
            await self._out.send(
                peer.port, _wire.pack(Kind.ONEWAY, 0, codec.to_wire(msg)), peer.pipe
            )
        except TransportClosed:
            self.upcalls_dropped += 1
            return False
        return True

    def send_nowait(self, peer: Peer, msg: Any) -> bool:
        """A one-way message from synchronous code (a handler on the fast path):
        handed to nng at once, or to a task when nng's queue is full."""
        if peer.port.closed:
            self.upcalls_dropped += 1
            return False
        self.upcalls_sent += 1
        frame = _wire.pack(Kind.ONEWAY, 0, codec.to_wire(msg))
        if not self._out.try_send_now(peer.port, frame, peer.pipe):
            self._nursery.start_soon(self._send_frame, peer, frame)
        return True

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
            self.upcalls_dropped,
            self.handoffs,
        )

    # --- receive side -----------------------------------------------------

    async def _receive_loop(self, port: NngPort, fixed: Peer | None) -> None:
        """Serve one socket: the shared one (``fixed`` None: the peer is found
        by pipe) or a client's dedicated one."""
        try:
            while True:
                if fixed is None:
                    item = port.try_recv()
                    if item is not None:
                        await self._dispatch(self._shared_peer(item[0]), item[1])
                        continue
                else:
                    frame = port.try_recv_frame()
                    if frame is not None:
                        await self._dispatch(fixed, frame)
                        continue
                await port.wait_recv()
        except (trio.ClosedResourceError, TransportClosed):
            return

    def _shared_peer(self, pipe: int) -> Peer:
        peer = self._shared_peers.get(pipe)
        if peer is None:  # the message overtook the pipe-added callback
            peer = self._shared_peers[pipe] = Peer(
                next(self._ids), self._port, pipe, connected=True
            )
        return peer

    async def _dispatch(self, peer: Peer, frame: bytes) -> None:
        try:
            kind, cid, body = _wire.unpack(frame)
            if kind not in (Kind.REQUEST, Kind.ONEWAY):
                raise codec.CodecError(f"a service accepts requests, not {Kind(kind).name}")
            msg = codec.from_wire(body)
        except codec.CodecError as exc:
            self.codec_errors += 1
            await self._error(peer, _wire.call_id_of(frame), "codec", str(exc))
            return
        if type(msg) is Connect and kind == Kind.REQUEST and peer.pipe is not None:
            self.handoffs += 1
            frame = _wire.pack(Kind.REPLY, cid, codec.to_wire(self._open_dedicated(msg)))
            await self._send_frame(peer, frame)
            return
        self._announce(peer)
        if kind == Kind.REQUEST:
            self.requests += 1
        else:
            self.oneway += 1
            cid = None
        route = self._routes.get(type(msg))
        if route is None:
            self.unknown_messages += 1
            if cid is not None:
                await self._error(peer, cid, "unknown-message", f"{type(msg).__name__} not served")
            return
        handler, is_async = route
        if is_async:
            self._nursery.start_soon(self._run_async, handler, peer, cid, msg)
            return
        try:
            reply = handler(peer, msg)
        except Exception as exc:
            await self._handler_failed(peer, cid, msg, exc)
            return
        if cid is not None and reply is not None:  # the common case, inline
            self.replies += 1
            frame = _wire.pack(Kind.REPLY, cid, codec.to_wire(reply))
            if self._out.try_send_now(peer.port, frame, peer.pipe):
                return
            await self._send_frame(peer, frame)
            return
        await self._reply(peer, cid, reply)

    async def _run_async(self, handler: Handler, peer: Peer, cid: int | None, msg: Any) -> None:
        try:
            reply = await handler(peer, msg)
        except Exception as exc:
            await self._handler_failed(peer, cid, msg, exc)
            return
        await self._reply(peer, cid, reply)

    async def _reply(self, peer: Peer, cid: int | None, reply: Any) -> None:
        if cid is None:
            return
        if reply is None:
            await self._error(peer, cid, "handler", "no reply")
            return
        self.replies += 1
        frame = _wire.pack(Kind.REPLY, cid, codec.to_wire(reply))
        if not self._out.try_send_now(peer.port, frame, peer.pipe):
            await self._send_frame(peer, frame)

    async def _handler_failed(self, peer: Peer, cid: int | None, msg: Any, exc: Exception) -> None:
        if isinstance(exc, ServiceError):
            code, text = exc.code, exc.text
        else:
            self.handler_errors += 1
            code, text = "handler", f"{type(exc).__name__}: {exc}"
            print(f"{self.endpoint}: handler for {type(msg).__name__} failed:", file=sys.stderr)
            traceback.print_exception(exc, file=sys.stderr)
        if cid is not None:
            await self._error(peer, cid, code, text)

    async def _error(self, peer: Peer, cid: int, code: str, text: str) -> None:
        self.error_replies += 1
        await self._send_frame(peer, _wire.pack(Kind.ERROR, cid, [code, text]))

    async def _send_frame(self, peer: Peer, frame: bytes) -> None:
        try:
            await self._out.send(peer.port, frame, peer.pipe)
        except TransportClosed:
            pass  # the peer went away; nobody is left to answer

    # --- dedicated sockets ------------------------------------------------

    def _open_dedicated(self, msg: Connect) -> Connected:
        port = NngPort(open_socket(poly=False))
        peer = Peer(next(self._ids), port, None)
        port.on_pipe_events(
            lambda _pipe: self._soon(self._dedicated_up, peer),
            lambda _pipe: self._soon(self._dedicated_down, peer),
        )
        peer.endpoint = port.listen(self._dedicated_endpoint(peer.id))
        self._dedicated.add(peer)
        self._nursery.start_soon(self._serve_dedicated, peer)
        return Connected(peer.endpoint)

    def _dedicated_endpoint(self, n: int) -> str:
        if self.endpoint.startswith("tcp://"):
            return self.endpoint.rsplit(":", 1)[0] + ":0"
        return f"{self.endpoint}.{n}"

    async def _serve_dedicated(self, peer: Peer) -> None:
        with trio.CancelScope() as peer.scope:
            self._nursery.start_soon(self._close_if_never_dialed, peer)
            await self._receive_loop(peer.port, peer)

    async def _close_if_never_dialed(self, peer: Peer) -> None:
        await trio.sleep(DEDICATED_DIAL_GRACE)
        if not peer.connected:
            self._dedicated_down(peer)

    def _dedicated_up(self, peer: Peer) -> None:
        peer.connected = True
        self._announce(peer)

    def _dedicated_down(self, peer: Peer) -> None:
        if peer not in self._dedicated:
            return
        self._dedicated.discard(peer)
        if peer.scope is not None:
            peer.scope.cancel()
        peer.port.close()
        self._retire(peer)

    # --- connection events (nng threads → trio) ----------------------------

    def _soon(self, fn: Any, *args: Any) -> None:
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    def _shared_pipe_added(self, pipe: int) -> None:
        self._soon(self._shared_peer, pipe)

    def _shared_pipe_removed(self, pipe: int) -> None:
        self._soon(self._shared_down, pipe)

    def _shared_down(self, pipe: int) -> None:
        peer = self._shared_peers.pop(pipe, None)
        if peer is not None:
            self._retire(peer)

    def _announce(self, peer: Peer) -> None:
        if not peer.announced:
            peer.announced = True
            if self.on_connect is not None:
                self.on_connect(peer)

    def _retire(self, peer: Peer) -> None:
        if peer.announced:
            peer.announced = False
            if self.on_disconnect is not None:
                self.on_disconnect(peer)

    def close(self) -> None:
        for peer in list(self._dedicated):
            self._dedicated_down(peer)
        self._port.close()


@asynccontextmanager
async def open_server(endpoint: str) -> AsyncIterator[Server]:
    """Listen on ``endpoint`` and serve until the block exits."""
    port = NngPort(open_socket(poly=True))
    server: Server | None = None
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            server = Server(endpoint, port, nursery)
            port.on_pipe_events(server._shared_pipe_added, server._shared_pipe_removed)
            port.listen(endpoint)
            nursery.start_soon(server._receive_loop, port, None)
            try:
                yield server
            except BaseException as exc:  # re-raised below, outside the nursery
                body_error = exc
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if server is not None:
            server.close()
        port.close()
    if body_error is not None:
        # The caller's own exception, not wrapped in the nursery's ExceptionGroup.
        raise body_error
