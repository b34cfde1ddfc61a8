"""The demo's guests: boot the same guest on ``xen`` and on ``xen-legacy``,
let their timer and IPI workloads run, and show where their interrupts went
and which exits they cost (the FreeBSD 10 comparison, in two tables)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import trio
from rich.console import Console
from rich.table import Table

from services.hypervisor import control as ctl
from services.toolstack._domains import create_domain, dom0, reports
from services.toolstack.domcfg import DomainConfig
from services.toolstack.domcfg import load as load_config
from services.toolstack.vbd import list_vbds
from shared.topology import Host

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
GUESTS = (DEPLOY / "guest-pvhvm.cfg", DEPLOY / "guest-legacy.cfg")
WORKLOAD_TIMEOUT = 60.0
#: a vCPU rewrites its report for a new log line within 0.1 s but for moved
#: interrupt counters only every 0.5 s (kernel ``CHURN_INTERVAL_S``): wait
#: that long after the last "workloads done" so the counters shown are current
REPORT_LAG_S = 0.7


DISK_MIB = 64
BLOCK_WORKLOAD = "block:vdev=xvda,pattern=random,op=mixed,bs=4096,qd=8,count=2000,flush_every=32"


def with_disks(cfg: DomainConfig, host: Host) -> DomainConfig:
    """The PVHVM guest gets a sparse disk (xvda) running the verifying block
    workload, and a CD-ROM drive (hdc) with an ISO in it."""
    images = host.rundir / "images"
    images.mkdir(parents=True, exist_ok=True)
    disk, iso = images / f"{cfg.name}-xvda.img", images / "demo.iso"
    with open(disk, "wb") as f:
        f.truncate(DISK_MIB << 20)
    iso.write_bytes(bytes(range(256)) * 4096)
    return attrs.evolve(
        cfg,
        disk=(f"target={disk}, vdev=xvda, access=rw", f"{iso}, hdc, r, cdrom"),
        workloads=(BLOCK_WORKLOAD, *cfg.workloads),
    )


async def run_guests(host: Host, console: Console | None) -> list[dict[str, Any]]:
    """Create the demo guests, wait for their workloads, print the comparison
    (on ``console``; None: only return it)."""
    summaries = []
    async with dom0(host) as d:
        domids = []
        for path in GUESTS:
            cfg = load_config(path)
            if cfg.platform == "xen" and "blkback" in host.services:
                cfg = with_disks(cfg, host)
            domids.append((cfg, await create_domain(d, cfg)))
            if console is not None:
                console.print(
                    f"domsplit demo: booted {cfg.name} (domain {domids[-1][1]}, {cfg.platform})"
                )
        with trio.move_on_after(WORKLOAD_TIMEOUT):
            while not all(_done(host, domid, cfg.vcpus) for cfg, domid in domids):
                await trio.sleep(0.25)
        await trio.sleep(REPORT_LAG_S)
        for cfg, domid in domids:
            detail = await d.hv.call(ctl.DomainDetailRequest(domid))
            summary = summarise(cfg.name, cfg.platform, detail, reports(host, domid))
            if cfg.disk and d.xs is not None:
                summary["disks"] = await list_vbds(d.xs, domid)
                summary["block"] = block_result(reports(host, domid))
            summaries.append(summary)
            if console is not None:
                console.print(interrupt_table(summary))
                console.print(exit_table(summary))
                if "disks" in summary:
                    console.print(disk_table(summary))
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


def block_result(guest: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """The verifying block workload's result (it runs on vCPU0)."""
    for result in guest.get(0, {}).get("workloads", {}).values():
        if isinstance(result, dict) and "vdev" in result:
            return result
    return None


def disk_table(s: dict[str, Any]) -> Table:
    t = Table(title=f"{s['name']}: disks")
    for c in ("vdev", "type", "backend", "frontend", "result"):
        t.add_column(c)
    states = {"1": "Initialising", "2": "InitWait", "3": "Initialised", "4": "Connected"}
    states |= {"5": "Closing", "6": "Closed"}
    block = s.get("block") or {}
    for d in s["disks"]:
        if d["devtype"] == "cdrom":
            result = "declined by the PV frontend (HVM guests use the emulated CD); boot not held"
        elif block.get("vdev") == d["vdev"]:
            verify = block.get("verify", {})
            outcomes = ", ".join(f"{n} {o}" for o, n in verify.get("outcomes", {}).items())
            result = (
                f"{block.get('ops', 0)} ops ({block.get('iops', 0):.0f} IOPS, "
                f"{block.get('mb_s', 0):.1f} MB/s), {block.get('io_errors', 0)} I/O errors; "
                f"verified {verify.get('sectors', 0)} sectors: {outcomes}"
            )
        else:
            result = ""
        t.add_row(
            d["vdev"],
            d["devtype"],
            states.get(d["be_state"], d["be_state"]),
            states.get(d["fe_state"], d["fe_state"]),
            result,
        )
    return t


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
