"""A tiny service for transport tests: ``python -m tests.echo_service ENDPOINT``.

It echoes :class:`EchoRequest`, answers :class:`SlowRequest` after a delay,
records :class:`Note` one-way messages (sequence numbers) and reports them,
and pushes :class:`Note` messages back on :class:`PushRequest`.
"""

from __future__ import annotations

import sys

import trio

from shared.codec import message
from shared.transport import ServiceError, open_server


@message(9050)
class EchoRequest:
    n: int
    data: bytes = b""


@message(9051)
class EchoReply:
    n: int
    data: bytes = b""


@message(9052)
class SlowRequest:
    seconds: float


@message(9053)
class Note:
    seq: int


@message(9054)
class NotesRequest:
    pass


@message(9055)
class NotesReply:
    seqs: list[int]


@message(9056)
class PushRequest:
    count: int


@message(9057)
class FailRequest:
    deliberate: bool


def serve_echo(server) -> list[int]:
    """Route the test messages on ``server``; returns the list of noted seqs."""
    notes: list[int] = []

    async def slow(peer, msg: SlowRequest) -> EchoReply:
        await trio.sleep(msg.seconds)
        return EchoReply(-1)

    def note(peer, msg: Note) -> None:
        notes.append(msg.seq)

    def notes_request(peer, msg: NotesRequest) -> NotesReply:
        out = NotesReply(list(notes))
        notes.clear()
        return out

    async def push(peer, msg: PushRequest) -> EchoReply:
        for i in range(msg.count):
            await server.send(peer, Note(i))
        return EchoReply(msg.count)

    def fail(peer, msg: FailRequest) -> EchoReply:
        if msg.deliberate:
            raise ServiceError("refused", "as asked")
        raise RuntimeError("handler bug on purpose")

    server.route(EchoRequest, lambda peer, m: EchoReply(m.n, m.data))
    server.route(SlowRequest, slow)
    server.route(Note, note)
    server.route(NotesRequest, notes_request)
    server.route(PushRequest, push)
    server.route(FailRequest, fail)
    return notes


async def main(endpoint: str) -> None:
    async with open_server(endpoint) as server:
        serve_echo(server)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
