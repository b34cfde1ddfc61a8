"""Guest kernel boot against a real hypervisor process (guest-behaviour E 1-6,
17): the same config on bare / xen-legacy / xen takes the three paths, proved
by the hypervisor's trace and counters; busy device ports spread over every
vCPU with the vector callback and stay on vCPU0 with the legacy one."""

from __future__ import annotations

import pytest
import trio

from services.frontend.kernel.testing import (
    EventSource,
    boot_guest,
    hypercalls,
    kernel_host,
    named,
)
from shared.abi import hypercall as hc
from shared.abi.constants import HVM_PARAM, VIRQ

V = 4
DEVICE_PORTS = 8


def _callback_params(trace: list) -> list[int]:
    out = []
    for e in named(trace, "hvm_op.set_param"):
        p = hc.XenHvmParam.unpack(e.arg)
        if p.index == HVM_PARAM.CALLBACK_IRQ:
            out.append(p.value)
    return out


async def _busy_ports(hv, g, spread: bool) -> dict[int, dict[str, int]]:  # type: ignore[no-untyped-def]
    """Drive every device port from dom0; answer each vCPU's device_events once
    every port was handled at least 3 times (or, ``spread``, on every vCPU)."""
    ports = g.report(0)["device_ports"]
    assert len(ports) == DEVICE_PORTS
    src = EventSource(hv, g.domid)
    await src.bind(ports)
    await src.blast(rounds=12, gap=0.002)

    def done(reps: list) -> bool:  # type: ignore[type-arg]
        counts: dict[str, int] = {}
        for r in reps:
            for p, n in r["device_events"].items():
                counts[p] = counts.get(p, 0) + n
        return len(counts) == DEVICE_PORTS and min(counts.values()) >= 3

    try:
        reps = await g.wait_reports(done, timeout=10)
    except trio.TooSlowError:
        reps = g.reports()
    del spread
    return {r["vcpu"]: r["device_events"] for r in reps}


@pytest.mark.parametrize("personality", ["bare", "xen-legacy", "xen"])
async def test_one_image_three_worlds(personality: str) -> None:
    """Scenario 6: one unchanged config; scenarios 1, 2, 5 by personality."""
    with trio.fail_after(60):
        async with kernel_host() as hv:
            g = await boot_guest(hv, personality, vcpus=V, device_ports=DEVICE_PORTS)
            trace = await g.trace()
            reps = g.reports()
            assert all(r["state"] == "running" for r in reps)
            modes = {r["platform"]["mode"] for r in reps}
            timers = {r["event_timer"]["kind"] for r in reps}
            if personality == "bare":  # scenario 1
                assert modes == {"bare"} and timers == {"lapic"}
                assert hypercalls(trace) == []
                assert reps[0]["device_ports"] == [] and (await g.detail()).channels == ()
                assert any("no XenVMMXenVMM" in line for line in reps[0]["dmesg"])
                return
            if personality == "xen-legacy":  # scenario 2
                assert modes == {"legacy"} and timers == {"lapic"}
                (value,) = _callback_params(trace)
                assert value >> 56 == 1  # PCI_INTX: the platform device's IRQ 28 is >= 16
                for op in ("bind_ipi", "bind_vcpu", "set_singleshot_timer"):
                    assert named(trace, op) == [], op
                virqs = [hc.EvtchnBindVirq.unpack(e.arg).virq for e in named(trace, "bind_virq")]
                assert VIRQ.TIMER not in virqs
                events = await _busy_ports(hv, g, False)
                assert sum(events[0].values()) > 0
                assert all(not events[v] for v in range(1, V))
                d = await g.detail()
                assert d.vcpus[0].upcalls > 0 and all(d.vcpus[v].upcalls == 0 for v in range(1, V))
                return
            # scenario 5: full PVHVM
            assert modes == {"vector"} and timers == {"xentimer"}
            assert _callback_params(trace) == [2 << 56 | 0x93]
            for i in range(V):
                virq = [
                    hc.EvtchnBindVirq.unpack(e.arg)
                    for e in named(trace, "bind_virq")
                    if hc.EvtchnBindVirq.unpack(e.arg).vcpu == i
                ]
                assert [b.virq for b in virq] == [VIRQ.TIMER]
                ipis = [e for e in named(trace, "bind_ipi") if e.vcpu == i]
                assert len(ipis) == 9 and {hc.EvtchnBindIpi.unpack(e.arg).vcpu for e in ipis} == {i}
                regs = [e for e in named(trace, "register_vcpu_info") if e.target == i]
                assert len(regs) == 1 and regs[0].vcpu == i and regs[0].rc == 0  # on itself
            # scenario 17: the boot shuffle, round-robin, 2 device ports per vCPU
            moves = [hc.EvtchnBindVcpu.unpack(e.arg) for e in named(trace, "bind_vcpu")]
            per_cpu = [sum(1 for m in moves if m.vcpu == v) for v in range(V)]
            assert per_cpu == [2] * V and all(e.rc == 0 for e in named(trace, "bind_vcpu"))
            placement = {m.port: m.vcpu for m in moves}
            events = await _busy_ports(hv, g, True)
            for v in range(V):
                assert events[v], f"vCPU{v} handled no device event"
                assert all(placement[int(p)] == v for p in events[v])
            d = await g.detail()
            assert all(d.vcpus[v].upcalls > 0 for v in range(V))


async def test_vector_callback_without_safe_pvclock() -> None:
    """Scenario 4: PV IPIs (V x 9 ports), no VIRQ_TIMER, emulated timer."""
    with trio.fail_after(40):
        async with kernel_host() as hv:
            g = await boot_guest(hv, "xen", vcpus=V, feature_mask=~(1 << 9) & 0xFFFFFFFF)
            trace = await g.trace()
            assert len(named(trace, "bind_ipi")) == V * 9
            assert named(trace, "bind_virq") == [] and named(trace, "set_singleshot_timer") == []
            assert {r["event_timer"]["kind"] for r in g.reports()} == {"lapic"}
            assert any("hvm_safe_pvclock=0" in line for line in g.report(0)["dmesg"])


async def test_callback_vector_failure_falls_back_to_legacy() -> None:
    """Scenario 3: feature 8 advertised but ``set_param(CALLBACK_IRQ, vector)``
    refused (host setting ``callback_vector = "fail"``): the guest logs the
    fallback, sets the legacy callback and ends in the scenario-2 state, no panic."""
    with trio.fail_after(40):
        async with kernel_host(callback_vector="fail") as hv:
            g = await boot_guest(hv, "xen", vcpus=V)
            trace = await g.trace()
            sets = named(trace, "hvm_op.set_param")
            values = _callback_params(trace)
            assert [v >> 56 for v in values] == [2, 1]  # vector (refused), then PCI_INTX
            assert sets[0].rc < 0 and sets[1].rc == 0
            reps = g.reports()
            assert all(r["state"] == "running" for r in reps)
            assert {r["platform"]["mode"] for r in reps} == {"legacy"}
            assert {r["event_timer"]["kind"] for r in reps} == {"lapic"}
            for op in ("bind_ipi", "bind_vcpu", "set_singleshot_timer"):
                assert named(trace, op) == [], op
            assert not any("panic" in line for r in reps for line in r["dmesg"])
            assert any("Falling back" in line for line in reps[0]["dmesg"])
