"""xenstored benchmark: read, write and transaction throughput with a pipelined
client, and single-request round trip, over nng, against an echo server on the
same transport measured in the same run.

The echo server (``python -m bench.xenstore echo ENDPOINT``) answers every
:class:`XsFrames` with the same bytes, so the baseline pays for exactly the
transport and codec work a xenstored request pays, and nothing else. Goal:
xenstored at >= 0.5x the echo server's request rate.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from bench._report import Result, emit, median, note
from services.xenstore.client import XsClient, open_xs_client
from services.xenstore.messages import XsBind, XsBound, XsFrames, host_secret
from shared.abi import xs_wire as w
from shared.abi.xs_wire import XsMessage, XsParser
from shared.transport import open_server

WINDOW = 200  # requests in flight for the pipelined runs


async def _pipelined(xs: XsClient, make: list[XsMessage]) -> float:
    """Requests per second, ``WINDOW`` in flight, one request per nng message."""
    t = time.perf_counter()
    sent = done = 0
    while done < len(make):
        while sent < len(make) and sent - done < WINDOW:
            await xs.send([make[sent]])
            sent += 1
        await xs.reply(make[done].req_id)
        done += 1
    return len(make) / (time.perf_counter() - t)


async def _rtt(xs: XsClient, n: int, path: str) -> float:
    lat = []
    for _ in range(n):
        msg = w.read(path, req_id=xs.next_id())
        t = time.perf_counter()
        await xs.request(msg)
        lat.append(time.perf_counter() - t)
    return median(lat) * 1e6


def _reads(xs: XsClient, n: int) -> list[XsMessage]:
    return [w.read("/bench/key", req_id=xs.next_id()) for _ in range(n)]


def _writes(xs: XsClient, n: int) -> list[XsMessage]:
    return [w.write(f"/bench/w/{i % 50}", b"v" * 32, req_id=xs.next_id()) for i in range(n)]


def _transactions(xs: XsClient, n: int, first_tx: int) -> list[XsMessage]:
    """start, write, commit per transaction; ids are predictable (they count up)."""
    out = []
    for k in range(n):
        tx = first_tx + k
        out.append(w.transaction_start(req_id=xs.next_id()))
        out.append(w.write(f"/bench/t/{k % 50}", b"x", req_id=xs.next_id(), tx_id=tx))
        out.append(w.transaction_end(tx, True, req_id=xs.next_id()))
    return out


async def _measure(endpoint: str, secret: bytes, n: int, echo: bool) -> dict[str, float]:
    async with open_xs_client(endpoint, 0, secret) as xs:
        if not echo:
            await xs.write("/bench/key", b"value")
        reads = await _pipelined(xs, _reads(xs, n))
        writes = await _pipelined(xs, _writes(xs, n))
        txs = await _pipelined(xs, _transactions(xs, n // 3, 1)) / 3
        rtt = await _rtt(xs, max(200, n // 10), "/bench/key")
    return {"read": reads, "write": writes, "transaction": txs, "rtt": rtt}


# --- the echo server ------------------------------------------------------------------


async def _echo_server(endpoint: str) -> None:
    """Every complete frame comes back whole, through a per-peer writer task,
    the way xenstored answers (inline parse, queued replies)."""
    async with open_server(endpoint) as server, trio.open_nursery() as nursery:
        peers: dict[object, tuple[XsParser, list[bytes], trio.Event]] = {}
        server.route(XsBind, lambda peer, m: XsBound(m.domid))

        async def writer(peer: object, out: list[bytes]) -> None:
            while True:
                await peers[peer][2].wait()
                peers[peer] = (peers[peer][0], out, trio.Event())
                data = b"".join(out)
                out.clear()
                await server.send(peer, XsFrames(data))

        def echo(peer: object, m: XsFrames) -> None:
            if peer not in peers:
                peers[peer] = (XsParser(), [], trio.Event())
                nursery.start_soon(writer, peer, peers[peer][1])
            parser, out, ready = peers[peer]
            out += [x.encode() for x in parser.feed(m.data)]
            ready.set()

        server.route(XsFrames, echo)
        await trio.sleep_forever()


def _start(args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd)


def run(quick: bool = False) -> list[Result]:
    n = 2000 if quick else 20000
    rounds = 1 if quick else 3
    repo = Path(__file__).resolve().parent.parent
    base = Path(tempfile.mkdtemp(prefix="xsb", dir="/tmp"))
    topo = base / "topo.toml"
    topo.write_text(f'[run]\ndir = "{base}/run"\n[hosts.b]\nservices = ["xenstore"]\n')
    rundir = base / "run" / "b"
    procs = [
        _start(["services.xenstore", "--topology", str(topo)], repo),
        _start(["bench.xenstore", "echo", f"ipc://{base}/echo.sock"], repo),
    ]
    try:
        deadline = time.monotonic() + 15
        while not (rundir / "xenstored.socket").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        secret = host_secret(rundir)
        ours: dict[str, list[float]] = {}
        base_: dict[str, list[float]] = {}
        for r in range(rounds):
            note(f"xenstore bench round {r + 1}/{rounds}")
            for key, val in trio.run(
                _measure, f"ipc://{rundir}/xenstore.sock", secret, n, False
            ).items():
                ours.setdefault(key, []).append(val)
            for key, val in trio.run(_measure, f"ipc://{base}/echo.sock", b"", n, True).items():
                base_.setdefault(key, []).append(val)
    finally:
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(5)
        shutil.rmtree(base, ignore_errors=True)
    results = [
        Result(
            "xenstore", f"{k}_rate", median(ours[k]), median(base_[k]), 0.5, False, "req/s", "echo"
        )
        for k in ("read", "write", "transaction")
    ]
    results.append(
        Result(
            "xenstore",
            "read_rtt",
            median(ours["rtt"]),
            median(base_["rtt"]),
            2.0,
            True,
            "us",
            "echo",
        )
    )
    return emit(results)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "echo":
        trio.run(_echo_server, sys.argv[2])
    else:
        run(quick="--quick" in sys.argv)
