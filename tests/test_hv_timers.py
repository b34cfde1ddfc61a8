"""Timer core on a fake host clock: xen-reference 9.1 rule by rule."""

from __future__ import annotations

import pytest

from services.hypervisor.timers import GuestClock, Timers
from services.hypervisor.timers_state import TimerFired, TimersState
from shared.abi.constants import VCPU_SSHOTTMR_future, XenErrno
from shared.codec import from_wire, to_wire

D = 1
MS = 1_000_000
ETIME, EINVAL = -int(XenErrno.ETIME), -int(XenErrno.EINVAL)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000 * MS

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def host() -> FakeClock:
    return FakeClock()


@pytest.fixture
def timers(host: FakeClock) -> Timers:
    clock = GuestClock(host)
    clock.add_domain(D, offset=5_000 * MS)  # guest time runs ahead of host time
    return Timers(clock)


def guest_now(t: Timers) -> int:
    return t.clock.now(D)


def test_guest_time_is_host_time_plus_offset(host: FakeClock, timers: Timers) -> None:
    assert guest_now(timers) == 6_000 * MS
    host.now += 7
    assert guest_now(timers) == 6_000 * MS + 7


def test_singleshot_fires_once_at_its_deadline_on_its_vcpu(host: FakeClock, timers: Timers) -> None:
    assert timers.set_singleshot(D, 1, 1, guest_now(timers) + 10 * MS) == (0, ())
    assert timers.next_deadline() == host.now + 10 * MS  # in host time
    assert timers.expire(host.now + 10 * MS - 1) == []
    host.now += 10 * MS
    assert timers.expire(host.now) == [TimerFired(D, 1, "singleshot")]
    assert timers.expire(host.now + 100 * MS) == []
    assert timers.next_deadline() is None


def test_singleshot_only_for_the_calling_vcpu(timers: Timers) -> None:
    assert timers.set_singleshot(D, 0, 1, guest_now(timers) + MS) == (EINVAL, ())
    assert timers.stop_singleshot(D, 0, 1) == EINVAL


def test_rearm_replaces_the_previous_deadline(host: FakeClock, timers: Timers) -> None:
    timers.set_singleshot(D, 0, 0, guest_now(timers) + 10 * MS)
    timers.set_singleshot(D, 0, 0, guest_now(timers) + 30 * MS)
    assert timers.expire(host.now + 20 * MS) == []
    assert timers.expire(host.now + 30 * MS) == [TimerFired(D, 0, "singleshot")]


def test_stop_cancels(host: FakeClock, timers: Timers) -> None:
    timers.set_singleshot(D, 0, 0, guest_now(timers) + 10 * MS)
    assert timers.stop_singleshot(D, 0, 0) == 0
    assert timers.expire(host.now + 60 * MS) == []


@pytest.mark.parametrize(
    "setting, flags, expected",
    [
        ("etime", VCPU_SSHOTTMR_future, (ETIME, ())),
        ("etime", 0, (0, (TimerFired(D, 0, "singleshot"),))),
        ("fire", VCPU_SSHOTTMR_future, (0, (TimerFired(D, 0, "singleshot"),))),
        ("fire", 0, (0, (TimerFired(D, 0, "singleshot"),))),
    ],
)
def test_past_deadline_per_host_setting(
    host: FakeClock, timers: Timers, setting: str, flags: int, expected: tuple
) -> None:
    timers.sshot_past = setting
    timers.set_singleshot(D, 0, 0, guest_now(timers) + 10 * MS)
    assert timers.set_singleshot(D, 0, 0, guest_now(timers) - 1, flags) == expected
    # -ETIME arms nothing and leaves the old timer; an immediate fire replaces it.
    still_armed = expected[0] == ETIME
    assert bool(timers.expire(host.now + 10 * MS)) is still_armed


def test_deadline_equal_to_now_is_not_past(host: FakeClock, timers: Timers) -> None:
    timers.sshot_past = "etime"
    assert timers.set_singleshot(D, 0, 0, guest_now(timers), VCPU_SSHOTTMR_future) == (0, ())
    assert timers.expire(host.now) == [TimerFired(D, 0, "singleshot")]


