"""The XenStore state machine: one request in, the reply and watch events out.

:meth:`XenStore.handle` takes a parsed :class:`XsMessage` from a connection and
returns ``[(connection, message), ...]``: watch events for any connection, then
the reply (C xenstored queues the events of a write before its ack; a WATCH is
acked before its first event). No I/O happens here; the adapter in
``server.py`` delivers what is returned, and makes the changes recorded in
:meth:`take_records` durable first.

Node requests (READ, WRITE, MKDIR, RM, DIRECTORY, DIRECTORY_PART, GET_PERMS,
SET_PERMS) live in ``nodes.py``; domain requests (INTRODUCE, RELEASE, ...) in
``domain.py``; CONTROL in ``control.py``. This module dispatches, checks what
every request shares (type, privilege, transaction id), runs watches and
transactions, and counts.
"""

from __future__ import annotations

import collections
import sys
import traceback
from collections.abc import Callable
from typing import Any

import attrs

from services.xenstore import control, domain, nodes
from services.xenstore.connection import Connection
from services.xenstore.errors import XsError
from services.xenstore.perms import Perms, can_read
from services.xenstore.quota import Quota, QuotaExceeded, check_transactions, check_watches
from services.xenstore.store import Node, Store
from services.xenstore.transaction import Transaction
from services.xenstore.watch import Watch
from shared.abi import xs_wire
from shared.abi.xs_wire import XsMessage, XsPayloadError, XsType

Output = tuple[Connection, XsMessage]
Handler = Callable[["XenStore", Connection, XsMessage, "Transaction | None"], XsMessage]


# Requests only dom0 (or a socket client) may make: EACCES from anyone else.
PRIVILEGED_ONLY = frozenset(
    {
        XsType.CONTROL,
        XsType.INTRODUCE,
        XsType.RELEASE,
        XsType.IS_DOMAIN_INTRODUCED,
        XsType.RESUME,
        XsType.SET_TARGET,
    }
)
# Requests that ignore the header's tx_id.
NO_TRANSACTION = frozenset({XsType.WATCH, XsType.UNWATCH})


@attrs.frozen
class XenStoreStats:
    connections: int
    nodes: int
    watches: int
    transactions_open: int
    requests: dict[str, int]  #: by XS type name
    errors: dict[str, int]  #: by XS_ERROR name
    quota_refusals: dict[str, int]  #: by quota name
    watch_events: int
    transactions_committed: int
    transactions_conflicted: int
    transactions_aborted: int
    malformed_frames: int
    dropped_connections: int
    internal_errors: int


