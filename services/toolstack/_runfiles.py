"""A host's run files: the pid file, logs, ipc sockets and guest RAM in /dev/shm,
and the /proc look-ups that let ``host down`` clean up after a dead supervisor.

The pid file ``<rundir>/supervisor.pid`` has one ``NAME PID`` line per process,
the supervisor first, so it reads with ``awk`` too::

    # domsplit host alpha, topology /work/main/deploy/demo.toml
    supervisor 4242
    hypervisor 4243
    xenstore 4244

A PID is only ever signalled from the pid file after checking that its
``/proc/PID/cmdline`` still names the topology file (PIDs get reused).
"""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

import attrs

from shared.topology import Host

PID_FILE = "supervisor.pid"
LOG_DIR = "logs"
SHM_DIR = Path("/dev/shm")


def pid_file(host: Host) -> Path:
    return host.rundir / PID_FILE


def log_dir(host: Host) -> Path:
    return host.rundir / LOG_DIR


def log_file(host: Host, process: str) -> Path:
    """stdout and stderr of ``process`` (a service name or ``supervisor``)."""
    return log_dir(host) / f"{process}.log"


def shm_files(host: Host) -> list[Path]:
    """Guest RAM files of this host: ``/dev/shm/domsplit-<host>-*``."""
    return sorted(SHM_DIR.glob(f"domsplit-{host.name}-*"))


@attrs.frozen
class PidFile:
    """The recorded PIDs of one host: ``processes`` maps a name to its PID."""

    topology: Path
    processes: dict[str, int]

    @property
    def supervisor(self) -> int | None:
        return self.processes.get("supervisor")

    def services(self) -> dict[str, int]:
        return {n: p for n, p in self.processes.items() if n != "supervisor"}


def write_pid_file(host: Host, topology: Path, processes: dict[str, int]) -> None:
    """Replace the pid file atomically (a reader never sees half of it)."""
    path = pid_file(host)
    lines = [f"# domsplit host {host.name}, topology {topology}"]
    lines += [f"{name} {pid}" for name, pid in processes.items()]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def read_pid_file(host: Host) -> PidFile | None:
    """The pid file of ``host``, or None if there is none (the host is down)."""
    try:
        text = pid_file(host).read_text()
    except FileNotFoundError:
        return None
    topology = Path()
    processes: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            _, _, rest = line.partition(", topology ")
            topology = Path(rest.strip()) if rest else topology
            continue
        name, _, pid = line.partition(" ")
        if pid.strip().isdigit():
            processes[name] = int(pid)
    return PidFile(topology, processes)


# --- processes through /proc --------------------------------------------------


def cmdline(pid: int) -> str:
    """The command line of ``pid`` with spaces between arguments ("" if gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, UnicodeDecodeError):
        return ""


def is_alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie waiting for its parent."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # the state follows the parenthesised command name, which may hold spaces
    state = stat_line.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def is_ours(pid: int, topology: Path) -> bool:
    """``pid`` is alive and was started for ``topology`` (not a reused PID)."""
    return is_alive(pid) and str(topology) in cmdline(pid)


def processes_mentioning(text: str) -> list[int]:
    """Live PIDs whose command line contains ``text`` (leak checks in tests)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            pid = int(entry.name)
            if text in cmdline(pid) and is_alive(pid):
                found.append(pid)
    return found


def signal_pid(pid: int, sig: int) -> bool:
    """Send ``sig``; False if the process is already gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Poll until none of ``pids`` is alive; return those still alive after
    ``timeout``. (They are not our children: there is nothing to wait on.)"""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if is_alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [p for p in left if is_alive(p)]
    return left


# --- cleanup ------------------------------------------------------------------


def remove_run_files(host: Host) -> list[Path]:
    """Remove every socket file under the host's run dir, the pid file and the
    host's guest RAM files in /dev/shm; keep the logs. Returns what it removed."""
    removed = []
    candidates = [p for p in host.rundir.rglob("*") if _is_socket(p)]
    candidates += [pid_file(host), *shm_files(host)]
    for path in candidates:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.lstat().st_mode)
    except OSError:
        return False


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ("" if there is none)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            data = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


@attrs.frozen
class Cleanup:
    """What :func:`cleanup_from_pid_file` did."""

    killed: tuple[int, ...]  # recorded PIDs that were still alive and ours
    survivors: tuple[int, ...]  # of those, still alive after SIGKILL
    removed: tuple[Path, ...]  # run files removed


def cleanup_from_pid_file(host: Host, grace: float) -> Cleanup:
    """``host down`` without a supervisor: SIGTERM every recorded process
    still ours (services first), SIGKILL after ``grace``, remove run files."""
    recorded = read_pid_file(host)
    pids: list[int] = []
    if recorded is not None:
        order = [*recorded.services().values(), recorded.supervisor]
        pids = [p for p in order if p and is_ours(p, recorded.topology)]
    for pid in pids:
        signal_pid(pid, signal.SIGCONT)  # a paused process cannot act on SIGTERM
        signal_pid(pid, signal.SIGTERM)
    left = wait_gone(pids, grace)
    for pid in left:
        signal_pid(pid, signal.SIGKILL)
    survivors = wait_gone(left, 5.0)
    removed = remove_run_files(host)
    return Cleanup(tuple(pids), tuple(survivors), tuple(removed))
