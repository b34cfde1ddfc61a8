"""The demo's guests: boot the same guest on ``xen`` and on ``xen-legacy``,
let their timer and IPI workloads run, and show where their interrupts went
and which exits they cost (the FreeBSD 10 comparison, in two tables)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.table import Table

from services.hypervisor import control as ctl
from services.toolstack._domains import create_domain, dom0, reports
from services.toolstack.domcfg import load as load_config
from shared.topology import Host

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
GUESTS = (DEPLOY / "guest-pvhvm.cfg", DEPLOY / "guest-legacy.cfg")
WORKLOAD_TIMEOUT = 60.0


async def run_guests(host: Host, console: Console | None) -> list[dict[str, Any]]:
    """Create the demo guests, wait for their workloads, print the comparison
    (on ``console``; None: only return it)."""
    summaries = []
    async with dom0(host) as d:
        domids = []
        for path in GUESTS:
            cfg = load_config(path)
            domids.append((cfg, await create_domain(d, cfg)))
            if console is not None:
                console.print(
                    f"domsplit demo: booted {cfg.name} (domain {domids[-1][1]}, {cfg.platform})"
                )
        with trio.move_on_after(WORKLOAD_TIMEOUT):
            while not all(_done(host, domid, cfg.vcpus) for cfg, domid in domids):
                await trio.sleep(0.25)
        for cfg, domid in domids:
            detail = await d.hv.call(ctl.DomainDetailRequest(domid))
            summary = summarise(cfg.name, cfg.platform, detail, reports(host, domid))
            summaries.append(summary)
            if console is not None:
                console.print(interrupt_table(summary))
                console.print(exit_table(summary))
    return summaries


def _done(host: Host, domid: int, vcpus: int) -> bool:
    got = reports(host, domid)
    return len(got) == vcpus and all(
        any("workloads done" in line for line in r.get("dmesg", ())) or r.get("state") == "panic"
        for r in got.values()
    )


def summarise(name: str, platform: str, detail: ctl.DomainDetail, guest: dict) -> dict[str, Any]:
    vcpus = []
    for stats in detail.vcpus:
        report = guest.get(stats.vcpu, {})
        handled = report.get("interrupts", {})
        vcpus.append(
            {
                "vcpu": stats.vcpu,
                "upcalls": stats.upcalls,
                "evtchn_events": sum(handled.get("evtchn", {}).values()),
                "apic_interrupts": sum(handled.get("apic", {}).values()),
                "exits": dict(stats.exits),
            }
        )
    mode = next((r.get("platform", {}).get("mode") for r in guest.values() if r), None)
    return {"name": name, "platform": platform, "mode": mode, "vcpus": vcpus}


def interrupt_table(s: dict[str, Any]) -> Table:
    t = Table(title=f"{s['name']} ({s['platform']}, {s['mode']}): where interrupts went")
    for c in ("vCPU", "interrupts delivered", "event-channel events", "LAPIC interrupts"):
        t.add_column(c, justify="right")
    for v in s["vcpus"]:
        t.add_row(
            str(v["vcpu"]), str(v["upcalls"]), str(v["evtchn_events"]), str(v["apic_interrupts"])
        )
    return t


def exit_table(s: dict[str, Any]) -> Table:
    reasons = sorted({r for v in s["vcpus"] for r in v["exits"]})
    t = Table(title=f"{s['name']}: exits by reason")
    t.add_column("reason")
    for v in s["vcpus"]:
        t.add_column(f"vCPU{v['vcpu']}", justify="right")
    for r in reasons:
        t.add_row(r, *(str(v["exits"].get(r, 0)) for v in s["vcpus"]))
    t.add_row("total", *(str(sum(v["exits"].values())) for v in s["vcpus"]))
    return t
