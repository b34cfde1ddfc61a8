"""A host's run files: the pid file, logs, ipc sockets and guest RAM in /dev/shm,
and the /proc look-ups that let ``host down`` clean up after a dead supervisor.

The pid file ``<rundir>/supervisor.pid`` has one ``NAME PID START`` line per process,
the supervisor first, so it reads with ``awk`` too::

    # domsplit host alpha, topology /work/main/deploy/demo.toml
    # NAME PID START (clock ticks after boot, /proc/PID/stat field 22)
    supervisor 4242 1093321
    hypervisor 4243 1093340
    xenstore 4244 1093341

A PID is only ever signalled from the pid file after checking that the
process still has the recorded start time (PIDs get reused).
"""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

import attrs

from services.xenstore.journal import state_files
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
    """The recorded processes of one host: ``processes`` maps a name to its
    PID, ``started`` to its start time (so a reused PID is never taken for it)."""

    topology: Path
    processes: dict[str, int]
    started: dict[str, int]

    @property
    def supervisor(self) -> int | None:
        return self.processes.get("supervisor")

    def services(self) -> dict[str, int]:
        return {n: p for n, p in self.processes.items() if n != "supervisor"}

    def is_live(self, name: str) -> bool:
        """The process recorded as ``name`` is still running (same PID, same start)."""
        pid = self.processes.get(name)
        return pid is not None and is_alive(pid) and start_time(pid) == self.started.get(name)

    def live_pids(self) -> list[int]:
        """Recorded processes still running: services first, the supervisor last."""
        names = [*self.services(), "supervisor"]
        return [self.processes[n] for n in names if self.is_live(n)]


def write_pid_file(host: Host, topology: Path, processes: dict[str, int]) -> None:
    """Replace the pid file atomically (a reader never sees half of it)."""
    path = pid_file(host)
    lines = [f"# domsplit host {host.name}, topology {topology}"]
    lines += ["# NAME PID START (clock ticks after boot, /proc/PID/stat field 22)"]
    lines += [f"{name} {pid} {start_time(pid) or 0}" for name, pid in processes.items()]
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
    started: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("# domsplit host"):
            topology = Path(line.partition(", topology ")[2].strip())
            continue
        fields = line.split()
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            processes[fields[0]] = int(fields[1])
            started[fields[0]] = int(fields[2])
    return PidFile(topology, processes, started)


# --- processes through /proc --------------------------------------------------


def cmdline(pid: int) -> str:
    """The command line of ``pid`` with spaces between arguments ("" if gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, UnicodeDecodeError):
        return ""


def _stat_fields(pid: int) -> list[str]:
    """``/proc/PID/stat`` from field 3 (state) on; [] if the process is gone.
    (The command name before it is parenthesised and may hold spaces.)"""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def is_alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie waiting for its parent."""
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks after boot (None if it is gone)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if len(fields) > 19 else None


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


def guest_reports(host: Host) -> list[Path]:
    """The guests' reports (``guests/dom<D>/vcpu<K>.json``)."""
    return list((host.rundir / "guests").glob("dom*/vcpu*.json"))


def remove_run_files(host: Host) -> list[Path]:
    """Remove every socket and FIFO under the host's run dir (a dom0 process
    killed with SIGKILL leaves its event-channel device), the pid file, the
    host's guest RAM files in /dev/shm, xenstored's journal and snapshot and
    the guests' reports (they describe domains that died with the hypervisor:
    a host starts with an empty store, as xencommons wipes the tdb at boot,
    and a new domain 1 must not be taken for the old one by its report;
    xenstored restarted on its own keeps them); keep the logs. Returns what
    it removed."""
    removed = []
    candidates = [p for p in host.rundir.rglob("*") if _is_socket(p) or _is_fifo(p)]
    candidates += [pid_file(host), *shm_files(host), *state_files(host.rundir)]
    candidates += guest_reports(host)
    for path in candidates:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path)
    return removed


def _is_fifo(path: Path) -> bool:
    try:
        return stat.S_ISFIFO(path.lstat().st_mode)
    except OSError:
        return False


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

    killed: tuple[int, ...]  # recorded processes that were still running
    survivors: tuple[int, ...]  # of those, still alive after SIGKILL
    removed: tuple[Path, ...]  # run files removed


def cleanup_from_pid_file(host: Host, grace: float) -> Cleanup:
    """``host down`` without a supervisor: SIGTERM every recorded process
    still ours (services first), SIGKILL after ``grace``, remove run files."""
    recorded = read_pid_file(host)
    pids = recorded.live_pids() if recorded is not None else []
    for pid in pids:
        signal_pid(pid, signal.SIGCONT)  # a paused process cannot act on SIGTERM
        signal_pid(pid, signal.SIGTERM)
    left = wait_gone(pids, grace)
    for pid in left:
        signal_pid(pid, signal.SIGKILL)
    survivors = wait_gone(left, 5.0)
    removed = remove_run_files(host)
    return Cleanup(tuple(pids), tuple(survivors), tuple(removed))
