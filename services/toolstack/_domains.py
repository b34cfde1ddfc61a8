"""Domain verbs, ``xl``-like: ``create``, ``list``, ``destroy``, ``dmesg``,
``vcpu-list``, ``vcpu-pin``, ``interrupts``, ``exits``.

``create`` is the toolstack's part of building a domain: the hypervisor builds
it (memory, vCPU processes running the guest kernel), xenstored is told about
it (a token vouched for its domid, ``XS_INTRODUCE``, the keys libxl writes),
then the domain is unpaused. Guests report through their boot log (the vCPU
processes' output, kept by the hypervisor in ``<rundir>/logs``) and a JSON
report per vCPU in ``<rundir>/guests/dom<D>/vcpu<K>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from services.hypervisor import control as ctl
from services.toolstack import _render
from services.toolstack._host import fail, load_host
from services.toolstack._registry import arg, json_arg, topology_args, verb
from services.toolstack.disks import DiskSpecError, parse_disk
from services.toolstack.domcfg import ConfigError, DomainConfig
from services.toolstack.domcfg import load as load_config
from services.toolstack.vbd import attach
from services.xenstore.client import XsClient, open_xs_client
from services.xenstore.messages import XsVouch
from services.xenstore.messages import host_secret as xs_secret
from shared.abi import xs_wire as w
from shared.hostsecret import host_secret
from shared.topology import Host
from shared.transport import CallTimeout, Channel, PeerLost, RemoteError, open_channel

TIMEOUT = 30.0
KERNELS = {
    "generic": ("python", "-m", "services.frontend.kernel"),
    # a scripted vCPU in place of the kernel, for tests (see services/frontend/puppet.py)
    "puppet": (
        "python",
        "-m",
        "services.frontend.puppet",
        "--control",
        "ipc://{rundir}/p{domid}-{vcpu}.sock",
    ),
}
ERRORS = (
    trio.TooSlowError,
    CallTimeout,
    PeerLost,
    RemoteError,
    ConfigError,
    DiskSpecError,
    LookupError,
)


@attrs.define(eq=False)
class Dom0:
    """dom0's connections: the hypervisor, and xenstored if the host runs it."""

    host: Host
    hv: Channel
    xs: XsClient | None


@asynccontextmanager
async def dom0(host: Host) -> AsyncIterator[Dom0]:
    async with open_channel(host.endpoint("hypervisor")) as hv:
        await hv.wait_connected(timeout=5)
        await hv.call(ctl.Dom0Hello(host_secret(host.rundir)))
        if "xenstore" not in host.services:
            yield Dom0(host, hv, None)
            return
        async with open_xs_client(host.endpoint("xenstore"), 0, xs_secret(host.rundir)) as xs:
            yield Dom0(host, hv, xs)


def guest_dir(host: Host, domid: int) -> Path:
    return host.rundir / "guests" / f"dom{domid}"


async def create_domain(d: Dom0, cfg: DomainConfig) -> int:
    """Build, introduce and unpause a domain; returns its domid."""
    if cfg.name in {name for name, _ in await domain_names(d)}:
        raise ConfigError(f"a domain named {cfg.name!r} exists")
    kernel = KERNELS.get(str(cfg.extra.get("kernel", "generic")))
    if kernel is None:
        raise ConfigError(f"kernel: one of {', '.join(KERNELS)}")
    disks = [parse_disk(spec) for spec in cfg.disk]
    if disks and d.xs is None:
        raise ConfigError("disks need xenstored on the host")
    configs = d.host.rundir / "guests"
    configs.mkdir(parents=True, exist_ok=True)
    cfg_path = configs / f"{cfg.name}.json"
    token = secrets.token_hex(16)
    document = cfg.to_json() | {"rundir": str(d.host.rundir), "host": d.host.name}
    command = list(kernel)
    if kernel is KERNELS["generic"]:
        command += ["--config", str(cfg_path)]
        if d.xs is not None:
            command += ["--xenstore", d.host.endpoint("xenstore"), "--xs-token", token]
    cfg_path.write_text(json.dumps(document, indent=1))
    created = await d.hv.call(
        ctl.CreateDomain(
            cfg.name, cfg.pages, cfg.vcpus, cfg.platform, cfg.feature_mask, tuple(command)
        ),
        timeout=TIMEOUT,
    )
    domid = created.domid
    guest_dir(d.host, domid).mkdir(parents=True, exist_ok=True)
    if d.xs is not None:
        await introduce(d.xs, domid, cfg, token)
        for disk in disks:
            await attach(d.xs, domid, disk)
    await d.hv.call(ctl.UnpauseDomain(domid))
    return domid


