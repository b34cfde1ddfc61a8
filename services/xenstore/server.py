"""The Trio adapter: xenstored on its Unix socket and over nng.

Each connection has a reader task (bytes -> :class:`XsParser` -> core) and a
writer task (queued replies and events -> bytes). The core runs synchronously;
what it returns is released in core order, and only once the journal records
of every change made so far are durable (one syncer task batches those
``fdatasync`` calls: group commit). So no reply, and no event or read that
reveals a change, leaves before that change would survive kill -9.

Flow control is the outstanding-request quota: a connection with that many
replies not yet written is not read any further until they drain, so a flood
from one client waits in its own socket buffer and never in front of anyone
else. Each reader also yields after every batch, so busy clients take turns.

A frame announcing more than 4096 payload bytes breaks framing; as C xenstored
does, that connection is dropped (and counted), the rest are unaffected.
"""

from __future__ import annotations

import collections
import errno
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from services.xenstore.connection import BindRefused, BindTable, Connection
from services.xenstore.core import Output, XenStore
from services.xenstore.journal import Journal
from services.xenstore.messages import XsBind, XsBound, XsFrames, XsVouch, host_secret
from shared.abi.xs_wire import XsMessage, XsParser, XsPayloadError, XsProtocolError, XsType
from shared.abi.xs_wire import error_reply as xs_error_reply
from shared.transport import ServiceError

RECEIVE_SIZE = 65536
MAX_QUEUED_OUT = 16384  # undelivered frames (mostly events) before a reader is dropped
MAX_QUEUED_IN = 4096  # nng: received, unprocessed requests before a peer is dropped
DRAIN_ON_EOF = 2.0  # seconds to flush replies to a client that closed its end


class _Link:
    """The transport side of one connection."""

    def __init__(self, conn: Connection, limit: int) -> None:
        self.conn = conn
        self.limit = limit
        self.out: collections.deque[tuple[bytes, bool]] = collections.deque()
        self.out_ready = trio.Event()
        self.room = trio.Event()
        self.room.set()
        self.inbox: collections.deque[XsMessage] = collections.deque()
        self.inbox_ready = trio.Event()
        self.parser = XsParser()
        self.cancel = trio.CancelScope()
        self.dropped = False

    def push(self, msg: XsMessage) -> None:
        """Queue a reply or event (called by the service when it is released)."""
        is_reply = msg.type != XsType.WATCH_EVENT
        try:
            data = msg.encode()
        except XsPayloadError:
            if not is_reply:
                return  # an event too big to send (long path + long token): drop it
            data = xs_error_reply(msg, "E2BIG").encode()
        self.out.append((data, is_reply))
        self.out_ready.set()
        if len(self.out) > MAX_QUEUED_OUT:
            self.dropped = True  # the client does not read: let it go
            self.cancel.cancel()

    def sent(self, replies: int) -> None:
        self.conn.outstanding -= replies
        if self.conn.outstanding < self.limit:
            self.room.set()

    def taken(self, replies: int) -> None:
        self.conn.outstanding += replies
        if self.conn.outstanding >= self.limit:
            self.room = trio.Event()

    async def write_loop(self, send: Callable[[bytes], Awaitable[Any]]) -> None:
        while True:
            await self.out_ready.wait()
            self.out_ready = trio.Event()
            chunks, replies = [], 0
            while self.out:
                data, is_reply = self.out.popleft()
                chunks.append(data)
                replies += is_reply
            if chunks:
                try:
                    await send(b"".join(chunks))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self.cancel.cancel()  # the client is gone: end its connection
                    return
                self.sent(replies)

    async def drained(self) -> None:
        while self.out or self.conn.outstanding > 0:
            await trio.sleep(0.005)


