"""Our ring and blkif codecs against the real ``io/ring.h`` macros, in both roles.

``tests/c/ring_peer.c`` plays one end of a blkif ring with the C macros on a
4 KiB file mapped MAP_SHARED; this test maps the same file and plays the other
end with ``shared.abi.ring``/``blkif``, in lockstep over the peer's stdin and
stdout. A seeded schedule of random batches moves several thousand requests and
responses through the 32-slot ring, from index 0 and from just below 2**32.

Checked at every step: each request and response byte for byte (both sides
derive request ``k`` from ``k``), the shared header against ``RingModel``, every
notify decision against the ring.h formula, and that no wakeup is lost or
spurious: a push notifies exactly when the consumer's last final check found
no work (it went to sleep) and nothing woke it since.
"""

from __future__ import annotations

import mmap
import os
import random
import select
import struct
import subprocess
import time
from pathlib import Path

import pytest

from shared.abi import blkif
from shared.abi.blkif import (
    BlkifDiscard,
    BlkifOp,
    BlkifRequest,
    BlkifRequestDiscard,
    BlkifRequestIndirect,
    BlkifResponse,
    Segment,
)
from shared.abi.ring import BackRing, FrontRing, SRing
from tests.cbuild import compile_c
from tests.test_abi_ring import RingModel

M32 = 2**32
M64 = 2**64
ENTRY = blkif.BLKIF_RING_ENTRY_SIZE
HEADER = struct.Struct("<IIII")
PEER_SOURCE = Path(__file__).parent / "c" / "ring_peer.c"
TARGET_RESPONSES = 5000
WALL_CLOCK_LIMIT = 60.0
LINE_TIMEOUT = 10.0


def _mix(k: int) -> int:
    return (k * 0x9E3779B97F4A7C15 + 0x0123456789ABCDEF) % M64


