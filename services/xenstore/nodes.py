"""Requests on nodes: READ, WRITE, MKDIR, RM, DIRECTORY, DIRECTORY_PART,
GET_PERMS, SET_PERMS — permission checks, quotas, and the change itself.

Each handler works on the live store, or on a transaction's private tree when
the header names one; inside a transaction it records what it looked at (for
the conflict check) and the operation (replayed at commit by :func:`replay`),
and fires nothing. Missing nodes answer ENOENT only to a caller that has the
needed access to the deepest existing ancestor, EACCES otherwise, so a guest
cannot tell "missing" from "forbidden" under a node it may not read (C
xenstored ``errno_from_parents``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from services.xenstore.errors import XsError
from services.xenstore.perms import (
    Access,
    Caller,
    PermError,
    access,
    check_set_perms,
    inherit,
)
from services.xenstore.quota import (
    check_node_size,
    check_nodes,
    check_permissions,
    check_transaction_nodes,
    node_record_size,
)
from services.xenstore.store import SPECIAL_NODES, Node, Store, join_path, parent_path, split_path
from services.xenstore.transaction import Transaction
from shared.abi import xs_wire
from shared.abi.xs_wire import XENSTORE_PAYLOAD_MAX, XsMessage, parse_perm

if TYPE_CHECKING:
    from services.xenstore.connection import Connection
    from services.xenstore.core import XenStore


# --- shared helpers ------------------------------------------------------------


def _one_arg(msg: XsMessage) -> bytes:
    args = msg.args()
    if len(args) != 1:
        raise XsError("EINVAL")
    return args[0]


def request_path(conn: Connection, raw: bytes, *, special: bool = False) -> str:
    """Validate a path from the wire and make it absolute for ``conn``."""
    if not xs_wire.is_valid_path(raw, allow_relative=True, allow_special=special):
        raise XsError("EINVAL")
    path = xs_wire.resolve_path(raw.decode("ascii"), conn.domid)
    if special and path in SPECIAL_NODES:
        return path
    if not xs_wire.is_valid_path(path):
        raise XsError("EINVAL")
    return path


def _tree(xs: XenStore, tx: Transaction | None) -> Store:
    return tx.tree if tx is not None else xs.store


def _noted(xs: XenStore, caller: Caller, tx: Transaction | None) -> None:
    if tx is not None and not caller.privileged:
        check_transaction_nodes(xs.quota, len(tx.accessed))


def lookup(
    xs: XenStore, conn: Connection, tree: Store, path: str, need: Access, tx: Transaction | None
) -> Node:
    """The node at ``path`` if ``conn`` has ``need`` on it, else XsError."""
    caller = xs.caller(conn)
    node = tree.get(path)
    if tx is not None:
        tx.note(path, node)
        _noted(xs, caller, tx)
    if node is None:
        _, ancestor = tree.nearest(path)
        raise XsError("ENOENT" if access(caller, ancestor.perms) & need else "EACCES")
    if not access(caller, node.perms) & need:
        raise XsError("EACCES")
    return node


def _missing_paths(path: str, existing: str) -> list[str]:
    out, at = [], existing
    for name in split_path(path)[len(split_path(existing)) :]:
        at = join_path(at, name)
        out.append(at)
    return out


# --- reads ---------------------------------------------------------------------


def do_read(xs: XenStore, conn: Connection, msg: XsMessage, tx: Transaction | None) -> XsMessage:
    path = request_path(conn, _one_arg(msg))
    node = lookup(xs, conn, _tree(xs, tx), path, Access.READ, tx)
    return xs_wire.read_reply(msg, node.value)


def do_directory(
    xs: XenStore, conn: Connection, msg: XsMessage, tx: Transaction | None
) -> XsMessage:
    path = request_path(conn, _one_arg(msg))
    node = lookup(xs, conn, _tree(xs, tx), path, Access.READ, tx)
    reply = xs_wire.directory_reply(msg, node.children)
    if len(reply.payload) > XENSTORE_PAYLOAD_MAX:
        raise XsError("E2BIG")  # the client has to use DIRECTORY_PART
    return reply


def do_directory_part(
    xs: XenStore, conn: Connection, msg: XsMessage, tx: Transaction | None
) -> XsMessage:
    args = msg.args()
    if len(args) != 2 or not args[1].isdigit():
        raise XsError("EINVAL")
    path = request_path(conn, args[0])
    offset = int(args[1])
    node = lookup(xs, conn, _tree(xs, tx), path, Access.READ, tx)
    head = b"%d\0" % node.generation
    rest = xs_wire.join_args(*node.children)[offset:]
    room = XENSTORE_PAYLOAD_MAX - len(head) - 1  # keep a byte for the end marker
    if len(rest) <= room:
        return xs_wire.reply(msg, head + rest + b"\0")
    cut = rest.rfind(b"\0", 0, room) + 1  # whole names only
    return xs_wire.reply(msg, head + rest[:cut])


def do_get_perms(
    xs: XenStore, conn: Connection, msg: XsMessage, tx: Transaction | None
) -> XsMessage:
    path = request_path(conn, _one_arg(msg), special=True)
    tree = _tree(xs, tx)
    if path in SPECIAL_NODES:
        return xs_wire.get_perms_reply(msg, tree.specials[path])
    node = lookup(xs, conn, tree, path, Access.READ, tx)
    return xs_wire.get_perms_reply(msg, node.perms)


# --- changes -------------------------------------------------------------------


def _create_or_update(
    xs: XenStore,
    conn: Connection,
    tx: Transaction | None,
    path: str,
    value: bytes | None,
) -> list[str] | None:
    """WRITE (``value`` given) or MKDIR (``value`` None: only if missing).
    Returns the created paths, or None when MKDIR found the node."""
    tree = _tree(xs, tx)
    caller = xs.caller(conn)
    node = tree.get(path)
    if tx is not None:
        tx.note(path, node)
    if node is not None:
        if not access(caller, node.perms) & Access.WRITE:
            raise XsError("EACCES")
        if value is None:
            return None
        new_nodes, perms, children = 0, node.perms, node.children
    else:
        at, ancestor = tree.nearest(path)
        if not access(caller, ancestor.perms) & Access.WRITE:
            raise XsError("EACCES")
        if tx is not None:
            for created in _missing_paths(path, at):
                tx.note(created, None)
            tx.note_exists(at)
        new_nodes, perms, children = tree.missing(path), inherit(ancestor.perms, caller), {}
    _noted(xs, caller, tx)
    data = value if value is not None else b""
    if not caller.privileged:
        check_node_size(xs.quota, node_record_size(data, perms, children))
        check_nodes(xs.quota, tree.owned, caller.domid, new_nodes)
    created = tree.write(path, data, lambda parent: inherit(parent, caller))
    if tx is not None:
        tx.ops.append(("write", path, data, caller))
    else:
        xs.fire(path, tree.get(path).perms)  # type: ignore[union-attr]
    return created


def do_write(xs: XenStore, conn: Connection, msg: XsMessage, tx: Transaction | None) -> XsMessage:
    raw, value = xs_wire.split_write(msg.payload)
    _create_or_update(xs, conn, tx, request_path(conn, raw), value)
    return xs_wire.ok_reply(msg)


def do_mkdir(xs: XenStore, conn: Connection, msg: XsMessage, tx: Transaction | None) -> XsMessage:
    _create_or_update(xs, conn, tx, request_path(conn, _one_arg(msg)), None)
    return xs_wire.ok_reply(msg)


def do_rm(xs: XenStore, conn: Connection, msg: XsMessage, tx: Transaction | None) -> XsMessage:
    path = request_path(conn, _one_arg(msg))
    if path == "/":
        raise XsError("EINVAL")
    tree = _tree(xs, tx)
    caller = xs.caller(conn)
    node = tree.get(path)
    if tx is not None:
        # The whole subtree: a later read of a removed descendant inside this
        # transaction must be judged against what it was, not "absent".
        for at, below in tree.walk(path):
            tx.note(at, below)
        tx.note(path, node)
        tx.note_exists(parent_path(path))
        _noted(xs, caller, tx)
    if node is None:
        at, ancestor = tree.nearest(path)
        if not access(caller, ancestor.perms) & Access.WRITE:
            raise XsError("EACCES")
        if at != parent_path(path):
            raise XsError("ENOENT")
        return xs_wire.ok_reply(msg)  # removing a missing leaf is not an error
    if not access(caller, node.perms) & Access.WRITE:
        raise XsError("EACCES")
    removed = tree.rm(path)
    if tx is not None:
        tx.ops.append(("rm", path))
    else:
        xs.fire_removed(removed)
    return xs_wire.ok_reply(msg)


def do_set_perms(
    xs: XenStore, conn: Connection, msg: XsMessage, tx: Transaction | None
) -> XsMessage:
    args = msg.args()
    if len(args) < 2:
        raise XsError("EINVAL")
    path = request_path(conn, args[0], special=True)
    perms = tuple(parse_perm(a) for a in args[1:])
    tree = _tree(xs, tx)
    caller = xs.caller(conn)
    if path in SPECIAL_NODES:
        current = tree.specials[path]
    else:
        current = lookup(xs, conn, tree, path, Access.WRITE, tx).perms
    try:
        check_set_perms(caller, current, perms)
    except PermError as exc:
        raise XsError(exc.error) from None
    if not caller.privileged:
        check_permissions(xs.quota, len(perms))
    tree.set_perms(path, perms)
    if tx is not None:
        tx.ops.append(("set_perms", path, perms))
    elif path not in SPECIAL_NODES:
        xs.fire(path, perms)
    return xs_wire.ok_reply(msg)


# --- commit --------------------------------------------------------------------


def replay(xs: XenStore, op: tuple[Any, ...]) -> None:
    """Apply one operation of a committed transaction to the live store and fire
    its watches, exactly as the same request outside a transaction would."""
    store, kind = xs.store, op[0]
    if kind == "write":
        _, path, value, caller = op
        store.write(path, value, lambda parent: inherit(parent, caller))
        xs.fire(path, store.get(path).perms)  # type: ignore[union-attr]
    elif kind == "rm":
        removed = store.rm(op[1])
        if removed:
            xs.fire_removed(removed)
    elif kind == "set_perms":
        _, path, perms = op
        if path in SPECIAL_NODES:
            store.set_perms(path, perms)
        elif store.get(path) is not None:
            store.set_perms(path, perms)
            xs.fire(path, perms)
