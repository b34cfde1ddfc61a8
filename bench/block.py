"""Block I/O through blkfront -> blkback against plain pread/pwrite, same run.

A real hypervisor, xenstored and blkback run as processes; this process is
the guest's blkfront. The guest kernel's blkfront has not landed yet, so the
frontend is the test one of ``tests/blk_frontend.py`` (bound as the guest's
vCPU0: grants in its table, the real ring, ``EVTCHNOP_send`` hypercalls,
upcalls scanned from ``shared_info``), driven the way a block layer drives
blkfront: every free slot is filled, then one push and at most one kick; each
upcall's responses complete their requests and free their buffers.

Buffers are persistent grants (``feature-persistent``): each request in
flight owns a granted buffer of consecutive frames (and, for 1 MiB, an
indirect page), as Linux blkfront keeps its persistent grants. As Linux
blkfront copies data into and out of its persistent pages, this frontend
copies a write's data in before submitting and a read's data out (into a new
``bytes``, like ``os.pread``) on completion; both copies are in the figures.

Metrics (each against its baseline in this run):

- sequential 1 MiB writes, then reads, 4 in flight (INDIRECT requests of 256
  segments), against ``os.pwrite``/``os.pread`` of 1 MiB on the same file by
  this process (floor 0.4x, goal 0.7x);
- 4 KiB random reads at queue depth 32 against 4 KiB ``os.pread`` at the same
  offsets (floor 0.1x, goal 0.4x);
- requests per notification during the random reads, each way: blkback's
  notifications (``rsp_event`` hold-off) and the frontend's kicks
  (``req_event``), against 1 (a notification per request); goal 8, a quarter
  of the queue depth.

With ``BLK_PROFILE=<dir>`` every process runs under cProfile (this one
profiles itself into ``<dir>/frontend.prof``).
"""

from __future__ import annotations

import collections
import cProfile
import os
import random
import time
from collections.abc import Callable
from typing import Any

import trio

from bench._report import Result, emit, median, note
from shared.abi import blkif as bi
from tests.blk_frontend import BlkFrontend, frontend
from tests.blk_harness import PROFILE_ENV, blk_host

DEVID = 51712
PAGE = 4096
MIB = 1 << 20
SIZE = 128 * MIB
SEQ_DEPTH = 4  # 4 x 257 persistent grants fit blkback's 1056
RAND_DEPTH = 32
SECTOR = bi.SECTOR_SIZE
_REQ = bi.REQUEST.struct
_IND = bi.REQUEST_INDIRECT.struct
_SLOT = bi.BLKIF_RING_ENTRY_SIZE


class _Buffer:
    """A persistent-grant I/O buffer: consecutive frames, plus an indirect page
    holding their segment list for requests above 11 segments."""

    def __init__(self, fe: BlkFrontend, npages: int) -> None:
        pages = fe.grant_buffer(npages)
        self.start = pages[0][0] * PAGE
        self.nbytes = npages * PAGE
        self.refs = [ref for _, ref in pages]
        self.indirect: tuple[int, int, bytes] | None = None
        if npages > bi.BLKIF_MAX_SEGMENTS_PER_REQUEST:
            [(gfn, ref)] = fe.grant_buffer(1)
            segs = [bi.Segment(r, 0, 7) for r in self.refs]
            self.indirect = (gfn * PAGE, ref, bi.encode_indirect_page(segs))

    def request(self, fe: BlkFrontend, op: int, rid: int, sector: int) -> bytes:
        """The ring slot of a request over the whole buffer."""
        if self.indirect is None:
            segs: list[int] = []
            for ref in self.refs:
                segs += (ref, 0, 7)
            segs += (0, 0, 0) * (bi.BLKIF_MAX_SEGMENTS_PER_REQUEST - len(self.refs))
            return _REQ.pack(op, len(self.refs), DEVID, rid, sector, *segs)
        at, ref, content = self.indirect
        fe.mem.view[at : at + len(content)] = content  # what blkfront writes per request
        grefs = (ref,) + (0,) * (bi.BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST - 1)
        slot = _IND.pack(bi.BlkifOp.INDIRECT, op, len(self.refs), rid, sector, DEVID, *grefs)
        return slot.ljust(_SLOT, b"\0")


async def _stream(
    fe: BlkFrontend,
    buffers: list[_Buffer],
    count: int,
    issue: Callable[[int, _Buffer, int], bytes],
    complete: Callable[[_Buffer], None],
) -> float:
    """Keep every buffer busy until ``count`` requests completed; seconds taken."""
    fe.completions = collections.deque()
    free = list(buffers)
    owner: dict[int, _Buffer] = {}
    issued = done = 0
    start = time.perf_counter()
    with trio.fail_after(60):
        while done < count:
            slots = []
            while free and issued < count:
                buf = free.pop()
                rid, fe.next_id = fe.next_id, fe.next_id + 1
                slots.append(issue(issued, buf, rid))
                owner[rid] = buf
                issued += 1
            if slots:
                fe.put_requests(slots)
                await fe.kick()
            while not fe.completions:
                await fe.progress.wait()
            while fe.completions:
                entry = fe.completions.popleft()
                rsp = entry.response
                assert rsp is not None and rsp.status == bi.BlkifRsp.OKAY, rsp
                buf = owner.pop(rsp.id)
                complete(buf)
                free.append(buf)
                done += 1
    elapsed = time.perf_counter() - start
    fe.completions = None
    return elapsed


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


