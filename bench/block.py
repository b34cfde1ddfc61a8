"""Block I/O through the guest kernel's blkfront to blkback, against plain
pread/pwrite of the same image file, in one run.

A host runs as processes (``domsplit host up``: hypervisor, xenstored,
blkback) and a 2-vCPU ``xen`` guest is created with a raw 128 MiB image as
``xvda``. Its ``block_raw`` workload (services/frontend/kernel/blkbench.py)
drives blkfront the way a guest's ``dd``/``fio`` would: ``qd`` requests in
flight, each write from a buffer, each read handed back as a fresh
``bytes``. blkfront negotiates persistent grants and indirect segments, so a
1 MiB block is one INDIRECT request of 256 segments over persistent pages,
copied in (write) or out (read) as Linux blkfront does; blkback moves it with
one ``pwritev``/``preadv`` between those pages and the image's page cache.

Metrics (each against its baseline in this run, on the same file):

- sequential 1 MiB writes, then reads, 12 in flight, against ``os.pwrite`` /
  ``os.pread`` of 1 MiB by one process (floor 0.4x, goal 0.7x);
- 4 KiB random reads at queue depth 32 against 4 KiB ``os.pread`` at the
  same offsets (floor 0.1x, goal 0.4x);
- requests per notification during the random reads, each way: blkback's
  notifications (``rsp_event`` hold-off) and blkfront's kicks
  (``req_event``), against 1 (one per request).

Nothing is pinned (pinning the guest's vCPUs to one CPU with ``domsplit
vcpu-pin`` and blkback to the other was tried: no better at 4 KiB and worse
at 1 MiB whenever the machine's two CPUs sat apart, see the README). Each
workload runs once as a warm-up first.
``DOMSPLIT_VCPU_PROFILE=<dir>`` makes the vCPU processes dump cProfile stats.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from typing import Any

import trio

from bench._report import Result, emit, median, note
from services.frontend.kernel import control as kc
from services.frontend.kernel.blkbench import block_order
from services.toolstack._testing import run_cli, temporary_host
from shared import messages
from shared.transport import open_channel

MIB = 1 << 20
PAGE = 4096
SIZE = 128 * MIB
DEVID = 51712  # xvda
#: 1 MiB requests in flight. blkfront asks for a notification when half of
#: them are answered; the notification's trip (blkback, hypervisor, vCPU) takes
#: a few hundred microseconds, which at 8 left blkback idle with 3 requests'
#: work (~250 us) and cost every write a quarter of its speed; 16 was no
#: better than 12 (more of the cache for pages in flight)
SEQ_DEPTH = 12
RAND_DEPTH = 32
SERVICES = ("hypervisor", "xenstore", "blkback")
DRIVER = 'xenbus_drivers = {"vbd": "services.frontend.kernel.blkfront:Blkfront"}'


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


async def _blkback(chan: Any, domid: int) -> tuple[int, int]:
    """(requests, notifications) blkback counted on the guest's xvda so far."""
    stats = (await chan.call(messages.StatusRequest(), timeout=10)).stats["blkback"]
    dev = stats["devices"][f"{domid}/{DEVID}"]["counters"]
    return dev.get("requests", 0), dev.get("notifications", 0)


