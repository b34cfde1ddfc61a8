"""blkfront in the guest kernel against blkback, across processes on a real
host (``domsplit host up`` + ``create``): the verifying block workload writes,
flushes and reads back a raw image, a sparse image and 1 MiB indirect
requests, and the image files are then checked byte for byte against the
stamps it reports; the PV CD-ROM (forced on) reads, refuses writes, sees
eject and insert; a never-connecting CD-ROM does not hold boot; blkback
killed and restarted under load loses nothing and completes every request once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from services.frontend.kernel import blkwork, report
from services.frontend.kernel.config import WORKLOAD_KINDS
from services.toolstack._testing import run_cli, temporary_host

DRIVER = 'xenbus_drivers = {"vbd": "services.frontend.kernel.blkfront:Blkfront"}'
FULL_HOST = ("hypervisor", "xenstore", "blkback")
MiB = 1 << 20
needs_block_workload = pytest.mark.skipif(
    "block" not in WORKLOAD_KINDS,
    reason="the 'block' workload kind is not registered in kernel config/workloads yet",
)


def _cfg(tmp: Path, name: str, *lines: str) -> Path:
    path = tmp / f"{name}.cfg"
    body = [f'name = "{name}"', "vcpus = 2", "memory = 32", 'platform = "xen"', DRIVER, *lines]
    path.write_text("\n".join(body) + "\n")
    return path


async def _up_and_create(host: Any, cfg: Path) -> tuple[tuple[str, str], int]:
    topo = ("-t", str(host.path))
    up = await run_cli("host", "up", *topo, timeout=60)
    assert up.returncode == 0, up.stderr
    made = await run_cli("create", str(cfg), *topo, "--json")
    assert made.returncode == 0, made.stderr
    return topo, json.loads(made.stdout)["domid"]


async def _vcpu0(host: Any, domid: int, check: Any, timeout: float) -> dict:
    with trio.fail_after(timeout):
        while True:
            rep = report.read(host.host.rundir, domid, 0) or {}
            if rep and check(rep):
                return rep
            await trio.sleep(0.05)


def _done(rep: dict) -> bool:
    return any("workloads done" in line for line in rep.get("dmesg", ())) or (
        rep.get("state") == "panic"
    )


def _dmesg(rep: dict, text: str) -> list[str]:
    return [line for line in rep["dmesg"] if text in line]


def _check_clean(res: dict) -> None:
    assert "error" not in res, res
    assert res["io_errors"] == 0, res["io_error_samples"]
    assert res["verify"]["errors"] == 0, res["verify"]["samples"]
    assert not res["timed_out"]


def _check_image(path: Path, res: dict, before: bytes) -> None:
    """Every block the workload wrote holds its last stamp; nothing else moved."""
    image = path.read_bytes()
    bs = res["plan"]["bs_sectors"]
    expect = bytearray(before)
    for sector, wid in res["written"]:
        expect[sector * 512 : (sector + bs) * 512] = blkwork.stamp_block(
            wid, sector, bs, res["tag"]
        )
    assert image == bytes(expect)


@needs_block_workload
@pytest.mark.timeout(300)  # a loaded machine: generous, still absolute
async def test_raw_sparse_indirect_and_cdrom(tmp_path: Path) -> None:
    raw, sparse, iso = tmp_path / "raw.img", tmp_path / "sparse.img", tmp_path / "cd.iso"
    raw_before = os.urandom(4 * MiB)
    raw.write_bytes(raw_before)
    with open(sparse, "wb") as f:
        f.truncate(64 * MiB)
    iso_before = os.urandom(MiB)
    iso.write_bytes(iso_before)
    iso2 = tmp_path / "cd2.iso"
    iso2.write_bytes(os.urandom(2 * MiB))
    cfg = _cfg(
        tmp_path,
        "bf1",
        "boot_hold_s = 60",
        "pv_cdrom = 1",
        f'disk = ["target={raw}, vdev=xvda, access=rw", "target={sparse}, vdev=xvdb, access=rw",'
        f' "target={iso}, vdev=hdc, access=r, devtype=cdrom"]',
        "workloads = ["
        '"block:name=seq,vdev=xvda,pattern=seq,op=write,bs=4096,qd=8,count=512,flush_every=16",'
        '"block:name=big,vdev=xvda,pattern=seq,op=write,bs=1048576,qd=2,count=8,start=0,'
        'span=4096,flush_every=2,seed=2",'
        '"block:name=sparse,vdev=xvdb,pattern=random,op=mixed,bs=8192,qd=16,count=400,'
        'flush_every=32,seed=3",'
        '"block:name=cdread,vdev=hdc,pattern=random,op=read,bs=2048,qd=4,count=64",'
        '"block:name=cdwrite,vdev=hdc,pattern=seq,op=write,bs=4096,qd=1,count=4,'
        'verify_after=0",'
        '"block_raw:name=rawread,vdev=xvda,op=read,bs=1048576,qd=2,count=6",'
        '"block_raw:name=rawrand,vdev=xvda,op=read,pattern=random,bs=4096,qd=8,count=64"]',
    )
    with trio.fail_after(240), temporary_host(FULL_HOST) as host:
        topo, domid = await _up_and_create(host, cfg)
        rep = await _vcpu0(host, domid, _done, timeout=180)
        res = rep["workloads"]
        devs = rep["xenbus"]["devices"]
        assert {d["outcome"] for d in devs.values()} == {"connected"}, devs

        seq = res["seq"]  # raw image: write + flush, read back, then byte for byte
        _check_clean(seq)
        assert seq["writes"] == 512 and seq["flushes"] == 32
        assert seq["verify"]["verified_after_sectors"] == 512 * 8
        assert seq["blkfront"]["flushes"] == 32 and seq["blkfront"]["bad_responses"] == 0
        assert seq["ring"]["requests_per_notify"] >= 1

        big = res["big"]  # 1 MiB requests: one INDIRECT each (256 segments)
        _check_clean(big)
        assert big["blkfront"]["indirect"] == 8 + 2  # 8 writes, 2 blocks read back
        assert big["blkfront"]["requests"] == 10 + 4  # and 4 flushes
        assert [s for s, _ in big["written"]] == [0, 2048]  # over every block seq wrote
        _check_image(raw, big, raw_before)

        sp = res["sparse"]
        _check_clean(sp)
        assert sp["reads"] > 0 and sp["writes"] > 0
        _check_image(sparse, sp, bytes(64 * MiB))

        cd = res["cdread"]
        assert cd["io_errors"] == 0 and cd["reads"] == 64
        assert cd["device"]["readonly"] and cd["device"]["cdrom"]
        cdw = res["cdwrite"]
        assert cdw["io_errors"] == 4 and all(
            "EIO" in s or "Errno 5" in s for s in cdw["io_error_samples"]
        )
        assert iso.read_bytes() == iso_before

        raw_read = res["rawread"]  # the throughput workload: one INDIRECT per 1 MiB block
        assert "error" not in raw_read and not raw_read["timed_out"], raw_read
        assert raw_read["requests"] == 6 and raw_read["mb_s"] > 0 and raw_read["failed"] == 0
        rand = res["rawrand"]  # one task keeping 8 in flight (IoContext start/reap)
        assert not rand.get("error") and not rand["timed_out"], rand
        assert (rand["requests"], rand["failed"]) == (64, 0)

        # eject and insert reach the frontend as media changes (Connected -> Connected)
        assert (await run_cli("cd-eject", "bf1", "hdc", *topo)).returncode == 0
        await _vcpu0(host, domid, lambda r: _dmesg(r, "media change: 2048 -> 0"), 45)
        assert (await run_cli("cd-insert", "bf1", "hdc", str(iso2), *topo)).returncode == 0
        await _vcpu0(host, domid, lambda r: _dmesg(r, "media change: 0 -> 4096"), 45)


async def test_never_connecting_cdrom_does_not_hold_boot(tmp_path: Path) -> None:
    """E 30: no blkback on this host; blkfront declines the PV CD-ROM (ENXIO)."""
    cfg = _cfg(tmp_path, "bf2", "boot_hold_s = 30", 'disk = ["vdev=hdc, devtype=cdrom, access=r"]')
    with trio.fail_after(60), temporary_host(("hypervisor", "xenstore")) as host:
        t0 = trio.current_time()
        _, domid = await _up_and_create(host, cfg)
        rep = await _vcpu0(host, domid, lambda r: r.get("state") == "running", timeout=20)
        assert trio.current_time() - t0 < 15
        (dev,) = rep["xenbus"]["devices"].values()
        assert dev["outcome"] == "declined" and not _dmesg(rep, "still waiting")


@needs_block_workload
@pytest.mark.timeout(300)
async def test_blkback_killed_and_restarted_under_load(tmp_path: Path) -> None:
    """2.8: the frontend reconnects with a new ring and port and re-issues what
    had no response; every request completes exactly once and verifies."""
    img = tmp_path / "d.img"
    before = os.urandom(8 * MiB)
    img.write_bytes(before)
    cfg = _cfg(
        tmp_path,
        "bf3",
        "boot_hold_s = 60",
        f'disk = ["target={img}, vdev=xvda, access=rw"]',
        'workloads = ["block:name=load,vdev=xvda,pattern=random,op=mixed,bs=4096,qd=8,'
        'count=15000,flush_every=32,timeout=60"]',
    )
    with trio.fail_after(240), temporary_host(FULL_HOST) as host:
        topo, domid = await _up_and_create(host, cfg)
        await _vcpu0(host, domid, lambda r: r.get("state") == "running", timeout=30)
        await trio.sleep(0.3)  # the workload is running
        assert (await run_cli("host", "kill", "blkback", *topo)).returncode == 0
        await trio.sleep(0.5)
        restart = await run_cli("host", "restart", "blkback", *topo, timeout=40)
        assert restart.returncode == 0, restart.stderr
        rep = await _vcpu0(host, domid, _done, timeout=180)
        res = rep["workloads"]["load"]
        _check_clean(res)
        assert res["ops"] == 15000
        bf = res["blkfront"]
        assert bf["connects"] >= 2, bf
        assert bf["bad_responses"] == 0
        # exactly once: every ring request answered once, except those re-issued
        # after the kill; every bio the workload submitted completed once
        assert bf["responses"] + bf["reissued"] == bf["requests"]
        read_back = res["verify"]["verified_after_sectors"] // 8
        assert bf["bios_done"] == res["ops"] + res["flushes"] + read_back
        assert _dmesg(rep, "reconnecting (Initialising)")
        _check_image(img, res, before)
