"""The envelope every transport frame carries: ``[kind, call_id, body]``.

``body`` is a codec array (``[tag, field...]``) for ONEWAY, REQUEST and REPLY
frames, and ``[code, text]`` for ERROR frames. A frame that cannot even be read
as an envelope raises :class:`~shared.codec.CodecError`.
"""

from __future__ import annotations

import enum
from typing import Any

import msgpack

from shared.codec import CodecError, message


class Kind(enum.IntEnum):
    ONEWAY = 0
    REQUEST = 1
    REPLY = 2
    ERROR = 3


# Call id of an error reply to a frame whose own id could not be read.
UNKNOWN_CALL = -1

_packer = msgpack.Packer(use_bin_type=True)


def pack(kind: Kind, call_id: int, body: Any) -> bytes:
    return _packer.pack((kind, call_id, body))


def unpack(frame: bytes) -> tuple[int, int, Any]:
    try:
        env = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:
        raise CodecError(f"frame is not msgpack: {exc}") from None
    if (
        type(env) is not list
        or len(env) != 3
        or type(env[0]) is not int
        or type(env[1]) is not int
        or env[0] not in (0, 1, 2, 3)
    ):
        raise CodecError("frame is not a [kind, call_id, body] envelope")
    return env[0], env[1], env[2]


def call_id_of(frame: bytes) -> int:
    """Best-effort id of a frame that failed to decode, for the error reply."""
    try:
        env = msgpack.unpackb(frame, raw=False, strict_map_key=False)
        if type(env) is list and len(env) >= 2 and type(env[1]) is int:
            return env[1]
    except Exception:
        pass
    return UNKNOWN_CALL


class RemoteError(Exception):
    """The peer answered a call with an error frame (``code``: codec,
    unknown-message, handler, refused, ...)."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text


class ServiceError(Exception):
    """Raised by a handler to send a deliberate error reply."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text


class CallTimeout(Exception):
    """No reply within the call's timeout."""


class PeerLost(Exception):
    """The connection to the peer went away while the call was in flight."""


@message(1)
class Connect:
    """Client → service's listening endpoint: give me a socket of my own."""

    client: str


@message(2)
class Connected:
    """The endpoint of the client's dedicated socket (dial it next)."""

    endpoint: str
