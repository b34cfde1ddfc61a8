"""How an event-channel upcall reaches an HVM vCPU (xen-reference section 8).

A domain has one domain-wide callback, set by the guest with
``HVMOP_set_param(HVM_PARAM_CALLBACK_IRQ, value)``: the type in ``value[63:56]``
selects a GSI line, a PCI INTx pin or an IDT vector. A vCPU may in addition have
its own upcall vector (``HVMOP_set_evtchn_upcall_vector``), which takes
precedence for that vCPU. :func:`parse_callback_irq` decodes the parameter;
:func:`delivery_for` says how a kick of a given vCPU is delivered.
"""

from __future__ import annotations

import enum

import attrs

from shared.abi.constants import HVM_PARAM_CALLBACK_TYPE, callback_irq_type

# The vIOAPIC of an HVM domain has 48 pins; GSI 0 means "callback disabled".
NR_GSIS = 48
# Vectors below 0x10 are exceptions and can never carry an interrupt.
MIN_VECTOR = 0x10
# A GSI/INTx callback goes through the (not emulated) IO-APIC routing; domsplit
# names it by the vector the legacy PIC layout would give the line.
LEGACY_VECTOR_BASE = 0x20


class Via(enum.Enum):
    """The domain-wide callback type (Xen's ``HVMIRQ_callback_*``)."""

    none = "none"  #: no upcalls at all (the guest polls, or has no PV drivers)
    gsi = "gsi"  #: level on an IO-APIC line from vCPU0's upcall_pending; EOI
    pci_intx = "pci_intx"  #: same, on the platform PCI device's INTx pin
    vector = "vector"  #: injected on any vCPU, no LAPIC, no EOI
    percpu_vector = "percpu_vector"  #: per-vCPU vector through the vLAPIC; EOI


@attrs.frozen
class Callback:
    """A decoded ``HVM_PARAM_CALLBACK_IRQ``: ``via`` and the IDT ``vector`` it
    raises (``0x20 + gsi`` as a stand-in for GSI/INTx; 0 for none)."""

    via: Via = Via.none
    vector: int = 0
    gsi: int = 0  #: GSI number, or the INTx pin for pci_intx
    raw: int = 0  #: the parameter value as the guest wrote it


def parse_callback_irq(value: int, vector_supported: bool = True) -> Callback:
    """Decode an ``HVM_PARAM_CALLBACK_IRQ`` value as Xen's ``hvm_set_callback_via``.

    Xen never refuses the value: an invalid one stores the parameter and turns
    callbacks off. ``vector_supported`` is False on a platform without
    ``XENFEAT_hvm_callback_vector`` (an old Xen knew no type 2 and treated it as
    an unknown type, i.e. no callback).
    """
    kind = callback_irq_type(value)
    payload = value & ~(0xFF << 56)
    if kind == HVM_PARAM_CALLBACK_TYPE.GSI:
        if payload == 0 or payload >= NR_GSIS:
            return Callback(raw=value)
        return Callback(Via.gsi, LEGACY_VECTOR_BASE + payload, payload, value)
    if kind == HVM_PARAM_CALLBACK_TYPE.PCI_INTX:
        # Xen reads dev = (v >> 11) & 31 and intx = v & 3; the platform device's
        # pin is routed like a GSI, which domsplit names by the pin.
        intx = payload & 3
        return Callback(Via.pci_intx, LEGACY_VECTOR_BASE + 16 + intx, intx, value)
    if kind == HVM_PARAM_CALLBACK_TYPE.VECTOR and vector_supported:
        vector = payload & 0xFF
        if vector < MIN_VECTOR:
            return Callback(raw=value)
        return Callback(Via.vector, vector, 0, value)
    return Callback(raw=value)


@attrs.frozen
class Delivery:
    """How one kick of a vCPU is delivered: ``None`` from :func:`delivery_for`
    means it is not signalled at all."""

    via: Via
    vector: int
    needs_eoi: bool


def delivery_for(callback: Callback, upcall_vector: int | None, vcpu: int) -> Delivery | None:
    """Xen's ``hvm_assert_evtchn_irq``: a per-vCPU upcall vector wins; then the
    global vector callback reaches any vCPU; GSI/INTx only ever reflect vCPU0's
    ``evtchn_upcall_pending``, so a kick of any other vCPU is lost."""
    if upcall_vector is not None:
        return Delivery(Via.percpu_vector, upcall_vector, True)
    if callback.via is Via.vector:
        return Delivery(Via.vector, callback.vector, False)
    if callback.via in (Via.gsi, Via.pci_intx) and vcpu == 0:
        return Delivery(callback.via, callback.vector, True)
    return None
