"""blkback killed with SIGKILL: the frontend reconnects through Closing/Closed
to a fresh ring, every request completes exactly once, and the image keeps
the durability invariants of peers.md 4.3 (checked right after the kill,
before anyone touches the image again)."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import attrs
import pytest
import trio

from shared.abi.blkif import BlkifOp, BlkifRsp
from tests.blk_frontend import BlkFrontend, InFlight, Request, frontend
from tests.blk_harness import blk_host

DEVID = 51712
OK = BlkifRsp.OKAY
SECTOR = 512
STAMP = struct.Struct("<IIQQ")
MAGIC = 0x5EC70B


def sector_stamp(rnd: int, rid: int, sector: int) -> bytes:
    """512 bytes only request ``rid`` ever writes at ``sector``."""
    head = STAMP.pack(MAGIC, rnd, rid, sector)
    return head + bytes([(rid * 13 + sector) & 0xFF]) * (SECTOR - len(head))


@attrs.define
class Write:
    rid: int
    sector: int
    count: int
    entry: InFlight
    request: Request


async def test_reconnect_after_kill_reissues_exactly_once() -> None:
    with trio.fail_after(60):
        async with blk_host() as h:
            image = h.base / "disk.img"
            image.write_bytes(bytes(8 << 20))
            created = await h.create_guest()
            await h.attach(created.domid, DEVID, str(image))
            async with frontend(h, created, DEVID) as fe:
                await fe.connect(order=1)
                assert (await fe.io(BlkifOp.WRITE, 0, b"A" * 4096))[0] == OK
                h.kill_blkback()  # nobody answers these
                reqs = [fe.prepare(BlkifOp.WRITE, 8 * k, bytes([k]) * 4096) for k in range(1, 20)]
                entries = await fe.submit_raw([r.slot for r in reqs])
                await h.start_blkback()
                await fe.recover()
                assert await fe.wait(entries) == [OK] * 19
                assert (await fe.io(BlkifOp.READ, 0, nbytes=4096)) == (OK, b"A" * 4096)
                status, data = await fe.io(BlkifOp.READ, 8, nbytes=19 * 4096)
                assert status == OK and data == b"".join(bytes([k]) * 4096 for k in range(1, 20))
                assert not fe.stray and set(fe.responses.values()) == {1}
            dev = (await h.blkback_status())["devices"][f"{created.domid}/{DEVID}"]
            assert dev["state"] == "Connected" and dev["connections"] == 1


async def _workload(
    fe: BlkFrontend,
    rnd: int,
    cursor: int,
    rng: random.Random,
    writes: list[Write],
    flushes: list[InFlight],
) -> None:
    """Writes to fresh sectors in batches, a flush now and then, until cancelled."""
    while True:
        batch = []
        for _ in range(rng.randint(1, 8)):
            count = rng.randint(1, 24)
            rid = fe.peek_id()
            data = b"".join(sector_stamp(rnd, rid, cursor + k) for k in range(count))
            req = fe.prepare(BlkifOp.WRITE, cursor, data)
            assert req.id == rid
            batch.append((rid, cursor, count, req))
            cursor += count
        entries = fe.put_requests([r.slot for *_, r in batch])
        for (_, sector, count, req), entry in zip(batch, entries, strict=True):
            writes.append(Write(req.id, sector, count, entry, req))
        if rng.random() < 0.4:
            flushes += fe.put_requests([fe.prepare(BlkifOp.FLUSH_DISKCACHE, 0).slot])
        await fe.kick()
        await fe.wait(entries)
        for w in writes[-len(entries) :]:
            fe.finish(w.request)


def _region(image: Path, writes: list[Write]) -> tuple[int, bytes]:
    """(first sector, bytes) of the part of the image this round wrote."""
    if not writes:
        return 0, b""
    lo = min(w.sector for w in writes)
    hi = max(w.sector + w.count for w in writes)
    with open(image, "rb") as f:
        f.seek(lo * SECTOR)
        return lo, f.read((hi - lo) * SECTOR)


def _check_image(
    region: tuple[int, bytes], rnd: int, writes: list[Write], flushes: list[InFlight]
) -> int:
    """Invariants 1 and 2 of peers.md 4.3; returns how many writes were durable."""
    base, image = region
    acked_flushes = [
        f.submitted for f in flushes if f.response is not None and f.response.status == OK
    ]
    durable = 0
    for w in writes:
        acked_before_flush = w.entry.acked and any(w.entry.acked < f for f in acked_flushes)
        whole = True
        for k in range(w.count):
            s = w.sector + k
            got = image[(s - base) * SECTOR : (s - base + 1) * SECTOR]
            expected = sector_stamp(rnd, w.rid, s)
            assert got in (expected, bytes(SECTOR)), f"sector {s}: bytes nobody wrote, or torn"
            whole = whole and got == expected
        if acked_before_flush:
            assert whole, f"write {w.rid} acked before an acked flush is not on the image"
            durable += 1
    return durable


async def _durability(rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    async with blk_host() as h:
        image = h.base / "disk.img"
        with open(image, "wb") as f:
            f.truncate(SECTOR * 24 * 8 * 400 * max(rounds, 4))
        created = await h.create_guest(pages=4096)
        await h.attach(created.domid, DEVID, str(image))
        async with frontend(h, created, DEVID) as fe:
            await fe.connect(order=rng.choice([0, 1, 2]), persistent=rng.random() < 0.5)
            cursor, durable, rounds_done = 8, 0, 0
            for rnd in range(rounds):
                writes: list[Write] = []
                flushes: list[InFlight] = []
                with trio.move_on_after(rng.uniform(0.005, 0.15)):
                    await _workload(fe, rnd, cursor, rng, writes, flushes)
                h.kill_blkback()
                durable += _check_image(_region(image, writes), rnd, writes, flushes)
                print(
                    f"round {rnd}: {len(writes)} writes, {len(flushes)} flushes, durable {durable}"
                )
                cursor = max((w.sector + w.count for w in writes), default=cursor) + 8
                await h.start_blkback()
                await fe.recover()
                pending = [w.entry for w in writes] + flushes
                assert set(await fe.wait(pending)) == {OK}
                # after the replay every write is on the image, each sector exactly
                base, data = _region(image, writes)
                for w in writes:
                    for k in range(w.count):
                        s = w.sector + k
                        got = data[(s - base) * SECTOR : (s - base + 1) * SECTOR]
                        assert got == sector_stamp(rnd, w.rid, s)
                assert not fe.stray and set(fe.responses.values()) == {1}, "exactly once"
                for w in writes:
                    fe.finish(w.request)  # pages of requests the kill interrupted
                rounds_done += 1
            assert rounds_done == rounds
            assert durable > 0 or rounds < 3


async def test_durability_under_kill9_quick() -> None:
    with trio.fail_after(100):
        await _durability(rounds=4, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(1800)
async def test_durability_under_kill9_200_runs() -> None:
    with trio.fail_after(1700):
        await _durability(rounds=200, seed=2026)
