"""The domain verbs against a live host: create, list, vcpu-list, vcpu-pin,
exits, interrupts, dmesg, destroy — processes, xenstore and cleanup checked."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import trio

from services.hypervisor.testbed import alive
from services.toolstack._domains import parse_cpulist
from services.toolstack._testing import run_cli, temporary_host

CFG = """
name = "t1"
vcpus = 2
memory = 16
platform = "xen"
kernel = "puppet"
"""


def _json(proc: subprocess.CompletedProcess) -> object:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


async def test_domain_life_cycle_through_the_cli(tmp_path) -> None:
    cfg = tmp_path / "t1.cfg"
    cfg.write_text(CFG)
    with trio.fail_after(90), temporary_host(("hypervisor", "xenstore")) as host:
        topo = ("-t", str(host.path))
        up = await run_cli("host", "up", *topo, timeout=60)
        assert up.returncode == 0, up.stderr
        created = _json(await run_cli("create", str(cfg), *topo, "--json"))
        domid = created["domid"]
        again = await run_cli("create", str(cfg), *topo)
        assert again.returncode == 1 and b"exists" in again.stderr
        listed = _json(await run_cli("list", *topo, "--json"))
        assert [(d["name"], d["vcpus"], d["state"]) for d in listed] == [
            ("Domain-0", 1, "r"),
            ("t1", 2, "r"),
        ]
        vcpus = _json(await run_cli("vcpu-list", "t1", *topo, "--json"))
        assert [v["state"] for v in vcpus] == ["online", "offline"]
        pids = [v["pid"] for v in vcpus]
        assert all(alive(p) for p in pids)
        exits = _json(await run_cli("exits", str(domid), *topo, "--json"))
        assert set(exits["vcpus"]) == {"0", "1"}
        irq = _json(await run_cli("interrupts", "t1", *topo, "--json"))
        assert set(irq["vcpus"]) == {"0", "1"}
        assert (await run_cli("dmesg", "t1", *topo)).returncode == 0
        xs = await trio.run_process(
            ["xenstore-read", f"/local/domain/{domid}/name"],
            capture_stdout=True,
            env={"XENSTORED_PATH": str(host.host.xenstored_path)},
        )
        assert xs.stdout.strip() == b"t1"
        gone = _json(await run_cli("destroy", "t1", *topo, "--json"))
        assert set(gone["leftovers"].values()) == {0}
        assert not any(alive(p) for p in pids)
        listed = _json(await run_cli("list", *topo, "--json"))
        assert [d["name"] for d in listed] == ["Domain-0"]
        missing = await run_cli("destroy", "t1", *topo)
        assert missing.returncode == 1 and b"no domain" in missing.stderr
        xs = await trio.run_process(
            ["xenstore-exists", f"/local/domain/{domid}"],
            check=False,
            env={"XENSTORED_PATH": str(host.host.xenstored_path)},
        )
        assert xs.returncode != 0


async def test_release_domain_fires_when_a_domain_shuts_down(tmp_path) -> None:
    from services.hypervisor import control as ctl
    from services.toolstack._domains import dom0
    from shared.abi.constants import SHUTDOWN

    cfg = tmp_path / "t2.cfg"
    cfg.write_text(CFG.replace('"t1"', '"t2"'))
    with trio.fail_after(90), temporary_host(("hypervisor", "xenstore")) as host:
        topo = ("-t", str(host.path))
        assert (await run_cli("host", "up", *topo, timeout=60)).returncode == 0
        domid = _json(await run_cli("create", str(cfg), *topo, "--json"))["domid"]
        async with dom0(host.host) as d:
            await d.xs.watch("@releaseDomain", "rel")
            assert await d.xs.event() == (b"@releaseDomain", b"rel")  # registration
            await d.hv.call(ctl.ShutdownDomain(domid, SHUTDOWN.poweroff))
            with trio.fail_after(10):
                assert await d.xs.event() == (b"@releaseDomain", b"rel")
            listed = (await d.hv.call(ctl.ListDomains())).domains
            assert [i.shutdown_reason for i in listed if i.domid == domid] == [SHUTDOWN.poweroff]


def _allowed(pid: int) -> set[int]:
    """The CPUs every thread of ``pid`` may run on (one set if they agree)."""
    sets = {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{pid}/task")}
    assert len(sets) == 1, sets
    return set(next(iter(sets)))


def test_cpu_lists_in_xl_syntax() -> None:
    assert parse_cpulist("1") == {1}
    assert parse_cpulist("0-2,5") == {0, 1, 2, 5}
    assert parse_cpulist("all") == set(range(os.cpu_count() or 1))
    for bad in ("", "x", "1-", "2-a", ","):
        with pytest.raises(ValueError):
            parse_cpulist(bad)


async def test_vcpu_pin_sets_the_vcpu_process_affinity(tmp_path) -> None:
    """``vcpu-pin`` pins one vCPU's process (all of its threads), then all;
    a vCPU the domain lacks or a bad CPU list is an error, nothing changed."""
    cfg = tmp_path / "t1.cfg"
    cfg.write_text(CFG)
    everything = set(range(os.cpu_count() or 1))
    with trio.fail_after(90), temporary_host(("hypervisor", "xenstore")) as host:
        topo = ("-t", str(host.path))
        assert (await run_cli("host", "up", *topo, timeout=60)).returncode == 0
        _json(await run_cli("create", str(cfg), *topo, "--json"))
        pids = [v["pid"] for v in _json(await run_cli("vcpu-list", "t1", *topo, "--json"))]
        assert [_allowed(p) for p in pids] == [everything, everything]
        pinned = _json(await run_cli("vcpu-pin", "t1", "1", "0", *topo, "--json"))
        assert pinned == [{"domid": 1, "vcpu": 1, "pid": pids[1], "cpus": [0]}]
        assert [_allowed(p) for p in pids] == [everything, {0}]
        assert (await run_cli("vcpu-pin", "t1", "7", "0", *topo)).returncode == 1
        assert (await run_cli("vcpu-pin", "t1", "0", "zero", *topo)).returncode == 1
        assert [_allowed(p) for p in pids] == [everything, {0}]
        _json(await run_cli("vcpu-pin", "t1", "all", "all", *topo, "--json"))
        assert [_allowed(p) for p in pids] == [everything, everything]
