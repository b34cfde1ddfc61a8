"""The guest's configuration: the JSON file named by ``--config``.

Keys (all optional except ``vcpus``; the toolstack writes it from the xl.cfg):

=====================  ==========================================================
``name``               domain name (reports and logs)
``vcpus``              number of vCPUs (must match the domain)
``memory``             MiB (informational: the kernel checks the RAM it maps)
``platform``           the personality the toolstack asked for (informational:
                       the kernel detects the platform itself)
``rundir``             the hypervisor's run dir: reports go to
                       ``<rundir>/guests/dom<D>/vcpu<K>.json``, control sockets
                       to ``ipc://<rundir>/guests/dom<D>/vcpu<K>.sock``
``timer``              ``{"slop_ns": 100000, "min_period_ns": 100000,
                       "sshot_future": true, "etime_backoff": false}``
``nmi``                ``"evtchn"`` (FB10: STOP_HARD over an event channel, maskable)
                       or ``"send_nmi"`` (``VCPUOP_send_nmi``, FreeBSD r354637)
``platform_pci_irq``   IRQ of the Xen platform PCI device (legacy callback:
                       < 16 gives a GSI callback, else PCI INTx); default 28
``device_ports``       unbound ports (remote dom0) allocated on vCPU0 before SMP
                       start, as frontends do: an event source binds to them
``device_work_us``     the handler's busy work per event on a device port (50)
``boot_hold_s``        how long boot waits for the xenbus frontends to connect (5.0);
                       then it goes on without them and says so in the boot log
``xenbus_drivers``     ``{"vbd": "package.module:Class"}``: frontend drivers to use
                       (besides those registered in :mod:`.xenbus`); ``"stub"``
                       is the reference driver :mod:`.xbstub`
``pv_cdrom``           attach PV CD-ROMs too (default false: an HVM guest declines a
                       ``device-type=cdrom`` vbd and keeps the emulated ATAPI CD)
``workloads``          list of workload specs, run once boot finished (below)
=====================  ==========================================================

Workload specs (``kind`` selects; every field has a default):

- ``{"kind": "callouts", "vcpus": [..], "count": 200, "min_us": 200, "max_us": 5000,
  "seed": 1}`` -- callouts at random deadlines; each firing's lateness is recorded.
- ``{"kind": "timer_rate", "vcpus": [..], "interval_us": 200, "seconds": 1.0}`` -- a
  self-re-arming callout as fast as asked: events/s and exits per event.
- ``{"kind": "ipi_pingpong", "from": 0, "to": 1, "count": 200, "gap_us": 500}``
- ``{"kind": "ipi_broadcast", "from": 1, "count": 100, "gap_us": 1000}`` -- a
  rendezvous with every other CPU; latency until all acknowledged.
- ``{"kind": "busy", "vcpus": [..], "seconds": 1.0}`` -- a spinning thread.
- ``{"kind": "idle", "seconds": 1.0}`` -- just stay up (for an external event source).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

WORKLOAD_KINDS = frozenset(
    {
        "callouts",
        "timer_rate",
        "ipi_pingpong",
        "ipi_broadcast",
        "busy",
        "idle",
        "block",
        "block_raw",
    }
)


@attrs.frozen
class TimerConfig:
    slop_ns: int = 100_000
    min_period_ns: int = 100_000
    sshot_future: bool = True
    etime_backoff: bool = False  #: not FB10: double the delta on each -ETIME retry


@attrs.frozen
class KernelConfig:
    vcpus: int
    name: str = "guest"
    memory: int = 0
    platform: str = ""
    rundir: str = ""
    timer: TimerConfig = TimerConfig()
    nmi: str = "evtchn"
    platform_pci_irq: int = 28
    device_ports: int = 0
    device_work_us: int = 50
    boot_hold_s: float = 5.0
    xenbus_drivers: dict[str, str] = attrs.Factory(dict)
    pv_cdrom: bool = False
    workloads: tuple[dict[str, Any], ...] = ()

    def report_dir(self, domid: int) -> Path | None:
        return Path(self.rundir) / "guests" / f"dom{domid}" if self.rundir else None

    def control_endpoint(self, domid: int, vcpu: int) -> str | None:
        d = self.report_dir(domid)
        return f"ipc://{d}/vcpu{vcpu}.sock" if d else None


class ConfigError(ValueError):
    pass


def parse(raw: dict[str, Any]) -> KernelConfig:
    if not isinstance(raw, dict) or not isinstance(raw.get("vcpus"), int):
        raise ConfigError("a guest config is a JSON object with an integer 'vcpus'")
    timer = TimerConfig(**raw.get("timer", {}))
    if raw.get("nmi", "evtchn") not in ("evtchn", "send_nmi"):
        raise ConfigError("nmi is 'evtchn' or 'send_nmi'")
    workloads = tuple(raw.get("workloads", ()))
    for w in workloads:
        if not isinstance(w, dict) or w.get("kind") not in WORKLOAD_KINDS:
            raise ConfigError(f"unknown workload {w!r}; kinds: {sorted(WORKLOAD_KINDS)}")
    known = {f.name for f in attrs.fields(KernelConfig)}
    extra = {k: v for k, v in raw.items() if k in known and k not in ("timer", "workloads")}
    return KernelConfig(**extra, timer=timer, workloads=workloads)


def load(path: str | Path) -> KernelConfig:
    return parse(json.loads(Path(path).read_text()))
