"""Hypothesis fuzzing of xenstored's Unix socket with malformed frames.

Every example opens a connection and sends a few frames that must all be
refused — unknown types, transaction ids that name nothing, payloads without
their NULs, invalid paths, invalid permissions — optionally ending with a
header announcing more than 4096 bytes (the connection must be dropped) or a
truncated frame (no answer). Checked each time: one XS_ERROR per complete
frame, in order, with the right name and req_id; the drop when due; the store
unchanged; a long-lived witness connection still served.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.xenstore.server import XenStoreService
from shared.abi import xs_wire as w
from shared.abi.xs_wire import XsParser, XsType
from tests.test_xenstore_wire import running_service

EXAMPLES = 2_500  # default run (~10 s); the slow run does the acceptance's 10 000


class ServiceThread:
    """An in-process xenstored running on its own Trio loop in a thread."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.service: XenStoreService | None = None
        self.sock: Path | None = None
        self._token: Any = None
        self._stop: trio.Event | None = None
        self.thread = threading.Thread(target=lambda: trio.run(self._main), daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "service did not start"

    async def _main(self) -> None:
        async with running_service() as (service, sock):
            self.service, self.sock = service, sock
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            self.ready.set()
            await self._stop.wait()

    def close(self) -> None:
        assert self._stop is not None
        self._token.run_sync_soon(self._stop.set)
        self.thread.join(10)


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
    return s


def exchange(
    s: socket.socket, data: bytes, replies: int, until_eof: bool
) -> tuple[list[w.XsMessage], bool]:
    """Send ``data``; collect ``replies`` messages (or everything until EOF)."""
    if data:
        s.sendall(data)
    parser, got, eof = XsParser(), [], False
    while until_eof or len(got) < replies:
        chunk = s.recv(65536)
        if not chunk:
            eof = True
            break
        got += parser.feed(chunk)
    return got, eof


@pytest.fixture(scope="module")
def xenstored() -> Iterator[tuple[ServiceThread, socket.socket]]:
    svc = ServiceThread()
    assert svc.sock is not None
    witness = connect(svc.sock)
    got, _ = exchange(witness, w.write("/fuzz/witness", "alive", req_id=1).encode(), 1, False)
    assert got[0].payload == b"OK\0"
    try:
        yield svc, witness
    finally:
        witness.close()
        svc.close()


# --- frames that must be refused, with the error they must get --------------------------

PATH_TYPES = [
    XsType.DIRECTORY,
    XsType.READ,
    XsType.GET_PERMS,
    XsType.WATCH,
    XsType.UNWATCH,
    XsType.WRITE,
    XsType.MKDIR,
    XsType.RM,
    XsType.SET_PERMS,
    XsType.DIRECTORY_PART,
]
TX_TYPES = [
    t for t in XsType if t not in (XsType.WATCH, XsType.UNWATCH) and t < 23 and t not in (15, 16)
]
# suffix making the rest of the payload well formed for each type
SUFFIX = {
    XsType.WATCH: b"tok\0",
    XsType.UNWATCH: b"tok\0",
    XsType.WRITE: b"value",
    XsType.SET_PERMS: b"n0\0",
    XsType.DIRECTORY_PART: b"0\0",
}

u32 = st.integers(0, 2**32 - 1)
junk = st.binary(max_size=64)
bad_path = st.one_of(
    st.text(alphabet="abc/ .%:é*\t~", min_size=1, max_size=20).filter(
        lambda p: not w.is_valid_path(p.encode(), allow_relative=True, allow_special=True)
    ),
    st.sampled_from(["//", "/a//b", "/a/", "a/", "/a b", "@", "/" + "x" * 3100, "x" * 2100]),
)


@st.composite
def refused_frame(draw: Any) -> tuple[bytes, int, str]:
    """(frame bytes, req_id, expected error)."""
    req_id = draw(u32)
    kind = draw(st.sampled_from(["unknown", "tx", "no-nul", "path", "perm", "end"]))
    if kind == "unknown":
        type_ = draw(st.one_of(st.integers(23, 2**32 - 1), st.sampled_from([15, 16, 20])))
        return w.XsMessage(type_, req_id, draw(u32), draw(junk)).encode(), req_id, "ENOSYS"
    if kind == "tx":
        type_ = draw(st.sampled_from(TX_TYPES))
        return (
            w.XsMessage(type_, req_id, draw(st.integers(1, 2**32 - 1)), draw(junk)).encode(),
            req_id,
            "ENOENT",
        )
    if kind == "no-nul":
        type_ = draw(st.sampled_from([*PATH_TYPES, XsType.GET_DOMAIN_PATH]))
        payload = draw(st.binary(max_size=64).filter(lambda b: b"\0" not in b))
        return w.XsMessage(type_, req_id, 0, payload).encode(), req_id, "EINVAL"
    if kind == "path":
        type_ = draw(st.sampled_from(PATH_TYPES))
        payload = draw(bad_path).encode() + b"\0" + SUFFIX.get(type_, b"")
        return w.XsMessage(type_, req_id, 0, payload).encode(), req_id, "EINVAL"
    if kind == "perm":
        perm = draw(st.binary(min_size=1, max_size=8).filter(lambda b: b"\0" not in b))
        payload = b"/fuzz/witness\0" + perm + b"\0"
        try:
            w.parse_perm(perm)
            payload = b"/fuzz/witness\0n0\0" + perm  # then make it unterminated instead
        except w.XsPayloadError:
            pass
        return w.XsMessage(XsType.SET_PERMS, req_id, 0, payload).encode(), req_id, "EINVAL"
    return w.XsMessage(XsType.TRANSACTION_END, req_id, 0, b"T\0").encode(), req_id, "ENOENT"


ending = st.sampled_from(["none", "oversize", "truncated"])


def store_state(svc: ServiceThread) -> list[Any]:
    assert svc.service is not None
    return [n[:3] for n in svc.service.core.store.flat()]


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        derandomize=True,
    )


