"""The supervisor and the host verbs, as real processes: up, status, kill,
restart, down (and down after the supervisor itself died), a service that
does not come up, and the demo stopped with Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import trio

from services.toolstack import _runfiles
from services.toolstack._testing import CLI, ScratchHost, leftovers, run_cli, temporary_host
from services.xenstore.journal import state_files
from shared import messages
from shared.topology import SERVICES
from shared.transport import open_channel

CLEAN = {"processes": [], "sockets": [], "pid_file": [], "shm": []}


@pytest.fixture
def scratch() -> ScratchHost:
    with temporary_host() as host:
        yield host


async def ping(endpoint: str) -> messages.Pong:
    async with open_channel(endpoint) as chan:
        await chan.wait_connected(5)
        return await chan.call(messages.Ping(7), timeout=5)


async def status(scratch: ScratchHost) -> dict[str, dict]:
    result = await run_cli("host", "status", "-t", str(scratch.path), "--json")
    assert result.returncode == 0, result.stderr.decode()
    return {s["service"]: s for s in json.loads(result.stdout)["services"]}


async def cli_ok(*args: str) -> dict:
    result = await run_cli(*args, "--json")
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


async def test_up_status_kill_restart_down(scratch: ScratchHost) -> None:
    t = ("-t", str(scratch.path))
    with trio.fail_after(60):
        up = await cli_ok("host", "up", str(scratch.path))
        assert [s["service"] for s in up["services"]] == list(SERVICES)

        services = await status(scratch)
        for s in services.values():
            assert s["alive"] and s["state"] == "running", s
            assert (await ping(s["endpoint"])).pid == s["pid"]
            assert s["status"]["pid"] == s["pid"]

        old = services["xenstore"]["pid"]
        killed = await cli_ok("host", "kill", "xenstore", *t)
        assert (killed["state"], killed["alive"], killed["exit_code"]) == ("killed", False, -9)
        assert not Path(f"/proc/{old}").exists()  # SIGKILLed and reaped
        services = await status(scratch)
        assert services["xenstore"]["state"] == "killed" and not services["xenstore"]["alive"]
        assert all(s["alive"] for n, s in services.items() if n != "xenstore")

        restarted = await cli_ok("host", "restart", "xenstore", *t)
        assert restarted["alive"] and restarted["restarts"] == 1
        assert restarted["pid"] != old
        assert (await ping(restarted["endpoint"])).pid == restarted["pid"]
        services = await status(scratch)
        assert all(s["alive"] and s["state"] == "running" for s in services.values())

        paused = await cli_ok("host", "pause", "blkback", *t)
        assert (paused["state"], paused["alive"]) == ("paused", True)
        assert (await status(scratch))["blkback"]["status"] is None  # it cannot answer
        assert (await cli_ok("host", "unpause", "blkback", *t))["state"] == "running"
        stopped = await cli_ok("host", "stop", "migration", *t)
        assert (stopped["state"], stopped["alive"], stopped["exit_code"]) == ("stopped", False, 0)
        await cli_ok("host", "pause", "netback", *t)  # down must cope with a stopped process

        recorded = _runfiles.read_pid_file(scratch.host)
        assert recorded is not None and recorded.processes["xenstore"] == restarted["pid"]
        fake_ram = Path(f"/dev/shm/domsplit-{scratch.name}-guest1")
        fake_ram.write_bytes(b"\0" * 4096)

        store = [*state_files(scratch.host.rundir)]  # as a store with domains in it leaves
        report = scratch.host.rundir / "guests" / "dom1" / "vcpu0.json"  # and a guest
        report.parent.mkdir(parents=True)
        store.append(report)
        for path in store:
            path.touch()

        down = await cli_ok("host", "down", *t)
        assert down["via"] == "supervisor"
        assert _runfiles.wait_gone(list(recorded.processes.values()), 5) == []
        assert leftovers(scratch) == CLEAN
        assert not fake_ram.exists()
        assert not any(p.exists() for p in store)  # the next host starts with an empty store
        assert report.parent.exists()  # (the directory stays; logs are kept too)


async def test_down_cleans_up_after_a_dead_supervisor(scratch: ScratchHost) -> None:
    with trio.fail_after(60):
        await cli_ok("host", "up", str(scratch.path))
        await cli_ok("host", "pause", "hypervisor", "-t", str(scratch.path))
        recorded = _runfiles.read_pid_file(scratch.host)
        os.kill(recorded.supervisor, signal.SIGKILL)
        assert _runfiles.wait_gone([recorded.supervisor], 5) == []
        orphans = list(recorded.services().values())
        assert all(_runfiles.is_alive(p) for p in orphans)  # services outlive it

        result = await run_cli("host", "status", "-t", str(scratch.path), "--json")
        assert result.returncode == 1
        assert json.loads(result.stdout) == {
            "host": scratch.name,
            "up": False,
            "stale_pid_file": True,
        }

        down = await cli_ok("host", "down", "-t", str(scratch.path))
        assert down["via"] == "pid-file" and sorted(down["killed"]) == sorted(orphans)
        assert _runfiles.wait_gone(orphans, 5) == []
        assert leftovers(scratch) == CLEAN


async def test_up_names_the_service_that_does_not_come_up(scratch: ScratchHost) -> None:
    # netback cannot listen on an endpoint in a directory that does not exist.
    text = scratch.path.read_text()
    scratch.path.write_text(
        text + f'\n[hosts.{scratch.name}.endpoints]\nnetback = "ipc:///nonexistent/nb.sock"\n'
    )
    with trio.fail_after(60):
        result = await run_cli("host", "up", str(scratch.path), "--timeout", "5")
        assert result.returncode == 1
        err = result.stderr.decode()
        assert "service netback" in err and "before answering Ping" in err
        assert "netback.log" in err and "Entry not found" in err  # the tail of its log
        assert leftovers(scratch) == CLEAN


async def test_unknown_service_is_refused(scratch: ScratchHost) -> None:
    with trio.fail_after(60):
        await cli_ok("host", "up", str(scratch.path))
        result = await run_cli("host", "kill", "qemu", "-t", str(scratch.path))
        assert result.returncode == 1
        assert "runs no 'qemu'" in result.stderr.decode()
        again = await run_cli("host", "up", str(scratch.path))
        assert again.returncode == 1 and "already up" in again.stderr.decode()


async def test_demo_stops_cleanly_on_ctrl_c(scratch: ScratchHost) -> None:
    env = {**os.environ, "CI": "true"}
    # --no-guests: this is about the services and Ctrl-C; tests/test_demo_guests.py boots the guests
    cmd = [*CLI, "demo", "--topology", str(scratch.path), "--interval", "0.5", "--no-guests"]
    proc = await trio.lowlevel.open_process(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    try:
        output = b""
        with trio.fail_after(30):
            # Wait for a whole status table: the line after the last service row.
            while not _table_complete(output):
                chunk = await proc.stdout.receive_some()
                assert chunk, f"demo ended early:\n{output.decode()}"
                output += chunk
            pids = _runfiles.read_pid_file(scratch.host).processes.values()
            assert (await status(scratch)).keys() == set(SERVICES)  # host verbs see it
            proc.send_signal(signal.SIGINT)
            with trio.fail_after(10):
                while chunk := await proc.stdout.receive_some():
                    output += chunk
                assert await proc.wait() == 0, output.decode()
        assert b"stopped" in output.splitlines()[-1]
        assert _runfiles.wait_gone(list(pids), 5) == []
        assert leftovers(scratch) == CLEAN
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _table_complete(output: bytes) -> bool:
    text = output.decode(errors="replace")
    if "up, 5 services" not in text:
        return False
    table = text.split("up, 5 services", 1)[1]
    return all(f"{s} " in table and "running" in table for s in SERVICES) and "└" in table
