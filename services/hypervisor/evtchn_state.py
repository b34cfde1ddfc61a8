"""Records of the event-channel core: the per-port table (introspection and
migration) and the counters. All are codec messages so the control channel and
the migration stream carry them as they are.
"""

from __future__ import annotations

from shared.codec import message


@message(250)
class ChannelRecord:
    """One port of a domain as ``EVTCHNOP_status`` and the shared page see it."""

    port: int
    state: int  #: an EVTCHNSTAT value
    vcpu: int  #: notify vCPU
    remote_dom: int  #: unbound: allowed binder; interdomain: peer domain
    remote_port: int  #: interdomain: peer port
    virq: int  #: virq: which VIRQ
    pending: bool
    masked: bool


@message(251)
class EvtchnState:
    """A domain's whole event-channel state, for save/restore and migration."""

    domid: int
    max_port: int
    callback_via: str  #: a ``callback.Via`` value
    callback_vector: int
    callback_raw: int  #: the HVM_PARAM_CALLBACK_IRQ value as written
    upcall_vectors: dict[int, int]  #: vCPU -> per-vCPU upcall vector
    channels: tuple[ChannelRecord, ...]


@message(220)
class EvtchnStats:
    """Counters of the event-channel core: operations and failures by op name,
    upcalls produced, ports allocated host-wide."""

    ops: dict[str, int]
    errors: dict[str, int]
    upcalls: int
    ports_in_use: int