async def introduce(xs: XsClient, domid: int, cfg: DomainConfig, token: str) -> None:
    """What libxl writes for a new domain, and the guest's right to its domid."""
    await xs.chan.call(XsVouch(domid, token.encode()))
    await xs.request(w.introduce(domid, 0, 0, req_id=xs.next_id()))
    home, vm = f"/local/domain/{domid}", f"/vm/{uuid.uuid4()}"
    keys = {
        f"{vm}/name": cfg.name,
        f"{vm}/uuid": vm.rsplit("/", 1)[1],
        f"{home}/name": cfg.name,
        f"{home}/vm": vm,
        f"{home}/memory/static-max": str(cfg.memory * 1024),
        f"{home}/memory/target": str(cfg.memory * 1024),
        f"{home}/control/platform-feature-multiprocessor-suspend": "1",
        f"{home}/control/platform-feature-xs_reset_watches": "1",
    }
    keys.update({f"{home}/cpu/{v}/availability": "online" for v in range(cfg.vcpus)})
    tx = await xs.transaction_start()
    for path, value in keys.items():
        await xs.write(path, value.encode(), tx)
    await xs.transaction_end(tx)


async def destroy_domain(d: Dom0, domid: int) -> dict[str, int]:
    gone = await d.hv.call(ctl.DestroyDomain(domid), timeout=TIMEOUT)
    if d.xs is not None:
        home = f"/local/domain/{domid}"
        try:
            vm = (await d.xs.read(f"{home}/vm")).decode()
            await d.xs.request(w.release(domid, req_id=d.xs.next_id()))
            await d.xs.rm(home)
            if vm.startswith("/vm/"):
                await d.xs.rm(vm)
        except Exception:  # noqa: BLE001  a half-built domain has no home: nothing to undo
            pass
    shutil.rmtree(guest_dir(d.host, domid), ignore_errors=True)
    return gone.leftovers


async def domain_names(d: Dom0) -> list[tuple[str, int]]:
    out = []
    for info in (await d.hv.call(ctl.ListDomains())).domains:
        detail = await d.hv.call(ctl.DomainDetailRequest(info.domid))
        out.append((detail.name, info.domid))
    return out


async def resolve(d: Dom0, dom: str) -> int:
    """A domid from a domid or a domain name."""
    names = await domain_names(d)
    if dom.isdigit() and int(dom) in {i for _, i in names}:
        return int(dom)
    for name, domid in names:
        if name == dom:
            return domid
    raise LookupError(f"no domain {dom!r}")


def reports(host: Host, domid: int) -> dict[int, dict[str, Any]]:
    """The guest's per-vCPU JSON reports (missing or half-written ones skipped)."""
    out = {}
    for path in sorted(guest_dir(host, domid).glob("vcpu*.json")):
        try:
            out[int(path.stem[4:])] = json.loads(path.read_text())
        except (ValueError, OSError):
            continue
    return out


def run_async(args: argparse.Namespace, body: Any) -> int:
    """Run ``body(dom0)`` against the host of ``args``; errors become exit 1."""
    host = load_host(args)

    async def main() -> int:
        async with dom0(host) as d:
            return await body(d)

    try:
        return trio.run(main)
    except ERRORS as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"is the host up? ({exc})")


# --- verbs --------------------------------------------------------------------------------


