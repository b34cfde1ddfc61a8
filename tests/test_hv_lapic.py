"""Emulated LAPIC: timer registers, IPIs through ICR, EOI ordering, exit reasons."""

from __future__ import annotations

import pytest

from services.hypervisor.effects import ApicInterrupt
from services.hypervisor.lapic import APIC, APIC_LVT_MASKED, Lapics, divisor, exit_reason

D = 3
PERIODIC = 1 << 17


class FakeClock:
    now = 10_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def lapics(clock: FakeClock) -> Lapics:
    lapics = Lapics(clock)
    lapics.add_domain(D, 3)
    return lapics


@pytest.mark.parametrize(
    "tdcr, div",
    [(0x0, 2), (0x1, 4), (0x2, 8), (0x3, 16), (0x8, 32), (0x9, 64), (0xA, 128), (0xB, 1)],
)
def test_divide_configuration(tdcr: int, div: int) -> None:
    assert divisor(tdcr) == div


def test_one_shot_timer_fires_once_and_needs_eoi(clock: FakeClock, lapics: Lapics) -> None:
    lapics.write(D, 1, APIC.TDCR, 0xB)  # divide by 1
    lapics.write(D, 1, APIC.LVTT, 0xEF)
    lapics.write(D, 1, APIC.TMICT, 500)
    assert lapics.next_deadline() == clock.now + 500
    clock.now += 200
    assert lapics.read(D, 1, APIC.TMCCT) == 300
    assert lapics.expire(clock.now) == ()
    assert lapics.expire(clock.now + 300) == (ApicInterrupt(D, 1, 0xEF),)
    assert lapics.next_deadline() is None
    assert lapics.eoi(D, 1) == (0xEF, ())
    assert lapics.eoi(D, 1) == (None, ())


def test_periodic_timer_rearms_and_waits_for_eoi(clock: FakeClock, lapics: Lapics) -> None:
    lapics.write(D, 0, APIC.TDCR, 0x0)  # divide by 2
    lapics.write(D, 0, APIC.LVTT, PERIODIC | 0xEF)
    lapics.write(D, 0, APIC.TMICT, 50)  # 100 ns period
    assert lapics.expire(clock.now + 100) == (ApicInterrupt(D, 0, 0xEF),)
    # Not EOI'd yet: the next tick waits in IRR and comes with the EOI.
    assert lapics.expire(clock.now + 200) == ()
    assert lapics.write(D, 0, APIC.EOI, 0) == (ApicInterrupt(D, 0, 0xEF),)
    lapics.write(D, 0, APIC.TMICT, 0)  # a zero count stops it
    assert lapics.next_deadline() is None


def test_masked_lvt_counts_but_does_not_interrupt(clock: FakeClock, lapics: Lapics) -> None:
    lapics.write(D, 0, APIC.LVTT, APIC_LVT_MASKED | 0xEF)
    lapics.write(D, 0, APIC.TMICT, 10)
    assert lapics.expire(clock.now + 1000) == ()


@pytest.mark.parametrize(
    "icr, icr2, targets",
    [
        (0xFD, 2 << 24, [2]),  # fixed, physical destination 2
        (0xFD | 1 << 18, 0, [1]),  # self
        (0xFD | 2 << 18, 0, [0, 1, 2]),  # all including self
        (0xFD | 3 << 18, 0, [0, 2]),  # all excluding self
        (0xFD, 0xFF << 24, [0, 1, 2]),  # physical broadcast
        (0xFD | 1 << 11, 0b101 << 24, [0, 2]),  # logical, flat
        (0xFD, 9 << 24, []),  # no such APIC
    ],
)
def test_icr_write_sends_ipis(lapics: Lapics, icr: int, icr2: int, targets: list[int]) -> None:
    lapics.write(D, 1, APIC.ICR2, icr2)
    assert lapics.write(D, 1, APIC.ICR, icr) == tuple(ApicInterrupt(D, t, 0xFD) for t in targets)


def test_nmi_ipi_and_illegal_vectors(lapics: Lapics) -> None:
    lapics.write(D, 0, APIC.ICR2, 1 << 24)
    assert lapics.write(D, 0, APIC.ICR, 4 << 8) == (ApicInterrupt(D, 1, 2, nmi=True),)
    assert lapics.write(D, 0, APIC.ICR, 0x05) == ()  # vector < 16
    assert lapics.write(D, 0, APIC.ICR, 5 << 8) == ()  # INIT: not modelled


def test_eoi_retires_the_highest_in_service_first(lapics: Lapics) -> None:
    lapics.accept_external(D, 0, 0xF3)  # an event-channel upcall through the vLAPIC
    assert lapics.raise_irq(D, 0, 0x31) == ()  # lower class than 0xF3: waits
    assert lapics.raise_irq(D, 0, 0xFD) == ()  # same class as 0xF3: waits
    assert lapics.eoi(D, 0) == (0xF3, (ApicInterrupt(D, 0, 0xFD),))
    assert lapics.eoi(D, 0) == (0xFD, (ApicInterrupt(D, 0, 0x31),))


def test_register_reads(lapics: Lapics) -> None:
    lapics.write(D, 2, APIC.LVTT, 0xFFFFFFFF)
    assert lapics.read(D, 2, APIC.ID) == 2 << 24
    assert lapics.read(D, 2, APIC.LVTT) == 0x700FF  # only vector, mask and mode bits
    assert lapics.read(D, 2, 0x999) == 0


@pytest.mark.parametrize(
    "reg, write, reason",
    [
        (APIC.EOI, True, "eoi"),
        (APIC.ICR, True, "icr_write"),
        (APIC.ICR2, True, "icr_write"),
        (APIC.TMICT, True, "lapic_timer_write"),
        (APIC.LVTT, True, "lapic_timer_write"),
        (APIC.TMCCT, False, "lapic_read"),
        (APIC.ID, True, "lapic_write"),
    ],
)
def test_every_access_has_an_exit_reason(reg: int, write: bool, reason: str) -> None:
    assert exit_reason(reg, write) == reason
