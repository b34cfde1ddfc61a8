"""The topology file's parsing rules (shared/topology.py), one test per rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.topology import SERVICE_MODULES, SERVICES, TopologyError, load, parse

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def test_defaults_for_a_bare_host() -> None:
    topo = parse("[hosts.alpha]\n")
    host = topo.host("alpha")
    assert topo.rundir == Path("/tmp/domsplit")
    assert host.rundir == Path("/tmp/domsplit/alpha")
    assert host.address == "127.0.0.1"
    assert host.services == SERVICES
    for service in SERVICES:
        assert host.endpoint(service) == f"ipc:///tmp/domsplit/alpha/{service}.sock"
    assert host.supervisor_endpoint == "ipc:///tmp/domsplit/alpha/supervisor.sock"
    assert host.xenstored_path == Path("/tmp/domsplit/alpha/xenstored.socket")


def test_every_service_has_a_module() -> None:
    assert set(SERVICES) == set(SERVICE_MODULES)


def test_run_dir_address_services_and_endpoints_override() -> None:
    topo = parse(
        """
        [run]
        dir = "/srv/ds"
        [hosts.beta]
        address = "10.0.0.2"
        services = ["hypervisor", "migration"]
        [hosts.beta.endpoints]
        migration = "tcp://10.0.0.2:7712"
        """
    )
    host = topo.host("beta")
    assert host.rundir == Path("/srv/ds/beta")
    assert host.address == "10.0.0.2"
    assert host.services == ("hypervisor", "migration")
    assert host.endpoint("hypervisor") == "ipc:///srv/ds/beta/hypervisor.sock"
    assert host.endpoint("migration") == "tcp://10.0.0.2:7712"


def test_a_service_the_host_does_not_run_has_no_endpoint() -> None:
    host = parse('[hosts.a]\nservices = ["hypervisor"]\n').host()
    with pytest.raises(TopologyError, match="runs no xenstore"):
        host.endpoint("xenstore")


def test_host_none_is_the_first_host_and_unknown_names_are_refused() -> None:
    topo = parse("[hosts.alpha]\n[hosts.beta]\n")
    assert topo.host().name == "alpha"
    assert topo.host(None).name == "alpha"
    assert topo.host("beta").name == "beta"
    with pytest.raises(TopologyError, match="no host 'gamma'"):
        topo.host("gamma")


def test_unknown_service_is_refused() -> None:
    with pytest.raises(TopologyError, match="unknown services.*qemu"):
        parse('[hosts.alpha]\nservices = ["hypervisor", "qemu"]\n')


@pytest.mark.parametrize(
    "endpoint", ["udp://127.0.0.1:7711", "inproc://migration", "/tmp/x.sock", "ipc:/x", ""]
)
def test_endpoint_must_be_ipc_or_tcp(endpoint: str) -> None:
    with pytest.raises(TopologyError, match="not ipc:// or tcp://"):
        parse(f'[hosts.alpha.endpoints]\nmigration = "{endpoint}"\n')


@pytest.mark.parametrize(
    "text",
    ["", '[run]\ndir = "/tmp/x"\n', "hosts = 3\n", "[hosts]\n"],
    ids=["empty", "run-only", "hosts-not-a-table", "no-host-tables"],
)
def test_a_topology_needs_a_host(text: str) -> None:
    with pytest.raises(TopologyError, match="at least one"):
        parse(text)


def test_not_toml_is_a_topology_error() -> None:
    with pytest.raises(TopologyError, match="not TOML"):
        parse("[hosts.alpha\n")


def test_missing_file_is_a_topology_error(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read"):
        load(tmp_path / "absent.toml")


def test_load_remembers_its_source(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text("[hosts.alpha]\n")
    assert load(path).source == path


def test_shipped_topologies_parse() -> None:
    demo = load(DEPLOY / "demo.toml")
    assert list(demo.hosts) == ["alpha"]
    assert demo.host().endpoint("migration") == "tcp://127.0.0.1:7711"
    two = load(DEPLOY / "two-hosts.toml")
    assert list(two.hosts) == ["alpha", "beta"]
    assert two.host("beta").endpoint("migration") == "tcp://127.0.0.1:7712"
    assert two.host("alpha").rundir != two.host("beta").rundir
