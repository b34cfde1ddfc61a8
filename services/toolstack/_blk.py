"""Block verbs, ``xl``-like: ``block-attach``, ``block-detach``, ``block-list``,
``cd-insert``, ``cd-eject``. The toolstack only writes xenstore; blkback and
blkfront walk the xenbus states themselves (xen-reference 2.4, 2.7)."""

from __future__ import annotations

import argparse

from services.toolstack import _render
from services.toolstack._domains import Dom0, resolve, run_async
from services.toolstack._registry import arg, json_arg, topology_args, verb
from services.toolstack.disks import DiskSpecError, parse_disk, vdev_number
from services.toolstack.vbd import attach, change_media, detach, list_vbds
from services.xenstore.client import XsClient


def _xs(d: Dom0) -> XsClient:
    if d.xs is None:
        raise LookupError("this host runs no xenstored")
    return d.xs


# --- verbs --------------------------------------------------------------------------------


@verb("block-attach", help="attach a disk (xl disk spec) to a domain")
@arg("domain", help="domain name or id")
@arg("disk", help="disk spec, e.g. 'target=/tmp/d.img, vdev=xvdb, access=rw'")
@topology_args
@json_arg
def block_attach(args: argparse.Namespace) -> int:
    try:
        disk = parse_disk(args.disk)
    except DiskSpecError as exc:
        print(f"domsplit: error: {exc}")
        return 1

    async def body(d: Dom0) -> int:
        domid = await resolve(d, args.domain)
        devid = await attach(_xs(d), domid, disk)
        if args.json:
            _render.print_json({"domid": domid, "devid": devid, "vdev": disk.vdev})
        else:
            print(f"attached {disk.vdev} (devid {devid}) to domain {domid}")
        return 0

    return run_async(args, body)


@verb("block-detach", help="detach a disk from a domain")
@arg("domain", help="domain name or id")
@arg("vdev", help="xvdb, hdc, or the devid")
@topology_args
@json_arg
def block_detach(args: argparse.Namespace) -> int:
    async def body(d: Dom0) -> int:
        domid = await resolve(d, args.domain)
        closed = await detach(_xs(d), domid, vdev_number(args.vdev))
        if args.json:
            _render.print_json({"domid": domid, "vdev": args.vdev, "backend_closed": closed})
        else:
            print(f"detached {args.vdev}" + ("" if closed else " (backend did not close in time)"))
        return 0 if closed else 1

    return run_async(args, body)


@verb("block-list", help="a domain's virtual block devices and their xenbus states")
@arg("domain", help="domain name or id")
@topology_args
@json_arg
def block_list(args: argparse.Namespace) -> int:
    async def body(d: Dom0) -> int:
        rows = await list_vbds(_xs(d), await resolve(d, args.domain))
        if args.json:
            _render.print_json(rows)
        else:
            _render.print_rows(
                ["devid", "vdev", "devtype", "mode", "be_state", "fe_state", "target"], rows
            )
        return 0

    return run_async(args, body)


@verb("cd-insert", help="insert media into a CD-ROM drive")
@arg("domain", help="domain name or id")
@arg("vdev", help="the drive, e.g. hdc")
@arg("target", help="ISO image")
@topology_args
def cd_insert(args: argparse.Namespace) -> int:
    async def body(d: Dom0) -> int:
        await change_media(_xs(d), await resolve(d, args.domain), args.vdev, args.target)
        return 0

    return run_async(args, body)


@verb("cd-eject", help="eject the media of a CD-ROM drive")
@arg("domain", help="domain name or id")
@arg("vdev", help="the drive, e.g. hdc")
@topology_args
def cd_eject(args: argparse.Namespace) -> int:
    async def body(d: Dom0) -> int:
        await change_media(_xs(d), await resolve(d, args.domain), args.vdev, "")
        return 0

    return run_async(args, body)
