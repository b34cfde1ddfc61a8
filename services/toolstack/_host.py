"""``domsplit host ...``: bring a host's services up and down and act on one
service (the process-level faults of fault tests) through its supervisor."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from typing import Any

import trio

from services.toolstack import _render, _runfiles, supervisor
from services.toolstack._protocol import (
    HostDown,
    HostStatusReply,
    HostStatusRequest,
    KillService,
    PauseService,
    RestartService,
    StopService,
    UnpauseService,
    control_call,
)
from services.toolstack._registry import arg, group, json_arg, topology_args, topology_path, verb
from shared.topology import Host, TopologyError, load
from shared.transport import CallTimeout, PeerLost, RemoteError, open_channel

group("host", "a host's services and their supervisor")

# Transport failures of a control call, reported as "the supervisor did not answer".
CONTROL_ERRORS = (trio.TooSlowError, CallTimeout, PeerLost, RemoteError)


def fail(text: str) -> int:
    print(f"domsplit: error: {text}", file=sys.stderr)
    return 1


def load_host(args: argparse.Namespace) -> Host:
    return load(topology_path(args)).host(args.host)


def supervisor_pid(host: Host) -> int | None:
    """The PID of the live supervisor of ``host``, if there is one."""
    recorded = _runfiles.read_pid_file(host)
    if recorded is None or recorded.supervisor is None:
        return None
    if not recorded.is_live("supervisor"):
        return None
    return recorded.supervisor


def show_status(reply: HostStatusReply, as_json: bool) -> None:
    if as_json:
        _render.print_json(_render.host_json(reply))
    else:
        _render.console().print(_render.host_table(reply))


# --- host up --------------------------------------------------------------------


@verb("host up", help="start a host's services under a supervisor (detached unless --foreground)")
@arg("topology_file", nargs="?", metavar="TOPOLOGY", help="topology file (same as --topology)")
@topology_args
@arg("--foreground", action="store_true", help="be the supervisor: run until Ctrl-C or host down")
@arg(
    "--timeout",
    type=float,
    default=supervisor.READY_TIMEOUT,
    help="seconds each service gets to answer Ping",
)
@json_arg
def host_up(args: argparse.Namespace) -> int:
    path = topology_path(args)
    try:
        topo = load(path)
        host = topo.host(args.host)
        supervisor.claim_host(host)
    except (TopologyError, supervisor.AlreadyUp) as exc:
        return fail(str(exc))
    if args.foreground:
        try:
            trio.run(lambda: supervisor.run(topo, host.name, ready_timeout=args.timeout))
        except (supervisor.StartFailed, supervisor.AlreadyUp) as exc:
            return fail(str(exc))
        return 0
    log = _runfiles.log_file(host, "supervisor")
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "services.toolstack", "host", "up", str(path)]
    command += ["--host", host.name, "--foreground", "--timeout", str(args.timeout)]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    reply = trio.run(_wait_up, proc, host, args.timeout + 10.0)
    if reply is None:
        if proc.poll() is None:  # up but not answering: let it clean up after itself
            proc.terminate()
            proc.wait(timeout=supervisor.GRACE * 2 + 5)
        return fail(f"host {host.name} did not come up; {log}:\n{_runfiles.log_tail(log, 30)}")
    show_status(reply, args.json)
    return 0


async def _wait_up(proc: subprocess.Popen, host: Host, timeout: float) -> HostStatusReply | None:
    """The supervisor's first status, once it serves its control endpoint
    (which it does only after every service answered Ping); None if it exits
    or ``timeout`` passes first."""
    async with open_channel(host.supervisor_endpoint) as chan:
        with trio.move_on_after(timeout):
            while proc.poll() is None:
                if chan.connected:
                    try:
                        return await chan.call(HostStatusRequest(), timeout=2.0)
                    except (CallTimeout, PeerLost, RemoteError):
                        pass
                await trio.sleep(0.05)
    return None


# --- host status / env ----------------------------------------------------------


@verb("host status", help="every service of the host: state, pid, uptime, requests")
@topology_args
@json_arg
def host_status(args: argparse.Namespace) -> int:
    try:
        host = load_host(args)
    except TopologyError as exc:
        return fail(str(exc))
    pid = supervisor_pid(host)
    if pid is None:
        stale = _runfiles.read_pid_file(host) is not None
        if args.json:
            _render.print_json({"host": host.name, "up": False, "stale_pid_file": stale})
        else:
            hint = " (stale pid file: run host down)" if stale else ""
            print(f"host {host.name} is down{hint}")
        return 1
    try:
        reply = trio.run(control_call, host.supervisor_endpoint, HostStatusRequest(), 5.0)
    except CONTROL_ERRORS as exc:
        return fail(f"supervisor pid {pid} of host {host.name} did not answer: {exc}")
    show_status(reply, args.json)
    return 0


@verb("host env", help="shell exports for Xen's tools, for eval: XENSTORED_PATH")
@topology_args
@json_arg
def host_env(args: argparse.Namespace) -> int:
    try:
        host = load_host(args)
    except TopologyError as exc:
        return fail(str(exc))
    env = {"XENSTORED_PATH": str(host.xenstored_path)}
    if args.json:
        _render.print_json(env)
    else:
        for name, value in env.items():
            print(f"export {name}={shlex.quote(value)}")
    return 0


# --- host down ------------------------------------------------------------------


@verb("host down", help="stop every service, remove sockets, pid file and /dev/shm files")
@topology_args
@json_arg
def host_down(args: argparse.Namespace) -> int:
    try:
        host = load_host(args)
    except TopologyError as exc:
        return fail(str(exc))
    pid = supervisor_pid(host)
    recorded = _runfiles.read_pid_file(host)
    via = "none" if recorded is None else "pid-file"
    if pid is not None:
        try:
            trio.run(control_call, host.supervisor_endpoint, HostDown(), supervisor.GRACE * 2 + 10)
            via = "supervisor"
        except CONTROL_ERRORS as exc:
            print(f"domsplit: supervisor pid {pid} did not stop the host ({exc})", file=sys.stderr)
        _runfiles.wait_gone([pid], 10.0)
    # Whatever the supervisor left (or all of it, if it is dead): by PID.
    cleanup = _runfiles.cleanup_from_pid_file(host, supervisor.GRACE)
    if via == "supervisor" and cleanup.killed:
        via = "pid-file"
    result: dict[str, Any] = {
        "host": host.name,
        "was_up": recorded is not None,
        "via": via,
        "killed": list(cleanup.killed),
        "survivors": list(cleanup.survivors),
        "removed": [str(p) for p in cleanup.removed],
    }
    if args.json:
        _render.print_json(result)
    elif recorded is None:
        print(f"host {host.name} was not up")
    else:
        how = {"supervisor": "stopped by its supervisor", "pid-file": "killed from the pid file"}
        print(f"host {host.name} is down ({how[via]})")
    if cleanup.survivors:
        return fail(f"processes still alive after SIGKILL: {list(cleanup.survivors)}")
    return 0


# --- one service ------------------------------------------------------------------


def _service_verb(words: str, request: type, help: str) -> None:
    @verb(words, help=help)
    @arg("service", help="service name, as in the topology")
    @topology_args
    @json_arg
    def act(args: argparse.Namespace) -> int:
        try:
            host = load_host(args)
        except TopologyError as exc:
            return fail(str(exc))
        if supervisor_pid(host) is None:
            return fail(f"host {host.name} is not up")
        timeout = supervisor.GRACE * 2 + supervisor.READY_TIMEOUT + 10
        try:
            state = trio.run(control_call, host.supervisor_endpoint, request(args.service), timeout)
        except RemoteError as exc:
            return fail(f"{words} {args.service}: {exc.text}")
        except CONTROL_ERRORS as exc:
            return fail(f"the supervisor of host {host.name} did not answer: {exc}")
        if args.json:
            _render.print_json(_render.service_json(state))
        else:
            print(_render.service_line(state))
        return 0


_service_verb("host kill", KillService, "SIGKILL one service by PID (it stays dead until restart)")
_service_verb("host restart", RestartService, "stop one service if alive, start it, wait for Ping")
_service_verb(
    "host stop", StopService, "stop one service cleanly (ShutdownRequest, SIGTERM, SIGKILL)"
)
_service_verb("host pause", PauseService, "SIGSTOP one service")
_service_verb("host unpause", UnpauseService, "SIGCONT a paused service")
