"""The XenStore wire protocol (``xen/io/xs_wire.h``, docs xen-reference section 1).

Every message, on the unix socket and on the shared ring alike, is a 16-byte
``struct xsd_sockmsg`` header (four host-order u32: type, req_id, tx_id, len)
followed by ``len <= XENSTORE_PAYLOAD_MAX`` payload bytes. Payloads are lists of
NUL-terminated strings, with two exceptions that clients depend on: a READ reply
carries the value with no terminator, and a WRITE request's value is everything
after the path's NUL (it may itself contain NULs).

This module is sans-IO: :class:`XsParser` turns a byte stream cut anywhere into
:class:`XsMessage` records, and the builders below produce requests and replies.
Path and permission syntax (sections 1.4 and 1.7) are checked here too, so the
server and its tests share one definition.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from typing import Final

import attrs

from shared.abi._layout import layout
from shared.abi.constants import XenErrno


class XsType(enum.IntEnum):
    """``enum xsd_sockmsg_type``: ``XS_READ`` is ``XsType.READ``."""

    CONTROL = 0
    DEBUG = 0  # the header's alias of XS_CONTROL
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    # 20 was XS_RESTRICT, removed from the protocol: a request with it gets ENOSYS.
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    # Newer than the 4.17 header; named so a server can recognise (and refuse) them.
    GET_FEATURE = 23
    SET_FEATURE = 24
    GET_QUOTA = 25
    SET_QUOTA = 26
    INVALID = 0xFFFF


XS_TYPE_COUNT: Final = 23  # valid types in the 4.17 header (0..22)
XS_WATCH_PATH: Final = 0  # enum xs_watch_type: argument index in a WATCH_EVENT
XS_WATCH_TOKEN: Final = 1

XENSTORE_PAYLOAD_MAX: Final = 4096
XENSTORE_ABS_PATH_MAX: Final = 3072
XENSTORE_REL_PATH_MAX: Final = 2048

# Index order is part of the ABI (new errors are only appended), see xsd_errors[].
XS_ERRORS: Final = (
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
    "EPERM",
)
_ERRNO_BY_NAME: Final = {name: int(XenErrno[name]) for name in XS_ERRORS}
_NAME_BY_ERRNO: Final = {errno: name for name, errno in _ERRNO_BY_NAME.items()}


def error_name(errno: int) -> str:
    """The ``XS_ERROR`` string for ``errno``; an errno with no entry is sent as EINVAL."""
    return _NAME_BY_ERRNO.get(abs(int(errno)), "EINVAL")


def error_errno(name: str | bytes) -> int:
    """The errno a client maps an ``XS_ERROR`` string to; unknown strings mean EINVAL."""
    if isinstance(name, bytes):
        name = name.rstrip(b"\0").decode("ascii", "replace")
    return _ERRNO_BY_NAME.get(name, int(XenErrno.EINVAL))


XSD_SOCKMSG = layout(
    "struct xsd_sockmsg",
    "xen/io/xs_wire.h",
    ("type", "I"),
    ("req_id", "I"),
    ("tx_id", "I"),
    ("len", "I"),
)
XS_HEADER_SIZE: Final = XSD_SOCKMSG.size
_HEADER = XSD_SOCKMSG.struct


class XsProtocolError(ValueError):
    """The byte stream broke framing (a header announced more than 4096 bytes).
    Unrecoverable: the connection must be dropped (ring: ``XENSTORE_ERROR_PROTO``)."""

    def __init__(self, message: str, messages: list[XsMessage] | None = None) -> None:
        super().__init__(message)
        #: complete messages that preceded the bad header in the same ``feed``
        self.messages: list[XsMessage] = messages or []


class XsPayloadError(ValueError):
    """A payload that does not have the shape its type requires (reply: EINVAL)."""


@attrs.frozen
class XsMessage:
    """One message in either direction."""

    type: int  #: an :class:`XsType` value (unknown numbers are kept, the server answers ENOSYS)
    req_id: int  #: chosen by the client, echoed in the reply
    tx_id: int  #: transaction id, 0 outside a transaction
    payload: bytes = b""

    def encode(self) -> bytes:
        """Header + payload; refuses payloads the peer would treat as a protocol error."""
        if len(self.payload) > XENSTORE_PAYLOAD_MAX:
            raise XsPayloadError(f"payload of {len(self.payload)} bytes > {XENSTORE_PAYLOAD_MAX}")
        return _HEADER.pack(self.type, self.req_id, self.tx_id, len(self.payload)) + self.payload

    @classmethod
    def decode(cls, data: bytes) -> XsMessage:
        """Exactly one encoded message."""
        messages = XsParser().feed(data)
        if len(messages) != 1 or len(data) != XS_HEADER_SIZE + len(messages[0].payload):
            raise XsPayloadError("data is not exactly one message")
        return messages[0]

    def args(self) -> list[bytes]:
        """The payload as a NUL-terminated argument list (see :func:`split_args`)."""
        return split_args(self.payload)


@attrs.define(eq=False)
class XsParser:
    """Incremental framing of a byte stream into :class:`XsMessage` records.

    ``feed`` accepts any chunking, one byte at a time included. After a protocol
    error every further ``feed`` raises the same error: the stream cannot be
    resynchronised, so the connection has to go.
    """

    _buf: bytearray = attrs.field(factory=bytearray, init=False)
    _error: XsProtocolError | None = attrs.field(default=None, init=False)

    @property
    def error(self) -> XsProtocolError | None:
        return self._error

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete message."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[XsMessage]:
        if self._error is not None:
            raise self._error
        buf = self._buf
        buf += data
        out: list[XsMessage] = []
        pos = 0
        end = len(buf)
        while end - pos >= XS_HEADER_SIZE:
            type_, req_id, tx_id, length = _HEADER.unpack_from(buf, pos)
            if length > XENSTORE_PAYLOAD_MAX:
                del buf[:pos]
                self._error = XsProtocolError(
                    f"message header announces {length} payload bytes > {XENSTORE_PAYLOAD_MAX}",
                    out,
                )
                raise self._error
            stop = pos + XS_HEADER_SIZE + length
            if stop > end:
                break
            out.append(XsMessage(type_, req_id, tx_id, bytes(buf[pos + XS_HEADER_SIZE : stop])))
            pos = stop
        if pos:
            del buf[:pos]
        return out


# --- payloads ---------------------------------------------------------------------------


def _b(s: str | bytes | int) -> bytes:
    if isinstance(s, bytes):
        return s
    return str(s).encode()


def join_args(*args: str | bytes | int) -> bytes:
    """Each argument followed by one NUL (``join_args("a", 5) == b"a\\x005\\x00"``)."""
    return b"".join(_b(a) + b"\0" for a in args)


def split_args(payload: bytes) -> list[bytes]:
    """The NUL-terminated strings of ``payload`` (empty payload: none). Bytes after
    the last NUL are malformed and raise :class:`XsPayloadError`."""
    if not payload:
        return []
    if payload[-1] != 0:
        raise XsPayloadError("argument list not NUL-terminated")
    return payload[:-1].split(b"\0")


def split_write(payload: bytes) -> tuple[bytes, bytes]:
    """``(path, value)`` of a WRITE request: the value is the rest, NULs and all."""
    path, sep, value = payload.partition(b"\0")
    if not sep:
        raise XsPayloadError("WRITE payload has no NUL after the path")
    return path, value


def parse_watch_event(payload: bytes) -> tuple[bytes, bytes]:
    """``(path, token)`` of a WATCH_EVENT."""
    args = split_args(payload)
    if len(args) < 2:
        raise XsPayloadError("WATCH_EVENT needs a path and a token")
    return args[XS_WATCH_PATH], args[XS_WATCH_TOKEN]


# Requests. Paths and values may be str (encoded UTF-8) or bytes.


def request(type_: XsType, payload: bytes = b"", *, req_id: int = 0, tx_id: int = 0) -> XsMessage:
    return XsMessage(int(type_), req_id, tx_id, payload)


def control(cmd: str | bytes, *args: str | bytes, req_id: int = 0) -> XsMessage:
    return request(XsType.CONTROL, join_args(cmd, *args), req_id=req_id)


def directory(path: str | bytes, *, req_id: int = 0, tx_id: int = 0) -> XsMessage:
    return request(XsType.DIRECTORY, join_args(path), req_id=req_id, tx_id=tx_id)


def directory_part(path: str | bytes, offset: int, *, req_id: int = 0, tx_id: int = 0) -> XsMessage:
    return request(XsType.DIRECTORY_PART, join_args(path, offset), req_id=req_id, tx_id=tx_id)


def read(path: str | bytes, *, req_id: int = 0, tx_id: int = 0) -> XsMessage:
    return request(XsType.READ, join_args(path), req_id=req_id, tx_id=tx_id)


def get_perms(path: str | bytes, *, req_id: int = 0, tx_id: int = 0) -> XsMessage:
    return request(XsType.GET_PERMS, join_args(path), req_id=req_id, tx_id=tx_id)


def watch(path: str | bytes, token: str | bytes, *, req_id: int = 0) -> XsMessage:
    return request(XsType.WATCH, join_args(path, token), req_id=req_id)


def unwatch(path: str | bytes, token: str | bytes, *, req_id: int = 0) -> XsMessage:
    return request(XsType.UNWATCH, join_args(path, token), req_id=req_id)


def transaction_start(*, req_id: int = 0) -> XsMessage:
    """The payload is one empty string (a lone NUL); the header tx_id must be 0."""
    return request(XsType.TRANSACTION_START, b"\0", req_id=req_id)


def transaction_end(tx_id: int, commit: bool = True, *, req_id: int = 0) -> XsMessage:
    return request(XsType.TRANSACTION_END, b"T\0" if commit else b"F\0", req_id=req_id, tx_id=tx_id)


def introduce(domid: int, gfn: int, port: int, *, req_id: int = 0) -> XsMessage:
    return request(XsType.INTRODUCE, join_args(domid, gfn, port), req_id=req_id)


def release(domid: int, *, req_id: int = 0) -> XsMessage:
    return request(XsType.RELEASE, join_args(domid), req_id=req_id)


def get_domain_path(domid: int, *, req_id: int = 0) -> XsMessage:
    return request(XsType.GET_DOMAIN_PATH, join_args(domid), req_id=req_id)


def write(path: str | bytes, value: str | bytes, *, req_id: int = 0, tx_id: int = 0) -> XsMessage:
    """The value is not NUL-terminated and may contain NULs."""
    return request(XsType.WRITE, _b(path) + b"\0" + _b(value), req_id=req_id, tx_id=tx_id)


def mkdir(path: str | bytes, *, req_id: int = 0, tx_id: int = 0) -> XsMessage:
    return request(XsType.MKDIR, join_args(path), req_id=req_id, tx_id=tx_id)


def rm(path: str | bytes, *, req_id: int = 0, tx_id: int = 0) -> XsMessage:
    return request(XsType.RM, join_args(path), req_id=req_id, tx_id=tx_id)


def set_perms(
    path: str | bytes, perms: Iterable[Perm], *, req_id: int = 0, tx_id: int = 0
) -> XsMessage:
    return request(
        XsType.SET_PERMS, join_args(path) + format_perms(perms), req_id=req_id, tx_id=tx_id
    )


def is_domain_introduced(domid: int, *, req_id: int = 0) -> XsMessage:
    return request(XsType.IS_DOMAIN_INTRODUCED, join_args(domid), req_id=req_id)


def resume(domid: int, *, req_id: int = 0) -> XsMessage:
    return request(XsType.RESUME, join_args(domid), req_id=req_id)


def set_target(domid: int, target: int, *, req_id: int = 0) -> XsMessage:
    return request(XsType.SET_TARGET, join_args(domid, target), req_id=req_id)


def reset_watches(*, req_id: int = 0) -> XsMessage:
    return request(XsType.RESET_WATCHES, b"\0", req_id=req_id)


# Replies echo the request's type, req_id and tx_id (errors change only the type).


def reply(req: XsMessage, payload: bytes) -> XsMessage:
    return XsMessage(req.type, req.req_id, req.tx_id, payload)


def ok_reply(req: XsMessage) -> XsMessage:
    return reply(req, b"OK\0")


def error_reply(req: XsMessage, error: str | int) -> XsMessage:
    """``error`` is an XS_ERRORS name or an errno; anything unlisted is sent as EINVAL."""
    name = error if isinstance(error, str) else error_name(error)
    if name not in _ERRNO_BY_NAME:
        name = "EINVAL"
    return XsMessage(int(XsType.ERROR), req.req_id, req.tx_id, join_args(name))


def read_reply(req: XsMessage, value: bytes) -> XsMessage:
    """The value unterminated, exactly as stored."""
    return reply(req, value)


def directory_reply(req: XsMessage, names: Iterable[str | bytes]) -> XsMessage:
    """Each child name NUL-terminated; an empty directory is an empty payload."""
    return reply(req, join_args(*names))


def directory_part_reply(
    req: XsMessage, generation: int, names: Iterable[str | bytes], complete: bool
) -> XsMessage:
    """``gencnt\\0`` then names; an extra empty string marks the end of the list."""
    return reply(req, join_args(generation, *names) + (b"\0" if complete else b""))


def get_perms_reply(req: XsMessage, perms: Iterable[Perm]) -> XsMessage:
    return reply(req, format_perms(perms))


def transaction_start_reply(req: XsMessage, tx_id: int) -> XsMessage:
    return reply(req, join_args(tx_id))


def get_domain_path_reply(req: XsMessage, path: str | bytes) -> XsMessage:
    return reply(req, join_args(path))


def bool_reply(req: XsMessage, value: bool) -> XsMessage:
    """IS_DOMAIN_INTRODUCED: ``T\\0`` or ``F\\0``."""
    return reply(req, b"T\0" if value else b"F\0")


def watch_event(path: str | bytes, token: str | bytes) -> XsMessage:
    """Unsolicited, so req_id and tx_id are 0."""
    return XsMessage(int(XsType.WATCH_EVENT), 0, 0, join_args(path, token))


# --- paths ------------------------------------------------------------------------------

_VALID_CHARS = re.compile(r"[A-Za-z0-9\-/_@]*")
# C xenstored measures the length limit past a domain's home ("/local/domain/<%5u>/").
_LOCAL_PREFIX = re.compile(r"/local/domain/[0-9]{1,5}/")
SPECIAL_PATHS: Final = ("@introduceDomain", "@releaseDomain")


def domain_path(domid: int) -> str:
    """A domain's home, the base of its relative paths (GET_DOMAIN_PATH answer)."""
    return f"/local/domain/{domid}"


