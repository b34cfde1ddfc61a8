"""The verifying block workload (``kind: "block"``) and its sector stamps.

Every 512-byte sector a write puts down is a *stamp*: a header (magic, the
write's id, the sector number, the run's tag, a check word) followed by a fill
derived from the check word. A checker holding the id of the last completed
write to each sector can then tell each sector apart as:

- ``new`` — the stamp of the last completed write (the only right answer);
- ``old`` — the stamp of an earlier write to this sector (a lost write);
- ``torn`` — header and fill disagree, or the sector number is not this one
  (a mix of two writes inside one sector, or a misdirected write);
- ``foreign`` — zeros or a stamp that was never written here (bytes nobody wrote).

Spec (every field has a default)::

    {"kind": "block", "vdev": "xvda", "pattern": "seq|random", "op": "read|write|mixed",
     "bs": 4096, "qd": 8, "count": 256, "flush_every": 0, "start": 0, "span": 0,
     "seed": 1, "verify_after": true, "timeout": 60}

``start``/``span`` are in sectors (``span`` 0: to the end of the disk). At most
``qd`` requests are in flight and never two on the same block, so the
expected content of every block is known. ``verify_after`` reads back every
block written. Runs on vCPU0, where blkfront lives.
"""

from __future__ import annotations

import hashlib
import random
import struct
import time
from typing import TYPE_CHECKING, Any

import attrs
import trio

from services.frontend.kernel.blkfront import BlockIOError, workload_device

if TYPE_CHECKING:
    from services.frontend.kernel.kernel import Kernel

SECTOR = 512
MAGIC = b"DSBLKSTM"
_HEAD = struct.Struct("<8sQQQQ")  # magic, write id, sector, tag, check
_FILL = (SECTOR - _HEAD.size) // 8
MAX_WRITTEN_REPORTED = 4096
MAX_ERRORS_REPORTED = 20
OUTCOMES = ("new", "old", "torn", "foreign")


