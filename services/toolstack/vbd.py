"""The toolstack's xenstore actions on virtual block devices: attach (both
directories in one transaction), detach (libxl's hot-unplug), list, and CD-ROM
media changes. Backend and frontend do the rest through their watches."""

from __future__ import annotations

from typing import Any

import trio

from services.toolstack.disks import (
    DiskSpec,
    DiskSpecError,
    attach_plan,
    backend_path,
    frontend_path,
    vdev_number,
)
from services.xenstore.client import XsClient, XsClientError
from shared.abi import xs_wire as w
from shared.abi.constants import XenbusState

DETACH_TIMEOUT = 10.0  # LIBXL_DESTROY_TIMEOUT


async def attach(xs: XsClient, domid: int, disk: DiskSpec) -> int:
    """Write the frontend and backend directories in one transaction."""
    while True:
        tx = await xs.transaction_start()
        try:
            if await _exists(xs, frontend_path(domid, disk.devid), tx):
                await xs.transaction_end(tx, commit=False)
                raise DiskSpecError(f"{disk.vdev} is already attached to domain {domid}")
            for path, value, perms in attach_plan(domid, disk):
                await xs.write(path, value.encode(), tx)
                perm_list = w.parse_perms(perms)
                await xs.request(w.set_perms(path, perm_list, req_id=xs.next_id(), tx_id=tx))
            await xs.transaction_end(tx)
            return disk.devid
        except XsClientError as exc:
            if exc.name != "EAGAIN":
                raise


async def _exists(xs: XsClient, path: str, tx: int = 0) -> bool:
    try:
        await xs.read(path, tx)
        return True
    except XsClientError as exc:
        if exc.name == "ENOENT":
            return False
        raise


async def detach(xs: XsClient, domid: int, devid: int) -> bool:
    """libxl's hot-unplug: backend offline + Closing, wait for Closed, remove
    both directories. True if the backend reached Closed in time."""
    be, fe = backend_path(domid, devid), frontend_path(domid, devid)
    if not await _exists(xs, be):
        raise LookupError(f"no vbd {devid} on domain {domid}")
    tx = await xs.transaction_start()
    await xs.write(f"{be}/online", b"0", tx)
    if (await xs.read(f"{be}/state", tx)) != str(int(XenbusState.Closed)).encode():
        await xs.write(f"{be}/state", str(int(XenbusState.Closing)).encode(), tx)
    await xs.transaction_end(tx)
    closed = False
    with trio.move_on_after(DETACH_TIMEOUT):
        while True:
            state = await xs.read(f"{be}/state")
            if state == str(int(XenbusState.Closed)).encode():
                closed = True
                break
            await trio.sleep(0.05)
    for path in (fe, be):
        try:
            await xs.rm(path)
        except XsClientError:
            pass
    return closed


async def list_vbds(xs: XsClient, domid: int) -> list[dict[str, Any]]:
    rows = []
    try:
        devids = await xs.directory(f"/local/domain/{domid}/device/vbd")
    except XsClientError:
        return rows
    for raw in devids:
        devid = int(raw)
        be, fe = backend_path(domid, devid), frontend_path(domid, devid)
        row: dict[str, Any] = {"devid": devid}
        for key, path in (
            ("vdev", f"{be}/dev"),
            ("target", f"{be}/params"),
            ("mode", f"{be}/mode"),
            ("devtype", f"{be}/device-type"),
            ("be_state", f"{be}/state"),
            ("fe_state", f"{fe}/state"),
        ):
            try:
                row[key] = (await xs.read(path)).decode()
            except XsClientError:
                row[key] = None
        rows.append(row)
    return rows


async def change_media(xs: XsClient, domid: int, vdev: str, target: str) -> None:
    """CD-ROM media change: the toolstack rewrites the backend's ``params``."""
    be = backend_path(domid, vdev_number(vdev))
    if (await xs.read(f"{be}/device-type")) != b"cdrom":
        raise DiskSpecError(f"{vdev} of domain {domid} is not a CD-ROM drive")
    await xs.write(f"{be}/params", target.encode())
