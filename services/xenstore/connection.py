"""Connections and who they are.

A connection is one client: a Unix-socket client (always dom0, privileged, as
in C xenstored), or an nng peer bound to a domid. Its state — watches, open
transactions, outstanding replies — is plain data the core owns; the adapter
only attaches ``sink``, the function that delivers bytes to the client.

Binding an nng peer to a domid is the rule that stops a guest from claiming
another domain's identity, so it lives here with its own tests
(:class:`BindTable`): a peer proves who it is with a token. The host secret
(a file in the run directory readable by the host's own services only) lets a
dom0 service bind as any domain — the toolstack binds as 0, and the
hypervisor, which builds domains, vouches for a guest by registering a
one-domain token for it. A guest holding its own token can bind only as itself.
"""

from __future__ import annotations

import hmac
import itertools
from collections.abc import Callable
from typing import Any

import attrs

from services.xenstore.perms import Caller
from services.xenstore.transaction import TransactionTable
from services.xenstore.watch import WatchTable

_ids = itertools.count(1)


@attrs.define(eq=False)
class Connection:
    """One client of xenstored."""

    domid: int  #: the domain requests are made as
    label: str = ""  #: for logs: ``socket 3``, ``nng pipe 7``
    privileged: bool = attrs.field(default=None)  #: dom0 and socket clients
    watches: WatchTable = attrs.field(factory=WatchTable)
    transactions: TransactionTable = attrs.field(factory=TransactionTable)
    outstanding: int = 0  #: replies produced but not yet handed to the transport
    sink: Callable[[Any], None] | None = None  #: set by the adapter
    id: int = attrs.field(factory=lambda: next(_ids))

    def __attrs_post_init__(self) -> None:
        if self.privileged is None:
            self.privileged = self.domid == 0

    def caller(self, target: int | None) -> Caller:
        return Caller(self.domid, self.privileged, target)

    def __repr__(self) -> str:
        return f"<conn {self.id} dom{self.domid} {self.label}>"


class BindRefused(Exception):
    """A peer's bind request was refused; the message says why."""


@attrs.define(eq=False)
class BindTable:
    """Which tokens prove which domid for nng peers."""

    secret: bytes  #: the host secret: whoever reads it is a dom0 service
    tokens: dict[int, bytes] = attrs.field(factory=dict)  #: domid -> token vouched for it

    def register(self, registrar: Connection, domid: int, token: bytes) -> None:
        """``registrar`` (bound as dom0) vouches that ``token`` proves ``domid``."""
        if not registrar.privileged:
            raise BindRefused("only dom0 may vouch for a domain")
        if domid == 0 or not 0 < domid < 0x7FF0:
            raise BindRefused(f"cannot vouch for domid {domid}")
        if len(token) < 16:
            raise BindRefused("a token must be at least 16 bytes")
        self.tokens[domid] = bytes(token)

    def revoke(self, domid: int) -> None:
        self.tokens.pop(domid, None)

    def bind(self, domid: int, token: bytes) -> int:
        """The domid a peer presenting ``token`` may act as, or raise."""
        if not 0 <= domid < 0x7FF0:
            raise BindRefused(f"domid {domid} is not a domain")
        if self.secret and hmac.compare_digest(token, self.secret):
            return domid
        expected = self.tokens.get(domid)
        if expected is not None and hmac.compare_digest(token, expected):
            return domid
        raise BindRefused(f"token does not prove domid {domid}")