def resolve_path(path: str, domid: int) -> str:
    """``path`` made absolute for a caller ``domid`` (special and absolute unchanged)."""
    if path.startswith(("/", "@")):
        return path
    return f"{domain_path(domid)}/{path}"


def is_special_path(path: str | bytes) -> bool:
    """An ``@`` watch name such as ``@releaseDomain``: never a node, only watchable."""
    return path[:1] in ("@", b"@")


def is_valid_path(
    path: str | bytes, *, allow_relative: bool = False, allow_special: bool = False
) -> bool:
    """Node-name syntax of section 1.4: characters ``A-Za-z0-9-/_@``, absolute unless
    ``allow_relative``, no ``//``, no trailing ``/`` (except ``/``), within the length
    limits. ``allow_special`` also admits ``@name`` watch paths (WATCH/UNWATCH)."""
    if isinstance(path, bytes):
        try:
            path = path.decode("ascii")
        except UnicodeDecodeError:
            return False
    if not path or _VALID_CHARS.fullmatch(path) is None or "//" in path:
        return False
    if path.endswith("/") and path != "/":
        return False
    if path[0] == "@":
        return allow_special and len(path) > 1 and len(path) <= XENSTORE_REL_PATH_MAX
    if path[0] != "/":
        return allow_relative and len(path) <= XENSTORE_REL_PATH_MAX
    local = _LOCAL_PREFIX.match(path)
    limit = (local.end() if local else 0) + XENSTORE_REL_PATH_MAX
    return len(path) <= min(limit, XENSTORE_ABS_PATH_MAX)


