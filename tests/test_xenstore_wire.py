"""xs_wire byte vectors (peers.md 1.4, from ocaml-xenstore's packet tests) parsed
whole and one byte at a time, then the same byte streams pushed through the real
server path (Unix socket -> parser -> core -> replies) in-process.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from services.xenstore.server import XenStoreService, open_service
from shared.abi import xs_wire as w
from shared.abi.xs_wire import XsMessage, XsParser, XsType


def frame(type_: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    return struct.pack("<IIII", type_, req_id, tx_id, len(payload)) + payload


# (name, bytes on the wire, the message they are)
REQUESTS = [
    ("read", bytes.fromhex("02000000 00000000 00000000 06000000") + b"/test\0", w.read("/test")),
    (
        "write with NULs",
        bytes.fromhex("0b000000 00000000 00000000 12000000") + b"/test\0xxx\0yyy\0\0zzz",
        w.write("/test", b"xxx\0yyy\0\0zzz"),
    ),
    ("directory", frame(1, 0, 0, b"/test\0"), w.directory("/test")),
    ("get_perms", frame(3, 0, 0, b"/test\0"), w.get_perms("/test")),
    ("rm", frame(13, 0, 0, b"/test\0"), w.rm("/test")),
    (
        "set_perms",
        frame(14, 0, 0, b"/test\0r2\0n4\0"),
        w.set_perms("/test", w.parse_perms("r2 n4")),
    ),
    ("mkdir", frame(12, 0, 0, b"/test\0"), w.mkdir("/test")),
    ("transaction_start", frame(6, 0, 0, b"\0"), w.transaction_start()),
    ("transaction_end", frame(7, 0, 1, b"T\0"), w.transaction_end(1, True)),
    ("introduce", frame(8, 0, 0, b"4\x005\x001\0"), w.introduce(4, 5, 1)),
    ("release", frame(9, 0, 0, b"4\0"), w.release(4)),
    ("resume", frame(18, 0, 0, b"4\0"), w.resume(4)),
    ("get_domain_path", frame(10, 0, 0, b"4\0"), w.get_domain_path(4)),
    ("watch", frame(4, 0, 0, b"/test\0token\0"), w.watch("/test", "token")),
    ("unwatch", frame(5, 0, 0, b"/test\0token\0"), w.unwatch("/test", "token")),
    ("debug", frame(0, 0, 0, b"print\0hello\0"), w.control("print", "hello")),
]

REPLIES = [
    ("error", frame(16, 0, 0, b"EINVAL\0"), w.error_reply(w.read("/x"), "EINVAL")),
    ("write ack", frame(11, 0, 0, b"OK\0"), w.ok_reply(w.write("/x", ""))),
    (
        "get_perms",
        frame(3, 0, 0, b"r2\0n4\0"),
        w.get_perms_reply(w.get_perms("/x"), w.parse_perms("r2 n4")),
    ),
    (
        "transaction_start",
        frame(6, 0, 0, b"3\0"),
        w.transaction_start_reply(w.transaction_start(), 3),
    ),
    (
        "directory",
        frame(1, 0, 0, b"a\0b\0c\0aseasyas\x001\x002\x003\0"),
        w.directory_reply(w.directory("/x"), ["a", "b", "c", "aseasyas", "1", "2", "3"]),
    ),
    ("watch event", frame(15, 0, 0, b"/a/b\0tok\0"), w.watch_event("/a/b", "tok")),
]


@pytest.mark.parametrize(
    ("name", "data", "msg"), REQUESTS + REPLIES, ids=lambda v: v if isinstance(v, str) else ""
)
def test_vector_whole_and_bytewise(name: str, data: bytes, msg: XsMessage) -> None:
    assert msg.encode() == data
    assert XsParser().feed(data) == [msg]
    parser, got = XsParser(), []
    for i in range(len(data)):
        got += parser.feed(data[i : i + 1])
        assert got == ([] if i < len(data) - 1 else [msg])
    assert parser.buffered == 0


def test_all_vectors_in_one_stream() -> None:
    stream = b"".join(v[1] for v in REQUESTS)
    parser, got = XsParser(), []
    for i in range(0, len(stream), 7):
        got += parser.feed(stream[i : i + 7])
    assert got == [v[2] for v in REQUESTS]


# --- the same bytes through the real server --------------------------------------------


@asynccontextmanager
async def running_service() -> AsyncIterator[tuple[XenStoreService, Path]]:
    """An in-process xenstored on a Unix socket in a short temporary directory."""
    rundir = Path(tempfile.mkdtemp(prefix="xs", dir="/tmp"))
    service = open_service(rundir)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.syncer)
            await nursery.start(service.serve_unix, rundir / "sock")
            yield service, rundir / "sock"
            nursery.cancel_scope.cancel()
    finally:
        service.journal.close()
        shutil.rmtree(rundir, ignore_errors=True)


async def read_messages(stream: trio.SocketStream, count: int) -> list[XsMessage]:
    parser, got = XsParser(), []
    while len(got) < count:
        data = await stream.receive_some(65536)
        assert data, "server closed the connection"
        got += parser.feed(data)
    return got


SESSION = [
    # (request, expected reply) — replies in order, each echoing req_id and tx_id
    (w.write("/wire/a", b"x\0y", req_id=1), frame(11, 1, 0, b"OK\0")),
    (w.read("/wire/a", req_id=2), frame(2, 2, 0, b"x\0y")),
    (w.directory("/wire", req_id=3), frame(1, 3, 0, b"a\0")),
    (w.get_perms("/wire/a", req_id=4), frame(3, 4, 0, b"n0\0")),
    (w.read("/wire/missing", req_id=5), frame(16, 5, 0, b"ENOENT\0")),
    (w.transaction_start(req_id=6), frame(6, 6, 0, b"1\0")),
    (w.write("/wire/b", "1", req_id=7, tx_id=1), frame(11, 7, 1, b"OK\0")),
    (w.transaction_end(1, True, req_id=8), frame(7, 8, 1, b"OK\0")),
    (w.get_domain_path(7, req_id=9), frame(10, 9, 0, b"/local/domain/7\0")),
    (XsMessage(99, 10, 0, b""), frame(16, 10, 0, b"ENOSYS\0")),
    (w.rm("/wire", req_id=11), frame(13, 11, 0, b"OK\0")),
]


@pytest.mark.parametrize("chunk", [None, 1])
async def test_session_through_socket(chunk: int | None) -> None:
    with trio.fail_after(20):
        async with running_service() as (_service, sock):
            stream = await trio.open_unix_socket(str(sock))
            data = b"".join(req.encode() for req, _ in SESSION)
            if chunk is None:
                await stream.send_all(data)
            else:
                for i in range(0, len(data), chunk):
                    await stream.send_all(data[i : i + chunk])
            replies = await read_messages(stream, len(SESSION))
            assert [r.encode() for r in replies] == [exp for _, exp in SESSION]
            await stream.aclose()


async def test_watch_event_follows_watch_ack() -> None:
    with trio.fail_after(10):
        async with running_service() as (_service, sock):
            stream = await trio.open_unix_socket(str(sock))
            await stream.send_all(w.watch("relative/path", "tok", req_id=5).encode())
            ack, event = await read_messages(stream, 2)
            assert ack.encode() == frame(XsType.WATCH, 5, 0, b"OK\0")
            # relative for a relative watch, even from the socket (home /local/domain/0)
            assert event.encode() == frame(15, 0, 0, b"relative/path\0tok\0")
            await stream.send_all(
                w.write("/local/domain/0/relative/path/x", "1", req_id=6).encode()
            )
            got = await read_messages(stream, 2)
            assert got[0].encode() == frame(15, 0, 0, b"relative/path/x\0tok\0")
            assert got[1].encode() == frame(11, 6, 0, b"OK\0")
            await stream.aclose()


async def test_flooding_client_does_not_starve_others() -> None:
    """One client pipelines requests and never reads its replies: the server stops
    reading it (outstanding quota), while another client keeps round-tripping."""
    with trio.fail_after(20):
        async with running_service() as (service, sock):
            flooder = await trio.open_unix_socket(str(sock))
            flood = b"".join(w.read("/local", req_id=i).encode() for i in range(50_000))

            async def push() -> None:
                await flooder.send_all(flood)  # blocks once the server stops reading

            async with trio.open_nursery() as nursery:
                nursery.start_soon(push)
                other = await trio.open_unix_socket(str(sock))
                for i in range(200):
                    await other.send_all(w.write("/fair/x", str(i), req_id=i).encode())
                    (reply,) = await read_messages(other, 1)
                    assert reply.payload == b"OK\0" and reply.req_id == i
                conns = [c for c in service.core.connections if c.outstanding]
                assert all(
                    c.outstanding <= service.core.quota.privileged_outstanding for c in conns
                )
                await other.aclose()
                nursery.cancel_scope.cancel()
            await flooder.aclose()
