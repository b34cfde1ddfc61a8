"""What the hypervisor cores ask the outside world to do, as codec messages.

The cores never send anything: an operation returns its result plus a tuple of
*effects*, and the Trio adapter turns each effect into a message to a vCPU
process (``Upcall``, ``ApicInterrupt``, ``Wake``) or into its own bookkeeping
(``Block``, ``DomainShutdown``). Effects are registered messages (tags 200-219)
so the adapter forwards them unchanged.

Tag map of the hypervisor family (100-299, see :mod:`shared.messages`):

=========  =====================================================
100-199    hypercalls: ``100 + __HYPERVISOR_nr`` (``hypercalls``)
200-219    effects (this module)
220-249    introspection and statistics records
250-299    state that migrates (port tables, timers, vCPUs)
=========  =====================================================
"""

from __future__ import annotations

from typing import TypeAlias

import attrs

from shared.codec import message


@message(200)
class Upcall:
    """Inject the event-channel callback into ``vcpu`` of ``domid``.

    ``ports`` are the ports pending and unmasked on that vCPU at injection time
    (a hint: the guest must scan ``shared_info`` itself, as ports may become
    pending after this message was built). ``eoi`` says the interrupt came
    through the (emulated) LAPIC or IO-APIC and must be acknowledged
    (``HvmOp``-independent EOI, see ``evtchn.EventChannels.ack_upcall``);
    the global vector callback needs none. ``vector`` is the IDT vector
    (for GSI/INTx a stand-in: ``0x20 + gsi``; 0 if unknown).
    """

    domid: int
    vcpu: int
    ports: tuple[int, ...]
    vector: int
    eoi: bool


@message(201)
class ApicInterrupt:
    """The emulated LAPIC delivers ``vector`` (timer or IPI) to ``vcpu``; needs an
    EOI unless ``nmi``."""

    domid: int
    vcpu: int
    vector: int
    nmi: bool = False


@message(202)
class Wake:
    """A vCPU blocked in ``SCHEDOP_poll`` has a polled port pending (or its poll
    timed out): answer its pending ``sched_op`` with 0."""

    domid: int
    vcpu: int


@message(203)
class Block:
    """``SCHEDOP_block``/``poll``: hold the vCPU's hypercall reply until it gets an
    ``Upcall``/``ApicInterrupt``/``Wake`` (or guest time reaches ``timeout_ns``,
    0 = none; poll only)."""

    domid: int
    vcpu: int
    ports: tuple[int, ...] = ()
    timeout_ns: int = 0


@message(204)
class DomainShutdown:
    """A domain shut itself down (or was shut down) with a ``SHUTDOWN`` reason:
    the adapter tells the toolstack (``VIRQ_DOM_EXC`` is raised in dom0 too)."""

    domid: int
    reason: int


Effect: TypeAlias = Upcall | ApicInterrupt | Wake | Block | DomainShutdown
Effects: TypeAlias = tuple[Effect, ...]


@attrs.frozen
class Outcome:
    """A core operation's answer: ``value`` is 0 / a port / a handle on success or
    a negative Xen errno, ``data`` an optional OUT record, ``effects`` what to do."""

    value: int
    data: object = None
    effects: Effects = ()

    @property
    def ok(self) -> bool:
        return self.value >= 0
