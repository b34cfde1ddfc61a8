"""Messages every service understands, and the codec tag ranges.

Tags are small integers, unique across the project; each service family owns a
range so tags never collide:

==========  ==========================================
1-9         transport (connection hand-off)
10-49       control: ping, status, faults, shutdown (this module)
100-299     hypervisor (hypercalls, upcalls, domain control)
300-399     xenstored
400-499     guest kernel (frontend)
500-599     backends (blkback, netback)
600-699     migration
700-799     toolstack and supervisor
9000-9099   benchmarks and tests
==========  ==========================================
"""

from __future__ import annotations

from typing import Any

from shared.codec import message


@message(10)
class Ping:
    nonce: int


@message(11)
class Pong:
    nonce: int
    service: str
    pid: int


@message(12)
class StatusRequest:
    pass


@message(13)
class StatusReply:
    """A service's identity and counters: ``stats`` maps a group name (the
    transport server, each core table) to its ``statistics()`` as a dict."""

    service: str
    pid: int
    uptime: float
    stats: dict[str, Any]


@message(14)
class SetFaults:
    """Switch the fault plan on the frames this service sends
    (see :class:`shared.transport.FaultPlan`)."""

    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    delay_min: float = 0.0
    delay_max: float = 0.0
    partition: bool = False
    seed: int = 0


@message(15)
class Ack:
    pass


@message(16)
class ShutdownRequest:
    """Ask a service to stop cleanly (the supervisor's first step)."""

    pass
