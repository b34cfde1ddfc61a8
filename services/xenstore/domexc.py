"""How xenstored learns that a domain shut down: as C xenstored does, it binds
``VIRQ_DOM_EXC`` in dom0 and, each time it fires, asks the hypervisor for the
domain list; every introduced domain now shut down (or gone) gets its
``@releaseDomain`` (once, until ``XS_RESUME``)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import trio

from services.hypervisor import control as ctl
from services.hypervisor.messages import EventChannelOp
from shared.abi import hypercall as hc
from shared.abi.constants import EVTCHNOP, VIRQ
from shared.hostsecret import host_secret
from shared.topology import Host
from shared.transport import CallTimeout, PeerLost, RemoteError, open_channel

RETRY = 0.5


def released(infos: Iterable[ctl.DomainInfo], introduced: Iterable[int]) -> list[int]:
    """The introduced domains to report: shut down, or no longer in the list."""
    alive = {i.domid: i for i in infos}
    return [d for d in introduced if d not in alive or alive[d].shutdown_reason is not None]


async def watch_dom_exc(
    host: Host, introduced: Callable[[], Iterable[int]], report: Callable[[int], None]
) -> None:
    """Forever: (re)connect to the hypervisor, bind VIRQ_DOM_EXC, report."""
    while True:
        try:
            async with open_channel(host.endpoint("hypervisor")) as hv:
                await hv.wait_connected(timeout=10)
                await hv.call(ctl.Dom0Hello(host_secret(host.rundir)))
                bind = hc.EvtchnBindVirq(VIRQ.DOM_EXC, 0).pack()
                res = await hv.call(EventChannelOp(EVTCHNOP.bind_virq, bind))
                if res.value < 0:
                    raise RemoteError("bind_virq", f"VIRQ_DOM_EXC: {res.value}")
                while True:
                    note = await hv.receive()
                    if isinstance(note, ctl.EvtchnNotify):
                        domains = (await hv.call(ctl.ListDomains())).domains
                        for domid in released(domains, list(introduced())):
                            report(domid)
        except (PeerLost, CallTimeout, RemoteError, trio.TooSlowError, OSError) as exc:
            print(f"xenstored: hypervisor link: {exc!r}; retrying", file=sys.stderr)
            await trio.sleep(RETRY)
