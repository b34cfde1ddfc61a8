"""Interrupt balancing policy (guest-behaviour C), sans-IO.

FreeBSD's ``intr_shuffle_irqs`` runs once the APs are up: round-robin over the
interrupt sources that have handlers, advancing only when an assignment
succeeded. Per-vCPU VIRQs and IPI ports are bound to their CPU for life: their
``assign_cpu`` edits only the guest's own masks and makes no hypercall. With
the legacy callback nothing moves at all (Xen would never notify vCPU != 0).
"""

from __future__ import annotations

from collections.abc import Iterable

MOVABLE_KINDS = frozenset({"device"})


def needs_hypercall(kind: str, mode: str) -> bool:
    """Whether assigning a port of ``kind`` to a CPU asks Xen (``EVTCHNOP_bind_vcpu``)."""
    return mode == "vector" and kind in MOVABLE_KINDS


def can_assign(kind: str, mode: str, cpu: int) -> bool:
    """Legacy mode refuses to move anything off CPU0 (FreeBSD: EOPNOTSUPP)."""
    return mode == "vector" or cpu == 0


def shuffle(ports: Iterable[int], nr_cpus: int, start: int = 0) -> list[tuple[int, int]]:
    """Round-robin plan ``[(port, cpu)]`` for the device ports, in port order."""
    plan, cpu = [], start % nr_cpus
    for port in sorted(ports):
        plan.append((port, cpu))
        cpu = (cpu + 1) % nr_cpus
    return plan


class Shuffler:
    """Applies a plan with the FreeBSD rule: advance only on success."""

    def __init__(self, nr_cpus: int) -> None:
        self.nr_cpus = nr_cpus
        self.cpu = 0

    def target(self) -> int:
        return self.cpu

    def assigned(self, ok: bool) -> None:
        if ok:
            self.cpu = (self.cpu + 1) % self.nr_cpus
