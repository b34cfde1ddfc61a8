"""The xenbus backend state machine of one vbd (sans-IO).

The adapter reads the device's backend directory and the frontend's
``state`` after every watch event and feeds a :class:`VbdSnapshot` to
:meth:`VbdBackend.step`, which answers the actions to take in order. The
machine is level-triggered: a snapshot that changes nothing (our own writes
coming back as watch events) yields no action. Rules (xen-reference 2.4, 2.6,
2.7, 2.8):

- probe: write ``feature-max-indirect-segments``, ``max-ring-page-order``,
  ``multi-queue-max-queues``, then InitWait;
- frontend Initialised or Connected while we wait: connect the ring (the
  adapter maps it and reports back with :meth:`connected`), then in one
  transaction the connect keys and Connected;
- frontend Closing: disconnect, Closing; frontend Closed: disconnect, Closed,
  and unregister when ``online`` is 0; frontend Initialising while we are
  Closed: start over at InitWait (a reconnect);
- the toolstack writing ``online``=0 and state Closing: disconnect, Closing;
- a new ``params`` while connected: a media change, seen by the frontend as
  ``sectors``/``info`` rewritten and Connected again;
- a fresh process finding a device a previous blkback had Connected: it
  holds none of that connection's state, so it closes it (Closing) and the
  frontend comes back through Closed and Initialising to a fresh connection.
"""

from __future__ import annotations

import attrs

from services.backend.blkback_image import DiskFacts
from shared.abi.constants import XenbusState

MAX_RING_PAGE_ORDER = 4
MAX_INDIRECT_SEGMENTS = 256


@attrs.frozen
class VbdConfig:
    """The backend keys the toolstack writes."""

    frontend: str  #: ``frontend``: the frontend's directory
    frontend_id: int  #: ``frontend-id``
    params: str  #: what to open; empty = no medium
    mode: str  #: ``r`` or ``w``
    device_type: str  #: ``disk`` or ``cdrom``
    online: bool

    @property
    def readonly(self) -> bool:
        return "w" not in self.mode or self.cdrom

    @property
    def cdrom(self) -> bool:
        return self.device_type == "cdrom"


@attrs.frozen
class VbdSnapshot:
    config: VbdConfig
    be_state: XenbusState  #: ``state`` in our directory now (Unknown if absent)
    fe_state: XenbusState  #: the frontend's ``state`` (Unknown if absent)


@attrs.frozen
class WriteKeys:
    """Write these keys under the backend directory (one transaction), then
    ``state`` if given."""

    keys: dict[str, str]
    state: XenbusState | None = None


@attrs.frozen
class Connect:
    """Read the frontend's ring keys, map the ring, bind the event channel,
    open the medium named by ``params``; then call :meth:`VbdBackend.connected`."""

    params: str


@attrs.frozen
class ChangeMedia:
    """Swap the medium for ``params``; then call :meth:`VbdBackend.media_changed`."""

    params: str


@attrs.frozen
class Disconnect:
    """Stop the ring: finish in-flight I/O, unmap grants, close the port."""


@attrs.frozen
class Unregister:
    """Forget the device."""


Action = WriteKeys | Connect | ChangeMedia | Disconnect | Unregister


def probe_keys() -> dict[str, str]:
    return {
        "feature-max-indirect-segments": str(MAX_INDIRECT_SEGMENTS),
        "max-ring-page-order": str(MAX_RING_PAGE_ORDER),
        "max-ring-pages": str(1 << MAX_RING_PAGE_ORDER),
        "multi-queue-max-queues": "1",
    }


def media_keys(facts: DiskFacts) -> dict[str, str]:
    return {
        "sectors": str(facts.sectors),
        "info": str(int(facts.info)),
        "sector-size": "512",
        "physical-sector-size": str(facts.physical_sector_size),
    }


def connect_keys(facts: DiskFacts, persistent: bool) -> dict[str, str]:
    keys = {
        "feature-flush-cache": "1",
        "feature-barrier": "1",
        "feature-discard": "1" if facts.discard else "0",
        "feature-persistent": "1" if persistent else "0",
    }
    if facts.discard:
        keys |= {"discard-granularity": "512", "discard-alignment": "0", "discard-secure": "0"}
    return keys | media_keys(facts)


