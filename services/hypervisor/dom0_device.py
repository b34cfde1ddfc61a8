"""Dom0's event-channel devices (:mod:`shared.evtchn_dev`) on the hypervisor
side: a dom0 process names its two FIFOs, the hypervisor then writes that
process's fired ports to one and takes its sends from the other, each as the
``EVTCHNOP_send`` hypercall from that process (same checks, trace and
counters). A mixin of the service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import trio

from services.hypervisor import control as ctl
from services.hypervisor.messages import EventChannelOp
from shared.abi import hypercall as hc
from shared.abi.constants import EVTCHNOP
from shared.evtchn_dev import FIRED, SEND, HypervisorEnd, is_device_path
from shared.transport import Peer, ServiceError


@attrs.define(eq=False)
class _Device:
    end: HypervisorEnd
    scope: trio.CancelScope


@attrs.define
class DeviceCounters:
    devices: int = 0  #: registered so far
    kicks: int = 0  #: fired-port writes
    fallbacks: int = 0  #: fired ports that went by nng instead (FIFO full)
    sends: int = 0  #: sends taken from the FIFOs
    refused_sends: int = 0  #: of those, answered with an error


class Dom0Devices:
    """Handlers; ``self`` is the hypervisor service."""

    ctx: Any
    dom0_devices: dict[Peer, _Device]
    device_counters: DeviceCounters

    def dom0_evtchn_device(self, peer: Peer, msg: ctl.Dom0EvtchnDevice) -> ctl.Done:
        self._dom0(peer)  # type: ignore[attr-defined]
        rundir = Path(self.ctx.host.rundir)
        fired, send = Path(msg.fired), Path(msg.send)
        if not (is_device_path(rundir, fired, FIRED) and is_device_path(rundir, send, SEND)):
            raise ServiceError("refused", "the device's FIFOs live in the host's run directory")
        try:
            end = HypervisorEnd(fired, send)
        except OSError as exc:
            raise ServiceError("refused", f"evtchn device: {exc}") from None
        self._drop_device(peer)
        dev = self.dom0_devices[peer] = _Device(end, trio.CancelScope())
        self.device_counters.devices += 1
        self.ctx.nursery.start_soon(self._device_sends, peer, dev)
        return ctl.Done()

    async def _device_sends(self, peer: Peer, dev: _Device) -> None:
        with dev.scope:
            while True:
                try:
                    ports = await dev.end.sends.receive()
                except trio.ClosedResourceError:
                    return
                for port in ports:
                    self.device_counters.sends += 1
                    op = EventChannelOp(EVTCHNOP.send, hc.EvtchnSend(port).pack())
                    try:
                        rc = self.hypercall(peer, op).value  # type: ignore[attr-defined]
                    except ServiceError:
                        rc = -1
                    self.device_counters.refused_sends += rc < 0

    def _device_kick(self, owner: Peer, ports: list[int]) -> bool:
        """Write ``owner``'s fired ports to its device; False: send them by nng."""
        dev = self.dom0_devices.get(owner)
        if dev is None:
            return False
        if dev.end.fired.write(ports):
            self.device_counters.kicks += 1
            return True
        self.device_counters.fallbacks += 1
        return False

    def _drop_device(self, peer: Peer) -> None:
        dev = self.dom0_devices.pop(peer, None)
        if dev is not None:
            dev.scope.cancel()
            dev.end.close()
