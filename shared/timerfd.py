"""Precise sleeps for Trio: a Linux timerfd armed with an absolute
CLOCK_MONOTONIC deadline, awaited with ``trio.lowlevel.wait_readable``.

``trio.sleep_until`` wakes ~0.6 ms late at p50 here because epoll timeouts are
whole milliseconds; a timerfd wakes ~75 µs late (machine-limits.md), which is
what PV timer accuracy needs. Deadlines are ``time.monotonic_ns()`` values.
"""

from __future__ import annotations

import ctypes
import os
import time

import trio

CLOCK_MONOTONIC = 1
TFD_NONBLOCK = 0o4000
TFD_CLOEXEC = 0o2000000
TFD_TIMER_ABSTIME = 1

_libc = ctypes.CDLL(None, use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.timerfd_settime.argtypes = [
    ctypes.c_int,
    ctypes.c_int,
    ctypes.POINTER(_Itimerspec),
    ctypes.POINTER(_Itimerspec),
]


class TimerFd:
    """One timer. ``arm(deadline_ns)`` sets it, ``disarm()`` clears it,
    ``await wait()`` returns once the armed deadline has passed."""

    def __init__(self) -> None:
        fd = _libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd = fd
        self.deadline_ns: int | None = None

    def arm(self, deadline_ns: int) -> None:
        """Fire at ``deadline_ns`` (CLOCK_MONOTONIC); a past deadline fires at once."""
        spec = _Itimerspec()
        deadline_ns = max(deadline_ns, 1)  # 0 would disarm
        spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(deadline_ns, 1_000_000_000)
        self._settime(spec, TFD_TIMER_ABSTIME)
        self.deadline_ns = deadline_ns

    def disarm(self) -> None:
        self._settime(_Itimerspec(), 0)
        self.deadline_ns = None

    def _settime(self, spec: _Itimerspec, flags: int) -> None:
        if _libc.timerfd_settime(self.fd, flags, ctypes.byref(spec), None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def expired(self) -> bool:
        """Consume an expiry if one happened (non-blocking)."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            return False
        return True

    async def wait(self) -> None:
        """Until the armed deadline passes (forever while disarmed)."""
        while not self.expired():
            await trio.lowlevel.wait_readable(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                trio.lowlevel.notify_closing(self.fd)
            except RuntimeError:
                pass
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> TimerFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def sleep_until_ns(deadline_ns: int) -> None:
    """A precise ``trio.sleep_until`` on the CLOCK_MONOTONIC nanosecond scale."""
    with TimerFd() as timer:
        timer.arm(deadline_ns)
        await timer.wait()


def monotonic_ns() -> int:
    return time.monotonic_ns()