CASES = {
    "frames": st.lists(refused_frame(), min_size=1, max_size=5),
    "end": ending,
    "cut": st.integers(0, 30),
}


@_settings(EXAMPLES)
@given(**CASES)
def test_refused_frames(xenstored: Any, frames: Any, end: str, cut: int) -> None:
    check_refused(xenstored, frames, end, cut)


@pytest.mark.slow
@_settings(10_000)
@given(**CASES)
def test_refused_frames_10k(xenstored: Any, frames: Any, end: str, cut: int) -> None:
    check_refused(xenstored, frames, end, cut)


def check_refused(
    xenstored: tuple[ServiceThread, socket.socket],
    frames: list[tuple[bytes, int, str]],
    end: str,
    cut: int,
) -> None:
    svc, witness = xenstored
    assert svc.sock is not None and svc.service is not None
    before = store_state(svc)
    dropped_before = svc.service.core.dropped_connections
    data = b"".join(f for f, _, _ in frames)
    if end == "oversize":
        data += struct.pack("<IIII", XsType.READ, 1, 0, 4097 + cut)
    elif end == "truncated":
        data += struct.pack("<IIII", XsType.WRITE, 1, 0, 40) + b"/fuzz/witness\0"[: cut % 14]
    with connect(svc.sock) as s:
        if end == "truncated":
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)  # the server sees the end mid-frame
            data = b""
        got, eof = exchange(s, data, len(frames), until_eof=end != "none")
    assert [(m.type, m.req_id, m.payload) for m in got] == [
        (XsType.ERROR, req_id, error.encode() + b"\0") for _, req_id, error in frames
    ]
    if end == "oversize":
        assert eof and svc.service.core.dropped_connections == dropped_before + 1
    assert store_state(svc) == before
    reply, _ = exchange(witness, w.read("/fuzz/witness", req_id=7).encode(), 1, False)
    assert reply[0].payload == b"alive"
