"""Disk specs, virtual-device numbers, and the block verbs on a live host."""

from __future__ import annotations

import json

import pytest
import trio

from services.toolstack._testing import run_cli, temporary_host
from services.toolstack.disks import DiskSpec, DiskSpecError, attach_plan, parse_disk, vdev_number


@pytest.mark.parametrize(
    "vdev, number",
    [
        ("xvda", 51712),
        ("xvdb", 51728),
        ("xvda1", 51713),
        ("xvdq", 1 << 28 | 16 << 8),
        ("hda", 768),
        ("hdb", 3 << 8 | 1 << 6),
        ("hdc", 5632),
        ("sda", 2048),
        ("51712", 51712),
    ],
)
def test_vdev_numbers(vdev: str, number: int) -> None:
    assert vdev_number(vdev) == number


@pytest.mark.parametrize(
    "spec, disk",
    [
        ("/img,xvda,rw", DiskSpec("/img", "xvda", "w")),
        ("target=/img, vdev=xvdb, access=ro", DiskSpec("/img", "xvdb", "r")),
        ("/cd.iso, hdc, r, cdrom", DiskSpec("/cd.iso", "hdc", "r", "cdrom")),
        ("vdev=hdc, devtype=cdrom", DiskSpec("", "hdc", "r", "cdrom")),
        ("/img, xvda, format=raw", DiskSpec("/img", "xvda", "w")),
    ],
)
def test_disk_specs(spec: str, disk: DiskSpec) -> None:
    assert parse_disk(spec) == disk


@pytest.mark.parametrize(
    "spec",
    ["/img", "vdev=xvda", "/img, xvda, rwx", "/img, zzz", "/i, xvda, rw, floppy", "bogus=1, xvda"],
)
def test_bad_disk_specs(spec: str) -> None:
    with pytest.raises(DiskSpecError):
        parse_disk(spec)


def test_attach_plan_directories_and_perms() -> None:
    plan = {p: (v, perms) for p, v, perms in attach_plan(3, parse_disk("/img, xvda, rw"))}
    fe, be = "/local/domain/3/device/vbd/51712", "/local/domain/0/backend/vbd/3/51712"
    assert plan[f"{fe}/backend"] == (be, "n3 r0")
    assert plan[f"{fe}/state"] == ("1", "n3 r0")
    assert plan[f"{be}/params"] == ("/img", "n0 r3")
    assert plan[f"{be}/mode"] == ("w", "n0 r3")
    assert plan[f"{be}/frontend-id"] == ("3", "n0 r3")


async def test_block_verbs_write_what_backends_watch(tmp_path) -> None:
    cfg = tmp_path / "b1.cfg"
    iso = tmp_path / "cd.iso"
    iso.write_bytes(b"\0" * 4096)
    cfg.write_text(
        'name = "b1"\nkernel = "puppet"\n'
        f'disk = [ "{tmp_path}/d.img, xvda, rw", "vdev=hdc, devtype=cdrom" ]\n'
    )
    (tmp_path / "d.img").write_bytes(b"\0" * 65536)
    with trio.fail_after(90), temporary_host(("hypervisor", "xenstore")) as host:
        topo = ("-t", str(host.path))
        env = {"XENSTORED_PATH": str(host.host.xenstored_path)}
        assert (await run_cli("host", "up", *topo, timeout=60)).returncode == 0
        created = json.loads((await run_cli("create", str(cfg), *topo, "--json")).stdout)
        domid = created["domid"]
        rows = json.loads((await run_cli("block-list", "b1", *topo, "--json")).stdout)
        assert [(r["vdev"], r["devtype"], r["mode"], r["be_state"]) for r in rows] == [
            ("xvda", "disk", "w", "1"),
            ("hdc", "cdrom", "r", "1"),
        ]
        perms = await trio.run_process(
            ["xenstore-ls", "-p", f"/local/domain/{domid}/device/vbd"],
            capture_stdout=True,
            env=env,
        )
        assert f"n{domid},r0".encode() in perms.stdout.replace(b" ", b"")
        assert (await run_cli("cd-insert", "b1", "hdc", str(iso), *topo)).returncode == 0
        params = await trio.run_process(
            ["xenstore-read", f"/local/domain/0/backend/vbd/{domid}/5632/params"],
            capture_stdout=True,
            env=env,
        )
        assert params.stdout.strip() == str(iso).encode()
        assert (await run_cli("cd-eject", "b1", "xvda", *topo)).returncode == 1  # not a CD
        again = await run_cli("block-attach", "b1", f"{tmp_path}/d.img, xvda", *topo)
        assert again.returncode == 1
        # a backend that reaches Closed lets block-detach finish at once
        await trio.run_process(
            ["xenstore-write", f"/local/domain/0/backend/vbd/{domid}/51712/state", "6"], env=env
        )
        detached = json.loads((await run_cli("block-detach", "b1", "xvda", *topo, "--json")).stdout)
        assert detached["backend_closed"] is True
        rows = json.loads((await run_cli("block-list", "b1", *topo, "--json")).stdout)
        assert [r["vdev"] for r in rows] == ["hdc"]
