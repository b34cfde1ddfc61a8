"""The raw block throughput workload (``kind: "block_raw"``): what a guest's
``dd``/``fio`` would measure through blkfront, with no stamping or checking
(the verifying workload is :mod:`blkwork`).

Spec (every field has a default)::

    {"kind": "block_raw", "vdev": "xvda", "op": "read|write", "pattern": "seq|random",
     "bs": 1048576, "qd": 4, "count": 256, "seed": 1, "timeout": 60}

It keeps ``qd`` requests in flight as a kernel-side I/O generator does: it
starts ``qd`` bios on an :class:`~.blkfront.IoContext` and each completion's
``end_io`` callback, in the interrupt handler, starts the next one (no task
switch per completion; a userspace ``fio`` would reap them with
``io_getevents``, which :meth:`~.blkfront.IoContext.reap` also offers). Sequential offsets wrap at the end of
the disk; random ones are ``bs``-aligned. Writes put down one buffer of
random bytes made up front; reads hand each block to the caller as
``bytes``, as ``os.pread`` does. Runs on vCPU0, where blkfront lives.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from typing import TYPE_CHECKING, Any

import trio

from services.frontend.kernel.blkfront import workload_device
from services.frontend.kernel.blkfront_core import Completion
from services.frontend.kernel.blkfront_state import BioKind
from shared.abi.blkif import SECTOR_SIZE

if TYPE_CHECKING:
    from services.frontend.kernel.kernel import Kernel


def block_order(pattern: str, count: int, blocks: int, seed: int) -> list[int]:
    """The block numbers the workload visits, in order (a baseline replays them)."""
    if pattern == "random":
        rng = random.Random(seed)
        return [rng.randrange(blocks) for _ in range(count)]
    return [i % blocks for i in range(count)]


async def run(k: Kernel, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The ``block_raw`` workload on vCPU0; None elsewhere."""
    if k.cpu != 0:
        return None
    dev = await workload_device(k, spec)
    if isinstance(dev, str):
        return {"error": dev}
    timeout = float(spec.get("timeout", 60))
    bs = int(spec.get("bs", 1 << 20))
    if bs <= 0 or bs % SECTOR_SIZE:
        return {"error": f"bs {bs} is not a positive multiple of {SECTOR_SIZE}"}
    op = str(spec.get("op", "read"))
    if op not in ("read", "write"):
        return {"error": f"op {op!r} is not read or write"}
    nsect = bs // SECTOR_SIZE
    blocks = dev.sectors // nsect
    if blocks == 0:
        return {"error": f"{dev.name} holds no block of {bs} bytes"}
    count = int(spec.get("count", 256))
    order = block_order(str(spec.get("pattern", "seq")), count, blocks, int(spec.get("seed", 1)))
    data = os.urandom(bs)
    qd = max(1, int(spec.get("qd", 4)))
    kind = BioKind.WRITE if op == "write" else BioKind.READ
    todo = iter(order)
    stats0 = dev.statistics()
    failed = 0
    payload = data if op == "write" else b""
    stopped = False

    def end_io(c: Completion) -> None:
        nonlocal failed
        failed += c.status != 0
        block = None if stopped else next(todo, None)
        if block is not None:
            ctx.start(kind, block * nsect, nsect, payload)

    ctx = dev.io_context(end_io)
    t0 = time.monotonic()
    with trio.move_on_after(timeout) as scope:
        for block in itertools.islice(todo, qd):
            ctx.start(kind, block * nsect, nsect, payload)
        await ctx.drained()
    stopped = True
    elapsed = time.monotonic() - t0
    stats = dev.statistics()
    reqs = stats.requests - stats0.requests
    return {
        "vdev": dev.name,
        "op": op,
        "bs": bs,
        "count": count,
        "timed_out": scope.cancelled_caught,
        "failed": failed,
        "seconds": elapsed,
        "iops": count / elapsed if elapsed else 0.0,
        "mb_s": count * bs / elapsed / 1e6 if elapsed else 0.0,
        "requests": reqs,
        "requests_per_kick": reqs / max(1, stats.notifies - stats0.notifies),
    }
