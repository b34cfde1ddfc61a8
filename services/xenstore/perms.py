"""Node permissions (xen-reference section 1.7): who may read, write or own a node.

A node's permission list is ordered. Entry 0 names the owner and, with its
letter, the access of every domain not listed after it; entries 1..n override
that default for one domain each. The checks follow C xenstored 4.17
``perm_for_conn``:

1. a privileged connection (dom0, every Unix-socket client) gets everything;
2. the owner gets everything, and so does a domain whose SET_TARGET target
   owns the node (a device model acting for its guest);
3. otherwise the first entry 1..n naming the caller (or its target) decides;
4. otherwise entry 0's letter decides.

Only an owner (or privileged caller) may SET_PERMS, and an unprivileged owner
may not hand the node to another domain (EPERM in C xenstored 4.17; the mirage
server allows it, oxenstored answers EACCES).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import attrs

from shared.abi.xs_wire import Perm, PermKind


class Access(enum.IntFlag):
    """What a caller may do with a node (``XS_PERM_*``)."""

    NONE = 0
    READ = 1
    WRITE = 2
    OWNER = 4  #: may change the node's permissions
    ALL = READ | WRITE | OWNER


_LETTER_ACCESS = {
    PermKind.NONE: Access.NONE,
    PermKind.READ: Access.READ,
    PermKind.WRITE: Access.WRITE,
    PermKind.BOTH: Access.READ | Access.WRITE,
}

Perms = tuple[Perm, ...]

#: what C xenstored gives "/" and the nodes it creates itself: owned by dom0, no access
DOM0_ONLY: Perms = (Perm(PermKind.NONE, 0),)


@attrs.frozen
class Caller:
    """The identity a request is checked against."""

    domid: int  #: the connection's domain (0 for the Unix socket)
    privileged: bool  #: dom0 and socket clients bypass every check
    target: int | None = None  #: domain this one acts for (XS_SET_TARGET)


def access(caller: Caller, perms: Sequence[Perm]) -> Access:
    """The access ``caller`` has to a node whose list is ``perms``."""
    if caller.privileged:
        return Access.ALL
    owner = perms[0].domid
    if owner == caller.domid or (caller.target is not None and owner == caller.target):
        return Access.ALL
    for entry in perms[1:]:
        if entry.domid == caller.domid or (
            caller.target is not None and entry.domid == caller.target
        ):
            return _LETTER_ACCESS[entry.kind]
    return _LETTER_ACCESS[perms[0].kind]


def can_read(caller: Caller, perms: Sequence[Perm]) -> bool:
    return bool(access(caller, perms) & Access.READ)


def can_write(caller: Caller, perms: Sequence[Perm]) -> bool:
    return bool(access(caller, perms) & Access.WRITE)


def inherit(parent: Perms, caller: Caller) -> Perms:
    """Permissions of a node ``caller`` creates under a node with ``parent``:
    the parent's list, with the owner replaced by an unprivileged creator (so a
    guest owns — and is charged for — what it creates)."""
    if caller.privileged or parent[0].domid == caller.domid:
        return parent
    return (Perm(parent[0].kind, caller.domid), *parent[1:])


class PermError(Exception):
    """A refused permission change; ``error`` is the XS_ERROR name."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


def check_set_perms(caller: Caller, current: Perms, new: Perms) -> None:
    """Raise :class:`PermError` unless ``caller`` may replace ``current`` by ``new``.

    EACCES if the caller does not own the node; EPERM if an unprivileged owner
    tries to change the owner (C xenstored 4.17, XSA-115 follow-up)."""
    if not new:
        raise PermError("EINVAL")
    if not access(caller, current) & Access.OWNER:
        raise PermError("EACCES")
    if not caller.privileged and new[0].domid != current[0].domid:
        raise PermError("EPERM")


def format_list(perms: Sequence[Perm]) -> str:
    """Human form, ``n0 r5``, as the 1.7 examples and store dumps write it."""
    return " ".join(str(p) for p in perms)
