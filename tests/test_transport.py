"""The transport: calls, one-way messages, errors, garbage, peer restart."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import msgpack
import pynng
import pytest
import trio

from shared.transport import (
    CallTimeout,
    PeerLost,
    RemoteError,
    _wire,
    open_channel,
    open_server,
)
from tests.echo_service import (
    EchoReply,
    EchoRequest,
    FailRequest,
    Note,
    NotesRequest,
    PushRequest,
    SlowRequest,
    serve_echo,
)


@pytest.fixture
def endpoint(tmp_path) -> str:
    return f"ipc://{tmp_path}/svc.sock"


async def test_call_returns_the_reply(endpoint: str) -> None:
    with trio.fail_after(10):
        async with open_server(endpoint) as server, open_channel(endpoint) as chan:
            serve_echo(server)
            assert await chan.call(EchoRequest(7, b"x")) == EchoReply(7, b"x")
            assert chan.statistics().connects == 1
            assert server.statistics().replies == 1


async def test_concurrent_calls_each_get_their_own_reply(endpoint: str) -> None:
    results: dict[int, EchoReply] = {}
    with trio.fail_after(10):
        async with open_server(endpoint) as server, open_channel(endpoint) as chan:
            serve_echo(server)

            async def one(n: int) -> None:
                if n % 3 == 0:
                    await chan.call(SlowRequest(0.01))
                results[n] = await chan.call(EchoRequest(n))

            async with trio.open_nursery() as nursery:
                for n in range(60):
                    nursery.start_soon(one, n)
    assert results == {n: EchoReply(n) for n in range(60)}


async def test_timeout_raises_and_late_reply_is_counted_stale(endpoint: str) -> None:
    with trio.fail_after(10):
        async with open_server(endpoint) as server, open_channel(endpoint) as chan:
            serve_echo(server)
            start = trio.current_time()
            with pytest.raises(CallTimeout):
                await chan.call(SlowRequest(0.5), timeout=0.1)
            assert 0.1 <= trio.current_time() - start < 0.4
            await trio.sleep(0.6)
            # the channel still works, and the late reply was recognised
            assert await chan.call(EchoRequest(1)) == EchoReply(1)
            stats = chan.statistics()
            assert stats.timeouts == 1 and stats.stale_replies == 1


async def test_timeout_of_a_call_parked_behind_another(endpoint: str) -> None:
    with trio.fail_after(10):
        async with open_server(endpoint) as server, open_channel(endpoint) as chan:
            serve_echo(server)
            outcomes = []

            async def slow(seconds: float, timeout: float) -> None:
                try:
                    await chan.call(SlowRequest(seconds), timeout=timeout)
                    outcomes.append(("ok", seconds))
                except CallTimeout:
                    outcomes.append(("timeout", seconds))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow, 0.3, 2.0)
                await trio.sleep(0.01)
                nursery.start_soon(slow, 1.0, 0.1)
            assert sorted(outcomes) == [("ok", 0.3), ("timeout", 1.0)]


async def test_oneway_both_directions_in_order(endpoint: str) -> None:
    with trio.fail_after(10):
        async with open_server(endpoint) as server, open_channel(endpoint) as chan:
            serve_echo(server)
            for i in range(200):
                await chan.send(Note(i))
            assert (await chan.call(NotesRequest())).seqs == list(range(200))
            assert await chan.call(PushRequest(50)) == EchoReply(50)
            got = [(await chan.receive()).seq for _ in range(50)]
            assert got == list(range(50))


async def test_errors_come_back_as_remote_errors(endpoint: str) -> None:
    with trio.fail_after(10):
        async with open_server(endpoint) as server, open_channel(endpoint) as chan:
            serve_echo(server)
            with pytest.raises(RemoteError) as err:
                await chan.call(EchoReply(1))  # nobody serves replies
            assert err.value.code == "unknown-message"
            with pytest.raises(RemoteError) as err:
                await chan.call(FailRequest(True))
            assert (err.value.code, err.value.text) == ("refused", "as asked")
            with pytest.raises(RemoteError) as err:
                await chan.call(FailRequest(False))
            assert err.value.code == "handler"
            assert await chan.call(EchoRequest(2)) == EchoReply(2)
            stats = server.statistics()
            assert stats.unknown_messages == 1 and stats.handler_errors == 1


def _garbage(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    frames = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) for _ in range(30)]
    frames += [
        msgpack.packb(x)
        for x in (
            {"a": 1},
            [1],
            [1, 2, 3, 4],
            [9, 1, [9050, 1, b""]],  # kind out of range
            [1, 5, [424242]],  # unknown tag
            [1, 6, [9050]],  # wrong arity
            [1, 7, [9050, "one", b""]],  # wrong type
            [1, 8, [9050, 1, b"", 3]],  # too many fields
            [1, 9, "not-a-list"],
            [2, 10, [9051, 1, b""]],  # a reply sent to a service
        )
    ]
    return frames


async def test_garbage_gets_codec_errors_and_others_keep_being_served(endpoint: str) -> None:
    frames = _garbage(seed=1)
    with trio.fail_after(20):
        async with open_server(endpoint) as server, open_channel(endpoint) as chan:
            serve_echo(server)
            raw = pynng.Pair1(dial=endpoint, recv_timeout=2000)
            try:
                for i, frame in enumerate(frames):
                    await trio.to_thread.run_sync(raw.send, frame)
                    reply = await trio.to_thread.run_sync(raw.recv)
                    kind, cid, body = msgpack.unpackb(reply)
                    assert kind == _wire.Kind.ERROR
                    assert body[0] == "codec", body
                    assert await chan.call(EchoRequest(i)) == EchoReply(i)
            finally:
                raw.close()
            assert server.statistics().codec_errors == len(frames)


def _spawn_echo(endpoint: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.echo_service", endpoint])


async def test_peer_restart_fails_calls_in_flight_then_reconnects(endpoint: str) -> None:
    proc = _spawn_echo(endpoint)
    try:
        with trio.fail_after(30):
            async with open_channel(endpoint) as chan:
                await chan.wait_connected(timeout=10)
                assert await chan.call(EchoRequest(1)) == EchoReply(1)

                async def in_flight() -> None:
                    with pytest.raises(PeerLost):
                        await chan.call(SlowRequest(5), timeout=10)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(in_flight)
                    await trio.sleep(0.2)
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(5)
                proc = _spawn_echo(endpoint)
                await chan.wait_connected(timeout=10)
                assert await chan.call(EchoRequest(2), timeout=5) == EchoReply(2)
                assert chan.statistics().connects == 2
                assert chan.statistics().peer_lost == 1
    finally:
        proc.kill()
        proc.wait(5)


async def test_calls_wait_for_a_late_server(endpoint: str) -> None:
    with trio.fail_after(20):
        async with open_channel(endpoint) as chan:
            proc = None
            try:

                async def start_later() -> None:
                    nonlocal proc
                    await trio.sleep(0.3)
                    proc = _spawn_echo(endpoint)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(start_later)
                    assert await chan.call(EchoRequest(3), timeout=10) == EchoReply(3)
            finally:
                if proc is not None:
                    proc.kill()
                    proc.wait(5)


async def test_errors_in_the_block_propagate_unwrapped(endpoint: str) -> None:
    with trio.fail_after(10):
        with pytest.raises(CallTimeout):
            async with open_server(endpoint) as server, open_channel(endpoint) as chan:
                serve_echo(server)
                await chan.call(SlowRequest(1), timeout=0.05)
        with pytest.raises(KeyError):
            async with open_server(endpoint):
                raise KeyError("mine")