async def measure(rounds: int, mib: int, nreads: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = collections.defaultdict(list)
    with trio.fail_after(120 + 60 * rounds), temporary_host(SERVICES) as host:
        image = host.path.parent / "disk.img"
        with open(image, "wb") as f:
            for _ in range(SIZE // MIB):
                f.write(os.urandom(MIB))
        cfg = host.path.parent / "bench.cfg"
        cfg.write_text(
            'name = "blk"\nvcpus = 2\nmemory = 64\nplatform = "xen"\n'
            f'{DRIVER}\ndisk = ["target={image}, vdev=xvda, access=rw"]\n'
        )
        topo = ("-t", str(host.path))
        up = await run_cli("host", "up", *topo, timeout=60)
        if up.returncode:
            raise RuntimeError(up.stderr.decode())
        made = await run_cli("create", str(cfg), *topo, "--json")
        if made.returncode:
            raise RuntimeError(made.stderr.decode())
        domid = json.loads(made.stdout)["domid"]
        vcpu0 = f"ipc://{host.host.rundir}/guests/dom{domid}/vcpu0.sock"
        async with (
            open_channel(vcpu0) as guest,
            open_channel(host.host.endpoint("blkback")) as blkback,
        ):
            await guest.wait_connected(timeout=30)
            await blkback.wait_connected(timeout=30)

            async def run(spec: dict[str, Any]) -> dict[str, Any]:
                reply = await guest.call(kc.KernelRun(json.dumps(spec)), timeout=60 + 30 * rounds)
                res = json.loads(reply.json)
                if res.get("error") or res.get("timed_out") or res.get("failed"):
                    raise RuntimeError(f"block_raw {spec}: {res}")
                return res

            blocks = SIZE // MIB
            seq = [b * MIB for b in block_order("seq", mib, blocks, 1)]
            rand = [b * PAGE for b in block_order("random", nreads, SIZE // PAGE, 7)]
            common = {"kind": "block_raw", "vdev": "xvda", "timeout": 60}
            big = {**common, "bs": MIB, "qd": SEQ_DEPTH, "count": mib, "pattern": "seq"}
            small = {"bs": PAGE, "qd": RAND_DEPTH, "count": nreads, "pattern": "random"}
            # warm-up, as fio's ramp_time: blkfront's persistent pages, blkback's
            # mappings of them, both heaps (a first pass of 1 MiB blocks ran at
            # two thirds of the speed of the next)
            for op in ("read", "write"):
                await run({**big, "op": op, "count": 2 * blocks})
            await run({**common, **small, "op": "read", "count": 4000})
            for r in range(rounds):
                res = await run({**big, "op": "write"})
                out["w"].append(res["mb_s"])
                out["wb"].append(mib * MIB / _direct(str(image), "write", seq, MIB) / 1e6)
                res = await run({**big, "op": "read"})
                out["r"].append(res["mb_s"])
                out["rb"].append(mib * MIB / _direct(str(image), "read", seq, MIB) / 1e6)
                before = await _blkback(blkback, domid)
                res = await run({**common, **small, "op": "read", "seed": 7})
                after = await _blkback(blkback, domid)
                out["iops"].append(res["iops"])
                out["iopsb"].append(nreads / _direct(str(image), "read", rand, PAGE))
                reqs, notes = after[0] - before[0], after[1] - before[1]
                out["rsp_per_notify"].append(reqs / max(1, notes))
                out["req_per_kick"].append(res["requests_per_kick"])
                note(
                    f"round {r + 1}/{rounds}: write {out['w'][-1]:.0f} MB/s "
                    f"(pwrite {out['wb'][-1]:.0f}), read {out['r'][-1]:.0f} MB/s "
                    f"(pread {out['rb'][-1]:.0f}), 4k random {out['iops'][-1]:.0f} IOPS "
                    f"(pread {out['iopsb'][-1]:.0f}); per notification: "
                    f"{out['rsp_per_notify'][-1]:.1f} responses, "
                    f"{out['req_per_kick'][-1]:.1f} requests per kick"
                )
    return out


def run(quick: bool = False) -> list[Result]:
    m = trio.run(measure, 1 if quick else 5, 128 if quick else 2048, 4000 if quick else 40000)
    via = ", same file; guest blkfront -> blkback"
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
                "os.pwrite 1 MiB" + via,
            ),
            Result(
                "block",
                "seq_read_1m_MBps",
                median(m["r"]),
                median(m["rb"]),
                0.7,
                False,
                "MB/s",
                "os.pread 1 MiB" + via,
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
                None,
                False,
                "requests",
                "one blkback notification per request",
            ),
            Result(
                "block",
                "rand_read_qd32_requests_per_kick",
                median(m["req_per_kick"]),
                1.0,
                None,
                False,
                "requests",
                "one blkfront kick per request",
            ),
        ]
    )


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
