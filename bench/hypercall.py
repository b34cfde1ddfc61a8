"""Hypercall round trip against the transport's bare round trip, same run.

The measuring process binds as a vCPU of a guest and times ``XENVER_version``
(the cheapest hypercall: the dispatcher, the accounting, the codec of the real
argument struct), then times the same number of calls to an echo service on the
same transport. Goal: within 1.2x.
"""

from __future__ import annotations

import time

import trio

from bench._hvbed import bed
from bench._report import Result, emit, median, note, percentile
from bench._transport_peer import BenchEcho
from services.hypervisor.messages import XenVersion
from shared.transport import open_channel


async def _rtts(chan, msg, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        await chan.call(msg)
        lat.append(time.perf_counter() - t)
    return lat[n // 10 :]


async def measure(rounds: int, n: int) -> tuple[list[float], list[float]]:
    hyper, bare = [], []
    async with bed() as (hv, echo, _peer_pid):
        guest = await hv.create(vcpus=1, puppets=False)
        vcpu_chan = await hv.bind_as_vcpu(guest, 0)
        async with open_channel(echo) as echo_chan:
            await echo_chan.wait_connected(timeout=10)
            for r in range(rounds):
                h = await _rtts(vcpu_chan, XenVersion(0, b""), n)
                b = await _rtts(echo_chan, BenchEcho(b"x" * 8), n)
                hyper.append(percentile(h, 0.5) * 1e6)
                bare.append(percentile(b, 0.5) * 1e6)
                note(
                    f"round {r + 1}/{rounds}: hypercall {hyper[-1]:.0f} µs, bare {bare[-1]:.0f} µs"
                )
    return hyper, bare


def run(quick: bool = False) -> list[Result]:
    hyper, bare = trio.run(measure, 2 if quick else 8, 300 if quick else 1000)
    return emit(
        [
            Result(
                "hypercall",
                "xen_version_rtt_p50_us",
                median(hyper),
                median(bare),
                1.2,
                True,
                "µs",
                "transport echo round trip",
            ),
        ]
    )