class XenStoreService:
    """xenstored's I/O around one :class:`XenStore` core."""

    def __init__(self, core: XenStore, journal: Journal, binds: BindTable) -> None:
        self.core = core
        self.journal = journal
        self.binds = binds
        self.appended = 0  # journal appends so far (a sequence number)
        self.synced = 0  # appends known durable
        self._pending: collections.deque[tuple[int, list[Output]]] = collections.deque()
        self._kick = trio.Event()
        self._peers: dict[Any, _Link] = {}
        self._nursery: trio.Nursery | None = None
        self._server: Any = None
        self.unbound_frames = 0

    # --- the core, and releasing its output ------------------------------------

    def process(self, link: _Link, msgs: list[XsMessage]) -> None:
        outputs: list[Output] = []
        for msg in msgs:
            outputs += self.core.handle(link.conn, msg)
        link.taken(len(msgs))
        self._release(outputs)

    def report_shutdown(self, domid: int) -> None:
        """``@releaseDomain`` for a domain the hypervisor reports shut down."""
        self._release(self.core.report_shutdown(domid))

    def _release(self, outputs: list[Output]) -> None:
        """Journal what changed; send ``outputs`` once that is durable."""
        records = self.core.take_records()
        if records:
            self.journal.append(records)
            self.appended += 1
        if not self._pending and self.synced >= self.appended:
            self._deliver(outputs)
        else:
            self._pending.append((self.appended, outputs))
            self._kick.set()

    def _deliver(self, outputs: list[Output]) -> None:
        for conn, msg in outputs:
            if conn.sink is not None:
                conn.sink(msg)

    async def syncer(self) -> None:
        """Make appended records durable, then release what waited for them."""
        while True:
            await self._kick.wait()
            self._kick = trio.Event()
            while self.synced < self.appended:
                target = self.appended
                self.journal.flush()
                await trio.to_thread.run_sync(self.journal.sync)
                self.synced = target
                while self._pending and self._pending[0][0] <= self.synced:
                    self._deliver(self._pending.popleft()[1])
            if self.journal.needs_compaction:
                # The core holds everything appended so far: snapshot it whole.
                self.journal.compact(self.core.snapshot())

    # --- reading one connection --------------------------------------------------

    async def _feed(self, link: _Link, msgs: list[XsMessage]) -> None:
        """Hand ``msgs`` to the core a batch at a time, within the quota."""
        while msgs:
            await link.room.wait()
            batch = max(1, link.limit - link.conn.outstanding)
            self.process(link, msgs[:batch])
            msgs = msgs[batch:]
            await trio.lowlevel.checkpoint()  # let other connections have a turn

    def _limit(self, conn: Connection) -> int:
        quota = self.core.quota
        return quota.privileged_outstanding if conn.privileged else quota.outstanding

    def _drop(self, link: _Link, why: str) -> None:
        self.core.dropped_connections += 1
        if why == "malformed":
            self.core.malformed_frames += 1
        print(f"xenstored: dropping {link.conn!r}: {why}", file=sys.stderr)

    # --- Unix socket (dom0's tools) ------------------------------------------------

    async def serve_unix(self, path: Path, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        await sock.bind(os.fspath(path))
        os.chmod(path, 0o600)
        sock.listen(128)
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(self._serve_stream, [listener])

    async def _serve_stream(self, stream: trio.SocketStream) -> None:
        conn = self.core.connect(0, f"socket fd {stream.socket.fileno()}", privileged=True)
        link = _Link(conn, self._limit(conn))
        conn.sink = link.push
        try:
            with link.cancel:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(link.write_loop, stream.send_all)
                    await self._read_stream(link, stream)
                    with trio.move_on_after(DRAIN_ON_EOF):
                        await link.drained()
                    nursery.cancel_scope.cancel()
        except Exception as exc:  # whatever one client did, the others keep their server
            if not _is_disconnect(exc):
                print(f"xenstored: {conn!r} ended: {exc!r}", file=sys.stderr)
        finally:
            if link.dropped:
                self._drop(link, "not reading its replies")
            conn.sink = None
            self.core.disconnect(conn)
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _read_stream(self, link: _Link, stream: trio.SocketStream) -> None:
        while True:
            await link.room.wait()
            try:
                data = await stream.receive_some(RECEIVE_SIZE)
            except OSError as exc:
                if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                    return
                raise
            if not data:
                return
            try:
                msgs = link.parser.feed(data)
            except XsProtocolError as exc:
                # Answer the complete requests before the bad header, then drop
                # the connection: its byte stream cannot be resynchronised.
                await self._feed(link, exc.messages)
                with trio.move_on_after(DRAIN_ON_EOF):
                    await link.drained()
                self._drop(link, "malformed")
                link.cancel.cancel()
                return
            await self._feed(link, msgs)

    # --- nng peers (domains and services) -------------------------------------------

    def attach(self, server: Any, nursery: trio.Nursery) -> None:
        """Serve xs_wire over ``server`` (a shared.transport Server)."""
        self._server, self._nursery = server, nursery
        server.route(XsBind, self.on_bind)
        server.route(XsVouch, self.on_vouch)
        server.route(XsFrames, self.on_frames)
        server.on_disconnect = self.on_peer_lost

    def on_bind(self, peer: Any, msg: XsBind) -> XsBound:
        try:
            domid = self.binds.bind(msg.domid, msg.token)
        except BindRefused as exc:
            raise ServiceError("xenstore-bind", str(exc)) from None
        self.on_peer_lost(peer)  # a re-bind starts a fresh connection
        conn = self.core.connect(domid, f"nng pipe {peer}")
        link = _Link(conn, self._limit(conn))
        conn.sink = link.push
        self._peers[peer] = link
        assert self._nursery is not None
        self._nursery.start_soon(self._serve_peer, peer, link)
        return XsBound(domid)

    def on_vouch(self, peer: Any, msg: XsVouch) -> XsBound:
        link = self._peers.get(peer)
        if link is None:
            raise ServiceError("xenstore-bind", "bind as dom0 before vouching")
        try:
            self.binds.register(link.conn, msg.domid, msg.token)
        except BindRefused as exc:
            raise ServiceError("xenstore-bind", str(exc)) from None
        return XsBound(msg.domid)

    def on_frames(self, peer: Any, msg: XsFrames) -> None:
        link = self._peers.get(peer)
        if link is None:
            self._refuse_unbound(peer, msg.data)
            return
        try:
            link.inbox.extend(link.parser.feed(msg.data))
        except XsProtocolError as exc:
            link.inbox.extend(exc.messages)
            self._drop(link, "malformed")
            self._forget(peer, after_inbox=True)
            return
        if len(link.inbox) > MAX_QUEUED_IN:
            self._drop(link, "flooding")
            self._forget(peer)
            return
        link.inbox_ready.set()

    def _refuse_unbound(self, peer: Any, data: bytes) -> None:
        """Frames before a bind: each complete request gets EACCES."""
        self.unbound_frames += 1
        try:
            msgs = XsParser().feed(data)
        except XsProtocolError:
            return
        if msgs and self._nursery is not None:
            reply = b"".join(xs_error_reply(m, "EACCES").encode() for m in msgs)
            self._nursery.start_soon(self._send_quietly, peer, reply)

    async def _send_quietly(self, peer: Any, data: bytes) -> None:
        try:
            await self._server.send(peer, XsFrames(data))
        except Exception:
            pass  # the peer went away

    async def _serve_peer(self, peer: Any, link: _Link) -> None:
        async def send(data: bytes) -> None:
            await self._server.send(peer, XsFrames(data))

        try:
            with link.cancel:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(link.write_loop, send)
                    while True:
                        await link.inbox_ready.wait()
                        link.inbox_ready = trio.Event()
                        msgs = list(link.inbox)
                        link.inbox.clear()
                        await self._feed(link, msgs)
                        if link.dropped:
                            break
                    with trio.move_on_after(DRAIN_ON_EOF):
                        await link.drained()
                    nursery.cancel_scope.cancel()
        except Exception as exc:  # the peer vanished mid-send
            print(f"xenstored: {link.conn!r} ended: {exc!r}", file=sys.stderr)
        finally:
            if self._peers.get(peer) is link:
                del self._peers[peer]
            link.conn.sink = None
            self.core.disconnect(link.conn)

    def _forget(self, peer: Any, after_inbox: bool = False) -> None:
        link = self._peers.pop(peer, None)
        if link is None:
            return
        if after_inbox:
            link.dropped = True  # answer what was complete, then stop
            link.inbox_ready.set()
        else:
            link.cancel.cancel()

    def on_peer_lost(self, peer: Any) -> None:
        link = self._peers.pop(peer, None)
        if link is not None:
            link.cancel.cancel()
            link.conn.sink = None
            self.core.disconnect(link.conn)


def _is_disconnect(exc: BaseException) -> bool:
    """A client that went away (possibly wrapped in an exception group)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_disconnect(e) for e in exc.exceptions)
    return isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError | OSError)


def open_service(rundir: Path) -> XenStoreService:
    """Load state from ``rundir`` (snapshot + journal) into a ready service."""
    journal = Journal(rundir)
    core = XenStore()
    snapshot, records = journal.load()
    if snapshot is not None:
        core.restore(snapshot)
    for record in records:
        core.apply_record(record)
    if records:
        journal.compact(core.snapshot())  # start from a clean journal
    return XenStoreService(core, journal, BindTable(host_secret(rundir, create=True)))
