"""The demo boots the same guest on xen and xen-legacy and shows the difference:
PV paths on one (event channels on every vCPU, singleshot timers, event-channel
IPIs), emulated ones on the other (LAPIC timer writes, ICR writes, EOIs)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import trio

from services.toolstack._testing import leftovers, temporary_host


async def test_demo_boots_two_guests_and_compares_them() -> None:
    with temporary_host() as host:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.toolstack",
                "demo",
                "-t",
                str(host.path),
                "--json",
                "--interval",
                "1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            with trio.fail_after(90):
                summary = None
                while summary is None:
                    line = await trio.to_thread.run_sync(
                        proc.stdout.readline, abandon_on_cancel=True
                    )
                    assert line, "the demo ended before showing its guests"
                    doc = json.loads(line)
                    if isinstance(doc, dict) and "guests" in doc:
                        summary = {g["name"]: g for g in doc["guests"]}
            pv, legacy = summary["pvhvm"], summary["legacy"]
            assert (pv["mode"], legacy["mode"]) == ("vector", "legacy")
            assert all(v["evtchn_events"] > 0 and v["apic_interrupts"] == 0 for v in pv["vcpus"])
            assert all(
                v["evtchn_events"] == 0 and v["apic_interrupts"] > 0 for v in legacy["vcpus"]
            )
            pv_exits = {r for v in pv["vcpus"] for r in v["exits"]}
            legacy_exits = {r for v in legacy["vcpus"] for r in v["exits"]}
            assert "hypercall:vcpu_op.set_singleshot_timer" in pv_exits
            assert not {"eoi", "icr_write", "lapic_timer_write"} & pv_exits
            assert {"eoi", "icr_write", "lapic_timer_write"} <= legacy_exits
            assert not any(r.startswith("hypercall:event_channel_op") for r in legacy_exits)
            # the PVHVM guest's disk ran the verifying workload; its CD-ROM was declined
            block = pv["block"]
            assert block["ops"] > 0 and block["io_errors"] == 0, block
            assert block["verify"]["errors"] == 0 and block["verify"]["sectors"] > 0
            drives = {d["vdev"]: d for d in pv["disks"]}
            assert drives["xvda"]["fe_state"] == "4" and drives["hdc"]["fe_state"] != "4"
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0
        finally:
            proc.kill()
            proc.wait(10)
        assert leftovers(host) == {"processes": [], "sockets": [], "pid_file": [], "shm": []}