def _check(wid: int, sector: int, tag: int) -> int:
    digest = hashlib.blake2b(_HEAD.pack(MAGIC, wid, sector, tag, 0), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def stamp_sector(wid: int, sector: int, tag: int) -> bytes:
    """The 512 bytes write ``wid`` puts at ``sector``."""
    check = _check(wid, sector, tag)
    return _HEAD.pack(MAGIC, wid, sector, tag, check) + check.to_bytes(8, "little") * _FILL


def stamp_block(wid: int, sector: int, nsectors: int, tag: int) -> bytes:
    return b"".join(stamp_sector(wid, sector + i, tag) for i in range(nsectors))


def parse_stamp(raw: bytes, sector: int, tag: int) -> int | None:
    """The write id of a whole, well-formed stamp of this run at ``sector``;
    None if it is not one (see :func:`classify`)."""
    magic, wid, at, t, check = _HEAD.unpack_from(raw)
    if magic != MAGIC or at != sector or t != tag or check != _check(wid, sector, tag):
        return None
    if raw[_HEAD.size :] != check.to_bytes(8, "little") * _FILL:
        return None
    return wid


def classify(raw: bytes, sector: int, tag: int, expected: int, history: set[int]) -> str:
    """One of :data:`OUTCOMES` for the bytes read at ``sector`` when ``expected``
    was the last completed write there and ``history`` every write there."""
    wid = parse_stamp(raw, sector, tag)
    if wid is not None:
        if wid == expected:
            return "new"
        return "old" if wid in history else "foreign"
    if raw[:8] == MAGIC:
        return "torn"  # a stamp's header with the wrong body, sector or tag
    return "foreign"


@attrs.define
class Verifier:
    """What the workload knows it wrote: per sector, the last write and all writes."""

    tag: int
    expected: dict[int, int] = attrs.Factory(dict)
    history: dict[int, set[int]] = attrs.Factory(dict)
    counts: dict[str, int] = attrs.Factory(lambda: dict.fromkeys(OUTCOMES, 0))
    unknown: int = 0  #: sectors read that this run never wrote (not judged)
    errors: list[str] = attrs.Factory(list)

    def wrote(self, wid: int, sector: int, nsectors: int) -> None:
        for s in range(sector, sector + nsectors):
            self.expected[s] = wid
            self.history.setdefault(s, set()).add(wid)

    def check(self, sector: int, data: bytes) -> int:
        """Judge a read; answers the number of sectors that were not ``new``."""
        bad = 0
        for i in range(len(data) // SECTOR):
            s = sector + i
            if s not in self.expected:
                self.unknown += 1
                continue
            raw = data[i * SECTOR : (i + 1) * SECTOR]
            outcome = classify(raw, s, self.tag, self.expected[s], self.history[s])
            self.counts[outcome] += 1
            if outcome != "new":
                bad += 1
                if len(self.errors) < MAX_ERRORS_REPORTED:
                    self.errors.append(f"sector {s}: {outcome} (expected write {self.expected[s]})")
        return bad


@attrs.define
class Plan:
    """The spec, resolved against the device."""

    pattern: str
    op: str
    bs_sectors: int
    qd: int
    count: int
    flush_every: int
    start: int
    blocks: int
    seed: int

    @classmethod
    def of(cls, spec: dict[str, Any], disk_sectors: int) -> Plan:
        bs = int(spec.get("bs", 4096))
        if bs <= 0 or bs % SECTOR:
            raise ValueError(f"bs {bs} is not a positive multiple of 512")
        start = int(spec.get("start", 0))
        span = int(spec.get("span", 0)) or max(0, disk_sectors - start)
        blocks = span // (bs // SECTOR)
        if blocks <= 0:
            raise ValueError(f"no room for one {bs}-byte block from sector {start}")
        return cls(
            pattern=str(spec.get("pattern", "seq")),
            op=str(spec.get("op", "write")),
            bs_sectors=bs // SECTOR,
            qd=max(1, int(spec.get("qd", 8))),
            count=int(spec.get("count", 256)),
            flush_every=int(spec.get("flush_every", 0)),
            start=start,
            blocks=blocks,
            seed=int(spec.get("seed", 1)),
        )


async def run(k: Kernel, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The ``block`` workload on vCPU0; None elsewhere."""
    if k.cpu != 0:
        return None
    dev = await workload_device(k, spec)
    if isinstance(dev, str):
        return {"error": dev}
    timeout = float(spec.get("timeout", 60))
    plan = Plan.of(spec, dev.sectors)
    verifier = Verifier(tag=plan.seed)
    state = _Run(plan, verifier)
    stats0 = dev.statistics()
    t0 = time.monotonic()
    with trio.move_on_after(timeout) as scope:
        async with trio.open_nursery() as nursery:
            for _ in range(plan.qd):
                nursery.start_soon(state.worker, dev)
    elapsed = time.monotonic() - t0
    verified = 0
    if spec.get("verify_after", True) and not scope.cancelled_caught:
        verified = await state.verify_all(dev)
    stats = dev.statistics()
    reqs, notifies = stats.requests - stats0.requests, stats.notifies - stats0.notifies
    nbytes = state.bytes
    written = sorted(state.block_writer.items())
    return {
        "vdev": dev.name,
        "plan": attrs.asdict(plan),
        "ops": state.ops,
        "reads": state.reads,
        "writes": state.writes,
        "flushes": state.flushes,
        "io_errors": state.io_errors,
        "io_error_samples": state.io_error_samples,
        "timed_out": scope.cancelled_caught,
        "seconds": elapsed,
        "bytes": nbytes,
        "mb_s": nbytes / elapsed / 1e6 if elapsed else 0.0,
        "iops": state.ops / elapsed if elapsed else 0.0,
        "verify": {
            "sectors": sum(verifier.counts.values()),
            "errors": sum(n for o, n in verifier.counts.items() if o != "new"),
            "outcomes": dict(verifier.counts),
            "unjudged": verifier.unknown,
            "verified_after_sectors": verified,
            "samples": verifier.errors,
        },
        "ring": {
            "requests": reqs,
            "notifies": notifies,
            "requests_per_notify": reqs / notifies if notifies else None,
        },
        "blkfront": {
            key: v - getattr(stats0, key) if key not in ("media_changes", "connects") else v
            for key, v in attrs.asdict(stats).items()
        },
        "device": dev.status(),
        "tag": plan.seed,
        "written": [[plan.start + b * plan.bs_sectors, w] for b, w in written]
        if len(written) <= MAX_WRITTEN_REPORTED
        else None,
    }


@attrs.define
class _Run:
    plan: Plan
    verifier: Verifier
    issued: int = 0
    ops: int = 0
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    bytes: int = 0
    io_errors: int = 0
    io_error_samples: list[str] = attrs.Factory(list)
    next_wid: int = 1
    busy: set[int] = attrs.Factory(set)
    block_writer: dict[int, int] = attrs.Factory(dict)
    rng: random.Random = attrs.Factory(random.Random)

    def __attrs_post_init__(self) -> None:
        self.rng.seed(self.plan.seed)

    def _pick(self) -> int | None:
        """The next block, or None when it is busy (seq: the one after the last)."""
        p = self.plan
        if p.pattern == "seq":
            b = self.issued % p.blocks
            return None if b in self.busy else b
        for _ in range(64):
            b = self.rng.randrange(p.blocks)
            if b not in self.busy:
                return b
        return next((b for b in range(p.blocks) if b not in self.busy), None)

    def _is_write(self) -> bool:
        if self.plan.op == "mixed":
            return self.rng.random() < 0.5
        return self.plan.op == "write"

    async def worker(self, dev: Any) -> None:
        p = self.plan
        while self.issued < p.count:
            block = self._pick()
            if block is None:  # every candidate is in flight: wait for one
                await trio.sleep(0.001)
                continue
            self.issued += 1
            self.busy.add(block)
            sector = p.start + block * p.bs_sectors
            try:
                if self._is_write():
                    await self._write(dev, block, sector)
                else:
                    data = await dev.read(sector, p.bs_sectors)
                    self.reads += 1
                    self.bytes += len(data)
                    self.verifier.check(sector, data)
                self.ops += 1
            except BlockIOError as exc:
                self._io_error(exc)
            finally:
                self.busy.discard(block)

    async def _write(self, dev: Any, block: int, sector: int) -> None:
        wid, self.next_wid = self.next_wid, self.next_wid + 1
        data = stamp_block(wid, sector, self.plan.bs_sectors, self.verifier.tag)
        await dev.write(sector, data)
        self.writes += 1
        self.bytes += len(data)
        self.verifier.wrote(wid, sector, self.plan.bs_sectors)
        self.block_writer[block] = wid
        if self.plan.flush_every and self.writes % self.plan.flush_every == 0:
            await dev.flush()
            self.flushes += 1

    def _io_error(self, exc: BlockIOError) -> None:
        self.io_errors += 1
        if len(self.io_error_samples) < MAX_ERRORS_REPORTED:
            self.io_error_samples.append(str(exc))

    async def verify_all(self, dev: Any) -> int:
        """Read back every block written (``qd`` at a time); answers sectors read."""
        blocks = sorted(self.block_writer)
        done = 0

        async def one(block: int) -> None:
            nonlocal done
            sector = self.plan.start + block * self.plan.bs_sectors
            try:
                data = await dev.read(sector, self.plan.bs_sectors)
            except BlockIOError as exc:
                self._io_error(exc)
                return
            self.verifier.check(sector, data)
            done += self.plan.bs_sectors

        for i in range(0, len(blocks), self.plan.qd):
            async with trio.open_nursery() as n:
                for block in blocks[i : i + self.plan.qd]:
                    n.start_soon(one, block)
        return done
