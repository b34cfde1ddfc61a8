"""Dom0's event-channel device (shared/evtchn_dev.py): port numbers through
two FIFOs instead of nng, on its own and against a hypervisor process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from services.backend.blkback_grants import Dom0Hypervisor
from services.frontend import puppet as pp
from services.hypervisor import control as ctl
from services.hypervisor.testbed import dom0_evtchn, hypervisor_host, interdomain_pair
from shared.abi import hypercall as hc
from shared.abi.constants import DOMID, EVTCHNOP
from shared.evtchn_dev import PORT, EvtchnDevice, HypervisorEnd, device_paths, is_device_path
from shared.transport import RemoteError

LIMIT = 60


async def test_ports_go_both_ways_and_whole(tmp_path: Path) -> None:
    with trio.fail_after(10):
        dev = EvtchnDevice(tmp_path, pid=4242)
        end = HypervisorEnd(dev.fired_path, dev.send_path)
        try:
            assert dev.notify(7) and dev.notify(2**32 - 1)
            assert await end.sends.receive() == [7, 2**32 - 1]
            assert end.fired.write([3, 4, 5])
            assert await dev.receive() == [3, 4, 5]
            os.write(end.fired.fd, PORT.pack(9)[:3])  # a torn record waits for its end
            os.write(end.fired.fd, PORT.pack(9)[3:] + PORT.pack(10))
            assert await dev.receive() == [9, 10]
            assert not end.fired.write(list(range(2000)))  # over PIPE_BUF: the caller falls back
        finally:
            end.close()
            dev.close()
        assert not dev.fired_path.exists() and not dev.send_path.exists()


def test_a_gone_reader_makes_writes_fail_not_raise(tmp_path: Path) -> None:
    dev = EvtchnDevice(tmp_path, pid=1)
    end = HypervisorEnd(dev.fired_path, dev.send_path)
    dev.fired.close()  # the dom0 process went away
    try:
        assert end.fired.write([1]) is False
    finally:
        end.close()
        dev.close()


def test_device_paths_are_fifos_in_the_run_dir(tmp_path: Path) -> None:
    fired, send = device_paths(tmp_path, 12)
    assert not is_device_path(tmp_path, fired, ".fired")  # not there yet
    os.mkfifo(fired)
    send.write_text("not a fifo")
    assert is_device_path(tmp_path, fired, ".fired")
    assert not is_device_path(tmp_path, send, ".send")
    assert not is_device_path(tmp_path / "x", fired, ".fired")


async def _bound_pair(hv) -> tuple:  # type: ignore[no-untyped-def]
    a = await hv.create(vcpus=1)
    await a.pv_setup()
    rc, unbound = await a.vcpus[0].evtchn(
        EVTCHNOP.alloc_unbound, hc.EvtchnAllocUnbound(DOMID.SELF, 0)
    )
    assert rc == 0
    rc, bound = await dom0_evtchn(
        hv, EVTCHNOP.bind_interdomain, hc.EvtchnBindInterdomain(a.domid, unbound.port)
    )
    assert rc == 0
    await a.vcpus[0].wait_upcalls(1)
    await a.vcpus[0].upcalls()
    return a, unbound.port, bound.local_port


async def test_hypervisor_uses_the_device_and_refuses_bad_sends() -> None:
    with trio.fail_after(LIMIT):
        async with hypervisor_host() as hv:
            a, guest_port, our_port = await _bound_pair(hv)
            dev = EvtchnDevice(hv.rundir)
            try:
                await hv.dom0.call(ctl.Dom0EvtchnDevice(str(dev.fired_path), str(dev.send_path)))
                # the guest's send reaches us through the FIFO, not as an nng message
                assert (await a.vcpus[0].evtchn(EVTCHNOP.send, hc.EvtchnSend(guest_port)))[0] == 0
                assert await dev.receive() == [our_port]
                # our send through the FIFO is the hypercall: the guest gets its upcall
                assert dev.notify(our_port)
                seen = await a.vcpus[0].wait_upcalls(1)
                assert [u.ports for u in seen] == [(guest_port,)]
                await a.vcpus[0].upcalls()
                # garbage ports: refused, counted, and the device still works
                for bad in (0, 4095, 2**32 - 1):
                    assert dev.notify(bad)
                assert dev.notify(our_port)
                seen = await a.vcpus[0].wait_upcalls(1)
                assert [u.ports for u in seen] == [(guest_port,)]
                counters = (await hv.status()).stats["hypervisor"]["evtchn_devices"]
                assert counters["sends"] == 5 and counters["refused_sends"] == 3
                assert counters["kicks"] >= 1 and counters["devices"] == 1
            finally:
                dev.close()


@pytest.mark.parametrize("where", ["elsewhere", "not_fifo", "guest"])
async def test_a_device_must_be_dom0s_fifos_in_the_run_dir(where: str, tmp_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with hypervisor_host() as hv:
            a = await hv.create(vcpus=1)
            dev = EvtchnDevice(tmp_path if where == "elsewhere" else hv.rundir, pid=77)
            fired, send = str(dev.fired_path), str(dev.send_path)
            try:
                if where == "not_fifo":
                    dev.send_path.unlink()
                    dev.send_path.write_text("")
                if where == "guest":
                    with pytest.raises(RemoteError, match="only dom0"):
                        await a.vcpus[0].control.call(
                            pp.PuppetCall(ctl.Dom0EvtchnDevice(fired, send))
                        )
                    return
                with pytest.raises(RemoteError, match="run directory"):
                    await hv.dom0.call(ctl.Dom0EvtchnDevice(fired, send))
                assert (await hv.status()).stats["hypervisor"]["evtchn_devices"]["devices"] == 0
            finally:
                dev.close()


async def test_blkback_falls_back_to_nng_when_the_device_is_refused(tmp_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with hypervisor_host() as hv:
            a, guest_port, our_port = await _bound_pair(hv)
            d0 = Dom0Hypervisor(hv.dom0)
            assert await d0.open_device(tmp_path) is None  # not the host's run directory
            assert list(tmp_path.iterdir()) == []  # its FIFOs went with the refusal
            await d0.notify(our_port)
            seen = await a.vcpus[0].wait_upcalls(1)
            assert [u.ports for u in seen] == [(guest_port,)]
            assert (d0.hypercalls, d0.device_sends) == (1, 0)


async def test_a_puppets_posted_send_is_the_hypercall_through_its_fifo() -> None:
    """PuppetSend(posted=True) (the bench's kernel-like send) goes through the
    vCPU's send FIFO: the other guest gets its upcalls and the hypervisor
    counts FIFO sends, not hypercall messages."""
    with trio.fail_after(LIMIT):
        async with hypervisor_host() as hv:
            a, b, a_port, b_port = await interdomain_pair(hv)
            before = (await hv.status()).stats["hypervisor"]
            sent = await b.vcpus[0].control.call(pp.PuppetSend(b_port, 3, 0.02, True))
            assert len(sent.at_ns) == 3
            seen = await a.vcpus[0].wait_upcalls(3)
            assert [u.ports for u in seen] == [(a_port,)] * 3
            after = (await hv.status()).stats["hypervisor"]
            fifo = after["evtchn_devices"]
            assert fifo["vcpu_fifos"] >= 2
            assert fifo["sends"] - before["evtchn_devices"]["sends"] == 3
            assert fifo["refused_sends"] == 0
