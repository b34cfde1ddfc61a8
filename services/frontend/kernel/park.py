"""Parking the APs (FreeBSD ``suspend_cpus``/``resume_cpus`` with IPI_SUSPEND,
guest-behaviour B.2 step 6): before vCPU0 suspends or shuts the domain down,
every other CPU must stop running and make no hypercall until released.

vCPU0 makes the park generation in the globals page odd and sends
IPI_SUSPEND to the others (PV or emulated, whatever this platform uses);
each AP's handler marks itself PARKED in its per-CPU page and spins in
interrupt context until the generation changes. While parked, the AP's
threads block in :meth:`Kernel.call <services.frontend.kernel.kernel.Kernel.call>`,
so nothing on that CPU exits to the hypervisor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from services.frontend.kernel.ipi import IPI
from services.frontend.kernel.layout import CpuState

if TYPE_CHECKING:
    from services.frontend.kernel.kernel import Kernel

PARK_POLL_S = 0.0005
PARK_TIMEOUT_S = 5.0


def parked_cpus(k: Kernel) -> list[int]:
    return [c for c in range(1, k.nr_cpus) if k.mem.cpu_state(c) == CpuState.PARKED]


async def cpususpend_handler(k: Kernel) -> None:
    """FreeBSD ``cpususpend_handler`` on an AP: mark itself parked and spin
    (in interrupt context, so no interrupt is taken and, through
    :meth:`Kernel.call`, no thread makes a hypercall) until vCPU0 releases it."""
    gen = k.mem.park_generation()
    if not gen & 1:
        return  # released before this IPI was taken
    k.parked, k.unparked = True, trio.Event()
    previous, k.state = k.state, "parked"
    k.mem.set_cpu_state(k.cpu, CpuState.PARKED)
    k.log(f"cpu{k.cpu}: parked")
    while k.mem.park_generation() == gen:
        await trio.sleep(PARK_POLL_S)
    k.mem.set_cpu_state(k.cpu, CpuState.ONLINE)
    k.parked = False
    k.unparked.set()
    k.state = previous if previous != "parked" else "running"
    k.log(f"cpu{k.cpu}: released")


async def suspend_cpus(k: Kernel, timeout: float = PARK_TIMEOUT_S) -> bool:
    """vCPU0: park every AP (IPI_SUSPEND); False if one did not park in time."""
    gen = k.mem.park_generation()
    if not gen & 1:
        gen += 1
        k.mem.set_park_generation(gen)
    if k.nr_cpus > 1:
        await k.ipi_send(IPI.SUSPEND, "others")
    with trio.move_on_after(timeout):
        while any(k.mem.cpu_state(c) != CpuState.PARKED for c in range(1, k.nr_cpus)):
            await trio.sleep(PARK_POLL_S)
        return True
    return False


async def resume_cpus(k: Kernel, timeout: float = PARK_TIMEOUT_S) -> None:
    """vCPU0: release the parked APs and wait until they run again."""
    gen = k.mem.park_generation()
    if gen & 1:
        k.mem.set_park_generation(gen + 1)
    with trio.move_on_after(timeout):
        while any(k.mem.cpu_state(c) == CpuState.PARKED for c in range(1, k.nr_cpus)):
            await trio.sleep(PARK_POLL_S)
