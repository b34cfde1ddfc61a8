"""Per-domain quotas of C xenstored 4.17 (xen-reference section 1.8).

Quotas bind unprivileged domains only; dom0 and socket clients are exempt. The
errors are the ones C xenstored uses: ENOSPC for nodes, node size, permission
entries, transactions and transaction nodes; E2BIG for watches (4.17; master
moved to ENOSPC). The outstanding-request quota is not an error at all: at the
limit the service simply stops reading that connection until replies drain.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import attrs

from shared.abi.xs_wire import Perm


@attrs.frozen
class Quota:
    """Limits for one unprivileged domain (defaults of C xenstored 4.17)."""

    nodes: int = 1000  #: nodes owned by the domain (``-E entry-nb``)
    node_size: int = 2048  #: stored record: value + perms + child names (``-S``)
    watches: int = 128  #: watches per connection (``-W``)
    transactions: int = 10  #: transactions open at once per connection (``-t``)
    permissions: int = 5  #: perm entries per node, owner entry included (``-A``)
    transaction_nodes: int = 1024  #: distinct nodes touched in one transaction
    outstanding: int = 20  #: requests whose replies are not yet delivered
    privileged_outstanding: int = 1024  #: same, for dom0 (pipelining tools, backends)

    def describe(self) -> str:
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in attrs.fields(Quota))


class QuotaExceeded(Exception):
    """A request refused by a quota; ``error`` is the XS_ERROR name."""

    def __init__(self, quota: str, error: str = "ENOSPC") -> None:
        super().__init__(f"{quota} quota exceeded")
        self.quota = quota
        self.error = error


def node_record_size(value: bytes, perms: Sequence[Perm], children: Iterable[str]) -> int:
    """What C xenstored charges against ``node-size``: the value, each perm entry
    and each child name with its NUL (a fixed header is left out, so the limit
    is slightly more generous than C's for the same value)."""
    return (
        len(value)
        + sum(len(str(p)) + 1 for p in perms)
        + sum(len(name.encode()) + 1 for name in children)
    )


def check_nodes(quota: Quota, owned: Mapping[int, int], domid: int, new_nodes: int) -> None:
    if new_nodes and owned.get(domid, 0) + new_nodes > quota.nodes:
        raise QuotaExceeded("nodes")


def check_node_size(quota: Quota, size: int) -> None:
    if size > quota.node_size:
        raise QuotaExceeded("node-size")


def check_permissions(quota: Quota, count: int) -> None:
    if count > quota.permissions:
        raise QuotaExceeded("node-permissions")


def check_watches(quota: Quota, count: int) -> None:
    """``count`` is the number of watches the connection would have."""
    if count > quota.watches:
        raise QuotaExceeded("watches", "E2BIG")


def check_transactions(quota: Quota, count: int) -> None:
    if count > quota.transactions:
        raise QuotaExceeded("transactions")


def check_transaction_nodes(quota: Quota, count: int) -> None:
    if count > quota.transaction_nodes:
        raise QuotaExceeded("transaction-nodes")
