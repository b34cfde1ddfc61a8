"""The per-vCPU report file the toolstack reads (``domsplit dmesg``,
``interrupts``): ``<rundir>/guests/dom<D>/vcpu<K>.json``, rewritten atomically
(write a temporary file, ``os.replace``) whenever something changed.

Format (JSON object)::

    {"domid": 1, "vcpu": 0, "name": "g", "state": "booting|running|panic|halted",
     "updated_ns": <monotonic ns>,
     "platform": {"xen", "cpuid_base", "version", "features", "mode", "callback",
                  "pv_timer", "pv_ipi", "pv_clock", "reasons": [..]},
     "dmesg": ["[t] cpuK: line", ...],
     "event_timer": {"kind": "xentimer|lapic", "arms", "events", "etime_retries", ...},
     "ports": [{"port", "kind": "virq|ipi|device", "index", "vcpu", "movable"}],
     "interrupts": {"evtchn": {"<port>": n}, "apic": {"<vector>": n},
                    "upcalls": n, "stray": n},
     "ipi": {"sent": {"RENDEZVOUS": n, ...}, "handled": {...}, "bitmap": {"<bit>": n},
             "nmis": n},
     "device_ports": [..], "device_events": {"<port>": n},
     "exits": {"Cpuid": n, "VcpuOp": n, ...},     # the guest's own count
     "workloads": {"<name>": {...results...}}}

The hypervisor's counters (``DomainDetail``, ``TraceRequest``) are the
authoritative exit counts; ``exits`` here is what the guest believes it made.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import attrs

from services.frontend.kernel.kernel import Kernel


def build(k: Kernel, devices: list[int], workloads: dict[str, Any]) -> dict[str, Any]:
    sc = k.scanner
    return {
        "domid": k.domid,
        "vcpu": k.cpu,
        "name": k.cfg.name,
        "state": k.state,
        "updated_ns": time.monotonic_ns(),
        "platform": attrs.asdict(k.platform),
        "dmesg": list(k.dmesg),
        "event_timer": attrs.asdict(k.timer.state()) if k.timer else None,
        "ports": [attrs.asdict(b) for b in k.ports.state()],
        "interrupts": {
            "evtchn": {str(p): n for p, n in sorted(sc.per_port.items())} if sc else {},
            "apic": {str(v): n for v, n in sorted(sc.apic.items())} if sc else {},
            "upcalls": sc.upcalls if sc else 0,
            "stray": sc.stray if sc else 0,
        },
        "ipi": {
            "sent": dict(k.ipi_sent),
            "handled": dict(k.ipi_handled),
            "bitmap": {str(b): n for b, n in sorted(k.bitmap_taken.items())},
            "nmis": k.nmis,
        },
        "device_ports": devices,
        "device_events": {str(p): n for p, n in sorted(k.device_events.items())},
        "exits": dict(k.exits),
        "workloads": {name: _summary(res) for name, res in workloads.items()},
    }


def _summary(result: Any) -> Any:
    """A workload's result without its raw samples (the caller of the workload
    got those): the report is rewritten while timers run, so it stays small."""
    if isinstance(result, dict) and "samples_ns" in result:
        return {k: v for k, v in result.items() if k != "samples_ns"}
    return result


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    write_bytes_atomic(path, encode(data))


def encode(data: dict[str, Any]) -> bytes:
    # compact: json's C encoder (indent= falls back to the pure-Python one, ~1 ms
    # per report here, long enough to make a timer interrupt late)
    return json.dumps(data, separators=(",", ":")).encode()


def write_bytes_atomic(path: Path, body: bytes) -> None:
    """Write a temporary file and rename it over ``path``: readers see the old
    report or the new one. Only system calls, so a worker thread can run it
    without holding up the vCPU's interrupts (creating and renaming a file
    costs ~0.3 ms on ext4 here)."""
    # a name of its own per write: the reporter thread and the vCPU's own
    # thread may both be writing (two writers sharing one temporary file had
    # one rename fail and take the vCPU process down)
    tmp = f"{path}.tmp{os.getpid()}.{next(_WRITES)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(body)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    os.replace(tmp, path)


_WRITES = itertools.count()


def report_path(rundir: str | Path, domid: int, vcpu: int) -> Path:
    return Path(rundir) / "guests" / f"dom{domid}" / f"vcpu{vcpu}.json"


def read(rundir: str | Path, domid: int, vcpu: int) -> dict[str, Any] | None:
    try:
        return json.loads(report_path(rundir, domid, vcpu).read_text())
    except (OSError, ValueError):
        return None