async def _counters(h: Any, domid: int, fe: BlkFrontend) -> tuple[int, int, int]:
    """(requests, blkback notifications, frontend kicks) so far."""
    dev = (await h.blkback_status())["devices"][f"{domid}/{DEVID}"]["counters"]
    return dev.get("requests", 0), dev.get("notifications", 0), fe.notifies


async def measure(rounds: int, mib: int, nreads: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = collections.defaultdict(list)
    async with blk_host() as h:
        image = h.base / "disk.img"
        with open(image, "wb") as f:
            f.truncate(SIZE)
        created = await h.create_guest(pages=8192)
        await h.attach(created.domid, DEVID, str(image))
        async with frontend(h, created, DEVID) as fe:
            await fe.connect(order=2, persistent=True)
            view = fe.mem.view
            big = [_Buffer(fe, MIB // PAGE) for _ in range(SEQ_DEPTH)]
            small = [_Buffer(fe, 1) for _ in range(RAND_DEPTH)]
            data = os.urandom(MIB)
            seq = [k % (SIZE // MIB) * MIB for k in range(mib)]
            rng = random.Random(1)
            rand = [rng.randrange(SIZE // PAGE) * PAGE for _ in range(nreads)]
            _direct(str(image), "write", [k * MIB for k in range(SIZE // MIB)], MIB)  # allocate

            def write(k: int, b: _Buffer, rid: int) -> bytes:
                view[b.start : b.start + MIB] = data
                return b.request(fe, bi.BlkifOp.WRITE, rid, seq[k] // SECTOR)

            def read(k: int, b: _Buffer, rid: int) -> bytes:
                return b.request(fe, bi.BlkifOp.READ, rid, seq[k] // SECTOR)

            def rand_read(k: int, b: _Buffer, rid: int) -> bytes:
                return b.request(fe, bi.BlkifOp.READ, rid, rand[k] // SECTOR)

            def consume(b: _Buffer) -> None:
                bytes(view[b.start : b.start + b.nbytes])  # the data, out of the buffer

            def nothing(b: _Buffer) -> None:
                pass

            profile = os.environ.get(PROFILE_ENV)
            prof = cProfile.Profile() if profile else None
            for r in range(rounds):
                if prof:
                    prof.enable()
                t = await _stream(fe, big, mib, write, nothing)
                out["w"].append(mib * MIB / t / 1e6)
                out["wb"].append(mib * MIB / _direct(str(image), "write", seq, MIB) / 1e6)
                t = await _stream(fe, big, mib, read, consume)
                out["r"].append(mib * MIB / t / 1e6)
                out["rb"].append(mib * MIB / _direct(str(image), "read", seq, MIB) / 1e6)
                before = await _counters(h, created.domid, fe)
                t = await _stream(fe, small, nreads, rand_read, consume)
                after = await _counters(h, created.domid, fe)
                if prof:
                    prof.disable()
                out["iops"].append(nreads / t)
                out["iopsb"].append(nreads / _direct(str(image), "read", rand, PAGE))
                reqs, notes, kicks = (a - b for a, b in zip(after, before, strict=True))
                out["rsp_per_notify"].append(reqs / max(1, notes))
                out["req_per_kick"].append(reqs / max(1, kicks))
                note(
                    f"round {r + 1}/{rounds}: write {out['w'][-1]:.0f} MB/s "
                    f"(pwrite {out['wb'][-1]:.0f}), read {out['r'][-1]:.0f} MB/s "
                    f"(pread {out['rb'][-1]:.0f}), 4k random {out['iops'][-1]:.0f} IOPS "
                    f"(pread {out['iopsb'][-1]:.0f}); per notification: "
                    f"{out['rsp_per_notify'][-1]:.1f} responses, "
                    f"{out['req_per_kick'][-1]:.1f} requests per kick"
                )
            if prof:
                prof.dump_stats(f"{profile}/frontend.prof")
    return out


def run(quick: bool = False) -> list[Result]:
    m = trio.run(measure, 1 if quick else 3, 64 if quick else 256, 3000 if quick else 20000)
    via = "; test blkfront (guest blkfront not landed)"
    return emit(
        [
            Result(
                "block",
                "seq_write_1m_MBps",
                median(m["w"]),
                median(m["wb"]),
                0.7,
                False,
                "MB/s",
                "os.pwrite 1 MiB, same file" + via,
            ),
            Result(
                "block",
                "seq_read_1m_MBps",
                median(m["r"]),
                median(m["rb"]),
                0.7,
                False,
                "MB/s",
                "os.pread 1 MiB, same file" + via,
            ),
            Result(
                "block",
                "rand_read_4k_qd32_iops",
                median(m["iops"]),
                median(m["iopsb"]),
                0.4,
                False,
                "IOPS",
                "os.pread 4 KiB, same offsets" + via,
            ),
            Result(
                "block",
                "rand_read_qd32_responses_per_notification",
                median(m["rsp_per_notify"]),
                1.0,
                8.0,
                False,
                "requests",
                "one blkback notification per request",
            ),
            Result(
                "block",
                "rand_read_qd32_requests_per_kick",
                median(m["req_per_kick"]),
                1.0,
                8.0,
                False,
                "requests",
                "one frontend kick per request",
            ),
        ]
    )
