"""Guest kernel xenbus pieces without a host: the frontend state machine
table, the boot-hold rule, the PV CD-ROM decline, the device record's round
trip, and the suspend sequence's three endings (aborted by a device,
cancelled = rc 1, new domain = rc 0) against a fake hypervisor."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from services.frontend.kernel import xbfront
from services.frontend.kernel.config import KernelConfig
from services.frontend.kernel.kernel import Kernel
from services.frontend.kernel.layout import KernelMemory, pages_needed
from services.frontend.kernel.state import XenbusDeviceRecord
from services.frontend.kernel.xbfront import Step
from services.frontend.kernel.xctrl import Xctrl
from services.hypervisor.messages import HypercallResult, SchedOp
from shared import codec
from shared.abi import hypercall as hc
from shared.abi.constants import SHUTDOWN, XenbusState
from shared.guestmem import PAGE_SIZE

S = XenbusState

OTHEREND = [  # (frontend, backend) -> steps, xen-reference 2.4 / 2.6
    (S.Initialising, S.Initialising, [Step.NOTIFY]),
    (S.Initialising, S.Unknown, [Step.NOTIFY]),
    (S.Initialising, S.InitWait, [Step.INITIALISE]),
    (S.Initialising, S.Initialised, [Step.INITIALISE]),
    (S.Initialising, S.Connected, [Step.INITIALISE, Step.CONNECT]),
    (S.Initialised, S.InitWait, [Step.NOTIFY]),
    (S.Initialised, S.Connected, [Step.CONNECT]),
    (S.Connected, S.Connected, [Step.CHANGED]),
    (S.Connected, S.Closing, [Step.CLOSE]),
    (S.Initialised, S.Closed, [Step.CLOSE]),
    (S.Connected, S.Unknown, [Step.CLOSE]),
    (S.Closed, S.Closed, [Step.NOTIFY]),
    (S.Closed, S.InitWait, [Step.NOTIFY]),
]


@pytest.mark.parametrize(("fe", "be", "steps"), OTHEREND)
def test_otherend_changed(fe: S, be: S, steps: list[Step]) -> None:
    assert xbfront.otherend_changed(fe, be) == steps


def test_state_after_each_step() -> None:
    assert xbfront.state_after(Step.INITIALISE, S.Initialising) == S.Initialised
    assert xbfront.state_after(Step.CONNECT, S.Initialised) == S.Connected
    assert xbfront.state_after(Step.CLOSE, S.Connected) == S.Closed
    assert xbfront.state_after(Step.CHANGED, S.Connected) == S.Connected


def test_parse_state() -> None:
    assert xbfront.parse_state("4") == S.Connected
    assert xbfront.parse_state(None) == xbfront.parse_state("x") == S.Unknown


def _rec(state: S, outcome: str = "attaching") -> XenbusDeviceRecord:
    return XenbusDeviceRecord("device/vbd/5632", "vbd", 5632, "/be", 0, state, 1, "stub", outcome)


def test_boot_hold_rule() -> None:
    assert not xbfront.releases_hold(_rec(S.Initialising))
    assert not xbfront.releases_hold(_rec(S.Initialised))
    assert xbfront.releases_hold(_rec(S.Connected))
    assert xbfront.releases_hold(_rec(S.Closed))
    for outcome in ("declined", "failed", "no-driver"):
        assert xbfront.releases_hold(_rec(S.Initialising, outcome))


def test_pv_cdrom_is_declined_unless_forced() -> None:
    assert xbfront.declines_pv_cdrom("vbd", "cdrom", False)
    assert not xbfront.declines_pv_cdrom("vbd", "cdrom", True)
    assert not xbfront.declines_pv_cdrom("vbd", "disk", False)
    assert not xbfront.declines_pv_cdrom("vbd", None, False)
    assert not xbfront.declines_pv_cdrom("vif", "cdrom", False)


def test_device_record_round_trip() -> None:
    rec = _rec(S.Connected, "connected")
    assert codec.decode(codec.encode(rec)) == rec


# --- the suspend sequence on a 1-vCPU kernel over a fake hypervisor ---------------------------


class FakeHv:
    def __init__(self, suspend_rc: int) -> None:
        self.suspend_rc = suspend_rc
        self.calls: list[Any] = []

    async def call(self, msg: Any, timeout: float = 0) -> HypercallResult:
        self.calls.append(msg)
        return HypercallResult(self.suspend_rc if isinstance(msg, SchedOp) else 0, b"")


class FakeBus:
    def __init__(self, fail: str | None = None) -> None:
        self.fail = fail
        self.log: list[str] = []

    async def suspend_devices(self) -> str | None:
        self.log.append("suspend")
        return self.fail

    async def resume_devices(self, cancelled: bool) -> None:
        self.log.append(f"resume cancelled={cancelled}")


def _xctrl(rc: int, fail: str | None = None) -> tuple[Xctrl, FakeHv, FakeBus]:
    hv, bus = FakeHv(rc), FakeBus(fail)
    mem = KernelMemory(bytearray(pages_needed(1) * PAGE_SIZE), 1)
    k = Kernel(hv, KernelConfig(vcpus=1), 1, 0, mem)  # type: ignore[arg-type]
    k.state = "running"
    return Xctrl(k, None, bus), hv, bus  # type: ignore[arg-type]


def _reasons(hv: FakeHv) -> list[int]:
    return [hc.SchedShutdown.unpack(m.arg).reason for m in hv.calls if isinstance(m, SchedOp)]


async def test_cancelled_suspend_resumes_in_place() -> None:
    with trio.fail_after(5):
        x, hv, bus = _xctrl(1)
        assert await x.suspend() == 1
        assert _reasons(hv) == [SHUTDOWN.suspend]
        assert bus.log == ["suspend", "resume cancelled=True"]
        assert x.k.state == "running" and x.suspends[0]["rc"] == 1


async def test_suspend_into_a_new_domain_waits_for_the_resume_path() -> None:
    with trio.fail_after(5):
        x, hv, bus = _xctrl(0)
        assert await x.suspend() == 0
        assert bus.log == ["suspend"] and x.k.state == "suspended"
        resumed: list[bool] = []

        async def resume() -> None:
            resumed.append(True)

        x2, _, _ = _xctrl(0)
        x2.resume_new_domain = resume
        await x2.suspend()
        assert resumed == [True] and x2.k.state == "running"


async def test_a_device_that_cannot_suspend_aborts_before_the_hypercall() -> None:
    with trio.fail_after(5):
        x, hv, bus = _xctrl(0, fail="device/vbd/51712: busy")
        assert await x.suspend() is None
        assert _reasons(hv) == []
        assert bus.log == ["suspend", "resume cancelled=True"]
        assert "device_suspend failed" in x.suspends[0]["aborted"]
