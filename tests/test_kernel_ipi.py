"""PV IPIs and balancing of the guest kernel against a real hypervisor
(guest-behaviour E 13, 14, 16, 18, admin rebind), checked on the trace."""

from __future__ import annotations

import pytest
import trio

from services.frontend.kernel.control import KernelInterrupts, KernelIpi, KernelRebind
from services.frontend.kernel.ipi import IPI, IPI_BITMAP
from services.frontend.kernel.testing import EventSource, boot_guest, kernel_host, named
from shared.abi import hypercall as hc


def _sends(trace: list, vcpu: int) -> list[int]:
    return [hc.EvtchnSend.unpack(e.arg).port for e in named(trace, ".send") if e.vcpu == vcpu]


async def test_unicast_and_merged_bitmap_ipis() -> None:
    """Scenario 13: one EVTCHNOP_send, one handler run on vCPU3 only; sends
    merged while vCPU3 is not taking interrupts lose no sub-IPI."""
    with trio.fail_after(60):
        async with kernel_host() as hv:
            g = await boot_guest(hv, "xen", vcpus=4)
            await g.trace(clear=True)
            await g.ask(0, KernelIpi(IPI.BITMAP, "3", (IPI_BITMAP.AST,)))
            reps = await g.wait_reports(lambda r: r[3]["ipi"]["handled"].get("BITMAP") == 1)
            assert _sends(await g.trace(clear=True), 0) == [
                g.report(3)["ports"][1 + IPI.BITMAP]["port"]
            ]
            assert all(not reps[v]["ipi"]["handled"] for v in (0, 1, 2))
            assert reps[3]["ipi"]["bitmap"] == {str(IPI_BITMAP.AST): 1}
            # vCPU3 masks its ports: four sends merge into one pending bit
            await g.ask(3, KernelInterrupts(False))
            for bit in (IPI_BITMAP.AST, IPI_BITMAP.AST, IPI_BITMAP.PREEMPT, IPI_BITMAP.HARDCLOCK):
                await g.ask(0, KernelIpi(IPI.BITMAP, "3", (bit,)))
            await trio.sleep(0.1)
            assert g.report(3)["ipi"]["handled"]["BITMAP"] == 1  # nothing delivered while masked
            await g.ask(3, KernelInterrupts(True))
            reps = await g.wait_reports(lambda r: sum(r[3]["ipi"]["bitmap"].values()) == 5)
            assert len(_sends(await g.trace(), 0)) == 4
            assert reps[3]["ipi"]["handled"]["BITMAP"] == 2  # four sends, one handler run
            assert reps[3]["ipi"]["bitmap"] == {"0": 3, "1": 1, "2": 1}


async def test_broadcast_costs_n_minus_1_sends() -> None:
    """Scenario 14: ipi_all_but_self from vCPU1 with V = 8: 7 sends, none to
    vCPU1's own port, one handler run on each of the 7 targets."""
    with trio.fail_after(60):
        async with kernel_host() as hv:
            g = await boot_guest(hv, "xen", vcpus=8, pages=512)
            await g.trace(clear=True)
            await g.ask(1, KernelIpi(IPI.RENDEZVOUS, "others"))
            reps = await g.wait_reports(
                lambda r: all(
                    r[v]["ipi"]["handled"].get("RENDEZVOUS") == 1 for v in range(8) if v != 1
                )
            )
            sent = _sends(await g.trace(), 1)
            own = {p["port"] for p in reps[1]["ports"]}
            assert len(sent) == 7 and not own & set(sent)
            assert not reps[1]["ipi"]["handled"]


@pytest.mark.parametrize(
    "nmi",
    [
        pytest.param("evtchn", marks=pytest.mark.xfail(strict=True, reason="FB10: maskable NMI")),
        "send_nmi",
    ],
)
async def test_nmi_is_not_maskable(nmi: str) -> None:
    """Scenario 16: STOP_HARD to vCPU1 while its event channels are masked."""
    with trio.fail_after(40):
        async with kernel_host() as hv:
            g = await boot_guest(hv, "xen", vcpus=2, nmi=nmi)
            await g.ask(1, KernelInterrupts(False))
            await g.ask(0, KernelIpi(IPI.STOP_HARD, "1"))
            await trio.sleep(0.2)
            trace = await g.trace()
            assert named(trace, "send_nmi" if nmi == "send_nmi" else ".send")
            assert g.report(1)["ipi"]["nmis"] == 1


async def test_timer_and_ipi_ports_never_go_to_xen_and_admin_rebind() -> None:
    """Scenario 18 (guest side) and the admin rebind (``cpuset -x``)."""
    with trio.fail_after(60):
        async with kernel_host() as hv:
            g = await boot_guest(hv, "xen", vcpus=4, device_ports=4)
            await g.trace(clear=True)
            rep1 = g.report(1)
            timer_port = rep1["ports"][0]["port"]
            ipi_port = rep1["ports"][1]["port"]
            for port in (timer_port, ipi_port):
                assert (await g.ask(0, KernelRebind(port, 2))).value == 0
            assert named(await g.trace(clear=True), "bind_vcpu") == []
            dev = g.report(0)["device_ports"][0]  # on vCPU0 after the shuffle
            assert (await g.ask(0, KernelRebind(dev, 2))).value == 0
            (move,) = named(await g.trace(), "bind_vcpu")
            assert hc.EvtchnBindVcpu.unpack(move.arg) == hc.EvtchnBindVcpu(dev, 2)
            src = EventSource(hv, g.domid)
            await src.bind([dev])
            await src.blast(rounds=5, gap=0.002)
            reps = await g.wait_reports(lambda r: r[2]["device_events"].get(str(dev), 0) > 0)
            assert all(str(dev) not in reps[v]["device_events"] for v in (0, 1, 3))

            legacy = await boot_guest(hv, "xen-legacy", vcpus=2, device_ports=2)
            await legacy.trace(clear=True)
            port = legacy.report(0)["device_ports"][0]
            assert (await legacy.ask(0, KernelRebind(port, 1))).value == -95
            assert named(await legacy.trace(), "bind_vcpu") == []
