"""Workloads a guest runs from its config (or on request through the control
endpoint): timer callouts, timer rate, IPI ping-pong and broadcast
rendezvous, busy loops. Each returns a JSON-able result for this CPU, or None
when the spec does not involve this CPU. Latencies are guest ns.

Gaps between rounds use the host scheduler (``trio.sleep``), not guest
callouts, so an IPI workload's exit counts hold no timer exits.
"""

from __future__ import annotations

import random
import time
from typing import Any

import trio

from services.frontend.kernel.ipi import FUNC, IPI
from services.frontend.kernel.kernel import Kernel, _spin_us

MAX_SAMPLES = 5000
ROUND_TIMEOUT_S = 5.0


def summary(samples: list[int], **extra: Any) -> dict[str, Any]:
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))] if s else None  # noqa: E731
    return {
        "count": len(s),
        "p50_ns": pick(0.5),
        "p99_ns": pick(0.99),
        "max_ns": s[-1] if s else None,
        "mean_ns": sum(s) / len(s) if s else None,
        "samples_ns": samples[:MAX_SAMPLES],
        **extra,
    }


def _cpus(spec: dict[str, Any], k: Kernel) -> list[int]:
    return list(spec.get("vcpus", range(k.nr_cpus)))


async def run(k: Kernel, spec: dict[str, Any]) -> dict[str, Any] | None:
    kind = spec["kind"]
    if kind == "callouts" and k.cpu in _cpus(spec, k):
        return await callouts(k, spec)
    if kind == "timer_rate" and k.cpu in _cpus(spec, k):
        return await timer_rate(k, spec)
    if kind == "ipi_pingpong" and k.cpu == spec.get("from", 0):
        return await pingpong(k, spec)
    if kind == "ipi_broadcast" and k.cpu == spec.get("from", 0):
        return await broadcast(k, spec)
    if kind == "busy" and k.cpu in _cpus(spec, k):
        return await busy(k, float(spec.get("seconds", 1.0)))
    if kind == "block":
        from services.frontend.kernel import blkwork

        return await blkwork.run(k, spec)
    if kind == "block_raw":
        from services.frontend.kernel import blkbench

        return await blkbench.run(k, spec)
    if kind == "idle":
        await trio.sleep(float(spec.get("seconds", 1.0)))
        return {"idle_s": spec.get("seconds", 1.0)}
    return None


async def callouts(k: Kernel, spec: dict[str, Any]) -> dict[str, Any]:
    rng = random.Random(int(spec.get("seed", 1)) * 1000 + k.cpu)
    lo, hi = int(spec.get("min_us", 200)) * 1000, int(spec.get("max_us", 5000)) * 1000
    lateness: list[int] = []
    for _ in range(int(spec.get("count", 200))):
        fired = trio.Event()

        def fire(now: int, deadline: int, fired: trio.Event = fired) -> None:
            lateness.append(now - deadline)
            fired.set()

        await k.callout_reset(k.new_cid(), k.clock.now() + rng.randint(lo, hi), fire, "callout")
        with trio.move_on_after(ROUND_TIMEOUT_S + hi / 1e9):
            await fired.wait()
    return summary(lateness, what="lateness", armed=len(lateness))


async def timer_rate(k: Kernel, spec: dict[str, Any]) -> dict[str, Any]:
    interval = int(spec.get("interval_us", 200)) * 1000
    end = time.monotonic() + float(spec.get("seconds", 1.0))
    events, first_exits = 0, sum(k.exits.values())
    t0 = time.monotonic()
    # One deadline for the whole run, not one per event: a cancel scope with a
    # deadline costs tens of µs here, which would blur the PV/emulated ratio.
    with trio.move_on_after(float(spec.get("seconds", 1.0)) + ROUND_TIMEOUT_S):
        while time.monotonic() < end:
            fired = trio.Event()
            await k.callout_reset(
                k.new_cid(), k.clock.now() + interval, lambda n, d, ev=fired: ev.set()
            )
            await fired.wait()
            events += 1
    elapsed = time.monotonic() - t0
    return {
        "events": events,
        "seconds": elapsed,
        "rate_hz": events / elapsed,
        "guest_exits": sum(k.exits.values()) - first_exits,
    }


async def pingpong(k: Kernel, spec: dict[str, Any]) -> dict[str, Any]:
    to, rtts = int(spec.get("to", 1)), []
    waiting: dict[int, trio.Event] = {}

    def pong(sender: int, slot: tuple[int, int, int, int, int]) -> None:
        rtts.append(k.clock.now() - slot[2])
        if (ev := waiting.pop(slot[1], None)) is not None:
            ev.set()

    k.on_func[FUNC.PONG] = pong
    lost = 0
    for i in range(int(spec.get("count", 200))):
        ev = waiting[i] = trio.Event()
        await k.mailbox_post(to, (FUNC.PING, i, k.clock.now(), 0, 0))
        await k.ipi_send(IPI.RENDEZVOUS, to)
        with trio.move_on_after(ROUND_TIMEOUT_S):
            await ev.wait()
        lost += not ev.is_set()
        await trio.sleep(int(spec.get("gap_us", 500)) / 1e6)
    return summary(rtts, what="ipi_round_trip", to=to, lost=lost)


async def broadcast(k: Kernel, spec: dict[str, Any]) -> dict[str, Any]:
    others = [c for c in range(k.nr_cpus) if c != k.cpu]
    acks: dict[int, int] = {}
    waiting: dict[int, trio.Event] = {}
    lat: list[int] = []

    def ack(sender: int, slot: tuple[int, int, int, int, int]) -> None:
        seq = slot[1]
        acks[seq] = acks.get(seq, 0) + 1
        if acks[seq] == len(others):
            lat.append(k.clock.now() - slot[2])
            if (ev := waiting.pop(seq, None)) is not None:
                ev.set()

    k.on_func[FUNC.ACK] = ack
    lost = 0
    for i in range(int(spec.get("count", 100))):
        ev = waiting[i] = trio.Event()
        t0 = k.clock.now()
        for t in others:
            await k.mailbox_post(t, (FUNC.RENDEZVOUS, i, t0, 0, 0))
        await k.ipi_send(IPI.RENDEZVOUS, "others")
        with trio.move_on_after(ROUND_TIMEOUT_S):
            await ev.wait()
        lost += not ev.is_set()
        await trio.sleep(int(spec.get("gap_us", 1000)) / 1e6)
    return summary(lat, what="rendezvous_latency", targets=len(others), lost=lost)


async def busy(k: Kernel, seconds: float) -> dict[str, Any]:
    end, spins = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        _spin_us(200)
        spins += 1
        await trio.sleep(0)  # a preemption point: interrupts are taken here
    return {"busy_s": seconds, "slices": spins}
