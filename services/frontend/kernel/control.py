"""The kernel's control endpoint (tags 420-439), one per vCPU at
``ipc://<rundir>/guests/dom<D>/vcpu<K>.sock``: what the toolstack's admin
verbs and the tests ask of a running guest. Each request acts *on that vCPU*,
as code running there would (an IPI is sent from it, a callout armed on it).

- :class:`KernelRebind` (vCPU0): ``cpuset -l <vcpu> -x <port>`` — move a device
  port; answers 0, ``-EINVAL`` from Xen for a timer/IPI port, ``-95``
  (EOPNOTSUPP) under the legacy callback.
- :class:`KernelStatus`: the report (JSON) as in the report file.
- :class:`KernelRun`: run one workload spec now on this vCPU, answer its result.
- :class:`KernelCallout`, :class:`KernelIpi`, :class:`KernelInterrupts`,
  :class:`KernelState`: scenario drivers for tests.
"""

from __future__ import annotations

import json
from typing import Any

from services.frontend.kernel.ipi import IPI
from services.frontend.kernel.kernel import Kernel
from shared.codec import message
from shared.transport import Peer, ServiceError


@message(420)
class KernelStatus:
    pass


@message(421)
class KernelJson:
    json: str


@message(422)
class KernelRun:
    spec_json: str


@message(423)
class KernelCallout:
    """Arm (``delay_ns`` from now) or stop (``stop``) the test callout ``cid``."""

    cid: int
    delay_ns: int = 0
    stop: bool = False


@message(424)
class KernelIpi:
    """Send ``ipi`` to ``dest`` (``self``/``others``/``all``/a CPU number); with
    ``bits`` a BITMAP IPI carrying those sub-IPIs (``repeat`` times each)."""

    ipi: int
    dest: str
    bits: tuple[int, ...] = ()
    repeat: int = 1


@message(425)
class KernelInterrupts:
    enabled: bool


@message(426)
class KernelRebind:
    port: int
    vcpu: int


@message(427)
class KernelDone:
    value: int = 0


@message(428)
class KernelStateRequest:
    pass


def install(server: Any, k: Kernel, status: Any, run_workload: Any, rebind: Any) -> None:
    """Route the control messages; ``status()`` builds the report dict,
    ``run_workload(spec)`` and ``rebind(port, vcpu)`` are awaitable."""
    fired: list[dict[str, int]] = []
    k.test_callouts = fired  # type: ignore[attr-defined]

    def st(peer: Peer, msg: KernelStatus) -> KernelJson:
        return KernelJson(json.dumps(status()))

    async def run(peer: Peer, msg: KernelRun) -> KernelJson:
        try:
            spec = json.loads(msg.spec_json)
        except ValueError as exc:
            raise ServiceError("invalid", str(exc)) from None
        return KernelJson(json.dumps(await run_workload(spec)))

    async def callout(peer: Peer, msg: KernelCallout) -> KernelDone:
        if msg.stop:
            await k.callout_stop(msg.cid)
            return KernelDone()
        deadline = k.clock.now() + msg.delay_ns

        def fire(now: int, d: int) -> None:
            fired.append({"cid": msg.cid, "deadline": d, "fired_at": now})
            k.touch()

        await k.callout_reset(msg.cid, deadline, fire, "test")
        return KernelDone(deadline)

    async def ipi(peer: Peer, msg: KernelIpi) -> KernelDone:
        kind = IPI(msg.ipi)
        dest: str | int = int(msg.dest) if msg.dest.isdigit() else msg.dest
        if msg.bits:
            for _ in range(msg.repeat):
                for bit in msg.bits:
                    for tgt in _targets(k, dest):
                        k.mem.bump_sent(k.cpu, tgt, bit)
            await k.ipi_send(IPI.BITMAP, dest)
        else:
            for _ in range(msg.repeat):
                await k.ipi_send(kind, dest)
        return KernelDone()

    async def interrupts(peer: Peer, msg: KernelInterrupts) -> KernelDone:
        await k.set_interrupts(msg.enabled)
        return KernelDone()

    async def do_rebind(peer: Peer, msg: KernelRebind) -> KernelDone:
        if k.cpu != 0:
            raise ServiceError("invalid", "rebind on vCPU0's endpoint")
        if not 0 <= msg.vcpu < k.nr_cpus:
            raise ServiceError("invalid", f"no vCPU {msg.vcpu}")
        return KernelDone(await rebind(msg.port, msg.vcpu))

    def state(peer: Peer, msg: KernelStateRequest) -> Any:
        return k.snapshot()

    server.route(KernelStatus, st)
    server.route(KernelRun, run)
    server.route(KernelCallout, callout)
    server.route(KernelIpi, ipi)
    server.route(KernelInterrupts, interrupts)
    server.route(KernelRebind, do_rebind)
    server.route(KernelStateRequest, state)


def _targets(k: Kernel, dest: str | int) -> list[int]:
    from services.frontend.kernel.ipi import targets

    return targets(dest, k.cpu, k.nr_cpus)