@attrs.define(eq=False)
class XenStore:
    """The whole of xenstored's state, without I/O."""

    store: Store = attrs.field(factory=lambda: domain.initial_store())
    quota: Quota = attrs.field(factory=Quota)
    connections: dict[Connection, None] = attrs.field(factory=dict)
    domains: dict[int, domain.Domain] = attrs.field(factory=dict)
    targets: dict[int, int] = attrs.field(factory=dict)  #: domid -> domain it acts for
    log_level: str = "info"
    log: Callable[[str], None] = attrs.field(default=lambda text: print(text, file=sys.stderr))
    _records: list[list[Any]] = attrs.field(factory=list)
    _events: list[Output] = attrs.field(factory=list)
    requests: collections.Counter[str] = attrs.field(factory=collections.Counter)
    errors: collections.Counter[str] = attrs.field(factory=collections.Counter)
    quota_refusals: collections.Counter[str] = attrs.field(factory=collections.Counter)
    watch_events: int = 0
    committed: int = 0
    conflicted: int = 0
    aborted: int = 0
    malformed_frames: int = 0
    dropped_connections: int = 0
    internal_errors: int = 0

    # --- connections --------------------------------------------------------

    def connect(self, domid: int, label: str = "", privileged: bool | None = None) -> Connection:
        conn = Connection(domid, label, privileged)
        self.connections[conn] = None
        return conn

    def disconnect(self, conn: Connection) -> None:
        """Forget a connection: its watches go and its transactions abort."""
        self.aborted += conn.transactions.clear()
        conn.watches.clear()
        self.connections.pop(conn, None)

    def caller(self, conn: Connection) -> Any:
        return conn.caller(self.targets.get(conn.domid))

    # --- requests -------------------------------------------------------------

    def handle(self, conn: Connection, msg: XsMessage) -> list[Output]:
        """Process one request; returns events (for anyone) and the reply."""
        self._events = []
        try:
            kind = XsType(msg.type) if msg.type in _HANDLERS else None
            self.requests[kind.name if kind is not None else f"type-{msg.type}"] += 1
            if kind is None:
                raise XsError("ENOSYS")
            if kind in PRIVILEGED_ONLY and not conn.privileged:
                raise XsError("EACCES")
            tx = None
            if msg.tx_id and kind not in NO_TRANSACTION:
                tx = conn.transactions.get(msg.tx_id)
                if tx is None:
                    raise XsError("ENOENT")
            reply = _HANDLERS[kind](self, conn, msg, tx)
        except XsError as exc:
            reply = self._refuse(msg, exc.name)
        except QuotaExceeded as exc:
            self.quota_refusals[exc.quota] += 1
            reply = self._refuse(msg, exc.error)
        except XsPayloadError:
            reply = self._refuse(msg, "EINVAL")
        except Exception as exc:  # a bug: answer, keep serving, say so loudly
            self.internal_errors += 1
            self.log(f"xenstored: internal error on {msg}: {exc!r}")
            traceback.print_exception(exc, file=sys.stderr)
            reply = self._refuse(msg, "EIO")
        self._take_log()
        events, self._events = self._events, []
        if msg.type == XsType.WATCH and reply.type == XsType.WATCH:
            return [(conn, reply), *events]
        events.append((conn, reply))
        return events

    def report_shutdown(self, domid: int) -> list[Output]:
        """The hypervisor says ``domid`` shut down, crashed or is gone: the
        ``@releaseDomain`` events to send (nothing if already reported)."""
        self._events = []
        domain.domain_shutdown(self, domid)
        self._take_log()
        events, self._events = self._events, []
        return events

    def _refuse(self, msg: XsMessage, name: str) -> XsMessage:
        self.errors[name] += 1
        return xs_wire.error_reply(msg, name)

    # --- watches --------------------------------------------------------------

    def fire(self, path: str, perms: Perms, exact: bool = False) -> None:
        """Queue an event for every watch ``path`` fires whose owner may read a
        node with ``perms`` (the node's permissions, or before a removal the
        removed node's)."""
        for conn in self.connections:
            if not conn.watches:
                continue
            allowed: bool | None = None
            for watch in conn.watches.matching(path, exact):
                if allowed is None:
                    allowed = can_read(self.caller(conn), perms)
                if not allowed:
                    break
                self._events.append(
                    (conn, xs_wire.watch_event(watch.event_path(path), watch.token))
                )
                self.watch_events += 1

    def fire_special(self, name: str) -> None:
        """``@introduceDomain`` / ``@releaseDomain``: to dom0 and to domains given
        read access to the name with SET_PERMS."""
        self.fire(name, self.store.specials[name], exact=True)

    def fire_removed(self, removed: list[tuple[str, Node]]) -> None:
        """RM: the removed root for watches at or above it, then an exact event for
        each removed descendant that a watch names."""
        root_path, root = removed[0]
        self.fire(root_path, root.perms)
        for path, node in removed[1:]:
            self.fire(path, node.perms, exact=True)

    def do_watch(self, conn: Connection, msg: XsMessage, tx: Transaction | None) -> XsMessage:
        path, token = _watch_args(msg)
        watch = Watch.register(path, token, conn.domid)
        if not conn.privileged:
            check_watches(self.quota, len(conn.watches) + 1)
        if not conn.watches.add(watch):
            raise XsError("EEXIST")
        # The first event, always, even for a missing node: clients rely on it.
        self._events.append((conn, xs_wire.watch_event(watch.path, token)))
        self.watch_events += 1
        return xs_wire.ok_reply(msg)

    def do_unwatch(self, conn: Connection, msg: XsMessage, tx: Transaction | None) -> XsMessage:
        path, token = _watch_args(msg)
        watch = Watch.register(path, token, conn.domid)
        if not conn.watches.remove(watch.node, token):
            raise XsError("ENOENT")
        return xs_wire.ok_reply(msg)

    def do_reset_watches(
        self, conn: Connection, msg: XsMessage, tx: Transaction | None
    ) -> XsMessage:
        conn.watches.clear()
        self.aborted += conn.transactions.clear()
        return xs_wire.ok_reply(msg)

    # --- transactions ---------------------------------------------------------

    def do_transaction_start(
        self, conn: Connection, msg: XsMessage, tx: Transaction | None
    ) -> XsMessage:
        if tx is not None:
            raise XsError("EBUSY")  # no nesting
        if not conn.privileged:
            check_transactions(self.quota, len(conn.transactions) + 1)
        new = conn.transactions.start(self.store)
        return xs_wire.transaction_start_reply(msg, new.id)

    def do_transaction_end(
        self, conn: Connection, msg: XsMessage, tx: Transaction | None
    ) -> XsMessage:
        if tx is None:
            raise XsError("ENOENT")
        args = msg.args()
        if args not in ([b"T"], [b"F"]):
            raise XsError("EINVAL")
        conn.transactions.end(tx.id)
        if args == [b"F"]:
            self.aborted += 1
            return xs_wire.ok_reply(msg)
        if tx.conflicts(self.store):
            self.conflicted += 1
            raise XsError("EAGAIN")
        for op in tx.ops:
            nodes.replay(self, op)
        self.committed += 1
        return xs_wire.ok_reply(msg)

    # --- durability -----------------------------------------------------------

    def _take_log(self) -> None:
        if self.store.log:
            self._records.append(self.store.log)
            self.store.log = []

    def take_records(self) -> list[list[Any]]:
        """Journal records of the changes made since the last call: one record
        per request (a whole committed transaction is one record)."""
        records, self._records = self._records, []
        return records

    def apply_record(self, record: list[Any]) -> None:
        """Replay one journal record (restart)."""
        for change in record:
            if change[0] in domain.RECORD_KINDS:
                domain.apply(self, change)
            else:
                self.store.apply(change)
        self.store.log = []

    def snapshot(self) -> dict[str, Any]:
        """Everything that must survive a restart or a migration."""
        return {
            "store": self.store.serialise(),
            "domains": [[d.domid, d.gfn, d.port, d.shutdown] for d in self.domains.values()],
            "targets": [[k, v] for k, v in self.targets.items()],
        }

    def restore(self, snap: dict[str, Any]) -> None:
        self.store = Store.deserialise(snap["store"])
        self.domains = {d[0]: domain.Domain(*d) for d in snap["domains"]}
        self.targets = {k: v for k, v in snap["targets"]}

    def statistics(self) -> XenStoreStats:
        return XenStoreStats(
            connections=len(self.connections),
            nodes=self.store.node_count,
            watches=sum(len(c.watches) for c in self.connections),
            transactions_open=sum(len(c.transactions) for c in self.connections),
            requests=dict(self.requests),
            errors=dict(self.errors),
            quota_refusals=dict(self.quota_refusals),
            watch_events=self.watch_events,
            transactions_committed=self.committed,
            transactions_conflicted=self.conflicted,
            transactions_aborted=self.aborted,
            malformed_frames=self.malformed_frames,
            dropped_connections=self.dropped_connections,
            internal_errors=self.internal_errors,
        )