@verb("create", help="build a domain from an xl.cfg-style file and start it")
@arg("config", help="domain configuration file")
@topology_args
@json_arg
def create(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        return fail(str(exc))

    async def body(d: Dom0) -> int:
        domid = await create_domain(d, cfg)
        if args.json:
            _render.print_json({"domid": domid, "name": cfg.name})
        else:
            print(f"created domain {cfg.name} (id {domid})")
        return 0

    return run_async(args, body)


@verb("list", help="the domains of the host")
@topology_args
@json_arg
def list_(args: argparse.Namespace) -> int:
    async def body(d: Dom0) -> int:
        rows = []
        for info in (await d.hv.call(ctl.ListDomains())).domains:
            detail = await d.hv.call(ctl.DomainDetailRequest(info.domid))
            state = "s" if info.shutdown_reason is not None else ("p" if info.paused else "r")
            rows.append(
                {
                    "name": detail.name,
                    "domid": info.domid,
                    "memory_mib": info.nr_pages // 256,
                    "vcpus": info.nr_vcpus,
                    "online_vcpus": info.online_vcpus,
                    "state": state,
                    "platform": info.personality,
                    "shutdown_reason": info.shutdown_reason,
                }
            )
        if args.json:
            _render.print_json(rows)
        else:
            _render.print_rows(["name", "domid", "memory_mib", "vcpus", "state", "platform"], rows)
        return 0

    return run_async(args, body)


@verb("destroy", help="destroy a domain: its vCPU processes, memory, ports, grants")
@arg("domain", help="domain name or id")
@topology_args
@json_arg
def destroy(args: argparse.Namespace) -> int:
    async def body(d: Dom0) -> int:
        domid = await resolve(d, args.domain)
        leftovers = await destroy_domain(d, domid)
        if args.json:
            _render.print_json({"domid": domid, "leftovers": leftovers})
        else:
            print(f"destroyed domain {domid}")
        return 0 if not any(leftovers.values()) else 1

    return run_async(args, body)


@verb("dmesg", help="a domain's boot log (every vCPU)")
@arg("domain", help="domain name or id")
@topology_args
@json_arg
def dmesg(args: argparse.Namespace) -> int:
    async def body(d: Dom0) -> int:
        domid = await resolve(d, args.domain)
        logs = sorted((d.host.rundir / "logs").glob(f"dom{domid}-vcpu*.log"))
        lines = {p.stem.split("-")[1]: p.read_text(errors="replace").splitlines() for p in logs}
        if args.json:
            _render.print_json({"domid": domid, "vcpus": lines})
        else:
            for vcpu, text in lines.items():
                for line in text:
                    print(f"{vcpu}: {line}")
        return 0

    return run_async(args, body)


@verb("vcpu-list", help="a domain's vCPUs: state, process, exits, upcalls")
@arg("domain", help="domain name or id")
@topology_args
@json_arg
def vcpu_list(args: argparse.Namespace) -> int:
    async def body(d: Dom0) -> int:
        domid = await resolve(d, args.domain)
        detail = await d.hv.call(ctl.DomainDetailRequest(domid))
        rows = []
        for stats in detail.vcpus:
            v = stats.vcpu
            online = detail.vcpu_online[v] if v < len(detail.vcpu_online) else None
            rows.append(
                {
                    "name": detail.name,
                    "domid": domid,
                    "vcpu": v,
                    "state": "online" if online else "offline",
                    "pid": detail.vcpu_pids[v] if v < len(detail.vcpu_pids) else None,
                    "exits": sum(stats.exits.values()),
                    "upcalls": stats.upcalls,
                }
            )
        if args.json:
            _render.print_json(rows)
        else:
            _render.print_rows(["name", "domid", "vcpu", "state", "pid", "exits", "upcalls"], rows)
        return 0

    return run_async(args, body)


def parse_cpulist(text: str) -> set[int]:
    """xl's CPU list: ``all``, ``2``, ``0-3``, ``0,2-3``."""
    if text.strip() == "all":
        return set(range(os.cpu_count() or 1))
    cpus: set[int] = set()
    for item in filter(None, (x.strip() for x in text.split(","))):
        lo, dash, hi = item.partition("-")
        if not (lo.isdigit() and (not dash or hi.isdigit())):
            raise ValueError(f"{item!r} is not a CPU or a range of CPUs")
        cpus.update(range(int(lo), int(hi if dash else lo) + 1))
    if not cpus:
        raise ValueError(f"no CPU in {text!r}")
    return cpus


@verb("vcpu-pin", help="pin a domain's vCPU (or all) to host CPUs (hard affinity)")
@arg("domain", help="domain name or id")
@arg("vcpu", help="vCPU number or 'all'")
@arg("cpus", help="host CPUs: 'all', '1', '0-1', '0,2-3'")
@topology_args
@json_arg
def vcpu_pin(args: argparse.Namespace) -> int:
    """``xl vcpu-pin``: a vCPU runs only on these host CPUs. A vCPU is a
    process here, so its hard affinity is that process's CPU affinity (every
    thread of it), set through the pid the hypervisor reports."""
    try:
        cpus = parse_cpulist(args.cpus)
    except ValueError as exc:
        return fail(f"vcpu-pin: {exc}")

    async def body(d: Dom0) -> int:
        domid = await resolve(d, args.domain)
        detail = await d.hv.call(ctl.DomainDetailRequest(domid))
        pids = dict(enumerate(detail.vcpu_pids))
        if args.vcpu != "all":
            if not args.vcpu.isdigit() or int(args.vcpu) not in pids:
                return fail(f"vcpu-pin: domain {domid} has no vCPU {args.vcpu}")
            pids = {int(args.vcpu): pids[int(args.vcpu)]}
        done = []
        for vcpu, pid in pids.items():
            try:
                set_affinity(pid, cpus)
            except OSError as exc:
                return fail(f"vcpu-pin: vCPU {vcpu} (pid {pid}): {exc}")
            done.append({"domid": domid, "vcpu": vcpu, "pid": pid, "cpus": sorted(cpus)})
        if args.json:
            _render.print_json(done)
        else:
            _render.print_rows(["domid", "vcpu", "pid", "cpus"], done)
        return 0

    return run_async(args, body)


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` (nng and trio start their own) on ``cpus``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:
            pass  # a thread that just ended


@verb("interrupts", help="per-vCPU, per-port interrupt counts of a domain (vmstat -i)")
@arg("domain", help="domain name or id")
@topology_args
@json_arg
def interrupts(args: argparse.Namespace) -> int:
    async def body(d: Dom0) -> int:
        domid = await resolve(d, args.domain)
        detail = await d.hv.call(ctl.DomainDetailRequest(domid))
        guest = reports(d.host, domid)
        table = {}
        for s in detail.vcpus:
            handled = guest.get(s.vcpu, {}).get("interrupts", {})
            table[s.vcpu] = {
                "upcalls_delivered": s.upcalls,
                "ports": handled.get("evtchn", {}),
                "apic_vectors": handled.get("apic", {}),
            }
        if args.json:
            _render.print_json({"domid": domid, "vcpus": table})
        else:
            rows = [
                {"vcpu": v, "source": f"port {p}", "count": n}
                for v, t in table.items()
                for p, n in sorted(t["ports"].items(), key=lambda kv: int(kv[0]))
            ]
            rows += [
                {"vcpu": v, "source": f"apic vector {x}", "count": n}
                for v, t in table.items()
                for x, n in sorted(t["apic_vectors"].items(), key=lambda kv: int(kv[0]))
            ]
            rows += [
                {"vcpu": v, "source": "upcalls (hypervisor)", "count": t["upcalls_delivered"]}
                for v, t in table.items()
            ]
            _render.print_rows(["vcpu", "source", "count"], rows)
        return 0

    return run_async(args, body)


@verb("exits", help="per-vCPU exits by reason of a domain")
@arg("domain", help="domain name or id")
@topology_args
@json_arg
def exits(args: argparse.Namespace) -> int:
    async def body(d: Dom0) -> int:
        domid = await resolve(d, args.domain)
        detail = await d.hv.call(ctl.DomainDetailRequest(domid))
        table = {s.vcpu: dict(s.exits) for s in detail.vcpus}
        if args.json:
            _render.print_json({"domid": domid, "vcpus": table})
        else:
            reasons = sorted({r for t in table.values() for r in t})
            rows = [
                {"reason": r, **{f"vcpu{v}": t.get(r, 0) for v, t in table.items()}}
                for r in reasons
            ]
            _render.print_rows(["reason", *(f"vcpu{v}" for v in table)], rows)
        return 0

    return run_async(args, body)


async def request_shutdown(d: Dom0, domid: int, command: str, wait: float) -> int | None:
    """``xl shutdown``: write ``control/shutdown``; with ``wait``, return the
    shutdown reason once the hypervisor reports it (None on timeout)."""
    xs = d.xs
    if xs is None:
        raise LookupError("this host runs no xenstored")
    await xs.write(f"/local/domain/{domid}/control/shutdown", command.encode())
    if not wait:
        return None
    with trio.move_on_after(wait):
        while True:
            for info in (await d.hv.call(ctl.ListDomains())).domains:
                if info.domid == domid and info.shutdown_reason is not None:
                    return info.shutdown_reason
            await trio.sleep(0.05)
    return None


def _shutdown_verb(words: str, command: str, help: str) -> None:
    @verb(words, help=help)
    @arg("domain", help="domain name or id")
    @arg("--wait", type=float, default=0.0, help="seconds to wait for the guest to comply")
    @topology_args
    @json_arg
    def run(args: argparse.Namespace) -> int:
        async def body(d: Dom0) -> int:
            domid = await resolve(d, args.domain)
            reason = await request_shutdown(d, domid, command, args.wait)
            if args.json:
                _render.print_json({"domid": domid, "command": command, "reason": reason})
            elif args.wait:
                print(f"domain {domid}: " + ("done" if reason is not None else "no answer"))
            return 0 if reason is not None or not args.wait else 1

        return run_async(args, body)


_shutdown_verb("shutdown", "poweroff", "ask a domain to power off (control/shutdown)")
_shutdown_verb("reboot", "reboot", "ask a domain to reboot (control/shutdown)")
