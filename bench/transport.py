"""Transport benchmark: our channel against three baselines in the same run.

Round trip (64 B) and one-way pipelined throughput (64 B, 4 KiB, 64 KiB)
between two processes, for:

- ``ours``   — shared.transport (Trio, fdwait on nng, codec + envelope);
- ``sync``   — pynng's own blocking calls (Pair0, same buffers);
- ``async``  — pynng's own async API under Trio (``asend``/``arecv``);
- ``sock``   — a raw Unix socketpair with length-prefixed frames (the floor).

Modes are interleaved round by round so drift on this 2-vCPU machine hits all
of them alike; each figure is the median over rounds. The benchmark process is
pinned to CPU 0 and every peer to CPU 1: unpinned, the scheduler's placement
(same vCPU: ~11 µs wake-ups, different vCPUs: ~40 µs) moved round trips by a
factor of two between runs, for every mode.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import pynng
import trio

from bench._report import Result, emit, median, note, percentile
from bench._transport_peer import BenchCount, BenchData, BenchEcho, BenchQuery
from shared.transport import open_channel
from shared.transport._nng import BUFFER_MESSAGES

MODES = ["ours", "sync", "async", "sock"]
BENCH_CPU, PEER_CPU = 0, "1"
SIZES = [64, 4096, 65536]


class Peers:
    """One echo/sink process per mode, killed by PID on exit."""

    def __init__(self, rundir: str) -> None:
        self.procs: list[subprocess.Popen] = []
        self.endpoints: dict[str, str] = {}
        self.sock: socket.socket | None = None
        for mode in MODES:
            if mode == "sock":
                mine, theirs = socket.socketpair()
                self.sock = mine
                arg, fds = str(theirs.fileno()), (theirs.fileno(),)
            else:
                arg = self.endpoints[mode] = f"ipc://{rundir}/{mode}.sock"
                fds = ()
            self.procs.append(
                subprocess.Popen(
                    [
                        "taskset",
                        "-c",
                        PEER_CPU,
                        sys.executable,
                        "-m",
                        "bench._transport_peer",
                        mode,
                        arg,
                    ],
                    pass_fds=fds,
                )
            )
            if mode == "sock":
                theirs.close()
        time.sleep(1.0)  # let every peer import and listen

    def close(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait(5)


# --- per-mode clients --------------------------------------------------------


def _nng_client(endpoint: str) -> pynng.Socket:
    sock = pynng.Pair0(recv_buffer_size=BUFFER_MESSAGES, send_buffer_size=BUFFER_MESSAGES)
    sock.recv_max_size = 0
    sock.dial(endpoint, block=True)
    return sock


def sync_rtt(endpoint: str, n: int) -> list[float]:
    with _nng_client(endpoint) as sock:
        payload, lat = b"E" * 64, []
        for _ in range(n):
            t = time.perf_counter()
            sock.send(payload)
            sock.recv()
            lat.append(time.perf_counter() - t)
    return lat


def sync_tput(endpoint: str, size: int, n: int) -> float:
    with _nng_client(endpoint) as sock:
        payload = b"D" * size
        t = time.perf_counter()
        for _ in range(n):
            sock.send(payload)
        sock.send(b"Q")
        got = int(sock.recv())
        elapsed = time.perf_counter() - t
    assert got == n, f"sync sink counted {got} of {n}"
    return n / elapsed


def async_rtt(endpoint: str, n: int) -> list[float]:
    async def go() -> list[float]:
        with _nng_client(endpoint) as sock:
            payload, lat = b"E" * 64, []
            for _ in range(n):
                t = time.perf_counter()
                await sock.asend(payload)
                await sock.arecv()
                lat.append(time.perf_counter() - t)
            return lat

    return trio.run(go)


def async_tput(endpoint: str, size: int, n: int) -> float:
    async def go() -> float:
        with _nng_client(endpoint) as sock:
            payload = b"D" * size
            t = time.perf_counter()
            for _ in range(n):
                await sock.asend(payload)
            await sock.asend(b"Q")
            got = int(await sock.arecv())
            elapsed = time.perf_counter() - t
        assert got == n, f"async sink counted {got} of {n}"
        return n / elapsed

    return trio.run(go)


def ours_rtt(endpoint: str, n: int) -> list[float]:
    async def go() -> list[float]:
        async with open_channel(endpoint) as chan:
            await chan.wait_connected()
            msg, lat = BenchEcho(b"E" * 64), []
            for _ in range(n):
                t = time.perf_counter()
                await chan.call(msg)
                lat.append(time.perf_counter() - t)
            return lat

    return trio.run(go)


def ours_tput(endpoint: str, size: int, n: int) -> float:
    async def go() -> float:
        async with open_channel(endpoint) as chan:
            await chan.wait_connected()
            msg = BenchData(b"D" * size)
            t = time.perf_counter()
            for _ in range(n):
                await chan.send(msg)
            reply = await chan.call(BenchQuery(), timeout=60)
            elapsed = time.perf_counter() - t
        assert isinstance(reply, BenchCount) and reply.count == n, f"ours counted {reply}"
        return n / elapsed

    return trio.run(go)


def _sock_frame(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def _sock_read_frame(sock: socket.socket) -> bytes:
    head = _recv_exactly(sock, 4)
    return _recv_exactly(sock, struct.unpack("<I", head)[0])


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("socket peer closed")
        buf += chunk
    return bytes(buf)


def sock_rtt(sock: socket.socket, n: int) -> list[float]:
    frame, lat = _sock_frame(b"E" * 64), []
    for _ in range(n):
        t = time.perf_counter()
        sock.sendall(frame)
        _sock_read_frame(sock)
        lat.append(time.perf_counter() - t)
    return lat


def sock_tput(sock: socket.socket, size: int, n: int) -> float:
    frame = _sock_frame(b"D" * size)
    t = time.perf_counter()
    for _ in range(n):
        sock.sendall(frame)
    sock.sendall(_sock_frame(b"Q"))
    got = int(_sock_read_frame(sock))
    elapsed = time.perf_counter() - t
    assert got == n, f"socket sink counted {got} of {n}"
    return n / elapsed


# --- the run -----------------------------------------------------------------


def _count(size: int, quick: bool) -> int:
    n = 20000 if size <= 4096 else 4000
    return n // 10 if quick else n


def run(quick: bool = False) -> list[Result]:
    if len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {BENCH_CPU})
    rounds = 2 if quick else 10
    rtt_n = 500 if quick else 1000
    with tempfile.TemporaryDirectory(prefix="domsplit-bench-") as rundir:
        peers = Peers(rundir)
        try:
            rtt: dict[str, list[float]] = {m: [] for m in MODES}
            p99: dict[str, list[float]] = {m: [] for m in MODES}
            tput: dict[tuple[str, int], list[float]] = {(m, s): [] for m in MODES for s in SIZES}
            ep = peers.endpoints
            rtt_fns: dict[str, Callable[[int], list[float]]] = {
                "ours": lambda n: ours_rtt(ep["ours"], n),
                "sync": lambda n: sync_rtt(ep["sync"], n),
                "async": lambda n: async_rtt(ep["async"], n),
                "sock": lambda n: sock_rtt(peers.sock, n),
            }
            tput_fns: dict[str, Callable[[int, int], float]] = {
                "ours": lambda s, n: ours_tput(ep["ours"], s, n),
                "sync": lambda s, n: sync_tput(ep["sync"], s, n),
                "async": lambda s, n: async_tput(ep["async"], s, n),
                "sock": lambda s, n: sock_tput(peers.sock, s, n),
            }
            for r in range(rounds):
                for mode in MODES:
                    lat = rtt_fns[mode](rtt_n)[rtt_n // 10 :]  # drop warm-up
                    rtt[mode].append(percentile(lat, 0.5) * 1e6)
                    p99[mode].append(percentile(lat, 0.99) * 1e6)
                if r % 2 == 0 or quick:  # throughput runs are long: every other round
                    for size in SIZES:
                        for mode in MODES:
                            tput[mode, size].append(tput_fns[mode](size, _count(size, quick)))
                note(
                    f"round {r + 1}/{rounds}: rtt p50 µs "
                    + ", ".join(f"{m} {rtt[m][-1]:.0f}" for m in MODES)
                )
        finally:
            peers.close()
    rtt_m = {m: median(v) for m, v in rtt.items()}
    tput_m = {k: median(v) for k, v in tput.items()}
    for m in MODES:
        note(
            f"{m:6s} rtt p50 {rtt_m[m]:7.1f} µs p99 {median(p99[m]):7.1f} µs  "
            + "  ".join(f"{s}B {tput_m[m, s]:9.0f}/s" for s in SIZES)
        )
    results = [
        Result(
            "transport",
            "rtt_64B_p50_us",
            rtt_m["ours"],
            rtt_m["sync"],
            1.3,
            True,
            "µs",
            "pynng sync",
        ),
        Result(
            "transport",
            "rtt_64B_p50_us_vs_async",
            rtt_m["ours"],
            rtt_m["async"],
            1.0,
            True,
            "µs",
            "pynng async",
        ),
        Result(
            "transport",
            "rtt_64B_p50_us_vs_socketpair",
            rtt_m["ours"],
            rtt_m["sock"],
            6.0,
            True,
            "µs",
            "socketpair",
        ),
    ]
    for size in SIZES:
        results.append(
            Result(
                "transport",
                f"oneway_{size}B_msgs_per_s",
                tput_m["ours", size],
                tput_m["async", size],
                5.0 if size == 64 else 1.0,
                False,
                "msg/s",
                "pynng async",
            )
        )
        results.append(
            Result(
                "transport",
                f"oneway_{size}B_msgs_per_s_vs_sync",
                tput_m["ours", size],
                tput_m["sync", size],
                0.5,
                False,
                "msg/s",
                "pynng sync",
            )
        )
    return emit(results)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run(quick="--quick" in sys.argv)
