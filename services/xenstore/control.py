"""XS_CONTROL (alias XS_DEBUG): dom0's maintenance commands.

``cmd\\0[args\\0]*`` in, text out. The command set follows C xenstored's where
it makes sense here (``help``, ``log``, ``print``, ``quota``, ``check``) and adds
``dump [path]``: the store (or a subtree) one node per line, cut to fit one
reply (4096 bytes; the last line then says so). Unknown commands get EINVAL,
as in C xenstored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.xenstore.errors import XsError
from shared.abi import xs_wire
from shared.abi.xs_wire import XENSTORE_PAYLOAD_MAX, XsMessage

if TYPE_CHECKING:
    from services.xenstore.connection import Connection
    from services.xenstore.core import XenStore
    from services.xenstore.transaction import Transaction

LOG_LEVELS = ("off", "error", "info", "debug")
TRUNCATED = b"... (truncated)\n"

HELP = """Commands:
help               this text
log [LEVEL]        show or set the log level (off error info debug)
print TEXT         write TEXT to xenstored's log
dump [PATH]        the store below PATH (default /), one node per line
quota              the quotas applied to unprivileged domains
check              check the store's internal consistency
"""


def _text_reply(msg: XsMessage, text: str | bytes) -> XsMessage:
    data = text.encode() if isinstance(text, str) else text
    room = XENSTORE_PAYLOAD_MAX - 1
    if len(data) > room:
        data = data[: room - len(TRUNCATED)] + TRUNCATED
    return xs_wire.reply(msg, data + b"\0")


def do_control(xs: XenStore, conn: Connection, msg: XsMessage, tx: Transaction | None) -> XsMessage:
    args = msg.args()
    if not args:
        raise XsError("EINVAL")
    cmd, rest = args[0], [a.decode("ascii", "replace") for a in args[1:]]
    if cmd == b"help":
        return _text_reply(msg, HELP)
    if cmd == b"log":
        if rest:
            if rest[0] not in LOG_LEVELS:
                raise XsError("EINVAL")
            xs.log_level = rest[0]
        return _text_reply(msg, f"log level {xs.log_level}\n")
    if cmd == b"print":
        xs.log(f"xenstored: {' '.join(rest)}")
        return xs_wire.ok_reply(msg)
    if cmd == b"dump":
        path = rest[0] if rest else "/"
        if not xs_wire.is_valid_path(path) or xs.store.get(path) is None:
            raise XsError("ENOENT")
        return _text_reply(msg, xs.store.dump(path))
    if cmd == b"quota":
        return _text_reply(msg, xs.quota.describe() + "\n")
    if cmd == b"check":
        problems = check(xs)
        return _text_reply(msg, "\n".join(problems) + "\n" if problems else "OK\n")
    raise XsError("EINVAL")


def check(xs: XenStore) -> list[str]:
    """Inconsistencies between the tree and its bookkeeping (empty: none)."""
    counted: dict[int, int] = {}
    for _, node in xs.store.walk():
        counted[node.owner] = counted.get(node.owner, 0) + 1
    if counted != xs.store.owned:
        return [f"node counts {xs.store.owned} but tree has {counted}"]
    return []