def _watch_args(msg: XsMessage) -> tuple[str, bytes]:
    args = msg.args()
    if len(args) < 2:  # a third (depth) argument is ignored, as in 4.17
        raise XsError("EINVAL")
    if not xs_wire.is_valid_path(args[0], allow_relative=True, allow_special=True):
        raise XsError("EINVAL")
    return args[0].decode("ascii"), args[1]


_HANDLERS: dict[int, Handler] = {
    XsType.CONTROL: control.do_control,
    XsType.DIRECTORY: nodes.do_directory,
    XsType.READ: nodes.do_read,
    XsType.GET_PERMS: nodes.do_get_perms,
    XsType.WATCH: XenStore.do_watch,
    XsType.UNWATCH: XenStore.do_unwatch,
    XsType.TRANSACTION_START: XenStore.do_transaction_start,
    XsType.TRANSACTION_END: XenStore.do_transaction_end,
    XsType.INTRODUCE: domain.do_introduce,
    XsType.RELEASE: domain.do_release,
    XsType.GET_DOMAIN_PATH: domain.do_get_domain_path,
    XsType.WRITE: nodes.do_write,
    XsType.MKDIR: nodes.do_mkdir,
    XsType.RM: nodes.do_rm,
    XsType.SET_PERMS: nodes.do_set_perms,
    XsType.IS_DOMAIN_INTRODUCED: domain.do_is_domain_introduced,
    XsType.RESUME: domain.do_resume,
    XsType.SET_TARGET: domain.do_set_target,
    XsType.RESET_WATCHES: XenStore.do_reset_watches,
    XsType.DIRECTORY_PART: nodes.do_directory_part,
}