@pytest.mark.parametrize("period, rc", [(MS - 1, EINVAL), (0, EINVAL), (MS, 0), (2**63, EINVAL)])
def test_periodic_period_must_be_at_least_1ms(timers: Timers, period: int, rc: int) -> None:
    assert timers.set_periodic(D, 0, period) == rc


def test_periodic_fires_every_period_until_stopped(host: FakeClock, timers: Timers) -> None:
    timers.set_periodic(D, 2, 10 * MS)
    for _ in range(3):
        host.now += 10 * MS
        assert timers.expire(host.now) == [TimerFired(D, 2, "periodic")]
    timers.stop_periodic(D, 2)
    assert timers.expire(host.now + 100 * MS) == []


def test_set_timer_op_arms_the_callers_singleshot_and_zero_cancels(
    host: FakeClock, timers: Timers
) -> None:
    assert timers.set_timer_op(D, 1, guest_now(timers) + 5 * MS) == (0, ())
    assert timers.armed(D, 1)[0] == guest_now(timers) + 5 * MS
    assert timers.set_timer_op(D, 1, 0) == (0, ())
    assert timers.expire(host.now + 50 * MS) == []
    assert timers.set_timer_op(D, 1, 1) == (0, (TimerFired(D, 1, "singleshot"),))  # in the past
    timers.set_timer_op(D, 1, 2**64 - 1)  # clamped, not overflowing
    assert timers.armed(D, 1)[0] == guest_now(timers) + (1 << 50)


def test_expiry_order_across_vcpus_and_domains(host: FakeClock, timers: Timers) -> None:
    timers.clock.add_domain(2, offset=0)
    timers.set_singleshot(D, 0, 0, guest_now(timers) + 3 * MS)
    timers.set_singleshot(2, 1, 1, timers.clock.now(2) + 1 * MS)
    timers.set_singleshot(D, 1, 1, guest_now(timers) + 2 * MS)
    assert timers.expire(host.now + 5 * MS) == [
        TimerFired(2, 1, "singleshot"),
        TimerFired(D, 1, "singleshot"),
        TimerFired(D, 0, "singleshot"),
    ]


def test_remove_domain_cancels_its_timers(host: FakeClock, timers: Timers) -> None:
    timers.set_singleshot(D, 0, 0, guest_now(timers) + MS)
    timers.set_periodic(D, 1, MS)
    timers.remove_domain(D)
    assert timers.next_deadline() is None
    assert timers.statistics().singleshot_armed == 0


def test_state_migrates_as_remaining_time(host: FakeClock, timers: Timers) -> None:
    timers.set_singleshot(D, 0, 0, guest_now(timers) + 7 * MS)
    timers.set_periodic(D, 1, 10 * MS)
    state = timers.export_state(D, 2)
    assert from_wire(to_wire(state)) == state and isinstance(state, TimersState)
    assert state.vcpus[0].singleshot_remaining == 7 * MS
    # Destination host: another monotonic base and offset; guest time goes on.
    dest_host = FakeClock()
    dest_host.now = 123 * MS
    clock = GuestClock(dest_host)
    clock.add_domain(D, offset=guest_now(timers) + 40 * MS - dest_host.now)  # 40 ms blackout
    dest = Timers(clock)
    dest.import_state(from_wire(to_wire(state)))
    assert dest.armed(D, 0)[0] == clock.now(D) + 7 * MS
    assert dest.expire(dest_host.now + 7 * MS) == [TimerFired(D, 0, "singleshot")]
    assert dest.expire(dest_host.now + 10 * MS) == [TimerFired(D, 1, "periodic")]


def test_statistics_count_fired_by_kind(host: FakeClock, timers: Timers) -> None:
    timers.set_singleshot(D, 0, 0, guest_now(timers) + MS)
    timers.expire(host.now + MS)
    assert timers.statistics().fired == {"singleshot": 1}
    assert from_wire(to_wire(timers.statistics())) == timers.statistics()
