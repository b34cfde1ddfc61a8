"""The guest kernel's xenbus side against a real host (hypervisor + xenstored,
``domsplit create``): frontends probed under ``device/`` and driven through
the handshake by a scripted backend, the boot hold and its timeout, the
declined PV CD-ROM (guest-behaviour A.4, E 30), and ``control/shutdown``:
poweroff, unknown commands, the suspend handshake (B.1-B.2, E 21)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import trio

from services.frontend.kernel import report
from services.hypervisor import control as ctl
from services.toolstack._domains import dom0
from services.toolstack._testing import run_cli, temporary_host
from shared.abi import hypercall as hc
from shared.abi.constants import SHUTDOWN, XenbusState

HOST = ("hypervisor", "xenstore")


def _cfg(tmp: Path, name: str, *lines: str) -> Path:
    path = tmp / f"{name}.cfg"
    body = [f'name = "{name}"', "vcpus = 2", "memory = 16", 'platform = "xen"', *lines]
    path.write_text("\n".join(body) + "\n")
    return path


async def _up(host: Any) -> tuple[str, str]:
    topo = ("-t", str(host.path))
    up = await run_cli("host", "up", *topo, timeout=60)
    assert up.returncode == 0, up.stderr
    return topo


async def _create(topo: tuple[str, str], cfg: Path) -> int:
    proc: subprocess.CompletedProcess = await run_cli("create", str(cfg), *topo, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["domid"]


async def _reports(host: Any, domid: int, check: Any, timeout: float = 20) -> list[dict]:
    with trio.fail_after(timeout):
        while True:
            reps = [report.read(host.host.rundir, domid, v) or {} for v in range(2)]
            if all(reps) and check(reps):
                return reps
            await trio.sleep(0.05)


def _log(rep: dict, text: str) -> list[str]:
    return [line for line in rep["dmesg"] if text in line]


async def _trace(d: Any, domid: int) -> list[ctl.TraceEntry]:
    return list((await d.hv.call(ctl.TraceRequest(domid, False))).entries)


def _shutdowns(trace: list[ctl.TraceEntry]) -> list[ctl.TraceEntry]:
    return [e for e in trace if e.name.endswith("sched_op.shutdown")]


async def test_frontend_handshake_and_poweroff(tmp_path: Path) -> None:
    """A vbd with the reference driver follows a scripted backend to Connected
    (boot waits for it); features are advertised; ``domsplit shutdown --wait``
    is acknowledged, SCHEDOP_shutdown(poweroff) comes from vCPU0 and
    @releaseDomain fires."""
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    cfg = _cfg(
        tmp_path,
        "xb1",
        "boot_hold_s = 20",
        'xenbus_drivers = {"vbd": "stub"}',
        f'disk = ["target={img}, vdev=xvda, access=rw"]',
    )
    with trio.fail_after(90), temporary_host(HOST) as host:
        topo = await _up(host)
        domid = await _create(topo, cfg)
        fe, be = (
            f"/local/domain/{domid}/device/vbd/51712",
            f"/local/domain/0/backend/vbd/{domid}/51712",
        )
        async with dom0(host.host) as d:
            xs = d.xs
            assert xs is not None
            # the backend: InitWait; the frontend answers Initialised with its keys
            await xs.write(f"{be}/max-ring-page-order", b"2")
            await xs.write(f"{be}/state", b"2")
            with trio.fail_after(15):
                while await xs.read(f"{fe}/state") != b"3":
                    await trio.sleep(0.05)
            assert await xs.read(f"{fe}/protocol") == b"x86_64-abi"
            assert await xs.read(f"{fe}/stub-backend-max-order") == b"2"
            reps = [report.read(host.host.rundir, domid, v) or {} for v in range(2)]
            assert reps[0].get("state") != "running"  # boot is held for the frontend
            await xs.write(f"{be}/sectors", b"2048")
            await xs.write(f"{be}/state", b"4")
            reps = await _reports(host, domid, lambda r: r[0]["state"] == "running")
            dev = reps[0]["xenbus"]["devices"]["device/vbd/51712"]
            assert (dev["state"], dev["outcome"]) == ("Connected", "connected")
            assert reps[0]["xenbus"]["hold"] == "released"
            assert await xs.read(f"{fe}/state") == str(int(XenbusState.Connected)).encode()
            for key in ("poweroff", "reboot", "suspend"):
                assert await xs.read(f"/local/domain/{domid}/control/feature-{key}") == b"1"

            await xs.watch("@releaseDomain", "rel")
            assert await xs.event() == (b"@releaseDomain", b"rel")
            down = await run_cli("shutdown", str(domid), *topo, "--wait", "15", "--json")
            assert down.returncode == 0, down.stderr
            assert json.loads(down.stdout)["reason"] == SHUTDOWN.poweroff
            with trio.fail_after(10):
                assert await xs.event() == (b"@releaseDomain", b"rel")
            assert await xs.read(f"/local/domain/{domid}/control/shutdown") == b""
            (sd,) = _shutdowns(await _trace(d, domid))
            assert sd.vcpu == 0 and hc.SchedShutdown.unpack(sd.arg).reason == SHUTDOWN.poweroff


async def test_cdrom_is_declined_and_boot_does_not_wait(tmp_path: Path) -> None:
    """A ``device-type=cdrom`` vbd whose backend never connects (no blkback on
    this host): the frontend declines it, boot completes well within the hold,
    and an unknown shutdown command is left unacknowledged."""
    cfg = _cfg(
        tmp_path,
        "xb2",
        "boot_hold_s = 20",
        'xenbus_drivers = {"vbd": "stub"}',
        'disk = ["vdev=hdc, devtype=cdrom, access=r"]',
    )
    with trio.fail_after(90), temporary_host(HOST) as host:
        topo = await _up(host)
        t0 = trio.current_time()
        domid = await _create(topo, cfg)
        reps = await _reports(host, domid, lambda r: r[0]["state"] == "running", timeout=15)
        assert trio.current_time() - t0 < 10  # far below the 20 s hold
        (dev,) = reps[0]["xenbus"]["devices"].values()
        assert dev["outcome"] == "declined" and "cdrom" in dev["why"]
        assert _log(reps[0], "PV CD-ROM declined")
        assert not _log(reps[0], "still waiting")
        async with dom0(host.host) as d:
            assert d.xs is not None
            await d.xs.write(f"/local/domain/{domid}/control/shutdown", b"foo")
            await _reports(host, domid, lambda r: r[0]["xenbus"]["control"]["ignored"] == ["foo"])
            assert await d.xs.read(f"/local/domain/{domid}/control/shutdown") == b"foo"
            assert _shutdowns(await _trace(d, domid)) == []


async def test_forced_pv_cdrom_holds_boot_until_the_timeout(tmp_path: Path) -> None:
    """Negative control: with the PV CD-ROM forced on, the frontend waits for a
    backend that never connects; the boot log says "still waiting ... for
    xenbusb_nop_confighook_cb" each second, and boot goes on at the hold's end."""
    cfg = _cfg(
        tmp_path,
        "xb3",
        "boot_hold_s = 3",
        "pv_cdrom = 1",
        'xenbus_drivers = {"vbd": "stub"}',
        'disk = ["vdev=hdc, devtype=cdrom, access=r"]',
    )
    with trio.fail_after(90), temporary_host(HOST) as host:
        topo = await _up(host)
        domid = await _create(topo, cfg)
        reps = await _reports(host, domid, lambda r: r[0]["state"] == "running", timeout=20)
        waiting = _log(reps[0], "still waiting after")
        assert len(waiting) >= 2 and all("xenbusb_nop_confighook_cb" in w for w in waiting)
        assert "device/vbd/5632" in waiting[0]
        assert reps[0]["xenbus"]["hold"].startswith("timed out after 3 s")
        (dev,) = reps[0]["xenbus"]["devices"].values()
        assert dev["outcome"] == "attaching" and dev["state"] == "Initialising"