_LIVE = (XenbusState.Initialised, XenbusState.Connected)


@attrs.define
class VbdBackend:
    """One device's backend side; ``state`` is what we last wrote."""

    state: XenbusState = XenbusState.Unknown
    connected: bool = False
    connecting: bool = False
    params: str | None = None  #: the medium currently open (or being opened)
    started: bool = False

    def step(self, snap: VbdSnapshot | None) -> list[Action]:
        """Actions for the device as it looks now (None: its directory is gone)."""
        if snap is None:
            return [*self._disconnect(), Unregister()]
        out: list[Action] = []
        if not self.started:
            self.started = True
            out += self._adopt(snap)
        cfg = snap.config
        if (
            snap.be_state == XenbusState.Closing
            and self.state not in (XenbusState.Closing, XenbusState.Closed)
            and not cfg.online
        ):
            out += [*self._disconnect(), self._set(XenbusState.Closing)]  # toolstack unplug
        if self.connected and cfg.params != self.params:
            self.params = cfg.params
            out.append(ChangeMedia(cfg.params))
        fe = snap.fe_state
        if fe == XenbusState.Initialising and self.state == XenbusState.Closed and cfg.online:
            out.append(WriteKeys(probe_keys(), self._to(XenbusState.InitWait)))
        elif fe in _LIVE and self.state == XenbusState.InitWait and not self.connecting:
            if not self.connected:
                self.connecting = True
                self.params = cfg.params
                out.append(Connect(cfg.params))
        elif fe == XenbusState.Closing and self.state not in (
            XenbusState.Closing,
            XenbusState.Closed,
        ):
            out += [*self._disconnect(), self._set(XenbusState.Closing)]
        elif fe in (XenbusState.Closed, XenbusState.Unknown):
            if self.state != XenbusState.Closed:
                out += [*self._disconnect(), self._set(XenbusState.Closed)]
            if not cfg.online or fe == XenbusState.Unknown:
                out.append(Unregister())
        return out

    def connected_ok(self, facts: DiskFacts, persistent: bool) -> list[Action]:
        """The adapter connected the ring: publish the disk and go Connected."""
        self.connecting = False
        self.connected = True
        return [WriteKeys(connect_keys(facts, persistent), self._to(XenbusState.Connected))]

    def connect_failed(self) -> list[Action]:
        """The ring could not be connected (bad ring-ref, port, protocol, medium)."""
        self.connecting = False
        return [self._set(XenbusState.Closing)]

    def media_changed(self, facts: DiskFacts) -> list[Action]:
        """Tell the frontend: new size and info, Connected again."""
        if not self.connected:
            return []
        return [WriteKeys(media_keys(facts), self._to(XenbusState.Connected))]

    # --- internals -----------------------------------------------------------------

    def _adopt(self, snap: VbdSnapshot) -> list[Action]:
        """First look at a device: fresh, or left behind by a previous blkback."""
        be, fe = snap.be_state, snap.fe_state
        if be == XenbusState.Connected or (be == XenbusState.Closing and fe != XenbusState.Closed):
            return [self._set(XenbusState.Closing)]  # a connection we know nothing of
        if be == XenbusState.Closed or (be == XenbusState.Closing and fe == XenbusState.Closed):
            return [self._set(XenbusState.Closed)]
        if fe in (XenbusState.Closing, XenbusState.Closed) and be != XenbusState.Initialising:
            return [self._set(XenbusState.Closed)]
        return [WriteKeys(probe_keys(), self._to(XenbusState.InitWait))]

    def _disconnect(self) -> list[Action]:
        if not (self.connected or self.connecting):
            return []
        self.connected = self.connecting = False
        return [Disconnect()]

    def _to(self, state: XenbusState) -> XenbusState:
        self.state = state
        return state

    def _set(self, state: XenbusState) -> WriteKeys:
        return WriteKeys({}, self._to(state))
