"""Virtual block devices as ``xl`` describes them: the disk spec syntax, the
virtual-device number, and the xenstore directories that attach one.

A disk spec is positional ``target, vdev, access, devtype`` or keyed
(``target=/img, vdev=xvda, access=rw, devtype=cdrom, format=raw``), keyed
items after positional ones as ``xl`` allows. An empty target is a CD-ROM
drive with no media.
"""

from __future__ import annotations

import re

import attrs

from shared.abi.constants import XenbusState

POSITIONAL = ("target", "vdev", "access", "devtype")
ACCESS = {"r": "r", "ro": "r", "w": "w", "rw": "w"}
DEVTYPES = ("disk", "cdrom")


class DiskSpecError(ValueError):
    """A disk spec ``xl`` would refuse; the message says why."""


@attrs.frozen
class DiskSpec:
    target: str
    vdev: str
    mode: str = "w"  # "r" or "w"
    devtype: str = "disk"
    format: str = "raw"

    @property
    def devid(self) -> int:
        return vdev_number(self.vdev)


def parse_disk(spec: str) -> DiskSpec:
    values: dict[str, str] = {}
    position = 0
    for raw in spec.split(","):
        item = raw.strip()
        if "=" in item:
            key, value = (x.strip() for x in item.split("=", 1))
            if key not in (*POSITIONAL, "format"):
                raise DiskSpecError(f"unknown disk key {key!r}")
            values[key] = value
        else:
            if position >= len(POSITIONAL):
                raise DiskSpecError(f"too many positional items in {spec!r}")
            values.setdefault(POSITIONAL[position], item)
            position += 1
    if "vdev" not in values:
        raise DiskSpecError(f"no vdev in {spec!r}")
    devtype = values.get("devtype", "disk") or "disk"
    if devtype not in DEVTYPES:
        raise DiskSpecError(f"devtype: one of {', '.join(DEVTYPES)}")
    access = values.get("access", "r" if devtype == "cdrom" else "w") or "w"
    if access not in ACCESS:
        raise DiskSpecError(f"access: r or rw, got {access!r}")
    target = values.get("target", "")
    if not target and devtype != "cdrom":
        raise DiskSpecError("a disk needs a target (only a CD-ROM drive may be empty)")
    fmt = values.get("format", "raw") or "raw"
    if fmt not in ("raw", "iso"):
        raise DiskSpecError(f"format: raw (or iso), got {fmt!r}")
    spec_ = DiskSpec(target, values["vdev"], ACCESS[access], devtype, fmt)
    vdev_number(spec_.vdev)  # validates the name
    return spec_


def _disk_index(letters: str) -> int:
    """``a`` → 0, ``z`` → 25, ``aa`` → 26 (the xl/Linux naming)."""
    n = 0
    for ch in letters:
        n = n * 26 + (ord(ch) - ord("a") + 1)
    return n - 1


def vdev_number(vdev: str) -> int:
    """The encoded virtual-device number (docs/man/xen-vbd-interface.7)."""
    m = re.fullmatch(r"(xvd|hd|sd)([a-z]+)([0-9]*)", vdev)
    if m is None:
        if vdev.isdigit():
            return int(vdev)
        raise DiskSpecError(f"vdev {vdev!r}: expected xvdX, hdX, sdX or a number")
    kind, letters, part_s = m.groups()
    disk, part = _disk_index(letters), int(part_s or 0)
    if kind == "xvd":
        if disk < 16 and part < 16:
            return 202 << 8 | disk << 4 | part
        if part > 255:
            raise DiskSpecError(f"vdev {vdev!r}: partition out of range")
        return 1 << 28 | disk << 8 | part
    if kind == "hd":
        if disk > 3 or part > 63:
            raise DiskSpecError(f"vdev {vdev!r}: hda-hdd, partitions < 64")
        return (3 << 8 | disk << 6 | part) if disk < 2 else (22 << 8 | (disk - 2) << 6 | part)
    if disk > 15 or part > 15:
        raise DiskSpecError(f"vdev {vdev!r}: sda-sdp, partitions < 16")
    return 8 << 8 | disk << 4 | part


def frontend_path(domid: int, devid: int) -> str:
    return f"/local/domain/{domid}/device/vbd/{devid}"


def backend_path(domid: int, devid: int, backend_domid: int = 0) -> str:
    return f"/local/domain/{backend_domid}/backend/vbd/{domid}/{devid}"


def attach_plan(domid: int, disk: DiskSpec, backend_domid: int = 0) -> list[tuple[str, str, str]]:
    """``(path, value, perms)`` to write in one transaction (xen-reference 2.2/2.3):
    the frontend dir owned by the guest and readable by the backend, the backend
    dir the other way round, both in state Initialising."""
    devid = disk.devid
    fe, be = frontend_path(domid, devid), backend_path(domid, devid, backend_domid)
    fe_perms, be_perms = f"n{domid} r{backend_domid}", f"n{backend_domid} r{domid}"
    init = str(int(XenbusState.Initialising))
    fe_keys = {
        "": "",
        "backend": be,
        "backend-id": str(backend_domid),
        "state": init,
        "virtual-device": str(devid),
        "device-type": disk.devtype,
    }
    be_keys = {
        "": "",
        "frontend": fe,
        "frontend-id": str(domid),
        "online": "1",
        "state": init,
        "params": disk.target,
        "type": "file",
        "mode": disk.mode,
        "device-type": disk.devtype,
        "removable": "1" if disk.devtype == "cdrom" else "0",
        "bootable": "1",
        "dev": disk.vdev,
        "discard-enable": "1" if disk.mode == "w" else "0",
    }
    plan = [(f"{fe}/{k}".rstrip("/"), v, fe_perms) for k, v in fe_keys.items()]
    plan += [(f"{be}/{k}".rstrip("/"), v, be_perms) for k, v in be_keys.items()]
    return plan