async def test_suspend_handshake_parks_the_aps(tmp_path: Path) -> None:
    """``control/shutdown = suspend``: the ack is written, every AP parks, then
    vCPU0 issues SCHEDOP_shutdown(suspend); no AP makes a hypercall after it."""
    cfg = _cfg(tmp_path, "xb4", "vcpus = 3", "boot_hold_s = 5")
    cfg.write_text(cfg.read_text().replace("vcpus = 2\n", ""))
    with trio.fail_after(90), temporary_host(HOST) as host:
        topo = await _up(host)
        domid = await _create(topo, cfg)
        await _reports(host, domid, lambda r: all(x["state"] == "running" for x in r))
        async with dom0(host.host) as d:
            assert d.xs is not None
            await d.xs.write(f"/local/domain/{domid}/control/shutdown", b"suspend")
            reps = await _reports(host, domid, lambda r: r[0]["state"] == "suspended")
            assert await d.xs.read(f"/local/domain/{domid}/control/shutdown") == b""
            (attempt,) = reps[0]["xenbus"]["control"]["suspends"]
            assert attempt["parked"] == [1, 2] and attempt["rc"] == 0
            with trio.fail_after(5):  # the APs' report files follow within 0.1 s
                while [
                    (report.read(host.host.rundir, domid, v) or {}).get("state") for v in (1, 2)
                ] != ["parked"] * 2:
                    await trio.sleep(0.05)
            trace = await _trace(d, domid)
            (sd,) = _shutdowns(trace)
            assert sd.vcpu == 0 and hc.SchedShutdown.unpack(sd.arg).reason == SHUTDOWN.suspend
            await trio.sleep(0.3)
            later = [e for e in await _trace(d, domid) if e.vcpu != 0 and e.seq > sd.seq]
            assert later == []
            listed = (await d.hv.call(ctl.ListDomains())).domains
            assert [i.shutdown_reason for i in listed if i.domid == domid] == [SHUTDOWN.suspend]
