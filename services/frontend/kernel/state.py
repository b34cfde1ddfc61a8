"""Kernel state as data: what one vCPU's kernel holds, as codec messages
(tags 400-419), so a checkpoint can carry it and a test can round-trip it.

What other CPUs must see lives in guest RAM (:mod:`.layout`): the sub-IPI
counters and mailbox indices are read from there into :class:`IpiState` when
a snapshot is taken; everything else here is the CPU's own.
"""

from __future__ import annotations

from shared.codec import message


@message(400)
class CalloutRecord:
    """One pending callout: ``cid`` (the owner's id), absolute guest-ns deadline."""

    cid: int
    deadline: int
    kind: str = ""


@message(401)
class CalloutWheelState:
    cpu: int
    pending: tuple[CalloutRecord, ...]
    fired: int = 0


@message(402)
class PortBinding:
    """A port this kernel bound: ``kind`` is ``virq`` | ``ipi`` | ``device``;
    ``index`` the VIRQ number or the IPI kind; ``vcpu`` where Xen notifies it."""

    port: int
    kind: str
    index: int
    vcpu: int
    movable: bool


@message(403)
class IpiState:
    """Sub-IPI counters (``sent[receiver][bit]`` this CPU sent, ``seen[sender][bit]``
    it took) and mailbox indices (``inbox[sender] = (prod, cons)``)."""

    cpu: int
    sent: tuple[tuple[int, ...], ...]
    seen: tuple[tuple[int, ...], ...]
    inbox: tuple[tuple[int, int], ...]
    sends: dict[str, int]
    handled: dict[str, int]


@message(404)
class UpcallState:
    """The fair scan's resume point and the per-port counters (``vmstat -i``)."""

    last_l1i: int
    last_l2i: int
    upcalls: int
    per_port: dict[int, int]
    apic: dict[int, int]
    stray: int = 0


@message(405)
class EventTimerState:
    """``kind`` ``xentimer`` (PV singleshot) or ``lapic`` (emulated); ``armed``
    is the absolute deadline armed, if any."""

    kind: str
    armed: int | None
    arms: int
    events: int
    etime_retries: int
    max_retries: int


@message(406)
class PlatformDecision:
    """What boot found and chose (guest-behaviour A.0), with the reasons."""

    xen: bool
    cpuid_base: int
    version: int
    features: int
    mode: str  #: bare | legacy | vector
    callback: int  #: the HVM_PARAM_CALLBACK_IRQ value set (0 = none)
    pv_timer: bool
    pv_ipi: bool
    pv_clock: bool
    reasons: tuple[str, ...]


@message(407)
class VcpuKernelState:
    """Everything one vCPU's kernel holds."""

    cpu: int
    platform: PlatformDecision
    wheel: CalloutWheelState
    ports: tuple[PortBinding, ...]
    ipi: IpiState
    upcall: UpcallState
    timer: EventTimerState
    counters: dict[str, int]


@message(408)
class XenbusDeviceRecord:
    """One xenbus frontend as the bus knows it (``device/<devtype>/<devid>``):
    ``otherend`` is the backend path, ``state``/``otherend_state`` the last
    ``XenbusState`` written/seen, ``outcome`` ``attaching`` | ``connected`` |
    ``closed`` | ``declined`` | ``failed`` | ``no-driver``, ``why`` the reason."""

    nodename: str
    devtype: str
    devid: int
    otherend: str
    otherend_id: int
    state: int
    otherend_state: int
    driver: str
    outcome: str
    why: str = ""
