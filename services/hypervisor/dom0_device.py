"""Event channels through FIFOs (:mod:`shared.evtchn_dev`) on the hypervisor
side. Dom0's devices: a dom0 process names its two FIFOs, the hypervisor then
writes that process's fired ports to one and takes its sends from the other.
A vCPU's send FIFO (next to its doorbell): the ports it posts
``EVTCHNOP_send`` on. Every port read is the ``EVTCHNOP_send`` hypercall of
that process or vCPU (same checks, trace and counters), and a caller's
posted sends are taken before its next hypercall by message, so they keep
their order. A mixin of the service."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import attrs
import trio

from services.hypervisor import control as ctl
from services.hypervisor.messages import EventChannelOp
from shared.abi import hypercall as hc
from shared.abi.constants import EVTCHNOP
from shared.evtchn_dev import FIRED, SEND, HypervisorEnd, PortReader, is_device_path
from shared.transport import Peer, ServiceError


@attrs.define(eq=False)
class _Device:
    end: HypervisorEnd
    scope: trio.CancelScope


@attrs.define(eq=False)
class _VcpuSends:
    reader: PortReader
    scope: trio.CancelScope


@attrs.define
class DeviceCounters:
    devices: int = 0  #: registered so far
    kicks: int = 0  #: fired-port writes
    fallbacks: int = 0  #: fired ports that went by nng instead (FIFO full)
    sends: int = 0  #: sends taken from the FIFOs (dom0 devices and vCPUs)
    refused_sends: int = 0  #: of those, answered with an error
    vcpu_fifos: int = 0  #: vCPU send FIFOs registered so far


class Dom0Devices:
    """Handlers; ``self`` is the hypervisor service."""

    ctx: Any
    dom0_devices: dict[Peer, _Device]
    vcpu_sends: dict[Peer, _VcpuSends]
    send_fifos: dict[Peer, PortReader]  #: every caller's posted sends, either kind
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
        self.send_fifos[peer] = end.sends
        self.device_counters.devices += 1
        self.ctx.nursery.start_soon(self._serve_sends, peer, end.sends, dev.scope)
        return ctl.Done()

    def _register_vcpu_sends(self, peer: Peer, path: Path, expected: Path) -> None:
        """A vCPU's send FIFO: at ``expected`` (next to its RAM file), a FIFO."""
        if path != expected or not stat.S_ISFIFO(_mode(path)):
            raise ServiceError("refused", "a send FIFO lives next to the domain's memory")
        try:
            reader = PortReader(path)
        except OSError as exc:
            raise ServiceError("refused", f"send FIFO: {exc}") from None
        self._drop_vcpu_sends(peer)
        sends = self.vcpu_sends[peer] = _VcpuSends(reader, trio.CancelScope())
        self.send_fifos[peer] = reader
        self.device_counters.vcpu_fifos += 1
        self.ctx.nursery.start_soon(self._serve_sends, peer, reader, sends.scope)

    async def _serve_sends(self, peer: Peer, reader: PortReader, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                try:
                    ports = await reader.receive()
                except trio.ClosedResourceError:
                    return
                self._posted_sends(peer, ports)

    def _posted_sends(self, peer: Peer, ports: list[int]) -> None:
        for port in ports:
            self.device_counters.sends += 1
            op = EventChannelOp(EVTCHNOP.send, hc.EvtchnSend(port).pack())
            try:
                rc = self._hypercall(peer, op).value  # type: ignore[attr-defined]
            except ServiceError:
                rc = -1
            self.device_counters.refused_sends += rc < 0

    def _drain_sends(self, peer: Peer) -> None:
        """Carry out the sends ``peer`` posted before this hypercall of its."""
        reader = self.send_fifos.get(peer)
        if reader is not None and (ports := reader.take_nowait()):
            self._posted_sends(peer, ports)

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
            self.send_fifos.pop(peer, None)
            dev.scope.cancel()
            dev.end.close()

    def _drop_vcpu_sends(self, peer: Peer) -> None:
        sends = self.vcpu_sends.pop(peer, None)
        if sends is not None:
            self.send_fifos.pop(peer, None)
            sends.scope.cancel()
            sends.reader.close()


def _mode(path: Path) -> int:
    try:
        return path.lstat().st_mode
    except OSError:
        return 0