def expected_request(k: int) -> blkif.AnyRequest:
    """Request number ``k``; must match make_request() in ring_peer.c."""
    handle = (0x51 + k * 7) % 2**16
    if k % 7 == 5:
        flag = BlkifDiscard.SECURE if (k // 7) % 2 else 0
        return BlkifRequestDiscard(flag, handle, _mix(k), _mix(k) >> 11, 1 + k % 4096)
    if k % 7 == 6:
        op = BlkifOp.WRITE if (k // 7) % 2 else BlkifOp.READ
        nr = 1 + (k * 37) % 4096
        grefs = tuple((k * 8 + j + 100) % M32 for j in range(blkif.indirect_pages(nr)))
        return BlkifRequestIndirect(op, nr, _mix(k), _mix(k) >> 13, handle, grefs)
    segs = []
    for j in range(1 + k % blkif.BLKIF_MAX_SEGMENTS_PER_REQUEST):
        first = (k + j) % 8
        segs.append(Segment((k * 16 + j + 8) % M32, first, first + (k * 3 + j) % (8 - first)))
    op = BlkifOp.WRITE if k % 2 else BlkifOp.READ
    return BlkifRequest.of(op, handle, _mix(k), _mix(k) >> 9, tuple(segs))


def expected_slot(k: int) -> bytes:
    """The whole ring entry as C writes it: memset to zero, then the fields."""
    return expected_request(k).encode().ljust(ENTRY, b"\0")


def expected_response(k: int) -> BlkifResponse:
    return blkif.response_for(expected_request(k), -(k % 3))


def c_request_line(req: blkif.AnyRequest) -> str:
    """The line print_request() in ring_peer.c writes for a request it accepted."""
    if isinstance(req, BlkifRequestDiscard):
        return f"disc ok {req.flag} {req.handle} {req.id} {req.sector_number} {req.nr_sectors}"
    if isinstance(req, BlkifRequestIndirect):
        grefs = "".join(f" {g}" for g in req.indirect_grefs)
        return (
            f"ind ok {req.indirect_op} {req.nr_segments} {req.handle} {req.id} "
            f"{req.sector_number}{grefs}"
        )
    segs = "".join(f" {s.gref}:{s.first_sect}:{s.last_sect}" for s in req.segments)
    return (
        f"req ok {req.operation} {req.nr_segments} {req.handle} {req.id} {req.sector_number}{segs}"
    )


def c_response_line(rsp: BlkifResponse) -> str:
    return f"rsp ok {rsp.id} {rsp.operation} {rsp.status}"


class CPeer:
    """The C process, one command line in and its answer out, each with a timeout."""

    def __init__(self, exe: str, path: Path, role: str) -> None:
        self.proc = subprocess.Popen(
            [exe, str(path), role],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        self._pending = b""

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")

    def readline(self) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + LINE_TIMEOUT
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(remaining, 0))
            if not ready:
                raise TimeoutError(f"ring_peer silent for {LINE_TIMEOUT}s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError(f"ring_peer exited: {self._stderr()}")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line.decode()

    def call(self, line: str) -> str:
        self.send(line)
        return self.readline()

    def call_expect(self, line: str, prefix: str) -> int:
        answer = self.call(line)
        word, _, value = answer.partition(" ")
        assert word == prefix, f"{line!r} -> {answer!r}"
        return int(value) if value else 0

    def entries(self) -> tuple[list[str], int]:
        """Send ``consume``; the entry lines and the count from ``end N``."""
        self.send("consume")
        lines = []
        while not (line := self.readline()).startswith(("end ", "error ")):
            lines.append(line)
        assert line.startswith("end "), line
        return lines, int(line.split()[1])

    def _stderr(self) -> str:
        try:
            return self.proc.communicate(timeout=2)[1].decode(errors="replace")
        except subprocess.TimeoutExpired:
            return "(no stderr)"

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.send("quit")
                self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=5)


class PyFront:
    """Our frontend: produces request k, checks response k byte for byte."""

    def __init__(self, ring: FrontRing) -> None:
        self.ring = ring
        self.sent = self.answered = 0

    def push(self, n: int) -> bool:
        for _ in range(n):
            self.ring.put_request(expected_slot(self.sent))
            self.sent += 1
        return self.ring.push_requests_and_check_notify()

    def consume(self) -> int:
        got = self.ring.take_responses()
        for raw in got:
            want = expected_response(self.answered)
            assert raw[: blkif.RESPONSE.size] == want.encode(), self.answered
            assert BlkifResponse.decode(raw) == want
            self.answered += 1
        return len(got)

    def final(self) -> int:
        return int(self.ring.final_check_for_responses())

    def state(self) -> tuple[int, int]:
        return (self.ring.req_prod_pvt, self.ring.rsp_cons)


class PyBack:
    """Our backend: checks request k byte for byte, answers in order."""

    def __init__(self, ring: BackRing) -> None:
        self.ring = ring
        self.taken = self.answered = 0

    def consume(self) -> int:
        got = self.ring.take_requests()
        for raw in got:
            assert raw == expected_slot(self.taken), self.taken
            assert blkif.decode_request(raw) == expected_request(self.taken)
            self.taken += 1
        return len(got)

    def respond(self, n: int) -> bool:
        for _ in range(n):
            self.ring.put_response(expected_response(self.answered).encode())
            self.answered += 1
        return self.ring.push_responses_and_check_notify()

    def final(self) -> int:
        return int(self.ring.final_check_for_requests())

    def state(self) -> tuple[int, int]:
        return (self.ring.rsp_prod_pvt, self.ring.req_cons)


class CFront:
    def __init__(self, peer: CPeer) -> None:
        self.peer = peer
        self.answered = 0

    def push(self, n: int) -> bool:
        return bool(self.peer.call_expect(f"push {n}", "notify"))

    def consume(self) -> int:
        lines, count = self.peer.entries()
        for line in lines:
            assert line == c_response_line(expected_response(self.answered)), line
            self.answered += 1
        return count

    def final(self) -> int:
        return self.peer.call_expect("final", "work")

    def state(self) -> tuple[int, int]:
        a, b = self.peer.call("state").split()[1:]
        return (int(a), int(b))


class CBack:
    def __init__(self, peer: CPeer) -> None:
        self.peer = peer
        self.taken = 0

    def consume(self) -> int:
        lines, count = self.peer.entries()
        for line in lines:
            assert line == c_request_line(expected_request(self.taken)), line
            self.taken += 1
        return count

    def respond(self, n: int) -> bool:
        return bool(self.peer.call_expect(f"respond {n}", "notify"))

    def final(self) -> int:
        return self.peer.call_expect("final", "work")

    def state(self) -> tuple[int, int]:
        a, b = self.peer.call("state").split()[1:]
        return (int(a), int(b))


@pytest.fixture(scope="module")
def peer_exe(tmp_path_factory: pytest.TempPathFactory) -> str:
    return compile_c(tmp_path_factory.mktemp("ring_peer"), "ring_peer.c", PEER_SOURCE.read_text())


def _exchange(front, back, model: RingModel, page: mmap.mmap, rng: random.Random) -> int:
    """Run the random schedule until TARGET_RESPONSES answers reached the frontend."""
    deadline = time.monotonic() + WALL_CLOCK_LIMIT
    back_asleep = front_asleep = True  # neither consumer has run; both events armed
    delivered = steps = 0
    while delivered < TARGET_RESPONSES:
        assert time.monotonic() < deadline, f"wall-clock limit after {steps} steps"
        steps += 1
        action = rng.choice(
            ["push", "push", "take_req", "final_req", "respond", "take_rsp", "final_rsp"]
        )
        if action == "push":
            n = rng.randint(0, model.free_requests())
            notify = front.push(n)
            assert notify is model.push_requests(n), "notify differs from ring.h arithmetic"
            assert notify is (n > 0 and back_asleep), "lost or spurious request wakeup"
            back_asleep = back_asleep and not notify
        elif action == "respond":
            n = rng.randint(0, model.pending_responses())
            notify = back.respond(n)
            assert notify is model.push_responses(n), "notify differs from ring.h arithmetic"
            assert notify is (n > 0 and front_asleep), "lost or spurious response wakeup"
            front_asleep = front_asleep and not notify
        elif action == "take_req" and not back_asleep:
            assert back.consume() == model.take_requests()
        elif action == "take_rsp" and not front_asleep:
            got = front.consume()
            assert got == model.take_responses()
            delivered += got
        elif action == "final_req" and not back_asleep:
            work = model.final_requests()
            assert back.final() == (work if isinstance(back, CBack) else int(work > 0))
            back_asleep = work == 0
        elif action == "final_rsp" and not front_asleep:
            work = model.final_responses()
            assert front.final() == (work if isinstance(front, CFront) else int(work > 0))
            front_asleep = work == 0
        assert HEADER.unpack_from(page) == model.header(), f"step {steps}: {action}"
        if steps % 97 == 0:
            assert front.state() == (model.req_prod_pvt, model.rsp_cons)
            assert back.state() == (model.rsp_prod_pvt, model.req_cons)
    assert front.state() == (model.req_prod_pvt, model.rsp_cons)
    assert back.state() == (model.rsp_prod_pvt, model.req_cons)
    return steps


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "start", [None, M32 - 1, M32 - 1500], ids=["init", "wrap-now", "wrap-later"]
)
@pytest.mark.parametrize("c_role", ["front", "back"])
def test_python_and_c_ends_interoperate(
    peer_exe: str, tmp_path: Path, c_role: str, start: int | None
) -> None:
    path = tmp_path / "ring.page"
    path.write_bytes(b"\xa5" * 4096)  # garbage that SHARED_RING_INIT must clear
    rng = random.Random(f"{c_role}-{start}")
    index = start or 0
    peer = CPeer(peer_exe, path, c_role)
    try:
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), 4096) as page:
            sring = SRing(page, ENTRY)
            if start is None:
                if c_role == "front":
                    assert peer.call("init") == "ok"
                else:
                    sring.init()
                assert page[:64] == HEADER.pack(0, 1, 0, 1) + bytes(48)
            else:
                HEADER.pack_into(page, 0, index, (index + 1) % M32, index, (index + 1) % M32)
                page[16:64] = bytes(48)
            if c_role == "front":
                if start is not None:
                    assert peer.call(f"attach {index}") == "ok"
                front, back = CFront(peer), PyBack(BackRing(sring, index))
            else:
                assert peer.call(f"attach {index}") == "ok"
                front, back = PyFront(FrontRing(sring, index)), CBack(peer)
            model = RingModel.at(sring.nr_ents, index)
            _exchange(front, back, model, page, rng)
            requests = (model.req_prod - index) % M32
            assert requests >= TARGET_RESPONSES
            if start is not None:
                assert model.req_prod < index, "the u32 indices did not wrap"
            del front, back, sring
    finally:
        peer.close()
