"""Interdomain event latency against the transport's one-way latency, same run.

Two guests, each a puppet vCPU process: B sends on its end of an interdomain
channel (``EVTCHNOP_send``), A's vCPU process takes the upcall and scans its
shared_info page. Latency = A's handler time - B's time just before the send
(both CLOCK_MONOTONIC on one host). Two hops through the hypervisor; the
baseline is one hop: a one-way message between two processes on the same
transport carrying its send time. Goal: within 2.2x.
"""

from __future__ import annotations

import time

import trio

from bench._hvbed import BENCH_CPU, bed, pin_process
from bench._report import Result, emit, median, note
from bench._transport_peer import BenchDelays, BenchStamp
from services.frontend.puppet import PuppetSend
from shared.abi import hypercall as hc
from shared.abi.constants import DOMID, EVTCHNOP
from shared.transport import open_channel


async def measure(rounds: int, n: int) -> tuple[list[float], list[float]]:
    events, oneway = [], []
    async with bed() as (hv, echo):
        a, b = await hv.create(vcpus=1), await hv.create(vcpus=1)
        for g in (a, b):
            await g.pv_setup("vector")
            for pid in g.created.vcpu_pids:  # guests on one CPU, the hypervisor on the other:
                pin_process(pid, BENCH_CPU)  # both hops cross CPUs, as the baseline's does
        rc, unbound = await b.vcpus[0].evtchn(
            EVTCHNOP.alloc_unbound, hc.EvtchnAllocUnbound(DOMID.SELF, a.domid)
        )
        rc, bound = await a.vcpus[0].evtchn(
            EVTCHNOP.bind_interdomain, hc.EvtchnBindInterdomain(b.domid, unbound.port)
        )
        assert rc == 0
        await a.vcpus[0].wait_upcalls(1)
        await a.vcpus[0].upcalls()
        async with open_channel(echo) as echo_chan:
            await echo_chan.wait_connected(timeout=10)
            for r in range(rounds):
                sent = await b.vcpus[0].control.call(PuppetSend(unbound.port, n, 0.002), timeout=60)
                seen = await a.vcpus[0].wait_upcalls(n, timeout=10)
                await a.vcpus[0].upcalls()
                got = [u.at_ns for u in seen if u.ports == (bound.local_port,)]
                if len(got) != n:
                    raise AssertionError(f"{len(got)} of {n} events arrived")
                lat = sorted(g - s for g, s in zip(got, sent.at_ns, strict=True))[n // 10 :]
                events.append(lat[len(lat) // 2] / 1e3)
                for _ in range(n):
                    await echo_chan.send(BenchStamp(time.monotonic_ns()))
                    await trio.sleep(0.002)
                delays = (await echo_chan.call(BenchDelays())).delays_ns
                d = sorted(delays)[n // 10 :]
                oneway.append(d[len(d) // 2] / 1e3)
                note(
                    f"round {r + 1}/{rounds}: event {events[-1]:.0f} µs, one-way {oneway[-1]:.0f} µs"
                )
    return events, oneway


def run(quick: bool = False) -> list[Result]:
    events, oneway = trio.run(measure, 2 if quick else 6, 100 if quick else 300)
    return emit(
        [
            Result(
                "evtchn",
                "interdomain_send_to_upcall_p50_us",
                median(events),
                median(oneway),
                2.2,
                True,
                "µs",
                "transport one-way latency",
            ),
        ]
    )
