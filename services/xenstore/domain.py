"""Domains: INTRODUCE, RELEASE, IS_DOMAIN_INTRODUCED, RESUME, SET_TARGET,
GET_DOMAIN_PATH, the default tree, and ``@introduceDomain``/``@releaseDomain``.

The tree a fresh xenstored holds is what C xenstored and dom0's init scripts
leave (``/``, ``/tool/xenstored``, ``/local/domain/0``) plus ``/vm`` that a
toolstack expects; all owned by dom0 with no access for others (``n0``). When
a domain is introduced and its home does not exist yet, the home is created
with the ownership libxl gives it (xen-reference 1.10): read-only to the guest
(``n0 r<D>``) for the home, ``cpu``, ``memory``, ``device`` and ``control``;
owned by the guest (``n<D>``) for the keys it must write.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from services.xenstore.errors import XsError
from services.xenstore.perms import DOM0_ONLY, Perms
from services.xenstore.store import Store
from shared.abi import xs_wire
from shared.abi.xs_wire import Perm, PermKind, XsMessage

if TYPE_CHECKING:
    from services.xenstore.connection import Connection
    from services.xenstore.core import XenStore
    from services.xenstore.transaction import Transaction

DOMID_FIRST_RESERVED = 0x7FF0
RECORD_KINDS = ("introduce", "release", "target", "shutdown")

# Keys under the home a guest must be able to write (libxl_create.c "rw" paths).
GUEST_WRITABLE = (
    "device/suspend/event-channel",
    "control/shutdown",
    "control/feature-poweroff",
    "control/feature-reboot",
    "control/feature-suspend",
    "control/feature-s3",
    "control/feature-s4",
    "control/sysrq",
    "data",
    "drivers",
    "feature",
    "attr",
    "error",
)
GUEST_READ_ONLY = ("cpu", "memory", "device", "control")


@attrs.define
class Domain:
    """An introduced domain."""

    domid: int
    gfn: int  #: frame of its xenstore ring page
    port: int  #: its end of the xenstore event channel
    shutdown: bool = False  #: @releaseDomain fired; RESUME clears it


def initial_store() -> Store:
    store = Store.empty()
    for path in ("/local/domain/0", "/tool/xenstored", "/vm"):
        store.write(path, b"", lambda parent: DOM0_ONLY)
    store.write("/local/domain/0/domid", b"0", lambda parent: DOM0_ONLY)
    store.write("/local/domain/0/name", b"Domain-0", lambda parent: DOM0_ONLY)
    store.log = []  # rebuilt identically at every start: not journalled
    return store


def create_home(xs: XenStore, domid: int) -> None:
    """The default tree of a new domain (nothing if its home already exists)."""
    home = xs_wire.domain_path(domid)
    if xs.store.get(home) is not None:
        return
    ro: Perms = (Perm(PermKind.NONE, 0), Perm(PermKind.READ, domid))
    rw: Perms = (Perm(PermKind.NONE, domid),)
    writes = [(home, b"", ro), (f"{home}/domid", str(domid).encode(), ro)]
    writes += [(f"{home}/{key}", b"", ro) for key in GUEST_READ_ONLY]
    writes += [(f"{home}/control/platform-feature-xs_reset_watches", b"1", ro)]
    writes += [(f"{home}/{key}", b"", rw) for key in GUEST_WRITABLE]
    for path, value, perms in writes:
        xs.store.write(path, value, lambda parent, perms=perms: perms)
        xs.fire(path, perms)


def _domid(raw: bytes) -> int:
    if not raw.isdigit() or int(raw) >= DOMID_FIRST_RESERVED:
        raise XsError("EINVAL")
    return int(raw)


def _args(msg: XsMessage, count: int) -> list[bytes]:
    args = msg.args()
    if len(args) < count:
        raise XsError("EINVAL")
    return args


def do_introduce(
    xs: XenStore, conn: Connection, msg: XsMessage, tx: Transaction | None
) -> XsMessage:
    raw_domid, raw_gfn, raw_port = _args(msg, 3)[:3]
    domid = _domid(raw_domid)
    if not raw_gfn.isdigit() or not raw_port.isdigit() or domid == 0:
        raise XsError("EINVAL")
    if domid in xs.domains:
        return xs_wire.ok_reply(msg)  # re-introduction: no second event
    xs.domains[domid] = Domain(domid, int(raw_gfn), int(raw_port))
    xs.store.log.append(["introduce", domid, int(raw_gfn), int(raw_port)])
    create_home(xs, domid)
    xs.fire_special("@introduceDomain")
    return xs_wire.ok_reply(msg)


def do_release(xs: XenStore, conn: Connection, msg: XsMessage, tx: Transaction | None) -> XsMessage:
    domid = _domid(_args(msg, 1)[0])
    if domid not in xs.domains:
        raise XsError("ENOENT")
    release(xs, domid)
    return xs_wire.ok_reply(msg)


def release(xs: XenStore, domid: int) -> None:
    """Forget a domain: its connections lose watches and transactions."""
    del xs.domains[domid]
    xs.targets.pop(domid, None)
    for conn in list(xs.connections):
        if conn.domid == domid and not conn.privileged:
            xs.aborted += conn.transactions.clear()
            conn.watches.clear()
    xs.store.log.append(["release", domid])
    xs.fire_special("@releaseDomain")


def domain_shutdown(xs: XenStore, domid: int) -> None:
    """The hypervisor reports a domain shut down or crashed: @releaseDomain."""
    dom = xs.domains.get(domid)
    if dom is None or dom.shutdown:
        return
    dom.shutdown = True
    xs.store.log.append(["shutdown", domid, True])
    xs.fire_special("@releaseDomain")


def do_is_domain_introduced(
    xs: XenStore, conn: Connection, msg: XsMessage, tx: Transaction | None
) -> XsMessage:
    domid = _domid(_args(msg, 1)[0])
    return xs_wire.bool_reply(msg, domid == 0 or domid in xs.domains)


def do_resume(xs: XenStore, conn: Connection, msg: XsMessage, tx: Transaction | None) -> XsMessage:
    domid = _domid(_args(msg, 1)[0])
    dom = xs.domains.get(domid)
    if dom is None:
        raise XsError("ENOENT")
    if dom.shutdown:
        dom.shutdown = False
        xs.store.log.append(["shutdown", domid, False])
    return xs_wire.ok_reply(msg)


def do_set_target(
    xs: XenStore, conn: Connection, msg: XsMessage, tx: Transaction | None
) -> XsMessage:
    raw_domid, raw_target = _args(msg, 2)[:2]
    domid, target = _domid(raw_domid), _domid(raw_target)
    if domid not in xs.domains or target not in xs.domains:
        raise XsError("ENOENT")
    xs.targets[domid] = target
    xs.store.log.append(["target", domid, target])
    return xs_wire.ok_reply(msg)


def do_get_domain_path(
    xs: XenStore, conn: Connection, msg: XsMessage, tx: Transaction | None
) -> XsMessage:
    args = msg.args()
    if len(args) != 1:
        raise XsError("EINVAL")
    # An empty argument is domid 0 (C atoi; ocaml-xenstore's legacy vector).
    domid = _domid(args[0]) if args[0] else 0
    return xs_wire.get_domain_path_reply(msg, xs_wire.domain_path(domid))


def apply(xs: XenStore, change: list[Any]) -> None:
    """Replay a domain record of the journal."""
    kind = change[0]
    if kind == "introduce":
        xs.domains[change[1]] = Domain(change[1], change[2], change[3])
    elif kind == "release":
        xs.domains.pop(change[1], None)
        xs.targets.pop(change[1], None)
    elif kind == "target":
        xs.targets[change[1]] = change[2]
    elif kind == "shutdown" and change[1] in xs.domains:
        xs.domains[change[1]].shutdown = change[2]
