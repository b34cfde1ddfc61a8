"""xenstored's messages over nng (codec tags 300-399).

The XenStore protocol itself is not re-encoded: :class:`XsFrames` carries raw
``xsd_sockmsg`` bytes in both directions (requests one way; replies and watch
events the other), so framing, req_ids and the parser are exactly the real
ones. Before sending frames a peer binds its connection to a domid with
:class:`XsBind` (a call answered by :class:`XsBound`); see
``services/xenstore/connection.py`` for who may claim what.
"""

from __future__ import annotations

from pathlib import Path

from shared.codec import message
from shared.hostsecret import host_secret as shared_host_secret


@message(300)
class XsBind:
    """Bind this connection to ``domid``; ``token`` proves the right to it (the
    host secret, or a token dom0 vouched for with :class:`XsVouch`)."""

    domid: int
    token: bytes


@message(301)
class XsBound:
    """The connection now acts as ``domid``."""

    domid: int


@message(302)
class XsFrames:
    """xs_wire bytes: any number of whole or partial messages."""

    data: bytes


@message(303)
class XsVouch:
    """From a peer bound as dom0 (the hypervisor, at domain build): a peer that
    presents ``token`` may bind as ``domid``. Answered by :class:`XsBound`."""

    domid: int
    token: bytes


def host_secret(rundir: Path, *, create: bool = False) -> bytes:
    """The host secret (:mod:`shared.hostsecret`), as the bytes XsBind carries."""
    return shared_host_secret(rundir, create=create).encode()
