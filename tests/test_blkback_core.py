"""blkback's sans-IO cores: request admission, ordering, xenbus state machine."""

from __future__ import annotations

import pytest

from services.backend.blkback_image import DiskFacts
from services.backend.blkback_order import ExecEvent, OrderingQueue, barrier_violations
from services.backend.blkback_request import DeviceLimits, Kind, admit, plan_with_segments
from services.backend.blkback_xenbus import (
    Connect,
    Disconnect,
    Unregister,
    VbdBackend,
    VbdConfig,
    VbdSnapshot,
    WriteKeys,
)
from shared.abi.blkif import (
    BlkifOp,
    BlkifProtocolError,
    BlkifRequest,
    BlkifRequestDiscard,
    BlkifRequestIndirect,
    BlkifRsp,
    Segment,
    VDisk,
)
from shared.abi.constants import XenbusState as S

DISK = DeviceLimits(
    sectors=1024, readonly=False, has_media=True, max_indirect_segments=256, discard=True
)
RO = DeviceLimits(1024, True, True, 256, False)
EMPTY = DeviceLimits(0, True, False, 256, False)


def rw(op: int, sector: int, *segs: tuple[int, int, int]) -> bytes:
    return BlkifRequest.of(op, 0, 7, sector, tuple(Segment(*s) for s in segs)).encode()


# --- admission: one row per rule ------------------------------------------------------------

REFUSALS = [
    ("unknown op", bytes([99]) + bytes(111), DISK, BlkifRsp.EOPNOTSUPP),
    ("reserved op", rw(BlkifOp.RESERVED_1, 0, (1, 0, 7)), DISK, BlkifRsp.EOPNOTSUPP),
    ("read without segments", rw(BlkifOp.READ, 0), DISK, BlkifRsp.ERROR),
    ("first > last", rw(BlkifOp.READ, 0, (1, 5, 2)), DISK, BlkifRsp.ERROR),
    ("last past page", rw(BlkifOp.READ, 0, (1, 0, 8)), DISK, BlkifRsp.ERROR),
    ("past the end", rw(BlkifOp.READ, 1020, (1, 0, 7)), DISK, BlkifRsp.ERROR),
    ("write read-only", rw(BlkifOp.WRITE, 0, (1, 0, 7)), RO, BlkifRsp.ERROR),
    ("barrier data read-only", rw(BlkifOp.WRITE_BARRIER, 0, (1, 0, 0)), RO, BlkifRsp.ERROR),
    ("read no medium", rw(BlkifOp.READ, 0, (1, 0, 0)), EMPTY, BlkifRsp.ERROR),
    ("discard not offered", BlkifRequestDiscard(0, 0, 1, 0, 8).encode(), RO, BlkifRsp.EOPNOTSUPP),
    ("discard past end", BlkifRequestDiscard(0, 0, 1, 1000, 100).encode(), DISK, BlkifRsp.ERROR),
    ("discard bad flag", BlkifRequestDiscard(6, 0, 1, 0, 8).encode(), DISK, BlkifRsp.ERROR),
    (
        "indirect too many",
        BlkifRequestIndirect(BlkifOp.READ, 257, 1, 0, 0, (1,)).encode(),
        DISK,
        BlkifRsp.ERROR,
    ),
    (
        "indirect flush",
        BlkifRequestIndirect(BlkifOp.FLUSH_DISKCACHE, 3, 1, 0, 0, (1,)).encode(),
        DISK,
        BlkifRsp.ERROR,
    ),
]


@pytest.mark.parametrize(
    ("why", "slot", "limits", "status"), REFUSALS, ids=[r[0] for r in REFUSALS]
)
def test_admit_refuses(why: str, slot: bytes, limits: DeviceLimits, status: int) -> None:
    with pytest.raises(BlkifProtocolError) as info:
        admit(slot.ljust(112, b"\0"), limits)
    assert info.value.status == status


def test_admit_accepts_and_classifies() -> None:
    assert admit(rw(BlkifOp.READ, 0, (1, 0, 7)), RO).kind is Kind.READ
    assert admit(rw(BlkifOp.FLUSH_DISKCACHE, 0), RO).kind is Kind.FLUSH  # empty flush is fine
    assert admit(rw(BlkifOp.WRITE_BARRIER, 0), EMPTY).kind is Kind.BARRIER
    a = admit(rw(BlkifOp.READ, 0, (1, 0, 7)), DISK)
    assert a.writes_guest_pages
    ind = admit(
        BlkifRequestIndirect(BlkifOp.WRITE, 16, 9, 8, 0, (4,)).encode().ljust(112, b"\0"), DISK
    )
    assert ind.indirect_grefs == (4,) and not ind.writes_guest_pages
    with pytest.raises(BlkifProtocolError):  # a segment read from the page is checked too
        plan_with_segments(ind, (Segment(1, 3, 2),), DISK)
    with pytest.raises(BlkifProtocolError):  # and so is the range it covers
        plan_with_segments(ind, tuple(Segment(1, 0, 7) for _ in range(200)), DISK)
    io = plan_with_segments(ind, tuple(Segment(1, 0, 7) for _ in range(16)), DISK)
    assert io.offset == 8 * 512 and io.nbytes == 16 * 4096


# --- ordering ---------------------------------------------------------------------------------


def test_reads_and_writes_start_together() -> None:
    q = OrderingQueue()
    seqs = [q.submit(k) for k in (Kind.WRITE, Kind.READ, Kind.WRITE)]
    assert q.startable() == seqs
    assert q.startable() == []


