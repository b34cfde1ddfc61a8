"""A small XenStore client over nng, for dom0 services, guests and tests.

It speaks the real protocol: requests are ``xsd_sockmsg`` frames carried in
:class:`XsFrames`, replies are matched by ``req_id``, and watch events are
kept aside until asked for. One task uses a client at a time (pipelining is
done by sending several requests and then collecting their replies)::

    async with open_xs_client(endpoint, domid=0, token=host_secret(rundir)) as xs:
        await xs.write("/local/domain/0/x", b"1")
        value = await xs.read("/local/domain/0/x")
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from services.xenstore.messages import XsBind, XsFrames
from shared.abi import xs_wire as w
from shared.abi.xs_wire import XsMessage, XsParser, XsType
from shared.transport import Channel, RemoteError, open_channel


class XsClientError(Exception):
    """The server answered XS_ERROR; ``name`` is the error (``ENOENT``...)."""

    def __init__(self, name: str, request: XsMessage) -> None:
        super().__init__(f"{name} for {XsType(request.type).name}")
        self.name = name


class XsClient:
    """Use :func:`open_xs_client`."""

    def __init__(self, chan: Channel) -> None:
        self.chan = chan
        self._parser = XsParser()
        self._ids = itertools.count(1)
        self._replies: dict[int, XsMessage] = {}
        self.events: collections.deque[tuple[bytes, bytes]] = collections.deque()

    def next_id(self) -> int:
        return next(self._ids) & 0xFFFFFFFF

    async def send(self, msgs: Iterable[XsMessage]) -> None:
        """Send requests without waiting (pipelining)."""
        await self.chan.send(XsFrames(b"".join(m.encode() for m in msgs)))

    async def _pump(self) -> None:
        frames = await self.chan.receive()
        if not isinstance(frames, XsFrames):
            return
        for msg in self._parser.feed(frames.data):
            if msg.type == XsType.WATCH_EVENT:
                self.events.append(w.parse_watch_event(msg.payload))
            else:
                self._replies[msg.req_id] = msg

    async def reply(self, req_id: int) -> XsMessage:
        while req_id not in self._replies:
            await self._pump()
        return self._replies.pop(req_id)

    async def request(self, msg: XsMessage) -> XsMessage:
        """Send one request and return its reply; XS_ERROR raises XsClientError."""
        await self.send([msg])
        reply = await self.reply(msg.req_id)
        if reply.type == XsType.ERROR:
            raise XsClientError(reply.payload.rstrip(b"\0").decode(), msg)
        return reply

    async def event(self) -> tuple[bytes, bytes]:
        """The next watch event ``(path, token)``."""
        while not self.events:
            await self._pump()
        return self.events.popleft()

    # conveniences
    async def read(self, path: str, tx: int = 0) -> bytes:
        return (await self.request(w.read(path, req_id=self.next_id(), tx_id=tx))).payload

    async def write(self, path: str, value: bytes, tx: int = 0) -> None:
        await self.request(w.write(path, value, req_id=self.next_id(), tx_id=tx))

    async def directory(self, path: str, tx: int = 0) -> list[bytes]:
        reply = await self.request(w.directory(path, req_id=self.next_id(), tx_id=tx))
        return w.split_args(reply.payload)

    async def rm(self, path: str, tx: int = 0) -> None:
        await self.request(w.rm(path, req_id=self.next_id(), tx_id=tx))

    async def watch(self, path: str, token: str) -> None:
        await self.request(w.watch(path, token, req_id=self.next_id()))

    async def transaction_start(self) -> int:
        reply = await self.request(w.transaction_start(req_id=self.next_id()))
        return int(reply.payload.rstrip(b"\0"))

    async def transaction_end(self, tx: int, commit: bool = True) -> None:
        await self.request(w.transaction_end(tx, commit, req_id=self.next_id()))


@asynccontextmanager
async def open_xs_client(endpoint: str, domid: int, token: bytes) -> AsyncIterator[XsClient]:
    """Connect to xenstored's nng endpoint and bind the connection to ``domid``;
    a refused bind raises :class:`RemoteError` (code ``xenstore-bind``)."""
    async with open_channel(endpoint) as chan:
        await chan.wait_connected()
        try:
            await chan.call(XsBind(domid, token))
        except RemoteError as exc:
            refused = exc  # raised below, outside the channel's nursery
        else:
            yield XsClient(chan)
            return
    raise refused
