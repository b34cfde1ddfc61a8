"""Messages of the hypervisor's control channel (tags 230-249) and of the
vCPU process protocol.

Dom0 clients (toolstack, backends, tests) first prove they are dom0 with
:class:`Dom0Hello` (the host secret). A vCPU process introduces itself with
:class:`VcpuHello` and the token the hypervisor put on its command line, which
binds its connection to that one (domid, vCPU): every hypercall it then sends
acts as that vCPU, whatever it claims.
"""

from __future__ import annotations

from services.hypervisor.accounting import VcpuStats
from services.hypervisor.domain_state import DomainInfo
from services.hypervisor.evtchn_state import ChannelRecord
from services.hypervisor.gnttab_state import GrantInUse
from shared.codec import message


@message(230)
class Dom0Hello:
    secret: str


@message(231)
class CreateDomain:
    """Build a domain and spawn one process per vCPU from ``vcpu_command``.

    ``vcpu_command`` items may hold ``{domid}``, ``{vcpu}``, ``{host}`` and
    ``{rundir}``; the hypervisor appends ``--hypervisor ENDPOINT --domid D
    --vcpu K --token T``. The domain starts paused: vCPU0 runs on unpause,
    the others when vCPU0 brings them up (``VCPUOP_up``)."""

    name: str
    memory_pages: int
    vcpus: int
    personality: str = "xen"  # bare | xen-legacy | xen
    feature_mask: int = 0xFFFFFFFF
    vcpu_command: tuple[str, ...] = ()
    time_offset: int = 0


@message(232)
class DomainCreated:
    """``tokens`` bind a connection to each vCPU (dom0 may act as the guest's
    vCPUs itself when it asked for no processes, as tests do)."""

    domid: int
    memory_path: str
    vcpu_pids: tuple[int, ...]
    tokens: tuple[str, ...]


@message(233)
class DestroyDomain:
    domid: int


@message(234)
class DomainDestroyed:
    domid: int
    leftovers: dict[str, int]


@message(235)
class UnpauseDomain:
    domid: int


@message(236)
class PauseDomain:
    domid: int


@message(237)
class ListDomains:
    pass


@message(238)
class DomainList:
    domains: tuple[DomainInfo, ...]


@message(239)
class DomainDetailRequest:
    domid: int


@message(240)
class DomainDetail:
    """The introspection view: info, event channel table, grants in use,
    per-vCPU exits and upcalls, the vCPU processes."""

    info: DomainInfo
    channels: tuple[ChannelRecord, ...]
    grants: tuple[GrantInUse, ...]
    vcpus: tuple[VcpuStats, ...]
    vcpu_pids: tuple[int, ...]
    name: str
    vcpu_online: tuple[bool, ...] = ()


@message(241)
class VcpuHello:
    domid: int
    vcpu: int
    token: str


@message(242)
class VcpuWelcome:
    """What a vCPU process needs to run: its domain's RAM file and shape."""

    domid: int
    vcpu: int
    nr_vcpus: int
    memory_path: str
    nr_pages: int
    personality: str
    host: str


@message(243)
class VcpuStart:
    """One-way to a vCPU process: run (unpause, or ``VCPUOP_up`` by vCPU0)."""

    vcpu: int


@message(244)
class VcpuStop:
    """One-way to a vCPU process: stop running (``VCPUOP_down``, pause)."""

    vcpu: int


@message(245)
class ShutdownDomain:
    """The toolstack shuts a domain down with a ``SHUTDOWN`` reason (as
    ``SCHEDOP_remote_shutdown``)."""

    domid: int
    reason: int


@message(246)
class Done:
    """A plain success answer to a control request."""

    value: int = 0


@message(247)
class EvtchnNotify:
    """One-way to a dom0 process: these of its ports fired (``/dev/xen/evtchn``)."""

    ports: tuple[int, ...]


@message(248)
class TraceEntry:
    """One exit of a domain's vCPU, in order: ``name`` is the exit reason
    (``hypercall:vcpu_op.set_singleshot_timer``, ``cpuid``, ``icr_write``...),
    ``arg`` the argument bytes as the guest passed them (for ``VcpuOp`` the
    target vCPU id is ``target``), ``rc`` the result."""

    seq: int
    vcpu: int
    name: str
    target: int
    arg: bytes
    rc: int


@message(249)
class TraceRequest:
    """The recorded exits of ``domid`` (``clear`` forgets them after)."""

    domid: int
    clear: bool = False


@message(256)
class Trace:
    entries: tuple[TraceEntry, ...]
    dropped: int


@message(257)
class VcpuDoorbell:
    """From a bound vCPU process: kick me through this FIFO (next to the
    domain's RAM file, see :mod:`shared.doorbell`) rather than by nng message;
    with ``sends``, take the ports I post ``EVTCHNOP_send`` on from that FIFO
    (:func:`shared.doorbell.sends_path`, records of :mod:`shared.evtchn_dev`)."""

    path: str
    sends: str = ""


@message(258)
class Dom0EvtchnDevice:
    """From a dom0 process: its event-channel device FIFOs (see
    :mod:`shared.evtchn_dev`): fired ports to ``fired``, sends from ``send``."""

    fired: str
    send: str