# --- permissions ------------------------------------------------------------------------


class PermKind(enum.Enum):
    """The letter of a permission entry."""

    NONE = "n"
    READ = "r"
    WRITE = "w"
    BOTH = "b"

    @property
    def can_read(self) -> bool:
        return self in (PermKind.READ, PermKind.BOTH)

    @property
    def can_write(self) -> bool:
        return self in (PermKind.WRITE, PermKind.BOTH)


@attrs.frozen
class Perm:
    """One entry ``<letter><domid>``; in a node's list entry 0 names the owner and
    the access of every domain not listed after it."""

    kind: PermKind
    domid: int

    def __str__(self) -> str:
        return f"{self.kind.value}{self.domid}"


_PERM = re.compile(r"([nrwb])([0-9]{1,5})")


def parse_perm(text: str | bytes) -> Perm:
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    m = _PERM.fullmatch(text)
    if m is None or int(m.group(2)) > 0xFFFF:
        raise XsPayloadError(f"bad permission {text!r}")
    return Perm(PermKind(m.group(1)), int(m.group(2)))


def parse_perms(text: str | bytes) -> list[Perm]:
    """Entries separated by NULs (wire form) or whitespace (``"n0 r5"``)."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    return [parse_perm(tok) for tok in text.replace("\0", " ").split()]


def format_perms(perms: Iterable[Perm]) -> bytes:
    """Wire form: every entry NUL-terminated (``n0\\0r5\\0``)."""
    return join_args(*(str(p) for p in perms))


# --- the guest's shared ring page -------------------------------------------------------

XENSTORE_RING_SIZE: Final = 1024

XENSTORE_DOMAIN_INTERFACE = layout(
    "struct xenstore_domain_interface",
    "xen/io/xs_wire.h",
    ("req", "s", XENSTORE_RING_SIZE),
    ("rsp", "s", XENSTORE_RING_SIZE),
    ("req_cons", "I"),
    ("req_prod", "I"),
    ("rsp_cons", "I"),
    ("rsp_prod", "I"),
    ("server_features", "I"),
    ("connection", "I"),
    ("error", "I"),
)


def MASK_XENSTORE_IDX(idx: int) -> int:  # noqa: N802 - the header's macro name
    """Position of free-running ring index ``idx`` inside ``req``/``rsp``."""
    return idx & (XENSTORE_RING_SIZE - 1)


class XENSTORE_SERVER_FEATURE(enum.IntFlag):
    """``server_features`` bits."""

    RECONNECTION = 1
    ERROR = 2


class XENSTORE_CONNECTION(enum.IntEnum):
    """``connection`` values (``XENSTORE_CONNECTED``, ``XENSTORE_RECONNECT``)."""

    CONNECTED = 0
    RECONNECT = 1


class XENSTORE_ERROR(enum.IntEnum):
    """``error`` values (``XENSTORE_ERROR_*``)."""

    NONE = 0
    COMM = 1
    RINGIDX = 2
    PROTO = 3
