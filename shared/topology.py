"""The topology file: which hosts exist, which services each runs, and where.

A topology is TOML::

    [run]
    dir = "/tmp/domsplit"            # run directory (ipc sockets, pid files, logs)

    [hosts.alpha]
    address = "127.0.0.1"            # where tcp:// endpoints of this host listen
    services = ["hypervisor", "xenstore", "blkback", "netback", "migration"]

    [hosts.alpha.endpoints]          # optional overrides, per service
    migration = "tcp://127.0.0.1:7711"

    [hosts.alpha.settings]           # optional per-host knobs
    sshot_past = "etime"             # past singleshot deadline: "fire" (default) or "etime"

Every service not overridden gets ``ipc://<dir>/<host>/<service>.sock``;
xenstored also gets a Unix socket for Xen's own tools at
``<dir>/<host>/xenstored.socket`` (what ``XENSTORED_PATH`` names), and the
supervisor a control endpoint ``ipc://<dir>/<host>/supervisor.sock``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import attrs

SERVICES = ("hypervisor", "xenstore", "blkback", "netback", "migration")

# What `python -m` runs for each service name.
SERVICE_MODULES = {
    "hypervisor": "services.hypervisor",
    "xenstore": "services.xenstore",
    "blkback": "services.backend.blkback",
    "netback": "services.backend.netback",
    "migration": "services.migration",
}


class TopologyError(ValueError):
    """The topology file is not usable; the message says why."""


@attrs.frozen
class Host:
    name: str
    address: str
    services: tuple[str, ...]
    endpoints: dict[str, str]
    rundir: Path
    settings: dict[str, object] = attrs.Factory(dict)  #: [hosts.NAME.settings]

    def endpoint(self, service: str) -> str:
        """The nng endpoint of ``service`` on this host."""
        if service not in self.endpoints and service not in self.services:
            raise TopologyError(f"host {self.name} runs no {service}")
        return self.endpoints[service]

    @property
    def supervisor_endpoint(self) -> str:
        return f"ipc://{self.rundir}/supervisor.sock"

    @property
    def xenstored_path(self) -> Path:
        """The Unix socket Xen's tools reach through ``XENSTORED_PATH``."""
        return self.rundir / "xenstored.socket"


@attrs.frozen
class Topology:
    rundir: Path
    hosts: dict[str, Host]
    source: Path | None = None

    def host(self, name: str | None = None) -> Host:
        """The named host, or the only/first one when ``name`` is None."""
        if name is None:
            return next(iter(self.hosts.values()))
        try:
            return self.hosts[name]
        except KeyError:
            raise TopologyError(f"no host {name!r} in the topology") from None


def parse(text: str, source: Path | None = None) -> Topology:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(f"not TOML: {exc}") from None
    rundir = Path(doc.get("run", {}).get("dir", "/tmp/domsplit"))
    hosts_doc = doc.get("hosts")
    if not isinstance(hosts_doc, dict) or not hosts_doc:
        raise TopologyError("a topology needs at least one [hosts.NAME] table")
    hosts = {}
    for name, h in hosts_doc.items():
        services = tuple(h.get("services", SERVICES))
        unknown = [s for s in services if s not in SERVICE_MODULES]
        if unknown:
            raise TopologyError(f"host {name}: unknown services {unknown}")
        host_dir = rundir / name
        endpoints = {s: f"ipc://{host_dir}/{s}.sock" for s in services}
        overrides = h.get("endpoints", {})
        for ep in overrides.values():
            if not ep.startswith(("ipc://", "tcp://")):
                raise TopologyError(f"host {name}: endpoint {ep!r} is not ipc:// or tcp://")
        endpoints.update(overrides)
        settings = dict(h.get("settings", {}))
        hosts[name] = Host(
            name, h.get("address", "127.0.0.1"), services, endpoints, host_dir, settings
        )
    return Topology(rundir, hosts, source)


def load(path: str | Path) -> Topology:
    path = Path(path)
    try:
        return parse(path.read_text(), path)
    except OSError as exc:
        raise TopologyError(f"cannot read {path}: {exc}") from None
