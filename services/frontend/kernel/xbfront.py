"""The xenbus frontend state machine, sans-IO (xen-reference 2.4, 2.6;
FreeBSD ``xenbusb_front.c`` + the drivers' ``otherend_changed``; Linux
``xenbus_probe_frontend.c``).

The bus owns the frontend's ``state`` key; what a driver does at each step is
its business (:mod:`.xbdriver`). Given the frontend's state and the backend's
newly read state, :func:`otherend_changed` says which steps to run, in order:

=========================  ==================  ===========================================
backend                    frontend            steps
=========================  ==================  ===========================================
InitWait / Initialised     Initialising        INITIALISE (then FE -> Initialised)
Connected                  Initialising        INITIALISE, CONNECT (a backend that skipped
                                               InitWait: blkif.h allows it)
Connected                  Initialised         CONNECT (then FE -> Connected)
Connected                  Connected           CHANGED (e.g. ``sectors`` re-read)
Closing / Closed           not Closed          CLOSE (tear down, FE -> Closed)
Unknown (node gone)        past Initialising   CLOSE
anything else                                  NOTIFY (the driver hears of it, no step)
=========================  ==================  ===========================================

:func:`releases_hold` is the boot-hold rule (FreeBSD ``xenbusb_nop_confighook_cb``
waits for every new frontend to reach Connected or Closed).
"""

from __future__ import annotations

import enum

from services.frontend.kernel.state import XenbusDeviceRecord
from shared.abi.constants import XenbusState

S = XenbusState


class Step(enum.Enum):
    INITIALISE = "initialise"  #: driver.initialise, then FE Initialised
    CONNECT = "connect"  #: driver.connect, then FE Connected
    CHANGED = "changed"  #: driver.backend_changed (backend re-announced Connected)
    CLOSE = "close"  #: driver.disconnect, then FE Closed
    NOTIFY = "notify"  #: driver.backend_changed only


def parse_state(raw: str | None) -> XenbusState:
    """A ``state`` node's value; missing or garbage reads as Unknown."""
    try:
        return XenbusState(int(raw)) if raw is not None else S.Unknown
    except ValueError:
        return S.Unknown


def otherend_changed(fe: XenbusState, be: XenbusState) -> list[Step]:
    """The steps to run when the backend is seen in ``be`` (see the table)."""
    if be in (S.Closing, S.Closed):
        return [Step.CLOSE] if fe != S.Closed else [Step.NOTIFY]
    if be == S.Unknown:
        return [Step.CLOSE] if fe not in (S.Initialising, S.Closed) else [Step.NOTIFY]
    if fe == S.Closed:
        return [Step.NOTIFY]  # reconnection needs someone to reset FE to Initialising
    if be in (S.InitWait, S.Initialised) and fe == S.Initialising:
        return [Step.INITIALISE]
    if be == S.Connected:
        if fe == S.Initialising:
            return [Step.INITIALISE, Step.CONNECT]
        if fe == S.Initialised:
            return [Step.CONNECT]
        if fe == S.Connected:
            return [Step.CHANGED]
    return [Step.NOTIFY]


def state_after(step: Step, fe: XenbusState) -> XenbusState:
    """The frontend state the bus writes once ``step`` returned."""
    return {
        Step.INITIALISE: S.Initialised,
        Step.CONNECT: S.Connected,
        Step.CLOSE: S.Closed,
    }.get(step, fe)


def releases_hold(rec: XenbusDeviceRecord) -> bool:
    """Boot may go on without this device: it connected, closed, was declined,
    failed, or has no driver."""
    return rec.state in (S.Connected, S.Closed) or rec.outcome in (
        "declined",
        "failed",
        "no-driver",
    )


def declines_pv_cdrom(devtype: str, device_type: str | None, pv_cdrom: bool) -> bool:
    """FreeBSD ``xbd_probe`` / Linux HVM blkfront: a ``vbd`` whose frontend
    ``device-type`` starts with ``cdrom`` is left to the emulated ATAPI CD
    (ENXIO), unless the PV CD-ROM is forced on."""
    return devtype == "vbd" and (device_type or "").startswith("cdrom") and not pv_cdrom
