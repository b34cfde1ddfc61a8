"""The one place that touches nng: non-blocking Pair1 sockets awaited with Trio.

pynng's own async API hands every operation to an nng worker thread and back,
which measured several times slower here. Instead each socket is used in
non-blocking mode: try the operation, and on ``EAGAIN`` wait until nng's
notification fd (``recv_fd``/``send_fd``) is readable with
``trio.lowlevel.wait_readable``. Messages go through nng's C API directly so a
received message carries the id of the pipe (peer connection) it came on and a
reply can be routed back to that pipe without pynng's per-message locking.

A service listens with Pair1 in polyamorous mode (many peers, routing by pipe)
and hands each client a dedicated plain Pair1 socket of its own, because the
polyamorous mode measured ~16 µs slower per round trip here. Pair sockets,
unlike Rep0, do not lose a reply when a non-blocking send meets a full pipe
(see machine-limits.md finding 5).
"""

from __future__ import annotations

from collections.abc import Callable

import pynng
import trio
from pynng._nng import ffi, lib

NONBLOCK = lib.NNG_FLAG_NONBLOCK
ALLOC = lib.NNG_FLAG_ALLOC
EAGAIN = lib.NNG_EAGAIN
ECLOSED = lib.NNG_ECLOSED

# Pair sockets queue this many messages in each direction: the biggest single
# throughput lever measured for nng (about 3x at 64 B).
BUFFER_MESSAGES = 256
# Frames larger than this are refused by nng (and counted by the receiver).
MAX_FRAME = 8 * 1024 * 1024


class TransportClosed(Exception):
    """The socket was closed while an operation was waiting."""


def _check(err: int) -> None:
    if err:
        pynng.exceptions.check_err(err)


def open_socket(*, poly: bool) -> pynng.Socket:
    """A tuned Pair1 socket, polyamorous when it must serve many peers (routed
    by pipe). Listen or dial through :class:`NngPort` after hooking pipe events."""
    sock = pynng.Pair1(polyamorous=True) if poly else pynng.Pair1()
    sock.recv_buffer_size = BUFFER_MESSAGES
    sock.send_buffer_size = BUFFER_MESSAGES
    sock.recv_max_size = MAX_FRAME
    sock.reconnect_time_min = 10
    sock.reconnect_time_max = 200
    return sock


class NngPort:
    """Non-blocking send/receive of (pipe id, bytes) on one socket."""

    def __init__(self, sock: pynng.Socket) -> None:
        self.sock = sock
        self._handle = sock.socket
        self._recv_fd = sock.recv_fd
        self._send_fd = sock.send_fd
        self._msg_p = ffi.new("nng_msg **")
        self._data_p = ffi.new("char **")
        self._size_p = ffi.new("size_t *")
        self.closed = False
        # Set by the owner once a pipe is connected (from its pipe-event hook).
        self.up = False

    def try_recv(self) -> tuple[int, bytes] | None:
        """(pipe id, frame) if one is queued, else None; never blocks."""
        err = lib.nng_recvmsg(self._handle, self._msg_p, NONBLOCK)
        if err:
            return self._failed(err)
        msg = self._msg_p[0]
        try:
            pipe = lib.nng_pipe_id(lib.nng_msg_get_pipe(msg))
            data = ffi.unpack(ffi.cast("char *", lib.nng_msg_body(msg)), lib.nng_msg_len(msg))
        finally:
            lib.nng_msg_free(msg)
        return pipe, data

    def try_recv_frame(self) -> bytes | None:
        """A frame if one is queued, else None: the cheaper call for a socket
        with a single peer, where the pipe does not matter."""
        err = lib.nng_recv(self._handle, self._data_p, self._size_p, NONBLOCK | ALLOC)
        if err:
            return self._failed(err)
        ptr, size = self._data_p[0], self._size_p[0]
        data = ffi.unpack(ptr, size)
        lib.nng_free(ptr, size)
        return data

    def _failed(self, err: int) -> None:
        if err == EAGAIN:
            return None
        if err == ECLOSED or self.closed:
            raise TransportClosed("socket closed")
        _check(err)
        return None

    @property
    def recv_fd(self) -> int:
        return self._recv_fd

    async def wait_recv(self) -> None:
        await trio.lowlevel.wait_readable(self._recv_fd)

    def try_send(self, data: bytes, pipe: int | None = None) -> bool:
        """Queue ``data`` (to ``pipe`` on a polyamorous socket); False if full."""
        if pipe is None:
            err = lib.nng_send(self._handle, data, len(data), NONBLOCK)
            if err:
                return self._failed(err) is not None
            return True
        msg_p = ffi.new("nng_msg **")
        _check(lib.nng_msg_alloc(msg_p, 0))
        msg = msg_p[0]
        _check(lib.nng_msg_append(msg, data, len(data)))
        p = ffi.new("nng_pipe *")
        p.id = pipe
        lib.nng_msg_set_pipe(msg, p[0])
        err = lib.nng_sendmsg(self._handle, msg, NONBLOCK)
        if err:
            lib.nng_msg_free(msg)
            return self._failed(err) is not None
        return True

    async def send(self, data: bytes, pipe: int | None = None) -> None:
        """Send, waiting on nng's send fd while the queue is full."""
        while not self.try_send(data, pipe):
            if self.closed:
                raise TransportClosed("socket closed")
            await trio.lowlevel.wait_readable(self._send_fd)

    def on_pipe_events(
        self, added: Callable[[int], None] | None, removed: Callable[[int], None] | None
    ) -> None:
        """Call ``added(pipe_id)``/``removed(pipe_id)`` from nng's threads."""
        if added is not None:
            self.sock.add_post_pipe_connect_cb(lambda pipe: added(pipe.id))
        if removed is not None:
            self.sock.add_post_pipe_remove_cb(lambda pipe: removed(pipe.id))

    def listen(self, endpoint: str) -> str:
        """Listen; returns the bound endpoint (a ``tcp://host:0`` gets its port)."""
        listener = self.sock.listen(endpoint)
        if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
            return f"tcp://{listener.local_address}"
        return endpoint

    def dial(self, endpoint: str) -> None:
        """Non-blocking: a client may start before its server, and nng redials
        by itself after the server restarts."""
        self.sock.dial(endpoint, block=False)

    def close(self) -> None:
        """Close the socket, first waking any task waiting on its fds."""
        if self.closed:
            return
        self.closed = True
        try:
            trio.lowlevel.notify_closing(self._recv_fd)
            trio.lowlevel.notify_closing(self._send_fd)
        except RuntimeError:  # not inside trio.run: nobody can be waiting
            pass
        self.sock.close()
