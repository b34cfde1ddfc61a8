"""Every service of a host, brought up by the supervisor, answers garbage on
its endpoint with an ERROR frame (code ``codec``, or ``unknown-message`` for a
well-formed message it does not serve), counts it in its StatusReply, and keeps
answering a well-behaved client between every bad frame."""

from __future__ import annotations

import itertools
import json
import random

import msgpack
import pynng
import pytest
import trio

from services.toolstack._testing import ScratchHost, run_cli, temporary_host
from shared import messages
from shared.topology import SERVICES
from shared.transport import Channel, open_channel

ERROR = 3  # frame kind of an error reply
UNKNOWN_CALL = -1  # call id of an error reply to a frame whose id could not be read


def random_frames(seed: int, count: int = 40) -> list[bytes]:
    """Random bytes, mostly short, some empty or long (seeded: reproducible)."""
    rng = random.Random(seed)
    sizes = [0, 1, 2, 4096] + [rng.randrange(1, 96) for _ in range(count - 4)]
    return [rng.randbytes(n) for n in sizes]


def _pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# (frame, call id the error must carry) — valid msgpack, wrong shape.
WRONG_SHAPES: list[tuple[bytes, int]] = [
    (_pack({"kind": 1}), UNKNOWN_CALL),  # not an array
    (_pack(5), UNKNOWN_CALL),
    (_pack("ping"), UNKNOWN_CALL),
    (_pack(None), UNKNOWN_CALL),
    (_pack([]), UNKNOWN_CALL),
    (_pack([1, 2]), 2),  # envelope of the wrong arity
    (_pack([1, 3, [10, 1], 4]), 3),
    (_pack([9, 4, [10, 1]]), 4),  # kind out of range
    (_pack(["1", 5, [10, 1]]), 5),  # kind of the wrong type
    (_pack([1, "6", [10, 1]]), UNKNOWN_CALL),  # call id of the wrong type
    (_pack([2, 7, [11, 1, "x", 2]]), 7),  # a reply sent to a service
    (_pack([3, 8, ["codec", "x"]]), 8),  # an error sent to a service
    (_pack([1, 9, "not-a-list"]), 9),  # body not an array
    (_pack([1, 10, []]), 10),  # empty body
    (_pack([1, 11, [424242]]), 11),  # unknown tag
    (_pack([1, 12, ["10", 1]]), 12),  # tag of the wrong type
    (_pack([1, 13, [10]]), 13),  # Ping without its nonce
    (_pack([1, 14, [10, 1, 2]]), 14),  # Ping with a field too many
    (_pack([1, 15, [10, "one"]]), 15),  # nonce of the wrong type
    (_pack([1, 16, [10, 1.5]]), 16),
    (_pack([1, 17, [10, True]]), 17),
    (_pack([1, 18, [10, None]]), 18),
    (_pack([1, 19, [14, "all", 0.0, 0.0, 0.0, 0.0, False, 0]]), 19),  # SetFaults.drop
    (_pack([1, 20, [13, "svc", 1, 0.0, []]]), 20),  # StatusReply.stats not a map
    (b"\x93\x01", UNKNOWN_CALL),  # truncated array
]

# Well-formed messages no service routes.
NOT_SERVED: list[tuple[bytes, int]] = [
    (_pack([1, 30, [15]]), 30),  # Ack
    (_pack([1, 31, [11, 1, "x", 2]]), 31),  # Pong
]


@pytest.fixture
def scratch() -> ScratchHost:
    with temporary_host() as host:
        yield host


async def codec_counters(chan: Channel) -> tuple[int, int]:
    reply = await chan.call(messages.StatusRequest(), timeout=5)
    transport = reply.stats["transport"]
    return transport["codec_errors"], transport["unknown_messages"]


async def test_every_service_survives_garbage(scratch: ScratchHost) -> None:
    with trio.fail_after(100):
        up = await run_cli("host", "up", str(scratch.path), "--json")
        assert up.returncode == 0, up.stderr.decode()
        endpoints = {s["service"]: s["endpoint"] for s in json.loads(up.stdout)["services"]}
        assert sorted(endpoints) == sorted(SERVICES)
        for seed, (service, endpoint) in enumerate(sorted(endpoints.items())):
            await _garbage_to_one_service(service, endpoint, seed)


async def _garbage_to_one_service(service: str, endpoint: str, seed: int) -> None:
    nonces = itertools.count(1)
    cases = [(frame, None, "codec") for frame in random_frames(seed)]
    cases += [(frame, cid, "codec") for frame, cid in WRONG_SHAPES]
    cases += [(frame, cid, "unknown-message") for frame, cid in NOT_SERVED]
    async with open_channel(endpoint) as good:
        await good.wait_connected(10)
        codec_before, unknown_before = await codec_counters(good)
        with pynng.Pair1(dial=endpoint) as raw:
            for frame, cid, code in cases:
                await raw.asend(frame)
                reply = None
                with trio.move_on_after(2):
                    reply = await raw.arecv()
                if reply is None:
                    # Only bytes that are not even an envelope may be dropped.
                    assert cid is None, f"{service}: no reply to {frame!r}"
                else:
                    kind, call_id, body = msgpack.unpackb(reply, raw=False)
                    assert kind == ERROR and body[0] == code, (service, frame, body)
                    assert cid is None or call_id == cid, (service, frame, call_id)
                nonce = next(nonces)
                pong = await good.call(messages.Ping(nonce), timeout=5)
                assert (pong.nonce, pong.service) == (nonce, service)
        codec_after, unknown_after = await codec_counters(good)
    assert codec_after - codec_before == sum(code == "codec" for *_, code in cases)
    assert unknown_after - unknown_before == len(NOT_SERVED)
