"""XenStore as this domain, shared by every task of the kernel (FreeBSD
``xen/xenstore/xenstore.c``: ``xs_read``, ``xs_write``, ``xs_directory``,
``xs_transaction_start``/``end``, ``xs_register_watch``).

:class:`services.xenstore.client.XsClient` is for one task at a time; the
kernel has many users at once (the bus, each frontend's own task, the
control/shutdown watch). So one connection is multiplexed here: a single
reader task (:meth:`XsConnection.run`) takes every frame off the channel,
hands each reply to the task waiting on its ``req_id`` and each watch event
to the channel of its token; any number of tasks may make requests at the
same time. A watch is a :class:`Watch` (an async iterator of event paths);
its first event is the registration's (xen-reference 1.5). Transactions go
through :meth:`XsConnection.transaction`, which retries on ``EAGAIN``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import attrs
import trio

from services.xenstore.client import XsClientError
from services.xenstore.messages import XsFrames
from shared.abi import xs_wire as w
from shared.abi.xs_wire import XsMessage, XsParser, XsType
from shared.transport import Channel

T = TypeVar("T")
TX_RETRIES = 20


class XsAborted(Exception):
    """Raised inside a transaction body to end it without committing."""


@attrs.define(eq=False)
class _Waiter:
    done: trio.Event = attrs.Factory(trio.Event)
    reply: XsMessage | None = None


@attrs.define(eq=False)
class Watch:
    """One registered watch: ``async for path in watch`` (each event means
    "something at or below ``path`` may have changed: re-read")."""

    conn: XsConnection
    path: str
    token: str
    events: trio.MemoryReceiveChannel[str]

    def __aiter__(self) -> AsyncIterator[str]:
        return self.events.__aiter__()

    async def next(self) -> str:
        return await self.events.receive()

    async def close(self) -> None:
        await self.conn.unwatch(self)


class XsConnection:
    """A xenstore connection bound to this domain; see the module doc."""

    def __init__(self, chan: Channel, domid: int) -> None:
        self.chan = chan
        self.domid = domid
        self.home = w.domain_path(domid)
        self._parser = XsParser()
        self._ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._waiting: dict[int, _Waiter] = {}
        self._watches: dict[str, trio.MemorySendChannel[str]] = {}
        self.requests = self.events = self.eagain_retries = 0

    def path(self, rel: str) -> str:
        """``rel`` under this domain's home (absolute paths unchanged)."""
        return rel if rel.startswith("/") else f"{self.home}/{rel}"

    # --- the reader ------------------------------------------------------------------------
    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The only task that receives from the channel."""
        task_status.started()
        while True:
            frames = await self.chan.receive()
            if not isinstance(frames, XsFrames):
                continue
            for msg in self._parser.feed(frames.data):
                if msg.type == XsType.WATCH_EVENT:
                    path, token = w.parse_watch_event(msg.payload)
                    chan = self._watches.get(token.decode())
                    if chan is not None:
                        self.events += 1
                        chan.send_nowait(path.decode())
                elif (waiter := self._waiting.pop(msg.req_id, None)) is not None:
                    waiter.reply = msg
                    waiter.done.set()

    # --- requests --------------------------------------------------------------------------
    def next_id(self) -> int:
        return next(self._ids) & 0xFFFFFFFF

    async def request(self, msg: XsMessage) -> XsMessage:
        """Send ``msg`` (built with ``req_id=self.next_id()``), return its reply;
        an ``XS_ERROR`` answer raises :class:`XsClientError` (``.name`` = ``ENOENT``...)."""
        waiter = self._waiting[msg.req_id] = _Waiter()
        self.requests += 1
        try:
            await self.chan.send(XsFrames(msg.encode()))
            await waiter.done.wait()
        finally:
            self._waiting.pop(msg.req_id, None)
        assert waiter.reply is not None
        if waiter.reply.type == XsType.ERROR:
            raise XsClientError(waiter.reply.payload.rstrip(b"\0").decode(), msg)
        return waiter.reply

    async def read(self, path: str, tx: int = 0) -> str:
        msg = w.read(self.path(path), req_id=self.next_id(), tx_id=tx)
        return (await self.request(msg)).payload.decode()

    async def read_or(self, path: str, default: str | None = None, tx: int = 0) -> str | None:
        """``read``, or ``default`` when the node does not exist."""
        try:
            return await self.read(path, tx)
        except XsClientError as exc:
            if exc.name == "ENOENT":
                return default
            raise

    async def write(self, path: str, value: str | bytes, tx: int = 0) -> None:
        data = value.encode() if isinstance(value, str) else value
        await self.request(w.write(self.path(path), data, req_id=self.next_id(), tx_id=tx))

    async def directory(self, path: str, tx: int = 0) -> list[str]:
        msg = w.directory(self.path(path), req_id=self.next_id(), tx_id=tx)
        return [n.decode() for n in w.split_args((await self.request(msg)).payload)]

    async def rm(self, path: str, tx: int = 0) -> None:
        await self.request(w.rm(self.path(path), req_id=self.next_id(), tx_id=tx))

    # --- transactions ----------------------------------------------------------------------
    async def transaction(self, body: Callable[[int], Awaitable[T]]) -> T | None:
        """Run ``body(tx)`` in a transaction and commit; on ``EAGAIN`` run it
        again (up to :data:`TX_RETRIES` times). ``body`` raising
        :class:`XsAborted` ends the transaction uncommitted and returns None."""
        for _ in range(TX_RETRIES):
            start = await self.request(w.transaction_start(req_id=self.next_id()))
            tx = int(start.payload.rstrip(b"\0"))
            try:
                result = await body(tx)
            except XsAborted:
                await self.request(w.transaction_end(tx, False, req_id=self.next_id()))
                return None
            except BaseException:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await self.request(w.transaction_end(tx, False, req_id=self.next_id()))
                raise
            try:
                await self.request(w.transaction_end(tx, True, req_id=self.next_id()))
            except XsClientError as exc:
                if exc.name == "EAGAIN":
                    self.eagain_retries += 1
                    continue
                raise
            return result
        raise XsClientError("EAGAIN", w.transaction_start())

    # --- watches ---------------------------------------------------------------------------
    async def watch(self, path: str) -> Watch:
        """Register a watch on ``path``; its first event arrives at once."""
        token = f"k{next(self._tokens)}"
        send, receive = trio.open_memory_channel[str](math.inf)
        self._watches[token] = send  # before the request: the event may beat the reply
        full = self.path(path)
        try:
            await self.request(w.watch(full, token, req_id=self.next_id()))
        except BaseException:
            del self._watches[token]
            raise
        return Watch(self, full, token, receive)

    async def unwatch(self, watch: Watch) -> None:
        chan = self._watches.pop(watch.token, None)
        if chan is not None:
            chan.close()
            try:
                await self.request(w.unwatch(watch.path, watch.token, req_id=self.next_id()))
            except XsClientError:
                pass  # already gone (e.g. the connection was reset)

    def statistics(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "watch_events": self.events,
            "watches": len(self._watches),
            "eagain_retries": self.eagain_retries,
        }
