"""kill -9 of the real xenstored at random points during transactional writes.

A client commits transactions, each writing ``/dur/a = i``, ``/dur/b = i`` and
``/dur/log/<i/200>/<i> = i``, and remembers which commits were acknowledged. A thread
kills the process with SIGKILL at a random moment; after a restart every
acknowledged commit must be there and no transaction half there (``a == b``,
and the log holds exactly the commits up to ``a``). The run directory is kept
across rounds, so each restart replays a journal that the previous crashes
may have torn.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path

import pytest

from shared.abi import xs_wire as w
from shared.abi.xs_wire import XsMessage, XsParser, XsType
from tests.test_xenstore_clients import Xenstored


class Link:
    """A blocking xs_wire client on the Unix socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.parser = XsParser()
        self.pending: list[XsMessage] = []
        self.req_id = 0

    def call(self, msg: XsMessage) -> XsMessage:
        self.req_id += 1
        msg = XsMessage(msg.type, self.req_id, msg.tx_id, msg.payload)
        self.sock.sendall(msg.encode())
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("xenstored went away")
            self.pending += [m for m in self.parser.feed(data) if m.type != XsType.WATCH_EVENT]
        reply = self.pending.pop(0)
        assert reply.req_id == msg.req_id
        return reply

    def close(self) -> None:
        self.sock.close()


def commit_one(link: Link, i: int) -> bool:
    """One transaction; True once its commit is acknowledged."""
    reply = link.call(w.transaction_start())
    tx = int(reply.payload[:-1])
    for path in ("/dur/a", "/dur/b", f"/dur/log/{i // 200}/{i}"):
        assert link.call(w.write(path, str(i), tx_id=tx)).payload == b"OK\0"
    return link.call(w.transaction_end(tx, True)).payload == b"OK\0"


def check_state(daemon: Xenstored, acked: set[int]) -> int:
    link = Link(daemon.sock)
    try:
        a = link.call(w.read("/dur/a"))
        if a.type == XsType.ERROR:  # nothing committed yet
            assert not acked
            return 0
        b = link.call(w.read("/dur/b"))
        assert a.payload == b.payload, "a transaction was half applied"
        last = int(a.payload)
        logged = set()
        for bucket in w.split_args(link.call(w.directory("/dur/log")).payload):
            names = link.call(w.directory(b"/dur/log/" + bucket)).payload
            logged |= {int(x) for x in w.split_args(names)}
        assert logged == set(range(1, last + 1)), "log and a/b disagree"
        assert acked <= logged, f"acknowledged commits lost: {sorted(acked - logged)[:5]}"
        return last
    finally:
        link.close()


def crash_rounds(rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    base = Path(tempfile.mkdtemp(prefix="xsd", dir="/tmp"))
    daemon = Xenstored(base)
    acked: set[int] = set()
    try:
        daemon.start()
        last = 0
        for _ in range(rounds):
            link = Link(daemon.sock)
            assert daemon.proc is not None
            killer = threading.Timer(rng.uniform(0.01, 0.3), daemon.kill)
            killer.start()
            i = last
            try:
                while True:
                    i += 1
                    if commit_one(link, i):
                        acked.add(i)
            except (ConnectionError, OSError):
                pass  # killed mid-way
            finally:
                killer.join()
                link.close()
            assert daemon.proc.returncode == -signal.SIGKILL
            daemon.start()
            last = check_state(daemon, acked)
        assert acked, "no commit was ever acknowledged"
    finally:
        daemon.kill()
        shutil.rmtree(base, ignore_errors=True)


def test_kill9_quick() -> None:
    crash_rounds(3, seed=1)


@pytest.mark.slow
def test_kill9_100_times() -> None:
    crash_rounds(100, seed=2)