def test_barrier_waits_for_all_earlier_and_holds_all_later() -> None:
    q = OrderingQueue()
    x, y = q.submit(Kind.WRITE), q.submit(Kind.READ)
    w = q.submit(Kind.BARRIER)
    z = q.submit(Kind.WRITE)
    assert q.startable() == [x, y]
    q.complete(x)
    assert q.startable() == []
    q.complete(y)
    assert q.startable() == [w]
    assert q.startable() == []
    q.complete(w)
    assert q.startable() == [z]


def test_flush_waits_for_earlier_writes_only() -> None:
    q = OrderingQueue()
    r, x = q.submit(Kind.READ), q.submit(Kind.WRITE)
    f = q.submit(Kind.FLUSH)
    later = q.submit(Kind.WRITE)
    assert q.startable() == [r, x, later]
    q.complete(x)
    assert q.startable() == [f]  # the read still running does not matter


def test_barrier_checker_finds_violations() -> None:
    def ev(seq: int, op: str, event: str) -> ExecEvent:
        return ExecEvent(1, seq, seq, op, event, 0, 1)

    good = [
        ev(0, "write", "start"),
        ev(0, "write", "done"),
        ev(1, "barrier", "start"),
        ev(1, "barrier", "done"),
        ev(2, "write", "start"),
        ev(2, "write", "done"),
    ]
    assert barrier_violations(good) == []
    bad = [
        ev(0, "write", "start"),
        ev(1, "barrier", "start"),
        ev(0, "write", "done"),
        ev(2, "write", "start"),
        ev(1, "barrier", "done"),
        ev(2, "write", "done"),
    ]
    assert len(barrier_violations(bad)) == 2


# --- xenbus -------------------------------------------------------------------------------------

CFG = VbdConfig("/local/domain/1/device/vbd/51712", 1, "/img", "w", "disk", True)
FACTS = DiskFacts(2048, VDisk(0), 512, True, True)


def snap(be: S, fe: S, cfg: VbdConfig = CFG) -> VbdSnapshot:
    return VbdSnapshot(cfg, be, fe)


def states(actions: list) -> list:
    return [a.state for a in actions if isinstance(a, WriteKeys) and a.state is not None]


def test_handshake_probe_connect_close() -> None:
    m = VbdBackend()
    out = m.step(snap(S.Initialising, S.Initialising))
    assert states(out) == [S.InitWait] and "max-ring-page-order" in out[0].keys
    assert m.step(snap(S.InitWait, S.Initialising)) == []  # our own write coming back
    assert m.step(snap(S.InitWait, S.Initialised)) == [Connect("/img")]
    out = m.connected_ok(FACTS, persistent=True)
    assert states(out) == [S.Connected]
    assert out[0].keys["sectors"] == "2048" and out[0].keys["feature-persistent"] == "1"
    assert m.step(snap(S.Connected, S.Connected)) == []
    out = m.step(snap(S.Connected, S.Closing))
    assert out[0] == Disconnect() and states(out) == [S.Closing]
    out = m.step(snap(S.Closing, S.Closed))
    assert states(out) == [S.Closed] and Unregister() not in out
    out = m.step(snap(S.Closed, S.Initialising))  # the frontend starts over
    assert states(out) == [S.InitWait]


def test_unplug_by_toolstack() -> None:
    m = VbdBackend()
    m.step(snap(S.Initialising, S.Initialising))
    m.step(snap(S.InitWait, S.Connected))
    m.connected_ok(FACTS, False)
    offline = VbdConfig(CFG.frontend, 1, "/img", "w", "disk", False)
    out = m.step(snap(S.Closing, S.Connected, offline))
    assert out[0] == Disconnect() and states(out) == [S.Closing]
    out = m.step(snap(S.Closing, S.Closed, offline))
    assert states(out) == [S.Closed] and out[-1] == Unregister()


def test_media_change_rewrites_sectors_and_connected() -> None:
    m = VbdBackend()
    cd = VbdConfig(CFG.frontend, 1, "/a.iso", "r", "cdrom", True)
    m.step(snap(S.Initialising, S.Initialising, cd))
    m.step(snap(S.InitWait, S.Initialised, cd))
    m.connected_ok(FACTS, False)
    ejected = VbdConfig(CFG.frontend, 1, "", "r", "cdrom", True)
    out = m.step(snap(S.Connected, S.Connected, ejected))
    assert [type(a).__name__ for a in out] == ["ChangeMedia"]
    out = m.media_changed(DiskFacts(0, VDisk.CDROM | VDisk.READONLY, 2048, False, False))
    assert states(out) == [S.Connected] and out[0].keys["sectors"] == "0"


@pytest.mark.parametrize(
    ("be", "fe", "expected"),
    [
        (S.Connected, S.Connected, S.Closing),  # a previous blkback's live ring
        (S.Connected, S.Initialised, S.Closing),
        (S.InitWait, S.Initialising, S.InitWait),
        (S.Closed, S.Closed, S.Closed),
        (S.Closing, S.Closed, S.Closed),
        (S.Initialising, S.Initialising, S.InitWait),
    ],
)
def test_restart_adopts_what_it_finds(be: S, fe: S, expected: S) -> None:
    assert states(VbdBackend().step(snap(be, fe)))[:1] == [expected]


def test_frontend_gone_unregisters() -> None:
    m = VbdBackend()
    m.step(snap(S.Initialising, S.Initialising))
    out = m.step(snap(S.InitWait, S.Unknown))
    assert states(out) == [S.Closed] and out[-1] == Unregister()
    assert VbdBackend().step(None) == [Unregister()]
