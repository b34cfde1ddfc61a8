"""blkback throughput and IOPS through the ring against plain pread/pwrite, same run.

A real hypervisor, xenstored and blkback run as processes; this process is the
guest's blkfront (the test frontend of ``tests/blk_frontend.py``: grants, ring,
event channel, upcalls). It times:

- sequential 1 MiB writes then reads (indirect requests, 4 in flight) against
  ``os.pwrite``/``os.pread`` of 1 MiB on the same file by this process
  (floor 0.4x, goal 0.7x);
- 4 KiB random reads, 32 in flight, against 4 KiB ``os.pread`` at the same
  offsets (floor 0.1x, goal 0.4x);
- requests per notification, both ways (frontend kicks, backend notifies).

The frontend's own costs (copying data into its pages, granting them) are in
the ring figures, as they would be in a guest.
"""

from __future__ import annotations

import os
import random
import time

import trio

from bench._report import Result, emit, median, note
from shared.abi.blkif import BlkifOp, BlkifRsp
from tests.blk_frontend import BlkFrontend, frontend
from tests.blk_harness import blk_host

DEVID = 51712
MIB = 1 << 20
SIZE = 128 * MIB


async def _pipeline(fe: BlkFrontend, make, count: int, depth: int) -> float:  # type: ignore[no-untyped-def]
    """Keep ``depth`` requests in flight until ``count`` completed; seconds taken."""
    start = time.perf_counter()
    done = 0
    async with trio.open_nursery() as nursery:
        limiter = trio.Semaphore(depth)

        async def one(k: int) -> None:
            nonlocal done
            try:
                [(status, _)] = await fe.run([make(k)])
                assert status == BlkifRsp.OKAY, status
                done += 1
            finally:
                limiter.release()

        for k in range(count):
            await limiter.acquire()
            nursery.start_soon(one, k)
    assert done == count
    return time.perf_counter() - start


def _direct(path: str, op: str, offsets: list[int], size: int) -> float:
    fd = os.open(path, os.O_RDWR)
    buf = os.urandom(size)
    try:
        start = time.perf_counter()
        for off in offsets:
            if op == "write":
                os.pwrite(fd, buf, off)
            else:
                os.pread(fd, size, off)
        return time.perf_counter() - start
    finally:
        os.close(fd)


async def measure(rounds: int, mib: int, nreads: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in ("w", "wb", "r", "rb", "iops", "iopsb")}
    async with blk_host() as h:
        image = h.base / "disk.img"
        with open(image, "wb") as f:
            f.truncate(SIZE)
        created = await h.create_guest(pages=8192)
        await h.attach(created.domid, DEVID, str(image))
        async with frontend(h, created, DEVID) as fe:
            await fe.connect(order=2, persistent=True)
            data = os.urandom(MIB)
            seq = [k * MIB for k in range(mib)]
            rng = random.Random(1)
            rand = [rng.randrange(SIZE // 4096) * 4096 for _ in range(nreads)]
            _direct(str(image), "write", [k * MIB for k in range(SIZE // MIB)], MIB)  # allocate
            for r in range(rounds):
                t = await _pipeline(
                    fe, lambda k: fe.prepare(BlkifOp.WRITE, seq[k] // 512, data), mib, 4
                )
                out["w"].append(mib / t)
                out["wb"].append(mib / _direct(str(image), "write", seq, MIB))
                t = await _pipeline(
                    fe, lambda k: fe.prepare(BlkifOp.READ, seq[k] // 512, nbytes=MIB), mib, 4
                )
                out["r"].append(mib / t)
                out["rb"].append(mib / _direct(str(image), "read", seq, MIB))
                t = await _pipeline(
                    fe, lambda k: fe.prepare(BlkifOp.READ, rand[k] // 512, nbytes=4096), nreads, 32
                )
                out["iops"].append(nreads / t)
                out["iopsb"].append(nreads / _direct(str(image), "read", rand, 4096))
                note(
                    f"round {r + 1}/{rounds}: write {out['w'][-1]:.0f} MB/s "
                    f"(pwrite {out['wb'][-1]:.0f}), read {out['r'][-1]:.0f} MB/s "
                    f"(pread {out['rb'][-1]:.0f}), 4k random {out['iops'][-1]:.0f} IOPS "
                    f"(pread {out['iopsb'][-1]:.0f})"
                )
            dev = (await h.blkback_status())["devices"][f"{created.domid}/{DEVID}"]
            requests = dev["counters"]["requests"]
            out["rsp_per_notify"] = [requests / max(1, dev["counters"].get("notifications", 1))]
            out["req_per_kick"] = [requests / max(1, fe.notifies)]
            note(
                f"requests per backend notification {out['rsp_per_notify'][0]:.1f}, "
                f"per frontend kick {out['req_per_kick'][0]:.1f}"
            )
    return out


def run(quick: bool = False) -> list[Result]:
    m = trio.run(measure, 1 if quick else 3, 32 if quick else 128, 2000 if quick else 10000)
    return emit(
        [
            Result(
                "blkback",
                "seq_write_1m_MBps",
                median(m["w"]),
                median(m["wb"]),
                0.7,
                False,
                "MB/s",
                "os.pwrite 1 MiB, same file",
            ),
            Result(
                "blkback",
                "seq_read_1m_MBps",
                median(m["r"]),
                median(m["rb"]),
                0.7,
                False,
                "MB/s",
                "os.pread 1 MiB, same file",
            ),
            Result(
                "blkback",
                "rand_read_4k_qd32_iops",
                median(m["iops"]),
                median(m["iopsb"]),
                0.4,
                False,
                "IOPS",
                "os.pread 4 KiB, same offsets",
            ),
        ]
    )
