"""blkback's control messages (codec tags 500-519; :class:`ExecEvent` is 500)."""

from __future__ import annotations

from services.backend.blkback_order import ExecEvent
from shared.codec import message


@message(501)
class ExecLogRequest:
    """The execution log of vbd ``devid`` of domain ``domid`` (``clear`` empties it)."""

    domid: int
    devid: int
    clear: bool = False


@message(502)
class ExecLog:
    events: tuple[ExecEvent, ...]
    recorded: int  #: events ever recorded (the log keeps the last LOG_LIMIT)


__all__ = ["ExecEvent", "ExecLog", "ExecLogRequest"]
