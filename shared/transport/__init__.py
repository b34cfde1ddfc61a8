"""domsplit's transport: Trio channels over nng (pynng) with a fault hook.

- :func:`open_server` — a service endpoint routing requests to handlers.
- :func:`open_channel` — a client's channel: ``call`` (request/response with
  ids and timeouts), ``send``/``receive`` (one-way both ways).
- :class:`FaultPlan` — drop, delay, duplicate, reorder, partition for one link.
"""

from shared.transport._channel import Channel, ChannelStats, open_channel
from shared.transport._faults import FaultInjector, FaultPlan, FaultStats
from shared.transport._nng import TransportClosed
from shared.transport._server import Peer, Server, ServerStats, open_server
from shared.transport._wire import CallTimeout, PeerLost, RemoteError, ServiceError

__all__ = [
    "CallTimeout",
    "Channel",
    "ChannelStats",
    "FaultInjector",
    "FaultPlan",
    "FaultStats",
    "Peer",
    "PeerLost",
    "RemoteError",
    "Server",
    "ServerStats",
    "ServiceError",
    "TransportClosed",
    "open_channel",
    "open_server",
]
