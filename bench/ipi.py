"""IPI round trip, PV (``EVTCHNOP_send`` on the target's IPI port, no EOI)
against emulated (ICR writes + EOI on the LAPIC), 4-vCPU guests in one run.

vCPU0 posts a PING in its mailbox to vCPU1 and sends RENDEZVOUS; vCPU1's
handler answers PONG the same way; the round trip is guest time from the
post to vCPU0's handler seeing the PONG. Also reported: the hypervisor's
exits per round trip on both vCPUs. Goal: PV round trip <= 0.7x emulated.
"""

from __future__ import annotations

import sys

import trio

from bench._report import Result, emit, note
from services.frontend.kernel.testing import boot_guest, exits, kernel_host


async def measure(quick: bool) -> dict[str, dict[str, float]]:
    count = 150 if quick else 600
    out: dict[str, dict[str, float]] = {}
    async with kernel_host() as hv:
        for label, personality in (("pv", "xen"), ("emulated", "xen-legacy")):
            g = await boot_guest(hv, personality, vcpus=4)
            before = exits(await g.detail())
            res = await g.run(
                0,
                {"kind": "ipi_pingpong", "from": 0, "to": 1, "count": count, "gap_us": 300},
                timeout=120,
            )
            after = exits(await g.detail())
            ipi_exits = sum(after.values()) - sum(before.values())
            out[label] = {
                "rtt_p50_us": res["p50_ns"] / 1e3,
                "rtt_p99_us": res["p99_ns"] / 1e3,
                "exits_per_round_trip": ipi_exits / max(1, res["count"]),
                "lost": res["lost"],
            }
            note(f"{label}: {out[label]}")
    return out


def run(quick: bool = False) -> list[Result]:
    res = trio.run(measure, quick)
    pv, em = res["pv"], res["emulated"]
    return emit(
        [
            Result(
                "ipi",
                "round_trip_p50_us",
                pv["rtt_p50_us"],
                em["rtt_p50_us"],
                0.7,
                True,
                "µs",
                "emulated APIC IPI",
            ),
            Result(
                "ipi",
                "exits_per_round_trip",
                pv["exits_per_round_trip"],
                em["exits_per_round_trip"],
                0.7,
                True,
                "exits",
                "emulated APIC IPI",
            ),
        ]
    )


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
