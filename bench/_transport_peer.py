"""The far end of the transport benchmark, one process per mode.

``python -m bench._transport_peer MODE ENDPOINT`` where MODE is one of
``ours``, ``sync``, ``async`` (pynng's own Trio API) or ``sock`` (ENDPOINT is
then an inherited socketpair fd). Each answers echo frames and counts sink
frames: a frame starting with ``E`` is echoed, ``D`` is counted silently, and
``Q`` is answered with the count so far (and resets it).
"""

from __future__ import annotations

import socket
import struct
import sys
import time

import pynng
import trio

from shared import codec
from shared.transport import open_server
from shared.transport._nng import BUFFER_MESSAGES


@codec.message(9000)
class BenchEcho:
    data: bytes


@codec.message(9001)
class BenchData:
    data: bytes


@codec.message(9002)
class BenchQuery:
    pass


@codec.message(9003)
class BenchCount:
    count: int


@codec.message(9004)
class BenchStamp:
    """A one-way message carrying its send time (time.monotonic_ns)."""

    sent_ns: int


@codec.message(9005)
class BenchDelays:
    """Query: the arrival delays of the stamps so far (and forget them)."""

    delays_ns: tuple[int, ...] = ()


def _answer(frame: bytes, counted: list[int]) -> bytes | None:
    if frame[:1] == b"D":
        counted[0] += 1
        return None
    if frame[:1] == b"Q":
        n, counted[0] = counted[0], 0
        return str(n).encode()
    return frame


def nng_socket(endpoint: str) -> pynng.Socket:
    sock = pynng.Pair0(recv_buffer_size=BUFFER_MESSAGES, send_buffer_size=BUFFER_MESSAGES)
    sock.recv_max_size = 0
    sock.listen(endpoint)
    return sock


def serve_sync(endpoint: str) -> None:
    sock, counted = nng_socket(endpoint), [0]
    while True:
        out = _answer(sock.recv(), counted)
        if out is not None:
            sock.send(out)


def serve_async(endpoint: str) -> None:
    async def main() -> None:
        sock, counted = nng_socket(endpoint), [0]
        while True:
            out = _answer(await sock.arecv(), counted)
            if out is not None:
                await sock.asend(out)

    trio.run(main)


def serve_ours(endpoint: str) -> None:
    async def main() -> None:
        counted = [0]

        def data(peer: int, msg: BenchData) -> None:
            counted[0] += 1

        def query(peer: int, msg: BenchQuery) -> BenchCount:
            n, counted[0] = counted[0], 0
            return BenchCount(n)

        delays: list[int] = []

        def stamp(peer: object, msg: BenchStamp) -> None:
            delays.append(time.monotonic_ns() - msg.sent_ns)

        def report(peer: object, msg: BenchDelays) -> BenchDelays:
            out = BenchDelays(tuple(delays))
            delays.clear()
            return out

        async with open_server(endpoint) as server:
            server.route(BenchStamp, stamp)
            server.route(BenchDelays, report)
            server.route(BenchEcho, lambda peer, msg: msg)
            server.route(BenchData, data)
            server.route(BenchQuery, query)
            await trio.sleep_forever()

    trio.run(main)


def serve_sock(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    counted, buf = [0], bytearray()
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return
        buf += chunk
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = struct.unpack_from("<I", buf, pos)
            if len(buf) - pos - 4 < n:
                break
            out = _answer(bytes(buf[pos + 4 : pos + 4 + n]), counted)
            pos += 4 + n
            if out is not None:
                sock.sendall(struct.pack("<I", len(out)) + out)
        del buf[:pos]


def main() -> None:
    mode, endpoint = sys.argv[1], sys.argv[2]
    if mode == "sock":
        serve_sock(int(endpoint))
    else:
        {"sync": serve_sync, "async": serve_async, "ours": serve_ours}[mode](endpoint)


if __name__ == "__main__":
    main()
