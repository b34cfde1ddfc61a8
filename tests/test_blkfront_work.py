"""The verifying block workload's stamps and checker, and its run loop against
an in-memory device (no kernel)."""

from __future__ import annotations

import trio

from services.frontend.kernel import blkwork as bw

TAG = 7


def test_a_stamp_names_its_write_and_sector() -> None:
    raw = bw.stamp_sector(42, 1000, TAG)
    assert len(raw) == 512 and bw.parse_stamp(raw, 1000, TAG) == 42
    assert bw.parse_stamp(raw, 1001, TAG) is None  # misdirected
    assert bw.parse_stamp(raw, 1000, TAG + 1) is None  # another run's


def test_classify_tells_new_old_torn_and_foreign() -> None:
    new, old = bw.stamp_sector(9, 5, TAG), bw.stamp_sector(3, 5, TAG)
    history = {3, 9}
    assert bw.classify(new, 5, TAG, 9, history) == "new"
    assert bw.classify(old, 5, TAG, 9, history) == "old"
    torn = old[:256] + new[256:]  # a mix of two writes inside one sector
    assert bw.classify(torn, 5, TAG, 9, history) == "torn"
    assert bw.classify(bw.stamp_sector(9, 6, TAG), 5, TAG, 9, history) == "torn"
    assert bw.classify(bytes(512), 5, TAG, 9, history) == "foreign"
    assert bw.classify(bw.stamp_sector(77, 5, TAG), 5, TAG, 9, history) == "foreign"


class MemDisk:
    """A block device in a bytearray; ``lose`` drops writes to chosen sectors."""

    def __init__(self, sectors: int) -> None:
        self.buf = bytearray(sectors * 512)
        self.sectors = sectors
        self.lose: set[int] = set()
        self.flushes = 0
        self.in_flight = 0
        self.max_in_flight = 0

    async def _io(self) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await trio.sleep(0.0001)
        self.in_flight -= 1

    async def read(self, sector: int, n: int) -> bytes:
        await self._io()
        return bytes(self.buf[sector * 512 : (sector + n) * 512])

    async def write(self, sector: int, data: bytes) -> None:
        await self._io()
        if sector not in self.lose:
            self.buf[sector * 512 : sector * 512 + len(data)] = data

    async def flush(self) -> None:
        self.flushes += 1


async def _run(spec: dict, disk: MemDisk) -> bw._Run:
    run = bw._Run(bw.Plan.of(spec, disk.sectors), bw.Verifier(tag=TAG))
    async with trio.open_nursery() as n:
        for _ in range(run.plan.qd):
            n.start_soon(run.worker, disk)
    await run.verify_all(disk)
    return run


async def test_random_mixed_run_verifies_clean() -> None:
    disk = MemDisk(2048)
    spec = {"pattern": "random", "op": "mixed", "bs": 4096, "qd": 8, "count": 400}
    run = await _run(spec | {"flush_every": 16}, disk)
    assert run.ops == 400 and run.reads + run.writes == 400
    assert run.verifier.counts["new"] > 0
    assert sum(n for o, n in run.verifier.counts.items() if o != "new") == 0
    assert disk.flushes == run.writes // 16 and disk.max_in_flight <= 8


async def test_a_lost_write_is_reported_as_old() -> None:
    disk = MemDisk(256)
    spec = {"pattern": "seq", "op": "write", "bs": 4096, "qd": 4, "count": 64, "span": 256}
    disk.lose = {8 * 3}  # block 3, second pass: its first write stays
    run = bw._Run(bw.Plan.of(spec, disk.sectors), bw.Verifier(tag=TAG))
    async with trio.open_nursery() as n:
        for _ in range(4):
            n.start_soon(run.worker, disk)
    disk.lose = set()
    await run.verify_all(disk)
    assert run.verifier.counts["foreign"] == 8  # block 3 was never written at all
